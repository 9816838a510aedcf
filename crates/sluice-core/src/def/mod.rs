//! The workflow definition model: what a workflow file says, after validation.
//!
//! Files are YAML or JSON. `parse` reads them by hand so that every error names the path of the
//! field and what was expected; the serde and schemars derives here describe the same format, for
//! the canonical stored form and the generated JSON Schema.

mod parse;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::duration::Duration;
use crate::expr::Expr;
use crate::retry::{RetryPolicy, Timeouts};

pub use parse::{parse_definition, parse_value, Format, MAX_DEFINITION_BYTES, MAX_STEPS};

/// A validated workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct WorkflowDef {
    /// Name of the workflow: letters, digits, `_`, `-` and `.`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Default retry policy for steps that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Default timeouts for task steps that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
    /// Result of the execution; by default the output of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Expr>,
    /// Named read-only views of a running execution, as jq over `{input, steps, status}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub queries: BTreeMap<String, Expr>,
    /// Most executions of this workflow running at once in a tenant; a start beyond it is
    /// refused with 429 until one finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_running: Option<u32>,
}

/// One step. Its `id` is unique in the whole definition; its output is `.steps.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Step {
    pub id: String,
    /// Run the step only when this jq condition holds; otherwise it is skipped with output null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Expr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(flatten)]
    pub kind: StepKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepKind {
    /// Work done by an external worker polling `queue`.
    Task(TaskStep),
    /// An HTTP request made by the engine.
    Http(HttpStep),
    /// A chat call through the AI gateway, made by the engine; its answer is journaled.
    Llm(LlmStep),
    /// A pure jq transformation, evaluated inside the engine.
    Transform(TransformStep),
    /// Runs the steps of the first case whose condition holds, else `default`.
    Switch(SwitchStep),
    /// Runs named branches concurrently; output is an object of branch outputs.
    Parallel(ParallelStep),
    /// Runs `steps` once per item of an array; output is the array of iteration outputs.
    Map(MapStep),
    /// A durable timer.
    Sleep(SleepStep),
    /// Waits for a named signal; output is the signal's payload.
    WaitSignal(WaitSignalStep),
    /// Starts another workflow and waits for its result.
    Child(ChildStep),
    /// Ends this run and starts a fresh one with a new input and an empty history.
    ContinueAsNew(ContinueAsNewStep),
    /// Fails the execution with an error type and message.
    Fail(FailStep),
    /// Completes the execution with an output.
    Return(ReturnStep),
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TaskStep {
    pub queue: String,
    /// Input handed to the worker; by default `.input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct HttpStep {
    /// GET, POST, PUT, PATCH, DELETE or HEAD.
    pub method: String,
    /// jq producing the URL string, e.g. `"https://api.example.com/items/\(.input.id)"`.
    pub url: Expr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Expr>,
    /// jq producing the JSON body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Expr>,
}

/// A chat call through one of the gateway's routes. Exactly one of `prompt` and `messages`.
/// Output: `{text, json?, model, provider, target, finish_reason, usage}`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LlmStep {
    /// The gateway route that serves the call.
    pub route: String,
    /// Served by the route's precision tier.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precision: bool,
    /// jq producing the system prompt string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Expr>,
    /// jq producing the user message string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Expr>,
    /// jq producing the whole message list: `[{role, content}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Expr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// A JSON Schema the answer must match; the answer is then parsed into `json`, with one
    /// repair call when it does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TransformStep {
    pub expr: Expr,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SwitchStep {
    pub cases: Vec<Case>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Case {
    pub when: Expr,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ParallelStep {
    pub branches: BTreeMap<String, Vec<Step>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct MapStep {
    /// jq producing the array to iterate; each iteration sees `.item` and `.index`.
    pub items: Expr,
    pub steps: Vec<Step>,
    /// How many iterations may run at once (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SleepStep {
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step fails with error type `timeout.signal`.
    #[default]
    Fail,
    /// The step completes with output null.
    Continue,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct WaitSignalStep {
    pub signal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ChildStep {
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ContinueAsNewStep {
    /// Input of the next run; by default the current input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct FailStep {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ReturnStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Expr>,
}

impl StepKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Task(_) => "task",
            Self::Http(_) => "http",
            Self::Llm(_) => "llm",
            Self::Transform(_) => "transform",
            Self::Switch(_) => "switch",
            Self::Parallel(_) => "parallel",
            Self::Map(_) => "map",
            Self::Sleep(_) => "sleep",
            Self::WaitSignal(_) => "wait_signal",
            Self::Child(_) => "child",
            Self::ContinueAsNew(_) => "continue_as_new",
            Self::Fail(_) => "fail",
            Self::Return(_) => "return",
        }
    }
}

impl WorkflowDef {
    /// The canonical stored form: JSON with fields in a fixed order.
    pub fn to_canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Finds a step anywhere in the definition by id.
    pub fn find_step(&self, id: &str) -> Option<&Step> {
        fn walk<'a>(steps: &'a [Step], id: &str) -> Option<&'a Step> {
            for s in steps {
                if s.id == id {
                    return Some(s);
                }
                let found = match &s.kind {
                    StepKind::Switch(sw) => {
                        sw.cases.iter().find_map(|c| walk(&c.steps, id)).or_else(|| walk(&sw.default, id))
                    }
                    StepKind::Parallel(p) => p.branches.values().find_map(|b| walk(b, id)),
                    StepKind::Map(m) => walk(&m.steps, id),
                    _ => None,
                };
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        walk(&self.steps, id)
    }
}
