//! jq expressions (through `jaq`): parsing once at validation, evaluating against JSON contexts.
//!
//! Expressions are pure: the filters that read the clock, the environment or standard input, or
//! write to standard error, are not available, so evaluation is deterministic and replayable.

use std::fmt;
use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, Compiler, Ctx, Vars};
use jaq_json::Val;
use serde_json::{Map, Number, Value};

/// Longest expression source accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 16 * 1024;

/// Evaluation steps one expression may take (terms evaluated, numbers a `range` yields). Counted,
/// not timed, so an evaluation that fits does so on every machine and replay agrees.
pub const MAX_EVAL_STEPS: u64 = 2_000_000;

/// Deepest value an expression may produce as its result: stored values must parse again
/// (history is JSON, and JSON readers stop at 128 levels), and every reader recurses over them.
pub const MAX_VALUE_DEPTH: usize = 100;

/// The limits one evaluation runs under. Every evaluation has them: the defaults bound steps,
/// stack and memory on any thread; the engine sets its own around `decide` ([`with_limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalLimits {
    /// Terms evaluated (see [`MAX_EVAL_STEPS`]).
    pub steps: u64,
    /// Bytes of stack the evaluation may grow by.
    pub stack_bytes: usize,
    /// Bytes the evaluation may hold at once; counted only where the process installs
    /// [`CountingAlloc`] as its global allocator, and bounding the size of the result always.
    pub memory_bytes: usize,
    /// The wall-clock deadline, if any.
    pub deadline: Option<std::time::Instant>,
    /// Whether passing a limit means "try again with more" ([`ExprError::Yield`]) rather than
    /// failing ([`ExprError::Limit`]): the engine evaluates small expressions in place and moves
    /// the rest to threads made for them.
    pub yield_on_limit: bool,
}

/// Bytes of stack the evaluator may grow by on a thread made for evaluations
/// ([`run_on_eval_thread`], the engine's evaluation threads): deep recursion in jq such as
/// `def f: [f]; f` stops here with `expr.limit`.
pub const EVALUATOR_STACK: usize = 32 * 1024 * 1024;

/// Bytes one evaluation may hold at once unless the server is told otherwise.
pub const DEFAULT_EVAL_MEMORY: usize = 64 * 1024 * 1024;

impl EvalLimits {
    /// Limits safe on any thread (a stack guard of 512 KiB), for evaluations outside the engine.
    pub const FULL: EvalLimits = EvalLimits {
        steps: MAX_EVAL_STEPS,
        stack_bytes: 512 * 1024,
        memory_bytes: DEFAULT_EVAL_MEMORY,
        deadline: None,
        yield_on_limit: false,
    };

    /// The limits of the engine's evaluation threads, with `memory_bytes` per evaluation. A replay
    /// that must agree with what the engine recorded runs under these too ([`run_on_eval_thread`]).
    pub const fn engine(memory_bytes: usize) -> EvalLimits {
        EvalLimits {
            steps: MAX_EVAL_STEPS,
            stack_bytes: EVALUATOR_STACK,
            memory_bytes,
            deadline: None,
            yield_on_limit: false,
        }
    }

    /// The stack a thread needs to evaluate under these limits: the evaluator's guard, plus what
    /// dropping or comparing the deepest value the memory account allows recurses over (a value
    /// nests one level per allocation; measured at under 100 bytes of stack a level, so 4 bytes
    /// of stack for each byte of memory leaves a wide margin).
    pub const fn thread_stack(&self) -> usize {
        self.stack_bytes.saturating_add(self.memory_bytes.saturating_mul(4))
    }
}

