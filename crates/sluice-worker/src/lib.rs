//! Rust worker SDK for Sluice: long-poll task queues over HTTP, run handlers concurrently, and
//! report results in batches. Handlers are async closures from a `Task` to JSON or a `TaskError`.
//! Each handler runs inside a `task` tracing span carrying the execution's `trace_id`, so its
//! log lines join the execution's trace.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_worker::Error> {
//! use serde_json::json;
//! let worker = sluice_worker::Worker::new("http://127.0.0.1:7233")
//!     .queue("greet", |task| async move {
//!         let name = task.input["name"].as_str().unwrap_or("world").to_string();
//!         Ok(json!({ "greeting": format!("Hello, {name}") }))
//!     });
//! worker.run(std::future::pending()).await
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the server: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server answered {status}: {code}: {message}")]
    Api { status: u16, code: String, message: String },
}

/// A task handed to a handler.
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    pub task_token: String,
    pub queue: String,
    pub workflow_id: String,
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub input: Value,
    /// Stable across redeliveries of the same attempt: use it to make side effects idempotent.
    pub idempotency_key: String,
    pub start_to_close_timeout_ms: u64,
    pub heartbeat_timeout_ms: Option<u64>,
    /// Trace id of the execution (32 lowercase hex digits); absent from older servers.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// W3C `traceparent` continuing the execution's trace: send it on the calls the handler
    /// makes so they join the trace.
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(skip)]
    client: Option<Client>,
}

impl Task {
    /// The span a handler runs in: the task's trace id, workflow id, step and attempt.
    pub fn span(&self) -> tracing::Span {
        // ERROR level: enabled whenever any line is, so the handler's lines carry the trace id.
        let span = tracing::error_span!(
            "task",
            trace_id = tracing::field::Empty,
            queue = %self.queue,
            workflow_id = %self.workflow_id,
            run_id = %self.run_id,
            step = %self.step,
            attempt = self.attempt,
        );
        if let Some(trace_id) = &self.trace_id {
            span.record("trace_id", trace_id.as_str());
        }
        span
    }

    /// Reports progress; returns true when the execution no longer wants the result.
    pub async fn heartbeat(&self, details: Value) -> Result<bool, Error> {
        let Some(c) = &self.client else { return Ok(false) };
        let r: Value =
            c.post("/v1/tasks/heartbeat", &json!({"task_token": self.task_token, "details": details})).await?;
        Ok(r["cancel_requested"].as_bool().unwrap_or(false))
    }
}

/// Why a handler failed. `retryable: false` fails the step at once.
#[derive(Debug, Clone, Serialize)]
pub struct TaskError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    #[serde(skip)]
    pub retryable: bool,
}

impl TaskError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind: kind.into(), message: message.into(), details: None, retryable: true }
    }

    pub fn non_retryable(mut self) -> Self {
        self.retryable = false;
        self
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;
type Handler = Arc<dyn Fn(Task) -> BoxFut + Send + Sync>;
/// Called with each task token and whether the server recorded its result.
pub type ResultHook = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// `Authorization: Bearer <api_key>` (marked sensitive, so it is never logged), or nothing.
pub fn auth_headers(api_key: Option<&str>) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(mut v) = api_key.and_then(|k| reqwest::header::HeaderValue::from_str(&format!("Bearer {k}")).ok()) {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    headers
}

/// A thin JSON client for the Sluice API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
}

impl Client {
    pub fn new(server: &str) -> Self {
        Self::with_key(server, None)
    }

