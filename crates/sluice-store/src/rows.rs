//! The rows the store persists. These are boundary types: the engine builds them, backends map
//! them to tables.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::event::{ParentRef, RunAccess, TaskKind, Visibility};
use sluice_core::{ErrorInfo, Event, ExecStatus};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowVersion {
    pub name: String,
    /// Content hash of the canonical definition.
    pub version: String,
    /// Canonical JSON of the definition.
    pub definition: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSummary {
    pub name: String,
    pub latest_version: String,
    pub versions: u64,
    pub updated_at_ms: i64,
}

/// The summary row of one execution run; the history is the truth, this is its index.
/// `workflow_id`, `workflow`, `version`, `input`, `parent`, `access` and `created_at_ms` are
/// written when the run is created; later commits update only the other fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionRow {
    pub run_id: String,
    pub workflow_id: String,
    pub workflow: String,
    pub version: String,
    pub status: ExecStatus,
    pub paused: bool,
    pub dead_letter: bool,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub failed_step: Option<String>,
    pub parent: Option<ParentRef>,
    /// Who started the run and who may reach it (as in its `ExecutionStarted` event).
    pub access: RunAccess,
    /// Sequence number of the next event; `next_seq - 1` events are stored.
    pub next_seq: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A unit of work waiting for a worker (or for the engine, for HTTP steps).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    /// `run_id/step/attempt`: also the task token and the idempotency key.
    pub id: String,
    pub tenant: String,
    pub queue: String,
    pub kind: TaskKind,
    pub run_id: String,
    pub workflow_id: String,
    pub step: String,
    pub attempt: u32,
    pub input: Value,
    pub visible_at_ms: i64,
    pub schedule_to_start_ms: Option<u64>,
    pub start_to_close_ms: u64,
    pub heartbeat_ms: Option<u64>,
    pub created_at_ms: i64,
    /// Trace id of the execution (32 lowercase hex digits); `None` for tasks stored before
    /// trace ids were.
    pub trace_id: Option<String>,
}

impl TaskRow {
    pub fn make_id(run_id: &str, step: &str, attempt: u32) -> String {
        format!("{run_id}/{step}/{attempt}")
    }
}

/// A durable timer: a sleep, a signal timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub tenant: String,
    pub run_id: String,
    pub workflow_id: String,
    pub step: String,
    pub fire_at_ms: i64,
}

/// One execution's part of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecChange {
    pub tenant: String,
    /// The summary after the events are applied.
    pub row: ExecutionRow,
    /// New events; their `seq` must continue the stored history without a gap.
    pub events: Vec<Event>,
    /// A new run: fails with `AlreadyRunning` if one with the same workflow id is running.
    pub create: bool,
    /// The fencing epoch of the node writing (see [`crate::Store::register_node`]): a new run
    /// is owned by it, and a change to a run owned by another epoch fails with `Conflict`, so a
    /// node that lost its lease can never append again. `None` writes without a fence.
    pub fence: Option<i64>,
}

/// Everything one engine decision changes, applied atomically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub execs: Vec<ExecChange>,
    pub add_tasks: Vec<TaskRow>,
    /// Task ids.
    pub remove_tasks: Vec<String>,
    pub add_timers: Vec<TimerRow>,
    /// `(run_id, step)` pairs.
    pub remove_timers: Vec<(String, String)>,
    /// Ledger rows of AI gateway calls, journaled with the result they paid for.
    pub usage: Vec<UsageRow>,
    /// Budget alerts; one with the key of a stored alert is ignored.
    pub alerts: Vec<BudgetAlertRow>,
    /// Worker tasks whose outcome this batch records, on a store with shared queues (see
    /// [`crate::Store::shared_queues`]): each must still be pending, else the batch fails with
    /// `Conflict`, so a task's outcome is recorded once whichever node answers first.
    pub settles: Vec<Settle>,
    /// Ids of posted changes (see [`crate::Store::post_change`]) this batch applies: each must
    /// still be posted, else the batch fails with `Conflict`, so a change is applied once.
    pub applied_changes: Vec<String>,
}

/// A change to a run that only its owner may make, posted by another node for it to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum RunChange {
    Signal { name: String, payload: Value },
    Cancel { reason: Option<String> },
    Redrive,
}

/// A posted [`RunChange`], as its owner reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct PostedChange {
    /// Unique (made by the poster).
    pub id: String,
    pub tenant: String,
    pub run_id: String,
    pub change: RunChange,
}

