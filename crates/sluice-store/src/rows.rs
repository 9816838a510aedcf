//! The rows the store persists. These are boundary types: the engine builds them, backends map
//! them to tables.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::event::{ParentRef, TaskKind};
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
/// `workflow_id`, `workflow`, `version`, `input`, `parent` and `created_at_ms` are written when
/// the run is created; later commits update only the other fields.
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
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.execs.is_empty()
            && self.add_tasks.is_empty()
            && self.remove_tasks.is_empty()
            && self.add_timers.is_empty()
            && self.remove_timers.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionFilter {
    pub workflow: Option<String>,
    pub workflow_id: Option<String>,
    pub status: Option<ExecStatus>,
    /// Only executions parked in the dead-letter queue.
    pub dead_letter: bool,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}
