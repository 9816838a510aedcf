//! Bad input gets precise 4xx errors and the server stays up.

use serde_json::{json, Value};

use super::*;

async fn expect(api: &Api, resp: (u16, Value), status: u16, code: &str, needle: &str) {
    let (s, body) = resp;
    assert_eq!(s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let text = body.to_string();
    assert!(text.contains(needle), "expected `{needle}` in {text}");
    // A fresh connection: the server may close one whose oversized body it refused to read.
    assert_eq!(Api::new(&api.base).get("/healthz").await.0, 200);
}

#[tokio::test]
async fn bad_input_gets_precise_errors() {
    let dir = TempDir::new("errors");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let api = server.api();
    let yaml = |s: &'static str| api.post_raw("/v1/workflows", "application/yaml", s);

    expect(&api, yaml("name: x\nsteps: [\n").await, 422, "invalid_definition", "invalid YAML").await;
    expect(
        &api,
        api.post_raw("/v1/workflows", "application/json", "{\"name\": ").await,
        422,
        "invalid_definition",
        "invalid JSON",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - id: a\n    type: teleport\n").await,
        422,
        "invalid_definition",
        "steps[0].type",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - id: a\n    type: transform\n    expr: '.a |'\n").await,
        422,
        "invalid_definition",
        "steps[0].expr",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - id: a\n    type: task\n").await,
        422,
        "invalid_definition",
        "steps[0].queue",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - id: a\n    type: task\n    queue: q\n    colour: red\n").await,
        422,
        "invalid_definition",
        "unknown field `colour`",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - id: a\n    type: llm\n    route: r\n    prompt: '\"x\"'\n").await,
        422,
        "invalid_definition",
        "AI gateway",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - {id: a, type: sleep, duration: soon}\n").await,
        422,
        "invalid_definition",
        "steps[0].duration",
    )
    .await;
    expect(
        &api,
        yaml("name: x\nsteps:\n  - {id: a, type: transform, expr: '1'}\n  - {id: a, type: transform, expr: '2'}\n")
            .await,
        422,
        "invalid_definition",
        "duplicate step id",
    )
    .await;

    let big = "x".repeat(3 * 1024 * 1024);
    expect(
        &api,
        api.post_raw("/v1/workflows", "application/yaml", big.clone()).await,
        413,
        "payload_too_large",
        "larger than",
    )
    .await;
    // The rest of that body may still be on the connection: the answer closes it, so the client's
    // next request goes on a fresh one.
    let resp = api
        .request(reqwest::Method::POST, "/v1/workflows")
        .header("content-type", "application/yaml")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));

    expect(
        &api,
        api.post_raw("/v1/executions", "application/json", "{nope").await,
        400,
        "invalid_json",
        "not valid JSON",
    )
    .await;
    expect(&api, api.post("/v1/executions", &json!({"input": 1})).await, 400, "invalid_request", "workflow").await;
    expect(&api, api.post("/v1/executions", &json!({"workflow": 7})).await, 400, "invalid_request", "workflow").await;
    expect(&api, api.post("/v1/executions", &json!({"workflow": "ghost"})).await, 404, "workflow_not_found", "ghost")
        .await;
    expect(
        &api,
        api.post("/v1/executions", &json!({"workflow": "x", "workflow_id": "has space"})).await,
        400,
        "invalid_request",
        "workflow_id",
    )
    .await;
    expect(&api, api.get("/v1/executions/nobody").await, 404, "execution_not_found", "nobody").await;
    expect(&api, api.get("/v1/executions?status=sleeping").await, 400, "invalid_request", "status").await;
    expect(&api, api.get("/v1/executions?limit=100000").await, 400, "invalid_request", "limit").await;
    expect(&api, api.post("/v1/executions/nobody/signals/go", &json!(1)).await, 404, "execution_not_found", "nobody")
        .await;
    expect(
        &api,
        api.post("/v1/tasks/complete", &json!({"task_token": "no/such/1"})).await,
        404,
        "task_not_found",
        "no/such/1",
    )
    .await;
    expect(
        &api,
        api.post("/v1/tasks/poll", &json!({"queue": "q", "max_tasks": 0})).await,
        400,
        "invalid_request",
        "max_tasks",
    )
    .await;
    expect(
        &api,
        api.post("/v1/tasks/fail", &json!({"task_token": "t", "error": {"message": "m"}})).await,
        400,
        "invalid_request",
        "error",
    )
    .await;
    expect(&api, api.get("/v1/nothing-here").await, 404, "not_found", "openapi").await;

    // A runtime jq error fails the execution with the step and the cause, not the server.
    api.publish(&json!({"name": "bad-runtime", "steps": [{"id": "t", "type": "transform", "expr": ".input.a.b"}]}))
        .await;
    let id = api.start("bad-runtime", json!({"a": 5}), None).await;
    let row = api.wait(&id, 10).await;
    assert_eq!(row["status"], "failed");
    assert_eq!(row["failed_step"], "t");
    assert_eq!(row["error"]["type"], "expression");

    // A runaway expression is stopped by its budget; the server answers as before.
    api.publish(&json!({"name": "runaway", "steps": [{"id": "spin", "type": "transform", "expr": "last(repeat(.))"}]}))
        .await;
    let id = api.start("runaway", json!(1), None).await;
    let row = api.wait(&id, 20).await;
    assert_eq!(row["status"], "failed");
    assert!(row["error"]["message"].as_str().unwrap().contains("budget"), "{row}");
    assert_eq!(api.get("/healthz").await.0, 200);
    assert_replays(&api).await;
}

