//! Every step type through the HTTP API, plus retries, the dead-letter queue, pause, resume,
//! cancel, timeouts and queries.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

on_both_backends!(
    every_step_type_runs_end_to_end_with_the_rust_worker,
    every_step_type_runs_end_to_end_with_the_python_worker,
    fail_step_fails_without_dead_letter_and_idempotent_start,
    retries_back_off_then_dead_letter_then_redrive_completes,
    pause_stops_scheduling_and_resume_continues,
    cancel_reaches_the_worker_through_heartbeat_and_timeouts_retry,
    queries_read_state_without_changing_it,
    continue_as_new_keeps_each_run_history_bounded_over_10000_iterations,
    schedule_to_start_and_heartbeat_timeouts_fail_the_attempt,
    replay_command_proves_decisions_and_shows_the_timeline,
    a_failing_child_is_retried_then_fails_its_parent,
);

/// The `http` step calls the server's own `/healthz`, on loopback: the egress policy denies it
/// unless allowed.
const ALLOW_LOOPBACK: &[&str] = &["--egress-allow", "127.0.0.1/32"];

async fn every_step_type_runs_end_to_end_with_the_rust_worker(backend: Backend) {
    let db = Db::new("steps", backend);
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), ALLOW_LOOPBACK).await;
    let _worker = WorkerProcess::rust(&bin(), &server, &[], None);
    every_step_type(&server).await;
}

async fn every_step_type_runs_end_to_end_with_the_python_worker(backend: Backend) {
    let db = Db::new("steps-python", backend);
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), ALLOW_LOOPBACK).await;
    let _worker = WorkerProcess::python(&repo(), &server, &["greet", "echo"], None);
    every_step_type(&server).await;
}

async fn every_step_type(server: &ServerProcess) {
    let api = server.api();
    api.publish(&json!({
        "name": "child-wf",
        "steps": [{"id": "double", "type": "transform", "expr": ".input.n * 2"}]
    }))
    .await;
    api.publish(&json!({
        "name": "all-steps",
        "steps": [
            {"id": "t1", "type": "task", "queue": "greet", "input": "{name: .input.name}"},
            {"id": "skipped", "type": "transform", "when": "false", "expr": "1"},
            {"id": "h", "type": "http", "url": ".input.health"},
            {"id": "sw", "type": "switch",
             "cases": [{"when": ".steps.h.status == 200", "steps": [{"id": "sw_ok", "type": "transform", "expr": "\"up\""}]}],
             "default": [{"id": "sw_down", "type": "transform", "expr": "\"down\""}]},
            {"id": "par", "type": "parallel", "branches": {
                "a": [{"id": "pa", "type": "task", "queue": "echo", "input": "{x: 1}"}],
                "b": [{"id": "pb", "type": "transform", "expr": "2"}]}},
            {"id": "m", "type": "map", "items": "[1, 2, 3]", "max_concurrency": 2,
             "steps": [{"id": "mi", "type": "task", "queue": "echo", "input": ".item * 10"}]},
            {"id": "nap", "type": "sleep", "duration": "200ms"},
            {"id": "sig", "type": "wait_signal", "signal": "go", "timeout": "30s"},
            {"id": "kid", "type": "child", "workflow": "child-wf", "input": "{n: 5}"},
            {"id": "out", "type": "return", "output":
                "{greeting: .steps.t1.greeting, skipped: .steps.skipped, http: .steps.h.body.status, sw: .steps.sw, par: .steps.par, m: .steps.m, sig: .steps.sig, kid: .steps.kid}"},
            {"id": "never", "type": "fail", "error": "unreachable"}
        ]
    }))
    .await;
    let health = format!("\"{}/healthz\"", server.base);
    let id = api
        .start(
            "all-steps",
            json!({"name": "Ada", "health": serde_json::from_str::<Value>(&health).unwrap()}),
            Some("all-1"),
        )
        .await;
    let (status, _) = api.post(&format!("/v1/executions/{id}/signals/go"), &json!({"ok": true})).await;
    assert_eq!(status, 202);
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(
        row["output"],
        json!({"greeting": "Hello, Ada", "skipped": null, "http": "ok", "sw": "up", "par": {"a": {"x": 1}, "b": 2},
               "m": [10, 20, 30], "sig": {"ok": true}, "kid": 10})
    );
    let events = api.history(&id, None).await;
    for ty in [
        "step_skipped",
        "timer_started",
        "timer_fired",
        "signal_consumed",
        "child_started",
        "child_completed",
        "map_started",
        "branch_chosen",
    ] {
        assert!(!of_type(&events, ty).is_empty(), "no {ty} in history");
    }
    // The child ran as its own execution with a derived id.
    let (status, child) = api.get("/v1/executions/all-1.kid").await;
    assert_eq!(status, 200, "{child}");
    assert_eq!(child["output"], 10);
    assert_eq!(child["parent"]["workflow_id"], "all-1");
    assert!(assert_replays(&api).await >= 2);
}

