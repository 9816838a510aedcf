//! The Sluice runtime. It owns the in-memory side of running executions (a cache of their
//! folded state, task queues, timers), feeds events to `sluice_core::decide`, commits the
//! resulting events and side effects through the `Store` as one atomic batch, and only then
//! makes the side effects visible (tasks to workers, timers armed, results to waiters).
//!
//! Architecture invariant: nothing leaves the engine before the batch that records it is durable.

mod cache;
mod clock;
mod egress;
mod error;
mod eval;
mod http;
mod ledger;
mod llm;
mod quarantine;
mod reconcile;
mod shared;
mod tasks;
pub mod trace;
mod txn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sluice_core::event::{EventKind, RunAccess};
use sluice_core::{ErrorInfo, ExecState, Expr, WorkflowDef};
use sluice_store::{ExecutionFilter, ExecutionRow, Page, RunChange, Sight, Store, TaskRow, WorkflowVersion};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use clock::now_ms;
pub use egress::{is_public, Allow, AllowEntry, EgressPolicy};
pub use error::Error;
pub use ledger::{outcome_name, CallContext, CallStats, Ledger, Refused};
pub use trace::{SpanId, TraceId, TraceParent};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest a long-poll may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Largest response body an `http` step keeps unless configured otherwise: 1 MiB.
pub const DEFAULT_HTTP_MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How often timeouts of running tasks are checked.
    pub reap_interval: Duration,
    /// Most running executions whose state is kept in memory; others reload from the store.
    pub cache_capacity: usize,
    /// Wall-clock limit on the expressions of one decision, behind their step budget.
    pub decide_time_limit: Duration,
    /// Threads that evaluate expressions too large to evaluate in place (see `eval`).
    pub expr_threads: usize,
    /// Bytes one expression evaluation may hold at once; past it the step fails with
    /// `expr.limit`.
    pub expr_memory: usize,
    /// The AI gateway that serves `llm` steps; without one they fail with `llm.no_gateway`.
    pub gateway: Option<Arc<sluice_gateway::Gateway>>,
    /// How often queued usage rows (of chat calls) are committed: the longest they wait in memory.
    pub usage_every: Duration,
    /// Most executions of one tenant running at once; a start beyond it is refused.
    pub tenant_max_running: Option<u32>,
    /// This node's name among the nodes sharing the database: a process registering under the
    /// name of an earlier one takes its executions over at once (a restart). `local` by
    /// default; give each of several nodes on one database its own.
    pub node: String,
    /// How long the node's lease on its executions lasts without renewal; renewed every third
    /// of it. When it runs out, another node takes them over.
    pub lease: Duration,
    /// Where other nodes reach this one (`http://host:port`), to send it signals and other
    /// changes to the executions it owns.
    pub url: Option<String>,
    /// Largest response body an `http` step keeps; a larger one fails the step (`http.too_large`).
    pub http_max_body: usize,
    /// What `http` steps may connect to beyond public addresses.
    pub egress: EgressPolicy,
    /// What one run may hold (step outputs, bytes held, map items); see [`sluice_core::RunLimits`].
    pub run_limits: sluice_core::RunLimits,
    /// Largest input an execution may start with, as JSON bytes.
    pub max_input_bytes: usize,
    /// Largest payload of one signal, as JSON bytes.
    pub max_signal_bytes: usize,
    /// Bytes of run state the cache keeps in memory (as [`ExecState::bytes`] counts them); past
    /// it, the runs touched least recently are dropped (and reloaded when needed).
    pub cache_bytes: usize,
    /// Fault injection for tests: every n-th successful commit is reported as failed, as when
    /// the connection drops after the database applied a batch but before it said so. 0: never.
    pub lose_commit_acks: u32,
    /// Runs each tenant may start by `continue_as_new` per second, in bursts of up to ten
    /// seconds' worth; past it, the next run's first step waits (a durable timer). 0: no limit.
    pub continue_rate: u32,
    /// Most runs in one `continue_as_new` chain; the run that would come after them fails with
    /// `engine.chain_too_long`. 0: no limit.
    pub max_chain_length: u64,
    /// Attempts at evaluating a step that may stop the server before the step fails with
    /// `engine.quarantined` instead of being tried again (see `quarantine`). 0: never.
    pub quarantine_after: u32,
    /// Task queues one tenant may have in this node's memory at once; a poll that names a new
    /// queue past it is refused (`Error::TooManyQueues`). Idle queues are forgotten.
    pub max_queues_per_tenant: usize,
}

/// Default of [`EngineOptions::max_input_bytes`]: 1 MiB.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 1024 * 1024;
/// Default of [`EngineOptions::max_signal_bytes`]: 256 KiB.
pub const DEFAULT_MAX_SIGNAL_BYTES: usize = 256 * 1024;
/// Default of [`EngineOptions::cache_bytes`]: 1 GiB.
pub const DEFAULT_CACHE_BYTES: usize = 1024 * 1024 * 1024;

/// Default of [`EngineOptions::quarantine_after`].
pub const DEFAULT_QUARANTINE_AFTER: u32 = 2;

/// The environment variable of the test hook that makes expressions containing its value abort
/// the process on the evaluation threads (`sluice_core::expr::set_test_crash_marker`).
pub const TEST_CRASH_ENV: &str = "SLUICE_TEST_CRASH_ON_EXPR";

/// Default of [`EngineOptions::continue_rate`].
pub const DEFAULT_CONTINUE_RATE: u32 = 100;
/// Default of [`EngineOptions::max_chain_length`].
pub const DEFAULT_MAX_CHAIN_LENGTH: u64 = 100_000;

/// Task queues per tenant unless told otherwise.
pub const DEFAULT_MAX_QUEUES_PER_TENANT: usize = 1_000;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            reap_interval: Duration::from_millis(200),
            cache_capacity: 100_000,
            decide_time_limit: Duration::from_secs(1),
            expr_threads: std::thread::available_parallelism().map(usize::from).unwrap_or(2).clamp(2, 8),
            expr_memory: sluice_core::expr::DEFAULT_EVAL_MEMORY,
            gateway: None,
            usage_every: Duration::from_millis(20),
            tenant_max_running: None,
            node: "local".into(),
            lease: Duration::from_secs(10),
            url: None,
            http_max_body: DEFAULT_HTTP_MAX_BODY,
            egress: EgressPolicy::default(),
            lose_commit_acks: 0,
            run_limits: sluice_core::RunLimits::default(),
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            max_signal_bytes: DEFAULT_MAX_SIGNAL_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            continue_rate: DEFAULT_CONTINUE_RATE,
            max_chain_length: DEFAULT_MAX_CHAIN_LENGTH,
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            max_queues_per_tenant: DEFAULT_MAX_QUEUES_PER_TENANT,
        }
    }
}

/// `<host>-<pid>-<n>`: a node name unique to this engine, for nodes without a name of their own.
pub fn unique_node_name() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "node".into());
    format!("{host}-{}-{n}", std::process::id())
}

