//! Engine tests against a real SQLite store, without HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_engine::{Engine, EngineOptions, StartRequest};
use sluice_store_sqlite::SqliteStore;

fn db_path(label: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine");
    let _ = std::fs::create_dir_all(&dir);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    dir.join(format!("{label}-{}-{nanos}.db", std::process::id()))
}

/// More parked executions than the cache holds: the evicted ones reload from their histories
/// when their signal arrives, and all complete.
#[tokio::test]
async fn parked_executions_beyond_the_cache_capacity_reload_and_complete() {
    let store = SqliteStore::open(&db_path("cache")).unwrap();
    let opts = EngineOptions { cache_capacity: 10, ..EngineOptions::default() };
    let (engine, _bg) = Engine::start(Arc::new(store), opts).await.unwrap();
    let def = sluice_core::def::parse_value(&json!({"name": "parked", "steps": [
        {"id": "before", "type": "transform", "expr": ".input.n"},
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "after", "type": "transform", "expr": ".steps.before + .steps.gate"}
    ]}))
    .unwrap();
    engine.publish("t", def).await.unwrap();
    for n in 0..50 {
        let req = StartRequest {
            workflow: "parked".into(),
            workflow_id: Some(format!("p-{n}")),
            input: json!({"n": n}),
            ..StartRequest::default()
        };
        engine.start_execution("t", req).await.unwrap();
    }
    assert!(engine.cached_executions() <= 10, "cache holds {}", engine.cached_executions());
    for n in 0..50 {
        engine.signal("t", &format!("p-{n}"), "go", json!(1000)).await.unwrap();
    }
    for n in 0..50 {
        let row = engine.wait_result("t", &format!("p-{n}"), Duration::from_secs(10)).await.unwrap();
        assert_eq!(row.output, Some(json!(1000 + n)), "p-{n}");
    }
    assert_eq!(engine.result_waiters(), 0, "waiter registrations are released");
    // Another tenant sees none of it.
    assert!(engine.get_execution("other", "p-1", None).await.is_err());
}