async fn fail_step_fails_without_dead_letter_and_idempotent_start(backend: Backend) {
    let db = Db::new("fail", backend);
    let (server, _worker) = server_with_worker_on(&db).await;
    let api = server.api();
    api.publish(&json!({"name": "failing", "steps": [
        {"id": "no", "type": "fail", "error": "out_of_stock", "message": "\"item \\(.input.sku) is gone\""}
    ]}))
    .await;
    let id = api.start("failing", json!({"sku": "A1"}), Some("order-9")).await;
    let row = api.wait(&id, 10).await;
    assert_eq!(row["status"], "failed");
    assert_eq!(row["error"], json!({"type": "out_of_stock", "message": "item A1 is gone"}));
    assert_eq!(row["dead_letter"], false);

    api.publish(&json!({"name": "waiter", "steps": [{"id": "w", "type": "wait_signal", "signal": "go"}]})).await;
    let (s1, a) = api.post("/v1/executions", &json!({"workflow": "waiter", "workflow_id": "same"})).await;
    let (s2, b) = api.post("/v1/executions", &json!({"workflow": "waiter", "workflow_id": "same"})).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a["run_id"], b["run_id"]);
    assert_eq!(b["created"], false);
    assert_replays(&api).await;
}

async fn retries_back_off_then_dead_letter_then_redrive_completes(backend: Backend) {
    let db = Db::new("retry", backend);
    let (server, _worker) = server_with_worker_on(&db).await;
    let api = server.api();
    api.publish(&json!({"name": "flaky", "steps": [
        {"id": "call", "type": "task", "queue": "flaky",
         "retry": {"max_attempts": 3, "initial_interval": "100ms", "backoff_coefficient": 2, "jitter": 0}}
    ]}))
    .await;
    let id = api.start("flaky", json!({"succeed_on_attempt": 4}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["dead_letter"], true);
    assert_eq!(row["failed_step"], "call");

    let events = api.history(&id, None).await;
    let scheduled = of_type(&events, "task_scheduled");
    let delays: Vec<u64> = scheduled.iter().map(|e| e["delay_ms"].as_u64().unwrap()).collect();
    assert_eq!(delays, vec![0, 100, 200], "attempt count and growing intervals");
    let failed_at: Vec<i64> = of_type(&events, "task_failed").iter().map(|e| e["at_ms"].as_i64().unwrap()).collect();
    assert_eq!(failed_at.len(), 3);
    assert!(failed_at[1] - failed_at[0] >= 100 && failed_at[2] - failed_at[1] >= 200, "{failed_at:?}");

    let (_, dlq) = api.get("/v1/dlq").await;
    assert!(dlq["executions"].as_array().unwrap().iter().any(|e| e["workflow_id"] == id.as_str()), "{dlq}");

    let (status, body) = api.post(&format!("/v1/dlq/{id}/redrive"), &Value::Null).await;
    assert_eq!(status, 202, "{body}");
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(row["output"], json!({"attempt": 4}));
    let (_, dlq) = api.get("/v1/dlq").await;
    assert!(!dlq["executions"].as_array().unwrap().iter().any(|e| e["workflow_id"] == id.as_str()));
    // A second redrive is refused: it is no longer dead-lettered.
    let (status, _) = api.post(&format!("/v1/dlq/{id}/redrive"), &Value::Null).await;
    assert_eq!(status, 409);
    assert_replays(&api).await;
}

async fn pause_stops_scheduling_and_resume_continues(backend: Backend) {
    let db = Db::new("pause", backend);
    let (server, _worker) = server_with_worker_on(&db).await;
    let api = server.api();
    api.publish(&json!({"name": "gated", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "work", "type": "task", "queue": "echo", "input": "{done: true}"}
    ]}))
    .await;
    let id = api.start("gated", Value::Null, Some("gated-1")).await;
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/pause"), &Value::Null).await.0, 202);
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/go"), &Value::Null).await.0, 202);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let events = api.history(&id, None).await;
    assert!(of_type(&events, "task_scheduled").is_empty(), "a step was scheduled while paused");
    let (_, row) = api.get(&format!("/v1/executions/{id}")).await;
    assert_eq!(row["paused"], true);
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/resume"), &Value::Null).await.0, 202);
    let row = api.wait(&id, 30).await;
    assert_eq!(row["output"], json!({"done": true}), "{row}");
    assert_replays(&api).await;
}

