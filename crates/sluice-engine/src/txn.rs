//! One engine transaction: apply events from the world to one or more runs, let `decide` answer,
//! follow the consequences into other runs (children, parents, continue-as-new), commit all of it
//! as one batch, and only then publish the side effects.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use sluice_core::decide::decide_until_yield;
use sluice_core::event::{Event, EventKind, ParentRef, RunAccess};
use sluice_core::expr::with_limits;
use sluice_core::state::StepStatus;
use sluice_core::{decide, ErrorInfo, ExecState, ExecStatus};
use sluice_store::{Batch, ExecChange, ExecutionRow, TaskRow, TimerRow};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::Instrument;

use crate::eval::IN_PLACE;
use crate::quarantine::{self, Verdict};
use crate::trace::{execution_span, TraceId};
use crate::{lock, new_id, now_ms, Engine, Error, ExecEntry, Ledger, Result};

/// Removals that come with the triggering event (the finished task, the fired timer).
#[derive(Default)]
pub(crate) struct Extra {
    remove_tasks: Vec<String>,
    remove_timers: Vec<(String, String)>,
    /// Ledger rows of the gateway calls that produced the event.
    ledger: Ledger,
    settles: Vec<sluice_store::Settle>,
    applied_changes: Vec<String>,
}

impl Extra {
    pub fn task(id: &str) -> Self {
        Self { remove_tasks: vec![id.to_string()], ..Self::default() }
    }

    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = ledger;
        self
    }

    pub fn with_settle(mut self, settle: Option<sluice_store::Settle>) -> Self {
        self.settles.extend(settle);
        self
    }

    pub fn with_change(mut self, posted: Option<String>) -> Self {
        self.applied_changes.extend(posted);
        self
    }

    pub fn timer(run: &str, step: &str) -> Self {
        Self { remove_timers: vec![(run.to_string(), step.to_string())], ..Self::default() }
    }
}

struct Touched {
    run_id: String,
    guard: OwnedMutexGuard<Option<ExecEntry>>,
    events: Vec<Event>,
    create: bool,
}

enum Follow {
    StartChild {
        tenant: String,
        parent: ParentRef,
        workflow: String,
        workflow_id: String,
        input: Value,
        trace_id: TraceId,
        /// The parent's, with its workflow added to the scope.
        access: RunAccess,
    },
    Notify {
        tenant: String,
        run_id: String,
        event: EventKind,
    },
    Continue {
        tenant: String,
        workflow: String,
        workflow_id: String,
        input: Value,
        from: String,
        parent: Option<ParentRef>,
        trace_id: TraceId,
        /// The new run's place in the chain.
        chain: u64,
        access: RunAccess,
    },
}

/// Step name of the durable timer that makes a new run take its first decision.
pub(crate) const START_TIMER: &str = "$start";

struct Txn {
    now: i64,
    kicks: Vec<String>,
    touched: Vec<Touched>,
    work: VecDeque<(String, String, Vec<EventKind>)>,
    batch: Batch,
    /// Changes to a chain this transaction applied: told whether it was committed.
    answered: Vec<tokio::sync::oneshot::Sender<bool>>,
    /// Steps this transaction quarantined, reported once it is durable.
    quarantined: Vec<Quarantined>,
}

pub(crate) struct Quarantined {
    pub tenant: String,
    pub workflow_id: String,
    pub run_id: String,
    pub trace_id: TraceId,
    pub step: String,
    pub crashes: u64,
}

impl Txn {
    fn new() -> Self {
        Self {
            now: now_ms(),
            kicks: Vec::new(),
            touched: Vec::new(),
            work: VecDeque::new(),
            batch: Batch::default(),
            answered: Vec::new(),
            quarantined: Vec::new(),
        }
    }
}

/// A tenant's token bucket of `continue_as_new` runs.
pub(crate) struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    /// Takes a run from `tenant`'s bucket (of `rate` per second, holding up to ten seconds'
    /// worth) at `now`; returns how long that run must wait for its token (0: not at all).
    /// Waiting runs take their tokens in advance, so a tenant's runs start at `rate` per second
    /// however many chains it has.
    pub(crate) fn take(buckets: &mut HashMap<String, Bucket>, tenant: &str, rate: u32, now: i64) -> u64 {
        let rate = f64::from(rate.max(1));
        let cap = rate * 10.0;
        let b = buckets.entry(tenant.to_string()).or_insert(Bucket { tokens: cap, at_ms: now });
        let elapsed = (now - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(cap) - 1.0;
        b.at_ms = b.at_ms.max(now);
        if b.tokens >= 0.0 {
            0
        } else {
            (-b.tokens / rate * 1000.0).ceil() as u64
        }
    }
}

