//! Work queues shared by the nodes of one database (a store with `shared_queues`).
//!
//! A worker's poll on any node claims tasks in the store (`FOR UPDATE SKIP LOCKED` on
//! PostgreSQL), whichever node owns their executions. Its answer is recorded by the owner: at
//! once when the worker answers the owner, otherwise posted in the store by the node it answered
//! and applied by the owner when the wake-up reaches it. The owner also finds the tasks past
//! their limits in the store (claims and heartbeats live there) and fails them. Every task's
//! outcome is recorded once: the batch that records it deletes the task only while it is still
//! pending with no other answer (`Batch::settles`), so a late worker and a timeout cannot both
//! count.
//!
//! A signal, cancel or redrive that reaches a node which does not own the run is posted in the
//! store the same way (`post_change`) and applied by the owner, each once.
//!
//! Nodes wake each other through the store: new tasks wake pollers on every node, a posted
//! answer or change wakes its owner, an ended run wakes result waiters everywhere.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sluice_core::ErrorInfo;
use sluice_store::{PostedChange, Settle, TaskOutcome, TaskRow, Wake};
use tracing::Instrument;

use crate::{handed_out, lock, now_ms, trace, Engine, Error, Inner, Ledger, Result, TaskInfo};

/// Tasks of this node's runs whose outcome is being recorded: the sweep skips them.
#[derive(Default)]
pub(crate) struct Settling(std::sync::Mutex<HashSet<String>>);

impl Settling {
    fn begin(&self, id: &str) -> bool {
        lock(&self.0).insert(id.to_string())
    }

    fn end(&self, id: &str) {
        lock(&self.0).remove(id);
    }
}

/// How long a poll waits on wake-ups before it asks the store again anyway.
const RECHECK: Duration = Duration::from_secs(1);