/// A task as handed to a worker.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub task_token: String,
    pub queue: String,
    pub workflow_id: String,
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub input: Value,
    pub idempotency_key: String,
    pub start_to_close_timeout_ms: u64,
    pub heartbeat_timeout_ms: Option<u64>,
    /// Trace id of the execution (32 lowercase hex digits).
    pub trace_id: String,
    /// W3C `traceparent` continuing the execution's trace from a span of this delivery: for the
    /// worker's logs and the calls it makes.
    pub traceparent: String,
}

impl From<&TaskRow> for TaskInfo {
    fn from(t: &TaskRow) -> Self {
        let trace_id = TraceId::of_task(t);
        Self {
            task_token: t.id.clone(),
            queue: t.queue.clone(),
            workflow_id: t.workflow_id.clone(),
            run_id: t.run_id.clone(),
            step: t.step.clone(),
            attempt: t.attempt,
            input: t.input.clone(),
            idempotency_key: t.id.clone(),
            start_to_close_timeout_ms: t.start_to_close_ms,
            heartbeat_timeout_ms: t.heartbeat_ms,
            trace_id: trace_id.to_string(),
            traceparent: TraceParent::child_of(&trace_id),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub name: String,
    pub version: String,
    pub created: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub workflow: String,
    pub version: Option<String>,
    pub workflow_id: Option<String>,
    pub input: Value,
    /// The trace the execution joins (the starting request's); a new one when `None`.
    pub trace_id: Option<TraceId>,
    /// Who starts it and who may reach it; inherited by its children and continued runs.
    pub access: RunAccess,
    /// What the starting caller may see: a `workflow_id` whose latest run it does not see is
    /// refused with `Conflict` (neither joined nor reused), as if taken by an unknown run.
    /// `None` sees everything.
    pub sight: Option<Sight>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub workflow_id: String,
    pub run_id: String,
    /// The version of the workflow the run executes.
    pub version: String,
    pub status: &'static str,
    pub created: bool,
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub executions_started: std::sync::atomic::AtomicU64,
    pub executions_completed: std::sync::atomic::AtomicU64,
    pub executions_failed: std::sync::atomic::AtomicU64,
    pub tasks_completed: std::sync::atomic::AtomicU64,
    pub tasks_failed: std::sync::atomic::AtomicU64,
    pub commits_failed: std::sync::atomic::AtomicU64,
    /// Executions this node took over from nodes whose lease expired (or from itself, restarted).
    pub runs_taken_over: std::sync::atomic::AtomicU64,
    /// Workers' answers this node took for executions another node owns, and posted for it.
    pub outcomes_posted: std::sync::atomic::AtomicU64,
    /// Answers other nodes posted that this node recorded for its executions.
    pub outcomes_applied: std::sync::atomic::AtomicU64,
    /// Signals, cancels and redrives this node took for executions another node owns.
    pub changes_posted: std::sync::atomic::AtomicU64,
    /// Signals, cancels and redrives other nodes posted that this node applied.
    pub changes_applied: std::sync::atomic::AtomicU64,
    /// Runs whose commit had an unknown outcome, brought in line with the store afterwards.
    pub runs_reconciled: std::sync::atomic::AtomicU64,
    /// Successful commits counted for `EngineOptions::lose_commit_acks`.
    pub commits_ok: std::sync::atomic::AtomicU64,
    /// Steps failed with `engine.quarantined` instead of being evaluated again.
    pub steps_quarantined: std::sync::atomic::AtomicU64,
}

/// One running execution in memory. `None` once it ended or after a failed commit, so the next
/// access reloads it from the store.
pub(crate) struct ExecEntry {
    pub tenant: String,
    pub def: Arc<WorkflowDef>,
    pub state: ExecState,
    pub created_at_ms: i64,
}

pub(crate) type Slot = Arc<Mutex<Option<ExecEntry>>>;

/// A change waiting for the next transaction of a `continue_as_new` chain.
pub(crate) struct ChainChange {
    id: u64,
    pub change: RunChange,
    /// The id of the posted change it is (removed in the batch that applies it).
    pub posted: Option<String>,
    /// Told whether the batch that applied it was committed.
    pub done: tokio::sync::oneshot::Sender<bool>,
}

/// How long a change to a chain whose runs keep ending under it is tried, and how often it is
/// registered again after the commit that took it failed.
const CHAIN_CHANGE_WAIT: Duration = Duration::from_secs(10);
const CHAIN_CHANGE_TRIES: usize = 3;

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub execs: SyncMutex<cache::ExecCache>,
    pub defs: SyncMutex<HashMap<(String, String, String), Arc<WorkflowDef>>>,
    pub tasks: SyncMutex<tasks::TaskTable>,
    pub timers: SyncMutex<tasks::Wheel>,
    pub wake: Notify,
    /// Waiters for results, by (tenant, workflow_id).
    pub watchers: SyncMutex<HashMap<(String, String), Arc<Notify>>>,
    /// The clients of `http` steps, under the egress policy.
    pub http: egress::Egress,
    /// Latest version of each workflow, by (tenant, name).
    pub latest: SyncMutex<HashMap<(String, String), String>>,
    /// Recently finished runs by (tenant, workflow_id), so result waiters need no store read.
    pub results: SyncMutex<RecentResults>,
    pub counters: Counters,
    /// Gateway attempts by (route, target, outcome).
    pub call_stats: SyncMutex<HashMap<(String, String, String), ledger::CallStats>>,
    /// Ledger rows of chat calls, committed by the usage writer.
    pub usage: ledger::UsageQueue,
    /// Per tenant, the gate that admits starts one at a time where a concurrency limit applies,
    /// so that two starts cannot both see room for one.
    pub admission: SyncMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This node's fencing epoch: every change it commits carries it, and the store refuses it
    /// for executions another node has taken over.
    pub epoch: i64,
    /// Set when the lease was lost: another node owns this node's executions now.
    pub lease_lost: tokio::sync::watch::Sender<bool>,
    /// Set when the server stops: long-polls answer at once instead of holding it up.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Worker tasks are claimed in the store's queues, shared with the other nodes.
    pub shared: bool,
    /// Woken when another node posted a worker's answer for one of this node's executions.
    pub outcomes: Notify,
    pub settling: shared::Settling,
    /// The threads that evaluate large expressions.
    pub eval: eval::EvalPool,
    /// Wake-ups about ended runs, sent together every few milliseconds (see `shared`).
    pub ended: SyncMutex<Vec<sluice_store::Wake>>,
    /// Runs whose last commit may or may not have been applied (see `reconcile`).
    pub uncertain: reconcile::Uncertain,
    /// Signals and cancels for a workflow id whose run ended by `continue_as_new` while they
    /// were on their way, by (tenant, workflow_id): the chain's next transaction applies them.
    pub chain_changes: SyncMutex<HashMap<(String, String), Vec<ChainChange>>>,
    /// How many wait in `chain_changes`: transactions look there only when some do.
    pub chain_pending: std::sync::atomic::AtomicUsize,
    pub chain_seq: std::sync::atomic::AtomicU64,
    /// Per tenant, the bucket of `continue_as_new` runs (see [`EngineOptions::continue_rate`]).
    pub continues: SyncMutex<HashMap<String, txn::Bucket>>,
    pub opts: EngineOptions,
}

/// A result waiter's registration; the last waiter of a workflow id removes the entry, so the map
/// holds only ids someone is waiting for (also when the waiting request is dropped).
struct Watch<'a> {
    engine: &'a Engine,
    key: (String, String),
    notify: Arc<Notify>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut w = lock(&self.engine.inner.watchers);
        // Ours and the map's: nobody else waits.
        if Arc::strong_count(&self.notify) <= 3 && w.get(&self.key).is_some_and(|n| Arc::ptr_eq(n, &self.notify)) {
            w.remove(&self.key);
        }
    }
}