async fn cancel_reaches_the_worker_through_heartbeat_and_timeouts_retry(backend: Backend) {
    let db = Db::new("cancel", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "manual", "steps": [
        {"id": "long", "type": "task", "queue": "manual", "timeouts": {"start_to_close": "300ms"},
         "retry": {"max_attempts": 2, "initial_interval": "10ms"}}
    ]}))
    .await;
    let id = api.start("manual", json!({"x": 1}), Some("manual-1")).await;
    // This test is the worker: it polls by hand and never completes attempt 1.
    let (_, polled) = api.post("/v1/tasks/poll", &json!({"queue": "manual", "wait_ms": 5000})).await;
    let t1 = polled["tasks"][0].clone();
    assert_eq!(t1["attempt"], 1, "{polled}");
    assert_eq!(t1["input"], json!({"x": 1}));
    assert_eq!(t1["idempotency_key"], t1["task_token"]);
    let (_, polled) = api.post("/v1/tasks/poll", &json!({"queue": "manual", "wait_ms": 5000})).await;
    let t2 = polled["tasks"][0].clone();
    assert_eq!(t2["attempt"], 2, "the timed-out attempt was retried: {polled}");
    let events = api.history(&id, None).await;
    assert_eq!(of_type(&events, "task_failed")[0]["error"]["type"], "timeout.start_to_close");
    // The late result of attempt 1 is refused.
    let (status, body) = api.post("/v1/tasks/complete", &json!({"task_token": t1["task_token"], "output": 1})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("task_not_found")));

    let (_, hb) = api.post("/v1/tasks/heartbeat", &json!({"task_token": t2["task_token"]})).await;
    assert_eq!(hb["cancel_requested"], false);
    assert_eq!(api.post(&format!("/v1/executions/{id}/cancel"), &json!({"reason": "customer left"})).await.0, 202);
    let (_, hb) = api.post("/v1/tasks/heartbeat", &json!({"task_token": t2["task_token"]})).await;
    assert_eq!(hb["cancel_requested"], true);
    let row = api.wait(&id, 5).await;
    assert_eq!(row["status"], "cancelled");
    assert_eq!(row["error"]["message"], "customer left");
    let (status, _) = api.post(&format!("/v1/executions/{id}/signals/go"), &Value::Null).await;
    assert_eq!(status, 409, "signals to an ended execution are refused");
    assert_replays(&api).await;
}

async fn queries_read_state_without_changing_it(backend: Backend) {
    let db = Db::new("query", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "q", "steps": [
        {"id": "a", "type": "transform", "expr": ".input.x + 1"},
        {"id": "w", "type": "wait_signal", "signal": "go"}
    ], "queries": {"progress": "{a: .steps.a, waiting: (.steps.w == null)}"}}))
        .await;
    let id = api.start("q", json!({"x": 41}), None).await;
    let before = api.history(&id, None).await.len();
    let (status, body) = api.get(&format!("/v1/executions/{id}/queries/progress")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!({"a": 42, "waiting": true}));
    let (_, state) = api.get(&format!("/v1/executions/{id}/queries/state")).await;
    assert_eq!(state["result"]["status"], "running");
    assert_eq!(api.history(&id, None).await.len(), before);
    let (status, body) = api.get(&format!("/v1/executions/{id}/queries/nope")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("query_not_found")));
}

async fn continue_as_new_keeps_each_run_history_bounded_over_10000_iterations(backend: Backend) {
    let db = Db::new("loop", backend);
    // As fast as the engine goes: no limit on the rate of continued runs.
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--continue-as-new-rate", "0"]).await;
    let api = server.api();
    api.publish_file(&repo().join("examples/loop.yaml")).await;
    let id = api.start("loop", json!({"n": 10000}), Some("count")).await;
    let row = api.wait(&id, 600).await;
    assert_eq!(row["output"], json!({"iterations": 10000}), "{row}");
    let (_, page) = api.get("/v1/executions?workflow_id=count&limit=500").await;
    let runs = page["executions"].as_array().unwrap();
    assert_eq!(runs.len(), 500);
    for r in runs {
        let len = r["history_length"].as_u64().unwrap();
        assert!(len <= 6, "a run kept {len} events");
    }
}