impl Engine {
    /// Subscribes to the other nodes' wake-ups and starts the loop that records posted answers
    /// and timeouts.
    pub(crate) async fn start_shared(&self) -> Result<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        self.inner
            .store
            .listen(Arc::new(move |wake| {
                if let Some(inner) = weak.upgrade() {
                    Engine { inner }.on_wake(wake);
                }
            }))
            .await?;
        tokio::spawn(self.clone().settle_loop());
        Ok(())
    }

    fn on_wake(&self, wake: Wake) {
        match wake {
            Wake::Tasks { tenant, queue, n } => lock(&self.inner.tasks).wake(&tenant, &queue, n),
            Wake::Outcome { epoch } if epoch == self.inner.epoch => self.inner.outcomes.notify_one(),
            Wake::Outcome { .. } => {}
            Wake::Ended { tenant, workflow_id } => {
                self.forget_result(&tenant, &workflow_id);
                if let Some(n) = lock(&self.inner.watchers).get(&(tenant, workflow_id)) {
                    n.notify_waiters();
                }
            }
            Wake::Resync => {
                lock(&self.inner.tasks).wake_all();
                self.inner.outcomes.notify_one();
                for n in lock(&self.inner.watchers).values() {
                    n.notify_waiters();
                }
            }
        }
    }

    /// A poll of the shared queue: claims in the store, waits for a wake-up when it is empty.
    pub(crate) async fn poll_shared(
        &self,
        tenant: &str,
        queue: &str,
        worker: &str,
        max: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<TaskInfo>> {
        loop {
            let notify = lock(&self.inner.tasks).notifier(tenant, queue);
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before the claim: a wake-up during it is not lost.
            notified.as_mut().enable();
            let got = self.inner.store.claim_tasks(tenant, queue, max, now_ms(), self.inner.epoch).await?;
            if !got.is_empty() {
                return Ok(handed_out(&got, worker));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Records a worker's answer: at once for a task of this node's runs, otherwise posted for
    /// the owner.
    pub(crate) async fn answer_shared(&self, tenant: &str, token: &str, outcome: TaskOutcome) -> Result<()> {
        let local = {
            let mut t = lock(&self.inner.tasks);
            match t.get(token) {
                Some(e) if e.row.tenant == tenant && t.is_shared(token) => t.remove(token).map(|e| e.row),
                _ => None,
            }
        };
        if let Some(row) = local {
            let (output, failure) = split(outcome);
            return self.settle(row, output, failure, false).await;
        }
        if self.inner.store.post_outcome(tenant, token, outcome).await? {
            self.inner.counters.outcomes_posted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        } else {
            Err(Error::TaskNotFound(token.to_string()))
        }
    }

    /// Records the outcome of a shared task of this node's runs; `posted`: it is the answer
    /// another node posted.
    async fn settle(
        &self,
        row: TaskRow,
        output: Option<serde_json::Value>,
        failure: Option<(ErrorInfo, bool)>,
        posted: bool,
    ) -> Result<()> {
        let settle = Settle { task_id: row.id.clone(), posted };
        self.finish_task_settling(row, output, failure, Ledger::default(), Some(settle)).await
    }

    /// Applies posted answers and timeouts: on a wake-up from a node that took an answer for
    /// this one, and every reap interval.
    async fn settle_loop(self) {
        let every = self.inner.opts.reap_interval;
        loop {
            tokio::select! {
                _ = self.inner.outcomes.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            if self.has_lost_lease() {
                return;
            }
            let wakes = lock(&self.inner.tasks).take_wakes();
            for (tenant, queue, n) in wakes {
                if let Err(e) = self.inner.store.notify(Wake::Tasks { tenant, queue, n }).await {
                    tracing::warn!(error = %e, "cannot wake the other nodes for tasks that became visible");
                }
            }
            match self.inner.store.posted_outcomes(self.inner.epoch).await {
                Ok(posted) => {
                    for (row, outcome) in posted {
                        self.spawn_settle(row, outcome, true);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the answers other nodes took for this one"),
            }
            match self.inner.store.posted_changes(self.inner.epoch).await {
                Ok(changes) => {
                    for c in changes {
                        self.spawn_change(c);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the changes other nodes took for this one"),
            }
            match self.inner.store.expired_tasks(self.inner.epoch, now_ms()).await {
                Ok(expired) => {
                    for (row, kind) in expired {
                        let error = ErrorInfo::new(
                            kind,
                            format!(
                                "task attempt {} exceeded its {} limit",
                                row.attempt,
                                kind.trim_start_matches("timeout.")
                            ),
                        );
                        self.spawn_settle(row, TaskOutcome::Failed { error, retryable: true }, false);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for timed-out tasks"),
            }
        }
    }

    /// Applies a change another node posted; drops it when it cannot apply (the run ended, or
    /// runs again under another run), keeps it for the next sweep when the store was busy.
    fn spawn_change(&self, posted: PostedChange) {
        let key = format!("change:{}", posted.id);
        if !self.inner.settling.begin(&key) {
            return;
        }
        let e = self.clone();
        tokio::spawn(async move {
            let PostedChange { id, tenant, run_id, change } = posted;
            let result = e.apply_change(&tenant, &run_id, change, Some(id.clone())).await;
            let keep = match &result {
                Ok(()) => {
                    e.inner.counters.changes_applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    false
                }
                Err(Error::Unavailable(_)) => true,
                Err(Error::Conflict(m)) => m.contains("history continues") || m.contains("applied already"),
                Err(err) => {
                    tracing::warn!(run_id, error = %err, "a change posted by another node cannot apply; dropped");
                    false
                }
            };
            // A change that made no event was not removed by a batch.
            if !keep {
                if let Err(err) = e.inner.store.drop_change(&tenant, &id).await {
                    tracing::warn!(error = %err, "cannot remove an applied change; it is tried again");
                }
            }
            e.inner.settling.end(&key);
        });
    }

    fn spawn_settle(&self, row: TaskRow, outcome: TaskOutcome, posted: bool) {
        if !self.inner.settling.begin(&row.id) {
            return;
        }
        let e = self.clone();
        let span = trace::task_span(&row);
        tokio::spawn(
            async move {
                let id = row.id.clone();
                lock(&e.inner.tasks).remove(&id);
                let (output, failure) = split(outcome);
                let timeout = failure.as_ref().filter(|_| !posted).map(|(err, _)| err.kind.clone());
                match e.settle(row, output, failure, posted).await {
                    Ok(()) if posted => {}
                    Ok(()) => tracing::debug!(kind = ?timeout, "task attempt timed out"),
                    // A worker's answer came first; the sweep records it.
                    Err(Error::Conflict(_)) => {}
                    Err(err) => tracing::warn!(error = %err, posted, "could not record a task's outcome; retrying"),
                }
                e.inner.settling.end(&id);
            }
            .instrument(span),
        );
    }
}

fn split(outcome: TaskOutcome) -> (Option<serde_json::Value>, Option<(ErrorInfo, bool)>) {
    match outcome {
        TaskOutcome::Completed { output } => (Some(output), None),
        TaskOutcome::Failed { error, retryable } => (None, Some((error, retryable))),
    }
}
