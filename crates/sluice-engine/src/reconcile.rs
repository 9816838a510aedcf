//! Runs whose last commit has an unknown outcome. When the connection to the database drops while
//! a batch commits, the batch may have been applied although the engine was told it failed: its
//! tasks and timers are then in the store but not in this node's memory (and the task it
//! finished is still there), so nothing would ever deliver them and the run would stall until a
//! restart. Every run of such a batch is marked here, and, once the store answers again, the
//! engine's memory of its tasks and timers is made to match what the store holds, under the
//! run's lock so that no commit of the run can interleave.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sluice_core::event::TaskKind;
use sluice_store::TaskRow;

use crate::{lock, now_ms, tasks, Engine, Error, Result};

/// How long after a failed commit its runs are first looked at: the store is often still away,
/// and the caller that saw the failure puts its task back meanwhile.
const SETTLE_DELAY: Duration = Duration::from_millis(300);
/// How often runs that could not be reconciled yet are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Runs to reconcile, by run id, with their tenant.
#[derive(Default)]
pub(crate) struct Uncertain {
    runs: std::sync::Mutex<HashMap<String, String>>,
    wake: tokio::sync::Notify,
}

impl Uncertain {
    pub fn mark(&self, runs: impl IntoIterator<Item = (String, String)>) {
        let mut m = lock(&self.runs);
        for (tenant, run_id) in runs {
            m.insert(run_id, tenant);
        }
        drop(m);
        self.wake.notify_one();
    }

    pub fn len(&self) -> usize {
        lock(&self.runs).len()
    }
}

/// Whether a failed commit may still have been applied: the store could not say (the connection
/// dropped, the database went away). A refusal (a conflict, a fence, a duplicate) is certain.
pub(crate) fn outcome_unknown(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::Internal(_))
}

impl Engine {
    /// Reconciles marked runs until the engine's process ends.
    pub(crate) async fn reconcile_loop(self) {
        loop {
            if self.inner.uncertain.len() == 0 {
                self.inner.uncertain.wake.notified().await;
            }
            tokio::time::sleep(SETTLE_DELAY).await;
            let runs: Vec<(String, String)> = lock(&self.inner.uncertain.runs).drain().collect();
            let mut failed = 0;
            for (run_id, tenant) in runs {
                match self.reconcile_run(&tenant, &run_id).await {
                    Ok(()) => {
                        self.inner.counters.runs_reconciled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            tracing::warn!(run_id, error = %e, "cannot yet check a run whose commit had an unknown outcome; retrying");
                        }
                        self.inner.uncertain.mark([(tenant, run_id)]);
                    }
                }
            }
            if failed > 0 {
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }

    /// Makes this node's tasks and timers of one run what the store holds.
    async fn reconcile_run(&self, tenant: &str, run_id: &str) -> Result<()> {
        // Held to the end: no commit of this run can come between the read and the update.
        let mut guard = match self.lock_run(tenant, run_id, true).await {
            Ok(g) => Some(g),
            // Never created (the start was not applied): nothing of it may stay in memory.
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let (stored_tasks, stored_timers) = match guard {
            Some(_) => self.inner.store.run_work(tenant, run_id).await?,
            None => (Vec::new(), Vec::new()),
        };
        let now = now_ms();
        let stored: HashSet<&str> = stored_tasks.iter().map(|t| t.id.as_str()).collect();
        let mut missing: Vec<TaskRow> = Vec::new();
        let (mut dropped, mut to_run) = (0usize, Vec::new());
        {
            let mut t = lock(&self.inner.tasks);
            for id in t.ids_of_run(run_id) {
                if !stored.contains(id.as_str()) {
                    // Its outcome was recorded: whoever still holds it learns so when answering.
                    t.drop_task(&id);
                    dropped += 1;
                }
            }
            for row in stored_tasks {
                if t.get(&row.id).is_some() {
                    continue;
                }
                if self.inner.shared && row.kind == TaskKind::Worker {
                    missing.push(row);
                } else {
                    to_run.extend(t.insert(row, now, true));
                }
            }
        }
        // Reserved for this node by the batch nobody saw succeed: offered to every node's pollers.
        let added = missing.len() + to_run.len();
        if !missing.is_empty() {
            let ids = missing.iter().map(|r| r.id.clone()).collect();
            self.inner.store.release_tasks(self.inner.epoch, ids).await?;
            let mut t = lock(&self.inner.tasks);
            for row in missing {
                to_run.extend(t.insert(row, now, false));
            }
            t.wake_all();
        }
        {
            let mut w = lock(&self.inner.timers);
            let stored: HashMap<&str, i64> = stored_timers.iter().map(|t| (t.step.as_str(), t.fire_at_ms)).collect();
            for (step, _) in w.of_run(run_id) {
                if !stored.contains_key(step.as_str()) {
                    w.remove(run_id, &step);
                }
            }
            for t in &stored_timers {
                w.insert(t.fire_at_ms, t.run_id.clone(), t.step.clone(), t.tenant.clone());
            }
        }
        if added > 0 || dropped > 0 {
            tracing::info!(
                run_id,
                added,
                dropped,
                "a run whose commit had an unknown outcome was brought in line with the store"
            );
        }
        for row in to_run {
            self.run_engine_task(row);
        }
        self.inner.wake.notify_one();
        // An ended run's state is not kept: the next access loads it as usual.
        if let Some(g) = guard.as_mut() {
            if g.as_ref().is_some_and(|e| e.state.status.is_terminal()) {
                **g = None;
                lock(&self.inner.execs).remove(run_id);
            }
        }
        Ok(())
    }
}

impl tasks::TaskTable {
    /// Ids of the tasks of one run this table holds.
    pub fn ids_of_run(&self, run_id: &str) -> Vec<String> {
        self.entries_of(|row| row.run_id == run_id)
    }
}