impl Engine {
    pub(crate) async fn advance(
        &self,
        tenant: &str,
        run_id: &str,
        make: impl FnOnce(&ExecState) -> Result<Vec<EventKind>>,
        extra: Extra,
    ) -> Result<()> {
        self.advance_any(tenant, run_id, make, extra, false).await
    }

    pub(crate) async fn advance_any(
        &self,
        tenant: &str,
        run_id: &str,
        make: impl FnOnce(&ExecState) -> Result<Vec<EventKind>>,
        extra: Extra,
        allow_terminal: bool,
    ) -> Result<()> {
        let guard = self.lock_run(tenant, run_id, allow_terminal).await?;
        let Some(entry) = guard.as_ref() else { return Err(Error::NotRunning(run_id.to_string())) };
        let span = execution_span(&entry.tenant, &TraceId::of_run(&entry.state), &entry.state.workflow_id, run_id);
        let events = make(&entry.state)?;
        if events.is_empty() && extra.remove_timers.is_empty() {
            return Ok(());
        }
        let mut tx = Txn::new();
        tx.batch.remove_tasks = extra.remove_tasks;
        tx.batch.remove_timers = extra.remove_timers;
        tx.batch.usage = extra.ledger.usage;
        tx.batch.alerts = extra.ledger.alerts;
        tx.batch.settles = extra.settles;
        tx.batch.applied_changes = extra.applied_changes;
        tx.touched.push(Touched { run_id: run_id.to_string(), guard, events: Vec::new(), create: false });
        tx.work.push_back((tenant.to_string(), run_id.to_string(), events));
        self.run_txn(tx).instrument(span).await.map(|_| ())
    }

