//! Integration tests of the core: the schema file, persisted event fixtures, `decide` driven
//! through whole histories (with replay), and property tests of the parser and expressions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{json, Value};
use sluice_core::event::{Event, EventKind, TaskKind};
use sluice_core::{decide, parse_definition, ExecState, ExecStatus, Format, WorkflowDef};

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

#[test]
fn checked_in_schema_matches_the_types() {
    let path = repo_file("schemas/workflow.schema.json");
    let generated = sluice_core::schema::workflow_schema();
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "schemas/workflow.schema.json is stale: run `SLUICE_BLESS=1 cargo test -p sluice-core`"
    );
}

/// Every stored event kind must keep parsing: a change that breaks old histories fails here.
#[test]
fn persisted_event_fixtures_still_parse_and_round_trip() {
    let text = std::fs::read_to_string(repo_file("crates/sluice-core/tests/fixtures/events-v1.json")).unwrap();
    let fixtures: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for f in &fixtures {
        let e: Event = serde_json::from_value(f.clone()).unwrap_or_else(|err| panic!("{f}: {err}"));
        kinds.insert(e.kind.name());
        assert_eq!(&serde_json::to_value(&e).unwrap(), f, "round trip changed the stored form");
    }
    assert_eq!(kinds.len(), 28, "a fixture for every event kind: {kinds:?}");
}

fn def(v: Value) -> WorkflowDef {
    sluice_core::def::parse_value(&v).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Drives a run: starts it, then answers each scheduled task with `answer(step, attempt)`, and
/// checks replay over the whole history at the end.
fn drive(
    d: &WorkflowDef,
    input: Value,
    answer: impl Fn(&str, u32, &Value) -> Result<Value, String>,
) -> (ExecState, Vec<Event>) {
    let mut st = ExecState::new();
    let mut history = vec![st.push(
        EventKind::ExecutionStarted {
            workflow: d.name.clone(),
            version: "v".into(),
            workflow_id: "w".into(),
            run_id: "r".into(),
            input,
            parent: None,
            continued_from: None,
            chain: 0,
            trace_id: None,
            access: Default::default(),
        },
        0,
    )];
    let mut now = 0;
    loop {
        let new = decide(d, &mut st);
        let tasks: Vec<(String, u32, Value)> = new
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::TaskScheduled { step, attempt, input, .. } => Some((step.clone(), *attempt, input.clone())),
                _ => None,
            })
            .collect();
        history.extend(new);
        if st.status.is_terminal() || tasks.is_empty() {
            break;
        }
        for (step, attempt, input) in tasks {
            now += 10;
            let kind = match answer(&step, attempt, &input) {
                Ok(output) => EventKind::TaskCompleted { step, attempt, output },
                Err(msg) => EventKind::TaskFailed {
                    step,
                    attempt,
                    error: sluice_core::ErrorInfo::new("boom", msg),
                    retryable: true,
                },
            };
            history.push(st.push(kind, now));
        }
    }
    sluice_core::replay::check(d, &history).unwrap();
    (st, history)
}

#[test]
fn decide_runs_a_sequence_of_tasks_and_transforms() {
    let d = def(json!({"name": "seq", "steps": [
        {"id": "a", "type": "task", "queue": "q", "input": "{n: .input.n}"},
        {"id": "b", "type": "transform", "expr": ".steps.a.n * 2"},
        {"id": "c", "type": "task", "queue": "q", "input": ".steps.b"}
    ]}));
    let (st, history) = drive(&d, json!({"n": 4}), |_, _, input| Ok(input.clone()));
    assert_eq!(st.status, ExecStatus::Completed);
    assert_eq!(st.output, Some(json!(8)));
    let names: Vec<&str> = history.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names,
        [
            "execution_started",
            "task_scheduled",
            "task_completed",
            "step_completed",
            "task_scheduled",
            "task_completed",
            "execution_completed"
        ]
    );
}

