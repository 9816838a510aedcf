//! The state of one execution run: a pure fold of its history.

use std::collections::HashMap;

use jaq_json::Val;
use serde::Serialize;
use serde_json::Value;

use crate::error::ErrorInfo;
use crate::event::{Event, EventKind, ParentRef, RunAccess};
use crate::expr::{obj, to_val};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    #[default]
    Running,
    Completed,
    Failed,
    Cancelled,
    ContinuedAsNew,
}

impl ExecStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::ContinuedAsNew => "continued_as_new",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "continued_as_new" => Self::ContinuedAsNew,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Handed to the world: a task, a timer, a child or a signal wait is outstanding.
    Scheduled,
    /// The last attempt failed; `decide` retries or gives up.
    AttemptFailed,
    /// A container (switch, parallel, map) whose inner steps are under way.
    Running,
    Completed,
    Skipped,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepState {
    pub status: StepStatus,
    pub attempt: u32,
    /// Attempts made before the last redrive; retry limits count from here.
    #[serde(skip_serializing_if = "is_zero")]
    pub attempt_base: u32,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub output: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(skip)]
    pub retryable: bool,
    #[serde(skip)]
    pub container: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<usize>,
    #[serde(skip)]
    pub items: Vec<Value>,
    #[serde(skip)]
    pub started_iterations: usize,
    #[serde(skip)]
    pub signal: Option<String>,
    #[serde(skip)]
    pub timed_out: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl StepState {
    fn new(status: StepStatus) -> Self {
        Self {
            status,
            attempt: 0,
            attempt_base: 0,
            output: Value::Null,
            error: None,
            retryable: true,
            container: false,
            branch: None,
            items: Vec::new(),
            started_iterations: 0,
            signal: None,
            timed_out: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BufferedSignal {
    pub seq: u64,
    pub name: String,
    pub payload: Value,
}

/// What one run may hold. `decide` fails a step whose output (or map list) passes a limit, and
/// the engine refuses inputs, signals and task outputs that would; the run stays within its
/// bytes, so a hostile or careless workflow cannot take the node's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Largest output one step may record, as JSON bytes.
    pub max_output_bytes: usize,
    /// Most bytes of values (input, outputs, signal payloads, map lists) one run may hold.
    pub max_run_bytes: usize,
    /// Most items a `map` step may iterate over.
    pub max_map_items: usize,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { max_output_bytes: 1024 * 1024, max_run_bytes: 64 * 1024 * 1024, max_map_items: 10_000 }
    }
}

impl RunLimits {
    /// The error for a value of `size` bytes about to be held by a run already holding `held`,
    /// if it passes a limit. `what` names the value in the message.
    pub fn check(&self, what: &str, size: usize, held: usize) -> Option<crate::ErrorInfo> {
        if size > self.max_output_bytes {
            return Some(crate::ErrorInfo::new(
                "step.output_too_large",
                format!(
                    "{what} is {size} bytes of JSON, more than the limit of {} (max output size)",
                    self.max_output_bytes
                ),
            ));
        }
        self.check_held(what, size, held)
    }

    /// [`RunLimits::check`] of the bytes a run holds only (for values that are not outputs).
    pub fn check_held(&self, what: &str, size: usize, held: usize) -> Option<crate::ErrorInfo> {
        if held.saturating_add(size) > self.max_run_bytes {
            return Some(crate::ErrorInfo::new(
                "execution.too_large",
                format!(
                    "{what} ({size} bytes) would take the execution past its limit of {} bytes held (max run size); \
                     continue as new to start over with a fresh history",
                    self.max_run_bytes
                ),
            ));
        }
        None
    }
}

/// The length of `v` written as compact JSON, near enough (strings are not escaped), without
/// writing it.
pub fn json_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => 4 + usize::from(!b),
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|x| json_size(x) + 1).sum::<usize>(),
        Value::Object(o) => 2 + o.iter().map(|(k, x)| k.len() + 4 + json_size(x)).sum::<usize>(),
    }
}