    /// Creates a run and decides its first steps. Returns its status after that.
    pub(crate) async fn create_run(
        &self,
        tenant: &str,
        def: Arc<sluice_core::WorkflowDef>,
        run_id: &str,
        started: EventKind,
    ) -> Result<&'static str> {
        let mut tx = Txn::new();
        let guard = self.new_slot(tenant, def, run_id, tx.now).await;
        tx.touched.push(Touched { run_id: run_id.to_string(), guard, events: Vec::new(), create: true });
        tx.work.push_back((tenant.to_string(), run_id.to_string(), vec![started]));
        let statuses = self.run_txn(tx).await?;
        Ok(statuses.into_iter().find(|(r, _)| r == run_id).map(|(_, s)| s.as_str()).unwrap_or("running"))
    }

    async fn new_slot(
        &self,
        tenant: &str,
        def: Arc<sluice_core::WorkflowDef>,
        run_id: &str,
        now: i64,
    ) -> OwnedMutexGuard<Option<ExecEntry>> {
        let slot = Arc::new(Mutex::new(Some(ExecEntry {
            tenant: tenant.to_string(),
            def,
            state: {
                let mut state = ExecState::new();
                state.limits = self.inner.opts.run_limits;
                state
            },
            created_at_ms: now,
        })));
        let guard = slot.clone().lock_owned().await;
        lock(&self.inner.execs).insert(run_id.to_string(), slot);
        guard
    }

    /// Locks a run's in-memory entry, loading it from the store when it is not cached.
    pub(crate) async fn lock_run(
        &self,
        tenant: &str,
        run_id: &str,
        allow_terminal: bool,
    ) -> Result<OwnedMutexGuard<Option<ExecEntry>>> {
        loop {
            // A fresh slot goes into the cache already locked, so nothing can evict or use it
            // before it is loaded.
            let (slot, mut guard, fresh) = {
                let mut map = lock(&self.inner.execs);
                match map.get(run_id) {
                    Some(s) => (s.clone(), None, false),
                    None => {
                        let s: crate::Slot = Arc::new(Mutex::new(None));
                        let g = s.clone().try_lock_owned().ok();
                        map.insert(run_id.to_string(), s.clone());
                        (s, g, true)
                    }
                }
            };
            let mut guard = match guard.take() {
                Some(g) => g,
                None => slot.clone().lock_owned().await,
            };
            if let Some(entry) = guard.as_ref() {
                if entry.tenant != tenant {
                    return Err(Error::NotFound { what: "execution", id: run_id.to_string() });
                }
                return Ok(guard);
            }
            if !fresh {
                lock(&self.inner.execs).remove_if(run_id, &slot);
                continue;
            }
            match self.load_run(tenant, run_id, allow_terminal).await {
                Ok(entry) => {
                    lock(&self.inner.execs).set_bytes(run_id, entry.state.bytes);
                    *guard = Some(entry);
                    return Ok(guard);
                }
                Err(e) => {
                    lock(&self.inner.execs).remove_if(run_id, &slot);
                    return Err(e);
                }
            }
        }
    }

    async fn load_run(&self, tenant: &str, run_id: &str, allow_terminal: bool) -> Result<ExecEntry> {
        let row = self
            .inner
            .store
            .get_run(tenant, run_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "execution", id: run_id.to_string() })?;
        if row.status.is_terminal() && !allow_terminal {
            return Err(Error::NotRunning(row.workflow_id));
        }
        let events = self.inner.store.history(tenant, run_id, 0, usize::MAX).await?;
        let mut state = ExecState::from_history(&events);
        state.limits = self.inner.opts.run_limits;
        let (_, def) = self.definition(tenant, &row.workflow, Some(&row.version)).await?;
        Ok(ExecEntry { tenant: tenant.to_string(), def, state, created_at_ms: row.created_at_ms })
    }

    async fn run_txn(&self, mut tx: Txn) -> Result<Vec<(String, ExecStatus)>> {
        let mut follows = Vec::new();
        let mut rounds = 0;
        loop {
            while let Some((tenant, run_id, externals)) = tx.work.pop_front() {
                let idx = match tx.touched.iter().position(|t| t.run_id == run_id) {
                    Some(i) => i,
                    None => match self.lock_run(&tenant, &run_id, false).await {
                        Ok(guard) => {
                            tx.touched.push(Touched {
                                run_id: run_id.clone(),
                                guard,
                                events: Vec::new(),
                                create: false,
                            });
                            tx.touched.len() - 1
                        }
                        // The other run ended or vanished meanwhile: nothing to tell it.
                        Err(Error::NotRunning(_) | Error::NotFound { .. }) => continue,
                        Err(e) => return self.abort(tx, e),
                    },
                };
                let t = &mut tx.touched[idx];
                let Some(entry) = t.guard.as_mut() else { continue };
                if entry.state.status.is_terminal()
                    && !externals.iter().any(|e| matches!(e, EventKind::ExecutionRedriven))
                {
                    continue;
                }
                let mut events = Vec::with_capacity(externals.len() + 2);
                for kind in externals {
                    events.push(entry.state.push(kind, tx.now));
                }
                // Signals and cancels that missed an earlier run of this chain.
                if !entry.state.status.is_terminal() {
                    for c in self.take_chain_changes(&tenant, &entry.state.workflow_id) {
                        for kind in crate::change_events(c.change, &entry.state) {
                            events.push(entry.state.push(kind, tx.now));
                        }
                        tx.batch.applied_changes.extend(c.posted);
                        tx.answered.push(c.done);
                    }
                }
                // In place first; an expression that needs more moves the rest of the decision
                // to the evaluation threads (`eval`), on a copy of the state that replaces it,
                // after the attempt is recorded (`quarantine`): a step whose attempts crashed the
                // node too often fails instead, and the decision goes on in place.
                loop {
                    let decided = with_limits(IN_PLACE, || decide_until_yield(&entry.def, &mut entry.state));
                    events.extend(decided.events);
                    if !decided.yielded {
                        break;
                    }
                    let step = decided.yield_step.unwrap_or_else(|| quarantine::OUTPUT.to_string());
                    let marked = match self.before_evaluation(&tenant, &run_id, &step).await {
                        Ok(Verdict::Evaluate { marked }) => marked,
                        Ok(Verdict::Quarantine { crashes }) => {
                            let error = self.quarantine_error(&step, crashes);
                            let kind = if step == quarantine::OUTPUT {
                                EventKind::ExecutionAborted { error }
                            } else {
                                EventKind::StepAborted { step: step.clone(), error }
                            };
                            events.push(entry.state.push(kind, tx.now));
                            tx.quarantined.push(Quarantined {
                                tenant: tenant.clone(),
                                workflow_id: entry.state.workflow_id.clone(),
                                run_id: run_id.clone(),
                                trace_id: TraceId::of_run(&entry.state),
                                step,
                                crashes,
                            });
                            continue;
                        }
                        Err(e) => return self.abort(tx, e),
                    };
                    let def = entry.def.clone();
                    let mut st = entry.state.clone();
                    let decided = self.inner.eval.run(move || (decide(&def, &mut st), st)).await;
                    match decided {
                        Ok((more, st)) => {
                            events.extend(more);
                            entry.state = st;
                        }
                        Err(e) => return self.abort(tx, e),
                    }
                    if marked {
                        self.after_evaluation(&tenant, &run_id).await;
                    }
                    break;
                }
                effects(entry, &events, tx.now, &mut tx.batch, &mut follows);
                t.events.extend(events);
            }
            if follows.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > 64 {
                return self
                    .abort(tx, Error::Conflict("child workflows nest more than 64 levels deep in one step".into()));
            }
            for f in std::mem::take(&mut follows) {
                if let Err(e) = self.follow(&mut tx, f).await {
                    return self.abort(tx, e);
                }
            }
        }

        let now = tx.now;
        for t in &tx.touched {
            if t.events.is_empty() && !t.create {
                continue;
            }
            if let Some(entry) = t.guard.as_ref() {
                tx.batch.execs.push(ExecChange {
                    tenant: entry.tenant.clone(),
                    row: row_of(entry, now),
                    events: t.events.clone(),
                    create: t.create,
                    fence: Some(self.inner.epoch),
                });
            }
        }
        if tx.batch.is_empty() {
            return Ok(Vec::new());
        }
        // The store takes the events and rows; only what becomes visible afterwards is kept.
        let effects = Batch {
            execs: Vec::new(),
            add_tasks: tx.batch.add_tasks.clone(),
            remove_tasks: tx.batch.remove_tasks.clone(),
            add_timers: tx.batch.add_timers.clone(),
            remove_timers: tx.batch.remove_timers.clone(),
            usage: Vec::new(),
            alerts: Vec::new(),
            settles: Vec::new(),
            applied_changes: Vec::new(),
        };
        let batch = std::mem::replace(&mut tx.batch, effects);
        let mut commit = self.inner.store.commit(batch).await;
        let every = u64::from(self.inner.opts.lose_commit_acks);
        if every > 0 && commit.is_ok() {
            let n = self.inner.counters.commits_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n % every == 0 {
                commit = Err(sluice_store::StoreError::Unavailable(
                    "injected fault: a commit's acknowledgement was lost".into(),
                ));
            }
        }
        if let Err(e) = commit {
            self.inner.counters.commits_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let e: Error = e.into();
            if crate::reconcile::outcome_unknown(&e) {
                let runs = tx.touched.iter().filter_map(|t| Some((t.guard.as_ref()?.tenant.clone(), t.run_id.clone())));
                self.inner.uncertain.mark(runs.collect::<Vec<_>>());
            }
            return self.abort(tx, e);
        }
        for q in std::mem::take(&mut tx.quarantined) {
            let e = self.clone();
            tokio::spawn(async move { e.quarantined(q).await });
        }
        Ok(self.publish_effects(tx))
    }

    /// Makes a run take the decisions its history calls for, with no new event (a run created by
    /// continue-as-new). Removes its start timer in the same batch.
    pub(crate) async fn kick(&self, tenant: &str, run_id: &str) {
        let r = self.advance(tenant, run_id, |_| Ok(Vec::new()), Extra::timer(run_id, START_TIMER)).await;
        match r {
            Ok(()) | Err(Error::NotRunning(_)) | Err(Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(run_id, error = %e, "new run could not take its first step yet, retrying in 1s");
                lock(&self.inner.timers).insert(
                    now_ms() + 1000,
                    run_id.to_string(),
                    START_TIMER.to_string(),
                    tenant.to_string(),
                );
            }
        }
    }

    /// Resolves a consequence that reaches another run.
    async fn follow(&self, tx: &mut Txn, f: Follow) -> Result<()> {
        match f {
            Follow::Notify { tenant, run_id, event } => tx.work.push_back((tenant, run_id, vec![event])),
            Follow::StartChild { tenant, parent, workflow, workflow_id, input, trace_id, access } => {
                match self.definition(&tenant, &workflow, None).await {
                    Ok((version, def)) => {
                        let run_id = new_id();
                        let guard = self.new_slot(&tenant, def, &run_id, tx.now).await;
                        tx.touched.push(Touched { run_id: run_id.clone(), guard, events: Vec::new(), create: true });
                        let started = EventKind::ExecutionStarted {
                            workflow,
                            version,
                            workflow_id,
                            run_id: run_id.clone(),
                            input,
                            parent: Some(parent),
                            continued_from: None,
                            chain: 0,
                            trace_id: Some(trace_id.to_string()),
                            access,
                        };
                        tx.work.push_back((tenant, run_id, vec![started]));
                    }
                    Err(Error::NotFound { .. }) => {
                        let event = EventKind::ChildFailed {
                            step: parent.step.clone(),
                            attempt: parent.attempt,
                            error: ErrorInfo::new("child.not_found", format!("workflow `{workflow}` is not published")),
                        };
                        tx.work.push_back((tenant, parent.run_id, vec![event]));
                    }
                    Err(e) => return Err(e),
                }
            }
            Follow::Continue { tenant, workflow, workflow_id, input, from, parent, trace_id, chain, access } => {
                let (version, def) = self.definition(&tenant, &workflow, None).await?;
                let run_id = new_id();
                let mut guard = self.new_slot(&tenant, def, &run_id, tx.now).await;
                let started = EventKind::ExecutionStarted {
                    workflow,
                    version,
                    workflow_id: workflow_id.clone(),
                    run_id: run_id.clone(),
                    input,
                    parent,
                    continued_from: Some(from),
                    trace_id: Some(trace_id.to_string()),
                    chain,
                    access,
                };
                let max = self.inner.opts.max_chain_length;
                if max > 0 && chain >= max {
                    // One run too many: it ends at once, failed, and tells its parent if any.
                    let error = ErrorInfo {
                        details: Some(serde_json::json!({"limit": max})),
                        ..ErrorInfo::new(
                            "engine.chain_too_long",
                            format!("the continue_as_new chain of `{workflow_id}` reached the limit of {max} runs"),
                        )
                    };
                    tx.touched.push(Touched { run_id: run_id.clone(), guard, events: Vec::new(), create: true });
                    tx.work.push_back((tenant, run_id, vec![started, EventKind::ExecutionAborted { error }]));
                    return Ok(());
                }
                let mut events = Vec::new();
                if let Some(entry) = guard.as_mut() {
                    events.push(entry.state.push(started, tx.now));
                }
                // A tenant's continued runs start at a bounded rate: past it, a run's first
                // decision waits for its start timer.
                let rate = self.inner.opts.continue_rate;
                let delay =
                    if rate == 0 { 0 } else { Bucket::take(&mut lock(&self.inner.continues), &tenant, rate, tx.now) };
                // The new run decides in its own transaction, so a loop of continue-as-new does
                // not grow one transaction without bound. The start timer makes that decision
                // happen even if the process dies right after this commit.
                tx.batch.add_timers.push(TimerRow {
                    tenant,
                    run_id: run_id.clone(),
                    workflow_id,
                    step: START_TIMER.into(),
                    fire_at_ms: tx.now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
                });
                if delay == 0 {
                    tx.kicks.push(run_id.clone());
                }
                tx.touched.push(Touched { run_id, guard, events, create: true });
            }
        }
        Ok(())
    }

    /// Drops every touched run from memory so the next access reloads the durable truth.
    fn abort<T>(&self, tx: Txn, e: Error) -> Result<T> {
        for done in tx.answered {
            let _ = done.send(false);
        }
        let mut map = lock(&self.inner.execs);
        for mut t in tx.touched {
            *t.guard = None;
            map.remove(&t.run_id);
        }
        Err(e)
    }

    fn publish_effects(&self, tx: Txn) -> Vec<(String, ExecStatus)> {
        let Txn { now, touched, batch, kicks, answered, .. } = tx;
        for done in answered {
            let _ = done.send(true);
        }
        let mut to_run = Vec::new();
        // Start timers are for crash recovery only, unless the run waits for its turn: the kicks
        // below do their work now.
        let armed = |t: &TimerRow| t.step != START_TIMER || !kicks.contains(&t.run_id);
        // The background loop only needs waking for new timers or delayed tasks.
        let wake = batch.add_timers.iter().any(armed) || batch.add_tasks.iter().any(|t| t.visible_at_ms > now);
        {
            let mut tasks = lock(&self.inner.tasks);
            for id in &batch.remove_tasks {
                tasks.drop_task(id);
            }
            for row in batch.add_tasks {
                to_run.extend(tasks.insert(row, now, true));
            }
        }
        {
            let mut w = lock(&self.inner.timers);
            for (run, step) in &batch.remove_timers {
                w.remove(run, step);
            }
            for t in batch.add_timers {
                if armed(&t) {
                    w.insert(t.fire_at_ms, t.run_id, t.step, t.tenant);
                }
            }
        }
        if wake {
            self.inner.wake.notify_one();
        }
        if self.inner.shared && lock(&self.inner.tasks).has_spill() {
            // Tasks for a queue no worker of this node serves: to the shared queue now.
            self.inner.outcomes.notify_one();
        }
        for run in kicks {
            if let Some(tenant) =
                touched.iter().find(|t| t.run_id == run).and_then(|t| t.guard.as_ref()).map(|e| e.tenant.clone())
            {
                let e = self.clone();
                tokio::spawn(async move { e.kick(&tenant, &run).await });
            }
        }
        for row in to_run {
            self.run_engine_task(row);
        }
        let mut statuses = Vec::new();
        let mut map = lock(&self.inner.execs);
        for mut t in touched {
            let Some(entry) = t.guard.as_ref() else { continue };
            let status = entry.state.status;
            statuses.push((t.run_id.clone(), status));
            if status.is_terminal() {
                let (wid, run) = (&entry.state.workflow_id, &t.run_id);
                match (&entry.state.error, entry.state.dead_letter) {
                    (Some(err), true) => {
                        tracing::warn!(workflow_id = %wid, run_id = %run, error_type = %err.kind, step = ?entry.state.failed_step, "execution failed and was parked in the dead-letter queue")
                    }
                    (Some(err), false) => {
                        tracing::info!(workflow_id = %wid, run_id = %run, status = status.as_str(), error_type = %err.kind, "execution ended")
                    }
                    (None, _) => {
                        tracing::debug!(workflow_id = %wid, run_id = %run, status = status.as_str(), "execution ended")
                    }
                }
                let c = &self.inner.counters;
                match status {
                    ExecStatus::Completed => c.executions_completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    ExecStatus::Failed | ExecStatus::Cancelled => {
                        c.executions_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    }
                    _ => 0,
                };
                let key = (entry.tenant.clone(), entry.state.workflow_id.clone());
                if self.inner.shared {
                    self.announce_end(&key, &t.run_id);
                }
                if status != ExecStatus::ContinuedAsNew {
                    self.remember_result(key.clone(), row_of(entry, now));
                }
                if let Some(n) = lock(&self.inner.watchers).get(&key) {
                    n.notify_waiters();
                }
                *t.guard = None;
                map.remove(&t.run_id);
            } else {
                map.set_bytes(&t.run_id, entry.state.bytes);
            }
        }
        statuses
    }
}