/// Runs `f` under `limits` on a thread of its own with the stack they need
/// ([`EvalLimits::thread_stack`]), for tools that evaluate outside the engine (replay). Fails
/// only when no such thread can be started.
pub fn run_on_eval_thread<T: Send>(limits: EvalLimits, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("sluice-eval".into())
            .stack_size(limits.thread_stack())
            .spawn_scoped(scope, || with_limits(limits, f))?;
        match handle.join() {
            Ok(v) => Ok(v),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The global allocator wrapper that gives each evaluation its memory account: install it in a
/// binary with `#[global_allocator] static A: CountingAlloc<System> = CountingAlloc(System);`.
pub use jaq_core::fuel::Counting as CountingAlloc;

std::thread_local! {
    static LIMITS: std::cell::Cell<EvalLimits> = const { std::cell::Cell::new(EvalLimits::FULL) };
}

/// Runs `f` with `limits` on every expression it evaluates on this thread. The core itself never
/// reads the clock: the runtime chooses a deadline and where to run.
pub fn with_limits<T>(limits: EvalLimits, f: impl FnOnce() -> T) -> T {
    let before = LIMITS.with(|l| l.replace(limits));
    let r = f();
    LIMITS.with(|l| l.set(before));
    r
}

/// A test hook: the text that makes an expression containing it abort the process when it is
/// evaluated under limits that do not yield (on the engine's evaluation threads), and yield in
/// place. Unset unless the server was started with `SLUICE_TEST_CRASH_ON_EXPR`, for the tests of
/// the quarantine of steps that crash their node.
static CRASH_MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the [`CRASH_MARKER`] test hook (once per process; an empty text sets nothing).
pub fn set_test_crash_marker(marker: &str) {
    if !marker.is_empty() {
        let _ = CRASH_MARKER.set(marker.to_string());
    }
}

/// The limits evaluations on this thread run under now.
pub fn current_limits() -> EvalLimits {
    LIMITS.with(std::cell::Cell::get)
}

/// Filters that would make an expression depend on the world outside its input.
const FORBIDDEN: &[&str] = &["now", "env", "localtime", "strflocaltime", "input", "inputs"];

type Data = data::JustLut<Val>;
type Filter = jaq_core::Filter<Data>;

/// Natives that the standard definitions need but that must not touch the process: logging
/// becomes a no-op and `halt` (which would exit the whole server) becomes an error.
fn safe_natives() -> impl Iterator<Item = jaq_core::native::Fun<Data>> {
    use jaq_core::DataT;
    fn nothing<'a, D: DataT>(_: jaq_core::Cv<'a, D>) -> jaq_core::ValXs<'a, D::V<'a>> {
        Box::new(core::iter::empty())
    }
    fn halt<'a, D: DataT>(_: jaq_core::Cv<'a, D>) -> jaq_core::ValXs<'a, D::V<'a>> {
        jaq_core::box_iter::box_once(Err(jaq_core::Exn::from(jaq_core::Error::str(
            "halt is not available in workflow expressions",
        ))))
    }
    let f = |name: &'static str, arity: usize, run: jaq_core::RunPtr<Data>| {
        jaq_core::native::run::<Data>((name, jaq_core::native::v(arity), run))
    };
    [f("debug_empty", 0, nothing::<Data>), f("stderr_empty", 0, nothing::<Data>), f("halt", 1, halt::<Data>)]
        .into_iter()
}

/// A compiled jq expression together with its source text.
#[derive(Clone)]
pub struct Expr {
    src: Arc<str>,
    filter: Arc<Filter>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("invalid jq expression: {0}")]
    Compile(String),
    #[error("jq evaluation failed: {0}")]
    Eval(String),
    #[error("jq expression produced no value")]
    NoOutput,
    #[error("jq expression produced {0}, expected {1}")]
    Type(String, &'static str),
    /// A limit on steps, time, stack, memory or depth stopped the evaluation (`expr.limit`).
    #[error("{0}")]
    Limit(String),
    /// A limit of an evaluation made with `yield_on_limit` was reached: evaluate again with the
    /// full limits. Never recorded.
    #[error("expression needs more than an in-place evaluation allows")]
    Yield,
}

impl ExprError {
    /// The type of the step error this becomes: `expr.limit` for a limit, else `expression`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExprError::Limit(_) | ExprError::Yield => "expr.limit",
            _ => "expression",
        }
    }
}

