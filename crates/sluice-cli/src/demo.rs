//! The built-in demo worker: the queues the examples use, done in-process.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sluice_worker::{Task, TaskError, Worker};

pub const QUEUES: &[&str] = &["greet", "enrich", "flaky", "echo", "noop", "bench"];

/// Appends one JSON line per task received (with its trace id and `traceparent`) and per result
/// the server acknowledged, synced to disk, so a test can prove no step was completed twice.
#[derive(Clone)]
struct Recorder(Arc<Mutex<std::fs::File>>);

impl Recorder {
    fn write(&self, event: &str, token: &str, task: Option<&Task>) {
        let mut line = json!({"event": event, "idempotency_key": token});
        if let Some(t) = task {
            line["trace_id"] = json!(t.trace_id);
            line["traceparent"] = json!(t.traceparent);
        }
        let line = line.to_string();
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{line}");
        let _ = f.sync_data();
    }
}

pub async fn run_worker(
    server: &str,
    api_key: Option<&str>,
    queues: Vec<String>,
    concurrency: usize,
    record: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let queues: Vec<String> = if queues.is_empty() { QUEUES.iter().map(|q| q.to_string()).collect() } else { queues };
    let recorder = match record {
        Some(path) => Some(Recorder(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        )))),
        None => None,
    };
    let mut w = Worker::new(server).api_key(api_key).concurrency(concurrency);
    if let Some(r) = recorder.clone() {
        w = w.on_result(Arc::new(move |token: &str, ok: bool| {
            if ok {
                r.write("completed", token, None);
            }
        }));
    }
    let rec = recorder.clone();
    let received = move |task: &Task| {
        // Inside the task's span: this line carries the execution's trace id.
        tracing::debug!(queue = %task.queue, "demo worker received a task");
        if let Some(r) = &rec {
            r.write("received", &task.task_token, Some(task));
        }
    };
    let received = Arc::new(received);
    for q in &queues {
        w = match q.as_str() {
            "greet" => w.queue("greet", {
                let rx = received.clone();
                move |t| {
                    rx(&t);
                    async move {
                        let name = t.input["name"].as_str().unwrap_or("world").to_string();
                        Ok(json!({"greeting": format!("Hello, {name}")}))
                    }
                }
            }),
            "enrich" => w.queue("enrich", |t| async move {
                Ok(match &t.input {
                    Value::String(s) => json!({"value": s, "upper": s.to_uppercase(), "length": s.chars().count()}),
                    other => json!({"value": other, "enriched": true}),
                })
            }),
            "flaky" => w.queue("flaky", |t| async move {
                let succeed_on = t.input["succeed_on_attempt"].as_u64().unwrap_or(u64::MAX);
                if u64::from(t.attempt) >= succeed_on {
                    Ok(json!({"attempt": t.attempt}))
                } else {
                    Err(TaskError::new("flaky", format!("attempt {} failed on purpose", t.attempt)))
                }
            }),
            "echo" => w.queue("echo", {
                let rx = received.clone();
                move |t| {
                    rx(&t);
                    async move { Ok(t.input) }
                }
            }),
            "bench" => w.queue("bench", |t| async move { Ok(t.input) }),
            "noop" => w.queue("noop", {
                let rx = received.clone();
                move |t| {
                    rx(&t);
                    async move { Ok(Value::Null) }
                }
            }),
            other => anyhow::bail!("the demo worker has no queue `{other}`; it serves {}", QUEUES.join(", ")),
        };
    }
    if crate::logs::is_json() {
        tracing::info!(queues = %queues.join(","), %server, "demo worker polling");
    } else {
        eprintln!("demo worker polling {} on {server}", queues.join(", "));
    }
    w.run(shutdown).await?;
    Ok(())
}
