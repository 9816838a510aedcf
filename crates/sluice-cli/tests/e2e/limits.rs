//! Issue 13, items 14 to 18: connections that stall or idle are closed and capped, queue names
//! polled are bounded and freed, NUL characters are refused with a 400 that names the parameter,
//! history is paged, bodies with trailing garbage are refused, a SQLite file deleted under the
//! server makes it unready and refuses writes, and `/metrics` is not public.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// The value of an unlabelled (or fully labelled) series in Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// How long until the server closes `tcp` (reads until end of stream), at most `within`.
async fn closed_after(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Sends a GET of `/healthz` on `tcp` (kept alive) and reads the answer's head.
async fn healthz(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Item 14: a partial header, a silent socket and an idle keep-alive are closed after their
/// timeouts; past the per-address cap a connection is closed at once while the open ones still
/// answer; the metrics count it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_idle_connections_are_closed_and_a_cap_refuses_the_next() {
    let dir = TempDir::new("e2e-connections");
    let metrics_port = sluice_testkit::free_port().to_string();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let server = ServerProcess::start_with_args(
        &bin(),
        dir.path(),
        &dir.path().join("sluice.db").display().to_string(),
        &[
            "--header-read-timeout",
            "1s",
            "--idle-timeout",
            "3s",
            "--max-connections-per-address",
            "3",
            "--metrics-addr",
            &metrics_addr,
        ],
    )
    .await;
    let addr = format!("127.0.0.1:{}", server.port);
    let scrape =
        || async { reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap().text().await.unwrap() };

    // A header that never ends, and a socket that sends nothing: closed after the 1 s header
    // timeout (they stayed open for good before).
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nhost: local").await.unwrap();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let waited = closed_after(&mut partial, Duration::from_secs(10)).await.expect("a partial header stayed open");
    assert!(waited >= Duration::from_millis(700), "closed before the header timeout: {waited:?}");
    assert!(closed_after(&mut silent, Duration::from_secs(5)).await.is_some(), "a silent socket stayed open");

    // An idle keep-alive: answered, then closed after the 3 s idle timeout, not the header one.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert!(healthz(&mut idle).await.starts_with("HTTP/1.1 200"));
    let waited = closed_after(&mut idle, Duration::from_secs(10)).await.expect("an idle keep-alive stayed open");
    assert!(waited >= Duration::from_millis(2500), "closed before the idle timeout: {waited:?}");

    let text = scrape().await;
    assert_eq!(series(&text, "sluice_connections_timed_out_total{timeout=\"header\"}"), Some(2.0), "{text}");
    assert!(series(&text, "sluice_connections_timed_out_total{timeout=\"idle\"}").is_some_and(|n| n >= 1.0), "{text}");

    // Other clients of this address (the test's pooled HTTP client) are idle by now and closed.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(series(&scrape().await, "sluice_connections_open"), Some(0.0));
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        assert!(healthz(&mut tcp).await.starts_with("HTTP/1.1 200"));
        open.push(tcp);
    }
    // The fourth from this address is closed at once, with nothing read.
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    let _ = fourth.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    let waited =
        closed_after(&mut fourth, Duration::from_secs(5)).await.expect("the connection past the cap was served");
    assert!(waited < Duration::from_millis(900), "{waited:?}");
    // The open ones still answer.
    assert!(healthz(&mut open[0]).await.starts_with("HTTP/1.1 200"));
    let text = scrape().await;
    assert_eq!(series(&text, "sluice_connections_open"), Some(3.0), "{text}");
    assert_eq!(series(&text, "sluice_connections_refused_total{cap=\"per_address\"}"), Some(1.0), "{text}");
    assert!(server.log_text().contains("--max-connections-per-address"), "the refusal is not logged");
}

on_both_backends!(polled_queue_names_are_bounded_and_idle_ones_freed);