impl Expr {
    pub fn parse(src: &str) -> Result<Self, ExprError> {
        if src.len() > MAX_EXPR_LEN {
            return Err(ExprError::Compile(format!("expression is {} bytes, the limit is {MAX_EXPR_LEN}", src.len())));
        }
        if src.trim().is_empty() {
            return Err(ExprError::Compile("expression is empty".into()));
        }
        let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .filter(|(name, _, _)| !FORBIDDEN.contains(name) && !["halt", "debug_empty", "stderr_empty"].contains(name))
            .chain(safe_natives());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code: src, path: () })
            .map_err(|errs| ExprError::Compile(describe_load_errors(errs)))?;
        let filter = Compiler::default().with_funs(funs).compile(modules).map_err(|errs| {
            let mut parts = Vec::new();
            for (_file, es) in errs {
                for (name, undefined) in es {
                    parts.push(format!("undefined {} `{name}`", undefined.as_str()));
                }
            }
            ExprError::Compile(parts.join("; "))
        })?;
        Ok(Self { src: src.into(), filter: Arc::new(filter) })
    }

    pub fn source(&self) -> &str {
        &self.src
    }

    /// Evaluates against `input` and returns the first output, within the thread's
    /// [`EvalLimits`].
    pub fn eval_val(&self, input: Val) -> Result<Val, ExprError> {
        let limits = current_limits();
        if let Some(marker) = CRASH_MARKER.get() {
            if self.src.contains(marker.as_str()) {
                if limits.yield_on_limit {
                    return Err(ExprError::Yield);
                }
                std::process::abort();
            }
        }
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        jaq_core::fuel::begin(jaq_core::fuel::Limits {
            steps: limits.steps,
            deadline: limits.deadline,
            stack_bytes: limits.stack_bytes,
            memory_bytes: limits.memory_bytes,
        });
        let first = {
            let mut out = self.filter.id.run((ctx, input));
            out.next()
        };
        // A serialiser that passed its cap cut its text and tripped a limit without failing:
        // whatever came out is not the expression's value.
        if let Some(limit) = jaq_core::fuel::end() {
            return Err(limit_error(limits, limit));
        }
        match first {
            Some(Ok(v)) => Ok(v),
            Some(Err(exn)) => Err(ExprError::Eval(match exn.get_err() {
                Ok(e) => short_display(&e),
                Err(_) => "the expression stopped without a value".into(),
            })),
            None => Err(ExprError::NoOutput),
        }
    }

    pub fn eval(&self, input: Val) -> Result<Value, ExprError> {
        let v = self.eval_val(input)?;
        try_from_val(&v, current_limits())
    }

    /// Evaluates a condition: `false` and `null` are false, everything else is true (jq's rule).
    pub fn eval_bool(&self, input: Val) -> Result<bool, ExprError> {
        Ok(!matches!(self.eval_val(input)?, Val::Null | Val::Bool(false)))
    }

    pub fn eval_string(&self, input: Val) -> Result<String, ExprError> {
        match self.eval(input)? {
            Value::String(s) => Ok(s),
            other => Err(ExprError::Type(type_name(&other).into(), "a string")),
        }
    }

    pub fn eval_array(&self, input: Val) -> Result<Vec<Value>, ExprError> {
        match self.eval(input)? {
            Value::Array(items) => Ok(items),
            other => Err(ExprError::Type(type_name(&other).into(), "an array")),
        }
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.src)
    }
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.src == other.src
    }
}

impl serde::Serialize for Expr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.src)
    }
}

impl schemars::JsonSchema for Expr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Expr".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "a jq expression evaluated against the execution context {input, steps, item, index}"
        })
    }
}

fn describe_load_errors(errs: jaq_core::load::Errors<&str, ()>) -> String {
    use jaq_core::load::Error;
    let mut parts = Vec::new();
    for (_file, err) in errs {
        match err {
            Error::Io(es) => parts.extend(es.into_iter().map(|(p, e)| format!("{p}: {e}"))),
            Error::Lex(es) => parts.extend(
                es.into_iter().map(|(expect, at)| format!("expected {} at `{}`", expect.as_str(), snippet(at))),
            ),
            Error::Parse(es) => parts.extend(
                es.into_iter().map(|(expect, at)| format!("expected {} at `{}`", expect.as_str(), snippet(at))),
            ),
        }
    }
    parts.join("; ")
}

