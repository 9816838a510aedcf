//! Endless `continue_as_new` chains: cancel, pause and signals by workflow id reach the chain's
//! current run however fast its runs end, also after a restart; a tenant's continued runs start
//! at a bounded rate; a chain longer than the limit fails with `engine.chain_too_long`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

on_both_backends!(
    an_endless_chain_is_stopped_by_cancel_and_pause_by_workflow_id,
    a_chain_longer_than_the_limit_fails_typed,
    continue_as_new_runs_start_at_the_tenants_rate,
);

/// Counts up forever, one run per iteration.
async fn publish_forever(api: &Api) {
    api.publish(&json!({"name": "forever", "steps": [
        {"id": "next", "type": "transform", "expr": "{i: ((.input.i // 0) + 1)}"},
        {"id": "again", "type": "continue_as_new", "input": ".steps.next"}
    ]}))
    .await;
}

/// The iteration the chain `id` is at: its latest run's input.
async fn iteration(api: &Api, id: &str) -> u64 {
    let (status, row) = api.get(&format!("/v1/executions/{id}")).await;
    assert_eq!(status, 200, "{row}");
    row["input"]["i"].as_u64().unwrap_or(0)
}

async fn wait_iteration(api: &Api, id: &str, at_least: u64, secs: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let i = iteration(api, id).await;
        if i >= at_least {
            return i;
        }
        assert!(Instant::now() < deadline, "the chain `{id}` is at {i}, not {at_least}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn an_endless_chain_is_stopped_by_cancel_and_pause_by_workflow_id(backend: Backend) {
    let db = Db::new("endless", backend);
    // No rate limit: runs end as fast as the engine makes them.
    let mut server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--continue-as-new-rate", "0"]).await;
    let api = server.api();
    publish_forever(&api).await;
    api.start("forever", Value::Null, Some("forever-1")).await;
    api.start("forever", Value::Null, Some("forever-2")).await;
    wait_iteration(&api, "forever-1", 50, 30).await;

    // It keeps going after a restart, and can still be stopped.
    server.restart().await;
    let api = server.api();
    let at = iteration(&api, "forever-1").await;
    wait_iteration(&api, "forever-1", at + 50, 30).await;

    let sent = Instant::now();
    let (status, body) = api.post("/v1/executions/forever-1/cancel", &json!({"reason": "enough"})).await;
    assert_eq!(status, 202, "{body}");
    let row = api.wait("forever-1", 5).await;
    assert_eq!(row["status"], "cancelled", "{row}");
    assert!(sent.elapsed() < Duration::from_secs(5), "stopped after {:?}", sent.elapsed());
    let stopped = iteration(&api, "forever-1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(iteration(&api, "forever-1").await, stopped, "no run after the cancelled one");

    // Pause, then resume, then the `cancel` signal, on the other chain.
    let (status, body) = api.post("/v1/executions/forever-2/signals/pause", &Value::Null).await;
    assert_eq!(status, 202, "{body}");
    let (_, row) = api.get("/v1/executions/forever-2").await;
    assert_eq!((&row["status"], &row["paused"]), (&json!("running"), &json!(true)), "{row}");
    let paused_at = iteration(&api, "forever-2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(iteration(&api, "forever-2").await, paused_at, "a paused chain takes no step");
    let (status, body) = api.post("/v1/executions/forever-2/signals/resume", &Value::Null).await;
    assert_eq!(status, 202, "{body}");
    wait_iteration(&api, "forever-2", paused_at + 20, 10).await;
    let (status, body) = api.post("/v1/executions/forever-2/signals/cancel", &json!({"reason": "done"})).await;
    assert_eq!(status, 202, "{body}");
    let row = api.wait("forever-2", 5).await;
    assert_eq!(row["status"], "cancelled", "{row}");

    // A chain that ended answers as ended.
    let (status, body) = api.post("/v1/executions/forever-1/cancel", &Value::Null).await;
    assert_eq!((status, &body["error"]["code"]), (409, &json!("execution_not_running")), "{body}");
}

async fn a_chain_longer_than_the_limit_fails_typed(backend: Backend) {
    let db = Db::new("chain-cap", backend);
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--max-chain-length", "5"]).await;
    let api = server.api();
    publish_forever(&api).await;
    api.start("forever", Value::Null, Some("capped")).await;
    let row = api.wait("capped", 20).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["error"]["type"], "engine.chain_too_long", "{row}");
    assert!(row["error"]["message"].as_str().unwrap().contains("limit of 5 runs"), "{row}");
    assert_eq!(row["error"]["details"]["limit"], 5, "{row}");
    // Five runs took steps; the sixth failed before its first.
    let (_, page) = api.get("/v1/executions?workflow_id=capped&limit=100").await;
    let statuses: Vec<&str> =
        page["executions"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["failed", "continued_as_new", "continued_as_new", "continued_as_new", "continued_as_new", "continued_as_new"]
    );
    let history = api.history("capped", None).await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["type"], "execution_aborted");
    assert_eq!(history[0]["chain"], 5);
    // Within the limit, chains end as they should.
    api.publish_file(&repo().join("examples/loop.yaml")).await;
    let id = api.start("loop", json!({"n": 5}), None).await;
    assert_eq!(api.wait(&id, 20).await["output"], json!({"iterations": 5}));
    assert_replays(&api).await;
}

async fn continue_as_new_runs_start_at_the_tenants_rate(backend: Backend) {
    let db = Db::new("chain-rate", backend);
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--continue-as-new-rate", "20"]).await;
    let api = server.api();
    publish_forever(&api).await;
    api.start("forever", Value::Null, Some("rate-a")).await;
    api.start("forever", Value::Null, Some("rate-b")).await;
    // The burst (ten seconds' worth: 200 runs) goes at once, then 20 runs a second for the
    // tenant, both chains together.
    let deadline = Instant::now() + Duration::from_secs(20);
    while iteration(&api, "rate-a").await + iteration(&api, "rate-b").await < 200 {
        assert!(Instant::now() < deadline, "the burst did not go at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = iteration(&api, "rate-a").await + iteration(&api, "rate-b").await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = iteration(&api, "rate-a").await + iteration(&api, "rate-b").await;
    let rate = (after - before) as f64 / t0.elapsed().as_secs_f64();
    assert!((10.0..=30.0).contains(&rate), "{rate:.1} runs/s, expected about 20");
    // Throttled, not failed: both still run, and a cancel reaches a run waiting for its turn.
    for id in ["rate-a", "rate-b"] {
        let (_, row) = api.get(&format!("/v1/executions/{id}")).await;
        assert_eq!(row["status"], "running", "{row}");
        let (status, body) = api.post(&format!("/v1/executions/{id}/cancel"), &Value::Null).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(api.wait(id, 5).await["status"], "cancelled");
    }
}