async fn schedule_to_start_and_heartbeat_timeouts_fail_the_attempt(backend: Backend) {
    let db = Db::new("timeouts", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "nobody-home", "steps": [
        {"id": "wait", "type": "task", "queue": "empty", "timeouts": {"schedule_to_start": "200ms"},
         "retry": {"max_attempts": 1}}
    ]}))
    .await;
    let id = api.start("nobody-home", Value::Null, None).await;
    let row = api.wait(&id, 10).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["error"]["type"], "timeout.schedule_to_start");

    api.publish(&json!({"name": "silent", "steps": [
        {"id": "work", "type": "task", "queue": "silent", "timeouts": {"heartbeat": "300ms", "start_to_close": "1h"},
         "retry": {"max_attempts": 1}}
    ]}))
    .await;
    let id = api.start("silent", Value::Null, None).await;
    let (_, polled) = api.post("/v1/tasks/poll", &json!({"queue": "silent", "wait_ms": 5000})).await;
    let token = polled["tasks"][0]["task_token"].clone();
    assert_eq!(polled["tasks"][0]["heartbeat_timeout_ms"], 300);
    // Heartbeats keep the attempt alive past its heartbeat timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, hb) = api.post("/v1/tasks/heartbeat", &json!({"task_token": token})).await;
        assert_eq!(hb["cancel_requested"], false);
    }
    // ...and silence ends it.
    let row = api.wait(&id, 10).await;
    assert_eq!(row["error"]["type"], "timeout.heartbeat", "{row}");
    assert_replays(&api).await;
}

async fn replay_command_proves_decisions_and_shows_the_timeline(backend: Backend) {
    let db = Db::new("replay", backend);
    let (server, _worker) = server_with_worker_on(&db).await;
    let api = server.api();
    api.publish_file(&repo().join("examples/hello.yaml")).await;
    let id = api.start("hello", json!({"name": "Grace"}), Some("replay-me")).await;
    api.wait(&id, 20).await;
    let out = std::process::Command::new(bin())
        .args(["--server", &server.base, "--json", "replay", "replay-me"])
        .env("SLUICE_API_KEY", server.key.as_deref().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["matches"], true);
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), api.history(&id, None).await.len());
    assert_eq!(timeline.last().unwrap()["status"], "completed");
    assert_eq!(timeline[2]["state"]["steps"]["greet"], json!({"greeting": "Hello, Grace"}));
    let out = std::process::Command::new(bin())
        .args(["--server", &server.base, "replay", "nobody"])
        .env("SLUICE_API_KEY", server.key.as_deref().unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("execution_not_found"));
}

async fn a_failing_child_is_retried_then_fails_its_parent(backend: Backend) {
    let db = Db::new("child-fail", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(
        &json!({"name": "broken", "steps": [{"id": "no", "type": "fail", "error": "broken", "message": "\"nope\""}]}),
    )
    .await;
    api.publish(&json!({"name": "parent", "steps": [
        {"id": "kid", "type": "child", "workflow": "broken", "retry": {"max_attempts": 2, "initial_interval": "10ms"}}
    ]}))
    .await;
    let id = api.start("parent", Value::Null, Some("fam")).await;
    let row = api.wait(&id, 20).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["dead_letter"], true);
    assert_eq!(row["error"]["type"], "broken");
    assert_eq!(row["failed_step"], "kid");
    for child in ["fam.kid", "fam.kid.attempt-2"] {
        let (status, c) = api.get(&format!("/v1/executions/{child}")).await;
        assert_eq!((status, c["status"].as_str()), (200, Some("failed")), "{child}: {c}");
    }
    let events = api.history(&id, None).await;
    assert_eq!(of_type(&events, "child_failed").len(), 2);

    // A cancelled child fails its parent's step too.
    api.publish(&json!({"name": "slow", "steps": [{"id": "w", "type": "wait_signal", "signal": "never"}]})).await;
    api.publish(&json!({"name": "waits-for-slow", "steps": [
        {"id": "kid", "type": "child", "workflow": "slow", "retry": {"max_attempts": 1}}
    ]}))
    .await;
    let id = api.start("waits-for-slow", Value::Null, Some("fam2")).await;
    api.wait_until("fam2.kid", 10, |r| r["status"] == "running").await;
    assert_eq!(api.post("/v1/executions/fam2.kid/cancel", &Value::Null).await.0, 202);
    let row = api.wait(&id, 10).await;
    assert_eq!(row["error"]["type"], "child.cancelled", "{row}");
    assert_replays(&api).await;
}