fn snippet(at: &str) -> String {
    if at.is_empty() {
        return "end of expression".into();
    }
    at.chars().take(24).collect()
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Converts JSON into jaq's value type.
pub fn to_val(v: &Value) -> Val {
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64().and_then(|i| isize::try_from(i).ok()) {
                Val::Num(jaq_json::Num::Int(i))
            } else {
                Val::Num(jaq_json::Num::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Val::utf8_str(s.clone().into_bytes()),
        Value::Array(items) => items.iter().map(to_val).collect(),
        Value::Object(map) => {
            Val::obj(map.iter().map(|(k, v)| (Val::utf8_str(k.clone().into_bytes()), to_val(v))).collect())
        }
    }
}

fn limit_error(limits: EvalLimits, limit: jaq_core::fuel::Limit) -> ExprError {
    use jaq_core::fuel::Limit;
    if limits.yield_on_limit {
        return ExprError::Yield;
    }
    ExprError::Limit(match limit {
        Limit::Steps => format!("{} ({} steps, or the time allowed)", limit.message(), limits.steps),
        Limit::Stack => format!("{} (more than {} KiB of stack)", limit.message(), limits.stack_bytes / 1024),
        Limit::Memory => format!("{} ({} MiB)", limit.message(), limits.memory_bytes / (1024 * 1024)),
        Limit::Depth => format!("{} (more than {} levels)", limit.message(), jaq_json::write::MAX_DEPTH),
    })
}

/// An error message that quotes values, cut to a few KiB (`Display` of a value is capped too).
fn short_display(e: &impl fmt::Display) -> String {
    use std::fmt::Write;
    struct Capped(String);
    impl fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            const CAP: usize = 4096;
            if self.0.len() + s.len() > CAP {
                let mut end = CAP.saturating_sub(self.0.len()).min(s.len());
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                self.0.push_str(&s[..end]);
                self.0.push('…');
                return Err(fmt::Error);
            }
            self.0.push_str(s);
            Ok(())
        }
    }
    let mut out = Capped(String::new());
    let _ = write!(out, "{e}");
    out.0
}

/// Converts an expression's result into JSON within `limits`: at most [`MAX_VALUE_DEPTH`] levels
/// deep, and at most `limits.memory_bytes` as JSON (counted as it is built: a value that shares
/// its parts, such as 40 rounds of `[., .]`, is small in jaq and huge as JSON).
pub fn try_from_val(v: &Val, limits: EvalLimits) -> Result<Value, ExprError> {
    let mut budget = limits.memory_bytes;
    let out = convert(v, 0, &mut budget);
    out.ok_or_else(|| {
        if limits.yield_on_limit {
            return ExprError::Yield;
        }
        if budget == 0 {
            ExprError::Limit(format!(
                "{} ({} MiB as JSON)",
                jaq_core::fuel::Limit::Memory.message(),
                limits.memory_bytes / (1024 * 1024)
            ))
        } else {
            ExprError::Limit(format!("the result nests more than {MAX_VALUE_DEPTH} levels deep"))
        }
    })
}

/// `from_val` with a depth limit and a byte budget; `None` when either is passed (an exhausted
/// budget is left at 0).
fn convert(v: &Val, depth: usize, budget: &mut usize) -> Option<Value> {
    let cost = match v {
        Val::TStr(b) | Val::BStr(b) => b.len() + 2,
        _ => 8,
    };
    if cost > *budget {
        *budget = 0;
        return None;
    }
    *budget -= cost;
    Some(match v {
        Val::Arr(items) if depth < MAX_VALUE_DEPTH => {
            let mut out = Vec::with_capacity(items.len().min(*budget / 8));
            for item in items.iter() {
                out.push(convert(item, depth + 1, budget)?);
            }
            Value::Array(out)
        }
        Val::Obj(map) if depth < MAX_VALUE_DEPTH => {
            let mut out = Map::with_capacity(map.len().min(*budget / 8));
            for (k, v) in map.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => convert(other, depth + 1, budget)?.to_string(),
                };
                out.insert(key, convert(v, depth + 1, budget)?);
            }
            Value::Object(out)
        }
        Val::Arr(_) | Val::Obj(_) => return None,
        other => from_val(other),
    })
}

/// Converts jaq's value type back into JSON. Non-finite numbers become `null`, as in jq. For
/// values that come from stored JSON; an expression's result goes through [`try_from_val`].
pub fn from_val(v: &Val) -> Value {
    match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => num_to_json(n),
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(items) => Value::Array(items.iter().map(from_val).collect()),
        Val::Obj(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => from_val(other).to_string(),
                };
                out.insert(key, from_val(v));
            }
            Value::Object(out)
        }
    }
}

