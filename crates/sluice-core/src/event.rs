//! History events. An execution's history is an append-only list of these; its state is a pure
//! fold of them. Persisted as JSON with a `type` tag: renaming a variant or a field breaks stored
//! histories, and the fixtures test in `tests/` catches it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorInfo;

/// Version of the persisted event format, stored with every history.
pub const EVENT_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Position in the history, from 1, without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the event was recorded.
    pub at_ms: i64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Which execution started a child, and from which step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ParentRef {
    pub workflow_id: String,
    pub run_id: String,
    pub step: String,
    /// Attempt of the parent's child step that started this execution.
    #[serde(default = "one")]
    pub attempt: u32,
}

fn one() -> u32 {
    1
}

/// Who may see an execution besides what its workflow's sharing allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Every member of the tenant who reaches its workflow.
    #[default]
    Tenant,
    /// Only its owner and the tenant's owners and admins.
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Private => "private",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tenant" => Some(Self::Tenant),
            "private" => Some(Self::Private),
            _ => None,
        }
    }
}

/// The principal an execution acts for and who may reach it, fixed when it starts; its children
/// and the runs it continues as inherit it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunAccess {
    /// Who started it: `user:<email>` or `key:<api key id>`; `None` on a server without
    /// authentication. Its `llm` steps are charged to this principal's budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "is_tenant")]
    pub visibility: Visibility,
    /// The workflows of the executions that started this one (a child's ancestors), outermost
    /// first: whoever reaches the run must reach each of them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
}

fn is_tenant(v: &Visibility) -> bool {
    *v == Visibility::Tenant
}

impl RunAccess {
    /// Nothing recorded: stored as before owners existed.
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// The access of a child started by a run of `workflow` with this access: the same owner
    /// and visibility, and `workflow` added to the scope.
    pub fn for_child(&self, workflow: &str) -> Self {
        let mut scope = self.scope.clone();
        if !scope.iter().any(|w| w == workflow) {
            scope.push(workflow.to_string());
        }
        Self { owner: self.owner.clone(), visibility: self.visibility, scope }
    }

    /// The API key id of the owner, when a key started the run.
    pub fn api_key(&self) -> Option<&str> {
        self.owner.as_deref().and_then(|o| o.strip_prefix("key:"))
    }
}

/// What kind of work a scheduled task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Done by an external worker polling the queue.
    Worker,
    /// An HTTP request made by the engine itself.
    Http,
    /// A chat call through the AI gateway, made by the engine itself.
    Llm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    // Events that arrive from outside `decide`.
    ExecutionStarted {
        workflow: String,
        version: String,
        workflow_id: String,
        run_id: String,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<ParentRef>,
        /// The run this one continues, for `continue_as_new`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continued_from: Option<String>,
        /// W3C trace id (32 lowercase hex digits) of the request that started the execution;
        /// children and continued runs inherit it. Absent in histories older than trace ids.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_id: Option<String>,
        /// How many runs came before this one in its `continue_as_new` chain (0 for the first).
        #[serde(default, skip_serializing_if = "is_zero")]
        chain: u64,
        /// Who started the execution and who may reach it; children and continued runs inherit
        /// it. Absent in histories older than owners, and for runs started without one.
        #[serde(default, skip_serializing_if = "RunAccess::is_unset")]
        access: RunAccess,
    },
    TaskCompleted {
        step: String,
        attempt: u32,
        output: Value,
    },
    TaskFailed {
        step: String,
        attempt: u32,
        error: ErrorInfo,
        retryable: bool,
    },
    TimerFired {
        step: String,
    },
    SignalReceived {
        name: String,
        payload: Value,
    },
    ChildCompleted {
        step: String,
        attempt: u32,
        output: Value,
    },
    ChildFailed {
        step: String,
        attempt: u32,
        error: ErrorInfo,
    },
    ExecutionPaused,
    ExecutionResumed,
    ExecutionCancelled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    ExecutionRedriven,
    /// The engine failed a step without running it again: its processing crashed the node too
    /// often (`engine.quarantined`).
    StepAborted {
        step: String,
        error: ErrorInfo,
    },
    /// The engine ended the run with an error before it took a step: it would have made its
    /// `continue_as_new` chain longer than the server allows (`engine.chain_too_long`).
    ExecutionAborted {
        error: ErrorInfo,
    },

    // Events produced by `decide`.
    TaskScheduled {
        step: String,
        attempt: u32,
        task: TaskKind,
        /// Queue for worker tasks; empty for engine-run tasks.
        queue: String,
        input: Value,
        /// Wait this long before the task becomes visible (retry backoff).
        delay_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schedule_to_start_ms: Option<u64>,
        start_to_close_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u64>,
    },
    StepStarted {
        step: String,
    },
    StepSkipped {
        step: String,
    },
    StepCompleted {
        step: String,
        output: Value,
    },
    StepFailed {
        step: String,
        error: ErrorInfo,
    },
    BranchChosen {
        step: String,
        branch: usize,
    },
    MapStarted {
        step: String,
        items: Vec<Value>,
    },
    MapIterationStarted {
        step: String,
        index: usize,
    },
    TimerStarted {
        step: String,
        duration_ms: u64,
    },
    SignalWaitStarted {
        step: String,
        signal: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    SignalConsumed {
        step: String,
        signal_seq: u64,
    },
    ChildStarted {
        step: String,
        attempt: u32,
        workflow: String,
        workflow_id: String,
        input: Value,
    },
    ExecutionCompleted {
        output: Value,
    },
    ExecutionFailed {
        error: ErrorInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
        /// Whether the failure parks the execution in the dead-letter queue.
        dead_letter: bool,
    },
    ExecutionContinuedAsNew {
        input: Value,
    },
}

