//! `POST /v1/chat/completions` end to end: a real `sluice serve --gateway FILE` in front of the
//! fake vendor, called over raw HTTP and with the official `openai` Python package.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sluice_testkit::vendor::{FakeVendor, Reply};

use super::*;

/// Writes a gateway config whose routes all point at `vendor`, and starts a server with it.
async fn server_for(vendor: &FakeVendor, dir: &TempDir) -> ServerProcess {
    let config = format!(
        "
providers:
  fake: {{kind: openai, base_url: '{base}'}}
routes:
  chat:
    precision: precise
    targets: [{{provider: fake, model: fake-model}}]
  precise:
    targets: [{{provider: fake, model: precise-model}}]
  cheap:
    targets: [{{provider: fake, model: cheap-model}}]
  fallback:
    retry: {{max_attempts: 1}}
    targets:
      - {{provider: fake, model: broken-model}}
      - {{provider: fake, model: backup-model}}
  fragile:
    retry: {{max_attempts: 1}}
    targets:
      - {{provider: fake, model: fragile-model, breaker: {{failure_threshold: 1, cool_down_ms: 60000}}}}
experiments:
  tone:
    arms:
      - {{name: control, route: chat}}
      - {{name: terse, route: cheap}}
prices:
  fake-model: {{input_per_mtok: 1, output_per_mtok: 2}}
",
        base = vendor.base_url()
    );
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    let database = dir.path().join("sluice.db").display().to_string();
    ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--gateway", &file.display().to_string()]).await
}

