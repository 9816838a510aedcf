//! Task queues in memory: ready queues per (tenant, queue) with long-poll wake-ups, delayed tasks
//! waiting for their backoff, and leases of tasks handed to workers.
//!
//! The durable copy of every pending task lives in the store; this table is rebuilt from it at
//! start. Leases are not persisted: after a restart every unfinished task is delivered again
//! (at-least-once), with the same idempotency key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use sluice_store::TaskRow;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) enum Slot {
    Delayed,
    Ready {
        since_ms: i64,
    },
    Leased(Lease),
    /// A worker task in the store's shared queue: claimed, heartbeated and timed out there.
    Shared,
}

#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub deadline_ms: i64,
    pub heartbeat_deadline_ms: Option<i64>,
}

pub(crate) struct Entry {
    pub row: TaskRow,
    pub slot: Slot,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<String>,
    notify: Arc<Notify>,
}

/// What timed out, found by the reaper.
pub(crate) struct Expired {
    pub row: TaskRow,
    pub kind: &'static str,
}

#[derive(Default)]
pub(crate) struct TaskTable {
    entries: HashMap<String, Entry>,
    queues: HashMap<(String, String), Queue>,
    delayed: BTreeMap<(i64, String), ()>,
    /// Worker tasks live in the store's shared queue (several nodes), not in `queues`.
    shared: bool,
    /// Queues whose shared tasks became visible since the last `take_wakes`, with how many.
    wakes: Vec<(String, String, u32)>,
}

impl TaskTable {
    pub fn new(shared: bool) -> Self {
        Self { shared, ..Self::default() }
    }

    /// The queues (and how many tasks) that delayed shared tasks became visible on: the other
    /// nodes' pollers must hear of them.
    pub fn take_wakes(&mut self) -> Vec<(String, String, u32)> {
        std::mem::take(&mut self.wakes)
    }

    /// Wakes up to `n` pollers of a queue (no one if nobody polls it here).
    pub fn wake(&self, tenant: &str, queue: &str, n: u32) {
        if let Some(q) = self.queues.get(&(tenant.to_string(), queue.to_string())) {
            for _ in 0..n.min(64) {
                q.notify.notify_one();
            }
        }
    }

    /// Wakes every poller (wake-ups may have been missed).
    pub fn wake_all(&self) {
        for q in self.queues.values() {
            q.notify.notify_waiters();
        }
    }

    /// Whether a worker task waits in the store's shared queue.
    pub fn is_shared(&self, id: &str) -> bool {
        matches!(self.entries.get(id), Some(Entry { slot: Slot::Shared, .. }))
    }
    /// Adds a persisted task; returns it back if the engine must run it itself (`http`, `llm`)
    /// now.
    pub fn insert(&mut self, row: TaskRow, now: i64) -> Option<TaskRow> {
        let id = row.id.clone();
        if row.visible_at_ms > now {
            self.delayed.insert((row.visible_at_ms, id.clone()), ());
            self.entries.insert(id, Entry { row, slot: Slot::Delayed });
            return None;
        }
        self.make_ready(row, now)
    }

    fn make_ready(&mut self, row: TaskRow, now: i64) -> Option<TaskRow> {
        let id = row.id.clone();
        if row.kind != sluice_core::event::TaskKind::Worker {
            let lease = Lease { deadline_ms: now + row.start_to_close_ms as i64, heartbeat_deadline_ms: None };
            self.entries.insert(id, Entry { row: row.clone(), slot: Slot::Leased(lease) });
            return Some(row);
        }
        if self.shared {
            self.entries.insert(id, Entry { row, slot: Slot::Shared });
            return None;
        }
        let q = self.queues.entry((row.tenant.clone(), row.queue.clone())).or_default();
        q.ready.push_back(id.clone());
        q.notify.notify_waiters();
        self.entries.insert(id, Entry { row, slot: Slot::Ready { since_ms: now } });
        None
    }

    /// Moves delayed tasks whose time has come to their queues. Returns engine-run tasks to start.
    pub fn promote_due(&mut self, now: i64) -> Vec<TaskRow> {
        let mut run = Vec::new();
        while let Some(((at, id), ())) = self.delayed.first_key_value() {
            if *at > now {
                break;
            }
            let id = id.clone();
            let at = *at;
            self.delayed.remove(&(at, id.clone()));
            if let Some(entry) = self.entries.remove(&id) {
                if matches!(entry.slot, Slot::Delayed) {
                    if self.shared && entry.row.kind == sluice_core::event::TaskKind::Worker {
                        let (tenant, queue) = (&entry.row.tenant, &entry.row.queue);
                        match self.wakes.iter_mut().find(|(t, q, _)| t == tenant && q == queue) {
                            Some(w) => w.2 += 1,
                            None => self.wakes.push((tenant.clone(), queue.clone(), 1)),
                        }
                    }
                    if let Some(r) = self.make_ready(entry.row, now) {
                        run.push(r);
                    }
                } else {
                    self.entries.insert(id, entry);
                }
            }
        }
        run
    }