impl EventKind {
    /// Whether `decide` produces this event (as opposed to the world delivering it).
    pub fn is_decision(&self) -> bool {
        !matches!(
            self,
            Self::ExecutionStarted { .. }
                | Self::TaskCompleted { .. }
                | Self::TaskFailed { .. }
                | Self::TimerFired { .. }
                | Self::SignalReceived { .. }
                | Self::ChildCompleted { .. }
                | Self::ChildFailed { .. }
                | Self::ExecutionPaused
                | Self::ExecutionResumed
                | Self::ExecutionCancelled { .. }
                | Self::ExecutionRedriven
                | Self::StepAborted { .. }
                | Self::ExecutionAborted { .. }
        )
    }

    /// Whether this event ends the run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::ExecutionCompleted { .. }
                | Self::ExecutionFailed { .. }
                | Self::ExecutionContinuedAsNew { .. }
                | Self::ExecutionCancelled { .. }
                | Self::ExecutionAborted { .. }
        )
    }

    /// The snake_case name of the variant, as stored in the `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ExecutionStarted { .. } => "execution_started",
            Self::TaskCompleted { .. } => "task_completed",
            Self::TaskFailed { .. } => "task_failed",
            Self::TimerFired { .. } => "timer_fired",
            Self::SignalReceived { .. } => "signal_received",
            Self::ChildCompleted { .. } => "child_completed",
            Self::ChildFailed { .. } => "child_failed",
            Self::ExecutionPaused => "execution_paused",
            Self::ExecutionResumed => "execution_resumed",
            Self::ExecutionCancelled { .. } => "execution_cancelled",
            Self::ExecutionRedriven => "execution_redriven",
            Self::StepAborted { .. } => "step_aborted",
            Self::ExecutionAborted { .. } => "execution_aborted",
            Self::TaskScheduled { .. } => "task_scheduled",
            Self::StepStarted { .. } => "step_started",
            Self::StepSkipped { .. } => "step_skipped",
            Self::StepCompleted { .. } => "step_completed",
            Self::StepFailed { .. } => "step_failed",
            Self::BranchChosen { .. } => "branch_chosen",
            Self::MapStarted { .. } => "map_started",
            Self::MapIterationStarted { .. } => "map_iteration_started",
            Self::TimerStarted { .. } => "timer_started",
            Self::SignalWaitStarted { .. } => "signal_wait_started",
            Self::SignalConsumed { .. } => "signal_consumed",
            Self::ChildStarted { .. } => "child_started",
            Self::ExecutionCompleted { .. } => "execution_completed",
            Self::ExecutionFailed { .. } => "execution_failed",
            Self::ExecutionContinuedAsNew { .. } => "execution_continued_as_new",
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
