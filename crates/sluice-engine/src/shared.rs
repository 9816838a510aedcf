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
use sluice_store::{PostedChange, RunChange, Settle, TaskOutcome, TaskRow, Wake};
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
/// How often the news of ended runs goes out to the other nodes.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(20);

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
        self.count_nodes().await;
        tokio::spawn(self.clone().settle_loop());
        tokio::spawn(self.clone().announce_loop());
        Ok(())
    }

    /// Queues the news that a run ended for the other nodes' result waiters (when there are
    /// other nodes). Sent after the commit, by [`Engine::announce_loop`].
    pub(crate) fn announce_end(&self, key: &(String, String), run_id: &str) {
        if lock(&self.inner.tasks).others() {
            let (tenant, workflow_id) = key.clone();
            lock(&self.inner.ended).push(Wake::Ended { tenant, workflow_id, run_id: run_id.to_string() });
        }
    }

    /// Queues the news that a workflow id runs again, for the other nodes to forget the result
    /// they remember for it.
    pub(crate) fn announce_restart(&self, tenant: &str, workflow_id: &str) {
        if self.inner.shared && lock(&self.inner.tasks).others() {
            let wake = Wake::Restarted { tenant: tenant.to_string(), workflow_id: workflow_id.to_string() };
            lock(&self.inner.ended).push(wake);
        }
    }

    /// Sends the queued news of ended runs every few milliseconds, all in one statement: a
    /// `NOTIFY` inside each commit would make committing transactions wait for each other.
    async fn announce_loop(self) {
        loop {
            tokio::time::sleep(ANNOUNCE_EVERY).await;
            let wakes = std::mem::take(&mut *lock(&self.inner.ended));
            if wakes.is_empty() {
                if self.has_lost_lease() {
                    return;
                }
                continue;
            }
            if let Err(e) = self.inner.store.notify_all(wakes).await {
                // Waiters on other nodes read the store again within a second anyway.
                tracing::debug!(error = %e, "cannot tell the other nodes of ended runs");
            }
        }
    }

    fn on_wake(&self, wake: Wake) {
        match wake {
            Wake::Tasks { tenant, queue, n } => lock(&self.inner.tasks).wake(&tenant, &queue, n),
            Wake::Outcome { epoch } if epoch == self.inner.epoch => self.inner.outcomes.notify_one(),
            Wake::Outcome { .. } => {}
            Wake::Ended { tenant, workflow_id, run_id } => {
                // A result this node remembers is still the latest if that run is the one.
                let key = (tenant, workflow_id);
                let mut results = lock(&self.inner.results);
                if results.rows.get(&key).is_some_and(|r| r.run_id != run_id) {
                    results.rows.remove(&key);
                }
                drop(results);
                let (tenant, workflow_id) = key;
                if let Some(n) = lock(&self.inner.watchers).get(&(tenant, workflow_id)) {
                    n.notify_waiters();
                }
            }
            Wake::Restarted { tenant, workflow_id } => self.forget_result(&tenant, &workflow_id),
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
            // This node's own tasks first, from memory (no write), then the shared queue.
            let got = lock(&self.inner.tasks).take(tenant, queue, max, now_ms());
            if !got.is_empty() {
                return Ok(handed_out(&got, worker));
            }
            let now = now_ms();
            if lock(&self.inner.tasks).should_claim(tenant, queue, now) {
                let got = self.inner.store.claim_tasks(tenant, queue, max, now, self.inner.epoch).await?;
                if got.len() >= max {
                    lock(&self.inner.tasks).more_shared(tenant, queue);
                }
                if !got.is_empty() {
                    return Ok(handed_out(&got, worker));
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                () = self.stopped() => return Ok(Vec::new()),
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
                Some(e) if e.row.tenant == tenant && t.is_out(token) => {
                    let leased = t.is_leased(token);
                    t.remove(token).map(|e| (e.row, leased))
                }
                _ => None,
            }
        };
        if let Some((row, leased)) = local {
            let (output, failure) = split(outcome);
            return self.settle(row, output, failure, false, leased).await;
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
        leased: bool,
    ) -> Result<()> {
        let settle = Settle { task_id: row.id.clone(), posted };
        self.finish_task_settling(row, output, failure, Ledger::default(), Some(settle), leased).await
    }

    /// Applies posted answers and timeouts: on a wake-up from a node that took an answer for
    /// this one, and every reap interval.
    async fn settle_loop(self) {
        let every = self.inner.opts.reap_interval;
        let mut counted = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.inner.outcomes.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            if self.has_lost_lease() {
                return;
            }
            if counted.elapsed() >= Duration::from_secs(1) {
                counted = std::time::Instant::now();
                self.count_nodes().await;
            }
            self.spill().await;
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
            let mut result = e.apply_change(&tenant, &run_id, change.clone(), Some(id.clone())).await;
            if matches!(result, Err(Error::NotRunning(_))) && !matches!(change, RunChange::Redrive) {
                // The run ended by `continue_as_new` meanwhile: the change goes to the run that
                // continues it.
                if let Ok(Some(row)) = e.inner.store.get_run(&tenant, &run_id).await {
                    if row.status == sluice_core::ExecStatus::ContinuedAsNew {
                        result = e.change_chain(&tenant, &row.workflow_id, change, Some(id.clone())).await;
                    }
                }
            }
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

    /// Hands the reserved tasks this node's workers do not take to the shared queue.
    async fn spill(&self) {
        let now = now_ms();
        let rows = lock(&self.inner.tasks).take_spills(now);
        if rows.is_empty() {
            return;
        }
        let ids = rows.iter().map(|r| r.id.clone()).collect();
        match self.inner.store.release_tasks(self.inner.epoch, ids).await {
            Ok(released) => {
                tracing::debug!(tasks = released.len(), "tasks handed to the shared queue");
                lock(&self.inner.tasks).spilled(&rows, &released, false, now);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand tasks to the shared queue; keeping them here");
                lock(&self.inner.tasks).spilled(&rows, &[], true, now);
            }
        }
    }

    /// Learns whether other nodes are alive (to hand them what this node's workers do not take).
    pub(crate) async fn count_nodes(&self) {
        match self.inner.store.live_nodes().await {
            Ok(n) => lock(&self.inner.tasks).set_others(n > 1),
            Err(e) => tracing::warn!(error = %e, "cannot count the live nodes"),
        }
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
                let leased = {
                    let mut t = lock(&e.inner.tasks);
                    let leased = t.is_leased(&id);
                    t.remove(&id);
                    leased
                };
                let (output, failure) = split(outcome);
                let timeout = failure.as_ref().filter(|_| !posted).map(|(err, _)| err.kind.clone());
                match e.settle(row, output, failure, posted, leased).await {
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