#[test]
fn llm_steps_schedule_engine_tasks_with_evaluated_messages() {
    let d = def(json!({"name": "ai", "steps": [
        {"id": "a", "type": "llm", "route": "fast", "system": "\"Be brief.\"", "prompt": "\"Hi \\(.input.name)\"",
         "max_tokens": 7, "temperature": 0.2, "precision": true, "schema": {"type": "object"}},
        {"id": "b", "type": "llm", "route": "fast", "messages": "[{role: \"user\", content: .steps.a.text}]"}
    ]}));
    let (st, history) = drive(&d, json!({"name": "Ada"}), |step, _, _| Ok(json!({"text": format!("from {step}")})));
    assert_eq!(st.status, ExecStatus::Completed);
    let sent: Vec<(TaskKind, Value)> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskScheduled { task, input, .. } => Some((*task, input.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        [
            (
                TaskKind::Llm,
                json!({"route": "fast", "precision": true, "max_tokens": 7, "temperature": 0.2, "schema": {"type": "object"},
                       "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi Ada"}]})
            ),
            (
                TaskKind::Llm,
                json!({"route": "fast", "precision": false, "messages": [{"role": "user", "content": "from a"}]})
            ),
        ]
    );
}

#[test]
fn llm_step_mistakes_name_their_field() {
    let bad = |step: Value| {
        let errs = sluice_core::def::parse_value(&json!({"name": "x", "steps": [step]})).err().unwrap_or_default();
        errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
    };
    let e = bad(json!({"id": "a", "type": "llm", "prompt": "\"x\""}));
    assert!(e.contains("steps[0].route"), "{e}");
    let e = bad(json!({"id": "a", "type": "llm", "route": "r", "prompt": "\"x\"", "messages": "[]"}));
    assert!(e.contains("exactly one of `prompt`"), "{e}");
    let e = bad(json!({"id": "a", "type": "llm", "route": "r", "messages": "[]", "system": "\"s\""}));
    assert!(e.contains("steps[0].system"), "{e}");
    let e = bad(json!({"id": "a", "type": "llm", "route": "r", "prompt": "\"x\"", "schema": "yes"}));
    assert!(e.contains("steps[0].schema") && e.contains("JSON Schema object"), "{e}");
    let e = bad(json!({"id": "a", "type": "llm", "route": "r", "prompt": "\"x\"", "max_tokens": 0}));
    assert!(e.contains("steps[0].max_tokens"), "{e}");
    let e = bad(json!({"id": "a", "type": "llm", "route": "r", "prompt": "(", "colour": 1}));
    assert!(e.contains("steps[0].prompt") && e.contains("steps[0].colour"), "{e}");
}

#[test]
fn decide_retries_by_policy_then_fails_for_dead_letter() {
    let d = def(json!({"name": "r", "retry": {"max_attempts": 3, "initial_interval": "1s", "jitter": 0}, "steps": [
        {"id": "a", "type": "task", "queue": "q"}
    ]}));
    let (st, history) = drive(&d, json!(null), |_, _, _| Err("nope".into()));
    assert_eq!(st.status, ExecStatus::Failed);
    assert!(st.dead_letter);
    let delays: Vec<u64> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskScheduled { delay_ms, .. } => Some(*delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [0, 1000, 2000]);
}

#[test]
fn map_respects_max_concurrency_and_keeps_order() {
    let d = def(json!({"name": "m", "steps": [
        {"id": "each", "type": "map", "items": "[range(7)]", "max_concurrency": 3,
         "steps": [{"id": "sq", "type": "task", "queue": "q", "input": ".item"}]}
    ]}));
    let mut st = ExecState::new();
    st.push(
        EventKind::ExecutionStarted {
            workflow: "m".into(),
            version: "v".into(),
            workflow_id: "w".into(),
            run_id: "r".into(),
            input: Value::Null,
            parent: None,
            continued_from: None,
            chain: 0,
            trace_id: None,
            access: Default::default(),
        },
        0,
    );
    let first = decide(&d, &mut st);
    let scheduled = first.iter().filter(|e| matches!(e.kind, EventKind::TaskScheduled { .. })).count();
    assert_eq!(scheduled, 3, "at most 3 iterations in flight");
    let (st, _) = drive(&d, Value::Null, |_, _, input| Ok(json!(input.as_i64().unwrap() * input.as_i64().unwrap())));
    assert_eq!(st.output, Some(json!([0, 1, 4, 9, 16, 25, 36])));
}

