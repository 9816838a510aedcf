//! Reading workflow files by hand, so that every problem is reported with its path.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

use super::*;
use crate::error::DefError;
use crate::expr::type_name;

/// Largest definition file accepted.
pub const MAX_DEFINITION_BYTES: usize = 1024 * 1024;
/// Most steps one definition may hold, nested steps included.
pub const MAX_STEPS: usize = 1000;
/// Signal names the engine handles itself.
pub const RESERVED_SIGNALS: &[&str] = &["pause", "resume", "cancel"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
    /// JSON when the text starts with `{`, YAML otherwise (YAML is a superset of JSON anyway).
    Auto,
}

/// Parses and validates a workflow file. Returns every problem found, each with its path.
pub fn parse_definition(text: &str, format: Format) -> Result<WorkflowDef, Vec<DefError>> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(vec![DefError::new(
            "$",
            format!("definition is {} bytes, the limit is {MAX_DEFINITION_BYTES}", text.len()),
        )]);
    }
    let is_json = match format {
        Format::Json => true,
        Format::Yaml => false,
        Format::Auto => text.trim_start().starts_with('{'),
    };
    let value: Value = if is_json {
        serde_json::from_str(text).map_err(|e| vec![DefError::new("$", format!("invalid JSON: {e}"))])?
    } else {
        serde_norway::from_str(text).map_err(|e| vec![DefError::new("$", format!("invalid YAML: {e}"))])?
    };
    parse_value(&value)
}

/// Validates a definition already read into JSON.
pub fn parse_value(value: &Value) -> Result<WorkflowDef, Vec<DefError>> {
    let mut p = Parser { errors: Vec::new(), ids: HashSet::new(), steps: 0 };
    let def = p.workflow(value);
    match def {
        Some(def) if p.errors.is_empty() => Ok(def),
        _ => {
            if p.errors.is_empty() {
                p.errors.push(DefError::new("$", "invalid definition"));
            }
            Err(p.errors)
        }
    }
}

struct Parser {
    errors: Vec<DefError>,
    ids: HashSet<String>,
    steps: usize,
}

/// An object being read: remembers which keys were consumed to report unknown ones.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

