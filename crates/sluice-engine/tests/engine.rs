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
