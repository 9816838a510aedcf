//! Task queues in memory: ready queues per (tenant, queue) with long-poll wake-ups, delayed tasks
//! waiting for their backoff, and leases of tasks handed to workers.
//!
//! The durable copy of every pending task lives in the store; this table is rebuilt from it at
//! start. Leases are not persisted: after a restart every unfinished task is delivered again
//! (at-least-once), with the same idempotency key.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use sluice_store::TaskRow;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) enum Slot {
    /// Waiting for its backoff; `reserved`: for this node's workers when it becomes ready.
    Delayed {
        reserved: bool,
    },
    Ready {
        since_ms: i64,
    },
    Leased(Lease),
    /// Being handed to the store's shared queue (see [`TaskTable::take_spills`]).
    Spilling,
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
    /// When a worker last polled this queue here (ms; 0: never).
    polled_ms: i64,
    /// Tasks may wait in the store's shared queue (a wake-up said so since the last claim).
    shared_pending: bool,
    /// When this node last claimed from the shared queue (ms).
    claimed_ms: i64,
}

/// How often a poller asks the shared queue even when no wake-up said it has tasks (a safety net
/// for lost wake-ups).
pub(crate) const CLAIM_ANYWAY_MS: i64 = 1_000;

/// With shared queues, a task this node's workers have not taken after this long is handed to
/// the shared queue, where any node's workers may take it (when other nodes are alive).
pub(crate) const SPILL_AFTER_MS: i64 = 1_000;
/// A node whose workers have not polled a queue for this long is taken to have none for it: its
/// tasks go to the shared queue at once.
pub(crate) const IDLE_QUEUE_MS: i64 = 2_000;

/// A queue with no task, no poller waiting and no poll for this long is forgotten (made again
/// by the next poll or task): polls naming ever new queues do not grow memory for good.
pub(crate) const FREE_QUEUE_AFTER_MS: i64 = 10_000;

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
    /// The store's queues are shared by several nodes: this node's tasks are reserved for its
    /// workers at first and handed to the shared queue when they are not taken here
    /// (`take_spills`); tasks it did not commit itself are in the shared queue already.
    shared: bool,
    /// Queues whose shared tasks became visible since the last `take_wakes`, with how many.
    wakes: Vec<(String, String, u32)>,
    /// Reserved tasks to hand to the shared queue at the next `take_spills`.
    spill: Vec<String>,
    /// Other nodes are alive to take tasks this node's workers do not.
    others: bool,
    /// Queues in `queues` per tenant.
    per_tenant: HashMap<String, usize>,
}

