//! `sluice eval` end to end: the real binary over the shipped dataset, against fake vendors that
//! classify by keyword, its `--json` report checked against metrics computed here from scratch
//! (from the dataset and the vendors' rules, not with the library's metric code).

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::vendor::{FakeVendor, Reply};

use super::*;

const LABELS: [&str; 3] = ["positive", "negative", "neutral"];

/// Naive on purpose: negations, sarcasm and unknown words fool it.
const NAIVE: &[(&str, &str)] = &[
    ("love", "positive"),
    ("great", "positive"),
    ("excellent", "positive"),
    ("happy", "positive"),
    ("terrible", "negative"),
    ("broken", "negative"),
    ("refund", "negative"),
    ("worst", "negative"),
    ("disappoint", "negative"),
];

/// Knows a few more words, and answers questions with a sentence that names no label.
fn better() -> Vec<(&'static str, &'static str)> {
    let mut rules = vec![
        ("not great", "negative"),
        ("best", "positive"),
        ("joy", "positive"),
        ("overheat", "negative"),
        ("?", "It depends on the model you have."),
    ];
    rules.extend_from_slice(NAIVE);
    rules
}

/// (text, label) of every example of the shipped dataset, and its header's system prompt.
fn dataset() -> (Vec<(String, String)>, String) {
    let text = std::fs::read_to_string(repo().join("examples/eval/sentiment.jsonl")).unwrap();
    let mut lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    let header = lines.next().unwrap();
    let examples =
        lines.map(|v| (v["input"].as_str().unwrap().to_string(), v["label"].as_str().unwrap().to_string())).collect();
    (examples, header["system"].as_str().unwrap().to_string())
}

/// What the vendor answers with `rules`, read as a label (`None`: invalid). Every rule answers a
/// label exactly or a sentence that names none.
fn predictions(rules: &[(&str, &str)]) -> Vec<Option<&'static str>> {
    let rules: Vec<(String, String)> = rules.iter().map(|(k, l)| (k.to_string(), l.to_string())).collect();
    dataset()
        .0
        .iter()
        .map(|(text, _)| {
            let answer = Reply::classify_text(&rules, "neutral", text);
            LABELS.iter().copied().find(|l| *l == answer)
        })
        .collect()
}

struct Expected {
    correct: usize,
    invalid: usize,
    accuracy: f64,
    /// Per label of `LABELS`: (precision, recall, f1, support).
    classes: Vec<(f64, f64, f64, usize)>,
    macro_f1: f64,
    right: Vec<bool>,
}

fn expected(rules: &[(&str, &str)]) -> Expected {
    let truth: Vec<String> = dataset().0.into_iter().map(|(_, l)| l).collect();
    let predicted = predictions(rules);
    let right: Vec<bool> = truth.iter().zip(&predicted).map(|(t, p)| *p == Some(t.as_str())).collect();
    let correct = right.iter().filter(|r| **r).count();
    let classes: Vec<(f64, f64, f64, usize)> = LABELS
        .iter()
        .map(|label| {
            let tp = truth.iter().zip(&predicted).filter(|(t, p)| t == label && **p == Some(*label)).count() as f64;
            let predicted_as = predicted.iter().filter(|p| **p == Some(*label)).count() as f64;
            let support = truth.iter().filter(|t| t == label).count();
            let precision = if predicted_as > 0.0 { tp / predicted_as } else { 0.0 };
            let recall = tp / support as f64;
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            (precision, recall, f1, support)
        })
        .collect();
    Expected {
        correct,
        invalid: predicted.iter().filter(|p| p.is_none()).count(),
        accuracy: correct as f64 / truth.len() as f64,
        macro_f1: classes.iter().map(|c| c.2).sum::<f64>() / 3.0,
        classes,
        right,
    }
}

fn close(actual: &Value, expected: f64, what: &str) {
    let actual = actual.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {actual}"));
    assert!((actual - expected).abs() < 1e-9, "{what}: {actual} != {expected}");
}

