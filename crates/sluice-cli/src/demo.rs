//! The built-in demo worker: the queues the examples use, done in-process.

use std::future::Future;

use anyhow::Result;
use serde_json::{json, Value};
use sluice_worker::{TaskError, Worker};

pub const QUEUES: &[&str] = &["greet", "enrich", "flaky", "echo", "noop"];

pub async fn run_worker(server: &str, queues: Vec<String>, concurrency: usize, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let queues: Vec<String> = if queues.is_empty() { QUEUES.iter().map(|q| q.to_string()).collect() } else { queues };
    let mut w = Worker::new(server).concurrency(concurrency);
    for q in &queues {
        w = match q.as_str() {
            "greet" => w.queue("greet", |t| async move {
                let name = t.input["name"].as_str().unwrap_or("world").to_string();
                Ok(json!({"greeting": format!("Hello, {name}!")}))
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
            "echo" => w.queue("echo", |t| async move { Ok(t.input) }),
            "noop" => w.queue("noop", |_| async move { Ok(Value::Null) }),
            other => anyhow::bail!("the demo worker has no queue `{other}`; it serves {}", QUEUES.join(", ")),
        };
    }
    eprintln!("demo worker polling {} on {server}", queues.join(", "));
    w.run(shutdown).await?;
    Ok(())
}
