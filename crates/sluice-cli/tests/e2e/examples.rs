//! Every shipped example runs end to end, with the Rust worker and with the Python worker.

use serde_json::json;

use super::*;

on_both_backends!(examples_run_with_the_rust_worker, examples_run_with_the_python_worker,);

async fn run_examples(api: &Api) {
    for f in ["hello", "approval", "retry-dlq", "fan-out", "loop"] {
        api.publish_file(&repo().join(format!("examples/{f}.yaml"))).await;
    }

    let id = api.start("hello", json!({"name": "Ada"}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(row["output"], json!({"message": "Hello, Ada", "length": 10}));

    let id = api.start("fan-out", json!({"items": ["ada", "grace", "alan"]}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(row["output"]["count"], 3);
    assert_eq!(row["output"]["items"].as_array().map(|a| a.len()), Some(3));

    let id = api.start("loop", json!({"n": 25}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["output"], json!({"iterations": 25}), "{row}");

    let id = api.start("retry-dlq", json!({"succeed_on_attempt": 2}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "completed", "{row}");

    let id = api.start("retry-dlq", json!({}), None).await;
    let row = api.wait(&id, 30).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["dead_letter"], true);

    let id = api.start("approval", json!({"document": "refund #42", "amount": 120}), Some("refund-42")).await;
    api.wait_until(&id, 30, |r| r["history_length"].as_u64().unwrap_or(0) >= 4).await;
    let (_, q) = api.get(&format!("/v1/executions/{id}/queries/waiting")).await;
    assert_eq!(q["result"], true, "{q}");
    let (status, _) =
        api.post(&format!("/v1/executions/{id}/signals/approve"), &json!({"approved": true, "by": "grace"})).await;
    assert_eq!(status, 202);
    let row = api.wait(&id, 30).await;
    assert_eq!(row["output"], json!({"status": "approved", "document": "refund #42", "by": "grace"}), "{row}");
}

async fn examples_run_with_the_rust_worker(backend: Backend) {
    let db = Db::new("examples-rust", backend);
    let (server, _worker) = server_with_worker_on(&db).await;
    let api = server.api();
    run_examples(&api).await;
    assert!(assert_replays(&api).await >= 6);
}

async fn examples_run_with_the_python_worker(backend: Backend) {
    let db = Db::new("examples-python", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let _worker = WorkerProcess::python(&repo(), &server, &["greet", "enrich", "flaky", "echo"], None);
    let api = server.api();
    run_examples(&api).await;
    assert!(assert_replays(&api).await >= 6);
}