/// Checks one run of the report against the expected metrics, usage and cost.
fn check_run(run: &Value, expect: &Expected, subject: &str, tokens: (u64, u64), cost: f64) {
    assert_eq!(run["subject"], subject, "{run}");
    assert_eq!((run["examples"].as_u64(), run["errors"].as_u64()), (Some(30), Some(0)), "{run}");
    assert_eq!(run["correct"].as_u64(), Some(expect.correct as u64), "{run}");
    assert_eq!(run["invalid"].as_u64(), Some(expect.invalid as u64), "{run}");
    close(&run["accuracy"], expect.accuracy, "accuracy");
    close(&run["macro"]["f1"], expect.macro_f1, "macro f1");
    for (i, label) in LABELS.iter().enumerate() {
        let c = &run["classes"][i];
        let (precision, recall, f1, support) = expect.classes[i];
        assert_eq!((c["label"].as_str(), c["support"].as_u64()), (Some(*label), Some(support as u64)), "{c}");
        close(&c["precision"], precision, &format!("{label} precision"));
        close(&c["recall"], recall, &format!("{label} recall"));
        close(&c["f1"], f1, &format!("{label} f1"));
    }
    let targets = run["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{run}");
    let t = &targets[0];
    assert_eq!((t["calls"].as_u64(), t["failed"].as_u64()), (Some(30), Some(0)), "{t}");
    assert_eq!((t["input_tokens"].as_u64(), t["output_tokens"].as_u64()), (Some(30 * tokens.0), Some(30 * tokens.1)));
    close(&t["cost_usd"], cost, "target cost");
    close(&run["cost_usd"], cost, "run cost");
    assert!(t["latency_ms"]["p50"].as_f64().unwrap() <= t["latency_ms"]["p95"].as_f64().unwrap(), "{t}");
    assert!(run["latency_ms"]["p95"].as_f64().unwrap() > 0.0, "{run}");
}

/// Two fake vendors (naive and better rules) and a gateway config with a route for each.
async fn setup(dir: &TempDir) -> (FakeVendor, FakeVendor, String) {
    let naive = FakeVendor::start().await;
    naive.set_default(Reply::classify(NAIVE, "neutral", 20, 1));
    let good = FakeVendor::start().await;
    good.set_default(Reply::classify(&better(), "neutral", 25, 3));
    let config = format!(
        "
providers:
  a: {{kind: openai, base_url: '{a}'}}
  b: {{kind: openai, base_url: '{b}'}}
routes:
  naive:
    retry: {{max_attempts: 1}}
    targets: [{{provider: a, model: model-a}}]
  better:
    retry: {{max_attempts: 1}}
    targets: [{{provider: b, model: model-b}}]
prices:
  model-a: {{input_per_mtok: 1, output_per_mtok: 2}}
  model-b: {{input_per_mtok: 3, output_per_mtok: 4}}
",
        a = naive.base_url(),
        b = good.base_url()
    );
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    (naive, good, file.display().to_string())
}

async fn sluice(args: &[&str]) -> Output {
    tokio::process::Command::new(bin()).args(args).output().await.unwrap()
}