/// The last few thousand finished runs, oldest evicted first.
#[derive(Default)]
pub(crate) struct RecentResults {
    rows: HashMap<(String, String), ExecutionRow>,
    order: std::collections::VecDeque<(String, String)>,
}

const RECENT_RESULTS: usize = 4096;

/// A cheap, cloneable handle to the runtime.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

fn lock<T>(m: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Valid workflow ids: what URLs and logs can carry unescaped.
pub fn validate_workflow_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:@".contains(c)) {
        return Err(Error::invalid("workflow_id", "expected 1 to 200 letters, digits, `_`, `-`, `.`, `:` or `@`"));
    }
    Ok(())
}

impl Engine {
    /// Loads pending tasks and timers from the store and starts the background loops.
    pub async fn start(store: Arc<dyn Store>, opts: EngineOptions) -> Result<(Engine, JoinHandle<()>)> {
        let http = egress::Egress::new(&opts.egress).map_err(|e| Error::Internal(e.to_string()))?;
        if let Some(marker) = std::env::var(TEST_CRASH_ENV).ok().filter(|m| !m.is_empty()) {
            tracing::warn!(
                marker,
                "{TEST_CRASH_ENV} is set: expressions containing it stop this process (for tests only)"
            );
            sluice_core::expr::set_test_crash_marker(&marker);
        }
        let lease_ms = i64::try_from(opts.lease.as_millis()).unwrap_or(i64::MAX);
        let epoch = store.register_node(&opts.node, opts.url.as_deref(), lease_ms).await?;
        let shared = store.shared_queues();
        let inner = Arc::new(Inner {
            store,
            execs: SyncMutex::new(cache::ExecCache::new(opts.cache_capacity, opts.cache_bytes)),
            defs: SyncMutex::new(HashMap::new()),
            tasks: SyncMutex::new(tasks::TaskTable::new(shared)),
            timers: SyncMutex::new(tasks::Wheel::default()),
            wake: Notify::new(),
            watchers: SyncMutex::new(HashMap::new()),
            http,
            latest: SyncMutex::new(HashMap::new()),
            results: SyncMutex::new(RecentResults::default()),
            counters: Counters::default(),
            call_stats: SyncMutex::new(HashMap::new()),
            usage: ledger::UsageQueue::default(),
            admission: SyncMutex::new(HashMap::new()),
            epoch,
            lease_lost: tokio::sync::watch::channel(false).0,
            stopping: tokio::sync::watch::channel(false).0,
            shared,
            outcomes: Notify::new(),
            settling: shared::Settling::default(),
            eval: eval::EvalPool::start(opts.expr_threads, opts.expr_memory, opts.decide_time_limit)?,
            ended: SyncMutex::new(Vec::new()),
            uncertain: reconcile::Uncertain::default(),
            chain_changes: SyncMutex::new(HashMap::new()),
            chain_pending: std::sync::atomic::AtomicUsize::new(0),
            chain_seq: std::sync::atomic::AtomicU64::new(0),
            continues: SyncMutex::new(HashMap::new()),
            opts,
        });
        let engine = Engine { inner };
        if shared {
            engine.start_shared().await?;
        }
        let taken = engine.take_over().await?;
        tracing::info!(node = %engine.inner.opts.node, epoch, runs = taken, "node registered; engine recovered pending work");
        let bg = engine.clone();
        let handle = tokio::spawn(async move { bg.background().await });
        let leases = engine.clone();
        tokio::spawn(async move { leases.keep_lease().await });
        tokio::spawn(engine.clone().write_usage());
        tokio::spawn(engine.clone().reconcile_loop());
        Ok((engine, handle))
    }

