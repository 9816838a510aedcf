//! The storage boundary of Sluice: the `Store` trait family every backend implements, the one
//! `StoreError` they return, the rows they persist, and the conformance suite (`store_suite!`)
//! that each backend instantiates so that all of them behave the same.
//!
//! Architecture invariant: every call names its tenant; a backend never returns rows of another
//! tenant. Backends store what they are given: ids and timestamps are made by the engine.

mod rows;
mod sharded;
pub mod suite;

use std::future::Future;
use std::pin::Pin;

pub use rows::*;
pub use sharded::ShardedStore;

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A boxed future, so that `Store` can be used as `Arc<dyn Store>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// An execution with this workflow id is already running; carries its run id.
    #[error("an execution with this workflow id is already running (run {0})")]
    AlreadyRunning(String),
    /// Optimistic concurrency: the history moved on since it was read.
    #[error("history conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached or written; retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
}

/// Persistence of workflows, executions, histories, tasks and timers.
///
/// `commit` is the only write path of the engine: one `Batch` is applied atomically and is
/// durable (fsynced) when the future resolves `Ok`. Backends may group concurrent batches into
/// one transaction, but a failing batch must not fail the others.
pub trait Store: Send + Sync + 'static {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<()>>;

    /// Stores a workflow version. Returns false when that exact version already existed: its
    /// definition stays, and it takes the later `created_at_ms` of the two (the latest version is
    /// the one published last, also when it was published before).
    fn put_workflow(&self, tenant: &str, version: WorkflowVersion) -> BoxFuture<'_, Result<bool>>;
    /// A version by hash, or the latest version when `version` is `None`.
    fn get_workflow(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<WorkflowVersion>>>;
    /// One summary per workflow name, ordered by name.
    fn list_workflows(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<WorkflowSummary>>>;
    /// Every version of a workflow, newest first.
    fn list_versions(&self, tenant: &str, name: &str) -> BoxFuture<'_, Result<Vec<WorkflowVersion>>>;

    /// A run by id, or the latest run of `workflow_id` when `run_id` is `None`.
    fn get_execution(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<ExecutionRow>>>;
    fn get_run(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<ExecutionRow>>>;
    /// Newest first, filtered, with keyset pagination.
    fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> BoxFuture<'_, Result<Page<ExecutionRow>>>;
    /// How many runs of the tenant are running (of one workflow when given): for concurrency
    /// limits.
    fn count_running(&self, tenant: &str, workflow: Option<&str>) -> BoxFuture<'_, Result<u64>>;
    /// Events of a run with `seq > after`, at most `limit`, in order.
    fn history(
        &self,
        tenant: &str,
        run_id: &str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<sluice_core::Event>>>;

    /// Every pending task, for rebuilding queues at start.
    fn load_tasks(&self) -> BoxFuture<'_, Result<Vec<TaskRow>>>;
    /// Every pending timer, for rebuilding the timer wheel at start.
    fn load_timers(&self) -> BoxFuture<'_, Result<Vec<TimerRow>>>;
    /// The pending tasks and timers of one run of `tenant`, for bringing the engine's memory back
    /// in line with the store after a commit whose outcome it could not learn.
    fn run_work(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<(Vec<TaskRow>, Vec<TimerRow>)>>;

    /// Ledger rows, newest first, with keyset pagination.
    fn list_usage(&self, tenant: &str, filter: UsageFilter) -> BoxFuture<'_, Result<Page<UsageRow>>>;
    /// Sums of the ledger rows of a tenant (of one API key when given) since `since_ms`.
    fn usage_total(&self, tenant: &str, api_key: Option<&str>, since_ms: i64) -> BoxFuture<'_, Result<UsageTotal>>;
    /// Budget alerts of a tenant, newest first.
    fn list_alerts(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<BudgetAlertRow>>>;

    /// Writes a directory document if the stored version still equals `doc.version` (0: only if
    /// absent); the stored version becomes `doc.version + 1`. Returns false, changing nothing,
    /// when another write came first.
    fn put_doc(&self, doc: Doc) -> BoxFuture<'_, Result<bool>>;
    fn get_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>>;
    /// Every document of a kind in a tenant, by id.
    fn list_docs(&self, tenant: &str, kind: &str) -> BoxFuture<'_, Result<Vec<Doc>>>;
    /// Removes a document; false when there was none.
    fn delete_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<bool>>;
    /// The one lookup across tenants: a document by a globally unique id (an API key's id,
    /// which is how a request names its tenant). Callers check what they find.
    fn find_doc(&self, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>>;

    /// Appends audit rows (each names its tenant); a row whose id is stored already is ignored.
    fn append_audit(&self, rows: Vec<AuditRow>) -> BoxFuture<'_, Result<()>>;
    /// Audit rows of a tenant, newest first, with keyset pagination.
    fn list_audit(&self, tenant: &str, filter: AuditFilter) -> BoxFuture<'_, Result<Page<AuditRow>>>;

    /// Whether the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<()>>;

    /// Registers a node process under `node` (a name unique among live nodes) and returns its
    /// fencing epoch, leased for `lease_ms`. Earlier epochs of the same name are ended: their
    /// process is gone, and the new one takes over their executions at its first `take_over`.
    fn register_node(&self, node: &str, url: Option<&str>, lease_ms: i64) -> BoxFuture<'_, Result<i64>>;
    /// The address the owner of a run advertised (`None`: no owner with a live lease, or none
    /// given), to send it what only the owner may do.
    fn owner_url(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<String>>>;
    /// Extends the lease of `epoch`; `false` when it was lost (its executions were taken over):
    /// the node must stop deciding.
    fn renew_lease(&self, epoch: i64, lease_ms: i64) -> BoxFuture<'_, Result<bool>>;
    /// Makes `epoch` the owner of every running execution whose owner holds no live lease (and
    /// of those with no owner), ending the expired leases; returns `(tenant, run_id)` of each run
    /// taken.
    fn take_over(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(String, String)>>>;

    /// Whether several nodes share this store's task queues: workers' tasks are claimed in the
    /// database (`claim_tasks`), any node accepts a worker's answer (`post_outcome`) and nodes
    /// wake each other (`listen`). Without, each node serves the tasks of its own executions
    /// from memory and the calls below are not used.
    fn shared_queues(&self) -> bool {
        false
    }

    /// How many nodes hold a live lease (this one included).
    fn live_nodes(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async { Ok(1) })
    }

    /// Hands reserved tasks to the shared queue. A worker task a node commits is reserved for
    /// that node's workers (it hands it out from memory, with no write); these are the ones its
    /// workers did not take. Returns the ids released (not those finished meanwhile) and wakes
    /// every node's pollers.
    fn release_tasks(&self, _epoch: i64, _ids: Vec<String>) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Claims up to `max` worker tasks of a queue visible at `now_ms` that nobody claimed, for
    /// `epoch`'s node, skipping tasks others are claiming at the same moment. A claim lasts the
    /// task's start-to-close limit (and its heartbeat limit, when it has one) from `now_ms`.
    fn claim_tasks(
        &self,
        _tenant: &str,
        _queue: &str,
        _max: usize,
        _now_ms: i64,
        _epoch: i64,
    ) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Extends a claimed task's heartbeat limit from `now_ms`; false when it is no longer
    /// pending (it was finished, timed out, or its run ended): the worker should stop.
    fn heartbeat_task(&self, _tenant: &str, _id: &str, _now_ms: i64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Posts a worker's answer to a claimed task for the node that owns its run to record, and
    /// wakes that node. Durable when `Ok(true)`; false (nothing posted) when the task is no
    /// longer pending or already has an answer.
    fn post_outcome(&self, _tenant: &str, _id: &str, _outcome: TaskOutcome) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Err(unshared()) })
    }

    /// The tasks of runs owned by `epoch` with a posted answer, to record.
    fn posted_outcomes(&self, _epoch: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, TaskOutcome)>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// The pending worker tasks of runs owned by `epoch` that are past a limit at `now_ms`
    /// (claimed past start-to-close or heartbeat, unclaimed past schedule-to-start), each with
    /// its [`timeout_kind`].
    fn expired_tasks(&self, _epoch: i64, _now_ms: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, &'static str)>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Posts a change for the node that owns `run_id` to apply (a signal, cancel or redrive that
    /// reached another node), and wakes it. Durable when `Ok(true)`; false when the tenant has no
    /// such run.
    fn post_change(&self, _tenant: &str, _run_id: &str, _id: &str, _change: RunChange) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Err(unshared()) })
    }

    /// The changes posted for runs owned by `epoch`, oldest first.
    fn posted_changes(&self, _epoch: i64) -> BoxFuture<'_, Result<Vec<PostedChange>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Removes a posted change its owner will not apply (its run ended); false when it was gone.
    fn drop_change(&self, _tenant: &str, _id: &str) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Worker tasks visible at `now_ms` and not claimed, per `(tenant, queue)`, with when the
    /// oldest became visible: the shared queues' depth, the same seen from every node.
    fn queue_depths(&self, _now_ms: i64) -> BoxFuture<'_, Result<Vec<QueueDepth>>> {
        Box::pin(async { Err(unshared()) })
    }

    /// Sends a wake-up to every listening node.
    fn notify(&self, wake: Wake) -> BoxFuture<'_, Result<()>> {
        self.notify_all(vec![wake])
    }

    /// Sends wake-ups to every listening node, in one round trip where the store can.
    fn notify_all(&self, _wakes: Vec<Wake>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Delivers the wake-ups every node sends (this one's included) to `sink` from now on, for
    /// as long as the store is open, reconnecting when the connection is lost (then a
    /// [`Wake::Resync`] says some may have been missed).
    fn listen(&self, _sink: WakeSink) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

fn unshared() -> StoreError {
    StoreError::Internal("this store does not share task queues between nodes".into())
}