fn num_to_json(n: &jaq_json::Num) -> Value {
    use jaq_json::Num;
    match n {
        Num::Int(i) => Value::Number(Number::from(*i as i64)),
        Num::Float(f) => Number::from_f64(*f)
            .map(|n| {
                // Integral floats print as integers, as jq does.
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Value::Number(Number::from(*f as i64))
                } else {
                    Value::Number(n)
                }
            })
            .unwrap_or(Value::Null),
        Num::BigInt(b) => serde_json::from_str(&b.to_string()).unwrap_or(Value::Null),
        Num::Dec(s) => serde_json::from_str(s).unwrap_or(Value::Null),
    }
}

/// Builds a JSON object value for jaq from key/value pairs without going through JSON.
pub fn obj(entries: impl IntoIterator<Item = (&'static str, Val)>) -> Val {
    Val::obj(entries.into_iter().map(|(k, v)| (Val::utf8_str(k.as_bytes().to_vec()), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(src: &str, input: Value, expect: Value) {
        let e = Expr::parse(src).unwrap_or_else(|err| panic!("{src}: {err}"));
        assert_eq!(e.eval(to_val(&input)), Ok(expect), "{src}");
    }

    #[test]
    fn evaluates() {
        check(".a + 1", json!({"a": 41}), json!(42));
        check("[.[] | . * 2]", json!([1, 2]), json!([2, 4]));
        check("\"id-\\(.id)\"", json!({"id": 7}), json!("id-7"));
        check("{x: .a, y: (.b | length)}", json!({"a": null, "b": "abc"}), json!({"x": null, "y": 3}));
        check("map(select(. > 1))", json!([1, 2, 3]), json!([2, 3]));
        check(".f / 2", json!({"f": 3}), json!(1.5));
    }

    #[test]
    fn rejects_bad_and_impure_expressions() {
        for src in ["", ".a |", "now", "env.HOME", "$ENV", "input", "undefined_fn(1)", "{a:}"] {
            assert!(Expr::parse(src).is_err(), "{src} should not compile");
        }
        let long = ".".repeat(MAX_EXPR_LEN + 1);
        assert!(Expr::parse(&long).is_err());
    }

    #[test]
    fn runtime_errors_are_reported() {
        let e = Expr::parse(".a.b").unwrap_or_else(|err| panic!("{err}"));
        assert!(matches!(e.eval(to_val(&json!({"a": 5}))), Err(ExprError::Eval(_))));
        let e = Expr::parse("empty").unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(e.eval(Val::Null), Err(ExprError::NoOutput));
    }

    #[test]
    fn halt_and_debug_do_not_touch_the_process() {
        let e = Expr::parse("halt_error").unwrap_or_else(|err| panic!("{err}"));
        assert!(matches!(e.eval(Val::Null), Err(ExprError::Eval(_))));
        check("debug | . + 1", json!(1), json!(2));
    }

    #[test]
    fn runaway_expressions_stop_at_the_step_budget() {
        for src in [
            "last(range(1e12))",
            "[repeat(1)] | length",
            "def f: f; f",
            "[limit(1e9; repeat(.))] | length",
            "until(false; .)",
        ] {
            let e = Expr::parse(src).unwrap_or_else(|err| panic!("{src}: {err}"));
            match e.eval(Val::Null) {
                Err(ExprError::Limit(msg)) => assert!(msg.contains("budget"), "{src}: {msg}"),
                other => panic!("{src} should exceed the budget, got {other:?}"),
            }
        }
        // Real work on real data stays well inside it.
        check("[range(100000)] | add", json!(null), json!(4999950000u64));
    }

    #[test]
    fn a_deadline_stops_evaluation() {
        let e = Expr::parse("last(range(1e12))").unwrap_or_else(|err| panic!("{err}"));
        let r = with_limits(EvalLimits { deadline: Some(std::time::Instant::now()), ..EvalLimits::FULL }, || {
            e.eval(Val::Null)
        });
        assert!(matches!(r, Err(ExprError::Limit(ref m)) if m.contains("budget")), "{r:?}");
    }

    // The memory account counts what this test binary allocates.
    #[global_allocator]
    static ALLOC: CountingAlloc<std::alloc::System> = CountingAlloc(std::alloc::System);

    /// Runs `f` on a thread with `stack` bytes of stack, as the engine's evaluation threads have.
    fn on_big_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let t = std::thread::Builder::new().stack_size(stack).spawn(f).unwrap_or_else(|e| panic!("{e}"));
        t.join().unwrap_or_else(|_| panic!("the evaluation thread panicked"))
    }

    fn limit_of(src: &str, input: Value) -> String {
        let e = Expr::parse(src).unwrap_or_else(|err| panic!("{src}: {err}"));
        match e.eval(to_val(&input)) {
            Err(ExprError::Limit(msg)) => msg,
            other => panic!("{src} should stop at a limit, got {other:?}"),
        }
    }

    /// Issue 13, item 1: each of these aborted the whole process (stack overflow, or an
    /// allocation of 100 GB), or ran without end. Each is now a typed `expr.limit` error.
    #[test]
    fn hostile_expressions_stop_at_a_limit_and_the_process_lives() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("def f: [f]; f", json!(null), "recursed too deeply"),
            ("def f: {a: f}; f", json!(null), "recursed too deeply"),
            ("reduce range(100000) as $i (0; [.])", json!(null), "nests more than 100"),
            (".s | fromjson", json!({"s": "[".repeat(100_000)}), "nests too deeply"),
            ("\"x\" * 100000000000", json!(null), "more memory than its limit"),
            ("reduce range(25) as $i ([0]; . + .)", json!(null), "more memory than its limit"),
            ("reduce range(40) as $i ([]; [., .]) | tostring", json!(null), "more memory than its limit"),
            ("reduce range(40) as $i ([]; [., .]) | tojson | length", json!(null), "more memory than its limit"),
            ("reduce range(40) as $i ([]; [., .])", json!(null), "as JSON"),
            ("reduce range(30) as $i (\"ab\"; . + .)", json!(null), "more memory than its limit"),
            ("[limit(3000000; repeat(1))] | length", json!(null), "evaluation budget"),
        ];
        let results = on_big_stack(256 << 20, move || {
            cases.into_iter().map(|(src, input, want)| (src, limit_of(src, input), want)).collect::<Vec<_>>()
        });
        for (src, msg, want) in results {
            assert!(msg.contains(want), "{src}: {msg} (expected it to say `{want}`)");
        }
    }

    #[test]
    fn an_error_quoting_a_huge_shared_value_is_cut_short() {
        let e = Expr::parse("reduce range(40) as $i ([1]; [., .]) | .a").unwrap_or_else(|err| panic!("{err}"));
        match e.eval(Val::Null) {
            Err(ExprError::Eval(msg)) => assert!(msg.len() < 8192 && msg.ends_with('…'), "{}", msg.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn yielding_limits_ask_for_a_second_evaluation_instead_of_failing() {
        let small = EvalLimits { steps: 100, yield_on_limit: true, ..EvalLimits::FULL };
        let e = Expr::parse("[range(1000)] | length").unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(with_limits(small, || e.eval(Val::Null)), Err(ExprError::Yield));
        assert_eq!(e.eval(Val::Null), Ok(json!(1000)), "the full limits are back after with_limits");
        let tiny = Expr::parse(".a + 1").unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(with_limits(small, || tiny.eval(to_val(&json!({"a": 1})))), Ok(json!(2)));
    }

    #[test]
    fn ordinary_work_fits_the_limits() {
        check("[range(100000) | tostring] | length", json!(null), json!(100000));
        check("\"ab\" * 1000 | length", json!(null), json!(2000));
        check("[range(50)] | tojson | fromjson | length", json!(null), json!(50));
        let nested = (0..90).fold(json!(1), |v, _| json!([v]));
        check(".", nested.clone(), nested);
    }

    #[test]
    fn json_round_trips_through_val() {
        let v = json!({"a": [1, 2.5, "x", null, true, {"b": -3}], "big": 12345678901i64});
        assert_eq!(from_val(&to_val(&v)), v);
    }
}