    /// Takes over the running executions no live node owns (this node's own after a restart,
    /// a dead node's once its lease expired) and loads their pending tasks and timers. Returns
    /// how many runs were taken.
    async fn take_over(&self) -> Result<usize> {
        let store = &self.inner.store;
        let taken = store.take_over(self.inner.epoch).await?;
        if taken.is_empty() {
            return Ok(0);
        }
        self.inner.counters.runs_taken_over.fetch_add(taken.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let runs: std::collections::HashSet<&str> = taken.iter().map(|(_, r)| r.as_str()).collect();
        let now = now_ms();
        let pending = store.load_tasks().await?;
        let mut to_run = Vec::new();
        {
            let mut t = lock(&self.inner.tasks);
            for row in pending.into_iter().filter(|r| runs.contains(r.run_id.as_str())) {
                // In the shared queue already (a task of a node that ended is released with it).
                to_run.extend(t.insert(row, now, false));
            }
        }
        for row in to_run {
            self.run_engine_task(row);
        }
        let timers = store.load_timers().await?;
        {
            let mut w = lock(&self.inner.timers);
            for t in timers.iter().filter(|t| runs.contains(t.run_id.as_str())) {
                w.insert(t.fire_at_ms, t.run_id.clone(), t.step.clone(), t.tenant.clone());
            }
        }
        self.inner.wake.notify_one();
        Ok(taken.len())
    }

    /// Renews the lease every third of its length and takes over what dead nodes leave; stops
    /// (and says so on [`Engine::lease_lost`]) when the lease was lost to another node.
    ///
    /// After the store was unreachable, a node waits one lease length of renewals before it
    /// takes anything over: every node's lease may have run out during the outage, and the
    /// others, alive, need that long to renew theirs. Otherwise the first node back would end
    /// the leases of all the others, which would then stop.
    async fn keep_lease(self) {
        let lease_ms = i64::try_from(self.inner.opts.lease.as_millis()).unwrap_or(i64::MAX);
        let every = self.inner.opts.lease / 3;
        let mut unreachable_at: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(every).await;
            match self.inner.store.renew_lease(self.inner.epoch, lease_ms).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(node = %self.inner.opts.node, epoch = self.inner.epoch,
                        "this node's lease was lost and its executions taken over by another node; it must stop");
                    let _ = self.inner.lease_lost.send(true);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew this node's lease; retrying");
                    unreachable_at = Some(std::time::Instant::now());
                    continue;
                }
            }
            if unreachable_at.is_some_and(|at| at.elapsed() < self.inner.opts.lease) {
                continue;
            }
            unreachable_at = None;
            match self.take_over().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(runs = n, "took over the executions of a node whose lease expired"),
                Err(e) => tracing::warn!(error = %e, "cannot take over expired leases; retrying"),
            }
        }
    }

    /// Resolves when this node lost its lease: its executions belong to another node, and every
    /// change it tries is refused. The server should exit.
    pub async fn lease_lost(&self) {
        let mut rx = self.inner.lease_lost.subscribe();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Ends every long-poll now and each later one at once (a task poll with no task, a result
    /// wait with the execution as it is), so that a stopping server's in-flight requests finish
    /// instead of holding it up for their whole wait.
    pub fn stop_waiting(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Resolves once [`Engine::stop_waiting`] was called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.inner.stopping.subscribe();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Whether this node lost its lease.
    pub fn has_lost_lease(&self) -> bool {
        *self.inner.lease_lost.borrow()
    }

    /// This node's fencing epoch.
    pub fn epoch(&self) -> i64 {
        self.inner.epoch
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Executions whose state is in memory.
    pub fn cached_executions(&self) -> usize {
        lock(&self.inner.execs).len()
    }

    /// Bytes of run state the cache holds, as counted ([`ExecState::bytes`]).
    pub fn cached_bytes(&self) -> usize {
        lock(&self.inner.execs).bytes()
    }

    /// Workflow ids someone waits on a result for.
    pub fn result_waiters(&self) -> usize {
        lock(&self.inner.watchers).len()
    }

    /// Timers armed in memory.
    pub fn timer_count(&self) -> usize {
        lock(&self.inner.timers).len()
    }

    /// Task queues held in this node's memory, of every tenant.
    pub fn queue_count(&self) -> usize {
        lock(&self.inner.tasks).queue_count()
    }

    /// Queue depths and oldest ready task age (ms) per (tenant, queue): of this node's queues,
    /// or of the shared queues of every node.
    pub async fn queue_depths(&self) -> Vec<(String, String, usize, i64)> {
        let now = now_ms();
        let mut depths = lock(&self.inner.tasks).depths(now);
        if self.inner.shared {
            match self.inner.store.queue_depths(now).await {
                Ok(rows) => depths.extend(rows.into_iter().map(|d| {
                    (d.tenant, d.queue, usize::try_from(d.ready).unwrap_or(usize::MAX), now - d.oldest_visible_ms)
                })),
                Err(e) => tracing::warn!(error = %e, "cannot read the depth of the shared queues"),
            }
        }
        depths
    }

    /// Timers and due work: fires timers, promotes delayed tasks, fails timed-out tasks.
    async fn background(self) {
        let mut last_reap = 0i64;
        loop {
            let now = now_ms();
            let due = lock(&self.inner.timers).take_due(now);
            for (tenant, run, step) in due {
                let e = self.clone();
                tokio::spawn(async move { e.fire_timer(tenant, run, step).await });
            }
            let to_run = lock(&self.inner.tasks).promote_due(now);
            for row in to_run {
                self.run_engine_task(row);
            }
            if now - last_reap >= self.inner.opts.reap_interval.as_millis() as i64 {
                last_reap = now;
                let expired = {
                    let mut t = lock(&self.inner.tasks);
                    t.free_idle_queues(now);
                    t.reap(now)
                };
                for x in expired {
                    let e = self.clone();
                    let span = trace::task_span(&x.row);
                    tokio::spawn(
                        async move {
                            let err = ErrorInfo::new(
                                x.kind,
                                format!(
                                    "task attempt {} exceeded its {} limit",
                                    x.row.attempt,
                                    x.kind.trim_start_matches("timeout.")
                                ),
                            );
                            tracing::debug!(kind = x.kind, "task attempt timed out");
                            if let Err(err) = e.finish_task(x.row, None, Some((err, true))).await {
                                tracing::warn!(error = %err, "could not record a task timeout");
                            }
                        }
                        .instrument(span),
                    );
                }
            }
            let next_timer = lock(&self.inner.timers).next_at();
            let next_task = lock(&self.inner.tasks).next_delayed_at();
            let mut next = now + self.inner.opts.reap_interval.as_millis() as i64;
            for t in [next_timer, next_task].into_iter().flatten() {
                next = next.min(t);
            }
            let sleep = Duration::from_millis((next - now).clamp(1, 1000) as u64);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }

    async fn fire_timer(&self, tenant: String, run: String, step: String) {
        if step == txn::START_TIMER {
            return self.kick(&tenant, &run).await;
        }
        let result = self
            .advance(
                &tenant,
                &run,
                |_| Ok(vec![EventKind::TimerFired { step: step.clone() }]),
                txn::Extra::timer(&run, &step),
            )
            .await;
        match result {
            Ok(()) | Err(Error::NotRunning(_)) | Err(Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(run_id = %run, step = %step, error = %e, "timer could not fire, retrying in 1s");
                lock(&self.inner.timers).insert(now_ms() + 1000, run, step, tenant);
            }
        }
    }

    pub(crate) fn remember_result(&self, key: (String, String), row: ExecutionRow) {
        let mut r = lock(&self.inner.results);
        if r.rows.insert(key.clone(), row).is_none() {
            r.order.push_back(key);
        }
        while r.order.len() > RECENT_RESULTS {
            if let Some(old) = r.order.pop_front() {
                r.rows.remove(&old);
            }
        }
    }

    fn forget_result(&self, tenant: &str, workflow_id: &str) {
        lock(&self.inner.results).rows.remove(&(tenant.to_string(), workflow_id.to_string()));
    }

    // ---- workflows ----

    /// Validates and stores a workflow version (content-hashed: publishing the same text twice
    /// stores it once). The version published is the latest one afterwards, also when it was
    /// published before.
    pub async fn publish(&self, tenant: &str, def: WorkflowDef) -> Result<Published> {
        let problems = llm::check_definition(&def, self.inner.opts.gateway.as_deref());
        if !problems.is_empty() {
            return Err(Error::InvalidDefinition(problems));
        }
        let canonical = def.to_canonical_json();
        let version = content_hash(&canonical);
        let created = self
            .inner
            .store
            .put_workflow(
                tenant,
                WorkflowVersion {
                    name: def.name.clone(),
                    version: version.clone(),
                    definition: canonical,
                    created_at_ms: publish_time(),
                },
            )
            .await?;
        lock(&self.inner.defs).insert((tenant.into(), def.name.clone(), version.clone()), Arc::new(def.clone()));
        lock(&self.inner.latest).insert((tenant.into(), def.name.clone()), version.clone());
        Ok(Published { name: def.name, version, created })
    }

    /// A definition by name and version (latest when `None`), from cache or store.
    pub async fn definition(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<(String, Arc<WorkflowDef>)> {
        if let Some(v) = version {
            if let Some(d) = lock(&self.inner.defs).get(&(tenant.into(), name.into(), v.into())) {
                return Ok((v.to_string(), d.clone()));
            }
        }
        let row = self.inner.store.get_workflow(tenant, name, version).await?.ok_or_else(|| Error::NotFound {
            what: "workflow",
            id: match version {
                Some(v) => format!("{name}@{v}"),
                None => name.to_string(),
            },
        })?;
        if let Some(d) = lock(&self.inner.defs).get(&(tenant.into(), name.into(), row.version.clone())) {
            return Ok((row.version, d.clone()));
        }
        if version.is_none() {
            lock(&self.inner.latest).insert((tenant.into(), name.into()), row.version.clone());
        }
        let value: Value = serde_json::from_str(&row.definition)
            .map_err(|e| Error::Internal(format!("stored definition is not JSON: {e}")))?;
        let def = sluice_core::def::parse_value(&value)
            .map_err(|e| Error::Internal(format!("stored definition no longer validates: {:?}", e)))?;
        let def = Arc::new(def);
        lock(&self.inner.defs).insert((tenant.into(), name.into(), row.version.clone()), def.clone());
        Ok((row.version, def))
    }

    // ---- executions ----

    pub async fn start_execution(&self, tenant: &str, req: StartRequest) -> Result<Started> {
        let workflow_id = match &req.workflow_id {
            Some(id) => {
                validate_workflow_id(id)?;
                id.clone()
            }
            None => new_id(),
        };
        let size = sluice_core::state::json_size(&req.input);
        if size > self.inner.opts.max_input_bytes {
            return Err(Error::TooLarge {
                what: "the execution's input".into(),
                size,
                limit: self.inner.opts.max_input_bytes,
                setting: "max input size",
            });
        }
        // A generated id is new by construction; a caller's id may name a running execution.
        if req.workflow_id.is_some() {
            if let Some(row) = self.inner.store.get_execution(tenant, &workflow_id, None).await? {
                if req.sight.as_ref().is_some_and(|s| !s.sees(&row)) {
                    return Err(id_taken(&workflow_id));
                }
                if row.status == sluice_core::ExecStatus::Running {
                    return Ok(Started {
                        workflow_id,
                        run_id: row.run_id,
                        version: row.version,
                        status: "running",
                        created: false,
                    });
                }
                self.announce_restart(tenant, &workflow_id);
            }
        }
        let (version, def) = self.definition(tenant, &req.workflow, req.version.as_deref()).await?;
        // Held until the run is durable, so the next start counts it.
        let _admitted = self.admit(tenant, &def).await?;
        let run_id = new_id();
        let trace_id = req.trace_id.unwrap_or_else(TraceId::random);
        let started = EventKind::ExecutionStarted {
            workflow: def.name.clone(),
            version: version.clone(),
            workflow_id: workflow_id.clone(),
            run_id: run_id.clone(),
            input: req.input,
            parent: None,
            continued_from: None,
            chain: 0,
            trace_id: Some(trace_id.to_string()),
            access: req.access,
        };
        self.forget_result(tenant, &workflow_id);
        let span = trace::execution_span(tenant, &trace_id, &workflow_id, &run_id);
        match self.create_run(tenant, def, &run_id, started).instrument(span).await {
            Ok(status) => {
                self.inner.counters.executions_started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Started { workflow_id, run_id, version, status, created: true })
            }
            Err(Error::Conflict(_)) => {
                // Lost a race with another start of the same id: answer with the running one.
                let row = self.inner.store.get_execution(tenant, &workflow_id, None).await?;
                match row {
                    Some(row) if req.sight.as_ref().is_some_and(|s| !s.sees(&row)) => Err(id_taken(&workflow_id)),
                    Some(row) if row.status == sluice_core::ExecStatus::Running => Ok(Started {
                        workflow_id,
                        run_id: row.run_id,
                        version: row.version,
                        status: "running",
                        created: false,
                    }),
                    _ => Err(Error::Conflict(format!(
                        "workflow id `{workflow_id}` is being started concurrently, retry"
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The principal a run acts for (`user:<email>`, `key:<id>`), read from memory while it is
    /// cached and idle, else from the store.
    pub(crate) async fn run_access(&self, tenant: &str, run_id: &str) -> Result<RunAccess> {
        let slot = lock(&self.inner.execs).get(run_id).cloned();
        if let Some(guard) = slot.as_ref().and_then(|s| s.try_lock().ok()) {
            if let Some(entry) = guard.as_ref().filter(|e| e.tenant == tenant) {
                return Ok(entry.state.access.clone());
            }
        }
        match self.inner.store.get_run(tenant, run_id).await? {
            Some(row) => Ok(row.access),
            None => Err(Error::NotFound { what: "execution", id: run_id.to_string() }),
        }
    }

    /// Checks the workflow's and the tenant's concurrency limits before a new execution starts;
    /// the guard returned serialises the tenant's limited starts on this node.
    async fn admit(&self, tenant: &str, def: &WorkflowDef) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>> {
        let tenant_limit = self.inner.opts.tenant_max_running;
        if tenant_limit.is_none() && def.max_running.is_none() {
            return Ok(None);
        }
        let gate = lock(&self.inner.admission).entry(tenant.to_string()).or_default().clone();
        let guard = gate.lock_owned().await;
        let store = &self.inner.store;
        if let Some(limit) = def.max_running {
            let running = store.count_running(tenant, Some(&def.name)).await?;
            if running >= u64::from(limit) {
                return Err(Error::ConcurrencyLimited { scope: "workflow", name: def.name.clone(), limit, running });
            }
        }
        if let Some(limit) = tenant_limit {
            let running = store.count_running(tenant, None).await?;
            if running >= u64::from(limit) {
                return Err(Error::ConcurrencyLimited { scope: "tenant", name: tenant.to_string(), limit, running });
            }
        }
        Ok(Some(guard))
    }

    pub async fn get_execution(&self, tenant: &str, workflow_id: &str, run_id: Option<&str>) -> Result<ExecutionRow> {
        self.inner
            .store
            .get_execution(tenant, workflow_id, run_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "execution", id: workflow_id.to_string() })
    }

    /// Waits until the latest run of `workflow_id` is terminal (following `continue_as_new`),
    /// or `wait` passes; returns the latest row either way.
    pub async fn wait_result(&self, tenant: &str, workflow_id: &str, wait: Duration) -> Result<ExecutionRow> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let key = (tenant.to_string(), workflow_id.to_string());
        let notify = lock(&self.inner.watchers).entry(key.clone()).or_insert_with(|| Arc::new(Notify::new())).clone();
        let _watch = Watch { engine: self, key, notify: notify.clone() };
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A node that runs a workflow id again tells the others to forget its result.
            let recent = lock(&self.inner.results).rows.get(&(tenant.to_string(), workflow_id.to_string())).cloned();
            let row = match recent {
                Some(row) => row,
                None => self.get_execution(tenant, workflow_id, None).await?,
            };
            if row.status.is_terminal() && row.status != sluice_core::ExecStatus::ContinuedAsNew {
                return Ok(row);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(row),
                () = self.stopped() => return Ok(row),
                // A continue-as-new hands over to a new run; re-read at least every second.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    pub async fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> Result<Page<ExecutionRow>> {
        Ok(self.inner.store.list_executions(tenant, filter).await?)
    }

    pub async fn history(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<(ExecutionRow, Vec<sluice_core::Event>)> {
        let row = self.get_execution(tenant, workflow_id, run_id).await?;
        let events = self.inner.store.history(tenant, &row.run_id, after, limit).await?;
        Ok((row, events))
    }

    /// Delivers a signal to the current run of `workflow_id`. `pause`, `resume` and `cancel`
    /// act on the execution itself.
    pub async fn signal(&self, tenant: &str, workflow_id: &str, name: &str, payload: Value) -> Result<()> {
        let size = sluice_core::state::json_size(&payload);
        if size > self.inner.opts.max_signal_bytes {
            return Err(Error::TooLarge {
                what: "the signal's payload".into(),
                size,
                limit: self.inner.opts.max_signal_bytes,
                setting: "max signal size",
            });
        }
        self.change_chain(tenant, workflow_id, RunChange::Signal { name: name.to_string(), payload }, None).await
    }

    /// Cancels the current run of `workflow_id`.
    pub async fn cancel(&self, tenant: &str, workflow_id: &str, reason: Option<String>) -> Result<()> {
        self.change_chain(tenant, workflow_id, RunChange::Cancel { reason }, None).await
    }

    /// Makes a change to the current run of `workflow_id`: its latest run, and when that run ends
    /// by `continue_as_new` while the change is on its way, the run that continues it. Such a
    /// change waits for the next transaction of the chain (`chain_changes`), which applies it
    /// before deciding; meanwhile it is tried again on the latest run in the store, in case
    /// the chain has come to rest. Either way it is applied once. `posted`: the id of the change
    /// another node posted, removed in the batch that applies it.
    pub(crate) async fn change_chain(
        &self,
        tenant: &str,
        workflow_id: &str,
        change: RunChange,
        posted: Option<String>,
    ) -> Result<()> {
        let row = self.running_row(tenant, workflow_id).await?;
        let first = match posted.clone() {
            Some(id) => self.apply_change(tenant, &row.run_id, change.clone(), Some(id)).await,
            None => self.change_run(tenant, &row.run_id, change.clone()).await,
        };
        match first {
            Err(Error::NotRunning(_)) => {}
            other => return other,
        }
        let key = (tenant.to_string(), workflow_id.to_string());
        let deadline = tokio::time::Instant::now() + CHAIN_CHANGE_WAIT;
        for _ in 0..CHAIN_CHANGE_TRIES {
            let (done, mut answer) = tokio::sync::oneshot::channel();
            let id = self.inner.chain_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            {
                let mut pending = lock(&self.inner.chain_changes);
                pending.entry(key.clone()).or_default().push(ChainChange {
                    id,
                    change: change.clone(),
                    posted: posted.clone(),
                    done,
                });
                self.inner.chain_pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            loop {
                // A transaction of the chain took it: its commit decides.
                let waited = tokio::select! {
                    r = &mut answer => Some(r.unwrap_or(false)),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => None,
                };
                match waited {
                    Some(true) => return Ok(()),
                    Some(false) => break, // that commit failed: register again
                    None => {}
                }
                let row = match self.get_execution(tenant, workflow_id, None).await {
                    Ok(row) => row,
                    Err(e) if self.take_chain_change(&key, id).is_some() => return Err(e),
                    // Taken meanwhile: its commit decides.
                    Err(_) => return if answer.await == Ok(true) { Ok(()) } else { Err(not_recorded(workflow_id)) },
                };
                let over = tokio::time::Instant::now() >= deadline;
                if over || (row.status.is_terminal() && row.status != sluice_core::ExecStatus::ContinuedAsNew) {
                    if self.take_chain_change(&key, id).is_some() {
                        return Err(if over {
                            Error::Conflict(format!("the runs of `{workflow_id}` ended too fast to be changed; retry"))
                        } else {
                            Error::NotRunning(workflow_id.to_string())
                        });
                    }
                    // Taken meanwhile: its commit decides.
                    return if answer.await == Ok(true) { Ok(()) } else { Err(not_recorded(workflow_id)) };
                }
                if row.status.is_terminal() {
                    continue;
                }
                // The chain may be at rest (waiting on a task, a timer, a signal): apply it there,
                // unless a transaction of the chain took it meanwhile.
                let took = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (engine, k, t) = (self.clone(), key.clone(), took.clone());
                let make = move |st: &ExecState| {
                    Ok(match engine.take_chain_change(&k, id) {
                        Some(c) => {
                            t.store(true, std::sync::atomic::Ordering::Relaxed);
                            change_events(c.change, st)
                        }
                        None => Vec::new(),
                    })
                };
                let extra = txn::Extra::default().with_change(posted.clone());
                let result = self.advance_any(tenant, &row.run_id, make, extra, false).await;
                if took.load(std::sync::atomic::Ordering::Relaxed) {
                    return match result {
                        // Another node owns the chain: post it there, where it follows the chain.
                        Err(e) if self.inner.shared && is_fenced(&e) && posted.is_none() => {
                            self.post_change(tenant, &row.run_id, change).await
                        }
                        other => other,
                    };
                }
                match result {
                    Ok(()) | Err(Error::NotRunning(_)) | Err(Error::NotFound { .. }) => {}
                    Err(e) => {
                        if self.take_chain_change(&key, id).is_some() {
                            return Err(e);
                        }
                    }
                }
            }
        }
        Err(not_recorded(workflow_id))
    }

    /// Takes a change waiting for the chain `key` out, unless a transaction took it already.
    fn take_chain_change(&self, key: &(String, String), id: u64) -> Option<ChainChange> {
        let mut pending = lock(&self.inner.chain_changes);
        let list = pending.get_mut(key)?;
        let pos = list.iter().position(|c| c.id == id)?;
        let c = list.remove(pos);
        if list.is_empty() {
            pending.remove(key);
        }
        self.inner.chain_pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Some(c)
    }

    /// Takes every change waiting for the chain of `workflow_id` (for a transaction of one of
    /// its runs). Costs one atomic load while none waits.
    pub(crate) fn take_chain_changes(&self, tenant: &str, workflow_id: &str) -> Vec<ChainChange> {
        if self.inner.chain_pending.load(std::sync::atomic::Ordering::Relaxed) == 0 || workflow_id.is_empty() {
            return Vec::new();
        }
        let mut pending = lock(&self.inner.chain_changes);
        let taken = pending.remove(&(tenant.to_string(), workflow_id.to_string())).unwrap_or_default();
        self.inner.chain_pending.fetch_sub(taken.len(), std::sync::atomic::Ordering::Relaxed);
        taken
    }

    /// Evaluates a query: `state` (built in) or one declared in the definition.
    pub async fn query(&self, tenant: &str, workflow_id: &str, name: &str) -> Result<Value> {
        let row = self.get_execution(tenant, workflow_id, None).await?;
        let (_, def) = self.definition(tenant, &row.workflow, Some(&row.version)).await?;
        let events = self.inner.store.history(tenant, &row.run_id, 0, usize::MAX).await?;
        let st = ExecState::from_history(&events);
        let ctx = st.query_context();
        if name == "state" {
            return Ok(sluice_core::expr::from_val(&ctx));
        }
        let expr: Expr =
            def.queries.get(name).ok_or_else(|| Error::NotFound { what: "query", id: name.to_string() })?.clone();
        // Any reader may call a query, again and again: it runs under the same limits as a step,
        // on the evaluation threads.
        let out = self.inner.eval.run(move || expr.eval(ctx)).await?;
        out.map_err(|e| Error::invalid(format!("queries.{name}"), e.to_string()))
    }

    /// Takes a dead-lettered execution out of the queue and retries its failed step.
    pub async fn redrive(&self, tenant: &str, workflow_id: &str) -> Result<String> {
        let row = self.get_execution(tenant, workflow_id, None).await?;
        if !row.dead_letter {
            return Err(Error::Conflict(format!("execution `{workflow_id}` is not in the dead-letter queue")));
        }
        self.forget_result(tenant, workflow_id);
        self.announce_restart(tenant, workflow_id);
        self.change_run(tenant, &row.run_id, RunChange::Redrive).await?;
        Ok(row.run_id)
    }

    /// Makes a change only a run's owner may make: here when this node owns the run (or may take
    /// it), otherwise posted in the store for the owner to apply.
    async fn change_run(&self, tenant: &str, run_id: &str, change: RunChange) -> Result<()> {
        match self.apply_change(tenant, run_id, change.clone(), None).await {
            Err(e) if self.inner.shared && is_fenced(&e) => self.post_change(tenant, run_id, change).await,
            other => other,
        }
    }

    /// Posts a change in the store for the node that owns the run.
    async fn post_change(&self, tenant: &str, run_id: &str, change: RunChange) -> Result<()> {
        if self.inner.store.post_change(tenant, run_id, &new_id(), change).await? {
            self.inner.counters.changes_posted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(run_id, "change posted for the node that owns the run");
            Ok(())
        } else {
            Err(Error::NotFound { what: "execution", id: run_id.to_string() })
        }
    }

    /// Applies a change to a run this node owns; `posted`: the id of the posted change it is,
    /// removed in the same batch.
    pub(crate) async fn apply_change(
        &self,
        tenant: &str,
        run_id: &str,
        change: RunChange,
        posted: Option<String>,
    ) -> Result<()> {
        let redrive = matches!(change, RunChange::Redrive);
        let make = move |st: &ExecState| {
            let events = change_events(change, st);
            // A buffered signal stays with the run: it counts against what the run may hold.
            for e in &events {
                if let EventKind::SignalReceived { payload, .. } = e {
                    let size = sluice_core::state::json_size(payload);
                    if st.bytes.saturating_add(size) > st.limits.max_run_bytes {
                        return Err(Error::TooLarge {
                            what: format!("the execution's held values with this signal ({} + {size} bytes)", st.bytes),
                            size: st.bytes + size,
                            limit: st.limits.max_run_bytes,
                            setting: "max run size",
                        });
                    }
                }
            }
            Ok(events)
        };
        self.advance_any(tenant, run_id, make, txn::Extra::default().with_change(posted), redrive).await
    }

    async fn running_row(&self, tenant: &str, workflow_id: &str) -> Result<ExecutionRow> {
        let row = self.get_execution(tenant, workflow_id, None).await?;
        if row.status.is_terminal() {
            return Err(Error::NotRunning(workflow_id.to_string()));
        }
        Ok(row)
    }

    // ---- workers ----

    /// Long-polls a queue for up to `max` tasks.
    pub async fn poll(
        &self,
        tenant: &str,
        queue: &str,
        worker: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<TaskInfo>> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        tracing::trace!(worker, queue, "poll");
        let max_queues = self.inner.opts.max_queues_per_tenant;
        if !lock(&self.inner.tasks).admits(tenant, queue, max_queues) {
            return Err(Error::TooManyQueues { limit: max_queues });
        }
        if self.inner.shared {
            return self.poll_shared(tenant, queue, worker, max.clamp(1, 1000), deadline).await;
        }
        loop {
            let (got, notify) = {
                let mut t = lock(&self.inner.tasks);
                let got = t.take(tenant, queue, max.clamp(1, 1000), now_ms());
                let notify = got.is_empty().then(|| t.notifier(tenant, queue));
                (got, notify)
            };
            let Some(notify) = notify else { return Ok(handed_out(&got, worker)) };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check: a task may have arrived between the take and the registration.
            let got = lock(&self.inner.tasks).take(tenant, queue, max.clamp(1, 1000), now_ms());
            if !got.is_empty() {
                return Ok(handed_out(&got, worker));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                () = self.stopped() => return Ok(Vec::new()),
            }
        }
    }

    pub async fn complete(&self, tenant: &str, token: &str, output: Value) -> Result<()> {
        if self.inner.shared {
            return self.answer_shared(tenant, token, sluice_store::TaskOutcome::Completed { output }).await;
        }
        let row = self.claim(tenant, token)?;
        self.finish_task(row, Some(output), None).await
    }

    pub async fn fail(&self, tenant: &str, token: &str, error: ErrorInfo, retryable: bool) -> Result<()> {
        if self.inner.shared {
            return self.answer_shared(tenant, token, sluice_store::TaskOutcome::Failed { error, retryable }).await;
        }
        let row = self.claim(tenant, token)?;
        self.finish_task(row, None, Some((error, retryable))).await
    }

    /// Records a heartbeat; returns whether the worker should stop (the run ended or the task
    /// is no longer current).
    pub async fn heartbeat(&self, tenant: &str, token: &str) -> Result<bool> {
        {
            let mut t = lock(&self.inner.tasks);
            match t.get(token) {
                Some(e) if e.row.tenant == tenant && (!self.inner.shared || t.is_leased(token)) => {
                    return Ok(!t.heartbeat(token, now_ms()));
                }
                _ if !self.inner.shared => return Ok(true),
                _ => {}
            }
        }
        // Claimed from the shared queue, here or on another node: its limits live in the store.
        Ok(!self.inner.store.heartbeat_task(tenant, token, now_ms()).await?)
    }

    fn claim(&self, tenant: &str, token: &str) -> Result<TaskRow> {
        let mut t = lock(&self.inner.tasks);
        match t.get(token) {
            Some(e) if e.row.tenant == tenant => {}
            _ => return Err(Error::TaskNotFound(token.to_string())),
        }
        t.remove(token).map(|e| e.row).ok_or_else(|| Error::TaskNotFound(token.to_string()))
    }

    /// Records the outcome of a task. The task was removed from the table by the caller; if the
    /// commit fails it is put back so the worker can retry.
    pub(crate) async fn finish_task(
        &self,
        row: TaskRow,
        output: Option<Value>,
        failure: Option<(ErrorInfo, bool)>,
    ) -> Result<()> {
        self.finish_task_with(row, output, failure, Ledger::default()).await
    }

    /// [`Engine::finish_task`] with the ledger rows of the gateway calls the task made, committed
    /// in the same batch as its outcome (or alone if the execution has ended meanwhile).
    pub(crate) async fn finish_task_with(
        &self,
        row: TaskRow,
        output: Option<Value>,
        failure: Option<(ErrorInfo, bool)>,
        ledger: Ledger,
    ) -> Result<()> {
        // With shared queues a worker task's row must still be pending: an answer posted on
        // another node, or a timeout, may have come first.
        let settle = (self.inner.shared && row.kind == sluice_core::event::TaskKind::Worker)
            .then(|| sluice_store::Settle { task_id: row.id.clone(), posted: false });
        self.finish_task_settling(row, output, failure, ledger, settle, true).await
    }

    /// [`Engine::finish_task_with`] that also settles a task of the shared queue (see
    /// [`sluice_store::Batch::settles`]). `leased`: the task was handed out from this node's
    /// memory (not claimed in the store), and is put back so if the commit fails.
    pub(crate) async fn finish_task_settling(
        &self,
        row: TaskRow,
        output: Option<Value>,
        failure: Option<(ErrorInfo, bool)>,
        ledger: Ledger,
        settle: Option<sluice_store::Settle>,
        leased: bool,
    ) -> Result<()> {
        let shared = settle.is_some();
        let posted = settle.as_ref().is_some_and(|s| s.posted);
        let event = match (output, failure) {
            (Some(output), _) => EventKind::TaskCompleted { step: row.step.clone(), attempt: row.attempt, output },
            (None, Some((error, retryable))) => {
                EventKind::TaskFailed { step: row.step.clone(), attempt: row.attempt, error, retryable }
            }
            (None, None) => return Err(Error::Internal("task finished without outcome".into())),
        };
        let completed = matches!(event, EventKind::TaskCompleted { .. });
        let orphan = (!ledger.is_empty()).then(|| ledger.clone());
        let extra = txn::Extra::task(&row.id).with_ledger(ledger).with_settle(settle);
        let (step, attempt, token) = (row.step.clone(), row.attempt, row.id.clone());
        let make = move |state: &ExecState| {
            // An answer to an attempt that is no longer outstanding (recorded already by a
            // commit whose acknowledgement was lost, or timed out) changes nothing.
            if !state.is_current_attempt(&step, attempt) {
                return Err(Error::TaskNotFound(token));
            }
            // An output past the run's limits fails the attempt for good instead.
            if let EventKind::TaskCompleted { step, attempt, output } = &event {
                let size = sluice_core::state::json_size(output);
                if let Some(error) = state.limits.check("the task's output", size, state.bytes) {
                    return Ok(vec![EventKind::TaskFailed {
                        step: step.clone(),
                        attempt: *attempt,
                        error,
                        retryable: false,
                    }]);
                }
            }
            Ok(vec![event])
        };
        let result = self.advance(&row.tenant, &row.run_id, make, extra).await;
        match result {
            Ok(()) => {
                let counters = &self.inner.counters;
                let c = if completed { &counters.tasks_completed } else { &counters.tasks_failed };
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if posted {
                    counters.outcomes_applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
            // The execution ended while the task ran: the calls were still made and paid for.
            Err(Error::NotRunning(_)) | Err(Error::NotFound { .. }) => match orphan {
                Some(ledger) => self.record_usage(ledger).await,
                None => Ok(()),
            },
            // Its outcome was recorded before (by a commit whose answer was lost, by another
            // node, by a timeout): nothing to put back, but what its calls cost is still owed.
            Err(e) if is_settled(&e) || matches!(e, Error::TaskNotFound(_)) => {
                lock(&self.inner.tasks).drop_task(&row.id);
                if let Some(ledger) = orphan {
                    self.record_usage(ledger).await?;
                }
                Err(e)
            }
            Err(e) => {
                let now = now_ms();
                let mut t = lock(&self.inner.tasks);
                let slot = if shared && !leased {
                    tasks::Slot::Shared
                } else {
                    tasks::Slot::Leased(tasks::Lease {
                        deadline_ms: now + row.start_to_close_ms as i64,
                        heartbeat_deadline_ms: None,
                    })
                };
                t.restore(tasks::Entry { slot, row });
                Err(e)
            }
        }
    }
}

/// Whether `e` is the store refusing to record a task's outcome because one was recorded already.
pub fn is_settled(e: &Error) -> bool {
    matches!(e, Error::Conflict(m) if m.contains("no longer pending"))
}

fn not_recorded(workflow_id: &str) -> Error {
    Error::Conflict(format!("the change to `{workflow_id}` was not recorded; retry"))
}

/// The events a change makes on a run in the state `st`.
pub(crate) fn change_events(change: RunChange, st: &ExecState) -> Vec<EventKind> {
    match change {
        RunChange::Signal { name, payload } => match name.as_str() {
            "pause" if st.paused => vec![],
            "pause" => vec![EventKind::ExecutionPaused],
            "resume" if !st.paused => vec![],
            "resume" => vec![EventKind::ExecutionResumed],
            "cancel" => vec![EventKind::ExecutionCancelled {
                reason: payload.get("reason").and_then(Value::as_str).map(str::to_string),
            }],
            _ => vec![EventKind::SignalReceived { name, payload }],
        },
        RunChange::Cancel { reason } => vec![EventKind::ExecutionCancelled { reason }],
        RunChange::Redrive if st.dead_letter && st.status == sluice_core::ExecStatus::Failed => {
            vec![EventKind::ExecutionRedriven]
        }
        // Redriven meanwhile (a change posted twice): nothing to do.
        RunChange::Redrive => vec![],
    }
}

/// The refusal of a start whose `workflow_id` belongs to a run the caller may not see: the
/// same as for an id in use, and naming nothing of that run.
fn id_taken(workflow_id: &str) -> Error {
    Error::Conflict(format!("workflow id `{workflow_id}` is not available; choose another"))
}

/// Whether `e` is the store refusing a change to an execution another node owns.
pub fn is_fenced(e: &Error) -> bool {
    matches!(e, Error::Conflict(m) if m.contains("fenced"))
}

/// The tasks a poll hands out, each logged (at debug) in its own task span.
fn handed_out(rows: &[TaskRow], worker: &str) -> Vec<TaskInfo> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        for row in rows {
            let _span = trace::task_span(row).entered();
            tracing::debug!(worker, queue = %row.queue, "task handed to a worker");
        }
    }
    rows.iter().map(TaskInfo::from).collect()
}

/// The time of a publication: now, but later than the previous one of this process, so that two
/// publications within a millisecond keep their order (the latest version is the one published
/// last).
fn publish_time() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = now_ms();
    let prev = LAST.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    if prev < now {
        return now;
    }
    LAST.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

/// The version id of a canonical definition: 12 hex digits of its FNV-1a 64 hash pair.
fn content_hash(text: &str) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for byte in text.bytes() {
        a ^= u64::from(byte);
        a = a.wrapping_mul(0x0100_0000_01b3);
        b = b.rotate_left(5) ^ u64::from(byte);
        b = b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    format!("{:016x}", a ^ b.rotate_left(32))[..12].to_string()
}
