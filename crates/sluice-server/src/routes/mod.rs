//! HTTP handlers, one module per resource. Handlers are thin: parse, call the engine, map.

pub mod chat;
pub mod executions;
pub mod identity;
pub mod oidc;
pub mod ops;
pub mod sharing;
pub mod tasks;
pub mod usage;
pub mod workflows;

use serde_json::{json, Value};
use sluice_store::ExecutionRow;

/// The tenant of a server with authentication off, and the one `sluice dev` creates.
pub const DEFAULT_TENANT: &str = "default";

/// The API view of an execution.
pub fn execution_json(r: &ExecutionRow) -> Value {
    json!({
        "workflow_id": r.workflow_id,
        "run_id": r.run_id,
        "workflow": r.workflow,
        "version": r.version,
        "status": r.status.as_str(),
        "paused": r.paused,
        "dead_letter": r.dead_letter,
        "input": r.input,
        "output": r.output,
        "error": r.error,
        "failed_step": r.failed_step,
        "parent": r.parent,
        "owner": r.access.owner,
        "visibility": r.access.visibility.as_str(),
        "history_length": r.next_seq.saturating_sub(1),
        "created_at_ms": r.created_at_ms,
        "updated_at_ms": r.updated_at_ms,
    })
}