/// The summary row of a run after its newest events.
fn row_of(entry: &ExecEntry, now: i64) -> ExecutionRow {
    let st = &entry.state;
    ExecutionRow {
        run_id: st.run_id.clone(),
        workflow_id: st.workflow_id.clone(),
        workflow: st.workflow.clone(),
        version: st.version.clone(),
        status: st.status,
        paused: st.paused,
        dead_letter: st.dead_letter && st.status == ExecStatus::Failed,
        input: st.input.clone(),
        output: st.output.clone(),
        error: st.error.clone(),
        failed_step: st.failed_step.clone(),
        parent: st.parent.clone(),
        access: st.access.clone(),
        next_seq: st.next_seq,
        created_at_ms: entry.created_at_ms,
        updated_at_ms: now,
    }
}

/// Turns new events into rows to write and consequences for other runs.
fn effects(entry: &ExecEntry, events: &[Event], now: i64, batch: &mut Batch, follows: &mut Vec<Follow>) {
    let st = &entry.state;
    let run = &st.run_id;
    for e in events {
        match &e.kind {
            EventKind::TaskScheduled {
                step,
                attempt,
                task,
                queue,
                input,
                delay_ms,
                schedule_to_start_ms,
                start_to_close_ms,
                heartbeat_ms,
            } => {
                batch.add_tasks.push(TaskRow {
                    id: TaskRow::make_id(run, step, *attempt),
                    tenant: entry.tenant.clone(),
                    queue: queue.clone(),
                    kind: *task,
                    run_id: run.clone(),
                    workflow_id: st.workflow_id.clone(),
                    step: step.clone(),
                    attempt: *attempt,
                    input: input.clone(),
                    visible_at_ms: now + *delay_ms as i64,
                    schedule_to_start_ms: *schedule_to_start_ms,
                    start_to_close_ms: *start_to_close_ms,
                    heartbeat_ms: *heartbeat_ms,
                    created_at_ms: now,
                    trace_id: Some(TraceId::of_run(st).to_string()),
                });
            }
            EventKind::TaskCompleted { step, attempt, .. } | EventKind::TaskFailed { step, attempt, .. } => {
                batch.remove_tasks.push(TaskRow::make_id(run, step, *attempt));
            }
            EventKind::TimerStarted { step, duration_ms } => batch.add_timers.push(TimerRow {
                tenant: entry.tenant.clone(),
                run_id: run.clone(),
                workflow_id: st.workflow_id.clone(),
                step: step.clone(),
                fire_at_ms: now + *duration_ms as i64,
            }),
            EventKind::SignalWaitStarted { step, timeout_ms: Some(ms), .. } => batch.add_timers.push(TimerRow {
                tenant: entry.tenant.clone(),
                run_id: run.clone(),
                workflow_id: st.workflow_id.clone(),
                step: step.clone(),
                fire_at_ms: now + *ms as i64,
            }),
            EventKind::SignalConsumed { step, .. } | EventKind::TimerFired { step } => {
                batch.remove_timers.push((run.clone(), step.clone()));
            }
            EventKind::ChildStarted { step, attempt, workflow, workflow_id, input } => {
                follows.push(Follow::StartChild {
                    tenant: entry.tenant.clone(),
                    parent: ParentRef {
                        workflow_id: st.workflow_id.clone(),
                        run_id: run.clone(),
                        step: step.clone(),
                        attempt: *attempt,
                    },
                    workflow: workflow.clone(),
                    workflow_id: workflow_id.clone(),
                    input: input.clone(),
                    trace_id: TraceId::of_run(st),
                    access: st.access.for_child(&st.workflow),
                })
            }
            kind if kind.is_terminal() => {
                // Whatever was still outstanding for this run is void now.
                for (key, s) in &st.steps {
                    if s.status == StepStatus::Scheduled {
                        batch.remove_tasks.push(TaskRow::make_id(run, key, s.attempt));
                        batch.remove_timers.push((run.clone(), key.clone()));
                    }
                }
                // A continued run that ends before its start timer fired (cancelled while it
                // waited for its turn).
                let start = (run.clone(), START_TIMER.to_string());
                if st.chain > 0 && !batch.remove_timers.contains(&start) {
                    batch.remove_timers.push(start);
                }
                match kind {
                    EventKind::ExecutionContinuedAsNew { input } => follows.push(Follow::Continue {
                        tenant: entry.tenant.clone(),
                        workflow: st.workflow.clone(),
                        workflow_id: st.workflow_id.clone(),
                        input: input.clone(),
                        from: run.clone(),
                        parent: st.parent.clone(),
                        trace_id: TraceId::of_run(st),
                        chain: st.chain + 1,
                        access: st.access.clone(),
                    }),
                    EventKind::ExecutionCompleted { output } => tell_parent(entry, follows, |step, attempt| {
                        EventKind::ChildCompleted { step, attempt, output: output.clone() }
                    }),
                    EventKind::ExecutionFailed { error, .. } => tell_parent(entry, follows, |step, attempt| {
                        EventKind::ChildFailed { step, attempt, error: error.clone() }
                    }),
                    EventKind::ExecutionAborted { error } => tell_parent(entry, follows, |step, attempt| {
                        EventKind::ChildFailed { step, attempt, error: error.clone() }
                    }),
                    EventKind::ExecutionCancelled { .. } => tell_parent(entry, follows, |step, attempt| {
                        let error = ErrorInfo::new("child.cancelled", "child execution was cancelled");
                        EventKind::ChildFailed { step, attempt, error }
                    }),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Sends the parent of a run that just ended (if it has one) the event `make` builds from the
/// parent's step and attempt.
fn tell_parent(entry: &ExecEntry, follows: &mut Vec<Follow>, make: impl FnOnce(String, u32) -> EventKind) {
    if let Some(p) = &entry.state.parent {
        follows.push(Follow::Notify {
            tenant: entry.tenant.clone(),
            run_id: p.run_id.clone(),
            event: make(p.step.clone(), p.attempt),
        });
    }
}
