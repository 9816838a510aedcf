//! Issue 13: what one tenant's workflow can do to a node. Expressions that used to abort the
//! process, hold a runtime thread for ever or take gigabytes now end in a typed step error
//! (`expr.limit`), as steps and as queries, while the node keeps serving.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

on_both_backends!(hostile_expressions_fail_their_step_and_the_node_keeps_serving);

/// Each of these crashed or stalled the node before (issue 13, item 1).
pub(crate) const HOSTILE: &[(&str, &str)] = &[
    ("recursion", "def f: [f]; f"),
    ("deep-value", "reduce range(100000) as $i (0; [.])"),
    ("deep-json", ".input.s | fromjson"),
    ("huge-string", "\"x\" * 100000000000"),
    ("doubling", "reduce range(26) as $i ([0]; . + .)"),
    ("shared-tostring", "reduce range(40) as $i ([]; [., .]) | tostring"),
    ("shared-result", "reduce range(40) as $i ([]; [., .])"),
];

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn hostile_expressions_fail_their_step_and_the_node_keeps_serving(backend: Backend) {
    let db = Db::new("hostile", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    let deep_json = "[".repeat(100_000);
    api.publish(&json!({"name": "ok", "steps": [{"id": "a", "type": "transform", "expr": ".input.n + 1"}]})).await;

    let mut ids = Vec::new();
    for (name, expr) in HOSTILE {
        api.publish(&json!({"name": format!("hostile-{name}"), "steps": [
            {"id": "boom", "type": "transform", "expr": expr}
        ]}))
        .await;
        ids.push((name, api.start(&format!("hostile-{name}"), json!({"s": deep_json}), None).await));
    }
    // While they run, the node answers and other work completes.
    let started = Instant::now();
    for i in 0..20 {
        let (status, _) = api.get("/healthz").await;
        assert_eq!(status, 200);
        let id = api.start("ok", json!({"n": i}), None).await;
        assert_eq!(api.wait(&id, 30).await["output"], json!(i + 1));
    }
    assert!(started.elapsed() < Duration::from_secs(30), "other work was held up: {:?}", started.elapsed());

    for (name, id) in &ids {
        let row = api.wait(id, 60).await;
        assert_eq!(row["status"], "failed", "{name}: {row}");
        assert_eq!(row["error"]["type"], "expr.limit", "{name}: {row}");
        let message = row["error"]["message"].as_str().unwrap_or_default();
        assert!(message.len() < 1024, "{name}: the error quotes too much: {} bytes", message.len());
    }

    // A query does the same work again and again, callable by any reader: same limits.
    api.publish(&json!({"name": "hostile-query", "steps": [
        {"id": "w", "type": "wait_signal", "signal": "go"}
    ], "queries": {
        "double": "reduce range(40) as $i (\"ab\"; . + .)",
        "shared": "reduce range(40) as $i ([]; [., .]) | tostring",
        "recurse": "def f: [f]; f",
        "fine": "{waiting: true}"
    }}))
    .await;
    let id = api.start("hostile-query", json!({}), None).await;
    for _ in 0..3 {
        for q in ["double", "shared", "recurse"] {
            let (status, body) = api.get(&format!("/v1/executions/{id}/queries/{q}")).await;
            assert_eq!(status, 400, "{q}: {body}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("limit") || message.contains("deeply"), "{q}: {body}");
        }
    }
    let (status, body) = api.get(&format!("/v1/executions/{id}/queries/fine")).await;
    assert_eq!((status, &body["result"]), (200, &json!({"waiting": true})));

    // Memory went back to what it was: nothing the attacks built is kept (mimalloc returns
    // freed pages over time, so allow it a moment).
    let pid = server.pid().expect("the server runs");
    let mut rss = rss_kib(pid);
    for _ in 0..50 {
        if rss < 512 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss_kib(pid);
    }
    assert!(rss < 512 * 1024, "the server holds {rss} KiB after the attacks");

    let (status, _) = api.post(&format!("/v1/executions/{id}/signals/go"), &Value::Null).await;
    assert_eq!(status, 202);
    assert_replays(&api).await;
}