/// A task a batch records the outcome of (see [`Batch::settles`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub task_id: String,
    /// The outcome recorded is the one a node posted (it must be there); otherwise it was
    /// decided by the writer (a worker's answer to it, a timeout) and none may have been posted.
    pub posted: bool,
}

/// What a worker answered for a task, posted by the node that received it for the node that
/// owns the execution to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TaskOutcome {
    Completed { output: Value },
    Failed { error: ErrorInfo, retryable: bool },
}

/// A wake-up one node sends all (itself included) through the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// `n` worker tasks were added to a queue (or became visible).
    Tasks { tenant: String, queue: String, n: u32 },
    /// An outcome was posted for a run owned by `epoch`.
    Outcome { epoch: i64 },
    /// Run `run_id` of `workflow_id` ended.
    Ended { tenant: String, workflow_id: String, run_id: String },
    /// `workflow_id` runs again (a start of an ended workflow id, a redrive): a result a node
    /// remembers for it is stale.
    Restarted { tenant: String, workflow_id: String },
    /// Wake-ups may have been missed (the listening connection was lost): look at everything.
    Resync,
}

impl Wake {
    /// The wire form: a JSON array (`["t", tenant, queue, n]`, `["o", epoch]`, `["e", tenant,
    /// workflow_id, run_id]`).
    pub fn encode(&self) -> String {
        let v = match self {
            Wake::Tasks { tenant, queue, n } => serde_json::json!(["t", tenant, queue, n]),
            Wake::Outcome { epoch } => serde_json::json!(["o", epoch]),
            Wake::Ended { tenant, workflow_id, run_id } => serde_json::json!(["e", tenant, workflow_id, run_id]),
            Wake::Restarted { tenant, workflow_id } => serde_json::json!(["s", tenant, workflow_id]),
            Wake::Resync => serde_json::json!(["r"]),
        };
        v.to_string()
    }

    /// Reads the wire form; `None` for anything else.
    pub fn decode(text: &str) -> Option<Wake> {
        let v: Vec<Value> = serde_json::from_str(text).ok()?;
        let s = |i: usize| v.get(i).and_then(Value::as_str).map(str::to_string);
        match v.first()?.as_str()? {
            "t" => Some(Wake::Tasks {
                tenant: s(1)?,
                queue: s(2)?,
                n: v.get(3).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok())?,
            }),
            "o" => Some(Wake::Outcome { epoch: v.get(1)?.as_i64()? }),
            "e" => Some(Wake::Ended { tenant: s(1)?, workflow_id: s(2)?, run_id: s(3)? }),
            "s" => Some(Wake::Restarted { tenant: s(1)?, workflow_id: s(2)? }),
            "r" => Some(Wake::Resync),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Wake;

    #[test]
    fn wake_ups_round_trip_and_unknown_ones_are_ignored() {
        let (t, w) = (|s: &str| s.to_string(), "order-7");
        for wake in [
            Wake::Tasks { tenant: t("acme"), queue: t("q"), n: 3 },
            Wake::Outcome { epoch: 42 },
            Wake::Ended { tenant: t("acme"), workflow_id: t(w), run_id: t("r1") },
            Wake::Restarted { tenant: t("acme"), workflow_id: t(w) },
            Wake::Resync,
        ] {
            assert_eq!(Wake::decode(&wake.encode()), Some(wake));
        }
        for bad in ["", "[]", "[\"x\"]", "[\"t\", \"acme\"]", "[\"o\", \"7\"]", "{}"] {
            assert_eq!(Wake::decode(bad), None, "{bad}");
        }
    }
}

/// Ready worker tasks of one queue (see [`crate::Store::queue_depths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub tenant: String,
    pub queue: String,
    /// Visible and not claimed.
    pub ready: u64,
    /// When the oldest of them became visible.
    pub oldest_visible_ms: i64,
}

/// Where wake-ups are delivered.
pub type WakeSink = std::sync::Arc<dyn Fn(Wake) + Send + Sync>;

