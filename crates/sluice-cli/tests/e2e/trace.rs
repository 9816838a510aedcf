//! Trace ids end to end: the trace of the request that starts an execution reaches its `http`
//! step's outgoing request, the task a worker receives, its child, and every log line about it;
//! and every line of the server's JSON log carries a trace id.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_testkit::json_lines;
use sluice_testkit::recording::RecordingServer;

use crate::{assert_replays, bin, of_type, ServerProcess, TempDir, WorkerProcess};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const SIGNAL_TRACE: &str = "0AF7651916CD43DD8448EB211C80319C";

fn is_trace_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `00-<trace>-<span>-<flags>` split, after checking its shape.
fn traceparent(v: &str) -> (String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert!(
        parts.len() == 4 && parts[0] == "00" && is_trace_id(&json!(parts[1])) && parts[2].len() == 16,
        "not a traceparent: {v:?}"
    );
    assert_ne!(parts[2], "0000000000000000");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test]
async fn trace_ids_reach_http_steps_workers_children_and_every_log_line() {
    let dir = TempDir::new("trace");
    let db = dir.path().join("sluice.db").display().to_string();
    // Debug, so that the request lines (`observe`) and the engine's step lines are logged too.
    // The http step calls a local server: loopback is allowed for it.
    let allow = ["--egress-allow", "127.0.0.1/32"];
    let server = ServerProcess::start_with_env(&bin(), dir.path(), &db, &allow, &[("SLUICE_LOG", "debug")]).await;
    let (record, worker_log) = (dir.path().join("worker.jsonl"), dir.path().join("worker.log"));
    let _worker = WorkerProcess::rust_logged(&bin(), &server, &["greet"], Some(&record), &worker_log, "debug");
    let upstream = RecordingServer::start().await;
    let api = server.api();
    api.publish(&json!({"name": "traced-kid", "steps": [{"id": "k", "type": "transform", "expr": ".input.n * 2"}]}))
        .await;
    api.publish(&json!({"name": "traced", "steps": [
        {"id": "call", "type": "http", "method": "POST", "url": ".input.hook", "body": "{hello: .input.name}"},
        {"id": "greet", "type": "task", "queue": "greet", "input": "{name: .input.name}"},
        {"id": "nap", "type": "sleep", "duration": "20ms"},
        {"id": "sig", "type": "wait_signal", "signal": "go", "timeout": "30s"},
        {"id": "kid", "type": "child", "workflow": "traced-kid", "input": "{n: 2}"},
        {"id": "out", "type": "return", "output":
            "{greeting: .steps.greet.greeting, http: .steps.call.status, sig: .steps.sig, kid: .steps.kid}"}
    ]}))
    .await;

    // Start inside the caller's trace: the answer continues it from the server's own span.
    let input = json!({"name": "Ada", "hook": format!("{}/hook", upstream.base_url())});
    let body = json!({"workflow": "traced", "workflow_id": "traced-1", "input": input});
    let started_with = format!("00-{TRACE}-{PARENT}-01");
    let (status, headers, started) =
        api.send("POST", "/v1/executions", &[("traceparent", &started_with)], Some(&body)).await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(headers.get("x-trace-id").map(String::as_str), Some(TRACE));
    let (trace, server_span) = traceparent(&headers["traceparent"]);
    assert_eq!(trace, TRACE);
    assert_ne!(server_span, PARENT, "the server answers with its own span id");
    let run_id = started["run_id"].as_str().unwrap().to_string();

    // A signal in another trace (X-Trace-ID in capitals is taken, in lowercase).
    let (status, headers, _) =
        api.send("POST", "/v1/executions/traced-1/signals/go", &[("x-trace-id", SIGNAL_TRACE)], Some(&json!(7))).await;
    assert_eq!(status, 202);
    let signal_trace = SIGNAL_TRACE.to_lowercase();
    assert_eq!(headers["x-trace-id"], signal_trace);

    // A 404 starts a new trace of its own.
    let (status, headers, _) = api.send("GET", "/v1/nothing-here", &[], None).await;
    assert_eq!(status, 404);
    let missing_trace = headers["x-trace-id"].clone();
    assert!(is_trace_id(&json!(missing_trace)) && missing_trace != TRACE, "{missing_trace}");
    assert_eq!(traceparent(&headers["traceparent"]).0, missing_trace);

    let row = api.wait("traced-1", 30).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(row["output"], json!({"greeting": "Hello, Ada", "http": 200, "sig": 7, "kid": 4}));

    // The http step's request continued the trace from a span of its own.
    let calls = upstream.received();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].method.as_str(), calls[0].path.as_str()), ("POST", "/hook"));
    let sent = calls[0].headers.get("traceparent").unwrap_or_else(|| panic!("no traceparent: {:?}", calls[0].headers));
    let (trace, http_span) = traceparent(sent);
    assert_eq!(trace, TRACE, "the http step's traceparent");
    assert!(http_span != PARENT && http_span != server_span);

    // The worker received the trace with the task, and logged inside it.
    let records = json_lines(&std::fs::read_to_string(&record).unwrap());
    let received: Vec<&Value> = records.iter().filter(|r| r["event"] == "received").collect();
    assert_eq!(received.len(), 1, "{records:?}");
    assert_eq!(received[0]["trace_id"], TRACE);
    let (trace, task_span) = traceparent(received[0]["traceparent"].as_str().unwrap());
    assert_eq!(trace, TRACE);
    assert!(task_span != http_span && task_span != server_span);
    let worker_lines = json_lines(&std::fs::read_to_string(&worker_log).unwrap());
    assert!(worker_lines.iter().all(|l| is_trace_id(&l["trace_id"])), "a worker line without trace id");
    let in_task: Vec<&Value> = worker_lines.iter().filter(|l| l["trace_id"] == TRACE).collect();
    assert!(
        in_task
            .iter()
            .any(|l| l["message"] == "task received" && l["step"] == "greet" && l["workflow_id"] == "traced-1"),
        "the worker logged no line in the task's trace: {worker_lines:?}"
    );

    // The execution and its child keep the trace id in their histories.
    let events = api.history("traced-1", None).await;
    assert_eq!(events[0]["type"], "execution_started");
    assert_eq!(events[0]["trace_id"], TRACE);
    let child_id = of_type(&events, "child_started")[0]["workflow_id"].as_str().unwrap().to_string();
    let child_events = api.history(&child_id, None).await;
    assert_eq!(child_events[0]["trace_id"], TRACE, "the child inherits the trace");

    // Every line of the server log is a JSON object with a trace id.
    let lines = wait_for_log(&server, |lines| {
        lines.iter().any(|l| l["message"] == "execution ended" && l["workflow_id"] == child_id)
            && lines.iter().any(|l| l["route"] == "unmatched")
    })
    .await;
    for l in &lines {
        assert!(is_trace_id(&l["trace_id"]), "a line without a trace id: {l}");
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l.get(key).is_some(), "a line without {key}: {l}");
        }
    }
    let serving = lines.iter().find(|l| l["message"] == "sluice serving").expect("the startup line");
    let process_trace = serving["trace_id"].as_str().unwrap();
    assert!(![TRACE, signal_trace.as_str(), missing_trace.as_str()].contains(&process_trace));
    assert!(lines.iter().filter(|l| l["trace_id"] == process_trace).all(|l| l.get("tenant_id").is_none()));

    // Request lines: the caller's trace, and the tenant on every /v1 route.
    let request = |method: &str, route: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["message"] == "request" && l["method"] == method && l["route"] == route)
            .unwrap_or_else(|| panic!("no request line for {method} {route}"))
    };
    let start_line = request("POST", "/v1/executions");
    assert_eq!((&start_line["trace_id"], &start_line["tenant_id"]), (&json!(TRACE), &json!("default")));
    let signal_line = request("POST", "/v1/executions/{workflow_id}/signals/{name}");
    assert_eq!((&signal_line["trace_id"], &signal_line["tenant_id"]), (&json!(signal_trace), &json!("default")));
    let missing_line = request("GET", "unmatched");
    assert_eq!((&missing_line["trace_id"], &missing_line["status"]), (&json!(missing_trace), &json!(404)));
    assert!(missing_line.get("tenant_id").is_none(), "no tenant is in scope for an unknown route");
    for l in lines.iter().filter(|l| l["route"].as_str().is_some_and(|r| r.starts_with("/v1/"))) {
        assert_eq!(l["tenant_id"], "default", "a /v1 request line without its tenant: {l}");
    }
    let delivered = lines.iter().find(|l| l["message"] == "signal delivered").expect("signal line");
    assert_eq!(delivered["trace_id"], signal_trace.as_str());

    // Execution lines (those naming a run): the execution's trace and tenant, whichever request
    // or background job did the work.
    let ours =
        |l: &&Value| l["workflow_id"].as_str().is_some_and(|w| w.starts_with("traced-1")) && l.get("run_id").is_some();
    let execution_lines: Vec<&Value> = lines.iter().filter(ours).collect();
    for l in &execution_lines {
        assert_eq!((&l["trace_id"], &l["tenant_id"]), (&json!(TRACE), &json!("default")), "{l}");
    }
    for (message, check) in [
        ("execution started", json!({"run_id": run_id})),
        ("http step answered", json!({"step": "call", "status": 200})),
        ("task handed to a worker", json!({"step": "greet", "queue": "greet"})),
        ("execution ended", json!({"run_id": run_id, "status": "completed"})),
        ("execution ended", json!({"workflow_id": child_id, "status": "completed"})),
    ] {
        let found = execution_lines
            .iter()
            .any(|l| l["message"] == message && check.as_object().unwrap().iter().all(|(k, v)| &l[k] == v));
        assert!(found, "no `{message}` line with {check} in the execution's trace");
    }
    assert!(execution_lines.iter().any(|l| l["target"].as_str().is_some_and(|t| t.starts_with("sluice_engine"))));
    assert!(assert_replays(&api).await >= 2);
}

/// The server's log lines once `ready` holds for them (lines are written as they happen, but the
/// last ones may trail the answers).
async fn wait_for_log(server: &ServerProcess, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = server.log_lines();
        if ready(&lines) || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