/// The queue `(tenant, queue)`, made if new (and counted for its tenant).
fn queue_of<'a>(
    queues: &'a mut HashMap<(String, String), Queue>,
    per_tenant: &mut HashMap<String, usize>,
    tenant: &str,
    queue: &str,
) -> &'a mut Queue {
    match queues.entry((tenant.to_string(), queue.to_string())) {
        MapEntry::Occupied(e) => e.into_mut(),
        MapEntry::Vacant(v) => {
            *per_tenant.entry(tenant.to_string()).or_default() += 1;
            v.insert(Queue::default())
        }
    }
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

    /// Tasks arrived in the shared queue: wakes up to `n` pollers of the queue here.
    pub fn wake(&mut self, tenant: &str, queue: &str, n: u32) {
        let q = queue_of(&mut self.queues, &mut self.per_tenant, tenant, queue);
        q.shared_pending = true;
        for _ in 0..n.min(64) {
            q.notify.notify_one();
        }
    }

    /// Wakes every poller (wake-ups may have been missed).
    pub fn wake_all(&mut self) {
        for q in self.queues.values_mut() {
            q.shared_pending = true;
            q.notify.notify_waiters();
        }
    }

    /// Whether a poller should claim from the shared queue now: a wake-up said tasks arrived
    /// there, or it was not asked for a while. Counts as asked.
    pub fn should_claim(&mut self, tenant: &str, queue: &str, now: i64) -> bool {
        let q = queue_of(&mut self.queues, &mut self.per_tenant, tenant, queue);
        let ask = q.shared_pending || now - q.claimed_ms >= CLAIM_ANYWAY_MS;
        if ask {
            q.shared_pending = false;
            q.claimed_ms = now;
        }
        ask
    }

    /// A claim took all it asked for: more may wait.
    pub fn more_shared(&mut self, tenant: &str, queue: &str) {
        queue_of(&mut self.queues, &mut self.per_tenant, tenant, queue).shared_pending = true;
    }

    /// Whether a worker may hold this task: handed out from here, or claimed from the shared
    /// queue (by any node).
    pub fn is_out(&self, id: &str) -> bool {
        matches!(self.entries.get(id), Some(Entry { slot: Slot::Shared | Slot::Leased(_), .. }))
    }

    /// Whether this node handed the task out from memory.
    pub fn is_leased(&self, id: &str) -> bool {
        matches!(self.entries.get(id), Some(Entry { slot: Slot::Leased(_), .. }))
    }
    /// Adds a persisted task; returns it back if the engine must run it itself (`http`, `llm`)
    /// now. `reserved`: this node committed it, and it is reserved for its workers (with shared
    /// queues; otherwise every task is this node's).
    pub fn insert(&mut self, row: TaskRow, now: i64, reserved: bool) -> Option<TaskRow> {
        let id = row.id.clone();
        if row.visible_at_ms > now {
            self.delayed.insert((row.visible_at_ms, id.clone()), ());
            self.entries.insert(id, Entry { row, slot: Slot::Delayed { reserved } });
            return None;
        }
        self.make_ready(row, now, reserved)
    }

    fn make_ready(&mut self, row: TaskRow, now: i64, reserved: bool) -> Option<TaskRow> {
        let id = row.id.clone();
        if row.kind != sluice_core::event::TaskKind::Worker {
            let lease = Lease { deadline_ms: now + row.start_to_close_ms as i64, heartbeat_deadline_ms: None };
            self.entries.insert(id, Entry { row: row.clone(), slot: Slot::Leased(lease) });
            return Some(row);
        }
        if self.shared && !reserved {
            queue_of(&mut self.queues, &mut self.per_tenant, &row.tenant, &row.queue).shared_pending = true;
            self.entries.insert(id, Entry { row, slot: Slot::Shared });
            return None;
        }
        let q = queue_of(&mut self.queues, &mut self.per_tenant, &row.tenant, &row.queue);
        if self.shared && self.others && now - q.polled_ms > IDLE_QUEUE_MS {
            // No worker of this node serves the queue: straight to the shared one.
            self.spill.push(id.clone());
            self.entries.insert(id, Entry { row, slot: Slot::Spilling });
            return None;
        }
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
                if let Slot::Delayed { reserved } = entry.slot {
                    if self.shared && !reserved && entry.row.kind == sluice_core::event::TaskKind::Worker {
                        let (tenant, queue) = (&entry.row.tenant, &entry.row.queue);
                        match self.wakes.iter_mut().find(|(t, q, _)| t == tenant && q == queue) {
                            Some(w) => w.2 += 1,
                            None => self.wakes.push((tenant.clone(), queue.clone(), 1)),
                        }
                    }
                    if let Some(r) = self.make_ready(entry.row, now, reserved) {
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
        let q = queue_of(&mut self.queues, &mut self.per_tenant, tenant, queue);
        q.polled_ms = now;
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

    /// Says whether other nodes are alive: only then are tasks handed to the shared queue.
    pub fn set_others(&mut self, others: bool) {
        self.others = others;
    }

    /// Whether other nodes are alive.
    pub fn others(&self) -> bool {
        self.others
    }

    /// Whether reserved tasks wait to be handed to the shared queue at once.
    pub fn has_spill(&self) -> bool {
        !self.spill.is_empty()
    }

    /// The reserved tasks to hand to the shared queue now, when other nodes are alive: those of
    /// queues no worker of this node polls, and those waiting here longer than
    /// [`SPILL_AFTER_MS`]. They are `Spilling` until [`TaskTable::spilled`] says how it went.
    pub fn take_spills(&mut self, now: i64) -> Vec<TaskRow> {
        let mut ids = std::mem::take(&mut self.spill);
        let queues = if self.others { self.queues.values_mut().collect() } else { Vec::new() };
        for q in queues {
            let idle = now - q.polled_ms > IDLE_QUEUE_MS;
            while let Some(id) = q.ready.front() {
                let since = match self.entries.get(id).map(|e| &e.slot) {
                    Some(Slot::Ready { since_ms }) => *since_ms,
                    // Taken, or gone: not in line any more.
                    _ => {
                        q.ready.pop_front();
                        continue;
                    }
                };
                if !idle && now - since < SPILL_AFTER_MS {
                    break;
                }
                if let Some(id) = q.ready.pop_front() {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.slot = Slot::Spilling;
                    }
                    ids.push(id);
                }
            }
        }
        ids.iter()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| matches!(e.slot, Slot::Spilling))
            .map(|e| e.row.clone())
            .collect()
    }

    /// After a spill: the tasks in `released` are in the shared queue now; the others of `tried`
    /// were finished meanwhile (nothing to do) or the store failed (`failed`: they go back to
    /// this node's queue, first in line).
    pub fn spilled(&mut self, tried: &[TaskRow], released: &[String], failed: bool, now: i64) {
        for row in tried.iter().rev() {
            let Some(e) = self.entries.get_mut(&row.id) else { continue };
            if !matches!(e.slot, Slot::Spilling) {
                continue;
            }
            if released.contains(&row.id) {
                e.slot = Slot::Shared;
            } else if failed {
                e.slot = Slot::Ready { since_ms: now };
                let q = queue_of(&mut self.queues, &mut self.per_tenant, &row.tenant, &row.queue);
                q.ready.push_front(row.id.clone());
            } else {
                self.entries.remove(&row.id);
            }
        }
    }

    /// The notifier of a queue, to wait on when it is empty.
    pub fn notifier(&mut self, tenant: &str, queue: &str) -> Arc<Notify> {
        queue_of(&mut self.queues, &mut self.per_tenant, tenant, queue).notify.clone()
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Removes a task for completion; it is put back with `restore` if the commit fails.
    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        self.entries.remove(id)
    }

    /// Ids of the tasks whose row matches.
    pub fn entries_of(&self, matches: impl Fn(&TaskRow) -> bool) -> Vec<String> {
        self.entries.iter().filter(|(_, e)| matches(&e.row)).map(|(id, _)| id.clone()).collect()
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

    /// Whether a poll of `(tenant, queue)` may go on: the queue is known here, or its tenant has
    /// fewer than `max` queues.
    pub fn admits(&self, tenant: &str, queue: &str, max: usize) -> bool {
        self.per_tenant.get(tenant).is_none_or(|n| *n < max)
            || self.queues.contains_key(&(tenant.to_string(), queue.to_string()))
    }

    /// Queues held here, of every tenant.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Forgets the queues without tasks or waiting pollers that nobody polled for
    /// [`FREE_QUEUE_AFTER_MS`]. Returns how many.
    pub fn free_idle_queues(&mut self, now: i64) -> usize {
        let (entries, per_tenant) = (&self.entries, &mut self.per_tenant);
        let before = self.queues.len();
        self.queues.retain(|(tenant, _), q| {
            // A poller waiting holds a clone of the notifier.
            if now - q.polled_ms < FREE_QUEUE_AFTER_MS || Arc::strong_count(&q.notify) > 1 {
                return true;
            }
            // Ids of tasks taken or gone since they were put in line.
            q.ready.retain(|id| matches!(entries.get(id), Some(Entry { slot: Slot::Ready { .. }, .. })));
            if !q.ready.is_empty() {
                return true;
            }
            if let Some(n) = per_tenant.get_mut(tenant) {
                *n -= 1;
                if *n == 0 {
                    per_tenant.remove(tenant);
                }
            }
            false
        });
        before - self.queues.len()
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

    /// The timers of one run: (step, due time).
    pub fn of_run(&self, run: &str) -> Vec<(String, i64)> {
        self.index.iter().filter(|((r, _), _)| r == run).map(|((_, step), at)| (step.clone(), *at)).collect()
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
