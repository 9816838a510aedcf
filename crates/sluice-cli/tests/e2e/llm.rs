//! `llm` steps end to end: a real `sluice serve --gateway FILE` in front of the fake vendor. The
//! answer is journaled: after a SIGKILL and a restart the model is not called again.

use serde_json::json;
use sluice_testkit::vendor::{FakeVendor, Reply};

use super::*;

on_both_backends!(
    llm_answers_are_journaled_and_a_sigkill_never_calls_the_model_again,
    llm_step_calls_are_in_the_ledger_with_their_execution_and_step,
);

async fn server_for(vendor: &FakeVendor, db: &Db) -> ServerProcess {
    let config = format!(
        "
providers:
  fake: {{kind: openai, base_url: '{base}'}}
routes:
  classify:
    targets: [{{provider: fake, model: fake-model}}]
  resilient:
    retry: {{max_attempts: 1}}
    targets:
      - {{provider: fake, model: broken-model}}
      - {{provider: fake, model: backup-model}}
prices:
  fake-model: {{input_per_mtok: 2, output_per_mtok: 10}}
",
        base = vendor.base_url()
    );
    let file = db.dir().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--gateway", &file.display().to_string()]).await
}

async fn wait_for_requests(vendor: &FakeVendor, n: usize) {
    for _ in 0..400 {
        if vendor.requests() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the vendor got {} requests, expected {n}", vendor.requests());
}

async fn llm_answers_are_journaled_and_a_sigkill_never_calls_the_model_again(backend: Backend) {
    let vendor = FakeVendor::start().await;
    let db = Db::new("llm", backend);
    let mut server = server_for(&vendor, &db).await;
    let api = server.api();
    api.publish(&json!({
        "name": "enrich",
        "steps": [
            {"id": "classify", "type": "llm", "route": "classify", "max_tokens": 5, "temperature": 0,
             "system": "\"Answer with one word.\"", "prompt": "\"Sentiment of: \\(.input.text)\""},
            {"id": "extract", "type": "llm", "route": "classify",
             "messages": "[{role: \"user\", content: \"Score \\(.steps.classify.text)\"}]",
             "schema": {"type": "object", "required": ["score"], "properties": {"score": {"type": "number"}}}},
            {"id": "approve", "type": "wait_signal", "signal": "go"},
            {"id": "done", "type": "return",
             "output": "{label: .steps.classify.text, score: .steps.extract.json.score, cost: .steps.classify.usage.cost_usd}"}
        ]
    }))
    .await;

    vendor.push(Reply::text("positive", 1000, 200));
    vendor.push(Reply::text("a score of 0.9", 10, 5)); // not JSON: one repair call follows
    vendor.push(Reply::text("{\"score\": 0.9}", 30, 6));
    api.start("enrich", json!({"text": "great product"}), Some("enrich-1")).await;
    wait_for_requests(&vendor, 3).await;
    // Both answers are journaled before the execution waits for `go`.
    for _ in 0..400 {
        if of_type(&api.history("enrich-1", None).await, "task_completed").len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let (_, exec) = api.get("/v1/executions/enrich-1").await;
    assert_eq!(exec["status"], "running", "{exec}");

    let sent = vendor.received();
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(sent[0].body["model"], "fake-model");
    assert_eq!(sent[0].body["max_tokens"], 5);
    assert_eq!(
        sent[0].body["messages"],
        json!([{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Sentiment of: great product"}])
    );
    assert_eq!(sent[1].body["messages"][0]["content"], "Score positive");

    // SIGKILL with both `llm` steps finished, then a restart: the answers come from the journal.
    server.kill();
    server.restart().await;
    let (status, body) = api.post("/v1/executions/enrich-1/signals/go", &json!({})).await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let done = api.wait("enrich-1", 10).await;
    assert_eq!(done["status"], "completed", "{done}");
    // Cost from the price table: 1000 × $2/Mtok + 200 × $10/Mtok.
    let cost = done["output"]["cost"].as_f64().unwrap();
    assert!((cost - (1000.0 * 2.0 + 200.0 * 10.0) / 1e6).abs() < 1e-12, "{done}");
    assert_eq!(done["output"]["label"], "positive");
    assert_eq!(done["output"]["score"], 0.9);
    assert_eq!(vendor.requests(), 3, "a journaled llm step called the model again");

    let history = api.history("enrich-1", None).await;
    let completed = of_type(&history, "task_completed");
    assert_eq!(completed.len(), 2, "{history:?}");
    assert_eq!(completed[0]["output"]["target"], "fake/fake-model");
    assert_eq!(completed[0]["output"]["usage"]["input_tokens"], 1000);
    assert_eq!(completed[1]["output"]["json"], json!({"score": 0.9}));
    assert!(assert_replays(&api).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_steps_fall_back_fail_precisely_and_are_checked_at_publish() {
    let vendor = FakeVendor::start().await;
    let db = Db::new("llm-errors", Backend::Sqlite);
    let server = server_for(&vendor, &db).await;
    let api = server.api();

    // A primary that answers 500 is served by the fallback; the step records which target served.
    api.publish(&json!({"name": "resilient", "steps": [
        {"id": "ask", "type": "llm", "route": "resilient", "prompt": "\"hi\""}
    ]}))
    .await;
    vendor.push(Reply::status(500));
    vendor.push(Reply::text("from the backup", 3, 3));
    api.start("resilient", json!({}), Some("resilient-1")).await;
    let done = api.wait("resilient-1", 10).await;
    assert_eq!(done["status"], "completed", "{done}");
    let history = api.history("resilient-1", None).await;
    let out = &of_type(&history, "task_completed")[0]["output"];
    assert_eq!((out["text"].as_str(), out["target"].as_str()), (Some("from the backup"), Some("fake/backup-model")));

    // A request the upstream refuses (400) is not retried: the step fails with `llm.rejected`.
    api.publish(&json!({"name": "refused", "retry": {"max_attempts": 3, "initial_interval": "10ms"}, "steps": [
        {"id": "ask", "type": "llm", "route": "classify", "prompt": "\"hi\""}
    ]}))
    .await;
    let before = vendor.requests();
    vendor.push(Reply::status(400));
    api.start("refused", json!({}), Some("refused-1")).await;
    let failed = api.wait("refused-1", 10).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["type"], "llm.rejected", "{failed}");
    assert_eq!(vendor.requests() - before, 1, "a refused request was retried");

    // Messages that do not evaluate to a list fail the step with a precise error.
    api.publish(&json!({"name": "badmsg", "steps": [
        {"id": "ask", "type": "llm", "route": "classify", "messages": "{role: \"user\"}"}
    ]}))
    .await;
    api.start("badmsg", json!({}), Some("badmsg-1")).await;
    let failed = api.wait("badmsg-1", 10).await;
    assert_eq!(failed["error"]["type"], "llm.bad_request", "{failed}");

    // Publishing checks routes and schemas against the gateway, with the path of the field.
    for (step, path, needle) in [
        (
            json!({"id": "a", "type": "llm", "route": "nope", "prompt": "\"x\""}),
            "steps[0].route",
            "unknown route `nope`",
        ),
        (
            json!({"id": "a", "type": "llm", "route": "classify", "prompt": "\"x\"", "schema": {"type": 12}}),
            "steps[0].schema",
            "not a valid JSON Schema",
        ),
        (json!({"id": "a", "type": "llm", "route": "classify"}), "steps[0]", "exactly one of `prompt`"),
        (
            json!({"id": "a", "type": "llm", "route": "classify", "prompt": "\"x\"", "temperature": 7}),
            "steps[0].temperature",
            "0 to 2",
        ),
    ] {
        let (status, body) = api.post("/v1/workflows", &json!({"name": "bad", "steps": [step]})).await;
        assert_eq!(status, 422, "{body}");
        let details = body["error"]["details"].to_string();
        assert!(details.contains(path) && details.contains(needle), "{path}: {body}");
    }
    assert!(assert_replays(&api).await >= 3);
}

/// Polls the usage ledger until it holds `n` rows (chat calls are recorded off the answer's path).
async fn ledger(api: &Api, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..400 {
        let (status, body) = api.get("/v1/usage?limit=500").await;
        assert_eq!(status, 200, "{body}");
        let rows = body["usage"].as_array().cloned().unwrap_or_default();
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the ledger never held {n} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_budget_stops_spending_at_its_cap_and_the_ledger_prices_every_attempt() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("llm-budget");
    // Each answer: 1 input and 100 output tokens at $2 / $10 per Mtok = $0.001002, which is also
    // the estimate of a call with `max_tokens: 100` and a prompt of up to 4 characters.
    let config = format!(
        "
providers:
  fake: {{kind: openai, base_url: '{base}'}}
routes:
  chat:
    retry: {{max_attempts: 1}}
    targets:
      - {{provider: fake, model: flaky-model}}
      - {{provider: fake, model: fake-model}}
prices:
  fake-model: {{input_per_mtok: 2, output_per_mtok: 10}}
  flaky-model: {{input_per_mtok: 2, output_per_mtok: 10}}
budgets:
  - {{name: monthly, period: month, soft_usd: 0.002, hard_usd: 0.0035}}
",
        base = vendor.base_url()
    );
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    let database = dir.path().join("sluice.db").display().to_string();
    let mut server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--gateway", &file.display().to_string()])
            .await;
    let api = server.api();
    let ask = json!({"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});

    // Call 1: the first target fails with 500 and the second answers: two ledger rows.
    vendor.push(Reply::status(500));
    vendor.set_default(Reply::text("ok", 1, 100));
    let (status, body) = api.post("/v1/chat/completions", &ask).await;
    assert_eq!(status, 200, "{body}");
    let rows = ledger(&api, 2).await;
    let outcomes: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["target"].as_str().unwrap(), r["outcome"].as_str().unwrap())).collect();
    assert_eq!(outcomes, [("fake/fake-model", "success"), ("fake/flaky-model", "http_500")]);
    assert_eq!((rows[0]["input_tokens"].as_u64(), rows[0]["output_tokens"].as_u64()), (Some(1), Some(100)));
    assert!((rows[0]["cost_usd"].as_f64().unwrap() - 0.001_002).abs() < 1e-12, "{}", rows[0]);
    assert_eq!(rows[0]["source"], "chat");

    // Calls 2 and 3 fit under the $0.0035 cap; call 4 would pass it and is refused, naming it.
    for _ in 0..2 {
        let (status, body) = api.post("/v1/chat/completions", &ask).await;
        assert_eq!(status, 200, "{body}");
    }
    ledger(&api, 4).await;
    let calls_before = vendor.requests();
    let (status, body) = api.post("/v1/chat/completions", &ask).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["details"]["budget"], "monthly");
    assert!(body["error"]["message"].as_str().unwrap().contains("budget `monthly`"), "{body}");
    assert_eq!(vendor.requests(), calls_before, "a refused call reached the upstream");

    // The recorded cost is the price table times the tokens, and never passed the cap.
    let (_, budgets) = api.get("/v1/budgets").await;
    let b = &budgets["budgets"][0];
    assert_eq!(b["calls"], 4, "{budgets}");
    let spent = b["spent_usd"].as_f64().unwrap();
    assert!((spent - 3.0 * 0.001_002).abs() < 1e-12 && spent <= 0.0035, "{budgets}");
    // The soft limit raised one alert, when call 2 reached it.
    let alerts = budgets["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{budgets}");
    assert_eq!((alerts[0]["budget"].as_str(), alerts[0]["level"].as_str()), (Some("monthly"), Some("soft")));

    // After a SIGKILL the spend is read back from the ledger: still refused, for `llm` steps too.
    server.kill();
    server.restart().await;
    let (status, _) = api.post("/v1/chat/completions", &ask).await;
    assert_eq!(status, 402);
    api.publish(&json!({"name": "spend", "steps": [
        {"id": "ask", "type": "llm", "route": "chat", "prompt": "\"hi\"", "max_tokens": 100}
    ]}))
    .await;
    api.start("spend", json!({}), Some("spend-1")).await;
    let failed = api.wait("spend-1", 10).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["type"], "llm.budget_exceeded", "{failed}");
    assert_eq!(vendor.requests(), calls_before, "a refused llm step reached the upstream");
    assert!(assert_replays(&api).await >= 1);
}

async fn llm_step_calls_are_in_the_ledger_with_their_execution_and_step(backend: Backend) {
    let vendor = FakeVendor::start().await;
    let db = Db::new("llm-ledger", backend);
    let server = server_for(&vendor, &db).await;
    let api = server.api();
    api.publish(&json!({"name": "one", "steps": [
        {"id": "ask", "type": "llm", "route": "resilient", "prompt": "\"hi\""}
    ]}))
    .await;
    vendor.push(Reply::status(503));
    vendor.push(Reply::text("fine", 40, 2));
    api.start("one", json!({}), Some("one-1")).await;
    assert_eq!(api.wait("one-1", 10).await["status"], "completed");
    let (status, body) = api.get("/v1/usage?workflow_id=one-1").await;
    assert_eq!(status, 200, "{body}");
    let rows = body["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    for r in rows {
        assert_eq!((r["workflow_id"].as_str(), r["step"].as_str()), (Some("one-1"), Some("ask")), "{r}");
        assert_eq!(r["source"], "llm_step");
    }
    assert_eq!(rows[0]["outcome"], "success");
    assert_eq!(rows[1]["outcome"], "http_503");
    let (status, body) = api.get("/v1/usage?limit=0").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("limit"));
}

/// The value of one metric series in the Prometheus text, if present.
async fn metric(server: &ServerProcess, series: &str) -> Option<f64> {
    let text = server.api().metrics().await;
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_then_half_opens_in_metrics_and_the_ledger() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("llm-breaker");
    let config = format!(
        "
providers:
  fake: {{kind: openai, base_url: '{base}'}}
routes:
  guarded:
    retry: {{max_attempts: 1}}
    targets:
      - {{provider: fake, model: primary, breaker: {{failure_threshold: 2, cool_down_ms: 400}}}}
      - {{provider: fake, model: backup}}
",
        base = vendor.base_url()
    );
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    let database = dir.path().join("sluice.db").display().to_string();
    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--gateway", &file.display().to_string()])
            .await;
    let api = server.api();
    let state = r#"sluice_gateway_breaker_state{route="guarded",target="fake/primary"}"#;
    let ask = json!({"model": "guarded", "messages": [{"role": "user", "content": "hi"}]});
    vendor.set_default(Reply::text("ok", 1, 1));
    assert_eq!(metric(&server, state).await, Some(0.0));

    // Two failures of the primary (each served by the backup) open its breaker.
    for _ in 0..2 {
        vendor.push(Reply::status(500));
        let (status, body) = api.post("/v1/chat/completions", &ask).await;
        assert_eq!((status, body["model"].as_str()), (200, Some("backup")), "{body}");
    }
    assert_eq!(metric(&server, state).await, Some(1.0));
    // Open: the primary is skipped without a request, and the skip is in the ledger.
    let before = vendor.requests();
    let (status, _) = api.post("/v1/chat/completions", &ask).await;
    assert_eq!(status, 200);
    assert_eq!(vendor.requests() - before, 1, "an open breaker let a request through");
    let rows = ledger(&api, 6).await;
    assert_eq!((rows[1]["target"].as_str(), rows[1]["outcome"].as_str()), (Some("fake/primary"), Some("circuit_open")));
    let failed = r#"sluice_gateway_attempts_total{route="guarded",target="fake/primary",outcome="http_500"}"#;
    assert_eq!(metric(&server, failed).await, Some(2.0));

    // After the cool-down it half-opens; a successful trial closes it.
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    assert_eq!(metric(&server, state).await, Some(2.0));
    let (status, body) = api.post("/v1/chat/completions", &ask).await;
    assert_eq!((status, body["model"].as_str()), (200, Some("primary")), "{body}");
    assert_eq!(metric(&server, state).await, Some(0.0));
}
