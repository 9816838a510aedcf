//! `decide`: given a definition and the state of a run, produce the next events.
//!
//! Architecture invariant: `decide` is a pure function of its arguments. Time comes from the last
//! applied event, jitter from a hash, results from events. Running it again over the same history
//! yields the same events, which is what replay checks.

use jaq_json::Val;
use serde_json::Value;

use crate::def::{OnTimeout, Step, StepKind, WorkflowDef};
use crate::error::ErrorInfo;
use crate::event::{Event, EventKind, TaskKind};
use crate::expr::{from_val, to_val, Expr, ExprError};
use crate::retry::{RetryPolicy, DEFAULT_START_TO_CLOSE};
use crate::state::{json_size, ExecState, ExecStatus, StepStatus};

/// Produces the events that follow from `st`, applying each to `st` as it goes. Returns nothing
/// when the run is finished, paused or waiting on the world.
pub fn decide(def: &WorkflowDef, st: &mut ExecState) -> Vec<Event> {
    decide_until_yield(def, st).events
}

/// What [`decide_until_yield`] decided.
#[derive(Debug, Default)]
pub struct Decided {
    /// The events decided, already applied to the state.
    pub events: Vec<Event>,
    /// An expression needed more than the thread's limits allow in place
    /// ([`crate::expr::EvalLimits::yield_on_limit`]): `decide` must run again on the state as it
    /// now is, with the full limits. The events so far stand; that evaluation left no trace.
    pub yielded: bool,
    /// The step whose expression yielded (`None`: the workflow's `output`).
    pub yield_step: Option<String>,
}

/// `decide` that stops where an expression yields instead of recording a limit. Deciding again
/// over the updated state goes on from there: `decide` is a function of the state, and the
/// events before the yield are part of it.
pub fn decide_until_yield(def: &WorkflowDef, st: &mut ExecState) -> Decided {
    if st.status != ExecStatus::Running || st.paused || st.run_id.is_empty() {
        return Decided::default();
    }
    let mut d = Decider { def, st, out: Vec::new(), yield_step: None };
    let root = Scope { prefix: String::new(), item: None };
    let mut yielded = false;
    match d.seq(&def.steps, &root) {
        Flow::Done(last) => {
            let output = match &def.output {
                Some(e) => e.eval(d.st.context("", None)),
                None => Ok(from_val(&last)),
            };
            match output {
                Ok(output) => d.emit(EventKind::ExecutionCompleted { output }),
                Err(ExprError::Yield) => yielded = true,
                Err(e) => d.emit(EventKind::ExecutionFailed {
                    error: expr_error("output", &e),
                    step: None,
                    dead_letter: true,
                }),
            }
        }
        Flow::Failed(error, step) => d.emit(EventKind::ExecutionFailed { error, step: Some(step), dead_letter: true }),
        Flow::Yield => yielded = true,
        Flow::Pending | Flow::Ended => {}
    }
    let yield_step = if yielded { d.yield_step } else { None };
    Decided { events: d.out, yielded, yield_step }
}

enum Flow {
    /// The sequence finished; the value is the output of its last step.
    Done(Val),
    Pending,
    /// A step failed for good.
    Failed(ErrorInfo, String),
    /// The run ended (return, fail, continue_as_new).
    Ended,
    /// An expression yielded ([`ExprError::Yield`]): stop here, decide again with full limits.
    Yield,
}

struct Scope {
    prefix: String,
    item: Option<(Val, usize)>,
}

impl Scope {
    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }
}

struct Decider<'a> {
    def: &'a WorkflowDef,
    st: &'a mut ExecState,
    out: Vec<Event>,
    /// The step whose expression yielded.
    yield_step: Option<String>,
}

fn expr_error(what: &str, e: &ExprError) -> ErrorInfo {
    ErrorInfo::new(e.kind(), format!("{what}: {e}"))
}

