//! Who an execution belongs to, against a real `sluice serve`: its `llm` steps are charged to the
//! principal that started it (children and continued runs too), private executions reach only
//! their owner, admins and owners, and the id of a run a caller may not see is neither joined,
//! reused nor shown, nor are the children of a restricted run.

use serde_json::{json, Value};
use sluice_testkit::vendor::{FakeVendor, Reply};

use super::*;

on_both_backends!(
    a_key_over_its_budget_spends_nothing_more_through_llm_steps_children_or_continued_runs,
    private_executions_reach_only_their_owner_admins_and_owners,
    ids_and_children_of_runs_a_caller_may_not_see_answer_as_if_they_did_not_exist,
);

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

async fn call(api: &Api, method: &str, path: &str) -> (u16, String) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = api.request(m, path).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn ids(listed: &Value) -> Vec<String> {
    listed["executions"].as_array().unwrap().iter().map(|e| e["workflow_id"].as_str().unwrap().to_string()).collect()
}

/// Each answer of the fake vendor: 1 input and 100 output tokens at $2 / $10 per Mtok =
/// $0.001002, also the estimate of a call with `max_tokens: 100` and a short prompt.
const CALL_USD: f64 = 0.001_002;

fn gateway_config(vendor: &FakeVendor, key_budget: Option<&str>) -> String {
    let budgets = match key_budget {
        Some(key) => format!("budgets:\n  - {{name: ci-cap, key: '{key}', period: month, hard_usd: 0.0035}}\n"),
        None => String::new(),
    };
    format!(
        "
providers:
  fake: {{kind: openai, base_url: '{base}'}}
routes:
  chat:
    retry: {{max_attempts: 1}}
    targets: [{{provider: fake, model: fake-model}}]
prices:
  fake-model: {{input_per_mtok: 2, output_per_mtok: 10}}
{budgets}",
        base = vendor.base_url()
    )
}

fn ask(id: &str) -> Value {
    json!({"id": id, "type": "llm", "route": "chat", "prompt": "\"hi\"", "max_tokens": 100})
}

