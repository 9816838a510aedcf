//! `llm` steps end to end: a real `sluice serve --gateway FILE` in front of the fake vendor. The
//! answer is journaled: after a SIGKILL and a restart the model is not called again.

use serde_json::json;
use sluice_testkit::vendor::{FakeVendor, Reply};

use super::*;

async fn server_for(vendor: &FakeVendor, dir: &TempDir) -> ServerProcess {
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
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    let database = dir.path().join("sluice.db").display().to_string();
    ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--gateway", &file.display().to_string()]).await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_answers_are_journaled_and_a_sigkill_never_calls_the_model_again() {
    let vendor = FakeVendor::start().await;
    let dir = TempDir::new("llm");
    let mut server = server_for(&vendor, &dir).await;
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
    let dir = TempDir::new("llm-errors");
    let server = server_for(&vendor, &dir).await;
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