    /// A client that sends `api_key` (a key with the worker role, typically) as a bearer token.
    pub fn with_key(server: &str, api_key: Option<&str>) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .default_headers(auth_headers(api_key))
            .build()
            .unwrap_or_default();
        Self { http, base: server.trim_end_matches('/').into() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, Error> {
        let resp = self.http.post(format!("{}{path}", self.base)).json(body).send().await?;
        Self::decode(resp).await
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let resp = self.http.get(format!("{}{path}", self.base)).send().await?;
        Self::decode(resp).await
    }

    async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, Error> {
        let status = resp.status().as_u16();
        if status >= 400 {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(Error::Api {
                status,
                code: body["error"]["code"].as_str().unwrap_or("unknown").to_string(),
                message: body["error"]["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(resp.json().await?)
    }
}

/// Polls queues and runs handlers. Build with `new`, add `queue`s, then `run`.
pub struct Worker {
    client: Client,
    handlers: HashMap<String, Handler>,
    concurrency: usize,
    worker_id: String,
    on_result: Option<ResultHook>,
}

enum Outcome {
    Done(String, Value),
    Failed(String, TaskError),
}

impl Worker {
    pub fn new(server: &str) -> Self {
        Self {
            client: Client::new(server),
            handlers: HashMap::new(),
            concurrency: 64,
            worker_id: format!("rust-{}", std::process::id()),
            on_result: None,
        }
    }

    /// Registers the handler of a queue.
    pub fn queue<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        self.handlers.insert(name.to_string(), Arc::new(move |t| Box::pin(f(t))));
        self
    }

    /// Authenticates with `api_key` (a key with the worker role); `None` sends no credentials.
    pub fn api_key(mut self, api_key: Option<&str>) -> Self {
        let base = self.client.base().to_string();
        self.client = Client::with_key(&base, api_key);
        self
    }

    /// Tasks in flight at once, per queue.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Observes which results the server acknowledged (for audits and tests).
    pub fn on_result(mut self, hook: ResultHook) -> Self {
        self.on_result = Some(hook);
        self
    }

    pub fn worker_id(mut self, id: &str) -> Self {
        self.worker_id = id.to_string();
        self
    }

    /// Runs until `shutdown` resolves, then finishes reporting what is done.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let stop = Arc::new(Notify::new());
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (stop, stopped) = (stop.clone(), stopped.clone());
            tokio::spawn(async move {
                shutdown.await;
                stopped.store(true, Ordering::SeqCst);
                stop.notify_waiters();
            });
        }
        let (tx, rx) = mpsc::unbounded_channel::<Outcome>();
        let reporter = tokio::spawn(report(self.client.clone(), rx, self.on_result.clone()));
        let mut pollers = Vec::new();
        for (queue, handler) in self.handlers {
            let ctx = PollCtx {
                client: self.client.clone(),
                queue,
                handler,
                concurrency: self.concurrency,
                worker_id: self.worker_id.clone(),
                tx: tx.clone(),
                stop: stop.clone(),
                stopped: stopped.clone(),
            };
            pollers.push(tokio::spawn(ctx.run()));
        }
        drop(tx);
        for p in pollers {
            let _ = p.await;
        }
        let _ = reporter.await;
        Ok(())
    }
}

struct PollCtx {
    client: Client,
    queue: String,
    handler: Handler,
    concurrency: usize,
    worker_id: String,
    tx: mpsc::UnboundedSender<Outcome>,
    stop: Arc<Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl PollCtx {
    async fn run(self) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let freed = Arc::new(Notify::new());
        let mut backoff = Duration::from_millis(100);
        while !self.stopped.load(Ordering::SeqCst) {
            let free = self.concurrency.saturating_sub(in_flight.load(Ordering::SeqCst));
            if free == 0 {
                let notified = freed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.concurrency.saturating_sub(in_flight.load(Ordering::SeqCst)) == 0 {
                    notified.await;
                }
                continue;
            }
            let body = json!({"queue": self.queue, "worker_id": self.worker_id, "max_tasks": free, "wait_ms": 10_000});
            let polled = tokio::select! {
                r = self.client.post::<Value>("/v1/tasks/poll", &body) => r,
                _ = self.stop.notified() => break,
            };
            let tasks: Vec<Task> = match polled {
                Ok(v) => {
                    backoff = Duration::from_millis(100);
                    serde_json::from_value(v["tasks"].clone()).unwrap_or_default()
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "poll failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            for mut task in tasks {
                task.client = Some(self.client.clone());
                in_flight.fetch_add(1, Ordering::SeqCst);
                let (handler, tx, in_flight, freed) =
                    (self.handler.clone(), self.tx.clone(), in_flight.clone(), freed.clone());
                let span = task.span();
                let run = async move {
                    let token = task.task_token.clone();
                    tracing::debug!("task received");
                    let outcome = match handler(task).await {
                        Ok(v) => {
                            tracing::debug!("task done");
                            Outcome::Done(token, v)
                        }
                        Err(e) => {
                            tracing::debug!(error_type = %e.kind, retryable = e.retryable, "task failed");
                            Outcome::Failed(token, e)
                        }
                    };
                    let _ = tx.send(outcome);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    freed.notify_waiters();
                };
                tokio::spawn(tracing::Instrument::instrument(run, span));
            }
        }
        // Let running handlers finish so their results are reported.
        while in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Sends results in batches: whatever has accumulated while the previous request was in flight.
/// Results the server could not record for now (storage unavailable) are sent again.
async fn report(client: Client, mut rx: mpsc::UnboundedReceiver<Outcome>, hook: Option<ResultHook>) {
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, 512).await > 0 {
        let mut pending: Vec<(String, Value)> = buf
            .drain(..)
            .map(|o| match o {
                Outcome::Done(t, v) => (t.clone(), json!({"task_token": t, "output": v})),
                Outcome::Failed(t, e) => (t.clone(), json!({"task_token": t, "error": e, "retryable": e.retryable})),
            })
            .collect();
        let mut delay = Duration::from_millis(50);
        for _ in 0..30 {
            if pending.is_empty() {
                break;
            }
            let body = json!({ "results": pending.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>() });
            match client.post::<Value>("/v1/tasks/complete-batch", &body).await {
                Ok(r) => {
                    let answers = r["results"].as_array().cloned().unwrap_or_default();
                    let mut retry = Vec::new();
                    for ((token, item), answer) in pending.into_iter().zip(answers) {
                        match answer["error"]["code"].as_str() {
                            None => {
                                if let Some(h) = &hook {
                                    h(&token, true);
                                }
                            }
                            Some("storage_unavailable") => retry.push((token, item)),
                            Some(code) => {
                                tracing::debug!(task = %token, code, "result not recorded");
                                if let Some(h) = &hook {
                                    h(&token, false);
                                }
                            }
                        }
                    }
                    pending = retry;
                    if !pending.is_empty() {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reporting results failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