#[tokio::test]
async fn openapi_lists_every_route_and_metrics_are_exposed() {
    let dir = TempDir::new("openapi");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let api = server.api();
    let (status, doc) = api.get("/openapi.json").await;
    assert_eq!(status, 200);
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    let src = std::fs::read_to_string(repo().join("crates/sluice-server/src/lib.rs")).unwrap();
    let mut routes: Vec<&str> =
        src.lines().filter_map(|l| l.trim().strip_prefix(".route(\"")).filter_map(|l| l.split('"').next()).collect();
    // The metrics listener serves some of the same paths again.
    routes.sort_unstable();
    routes.dedup();
    assert!(routes.len() >= 20);
    for r in &routes {
        assert!(paths.iter().any(|p| p == r), "route {r} missing from openapi.json");
    }
    assert_eq!(paths.len(), routes.len(), "openapi.json lists paths the router does not serve");

    api.publish(&json!({"name": "m", "steps": [{"id": "a", "type": "transform", "expr": "1"}]})).await;
    let id = api.start("m", Value::Null, None).await;
    api.wait(&id, 10).await;
    let text = api.metrics().await;
    assert!(text.contains("sluice_executions_started_total 1"), "{text}");
    assert!(text.contains("sluice_executions_completed_total 1"));
    assert!(text.contains("sluice_http_request_duration_seconds_bucket{route=\"/v1/executions\",le=\"+Inf\"}"));
}

/// Schemathesis (from PyPI) generates requests for every operation of `/openapi.json`, valid and
/// not, and checks that none is answered with a 5xx. The long-poll is left out: waiting is what
/// it is for (its bad input is covered above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_in_the_api() {
    let python = python_venv("schemathesis-venv", "schemathesis", "schemathesis").await;
    let dir = TempDir::new("schemathesis");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let api = server.api();
    api.publish(&json!({"name": "hello", "steps": [{"id": "a", "type": "transform", "expr": ".input"}]})).await;
    api.start("hello", json!({"n": 1}), Some("hello-1")).await;
    let out = tokio::process::Command::new(python.with_file_name("schemathesis"))
        // Its cache of crashes goes to the working directory: keep it out of the source tree.
        .current_dir(dir.path())
        .args(["run", &format!("{}/openapi.json", server.base)])
        .args(["--checks", "not_a_server_error", "--max-examples", "25", "--seed", "20261123"])
        .args(["--exclude-path", "/v1/tasks/poll", "--request-timeout", "10", "--no-color"])
        // As the owner, so that every operation reaches its handler rather than stopping at 401.
        .args(["--header", &format!("Authorization: Bearer {}", server.key.as_deref().unwrap())])
        .output()
        .await
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found problems:\n{report}");
    assert!(report.contains("passed"), "{report}");
    // The server is still up and healthy after the run.
    assert_eq!(api.get("/healthz").await.0, 200);
}