impl Decider<'_> {
    fn emit(&mut self, kind: EventKind) {
        let at = self.st.last_at_ms;
        let e = self.st.push(kind, at);
        self.out.push(e);
    }

    fn ctx(&self, scope: &Scope) -> Val {
        self.st.context(&scope.prefix, scope.item.as_ref().map(|(v, i)| (v, *i)))
    }

    fn eval(&self, e: &Expr, scope: &Scope) -> Result<Value, ExprError> {
        e.eval(self.ctx(scope))
    }

    /// Fails the step with an expression's error, or stops deciding when the expression yielded.
    fn expr_failed(&mut self, key: &str, what: &str, e: ExprError) -> Flow {
        if e == ExprError::Yield {
            self.yield_step = Some(key.to_string());
            return Flow::Yield;
        }
        self.fail_step(key, expr_error(what, &e))
    }

    fn fail_step(&mut self, key: &str, error: ErrorInfo) -> Flow {
        self.emit(EventKind::StepFailed { step: key.to_string(), error: error.clone() });
        Flow::Failed(error, key.to_string())
    }

    fn seq(&mut self, steps: &[Step], scope: &Scope) -> Flow {
        let mut last = Val::Null;
        for step in steps {
            match self.step(step, scope) {
                Flow::Done(v) => last = v,
                other => return other,
            }
        }
        Flow::Done(last)
    }

    fn step(&mut self, step: &Step, scope: &Scope) -> Flow {
        let key = scope.key(&step.id);
        let status = self.st.steps.get(&key).map(|s| s.status);
        match status {
            None => {
                if let Some(cond) = &step.when {
                    match cond.eval_bool(self.ctx(scope)) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.emit(EventKind::StepSkipped { step: key });
                            return Flow::Done(Val::Null);
                        }
                        Err(e) => return self.expr_failed(&key, "when", e),
                    }
                }
                self.start(step, scope, &key)
            }
            Some(StepStatus::Completed | StepStatus::Skipped) => {
                let output = self.st.steps.get(&key).map(|s| to_val(&s.output)).unwrap_or_default();
                Flow::Done(output)
            }
            Some(StepStatus::Failed) => {
                let error = self.st.steps.get(&key).and_then(|s| s.error.clone());
                Flow::Failed(error.unwrap_or_else(|| ErrorInfo::new("failed", "step failed")), key)
            }
            Some(StepStatus::Scheduled | StepStatus::AttemptFailed | StepStatus::Running) => {
                self.progress(step, scope, &key)
            }
        }
    }

    fn retry_policy(&self, step: &Step) -> RetryPolicy {
        step.retry.clone().or_else(|| self.def.retry.clone()).unwrap_or_default()
    }

    fn schedule_task(&mut self, step: &Step, scope: &Scope, key: &str, attempt: u32, delay_ms: u64) -> Flow {
        let timeouts = step.timeouts.clone().or_else(|| self.def.timeouts.clone()).unwrap_or_default();
        let (task, queue, input) = match &step.kind {
            StepKind::Task(t) => {
                let input = match &t.input {
                    Some(e) => self.eval(e, scope),
                    None => Ok(self.st.input.clone()),
                };
                (TaskKind::Worker, t.queue.clone(), input)
            }
            StepKind::Http(h) => (TaskKind::Http, String::new(), self.http_request(h, scope)),
            StepKind::Llm(l) => (TaskKind::Llm, String::new(), self.llm_request(l, scope)),
            _ => return Flow::Pending,
        };
        let input = match input {
            Ok(v) => v,
            Err(e) => return self.expr_failed(key, "input", e),
        };
        if let Some(error) = self.st.limits.check_held("the task's input", json_size(&input), self.st.bytes) {
            return self.fail_step(key, error);
        }
        self.emit(EventKind::TaskScheduled {
            step: key.to_string(),
            attempt,
            task,
            queue,
            input,
            delay_ms,
            schedule_to_start_ms: timeouts.schedule_to_start.map(|d| d.as_millis()),
            start_to_close_ms: timeouts.start_to_close.unwrap_or(DEFAULT_START_TO_CLOSE).as_millis(),
            heartbeat_ms: timeouts.heartbeat.map(|d| d.as_millis()),
        });
        Flow::Pending
    }

    fn http_request(&self, h: &crate::def::HttpStep, scope: &Scope) -> Result<Value, ExprError> {
        let url = h.url.eval_string(self.ctx(scope))?;
        let mut headers = serde_json::Map::new();
        for (name, e) in &h.headers {
            headers.insert(name.clone(), Value::String(e.eval_string(self.ctx(scope))?));
        }
        let body = match &h.body {
            Some(e) => self.eval(e, scope)?,
            None => Value::Null,
        };
        Ok(serde_json::json!({"method": h.method, "url": url, "headers": headers, "body": body}))
    }

    /// The gateway call of an `llm` step: `{route, precision, messages, max_tokens?,
    /// temperature?, schema?}`, all expressions evaluated, so the task carries no jq.
    fn llm_request(&self, l: &crate::def::LlmStep, scope: &Scope) -> Result<Value, ExprError> {
        let messages = match (&l.prompt, &l.messages) {
            (Some(prompt), _) => {
                let mut m = Vec::with_capacity(2);
                if let Some(system) = &l.system {
                    m.push(serde_json::json!({"role": "system", "content": system.eval_string(self.ctx(scope))?}));
                }
                m.push(serde_json::json!({"role": "user", "content": prompt.eval_string(self.ctx(scope))?}));
                Value::Array(m)
            }
            (None, Some(messages)) => self.eval(messages, scope)?,
            (None, None) => Value::Array(Vec::new()),
        };
        let mut req = serde_json::json!({"route": l.route, "precision": l.precision, "messages": messages});
        if let Some(n) = l.max_tokens {
            req["max_tokens"] = n.into();
        }
        if let Some(t) = l.temperature {
            req["temperature"] = t.into();
        }
        if let Some(schema) = &l.schema {
            req["schema"] = schema.clone();
        }
        Ok(req)
    }

    fn start_child(&mut self, step: &Step, scope: &Scope, key: &str, attempt: u32) -> Flow {
        let StepKind::Child(c) = &step.kind else { return Flow::Pending };
        let input = match &c.input {
            Some(e) => self.eval(e, scope),
            None => Ok(self.st.input.clone()),
        };
        let input = match input {
            Ok(v) => v,
            Err(e) => return self.expr_failed(key, "input", e),
        };
        // Child ids stay within the workflow id alphabet: `parent.step`, `parent.map-3.step`.
        let mut workflow_id =
            format!("{}.{}", self.st.workflow_id, key.replace('/', ".").replace('[', "-").replace(']', ""));
        if attempt > 1 {
            workflow_id.push_str(&format!(".attempt-{attempt}"));
        }
        self.emit(EventKind::ChildStarted {
            step: key.to_string(),
            attempt,
            workflow: c.workflow.clone(),
            workflow_id,
            input,
        });
        Flow::Pending
    }

    fn start(&mut self, step: &Step, scope: &Scope, key: &str) -> Flow {
        match &step.kind {
            StepKind::Task(_) | StepKind::Http(_) | StepKind::Llm(_) => self.schedule_task(step, scope, key, 1, 0),
            StepKind::Child(_) => self.start_child(step, scope, key, 1),
            StepKind::Transform(t) => match self.eval(&t.expr, scope) {
                Ok(output) => {
                    let size = json_size(&output);
                    if let Some(error) = self.st.limits.check("the step's output", size, self.st.bytes) {
                        return self.fail_step(key, error);
                    }
                    let val = to_val(&output);
                    self.emit(EventKind::StepCompleted { step: key.to_string(), output });
                    Flow::Done(val)
                }
                Err(e) => self.expr_failed(key, "expr", e),
            },
            StepKind::Switch(sw) => {
                let mut chosen = sw.cases.len();
                for (i, case) in sw.cases.iter().enumerate() {
                    match case.when.eval_bool(self.ctx(scope)) {
                        Ok(true) => {
                            chosen = i;
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => return self.expr_failed(key, &format!("cases[{i}].when"), e),
                    }
                }
                self.emit(EventKind::BranchChosen { step: key.to_string(), branch: chosen });
                self.progress(step, scope, key)
            }
            StepKind::Parallel(_) => {
                self.emit(EventKind::StepStarted { step: key.to_string() });
                self.progress(step, scope, key)
            }
            StepKind::Map(m) => match self.eval(&m.items, scope) {
                Ok(Value::Array(items)) if items.len() > self.st.limits.max_map_items => self.fail_step(
                    key,
                    ErrorInfo::new(
                        "map.too_many_items",
                        format!(
                            "items: {} items, more than the limit of {} (max map items); split the list or \
                             use child workflows over parts of it",
                            items.len(),
                            self.st.limits.max_map_items
                        ),
                    ),
                ),
                Ok(Value::Array(items)) => {
                    let size = items.iter().map(|v| json_size(v) + 1).sum::<usize>() + 2;
                    if let Some(error) = self.st.limits.check("the list of items", size, self.st.bytes) {
                        return self.fail_step(key, error);
                    }
                    self.emit(EventKind::MapStarted { step: key.to_string(), items });
                    self.progress(step, scope, key)
                }
                Ok(other) => self.fail_step(
                    key,
                    ErrorInfo::new(
                        "expression",
                        format!("items: expected an array, got {}", crate::expr::type_name(&other)),
                    ),
                ),
                Err(e) => self.expr_failed(key, "items", e),
            },
            StepKind::Sleep(s) => {
                self.emit(EventKind::TimerStarted { step: key.to_string(), duration_ms: s.duration.as_millis() });
                Flow::Pending
            }
            StepKind::WaitSignal(w) => {
                self.emit(EventKind::SignalWaitStarted {
                    step: key.to_string(),
                    signal: w.signal.clone(),
                    timeout_ms: w.timeout.map(|d| d.as_millis()),
                });
                self.progress(step, scope, key)
            }
            StepKind::ContinueAsNew(c) => {
                let input = match &c.input {
                    Some(e) => self.eval(e, scope),
                    None => Ok(self.st.input.clone()),
                };
                match input {
                    Ok(input) => {
                        self.emit(EventKind::ExecutionContinuedAsNew { input });
                        Flow::Ended
                    }
                    Err(e) => self.expr_failed(key, "input", e),
                }
            }
            StepKind::Fail(f) => {
                let message = match &f.message {
                    Some(e) => match self.eval(e, scope) {
                        Ok(Value::String(s)) => s,
                        Ok(other) => other.to_string(),
                        Err(e) => return self.expr_failed(key, "message", e),
                    },
                    None => format!("workflow failed at step `{key}`"),
                };
                self.emit(EventKind::ExecutionFailed {
                    error: ErrorInfo::new(f.error.clone(), message),
                    step: Some(key.to_string()),
                    dead_letter: false,
                });
                Flow::Ended
            }
            StepKind::Return(r) => {
                let output = match &r.output {
                    Some(e) => self.eval(e, scope),
                    None => Ok(Value::Null),
                };
                match output {
                    Ok(output) => {
                        self.emit(EventKind::ExecutionCompleted { output });
                        Flow::Ended
                    }
                    Err(e) => self.expr_failed(key, "output", e),
                }
            }
        }
    }

    /// Moves a step that has already started: retries, signal matching, container progress.
    fn progress(&mut self, step: &Step, scope: &Scope, key: &str) -> Flow {
        let Some(s) = self.st.steps.get(key) else { return Flow::Pending };
        let status = s.status;
        match &step.kind {
            StepKind::Task(_) | StepKind::Http(_) | StepKind::Llm(_) | StepKind::Child(_) => {
                if status != StepStatus::AttemptFailed {
                    return Flow::Pending;
                }
                let (attempt, base, retryable) = (s.attempt, s.attempt_base, s.retryable);
                let error = s.error.clone().unwrap_or_else(|| ErrorInfo::new("failed", "attempt failed"));
                let policy = self.retry_policy(step);
                if !policy.should_retry(attempt - base.min(attempt), &error.kind, retryable) {
                    return self.fail_step(key, error);
                }
                let delay = if attempt == base {
                    0 // the first attempt after a redrive goes at once
                } else {
                    policy.delay_ms(attempt - base, &format!("{}/{key}/{attempt}", self.st.run_id))
                };
                if matches!(step.kind, StepKind::Child(_)) {
                    self.start_child(step, scope, key, attempt + 1)
                } else {
                    self.schedule_task(step, scope, key, attempt + 1, delay)
                }
            }
            StepKind::Sleep(_) => {
                if status == StepStatus::AttemptFailed {
                    return self.start(step, scope, key);
                }
                Flow::Pending
            }
            StepKind::WaitSignal(w) => {
                if status == StepStatus::AttemptFailed {
                    return self.start(step, scope, key);
                }
                let timed_out = s.timed_out;
                let found = self.st.signals.iter().find(|sig| sig.name == w.signal).map(|sig| sig.seq);
                if let Some(signal_seq) = found {
                    self.emit(EventKind::SignalConsumed { step: key.to_string(), signal_seq });
                    let output = self.st.steps.get(key).map(|s| to_val(&s.output)).unwrap_or_default();
                    return Flow::Done(output);
                }
                if timed_out {
                    return match w.on_timeout {
                        OnTimeout::Continue => {
                            self.emit(EventKind::StepCompleted { step: key.to_string(), output: Value::Null });
                            Flow::Done(Val::Null)
                        }
                        OnTimeout::Fail => self.fail_step(
                            key,
                            ErrorInfo::new("timeout.signal", format!("no `{}` signal arrived in time", w.signal)),
                        ),
                    };
                }
                Flow::Pending
            }
            StepKind::Switch(sw) => {
                if status == StepStatus::AttemptFailed {
                    return self.start(step, scope, key);
                }
                let branch = s.branch.unwrap_or(sw.cases.len());
                let steps = sw.cases.get(branch).map(|c| c.steps.as_slice()).unwrap_or(&sw.default);
                {
                    let inner = self.seq(steps, scope);
                    self.finish_container(key, inner)
                }
            }
            StepKind::Parallel(p) => {
                if status == StepStatus::AttemptFailed {
                    return self.start(step, scope, key);
                }
                let mut outputs = Vec::with_capacity(p.branches.len());
                let mut pending = false;
                for (name, steps) in &p.branches {
                    match self.seq(steps, scope) {
                        Flow::Done(v) => outputs.push((Val::utf8_str(name.clone().into_bytes()), v)),
                        Flow::Pending => pending = true,
                        failed @ Flow::Failed(..) => return self.finish_container(key, failed),
                        Flow::Ended => return Flow::Ended,
                        Flow::Yield => return Flow::Yield,
                    }
                }
                if pending {
                    return Flow::Pending;
                }
                self.finish_container(key, Flow::Done(Val::obj(outputs.into_iter().collect())))
            }
            StepKind::Map(m) => {
                if status == StepStatus::AttemptFailed {
                    return self.start(step, scope, key);
                }
                let items: Vec<Val> = s.items.iter().map(to_val).collect();
                let mut started = s.started_iterations;
                let limit = m.max_concurrency.unwrap_or(10) as usize;
                let mut outputs: Vec<Option<Val>> = vec![None; items.len()];
                let mut running = 0usize;
                let mut i = 0usize;
                while i < items.len() {
                    if i >= started {
                        if running >= limit {
                            break;
                        }
                        self.emit(EventKind::MapIterationStarted { step: key.to_string(), index: i });
                        started = i + 1;
                    }
                    let inner = Scope { prefix: format!("{key}[{i}]/"), item: Some((items[i].clone(), i)) };
                    match self.seq(&m.steps, &inner) {
                        Flow::Done(v) => outputs[i] = Some(v),
                        Flow::Pending => running += 1,
                        failed @ Flow::Failed(..) => return self.finish_container(key, failed),
                        Flow::Ended => return Flow::Ended,
                        Flow::Yield => return Flow::Yield,
                    }
                    i += 1;
                }
                if outputs.iter().all(Option::is_some) {
                    let arr: Val = outputs.into_iter().flatten().collect();
                    return self.finish_container(key, Flow::Done(arr));
                }
                Flow::Pending
            }
            StepKind::Transform(_) | StepKind::ContinueAsNew(_) | StepKind::Fail(_) | StepKind::Return(_) => {
                // These finish within one decision; after a redrive they simply run again.
                self.start(step, scope, key)
            }
        }
    }

    fn finish_container(&mut self, key: &str, inner: Flow) -> Flow {
        match inner {
            Flow::Done(v) => {
                self.emit(EventKind::StepCompleted { step: key.to_string(), output: from_val(&v) });
                Flow::Done(v)
            }
            Flow::Failed(error, inner) => {
                self.emit(EventKind::StepFailed { step: key.to_string(), error: error.clone() });
                // Report the innermost step: that is where the user has to look.
                Flow::Failed(error, inner)
            }
            other => other,
        }
    }
}