/// Item 15: a tenant's queue names held in memory are capped (a new one past the cap answers
/// 429 `too_many_queues`), and queues with no task and no poller are freed.
async fn polled_queue_names_are_bounded_and_idle_ones_freed(backend: Backend) {
    let db = Db::new("queues-bounded", backend);
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--max-queues-per-tenant", "40"]).await;
    let api = server.api();
    let poll = |queue: String| {
        let api = api.clone();
        async move { api.post("/v1/tasks/poll", &json!({"queue": queue, "worker_id": "w", "wait_ms": 0})).await }
    };
    for i in 0..40 {
        let (status, body) = poll(format!("q-{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(series(&api.metrics().await, "sluice_task_queues"), Some(40.0));
    let (status, body) = poll("one-too-many".into()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("too_many_queues")), "{body}");
    assert_eq!(body["error"]["details"]["limit"], 40);
    // A queue in use still answers.
    assert_eq!(poll("q-7".into()).await.0, 200);

    // With no task and no poller they are freed (after 10 s without a poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = series(&api.metrics().await, "sluice_task_queues").unwrap();
        if n == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} idle queues still held");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(poll("one-too-many".into()).await.0, 200);
}

on_both_backends!(nul_characters_are_refused_with_the_name_of_the_parameter);

/// Item 16: a NUL character in a path or query parameter or a JSON field answered 500 on
/// PostgreSQL; now 400 naming it. Free-form input keeps it, stored safely.
async fn nul_characters_are_refused_with_the_name_of_the_parameter(backend: Backend) {
    let db = Db::new("nul", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "echo", "steps": [{"id": "a", "type": "transform", "expr": ".input"}]})).await;

    let field = |body: &Value| body["error"]["details"]["field"].as_str().unwrap_or_default().to_string();
    for (path, name) in [
        ("/v1/executions/a%00b", "workflow_id"),
        ("/v1/executions/a%00b/history", "workflow_id"),
        ("/v1/workflows/e%00", "name"),
        ("/v1/executions?workflow=e%00cho", "workflow"),
        ("/v1/executions?workflow_id=x&status=%00", "status"),
        ("/v1/usage?workflow_id=%00", "workflow_id"),
        ("/v1/audit?actor=%00", "actor"),
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!((status, field(&body)), (400, name.to_string()), "GET {path}: {body}");
    }
    let (status, body) = api.post("/v1/executions/a%00/signals/go", &json!(1)).await;
    assert_eq!((status, field(&body)), (400, "workflow_id".into()), "{body}");
    let (status, body) = api.post("/v1/executions/a/signals/g%00", &json!(1)).await;
    assert_eq!((status, field(&body)), (400, "name".into()), "{body}");

    for (path, body, name) in [
        ("/v1/executions", json!({"workflow": "echo", "workflow_id": "a\u{0}b"}), "workflow_id"),
        ("/v1/executions", json!({"workflow": "ec\u{0}ho"}), "workflow"),
        ("/v1/tasks/poll", json!({"queue": "q\u{0}", "wait_ms": 0}), "queue"),
        ("/v1/tasks/poll", json!({"queue": "q", "worker_id": "\u{0}", "wait_ms": 0}), "worker_id"),
        ("/v1/auth/login", json!({"tenant": "default\u{0}", "email": "a@b.c", "password": "x"}), "tenant"),
        ("/v1/api-keys", json!({"name": "k\u{0}", "role": "viewer"}), "name"),
    ] {
        let (status, answer) = api.post(path, &body).await;
        assert_eq!((status, field(&answer)), (400, name.to_string()), "POST {path} {body}: {answer}");
    }
    let (status, body) = api.post_raw("/v1/workflows", "application/yaml", "name: x\u{0}\nsteps: []\n").await;
    assert_eq!((status, field(&body)), (400, "definition".into()), "{body}");

    // Free-form input may hold it, and gets it back.
    let input = json!({"s": "a\u{0}b", "k\u{0}": 1});
    let id = api.start("echo", input.clone(), Some("nul-input")).await;
    assert_eq!(api.wait(&id, 20).await["output"], input);
    assert_replays(&api).await;
}

on_both_backends!(history_is_paged_and_json_with_trailing_garbage_is_refused);