/// Bytes counted for any event beside the values it carries.
const EVENT_OVERHEAD: usize = 64;

/// Everything `decide` and queries need to know about a run.
#[derive(Debug, Clone, Default)]
pub struct ExecState {
    pub workflow: String,
    pub version: String,
    pub workflow_id: String,
    pub run_id: String,
    pub input: Value,
    pub parent: Option<ParentRef>,
    /// Trace id of the request that started the execution (`None` in older histories).
    pub trace_id: Option<String>,
    /// How many runs came before this one in its `continue_as_new` chain.
    pub chain: u64,
    /// Who started the run and who may reach it.
    pub access: RunAccess,
    pub status: ExecStatus,
    pub paused: bool,
    /// Step state by instance key: the step id, prefixed by `map[i]/` inside map iterations.
    pub steps: HashMap<String, StepState>,
    pub signals: Vec<BufferedSignal>,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub failed_step: Option<String>,
    pub dead_letter: bool,
    /// Input of the next run after `continue_as_new`.
    pub continue_input: Option<Value>,
    /// Sequence number the next event gets.
    pub next_seq: u64,
    /// Time of the last event applied; events produced by `decide` carry it.
    pub last_at_ms: i64,
    /// Bytes of the values the run holds (its input, outputs, signal payloads, map lists) and a
    /// little per event: what [`RunLimits::max_run_bytes`] bounds, and the weight of the run in
    /// the engine's cache.
    pub bytes: usize,
    /// The limits `decide` applies; set by the engine, the defaults elsewhere.
    pub limits: RunLimits,
    pub(crate) input_val: Val,
    /// Finished step outputs as jq values, by scope prefix then step id.
    pub(crate) scopes: HashMap<String, Vec<(String, Val)>>,
}

impl ExecState {
    pub fn new() -> Self {
        Self { next_seq: 1, ..Self::default() }
    }

