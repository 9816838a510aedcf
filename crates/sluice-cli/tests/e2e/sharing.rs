//! Sharing workflows with users, keys and roles, and concurrency limits per workflow and per
//! tenant, against a real `sluice serve`.

use serde_json::{json, Value};

use crate::{bin, Api, ServerProcess, TempDir};

const PASSWORD: &str = "correct horse battery staple";

async fn user(owner: &Api, email: &str, role: &str) -> Api {
    let (status, body) = owner.post("/v1/users", &json!({"email": email, "role": role, "password": PASSWORD})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = Api::new(&owner.base)
        .post("/v1/auth/login", &json!({"tenant": "default", "email": email, "password": PASSWORD}))
        .await;
    assert_eq!(status, 200, "{body}");
    Api::with_key(&owner.base, body["token"].as_str())
}

async fn put(api: &Api, path: &str, body: &Value) -> (u16, Value) {
    let r = api.request(reqwest::Method::PUT, path).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn gated(name: &str, secret: &str) -> Value {
    json!({"name": name, "description": secret, "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{ok: true}"}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_workflow_reaches_only_its_creator_managers_and_grantees() {
    let dir = TempDir::new("sharing");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = server.api();
    let ada = user(&owner, "ada@example.com", "editor").await;
    let bob = user(&owner, "bob@example.com", "editor").await;
    let vic = user(&owner, "vic@example.com", "viewer").await;
    let (status, ci) = owner.post("/v1/api-keys", &json!({"name": "ci", "role": "editor"})).await;
    assert_eq!(status, 201, "{ci}");
    let ci_id = ci["api_key"]["id"].as_str().unwrap().to_string();
    let ci = Api::with_key(&server.base, ci["key"].as_str());

    let secret = "only-for-the-team-91c2";
    ada.publish(&gated("secret-flow", secret)).await;
    owner.publish(&gated("open-flow", "nothing to hide")).await;
    let (status, sharing) = ada.get("/v1/workflows/secret-flow/sharing").await;
    assert_eq!(status, 200, "{sharing}");
    assert_eq!(sharing["restricted"], false);
    assert_eq!(sharing["created_by"], "user:ada@example.com");

    // Only the creator (and owners, admins) change it.
    let restrict = json!({"restricted": true, "grants": [
        {"to": "user:Vic@Example.com", "access": "view"},
        {"to": format!("key:{ci_id}"), "access": "run"}
    ]});
    let (status, body) = put(&bob, "/v1/workflows/secret-flow/sharing", &restrict).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = put(&ada, "/v1/workflows/secret-flow/sharing", &restrict).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["grants"][0]["to"], "user:vic@example.com", "grantees are normalized");
    assert_eq!(body["updated_by"], "user:ada@example.com");
    ada.start("secret-flow", json!({"marker": secret}), Some("wf-secret")).await;
    owner.start("open-flow", json!({}), Some("wf-open")).await;

    // Bob is not shared with: to him it does not exist, and nothing of it leaks.
    for (method, path) in [
        ("GET", "/v1/workflows/secret-flow"),
        ("GET", "/v1/workflows/secret-flow/versions/no-such"),
        ("GET", "/v1/workflows/secret-flow/sharing"),
        ("GET", "/v1/executions/wf-secret"),
        ("GET", "/v1/executions/wf-secret/history"),
        ("GET", "/v1/executions/wf-secret/result?wait_ms=0"),
        ("POST", "/v1/executions/wf-secret/signals/go"),
        ("POST", "/v1/executions/wf-secret/cancel"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = bob.request(m, path).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 404, "{method} {path}: {text}");
        assert!(!text.contains(secret), "{method} {path} leaked: {text}");
    }
    let (status, body) = bob.post("/v1/executions", &json!({"workflow": "secret-flow", "input": {}})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("workflow_not_found")), "{body}");
    let (status, body) = bob.post("/v1/workflows", &gated("secret-flow", "overwrite")).await;
    assert_eq!(status, 404, "{body}");
    let (_, flows) = bob.get("/v1/workflows").await;
    let names: Vec<&str> = flows["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["open-flow"], "{flows}");
    let (_, listed) = bob.get("/v1/executions").await;
    let ids: Vec<&str> =
        listed["executions"].as_array().unwrap().iter().map(|e| e["workflow_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["wf-open"], "{listed}");
    assert!(!listed.to_string().contains(secret));

    // Vic was given `view`, and is a viewer: reads, cannot signal (the role says no).
    let (status, body) = vic.get("/v1/executions/wf-secret").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["input"]["marker"], secret);
    let (_, listed) = vic.get("/v1/executions?workflow=secret-flow").await;
    assert_eq!(listed["executions"].as_array().unwrap().len(), 1, "{listed}");
    let (status, _) = vic.post("/v1/executions/wf-secret/signals/go", &json!({})).await;
    assert_eq!(status, 403);

    // The CI key was given `run`: starts and signals, cannot publish (the grant says no).
    let (status, body) = ci.post("/v1/executions", &json!({"workflow": "secret-flow", "workflow_id": "wf-ci"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = ci.post("/v1/executions/wf-ci/signals/go", &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let done = ci.wait("wf-ci", 20).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, body) = ci.post("/v1/workflows", &gated("secret-flow", "v2")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["details"]["access"], "run", "{body}");

    // Owners reach everything; sharing with a role reaches its members.
    let (status, _) = owner.get("/v1/executions/wf-secret").await;
    assert_eq!(status, 200);
    let (status, body) = put(
        &owner,
        "/v1/workflows/secret-flow/sharing",
        &json!({"restricted": true, "grants": [{"to": "role:editor", "access": "view"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created_by"], "user:ada@example.com", "the creator stays");
    let (status, body) = bob.get("/v1/executions/wf-secret").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bob.post("/v1/executions/wf-secret/signals/go", &json!({})).await;
    assert_eq!(status, 403, "view does not run: {body}");
    let (status, _) = vic.get("/v1/executions/wf-secret").await;
    assert_eq!(status, 404, "vic's own grant was replaced");

    // Opening it again gives everyone their role's reach.
    let (status, body) = put(&ada, "/v1/workflows/secret-flow/sharing", &json!({"restricted": false})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bob.post("/v1/executions/wf-secret/signals/go", &json!({})).await;
    assert_eq!(status, 202, "{body}");

    // Bad input names its field; unknown workflows are 404.
    let bad = [
        (json!({"restricted": true, "grants": [{"to": "bob@example.com", "access": "view"}]}), "grants[].to"),
        (json!({"restricted": true, "grants": [{"to": "role:boss", "access": "view"}]}), "grants[].to"),
        (json!({"restricted": true, "grants": [{"to": "role:viewer", "access": "none"}]}), "grants[].access"),
    ];
    for (body, field) in bad {
        let (status, answer) = put(&ada, "/v1/workflows/secret-flow/sharing", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["details"]["field"], field, "{answer}");
    }
    let (status, answer) = put(
        &ada,
        "/v1/workflows/secret-flow/sharing",
        &json!({"restricted": true, "grants": [{"to": "role:viewer", "access": "own"}]}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = put(&owner, "/v1/workflows/no-such-flow/sharing", &json!({"restricted": true})).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_per_workflow_and_per_tenant_answer_429_until_one_finishes() {
    let dir = TempDir::new("concurrency");
    let database = dir.path().join("sluice.db").display().to_string();
    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--max-running-per-tenant", "3"]).await;
    let api = server.api();
    let mut limited = gated("limited", "");
    limited["max_running"] = json!(2);
    api.publish(&limited).await;
    api.publish(&gated("other", "")).await;

    api.start("limited", json!({}), Some("l-1")).await;
    api.start("limited", json!({}), Some("l-2")).await;
    let r = api
        .request(reqwest::Method::POST, "/v1/executions")
        .json(&json!({"workflow": "limited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "concurrency_limited", "{body}");
    assert_eq!(
        body["error"]["details"],
        json!({"scope": "workflow", "name": "limited", "limit": 2, "running": 2, "retry_after_s": 1})
    );
    // Starting a running id again is not a new execution: it answers as before.
    let (status, body) = api.post("/v1/executions", &json!({"workflow": "limited", "workflow_id": "l-1"})).await;
    assert_eq!(status, 200, "{body}");

    // The tenant's limit counts every workflow.
    api.start("other", json!({}), Some("o-1")).await;
    let (status, body) = api.post("/v1/executions", &json!({"workflow": "other"})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["details"]["scope"], "tenant", "{body}");
    assert_eq!(body["error"]["details"]["limit"], 3);

    // Another tenant has its own count.
    let other_key = sluice_testkit::admin_init(&bin(), dir.path(), &database, "globex");
    let globex = Api::with_key(&server.base, Some(&other_key));
    globex.publish(&gated("other", "")).await;
    let (status, body) = globex.post("/v1/executions", &json!({"workflow": "other"})).await;
    assert_eq!(status, 201, "{body}");

    // When one finishes there is room again.
    let (status, _) = api.post("/v1/executions/l-1/signals/go", &json!({})).await;
    assert_eq!(status, 202);
    assert_eq!(api.wait("l-1", 20).await["status"], "completed");
    let (status, body) = api.post("/v1/executions", &json!({"workflow": "limited", "workflow_id": "l-3"})).await;
    assert_eq!(status, 201, "{body}");
    let (_, running) = api.get("/v1/executions?status=running").await;
    assert_eq!(running["executions"].as_array().unwrap().len(), 3, "{running}");

    // A bad limit in a definition names its field.
    let mut bad = gated("bad", "");
    bad["max_running"] = json!(0);
    let (status, body) = api.post("/v1/workflows", &bad).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("max_running"), "{body}");
}