fn join(path: &str, key: &str) -> String {
    if path == "$" {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn valid_name(s: &str, max: usize, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(&c))
}

impl Parser {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.errors.push(DefError::new(path, msg));
    }

    fn obj<'a>(&mut self, v: &'a Value, path: &str) -> Option<Obj<'a>> {
        match v {
            Value::Object(map) => Some(Obj { path: path.to_string(), map, known: Vec::new() }),
            other => {
                self.err(path, format!("expected an object, got {}", type_name(other)));
                None
            }
        }
    }

    fn finish(&mut self, o: Obj<'_>) {
        for key in o.map.keys() {
            if !o.known.contains(&key.as_str()) {
                let mut known = o.known.clone();
                known.sort_unstable();
                self.err(join(&o.path, key), format!("unknown field `{key}`, expected one of: {}", known.join(", ")));
            }
        }
    }

    fn get<'a>(&mut self, o: &mut Obj<'a>, key: &'static str) -> Option<&'a Value> {
        o.known.push(key);
        o.map.get(key).filter(|v| !v.is_null())
    }

    fn req<'a>(&mut self, o: &mut Obj<'a>, key: &'static str, what: &str) -> Option<&'a Value> {
        let v = self.get(o, key);
        if v.is_none() {
            self.err(join(&o.path, key), format!("missing field, expected {what}"));
        }
        v
    }

    fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("expected a string, got {}", type_name(other)));
                None
            }
        }
    }

    fn opt_string(&mut self, o: &mut Obj<'_>, key: &'static str) -> Option<String> {
        let v = self.get(o, key)?;
        self.string(v, &join(&o.path, key))
    }

    fn req_string(&mut self, o: &mut Obj<'_>, key: &'static str) -> Option<String> {
        let v = self.req(o, key, "a string")?;
        self.string(v, &join(&o.path, key))
    }

    fn expr_of(&mut self, v: &Value, path: &str) -> Option<Expr> {
        // Numbers, booleans and null are valid jq literals: accept them as written.
        let src = match v {
            Value::String(s) => s.clone(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            other => {
                self.err(path, format!("expected a jq expression (a string), got {}", type_name(other)));
                return None;
            }
        };
        match Expr::parse(&src) {
            Ok(e) => Some(e),
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    fn opt_expr(&mut self, o: &mut Obj<'_>, key: &'static str) -> Option<Expr> {
        let v = self.get(o, key)?;
        self.expr_of(v, &join(&o.path, key))
    }

    fn req_expr(&mut self, o: &mut Obj<'_>, key: &'static str) -> Option<Expr> {
        let v = self.req(o, key, "a jq expression")?;
        self.expr_of(v, &join(&o.path, key))
    }

    fn duration_of(&mut self, v: &Value, path: &str) -> Option<Duration> {
        let parsed = match v {
            Value::String(s) => Duration::parse(s),
            Value::Number(n) => n
                .as_f64()
                .map(|s| Duration::parse(&format!("{s}s")))
                .unwrap_or_else(|| Err("expected a duration".into())),
            other => Err(format!("expected a duration such as `5s`, got {}", type_name(other))),
        };
        match parsed {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    fn opt_duration(&mut self, o: &mut Obj<'_>, key: &'static str) -> Option<Duration> {
        let v = self.get(o, key)?;
        self.duration_of(v, &join(&o.path, key))
    }

    fn opt_number(&mut self, o: &mut Obj<'_>, key: &'static str, min: f64, max: f64) -> Option<f64> {
        let v = self.get(o, key)?;
        let path = join(&o.path, key);
        match v.as_f64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.err(path, format!("expected a number from {min} to {max}, got {n}"));
                None
            }
            None => {
                self.err(path, format!("expected a number, got {}", type_name(v)));
                None
            }
        }
    }

    fn opt_int(&mut self, o: &mut Obj<'_>, key: &'static str, min: u64, max: u64) -> Option<u32> {
        let v = self.get(o, key)?;
        let path = join(&o.path, key);
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n as u32),
            _ => {
                self.err(path, format!("expected an integer from {min} to {max}, got {v}"));
                None
            }
        }
    }

    fn workflow(&mut self, v: &Value) -> Option<WorkflowDef> {
        let mut o = self.obj(v, "$")?;
        let name = self.req_string(&mut o, "name");
        if let Some(n) = &name {
            if !valid_name(n, 128, &['.']) {
                self.err("name", "expected 1 to 128 letters, digits, `_`, `-` or `.`");
            }
        }
        let description = self.opt_string(&mut o, "description");
        let retry = self.get(&mut o, "retry").and_then(|v| self.retry(v, "retry"));
        let timeouts = self.get(&mut o, "timeouts").and_then(|v| self.timeouts(v, "timeouts"));
        let steps = match self.req(&mut o, "steps", "a list of steps") {
            Some(v) => self.steps(v, "steps"),
            None => Vec::new(),
        };
        let output = self.opt_expr(&mut o, "output");
        let mut queries = BTreeMap::new();
        if let Some(q) = self.get(&mut o, "queries") {
            if let Some(qo) = self.obj(q, "queries") {
                for (k, v) in qo.map {
                    let path = format!("queries.{k}");
                    if !valid_name(k, 64, &[]) {
                        self.err(&path, "query names are 1 to 64 letters, digits, `_` or `-`");
                    }
                    if let Some(e) = self.expr_of(v, &path) {
                        queries.insert(k.clone(), e);
                    }
                }
            }
        }
        let max_running = self.opt_int(&mut o, "max_running", 1, 1_000_000);
        // Accepted for compatibility with tooling that stamps files; not part of the model.
        self.get(&mut o, "$schema");
        self.get(&mut o, "version");
        self.finish(o);
        Some(WorkflowDef { name: name?, description, retry, timeouts, steps, output, queries, max_running })
    }

    fn retry(&mut self, v: &Value, path: &str) -> Option<RetryPolicy> {
        let mut o = self.obj(v, path)?;
        let d = RetryPolicy::default();
        let max_attempts = self.opt_int(&mut o, "max_attempts", 1, 1000).unwrap_or(d.max_attempts);
        let initial_interval = self.opt_duration(&mut o, "initial_interval").unwrap_or(d.initial_interval);
        let backoff_coefficient =
            self.opt_number(&mut o, "backoff_coefficient", 1.0, 100.0).unwrap_or(d.backoff_coefficient);
        let max_interval = self.opt_duration(&mut o, "max_interval").unwrap_or(d.max_interval);
        let jitter = self.opt_number(&mut o, "jitter", 0.0, 1.0).unwrap_or(d.jitter);
        let mut non_retryable = Vec::new();
        if let Some(list) = self.get(&mut o, "non_retryable") {
            let lpath = join(path, "non_retryable");
            match list {
                Value::Array(items) => {
                    for (i, it) in items.iter().enumerate() {
                        if let Some(s) = self.string(it, &format!("{lpath}[{i}]")) {
                            non_retryable.push(s);
                        }
                    }
                }
                other => self.err(lpath, format!("expected a list of error types, got {}", type_name(other))),
            }
        }
        if initial_interval > max_interval {
            self.err(
                join(path, "initial_interval"),
                format!("initial_interval ({initial_interval}) is longer than max_interval ({max_interval})"),
            );
        }
        self.finish(o);
        Some(RetryPolicy { max_attempts, initial_interval, backoff_coefficient, max_interval, jitter, non_retryable })
    }

    fn timeouts(&mut self, v: &Value, path: &str) -> Option<Timeouts> {
        let mut o = self.obj(v, path)?;
        let t = Timeouts {
            schedule_to_start: self.opt_duration(&mut o, "schedule_to_start"),
            start_to_close: self.opt_duration(&mut o, "start_to_close"),
            heartbeat: self.opt_duration(&mut o, "heartbeat"),
        };
        self.finish(o);
        Some(t)
    }

    fn steps(&mut self, v: &Value, path: &str) -> Vec<Step> {
        let Value::Array(items) = v else {
            self.err(path, format!("expected a list of steps, got {}", type_name(v)));
            return Vec::new();
        };
        if items.is_empty() {
            self.err(path, "expected at least one step");
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            self.steps += 1;
            if self.steps == MAX_STEPS + 1 {
                self.err(path, format!("a definition holds at most {MAX_STEPS} steps"));
            }
            if let Some(s) = self.step(item, &format!("{path}[{i}]")) {
                out.push(s);
            }
        }
        out
    }

    fn step(&mut self, v: &Value, path: &str) -> Option<Step> {
        let mut o = self.obj(v, path)?;
        let id = self.req_string(&mut o, "id");
        if let Some(id) = &id {
            if !valid_name(id, 64, &[]) {
                self.err(join(path, "id"), "expected 1 to 64 letters, digits, `_` or `-`");
            } else if !self.ids.insert(id.clone()) {
                self.err(join(path, "id"), format!("duplicate step id `{id}`: ids are unique in a workflow"));
            }
        }
        let ty = self.req_string(&mut o, "type");
        let when = self.opt_expr(&mut o, "when");
        let retry = self.get(&mut o, "retry").and_then(|r| self.retry(r, &join(path, "retry")));
        let timeouts = self.get(&mut o, "timeouts").and_then(|t| self.timeouts(t, &join(path, "timeouts")));
        let kind = match ty.as_deref() {
            Some(ty) => self.kind(ty, &mut o),
            None => None,
        };
        self.finish(o);
        Some(Step { id: id?, when, retry, timeouts, kind: kind? })
    }

    fn kind(&mut self, ty: &str, o: &mut Obj<'_>) -> Option<StepKind> {
        let path = o.path.clone();
        Some(match ty {
            "task" => {
                let queue = self.req_string(o, "queue");
                if let Some(q) = &queue {
                    if !valid_name(q, 128, &['.', ':']) || q.starts_with("__") {
                        self.err(
                            join(&path, "queue"),
                            "expected 1 to 128 letters, digits, `_`, `-`, `.` or `:`, not starting with `__`",
                        );
                    }
                }
                let input = self.opt_expr(o, "input");
                StepKind::Task(TaskStep { queue: queue?, input })
            }
            "http" => {
                let method = self.opt_string(o, "method").unwrap_or_else(|| "GET".into()).to_ascii_uppercase();
                if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"].contains(&method.as_str()) {
                    self.err(
                        join(&path, "method"),
                        format!("expected GET, POST, PUT, PATCH, DELETE or HEAD, got `{method}`"),
                    );
                }
                let url = self.req_expr(o, "url");
                let mut headers = BTreeMap::new();
                if let Some(h) = self.get(o, "headers") {
                    let hpath = join(&path, "headers");
                    if let Some(ho) = self.obj(h, &hpath) {
                        for (k, v) in ho.map {
                            if let Some(e) = self.expr_of(v, &format!("{hpath}.{k}")) {
                                headers.insert(k.clone(), e);
                            }
                        }
                    }
                }
                let body = self.opt_expr(o, "body");
                StepKind::Http(HttpStep { method, url: url?, headers, body })
            }
            "transform" => StepKind::Transform(TransformStep { expr: self.req_expr(o, "expr")? }),
            "switch" => {
                let mut cases = Vec::new();
                if let Some(v) = self.req(o, "cases", "a list of cases") {
                    let cpath = join(&path, "cases");
                    match v {
                        Value::Array(items) if !items.is_empty() => {
                            for (i, c) in items.iter().enumerate() {
                                let p = format!("{cpath}[{i}]");
                                if let Some(mut co) = self.obj(c, &p) {
                                    let when = self.req_expr(&mut co, "when");
                                    let steps = match self.req(&mut co, "steps", "a list of steps") {
                                        Some(s) => self.steps(s, &join(&p, "steps")),
                                        None => Vec::new(),
                                    };
                                    self.finish(co);
                                    if let Some(when) = when {
                                        cases.push(Case { when, steps });
                                    }
                                }
                            }
                        }
                        other => {
                            self.err(cpath, format!("expected a non-empty list of cases, got {}", type_name(other)))
                        }
                    }
                }
                let default = match self.get(o, "default") {
                    Some(v) => self.steps(v, &join(&path, "default")),
                    None => Vec::new(),
                };
                StepKind::Switch(SwitchStep { cases, default })
            }
            "parallel" => {
                let mut branches = BTreeMap::new();
                if let Some(v) = self.req(o, "branches", "an object of named step lists") {
                    let bpath = join(&path, "branches");
                    if let Some(bo) = self.obj(v, &bpath) {
                        if bo.map.is_empty() {
                            self.err(&bpath, "expected at least one branch");
                        }
                        for (name, steps) in bo.map {
                            if !valid_name(name, 64, &[]) {
                                self.err(
                                    format!("{bpath}.{name}"),
                                    "branch names are 1 to 64 letters, digits, `_` or `-`",
                                );
                            }
                            let steps = self.steps(steps, &format!("{bpath}.{name}"));
                            branches.insert(name.clone(), steps);
                        }
                    }
                }
                StepKind::Parallel(ParallelStep { branches })
            }
            "map" => {
                let items = self.req_expr(o, "items");
                let steps = match self.req(o, "steps", "a list of steps") {
                    Some(v) => self.steps(v, &join(&path, "steps")),
                    None => Vec::new(),
                };
                let max_concurrency = self.opt_int(o, "max_concurrency", 1, 10_000);
                StepKind::Map(MapStep { items: items?, steps, max_concurrency })
            }
            "sleep" => {
                let d = self.req(o, "duration", "a duration such as `5s`");
                let duration = d.and_then(|d| self.duration_of(d, &join(&path, "duration")));
                StepKind::Sleep(SleepStep { duration: duration? })
            }
            "wait_signal" => {
                let signal = self.req_string(o, "signal");
                if let Some(s) = &signal {
                    if !valid_name(s, 64, &['.']) {
                        self.err(join(&path, "signal"), "expected 1 to 64 letters, digits, `_`, `-` or `.`");
                    } else if RESERVED_SIGNALS.contains(&s.as_str()) {
                        self.err(join(&path, "signal"), format!("`{s}` is a built-in signal and cannot be waited for"));
                    }
                }
                let timeout = self.opt_duration(o, "timeout");
                let on_timeout = match self.opt_string(o, "on_timeout").as_deref() {
                    None | Some("fail") => OnTimeout::Fail,
                    Some("continue") => OnTimeout::Continue,
                    Some(other) => {
                        self.err(join(&path, "on_timeout"), format!("expected `fail` or `continue`, got `{other}`"));
                        OnTimeout::Fail
                    }
                };
                StepKind::WaitSignal(WaitSignalStep { signal: signal?, timeout, on_timeout })
            }
            "child" => {
                let workflow = self.req_string(o, "workflow");
                if let Some(w) = &workflow {
                    if !valid_name(w, 128, &['.']) {
                        self.err(join(&path, "workflow"), "expected a workflow name");
                    }
                }
                let input = self.opt_expr(o, "input");
                StepKind::Child(ChildStep { workflow: workflow?, input })
            }
            "continue_as_new" => StepKind::ContinueAsNew(ContinueAsNewStep { input: self.opt_expr(o, "input") }),
            "fail" => {
                let error = self.req_string(o, "error");
                let message = self.opt_expr(o, "message");
                StepKind::Fail(FailStep { error: error?, message })
            }
            "return" => StepKind::Return(ReturnStep { output: self.opt_expr(o, "output") }),
            "llm" => {
                let route = self.req_string(o, "route");
                if let Some(r) = &route {
                    if !valid_name(r, 128, &['.']) {
                        self.err(
                            join(&path, "route"),
                            "expected a route name: 1 to 128 letters, digits, `_`, `-` or `.`",
                        );
                    }
                }
                let precision = match self.get(o, "precision") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        self.err(join(&path, "precision"), format!("expected true or false, got {}", type_name(other)));
                        false
                    }
                };
                let system = self.opt_expr(o, "system");
                let prompt = self.opt_expr(o, "prompt");
                let messages = self.opt_expr(o, "messages");
                if prompt.is_some() == messages.is_some() {
                    self.err(&path, "an `llm` step needs exactly one of `prompt` (a jq string) and `messages` (jq producing [{role, content}])");
                }
                if messages.is_some() && system.is_some() {
                    self.err(
                        join(&path, "system"),
                        "`system` goes with `prompt`; with `messages`, put the system message in the list",
                    );
                }
                let max_tokens = self.opt_int(o, "max_tokens", 1, 1_000_000);
                let temperature = match self.get(o, "temperature") {
                    None => None,
                    Some(v) => match v.as_f64() {
                        Some(t) if (0.0..=2.0).contains(&t) => Some(t),
                        _ => {
                            self.err(join(&path, "temperature"), format!("expected a number from 0 to 2, got {v}"));
                            None
                        }
                    },
                };
                let schema = match self.get(o, "schema") {
                    None => None,
                    Some(v @ Value::Object(_)) => Some(v.clone()),
                    Some(other) => {
                        self.err(
                            join(&path, "schema"),
                            format!("expected a JSON Schema object, got {}", type_name(other)),
                        );
                        None
                    }
                };
                StepKind::Llm(LlmStep {
                    route: route?,
                    precision,
                    system,
                    prompt,
                    messages,
                    max_tokens,
                    temperature,
                    schema,
                })
            }
            other => {
                self.err(
                    join(&path, "type"),
                    format!("unknown step type `{other}`, expected one of: task, http, llm, transform, switch, parallel, map, sleep, wait_signal, child, continue_as_new, fail, return"),
                );
                return None;
            }
        })
    }
}