/// Item 17 (a, b): a history without `limit` comes a page at a time (100 events, or 4 MiB),
/// with `next_after`; a body with garbage after its JSON is refused.
async fn history_is_paged_and_json_with_trailing_garbage_is_refused(backend: Backend) {
    let db = Db::new("history-pages", backend);
    // Signals of 1.5 MB make pages of few events: past the default signal size.
    let server = ServerProcess::start_with_args(&bin(), db.dir(), db.url(), &["--max-signal-size", "2MiB"]).await;
    let api = server.api();
    api.publish(&json!({"name": "gate", "steps": [{"id": "w", "type": "wait_signal", "signal": "go"}]})).await;

    // Trailing garbage was accepted (201) before.
    for (path, body) in [
        ("/v1/executions", r#"{"workflow": "gate", "workflow_id": "g"} garbage!!"#),
        ("/v1/executions", r#"{"workflow": "gate"}{"workflow": "gate"}"#),
        ("/v1/tasks/poll", r#"{"queue": "q", "wait_ms": 0} x"#),
    ] {
        let (status, answer) = api.post_raw(path, "application/json", body).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_json")), "{body}: {answer}");
    }
    let (status, answer) = api.post_raw("/v1/executions", "application/json", "{\"workflow\": \"gate\"}  \n").await;
    assert_eq!(status, 201, "white space after the value is fine: {answer}");

    let small = api.start("gate", Value::Null, Some("many")).await;
    for i in 0..150 {
        let (status, body) = api.post(&format!("/v1/executions/{small}/signals/noise"), &json!(i)).await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, page) = api.get(&format!("/v1/executions/{small}/history")).await;
    assert_eq!(status, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 100, "the default page");
    assert_eq!(page["next_after"], 100);
    let all = api.history(&small, None).await;
    assert!(all.len() > 150, "{}", all.len());
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());

    // Large events: a page ends at 4 MiB however many events it may hold.
    let big = api.start("gate", Value::Null, Some("big")).await;
    let payload = json!("x".repeat(1_500_000));
    for _ in 0..5 {
        assert_eq!(api.post(&format!("/v1/executions/{big}/signals/noise"), &payload).await.0, 202);
    }
    let r = api.request(reqwest::Method::GET, &format!("/v1/executions/{big}/history?limit=10000")).send().await;
    let text = r.unwrap().text().await.unwrap();
    assert!(text.len() < 4_500_000, "a page of {} bytes", text.len());
    let page: Value = serde_json::from_str(&text).unwrap();
    let n = page["events"].as_array().unwrap().len();
    assert!(n < 7, "{n} events in one page");
    assert!(page["next_after"].is_u64(), "{}", page["next_after"]);
    let all = api.history(&big, None).await;
    assert_eq!(all.iter().filter(|e| e["type"] == "signal_received").count(), 5, "every page read");
}

/// Item 17 (c): with its SQLite file's directory deleted, the server said it was ready and
/// kept accepting starts into the deleted file; now `/readyz` answers 503 with the reason and
/// writes answer 503 `storage_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sqlite_database_makes_the_server_unready_and_refuses_writes() {
    let dir = TempDir::new("e2e-deleted-db");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = ServerProcess::start_on(&bin(), dir.path(), &data.join("sluice.db").display().to_string()).await;
    let api = server.api();
    api.publish(&json!({"name": "echo", "steps": [{"id": "a", "type": "transform", "expr": ".input"}]})).await;
    api.start("echo", json!(1), None).await;

    std::fs::remove_dir_all(&data).unwrap();
    let (status, body) = api.get("/readyz").await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("storage_unavailable")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("deleted or replaced"), "{body}");
    let (status, body) = api.post("/v1/executions", &json!({"workflow": "echo", "input": 2})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("storage_unavailable")), "{body}");
    assert_eq!(api.get("/healthz").await.0, 200, "the process is alive");
}

/// Item 18: `/metrics` named every tenant and queue to anyone. On the API's port it now needs an
/// owner or admin and shows only that tenant's queues; with `--metrics-addr` it is served there
/// (every series, for Prometheus) and not on the API's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_not_public() {
    let dir = TempDir::new("e2e-metrics");
    let database = dir.path().join("sluice.db").display().to_string();
    let other_key = sluice_testkit::admin_init(&bin(), dir.path(), &database, "other");
    let server = ServerProcess::start_on(&bin(), dir.path(), &database).await;
    let owner = server.api();
    let other = Api::with_key(&server.base, Some(&other_key));
    // A task waiting in a queue of the tenant `other`.
    other.publish(&json!({"name": "t", "steps": [{"id": "a", "type": "task", "queue": "secret-queue"}]})).await;
    other.start("t", Value::Null, None).await;

    let anonymous = Api::new(&server.base);
    let (status, _) = anonymous.get("/metrics").await;
    assert_eq!(status, 401, "metrics without a credential");
    let (_, made) = owner.post("/v1/api-keys", &json!({"name": "v", "role": "viewer"})).await;
    let viewer = Api::with_key(&server.base, made["key"].as_str());
    assert_eq!(viewer.get("/metrics").await.0, 403, "metrics for a viewer");

    let mine = owner.metrics().await;
    assert!(mine.contains("sluice_executions_started_total"), "{mine}");
    assert!(!mine.contains("secret-queue") && !mine.contains("tenant=\"other\""), "{mine}");
    let theirs = other.metrics().await;
    assert!(theirs.contains("queue=\"secret-queue\""), "{theirs}");
    drop(server);

    let metrics_addr = format!("127.0.0.1:{}", sluice_testkit::free_port());
    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--metrics-addr", &metrics_addr]).await;
    Api::with_key(&server.base, Some(&other_key)).start("t", Value::Null, None).await;
    let (status, body) = server.api().get("/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--metrics-addr"), "{body}");
    let scraped = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap();
    assert_eq!(scraped.status(), 200);
    let text = scraped.text().await.unwrap();
    assert!(text.contains("tenant=\"other\",queue=\"secret-queue\""), "{text}");
}