/// The trace id a start is given stays with the execution: its tasks carry it (with a
/// `traceparent` of their own), its children and the runs it continues as inherit it, and a
/// task keeps it across a restart.
#[tokio::test]
async fn the_trace_id_is_kept_inherited_and_handed_to_workers() {
    use sluice_engine::{TraceId, TraceParent};
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let path = db_path("trace");
    let (engine, bg) =
        Engine::start(Arc::new(SqliteStore::open(&path).unwrap()), EngineOptions::default()).await.unwrap();
    let kid = json!({"name": "kid", "steps": [{"id": "k", "type": "task", "queue": "kq", "input": ".input"}]});
    let looping = json!({"name": "looping", "steps": [
        {"id": "kid", "type": "child", "workflow": "kid", "input": ".input"},
        {"id": "again", "type": "continue_as_new", "when": ".input.n < 1", "input": "{n: .input.n + 1}"}
    ]});
    for def in [kid, looping] {
        engine.publish("t", sluice_core::def::parse_value(&def).unwrap()).await.unwrap();
    }
    let trace_id = TraceId::parse(TRACE);
    let req = StartRequest {
        workflow: "looping".into(),
        workflow_id: Some("loop-1".into()),
        input: json!({"n": 0}),
        trace_id,
        ..StartRequest::default()
    };
    engine.start_execution("t", req).await.unwrap();
    let check = |task: &sluice_engine::TaskInfo| {
        assert_eq!(task.trace_id, TRACE);
        let parent = TraceParent::parse(&task.traceparent).unwrap_or_else(|| panic!("{}", task.traceparent));
        assert_eq!(parent.trace_id.as_str(), TRACE);
    };

    // The child's task survives a restart with its trace id (the store keeps it).
    bg.abort();
    drop(engine);
    let (engine, _bg) =
        Engine::start(Arc::new(SqliteStore::open(&path).unwrap()), EngineOptions::default()).await.unwrap();
    let tasks = engine.poll("t", "kq", "w", 10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tasks.len(), 1);
    check(&tasks[0]);
    engine.complete("t", &tasks[0].task_token, json!(1)).await.unwrap();
    // The continued run's child asks again, in the same trace, from another span.
    let again = engine.poll("t", "kq", "w", 10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1);
    check(&again[0]);
    assert_ne!(again[0].traceparent, tasks[0].traceparent);
    engine.complete("t", &again[0].task_token, json!(2)).await.unwrap();
    let row = engine.wait_result("t", "loop-1", Duration::from_secs(10)).await.unwrap();
    assert_eq!(row.status, sluice_core::ExecStatus::Completed, "{row:?}");

    let page =
        engine.list_executions("t", sluice_store::ExecutionFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(page.items.len(), 4, "two runs of looping, one kid each");
    for run in &page.items {
        let (_, events) = engine.history("t", &run.workflow_id, Some(&run.run_id), 0, 1).await.unwrap();
        match &events[0].kind {
            sluice_core::event::EventKind::ExecutionStarted { trace_id, .. } => {
                assert_eq!(trace_id.as_deref(), Some(TRACE), "{} {}", run.workflow_id, run.run_id)
            }
            other => panic!("first event {other:?}"),
        }
    }

    // Without one, an execution gets a trace of its own.
    let req = StartRequest { workflow: "kid".into(), input: json!(0), ..StartRequest::default() };
    let started = engine.start_execution("t", req).await.unwrap();
    let (_, events) = engine.history("t", &started.workflow_id, None, 0, 1).await.unwrap();
    let sluice_core::event::EventKind::ExecutionStarted { trace_id: Some(own), .. } = &events[0].kind else {
        panic!("no trace id: {:?}", events[0]);
    };
    assert!(TraceId::parse(own).is_some() && own != TRACE, "{own}");
}

fn usage_row(n: usize) -> sluice_store::UsageRow {
    sluice_store::UsageRow {
        id: format!("{n:036}"),
        tenant: "t".into(),
        at_ms: 1_700_000_000_000 + n as i64,
        api_key: None,
        source: "chat".into(),
        route: "r".into(),
        target: "p/m".into(),
        provider: "p".into(),
        model: "m".into(),
        attempt: 1,
        input_tokens: 1,
        output_tokens: 1,
        cost_usd: None,
        latency_us: 10,
        outcome: "success".into(),
        experiment: None,
        arm: None,
        run_id: None,
        workflow_id: None,
        step: None,
    }
}

async fn ledger_len(engine: &Engine) -> usize {
    let mut filter = sluice_store::UsageFilter { limit: 1000, ..Default::default() };
    let mut n = 0;
    loop {
        let page = engine.store().list_usage("t", filter.clone()).await.unwrap();
        n += page.items.len();
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => return n,
        }
    }
}

/// Queued usage rows (the chat endpoint's) reach the store without anyone asking, within the
/// writer's tick; a flush writes what is queued at once; a burst is written whole.
#[tokio::test]
async fn queued_usage_rows_are_committed_by_the_writer_and_by_a_flush() {
    let store = SqliteStore::open(&db_path("usage")).unwrap();
    let (engine, _bg) = Engine::start(Arc::new(store), EngineOptions::default()).await.unwrap();
    let ledger = |range: std::ops::Range<usize>| sluice_engine::Ledger {
        usage: range.map(usage_row).collect(),
        alerts: Vec::new(),
    };

    engine.queue_usage(ledger(0..3));
    let mut written = 0;
    for _ in 0..200 {
        written = ledger_len(&engine).await;
        if written == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(written, 3, "the writer commits queued rows on its own");

    engine.queue_usage(ledger(3..5));
    engine.flush_usage().await.unwrap();
    assert_eq!(ledger_len(&engine).await, 5, "a flush commits what is queued before it returns");

    for i in 0..25 {
        engine.queue_usage(ledger(5 + i * 100..5 + (i + 1) * 100));
    }
    engine.flush_usage().await.unwrap();
    assert_eq!(ledger_len(&engine).await, 2505);
    engine.flush_usage().await.unwrap();
    assert_eq!(ledger_len(&engine).await, 2505, "nothing is written twice");
}