/// Why a claimed task is past its time (see [`crate::Store::expired_tasks`]).
pub fn timeout_kind(claimed: bool, heartbeat_expired: bool) -> &'static str {
    match (claimed, heartbeat_expired) {
        (false, _) => "timeout.schedule_to_start",
        (true, true) => "timeout.heartbeat",
        (true, false) => "timeout.start_to_close",
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.execs.is_empty()
            && self.add_tasks.is_empty()
            && self.remove_tasks.is_empty()
            && self.add_timers.is_empty()
            && self.remove_timers.is_empty()
            && self.usage.is_empty()
            && self.alerts.is_empty()
            && self.settles.is_empty()
            && self.applied_changes.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionFilter {
    pub workflow: Option<String>,
    pub workflow_id: Option<String>,
    pub status: Option<ExecStatus>,
    /// Only executions parked in the dead-letter queue.
    pub dead_letter: bool,
    /// Leave out executions of these workflows (those shared without the caller), and those
    /// whose scope (the workflows of their ancestors) holds one of them.
    pub hidden_workflows: Vec<String>,
    /// When set, leave out private executions owned by anyone else than this principal
    /// (`user:<email>`, `key:<id>`); `None` lists them all.
    pub viewer: Option<String>,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    pub limit: usize,
}

/// What one caller may see of its tenant's executions, as [`ExecutionFilter`] applies it to
/// listings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sight {
    /// Workflows the caller does not reach.
    pub hidden_workflows: Vec<String>,
    /// The caller, when it sees only its own private executions; `None` sees them all.
    pub viewer: Option<String>,
}

impl Sight {
    /// Whether the caller sees `row` at all.
    pub fn sees(&self, row: &ExecutionRow) -> bool {
        let hidden = |w: &String| self.hidden_workflows.contains(w);
        if hidden(&row.workflow) || row.access.scope.iter().any(hidden) {
            return false;
        }
        match (&self.viewer, row.access.visibility) {
            (Some(me), Visibility::Private) => row.access.owner.as_ref() == Some(me),
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Rows a page holds when a filter asks for `requested`: 0 means 100, and at most 1,000.
pub fn page_limit(requested: usize) -> usize {
    match requested {
        0 => 100,
        n => n.min(1_000),
    }
}

impl<T> Page<T> {
    /// A page out of the rows of a listing that fetched one more than `limit`, newest first: the
    /// extra row says another page follows, whose cursor is `key` of this page's last row.
    pub fn from_fetched(mut items: Vec<T>, limit: usize, key: impl Fn(&T) -> &String) -> Self {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| key(r).clone())
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// One upstream attempt of an AI gateway call, in the usage ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Unique and time-ordered (made by the caller); the ledger's order and cursor.
    pub id: String,
    pub tenant: String,
    pub at_ms: i64,
    /// The API key the call was made with, if any.
    pub api_key: Option<String>,
    /// What made the call: `llm_step` or `chat`.
    pub source: String,
    pub route: String,
    pub target: String,
    pub provider: String,
    pub model: String,
    pub attempt: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// USD; `None` when the price table has no price for the model.
    pub cost_usd: Option<f64>,
    pub latency_us: u64,
    /// `success`, `http_429`, `timeout`, `circuit_open`, ...
    pub outcome: String,
    pub experiment: Option<String>,
    pub arm: Option<String>,
    pub run_id: Option<String>,
    pub workflow_id: Option<String>,
    pub step: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFilter {
    pub run_id: Option<String>,
    pub api_key: Option<String>,
    pub since_ms: Option<i64>,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    pub limit: usize,
}

/// Sums over ledger rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct UsageTotal {
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

/// A budget crossed its soft or hard limit in one period. `(tenant, budget, period_start_ms,
/// level)` is its key: each is recorded once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetAlertRow {
    pub tenant: String,
    pub budget: String,
    pub period_start_ms: i64,
    /// `soft` or `hard`.
    pub level: String,
    pub limit_usd: f64,
    pub spent_usd: f64,
    pub at_ms: i64,
}

/// A small JSON document of the identity directory (tenants, users, API keys, signing keys,
/// shares): read often, written rarely, cached by its owner. `(tenant, kind, id)` is its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub tenant: String,
    pub kind: String,
    pub id: String,
    pub body: Value,
    /// Bumped by every write; 0 means "not stored yet" in a write (create only).
    pub version: i64,
    pub updated_at_ms: i64,
}

/// One line of the audit log: who did what, to what, when and from where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Unique and time-ordered (made by the caller); the log's order and cursor.
    pub id: String,
    pub tenant: String,
    pub at_ms: i64,
    /// `user:<email>`, `key:<id>` or `anonymous`.
    pub actor: String,
    /// The actor's role, when known.
    pub role: Option<String>,
    /// What was done, e.g. `POST /v1/executions` or `auth.login`.
    pub action: String,
    /// What it was done to: a request path or an object id.
    pub target: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The client's address.
    pub source_ip: Option<String>,
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub since_ms: Option<i64>,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    pub limit: usize,
}