    /// Folds a whole history.
    pub fn from_history<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut st = Self::new();
        for e in events {
            st.apply(e);
        }
        st
    }

    /// Applies a stored event.
    pub fn apply(&mut self, event: &Event) {
        self.next_seq = event.seq + 1;
        self.last_at_ms = event.at_ms;
        self.apply_kind(&event.kind, event.seq);
    }

    /// Records a new event at the end of the history and applies it.
    pub fn push(&mut self, kind: EventKind, at_ms: i64) -> Event {
        let event = Event { seq: self.next_seq, at_ms, kind };
        self.apply(&event);
        event
    }

    fn step_mut(&mut self, key: &str, status: StepStatus) -> &mut StepState {
        self.steps.entry(key.to_string()).or_insert_with(|| StepState::new(status))
    }

    fn finish_step(&mut self, key: &str, status: StepStatus, output: Value) {
        let val = to_val(&output);
        let st = self.step_mut(key, status);
        st.status = status;
        st.output = output;
        st.error = None;
        let (prefix, id) = split_key(key);
        let scope = self.scopes.entry(prefix.to_string()).or_default();
        match scope.iter_mut().find(|(k, _)| k == id) {
            Some(slot) => slot.1 = val,
            None => scope.push((id.to_string(), val)),
        }
    }

    fn apply_kind(&mut self, kind: &EventKind, seq: u64) {
        use EventKind as E;
        self.bytes += EVENT_OVERHEAD
            + match kind {
                E::ExecutionStarted { input, .. } | E::TaskScheduled { input, .. } | E::ChildStarted { input, .. } => {
                    json_size(input)
                }
                E::TaskCompleted { output, .. }
                | E::ChildCompleted { output, .. }
                | E::StepCompleted { output, .. } => json_size(output),
                E::SignalReceived { payload, .. } => json_size(payload),
                E::MapStarted { items, .. } => items.iter().map(|v| json_size(v) + 1).sum(),
                _ => 0,
            };
        match kind {
            E::ExecutionStarted {
                workflow,
                version,
                workflow_id,
                run_id,
                input,
                parent,
                trace_id,
                chain,
                access,
                ..
            } => {
                self.chain = *chain;
                self.workflow = workflow.clone();
                self.version = version.clone();
                self.workflow_id = workflow_id.clone();
                self.run_id = run_id.clone();
                self.input = input.clone();
                self.input_val = to_val(input);
                self.parent = parent.clone();
                self.trace_id = trace_id.clone();
                self.access = access.clone();
                self.status = ExecStatus::Running;
            }
            E::TaskScheduled { step, attempt, .. } | E::ChildStarted { step, attempt, .. } => {
                let st = self.step_mut(step, StepStatus::Scheduled);
                st.status = StepStatus::Scheduled;
                st.attempt = *attempt;
                st.error = None;
            }
            E::TaskCompleted { step, attempt, output } | E::ChildCompleted { step, attempt, output } => {
                if self.is_current_attempt(step, *attempt) {
                    self.finish_step(step, StepStatus::Completed, output.clone());
                }
            }
            E::TaskFailed { step, attempt, error, retryable } => {
                if self.is_current_attempt(step, *attempt) {
                    let st = self.step_mut(step, StepStatus::AttemptFailed);
                    st.status = StepStatus::AttemptFailed;
                    st.error = Some(error.clone());
                    st.retryable = *retryable;
                }
            }
            E::ChildFailed { step, attempt, error } => {
                if self.is_current_attempt(step, *attempt) {
                    let st = self.step_mut(step, StepStatus::AttemptFailed);
                    st.status = StepStatus::AttemptFailed;
                    st.error = Some(error.clone());
                    st.retryable = true;
                }
            }
            E::TimerStarted { step, .. } => {
                let st = self.step_mut(step, StepStatus::Scheduled);
                st.status = StepStatus::Scheduled;
            }
            E::TimerFired { step } => {
                let Some(st) = self.steps.get_mut(step) else { return };
                if st.status != StepStatus::Scheduled {
                    return;
                }
                if st.signal.is_some() {
                    st.timed_out = true;
                } else {
                    self.finish_step(step, StepStatus::Completed, Value::Null);
                }
            }
            E::SignalReceived { name, payload } => {
                self.signals.push(BufferedSignal { seq, name: name.clone(), payload: payload.clone() });
            }
            E::SignalWaitStarted { step, signal, .. } => {
                let st = self.step_mut(step, StepStatus::Scheduled);
                st.status = StepStatus::Scheduled;
                st.signal = Some(signal.clone());
                st.timed_out = false;
                st.error = None;
            }
            E::SignalConsumed { step, signal_seq } => {
                if let Some(pos) = self.signals.iter().position(|s| s.seq == *signal_seq) {
                    let sig = self.signals.remove(pos);
                    self.finish_step(step, StepStatus::Completed, sig.payload);
                }
            }
            E::StepStarted { step } => {
                let st = self.step_mut(step, StepStatus::Running);
                st.status = StepStatus::Running;
                st.container = true;
            }
            E::StepSkipped { step } => self.finish_step(step, StepStatus::Skipped, Value::Null),
            E::StepCompleted { step, output } => self.finish_step(step, StepStatus::Completed, output.clone()),
            E::StepFailed { step, error } | E::StepAborted { step, error } => {
                let st = self.step_mut(step, StepStatus::Failed);
                st.status = StepStatus::Failed;
                st.error = Some(error.clone());
            }
            E::BranchChosen { step, branch } => {
                let st = self.step_mut(step, StepStatus::Running);
                st.status = StepStatus::Running;
                st.container = true;
                st.branch = Some(*branch);
            }
            E::MapStarted { step, items } => {
                let st = self.step_mut(step, StepStatus::Running);
                st.status = StepStatus::Running;
                st.container = true;
                st.items = items.clone();
            }
            E::MapIterationStarted { step, index } => {
                let st = self.step_mut(step, StepStatus::Running);
                st.started_iterations = st.started_iterations.max(index + 1);
            }
            E::ExecutionCompleted { output } => {
                self.status = ExecStatus::Completed;
                self.output = Some(output.clone());
            }
            E::ExecutionFailed { error, step, dead_letter } => {
                self.status = ExecStatus::Failed;
                self.error = Some(error.clone());
                self.failed_step = step.clone();
                self.dead_letter = *dead_letter;
            }
            E::ExecutionAborted { error } => {
                self.status = ExecStatus::Failed;
                self.error = Some(error.clone());
            }
            E::ExecutionContinuedAsNew { input } => {
                self.status = ExecStatus::ContinuedAsNew;
                self.continue_input = Some(input.clone());
            }
            E::ExecutionCancelled { reason } => {
                self.status = ExecStatus::Cancelled;
                self.error = Some(crate::error::ErrorInfo::new(
                    "cancelled",
                    reason.clone().unwrap_or_else(|| "execution cancelled".into()),
                ));
            }
            E::ExecutionPaused => self.paused = true,
            E::ExecutionResumed => self.paused = false,
            E::ExecutionRedriven => {
                self.status = ExecStatus::Running;
                self.error = None;
                self.failed_step = None;
                self.dead_letter = false;
                for st in self.steps.values_mut() {
                    if st.status == StepStatus::Failed {
                        if st.container {
                            st.status = StepStatus::Running;
                        } else {
                            st.status = StepStatus::AttemptFailed;
                            st.attempt_base = st.attempt;
                            st.retryable = true;
                        }
                        st.error = None;
                    }
                }
            }
        }
    }

    /// Whether `attempt` of `step` is outstanding, so that its outcome still counts.
    pub fn is_current_attempt(&self, step: &str, attempt: u32) -> bool {
        self.steps.get(step).is_some_and(|s| s.status == StepStatus::Scheduled && s.attempt == attempt)
    }

    /// The jq context for expressions evaluated in the scope `prefix` (empty at the top level,
    /// `map[3]/` inside an iteration): `{input, steps, item, index}`.
    pub fn context(&self, prefix: &str, item: Option<(&Val, usize)>) -> Val {
        let mut steps: Vec<(Val, Val)> = Vec::new();
        // Outer scopes first so inner outputs shadow nothing (ids are unique) but stay visible.
        let mut chain = vec![""];
        let mut pos = 0;
        while let Some(i) = prefix[pos..].find('/') {
            pos += i + 1;
            chain.push(&prefix[..pos]);
        }
        for p in chain {
            if let Some(scope) = self.scopes.get(p) {
                for (id, v) in scope {
                    steps.push((Val::utf8_str(id.clone().into_bytes()), v.clone()));
                }
            }
        }
        let mut fields = vec![("input", self.input_val.clone()), ("steps", Val::obj(steps.into_iter().collect()))];
        if let Some((item, index)) = item {
            fields.push(("item", item.clone()));
            fields.push(("index", Val::from(index)));
        }
        obj(fields)
    }

    /// The context queries see: the top-level context plus `status`.
    pub fn query_context(&self) -> Val {
        let mut steps: Vec<(Val, Val)> = Vec::new();
        for (prefix, scope) in &self.scopes {
            for (id, v) in scope {
                steps.push((Val::utf8_str(format!("{prefix}{id}").into_bytes()), v.clone()));
            }
        }
        obj([
            ("input", self.input_val.clone()),
            ("steps", Val::obj(steps.into_iter().collect())),
            ("status", Val::utf8_str(self.status.as_str().as_bytes().to_vec())),
            ("paused", Val::Bool(self.paused)),
        ])
    }
}

/// Splits `a[1]/b[2]/id` into (`a[1]/b[2]/`, `id`).
pub fn split_key(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => (&key[..=i], &key[i + 1..]),
        None => ("", key),
    }
}