fn ask(route: &str, extra: Value) -> Value {
    let mut body = json!({"model": route, "messages": [{"role": "user", "content": "hi"}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// Posts a streamed request; returns the status, the content type and the `data:` payloads.
async fn stream(api: &Api, body: &Value) -> (u16, String, Vec<String>) {
    let r = api.request(reqwest::Method::POST, "/v1/chat/completions").json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = r.text().await.unwrap();
    let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    (status, ct, data)
}

fn json_of(data: &[String]) -> Vec<Value> {
    data.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_answer_fall_back_stream_and_report_cuts() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("chat");
    let server = server_for(&vendor, &dir).await;
    let api = server.api();

    // (1) A plain call: the fake's text and usage in OpenAI's format.
    vendor.push(Reply::text("Hello from the fake", 11, 7));
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", json!({"temperature": 0.1}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"), "{body}");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fake-model");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake"}, "finish_reason": "stop"}])
    );
    assert_eq!(body["usage"], json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}));
    let sent = vendor.received().last().unwrap().body.clone();
    assert_eq!((sent["model"].as_str(), sent["temperature"].as_f64()), (Some("fake-model"), Some(0.1)));

    // Tool calls come back in OpenAI's shape.
    vendor.push(Reply::ToolCall {
        id: "call_1".into(),
        name: "weather".into(),
        arguments: json!({"city": "Oslo"}),
        input_tokens: 3,
        output_tokens: 4,
    });
    let tools =
        json!({"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]});
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", tools)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!((call["id"].as_str(), call["type"].as_str()), (Some("call_1"), Some("function")));
    assert_eq!(serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap()["city"], "Oslo");

    // (2) The first target of `fallback` answers 500; the second serves the call.
    vendor.push(Reply::status(500)).push(Reply::text("from the backup", 2, 3));
    let (status, body) = api.post("/v1/chat/completions", &ask("fallback", json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["model"].as_str(), body["choices"][0]["message"]["content"].as_str()),
        (Some("backup-model"), Some("from the backup"))
    );
    let models: Vec<String> =
        vendor.received().iter().rev().take(2).map(|r| r.body["model"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(models, ["backup-model", "broken-model"]);

    // Every target failing is a 502 listing each failure, without upstream words.
    vendor.push(Reply::status(500)).push(Reply::status(503));
    let (status, body) = api.post("/v1/chat/completions", &ask("fallback", json!({}))).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_failed");
    let failures = &body["error"]["details"]["failures"];
    assert_eq!(
        failures[0],
        json!({"target": "fake/broken-model", "error": "status", "status": 500, "message": "upstream answered 500"})
    );
    assert_eq!(failures[1]["status"], 503, "{body}");
    assert!(!body.to_string().contains("fake vendor error"), "{body}");

    // A breaker that opened rejects without calling: 503 with Retry-After.
    vendor.push(Reply::status(500));
    let (status, _) = api.post("/v1/chat/completions", &ask("fragile", json!({}))).await;
    assert_eq!(status, 502);
    let before = vendor.requests();
    let r = api
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&ask("fragile", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("60"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert_eq!(body["error"]["details"]["failures"][0]["error"], "circuit_open");
    assert_eq!(vendor.requests(), before, "an open breaker must not call the upstream");

    // (3) A streamed call: role first, the pieces, the finish reason, usage, then [DONE].
    vendor.push(Reply::stream(&["Hel", "lo", " world"], 5, 3));
    let (status, ct, data) =
        stream(&api, &ask("chat", json!({"stream": true, "stream_options": {"include_usage": true}}))).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks = json_of(&data);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "fake-model"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text, "Hello world");
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}));

    // (4) A stream cut after tokens ends with an error event and no [DONE].
    vendor.push(Reply::cut_stream(&["Par", "tial"]));
    let (status, _, data) = stream(&api, &ask("chat", json!({"stream": true}))).await;
    assert_eq!(status, 200);
    assert!(!data.iter().any(|d| d == "[DONE]"), "a cut stream must not end cleanly: {data:?}");
    let chunks = json_of(&data);
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text, "Partial");
    let last = chunks.last().unwrap();
    assert_eq!(last["error"]["type"], "upstream_stream_cut", "{data:?}");
    assert!(last["error"]["message"].as_str().unwrap().contains("incomplete"));

    // A stream that cannot open is a JSON error with its status, not an event stream.
    vendor.push(Reply::status(500)).push(Reply::status(500));
    let r = api
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&ask("fallback", json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "upstream_failed");

    // Unknown routes and malformed bodies.
    let (status, body) = api.post("/v1/chat/completions", &ask("nope", json!({}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("route_not_found")), "{body}");
    let bad = json!({"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
    let (status, body) = api.post("/v1/chat/completions", &bad).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("messages[0].content:"), "{body}");
    let (status, body) = api.post_raw("/v1/chat/completions", "application/json", "{\"model\": ").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_json")), "{body}");

    // Each call is logged with its route, target and tokens, never its content. (The line's own
    // `target` is the module that logged it; the gateway target is `fields.target`.)
    let log = server.log_text();
    let line = log.lines().find(|l| l.contains("chat completion") && l.contains("\"input_tokens\":11")).unwrap_or("");
    assert!(line.contains("\"route\":\"chat\"") && line.contains("\"fields.target\":\"fake/fake-model\""), "{log}");
    assert!(line.contains("\"outcome\":\"success\"") && line.contains("latency_ms"), "{line}");
    assert!(!log.contains("Hello from the fake") && !log.contains("\"hi\""), "contents must not be logged");
}

#[tokio::test]
async fn without_a_gateway_the_endpoint_says_how_to_configure_one() {
    let dir = TempDir::new("chat-off");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let (status, body) = server.api().post("/v1/chat/completions", &ask("chat", json!({}))).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "gateway_not_configured");
    assert!(body["error"]["message"].as_str().unwrap().contains("--gateway FILE"), "{body}");
}

/// A virtualenv with `openai`, made once under the target's temp dir and reused.
async fn openai_python() -> PathBuf {
    python_venv("openai-venv", "openai", "openai").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_package_works_against_sluice() {
    let python = openai_python().await;
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("chat-openai");
    let server = server_for(&vendor, &dir).await;
    vendor
        .push(Reply::text("Hi from Sluice", 9, 4))
        .push(Reply::stream(&["one ", "two ", "three"], 6, 3))
        .push(Reply::cut_stream(&["half"]));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .args([&server.base, "chat"])
        .env("SLUICE_API_KEY", server.key.as_deref().unwrap())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        lines[0],
        json!({"call": "plain", "content": "Hi from Sluice", "finish_reason": "stop", "model": "fake-model",
            "prompt_tokens": 9, "completion_tokens": 4})
    );
    assert_eq!(lines[1], json!({"call": "stream", "pieces": ["one ", "two ", "three"], "total_tokens": 9}));
    assert_eq!(lines[2]["pieces"], json!(["half"]));
    assert!(lines[2]["error"].as_str().unwrap_or("").contains("cut"), "the SDK must raise on a cut: {}", lines[2]);
    let sent = &vendor.received()[0].body;
    assert_eq!((sent["messages"][0]["role"].as_str(), sent["max_tokens"].as_u64()), (Some("system"), Some(50)));
}

/// The ledger once it holds `n` rows (newest first).
async fn ledger(api: &Api, n: usize) -> Vec<Value> {
    let (status, body) = api.get("/v1/usage?limit=500").await;
    assert_eq!(status, 200, "{body}");
    let rows = body["usage"].as_array().cloned().unwrap_or_default();
    assert!(rows.len() >= n, "the ledger holds {} rows, expected {n}: {body}", rows.len());
    rows
}

/// Posts a chat request; returns the status, the experiment and arm headers, and the body.
async fn call(api: &Api, body: &Value) -> (u16, Option<String>, Option<String>, Value) {
    let r = api.request(reqwest::Method::POST, "/v1/chat/completions").json(body).send().await.unwrap();
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (experiment, arm) = (header("x-sluice-experiment"), header("x-sluice-arm"));
    (r.status().as_u16(), experiment, arm, r.json().await.unwrap())
}

/// Issue 4: `precision: true` is served by the route's precision tier, streamed or not; without
/// it, by the route itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_precision_selects_the_routes_precision_tier() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("chat-precision");
    let server = server_for(&vendor, &dir).await;
    let api = server.api();

    let (status, body) = api.post("/v1/chat/completions", &ask("chat", json!({"precision": true}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "precise-model", "{body}");
    assert_eq!(vendor.received().last().unwrap().body["model"], "precise-model");

    for extra in [json!({}), json!({"precision": false})] {
        let (status, body) = api.post("/v1/chat/completions", &ask("chat", extra)).await;
        assert_eq!((status, body["model"].as_str()), (200, Some("fake-model")), "{body}");
    }

    vendor.push(Reply::stream(&["pre", "cise"], 2, 2));
    let (status, _, data) = stream(&api, &ask("chat", json!({"stream": true, "precision": true}))).await;
    assert_eq!(status, 200);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert!(json_of(&data).iter().all(|c| c["model"] == "precise-model"), "{data:?}");
    assert_eq!(vendor.received().last().unwrap().body["model"], "precise-model");

    // The ledger names the route that served each call.
    let routes: Vec<String> =
        ledger(&api, 4).await.iter().map(|r| r["route"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(routes, ["precise", "chat", "chat", "precise"]);
}

/// Issue 4: `model` may name an experiment; `user` is the sticky key, so a user keeps its arm,
/// users spread over the arms, the answer names the arm, and the ledger records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_experiments_assign_arms_sticky_by_user() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("chat-experiment");
    let server = server_for(&vendor, &dir).await;
    let api = server.api();
    let arm_model = |arm: &str| match arm {
        "control" => "fake-model",
        "terse" => "cheap-model",
        other => panic!("unknown arm {other}"),
    };

    let mut arms = std::collections::BTreeMap::new();
    for i in 0..24 {
        let user = format!("user-{i}");
        let mut first = None;
        for _ in 0..2 {
            let (status, experiment, arm, body) = call(&api, &ask("tone", json!({"user": user}))).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(experiment.as_deref(), Some("tone"));
            let arm = arm.unwrap();
            assert_eq!(body["model"], arm_model(&arm), "{user}: {body}");
            assert_eq!(vendor.received().last().unwrap().body["model"], arm_model(&arm));
            match &first {
                None => first = Some(arm),
                Some(f) => assert_eq!(f, &arm, "{user} must keep its arm"),
            }
        }
        arms.insert(user, first.unwrap());
    }
    let terse = arms.values().filter(|a| *a == "terse").count();
    assert!((4..=20).contains(&terse), "the arms must both get users: {arms:?}");

    // A stream through the experiment is served by the same arm.
    vendor.push(Reply::stream(&["hi"], 1, 1));
    let r = api
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&ask("tone", json!({"user": "user-0", "stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("x-sluice-arm").and_then(|v| v.to_str().ok()), Some(arms["user-0"].as_str()));
    assert!(r.text().await.unwrap().contains(&format!("\"model\":\"{}\"", arm_model(&arms["user-0"]))));

    // Every usage row carries the experiment and the arm; plain route calls carry none.
    let rows = ledger(&api, 49).await;
    assert!(rows.iter().all(|r| r["experiment"] == "tone"), "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r["arm"] == "terse").count(), 2 * terse);
    assert_eq!(rows[0]["arm"], arms["user-0"].as_str());
    let (status, _, arm, _) = call(&api, &ask("chat", json!({"user": "user-0"}))).await;
    assert_eq!((status, arm), (200, None));
    assert!(ledger(&api, 50).await[0]["experiment"].is_null());
}

/// Issue 4: `response_format: json_schema` checks the answer against the schema, with one repair
/// call that quotes the errors; an answer still invalid after it is a 502 naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_structured_output_is_checked_with_one_repair() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("chat-structured");
    let server = server_for(&vendor, &dir).await;
    let api = server.api();
    let schema = json!({
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"enum": ["spam", "ham"]}, "score": {"type": "number"}},
        "additionalProperties": false,
    });
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema, "strict": true}}});

    // A valid answer in a code fence: one call, the checked JSON as the content.
    vendor.push(Reply::text("```json\n{\"label\": \"ham\", \"score\": 0.2}\n```", 5, 5));
    let before = vendor.requests();
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", format.clone())).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), json!({"label": "ham", "score": 0.2}));
    assert_eq!(vendor.requests(), before + 1);
    let sent = vendor.received().last().unwrap().body.clone();
    assert_eq!(sent["response_format"], json!({"type": "json_object"}), "the upstream is asked for JSON: {sent}");

    // An invalid answer gets one repair call that lists the errors; its answer is returned.
    vendor.push(Reply::text("{\"label\": \"eggs\"}", 5, 5)).push(Reply::text(
        "{\"label\": \"spam\", \"score\": 1}",
        7,
        3,
    ));
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", format.clone())).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), json!({"label": "spam", "score": 1}));
    assert_eq!(body["usage"]["prompt_tokens"], 7, "the usage is the answer's: {body}");
    let repair = vendor.received().last().unwrap().body.clone();
    let messages = repair["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{repair}");
    assert_eq!(messages[1], json!({"role": "assistant", "content": "{\"label\": \"eggs\"}"}));
    let ask_again = messages[2]["content"].as_str().unwrap();
    assert!(ask_again.contains("`/label`") && ask_again.contains("\"score\" is a required property"), "{ask_again}");

    // Invalid twice: 502 with the validation errors, after exactly two upstream calls.
    vendor.push(Reply::text("not json", 1, 1)).push(Reply::text("{\"label\": \"ham\", \"score\": \"low\"}", 1, 1));
    let before = vendor.requests();
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", format.clone())).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "invalid_output", "{body}");
    let errors = body["error"]["details"]["errors"].to_string();
    assert!(errors.contains("/score") && errors.contains("not of type"), "{body}");
    assert_eq!(vendor.requests(), before + 2);

    // Both calls of a repaired answer are in the ledger (1 + 2 + 2 rows).
    let rows = ledger(&api, 5).await;
    assert_eq!(rows.iter().filter(|r| r["outcome"] == "success").count(), 5, "{rows:?}");

    // A schema that does not compile is refused before any call; so is streaming one.
    let before = vendor.requests();
    let bad = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}});
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", bad)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("response_format.json_schema.schema"), "{body}");
    let mut streamed = format.clone();
    streamed["stream"] = json!(true);
    let (status, body) = api.post("/v1/chat/completions", &ask("chat", streamed)).await;
    assert_eq!((status, body["error"]["details"]["field"].as_str()), (400, Some("stream")), "{body}");
    assert_eq!(vendor.requests(), before, "refused requests must not reach the upstream");
}