    pub fn next_delayed_at(&self) -> Option<i64> {
        self.delayed.first_key_value().map(|((at, _), ())| *at)
    }

    /// Takes up to `max` ready tasks of a queue and leases them.
    pub fn take(&mut self, tenant: &str, queue: &str, max: usize, now: i64) -> Vec<TaskRow> {
        let mut out = Vec::new();
        let Some(q) = self.queues.get_mut(&(tenant.to_string(), queue.to_string())) else {
            return out;
        };
        while out.len() < max {
            let Some(id) = q.ready.pop_front() else { break };
            let Some(entry) = self.entries.get_mut(&id) else { continue };
            if !matches!(entry.slot, Slot::Ready { .. }) {
                continue;
            }
            entry.slot = Slot::Leased(Lease {
                deadline_ms: now + entry.row.start_to_close_ms as i64,
                heartbeat_deadline_ms: entry.row.heartbeat_ms.map(|h| now + h as i64),
            });
            out.push(entry.row.clone());
        }
        out
    }

    /// The notifier of a queue, to wait on when it is empty.
    pub fn notifier(&mut self, tenant: &str, queue: &str) -> Arc<Notify> {
        self.queues.entry((tenant.to_string(), queue.to_string())).or_default().notify.clone()
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Removes a task for completion; it is put back with `restore` if the commit fails.
    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        self.entries.remove(id)
    }

    pub fn restore(&mut self, entry: Entry) {
        self.entries.insert(entry.row.id.clone(), entry);
    }

    /// Forgets a task whose run ended; a worker holding it learns through heartbeat.
    pub fn drop_task(&mut self, id: &str) {
        self.entries.remove(id);
    }

    pub fn heartbeat(&mut self, id: &str, now: i64) -> bool {
        match self.entries.get_mut(id) {
            Some(Entry { row, slot: Slot::Leased(lease) }) => {
                lease.heartbeat_deadline_ms = row.heartbeat_ms.map(|h| now + h as i64);
                true
            }
            _ => false,
        }
    }

    /// Finds tasks past a deadline and removes them from the table.
    pub fn reap(&mut self, now: i64) -> Vec<Expired> {
        let mut expired = Vec::new();
        for (id, entry) in &self.entries {
            let kind = match &entry.slot {
                Slot::Leased(l) if l.deadline_ms <= now => Some("timeout.start_to_close"),
                Slot::Leased(l) if l.heartbeat_deadline_ms.is_some_and(|h| h <= now) => Some("timeout.heartbeat"),
                Slot::Ready { since_ms } => entry
                    .row
                    .schedule_to_start_ms
                    .filter(|s| since_ms + *s as i64 <= now)
                    .map(|_| "timeout.schedule_to_start"),
                _ => None,
            };
            if let Some(kind) = kind {
                expired.push((id.clone(), kind));
            }
        }
        expired
            .into_iter()
            .filter_map(|(id, kind)| self.entries.remove(&id).map(|e| Expired { row: e.row, kind }))
            .collect()
    }

    /// Ready tasks and the age of the oldest, per queue, for metrics.
    pub fn depths(&self, now: i64) -> Vec<(String, String, usize, i64)> {
        let mut out: HashMap<(String, String), (usize, i64)> = HashMap::new();
        for e in self.entries.values() {
            if let Slot::Ready { since_ms } = e.slot {
                let d = out.entry((e.row.tenant.clone(), e.row.queue.clone())).or_insert((0, 0));
                d.0 += 1;
                d.1 = d.1.max(now - since_ms);
            }
        }
        out.into_iter().map(|((t, q), (n, age))| (t, q, n, age)).collect()
    }
}

/// Durable timers in memory, by due time, with an index to cancel one by (run, step).
#[derive(Default)]
pub(crate) struct Wheel {
    by_time: BTreeMap<(i64, String, String), String>,
    index: HashMap<(String, String), i64>,
}

impl Wheel {
    pub fn insert(&mut self, at: i64, run: String, step: String, tenant: String) {
        if let Some(old) = self.index.insert((run.clone(), step.clone()), at) {
            self.by_time.remove(&(old, run.clone(), step.clone()));
        }
        self.by_time.insert((at, run, step), tenant);
    }

    pub fn remove(&mut self, run: &str, step: &str) {
        if let Some(at) = self.index.remove(&(run.to_string(), step.to_string())) {
            self.by_time.remove(&(at, run.to_string(), step.to_string()));
        }
    }

    /// Removes and returns every timer due at `now`: (tenant, run, step).
    pub fn take_due(&mut self, now: i64) -> Vec<(String, String, String)> {
        let mut due = Vec::new();
        while let Some(((at, _, _), _)) = self.by_time.first_key_value() {
            if *at > now {
                break;
            }
            if let Some(((_, run, step), tenant)) = self.by_time.pop_first() {
                self.index.remove(&(run.clone(), step.clone()));
                due.push((tenant, run, step));
            }
        }
        due
    }

    pub fn next_at(&self) -> Option<i64> {
        self.by_time.first_key_value().map(|((at, _, _), _)| *at)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }
}