async fn a_key_over_its_budget_spends_nothing_more_through_llm_steps_children_or_continued_runs(backend: Backend) {
    let vendor = FakeVendor::start().await;
    vendor.set_default(Reply::text("ok", 1, 100));
    let db = Db::new("owner-budget", backend);
    let file = db.dir().join("gateway.yaml");
    std::fs::write(&file, gateway_config(&vendor, None)).unwrap();
    let mut server =
        ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--gateway", &file.display().to_string()]).await;
    let owner = server.api();
    let (status, ci) = owner.post("/v1/api-keys", &json!({"name": "ci", "role": "editor"})).await;
    assert_eq!(status, 201, "{ci}");
    let key_id = ci["api_key"]["id"].as_str().unwrap().to_string();
    let ci = Api::with_key(&server.base, ci["key"].as_str());
    // The key gets a $0.0035 cap (three calls' worth); the tenant has none.
    std::fs::write(&file, gateway_config(&vendor, Some(&key_id))).unwrap();
    server.restart().await;

    owner.publish(&json!({"name": "spend", "steps": [ask("a"), ask("b"), ask("c"), ask("d"), ask("e")]})).await;
    owner.publish(&json!({"name": "spend-one", "steps": [ask("a")]})).await;
    owner
        .publish(&json!({"name": "spend-child", "steps": [
            {"id": "kid", "type": "child", "workflow": "spend-one", "input": "{}"}
        ]}))
        .await;
    owner
        .publish(&json!({"name": "spend-later", "steps": [
            {"id": "again", "type": "continue_as_new", "when": "(.input.round // 0) < 1", "input": "{round: 1}"},
            ask("a")
        ]}))
        .await;

    // One chat call, then a workflow: two steps fit under the cap, the third is refused with the
    // chat endpoint's budget error as a step error, and nothing more reaches the vendor.
    let chat = json!({"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = ci.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    ci.start("spend", json!({}), Some("ci-spend")).await;
    let run = ci.wait("ci-spend", 20).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["failed_step"], "c", "{run}");
    assert_eq!(run["error"]["type"], "llm.budget_exceeded", "{run}");
    assert_eq!(run["error"]["details"]["budget"], "ci-cap", "{run}");
    assert_eq!(run["owner"], format!("key:{key_id}"), "{run}");
    assert_eq!(vendor.requests(), 3);

    // The steps' ledger rows name the key; the key's spend stayed under its cap.
    let (status, body) = owner.get("/v1/usage?workflow_id=ci-spend").await;
    assert_eq!(status, 200, "{body}");
    let rows = body["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    for r in rows {
        assert_eq!(r["api_key"], key_id.as_str(), "{r}");
        assert_eq!(r["source"], "llm_step", "{r}");
    }
    let (_, body) = owner.get(&format!("/v1/usage?api_key={key_id}&limit=100")).await;
    let spent: f64 = body["usage"].as_array().unwrap().iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((spent - 3.0 * CALL_USD).abs() < 1e-12 && spent <= 0.0035, "{body}");

    // The chat endpoint refuses the key now, and so do its children's and continued runs' steps.
    let (status, body) = ci.post("/v1/chat/completions", &chat).await;
    assert_eq!((status, body["error"]["code"].as_str()), (402, Some("budget_exceeded")), "{body}");
    ci.start("spend-child", json!({}), Some("ci-child")).await;
    let parent = ci.wait("ci-child", 20).await;
    assert_eq!(parent["status"], "failed", "{parent}");
    let (status, kid) = ci.get("/v1/executions/ci-child.kid").await;
    assert_eq!(status, 200, "{kid}");
    assert_eq!(
        (kid["owner"].as_str(), kid["error"]["type"].as_str()),
        (Some(&*format!("key:{key_id}")), Some("llm.budget_exceeded")),
        "{kid}"
    );
    ci.start("spend-later", json!({}), Some("ci-later")).await;
    let later = ci.wait("ci-later", 20).await;
    assert_eq!(later["error"]["type"], "llm.budget_exceeded", "{later}");
    assert_eq!(later["owner"], format!("key:{key_id}"), "the continued run keeps its owner: {later}");
    assert_eq!(vendor.requests(), 3, "a refused step reached the vendor");

    // The cap is the key's: the tenant's owner still runs the same workflows.
    owner.start("spend-child", json!({}), Some("owner-child")).await;
    assert_eq!(owner.wait("owner-child", 20).await["status"], "completed");
    assert_eq!(vendor.requests(), 4);
    assert!(assert_replays(&owner).await >= 5);
}

fn gated(name: &str) -> Value {
    json!({"name": name, "steps": [
        {"id": "kid", "type": "child", "workflow": "kid-flow", "input": "{marker: .input.marker}"},
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{ok: true}"}
    ], "queries": {"marker": ".input.marker"}})
}

async fn private_executions_reach_only_their_owner_admins_and_owners(backend: Backend) {
    let db = Db::new("owner-private", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let owner = server.api();
    let alice = user(&owner, "alice@example.com", "editor").await;
    let bob = user(&owner, "bob@example.com", "editor").await;
    let admin = user(&owner, "root@example.com", "admin").await;
    owner.publish(&json!({"name": "kid-flow", "steps": [{"id": "echo", "type": "transform", "expr": ".input"}]})).await;
    owner.publish(&gated("session")).await;

    let secret = "alice-private-7f3e";
    let (status, body) = alice
        .post(
            "/v1/executions",
            &json!({"workflow": "session", "workflow_id": "alice-1", "input": {"marker": secret}, "visibility": "private"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    alice.start("session", json!({"marker": "shared"}), Some("alice-open")).await;
    let (status, mine) = alice.get("/v1/executions/alice-1").await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(
        (mine["owner"].as_str(), mine["visibility"].as_str()),
        (Some("user:alice@example.com"), Some("private"))
    );
    assert_eq!(alice.wait("alice-1.kid", 10).await["status"], "completed");

    // To bob the private run and its child do not exist, whatever he asks.
    for (method, path) in [
        ("GET", "/v1/executions/alice-1"),
        ("GET", "/v1/executions/alice-1/history"),
        ("GET", "/v1/executions/alice-1/result?wait_ms=0"),
        ("GET", "/v1/executions/alice-1/queries/marker"),
        ("POST", "/v1/executions/alice-1/signals/go"),
        ("POST", "/v1/executions/alice-1/cancel"),
        ("POST", "/v1/dlq/alice-1/redrive"),
        ("GET", "/v1/executions/alice-1.kid"),
        ("GET", "/v1/executions/alice-1.kid/history"),
    ] {
        let (status, text) = call(&bob, method, path).await;
        assert_eq!(status, 404, "{method} {path}: {text}");
        assert!(text.contains("execution_not_found"), "{method} {path}: {text}");
        assert!(!text.contains(secret), "{method} {path} leaked: {text}");
    }
    let (_, listed) = bob.get("/v1/executions?limit=100").await;
    let seen = ids(&listed);
    assert!(seen.contains(&"alice-open".to_string()) && seen.contains(&"alice-open.kid".to_string()), "{listed}");
    assert!(!seen.iter().any(|id| id.starts_with("alice-1")), "{listed}");
    let (_, listed) = bob.get("/v1/executions?workflow_id=alice-1").await;
    assert!(ids(&listed).is_empty(), "{listed}");
    // The tenant-visible run stays visible to him.
    let (status, body) = bob.get("/v1/executions/alice-open").await;
    assert_eq!((status, body["visibility"].as_str()), (200, Some("tenant")), "{body}");

    // Admins (and owners) reach it: list, read, cancel.
    let (_, listed) = admin.get("/v1/executions?limit=100").await;
    assert!(ids(&listed).contains(&"alice-1".to_string()) && ids(&listed).contains(&"alice-1.kid".to_string()));
    let (status, body) = owner.get("/v1/executions/alice-1.kid").await;
    assert_eq!((status, body["owner"].as_str()), (200, Some("user:alice@example.com")), "the child inherits");
    let (status, body) = admin.post("/v1/executions/alice-1/cancel", &json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(alice.wait("alice-1", 10).await["status"], "cancelled");

    // A workflow's sharing sets the default: bob's sessions are private unless he says otherwise.
    let (status, body) =
        put(&owner, "/v1/workflows/session/sharing", &json!({"restricted": false, "visibility": "private"})).await;
    assert_eq!((status, body["visibility"].as_str()), (200, Some("private")), "{body}");
    bob.start("session", json!({"marker": "bob"}), Some("bob-1")).await;
    let (status, _) = alice.get("/v1/executions/bob-1").await;
    assert_eq!(status, 404);
    let (status, body) = bob.get("/v1/executions/bob-1").await;
    assert_eq!((status, body["visibility"].as_str()), (200, Some("private")), "{body}");
    let (status, body) = bob
        .post("/v1/executions", &json!({"workflow": "session", "workflow_id": "bob-2", "visibility": "tenant"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = alice.get("/v1/executions/bob-2").await;
    assert_eq!(status, 200);
    let (status, body) = bob.post("/v1/executions", &json!({"workflow": "session", "visibility": "secret"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"]["field"], "visibility", "{body}");
    for id in ["alice-open", "bob-1", "bob-2"] {
        let (status, _) = owner.post(&format!("/v1/executions/{id}/cancel"), &json!({})).await;
        assert_eq!(status, 202);
    }
    assert!(assert_replays(&owner).await >= 6);
}

async fn ids_and_children_of_runs_a_caller_may_not_see_answer_as_if_they_did_not_exist(backend: Backend) {
    let db = Db::new("owner-ids", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let owner = server.api();
    let ada = user(&owner, "ada@example.com", "editor").await;
    let bob = user(&owner, "bob@example.com", "editor").await;
    let vic = user(&owner, "vic@example.com", "viewer").await;
    owner.publish(&json!({"name": "kid-flow", "steps": [{"id": "echo", "type": "transform", "expr": ".input"}]})).await;
    owner.publish(&gated("open-flow")).await;
    ada.publish(&gated("secret-flow")).await;
    let restrict = json!({"restricted": true, "grants": [{"to": "user:vic@example.com", "access": "view"}]});
    let (status, body) = put(&ada, "/v1/workflows/secret-flow/sharing", &restrict).await;
    assert_eq!(status, 200, "{body}");
    let secret = "only-for-the-team-5d1a";
    let run_id = ada.start("secret-flow", json!({"marker": secret}), Some("wf-secret")).await;
    let (_, row) = ada.get("/v1/executions/wf-secret").await;
    let run_id = row["run_id"].as_str().map(str::to_string).unwrap_or(run_id);
    assert_eq!(ada.wait("wf-secret.kid", 10).await["output"]["marker"], secret, "the child ran");

    // Bob cannot join the running restricted run by its id: refused, naming nothing of it.
    let taken = json!({"workflow": "open-flow", "workflow_id": "wf-secret", "input": {"marker": "bob"}});
    let (status, body) = bob.post("/v1/executions", &taken).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    let text = body.to_string();
    assert!(!text.contains(&run_id) && !text.contains("secret-flow") && !text.contains(secret), "{text}");
    // Its child, an open workflow's run, is hidden with it: not listed, not readable.
    let (_, listed) = bob.get("/v1/executions?limit=100").await;
    assert!(!listed.to_string().contains(secret), "{listed}");
    assert!(!ids(&listed).iter().any(|id| id.starts_with("wf-secret")), "{listed}");
    for path in ["/v1/executions/wf-secret.kid", "/v1/executions/wf-secret.kid/history"] {
        let (status, text) = call(&bob, "GET", path).await;
        assert_eq!(status, 404, "{path}: {text}");
        assert!(!text.contains(secret), "{path}: {text}");
    }
    let (status, body) =
        bob.post("/v1/executions", &json!({"workflow": "open-flow", "workflow_id": "wf-secret.kid"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    // Vic reaches the restricted workflow, so its child too.
    let (status, body) = vic.get("/v1/executions/wf-secret.kid").await;
    assert_eq!((status, body["input"]["marker"].as_str()), (200, Some(secret)), "{body}");

    // Ended, the id still cannot be taken over by bob, and ada keeps seeing her own run.
    let (status, body) = ada.post("/v1/executions/wf-secret/signals/go", &json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(ada.wait("wf-secret", 10).await["status"], "completed");
    let (status, body) = bob.post("/v1/executions", &taken).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    let (status, mine) = ada.get("/v1/executions/wf-secret").await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!((mine["workflow"].as_str(), mine["run_id"].as_str()), (Some("secret-flow"), Some(run_id.as_str())));
    let (_, listed) = ada.get("/v1/executions?workflow_id=wf-secret").await;
    assert_eq!(ids(&listed), ["wf-secret"], "{listed}");

    // Ids bob may see stay his to use: a fresh one, and one of a run he sees.
    let (status, body) = bob.post("/v1/executions", &json!({"workflow": "open-flow", "workflow_id": "bob-1"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = bob.post("/v1/executions", &json!({"workflow": "open-flow", "workflow_id": "bob-1"})).await;
    assert_eq!((status, body["created"].as_bool()), (200, Some(false)), "{body}");
    let (status, _) = owner.post("/v1/executions/bob-1/cancel", &json!({})).await;
    assert_eq!(status, 202);
    assert!(assert_replays(&owner).await >= 4);
}
