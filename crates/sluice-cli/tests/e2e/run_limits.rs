//! Issue 13, item 22: what one execution may hold is bounded. Inputs, signal payloads, step
//! outputs (of transforms and of workers), task inputs, map lists and the bytes a run holds in
//! all answer a typed error naming the limit, and the run or the node is not hurt by the attempt.

use serde_json::{json, Value};

use super::*;

on_both_backends!(an_execution_holds_only_what_its_limits_allow);

async fn an_execution_holds_only_what_its_limits_allow(backend: Backend) {
    let db = Db::new("limits", backend);
    let args = [
        "--max-input-size",
        "100KiB",
        "--max-signal-size",
        "64KiB",
        "--max-run-size",
        "300KiB",
        "--max-output-size",
        "128KiB",
        "--max-map-items",
        "100",
    ];
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &args).await;
    let api = server.api();
    let _worker = WorkerProcess::rust(&bin(), &server, &["echo"], None);
    api.publish(&json!({"name": "parked", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
    ]}))
    .await;

    // An input over the limit is refused before anything is stored.
    let big = "x".repeat(200 * 1024);
    let (status, body) =
        api.post("/v1/executions", &json!({"workflow": "parked", "workflow_id": "big-in", "input": {"s": big}})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(body["error"]["details"]["setting"], "max input size", "{body}");
    assert_eq!(body["error"]["details"]["limit"], 100 * 1024, "{body}");
    assert_eq!(api.get("/v1/executions/big-in").await.0, 404, "nothing was started");

    // Signals: one over the payload limit is refused; small ones are buffered until the run's
    // held bytes would pass its limit, then refused too, and the run goes on.
    let id = api.start("parked", Value::Null, Some("parked-1")).await;
    let signal = |size: usize| json!({"payload": {"s": "y".repeat(size)}});
    let (status, body) = api.post(&format!("/v1/executions/{id}/signals/note"), &signal(100 * 1024)).await;
    assert_eq!((status, body["error"]["details"]["setting"].clone()), (413, json!("max signal size")), "{body}");
    let mut accepted = 0;
    let refused = loop {
        let (status, body) = api.post(&format!("/v1/executions/{id}/signals/note"), &signal(60 * 1024)).await;
        if status != 202 && status != 200 {
            break (status, body);
        }
        accepted += 1;
        assert!(accepted < 10, "buffered signals are bounded");
    };
    assert_eq!(refused.0, 413, "{}", refused.1);
    assert_eq!(refused.1["error"]["details"]["setting"], "max run size", "{}", refused.1);
    assert_eq!(accepted, 4, "300 KiB hold four signals of 60 KiB and the run's other events");
    let (status, _) = api.post(&format!("/v1/executions/{id}/signals/go"), &json!({"payload": 1})).await;
    assert!(status == 200 || status == 202);
    assert_eq!(api.wait(&id, 30).await["status"], "completed");

    // Outputs and lists: each fails its step with a typed error naming the limit.
    let cases = [
        ("big-transform", json!([{"id": "a", "type": "transform", "expr": "\"x\" * 200000"}]), "step.output_too_large"),
        (
            "big-task-output",
            // 100 + 90 KB held, a 60 KB task input fits, its 60 KB output does not.
            json!([
                {"id": "a", "type": "transform", "expr": "\"z\" * 100000"},
                {"id": "b", "type": "transform", "expr": "\"z\" * 90000"},
                {"id": "c", "type": "task", "queue": "echo", "input": "{s: (\"z\" * 60000)}"}
            ]),
            "execution.too_large",
        ),
        (
            "echo-over-output",
            json!([{"id": "b", "type": "task", "queue": "echo", "input": "{s: (\"z\" * 100000), t: (\"z\" * 50000)}"}]),
            "step.output_too_large",
        ),
        (
            "many-items",
            json!([{"id": "m", "type": "map", "items": "[range(1000)]",
                    "steps": [{"id": "i", "type": "transform", "expr": ".item"}]}]),
            "map.too_many_items",
        ),
    ];
    for (name, steps, code) in cases {
        api.publish(&json!({"name": name, "steps": steps})).await;
        let id = api.start(name, Value::Null, None).await;
        let row = api.wait(&id, 30).await;
        assert_eq!(row["status"], "failed", "{name}: {row}");
        assert_eq!(row["error"]["type"], code, "{name}: {row}");
        let message = row["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("limit"), "{name}: the error names the limit: {row}");
        if name == "big-task-output" {
            assert_eq!(row["failed_step"], "c", "the worker's output was refused: {row}");
        }
    }

    // Below the limits all of it works.
    api.publish(&json!({"name": "fits", "steps": [
        {"id": "m", "type": "map", "items": "[range(100)]", "steps": [{"id": "i", "type": "transform", "expr": ".item"}]},
        {"id": "b", "type": "task", "queue": "echo", "input": "{s: (\"z\" * 50000)}"}
    ]}))
    .await;
    let id = api.start("fits", Value::Null, None).await;
    assert_eq!(api.wait(&id, 30).await["status"], "completed");
    assert_eq!(api.get("/healthz").await.0, 200);
}
