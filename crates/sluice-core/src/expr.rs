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

    /// Evaluates against `input` and returns the first output, within `MAX_EVAL_STEPS`.
    pub fn eval_val(&self, input: Val) -> Result<Val, ExprError> {
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        jaq_core::fuel::set_steps(MAX_EVAL_STEPS);
        let first = {
            let mut out = self.filter.id.run((ctx, input));
            out.next()
        };
        jaq_core::fuel::set_steps(u64::MAX);
        match first {
            Some(Ok(v)) => Ok(v),
            Some(Err(exn)) => Err(ExprError::Eval(match exn.get_err() {
                Ok(e) => e.to_string(),
                Err(_) => "the expression stopped without a value".into(),
            })),
            None => Err(ExprError::NoOutput),
        }
    }

    pub fn eval(&self, input: Val) -> Result<Value, ExprError> {
        self.eval_val(input).map(|v| from_val(&v))
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

/// Converts jaq's value type back into JSON. Non-finite numbers become `null`, as in jq.
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

/// Runs `f` with a wall-clock limit on the expressions it evaluates on this thread. The core
/// itself never reads the clock: the runtime chooses to bound a whole `decide` this way, as a
/// last line of defence behind the step budget.
pub fn with_deadline<T>(deadline: std::time::Instant, f: impl FnOnce() -> T) -> T {
    jaq_core::fuel::set_deadline(Some(deadline));
    let r = f();
    jaq_core::fuel::set_deadline(None);
    r
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
                Err(ExprError::Eval(msg)) => assert!(msg.contains("budget"), "{src}: {msg}"),
                other => panic!("{src} should exceed the budget, got {other:?}"),
            }
        }
        // Real work on real data stays well inside it.
        check("[range(100000)] | add", json!(null), json!(4999950000u64));
    }

    #[test]
    fn a_deadline_stops_evaluation() {
        let e = Expr::parse("last(range(1e12))").unwrap_or_else(|err| panic!("{err}"));
        let r = with_deadline(std::time::Instant::now(), || e.eval(Val::Null));
        assert!(matches!(r, Err(ExprError::Eval(ref m)) if m.contains("budget")), "{r:?}");
    }

    #[test]
    fn json_round_trips_through_val() {
        let v = json!({"a": [1, 2.5, "x", null, true, {"b": -3}], "big": 12345678901i64});
        assert_eq!(from_val(&to_val(&v)), v);
    }
}