fn report(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sluice eval failed: {stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_reports_the_metrics_computed_from_the_dataset_and_the_rules() {
    let dir = TempDir::new("eval");
    let (naive, _good, gateway) = setup(&dir).await;
    let dataset = repo().join("examples/eval/sentiment.jsonl").display().to_string();
    let out = sluice(&["eval", "--dataset", &dataset, "--gateway", &gateway, "--route", "naive", "--json"]).await;
    let r = report(&out);

    let expect = expected(NAIVE);
    // The naive rules get some examples wrong on purpose.
    assert!(expect.correct < 30 && expect.correct > 15, "{}", expect.correct);
    assert_eq!(r["dataset"]["examples"], 30);
    assert_eq!(r["dataset"]["labels"], serde_json::json!(LABELS));
    assert_eq!(r["runs"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(r.get("comparison").is_none(), "{r}");
    // 30 calls of 20 + 1 tokens at $1 and $2 per million.
    check_run(&r["runs"][0], &expect, "naive", (20, 1), 30.0 * 22.0 / 1e6);
    assert_eq!(r["runs"][0]["kind"], "route");

    // Every example was sent once, after the header's system prompt.
    let received = naive.received();
    assert_eq!(received.len(), 30);
    let system = dataset_system();
    for req in &received {
        let messages = req.body["messages"].as_array().unwrap();
        assert_eq!(
            (messages[0]["role"].as_str(), messages[0]["content"].as_str()),
            (Some("system"), Some(system.as_str()))
        );
        assert_eq!(messages[1]["role"], "user");
    }
}

fn dataset_system() -> String {
    dataset().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_compares_two_routes_with_a_confidence_interval() {
    let dir = TempDir::new("eval-compare");
    let (_naive, good, gateway) = setup(&dir).await;
    let dataset = repo().join("examples/eval/sentiment.jsonl").display().to_string();
    // B is named as one target of its route: ROUTE/TARGET.
    let args =
        ["eval", "--dataset", &dataset, "--gateway", &gateway, "--route", "naive", "--compare", "better/b/model-b"];
    let out = sluice(&[&args[..], &["--concurrency", "3", "--json"]].concat()).await;
    let r = report(&out);

    let (a, b) = (expected(NAIVE), expected(&better()));
    assert!(b.invalid > 0, "the better rules answer some questions with no label");
    check_run(&r["runs"][0], &a, "naive", (20, 1), 30.0 * 22.0 / 1e6);
    check_run(&r["runs"][1], &b, "better/b/model-b", (25, 3), 30.0 * (25.0 * 3.0 + 3.0 * 4.0) / 1e6);
    assert_eq!(r["runs"][1]["kind"], "target");
    assert_eq!(good.requests(), 30);

    let c = &r["comparison"];
    assert_eq!((c["a"].as_str(), c["b"].as_str()), (Some("naive"), Some("better/b/model-b")));
    let observed = b.accuracy - a.accuracy;
    assert!(observed > 0.0);
    close(&c["accuracy"]["a"], a.accuracy, "accuracy a");
    close(&c["accuracy"]["b"], b.accuracy, "accuracy b");
    close(&c["accuracy"]["difference"], observed, "difference");
    let (low, high) = (c["accuracy"]["ci95"][0].as_f64().unwrap(), c["accuracy"]["ci95"][1].as_f64().unwrap());
    assert!(low < observed && observed < high, "{low} .. {high} must contain {observed}");
    assert_eq!(c["accuracy"]["method"], "paired-normal");
    let only_a = a.right.iter().zip(&b.right).filter(|(x, y)| **x && !**y).count();
    let only_b = a.right.iter().zip(&b.right).filter(|(x, y)| !**x && **y).count();
    assert_eq!(
        (c["mcnemar"]["only_a"].as_u64(), c["mcnemar"]["only_b"].as_u64()),
        (Some(only_a as u64), Some(only_b as u64))
    );
    close(&c["cost_usd"]["difference"], 30.0 * (87.0 - 22.0) / 1e6, "cost difference");
    assert!(c["latency_ms"]["p50"]["difference"].is_f64(), "{c}");

    // The same for people: tables, with the interval.
    let out = sluice(&args).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("accuracy  {:.4}  ({}/30)", a.accuracy, a.correct)), "{text}");
    assert!(text.contains("95% CI ["), "{text}");
    assert!(text.contains("paired normal interval; McNemar"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_dataset_line_fails_with_its_line_number() {
    let dir = TempDir::new("eval-bad");
    let (naive, _good, gateway) = setup(&dir).await;
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, "{\"input\": \"fine\", \"label\": \"positive\"}\n\n{\"input\": \"no label\"}\n").unwrap();
    let out =
        sluice(&["eval", "--dataset", &file.display().to_string(), "--gateway", &gateway, "--route", "naive"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 3: `label`: missing"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(naive.requests(), 0, "nothing is called for an invalid dataset");

    // An unknown route names the routes there are.
    let dataset = repo().join("examples/eval/sentiment.jsonl").display().to_string();
    let out = sluice(&["eval", "--dataset", &dataset, "--gateway", &gateway, "--route", "nope"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no route or target named `nope`") && stderr.contains("`better`, `naive`"), "{stderr}");
}

/// The shipped example, as docs/ai-gateway.md runs it: the keyword model in Python.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_example_runs_against_its_python_keyword_model() {
    let dir = TempDir::new("eval-example");
    let port = sluice_testkit::free_port();
    let mut model = KillOnDrop(
        std::process::Command::new("python3")
            .arg(repo().join("examples/eval/keyword_model.py"))
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs the example's keyword model"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the keyword model did not start");
        assert!(model.0.try_wait().unwrap().is_none(), "the keyword model exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = std::fs::read_to_string(repo().join("examples/eval/gateway.yaml")).unwrap();
    assert!(config.contains("127.0.0.1:8199"));
    let gateway = dir.path().join("gateway.yaml");
    std::fs::write(&gateway, config.replace("127.0.0.1:8199", &format!("127.0.0.1:{port}"))).unwrap();
    let dataset = repo().join("examples/eval/sentiment.jsonl").display().to_string();
    let gateway = gateway.display().to_string();
    let args = ["eval", "--dataset", &dataset, "--gateway", &gateway, "--route", "sentiment"];
    let r = report(&sluice(&[&args[..], &["--compare", "sentiment-v2", "--json"]].concat()).await);
    // The figures docs/ai-gateway.md shows: the Python rules are the rules of this file.
    let (a, b) = (expected(NAIVE), expected(&better()));
    assert_eq!((a.correct, b.correct, b.invalid), (23, 26, 1));
    assert_eq!(r["runs"][0]["correct"].as_u64(), Some(23), "{r}");
    assert_eq!(r["runs"][1]["correct"].as_u64(), Some(26), "{r}");
    assert_eq!(r["runs"][1]["invalid"].as_u64(), Some(1), "{r}");
    close(&r["runs"][0]["macro"]["f1"], a.macro_f1, "example macro f1");
    assert!(r["comparison"]["cost_usd"]["difference"].as_f64().unwrap() > 0.0, "{r}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