#[test]
fn switch_parallel_and_when() {
    let d = def(json!({"name": "s", "steps": [
        {"id": "sw", "type": "switch", "cases": [
            {"when": ".input.kind == \"a\"", "steps": [{"id": "x", "type": "transform", "expr": "\"A\""}]},
            {"when": ".input.kind == \"b\"", "steps": [{"id": "y", "type": "transform", "expr": "\"B\""}]}
        ], "default": [{"id": "z", "type": "transform", "expr": "\"Z\""}]},
        {"id": "p", "type": "parallel", "branches": {
            "one": [{"id": "t1", "type": "task", "queue": "q", "input": "1"}],
            "two": [{"id": "t2", "type": "task", "queue": "q", "input": "2"}, {"id": "skip", "type": "transform", "when": "false", "expr": "0"}]
        }},
        {"id": "out", "type": "transform", "expr": "{sw: .steps.sw, p: .steps.p}"}
    ]}));
    for (kind, expect) in [("a", "A"), ("b", "B"), ("c", "Z")] {
        let (st, _) = drive(&d, json!({"kind": kind}), |_, _, input| Ok(input.clone()));
        assert_eq!(st.output, Some(json!({"sw": expect, "p": {"one": 1, "two": null}})), "{kind}");
    }
}

#[test]
fn signals_buffer_until_waited_for_and_timeouts_follow_policy() {
    let d = def(json!({"name": "w", "steps": [
        {"id": "w1", "type": "wait_signal", "signal": "go", "timeout": "1m", "on_timeout": "continue"},
        {"id": "w2", "type": "wait_signal", "signal": "go"}
    ]}));
    let mut st = ExecState::new();
    let mut h = vec![st.push(
        EventKind::ExecutionStarted {
            workflow: "w".into(),
            version: "v".into(),
            workflow_id: "w".into(),
            run_id: "r".into(),
            input: Value::Null,
            parent: None,
            continued_from: None,
            chain: 0,
            trace_id: None,
            access: Default::default(),
        },
        0,
    )];
    h.extend(decide(&d, &mut st));
    h.push(st.push(EventKind::TimerFired { step: "w1".into() }, 60_000));
    h.extend(decide(&d, &mut st));
    h.push(st.push(EventKind::SignalReceived { name: "go".into(), payload: json!(7) }, 60_001));
    h.extend(decide(&d, &mut st));
    assert_eq!(st.status, ExecStatus::Completed);
    assert_eq!(st.output, Some(json!(7)));
    sluice_core::replay::check(&d, &h).unwrap();
    // A decision that does not match the history is caught.
    let mut forged = h.clone();
    if let Some(e) = forged.iter_mut().find(|e| matches!(e.kind, EventKind::SignalConsumed { .. })) {
        e.kind = EventKind::StepSkipped { step: "w2".into() };
    }
    assert!(sluice_core::replay::check(&d, &forged).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The parser answers every input with a definition or errors, never a panic.
    #[test]
    fn parser_never_panics_on_text(text in "\\PC{0,300}") {
        let _ = parse_definition(&text, Format::Auto);
        let _ = parse_definition(&text, Format::Json);
    }

    #[test]
    fn parser_never_panics_on_shapes(v in arb_json(3)) {
        let _ = sluice_core::def::parse_value(&v);
        let wrapped = json!({"name": "p", "steps": [v]});
        let _ = sluice_core::def::parse_value(&wrapped);
    }

    /// Expressions from a jq-like alphabet either compile or fail cleanly, and evaluation over
    /// arbitrary input never panics.
    #[test]
    fn expressions_never_panic(src in "[.a-z0-9|\\[\\]{}(),:+*/\\- \"$?]{1,40}", input in arb_json(3)) {
        if let Ok(e) = sluice_core::Expr::parse(&src) {
            let _ = e.eval(sluice_core::expr::to_val(&input));
        }
    }

    /// Valid definitions survive a round trip through their canonical form.
    #[test]
    fn canonical_form_round_trips(n in 1usize..6, queue in "[a-z]{1,8}") {
        let steps: Vec<Value> = (0..n).map(|i| json!({"id": format!("s{i}"), "type": "task", "queue": queue, "input": ".input"})).collect();
        let d = def(json!({"name": "rt", "steps": steps}));
        let again = sluice_core::def::parse_value(&serde_json::from_str(&d.to_canonical_json()).unwrap()).unwrap();
        prop_assert_eq!(d, again);
    }
}

fn arb_json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        "[a-z_.]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("(id|type|queue|steps|expr|name|when|input|[a-z]{1,5})", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
