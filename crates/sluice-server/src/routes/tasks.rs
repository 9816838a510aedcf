//! The worker protocol: long-poll for tasks, complete, fail, heartbeat.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::ErrorInfo;

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollBody {
    queue: String,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    max_tasks: Option<usize>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

pub async fn poll(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<PollBody>,
) -> Result<Json<Value>, ApiError> {
    if b.queue.is_empty() || b.queue.len() > 128 {
        return Err(ApiError::invalid("queue", "expected a queue name of 1 to 128 characters"));
    }
    let max = b.max_tasks.unwrap_or(1);
    if max == 0 || max > 1000 {
        return Err(ApiError::invalid("max_tasks", format!("expected 1 to 1000, got {max}")));
    }
    let worker = b.worker_id.unwrap_or_default();
    let wait = Duration::from_millis(b.wait_ms.unwrap_or(20_000));
    let tasks = app.engine.poll(&p.tenant, &b.queue, &worker, max, wait).await?;
    Ok(Json(json!({ "tasks": tasks })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    task_token: String,
    #[serde(default)]
    output: Value,
}

pub async fn complete(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<CompleteBody>,
) -> Result<Json<Value>, ApiError> {
    app.engine.complete(&p.tenant, &b.task_token, b.output).await?;
    Ok(Json(json!({"ok": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    task_token: String,
    error: ErrorInfo,
    #[serde(default = "yes")]
    retryable: bool,
}

fn yes() -> bool {
    true
}

pub async fn fail(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<FailBody>,
) -> Result<Json<Value>, ApiError> {
    app.engine.fail(&p.tenant, &b.task_token, b.error, b.retryable).await?;
    Ok(Json(json!({"ok": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    task_token: String,
    #[serde(default)]
    #[allow(dead_code)]
    details: Value,
}

pub async fn heartbeat(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<HeartbeatBody>,
) -> Result<Json<Value>, ApiError> {
    let cancel = app.engine.heartbeat(&p.tenant, &b.task_token).await?;
    Ok(Json(json!({"cancel_requested": cancel})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    task_token: String,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<ErrorInfo>,
    #[serde(default = "yes")]
    retryable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    results: Vec<BatchItem>,
}

/// Completes or fails many tasks in one request; each gets its own result.
pub async fn complete_batch(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<BatchBody>,
) -> Result<Json<Value>, ApiError> {
    if b.results.len() > 1000 {
        return Err(ApiError::invalid("results", format!("at most 1000 results per request, got {}", b.results.len())));
    }
    let tenant = p.tenant.as_str();
    let futures = b.results.into_iter().map(|item| {
        let engine = app.engine.clone();
        async move {
            let r = match item.error {
                Some(error) => engine.fail(tenant, &item.task_token, error, item.retryable).await,
                None => engine.complete(tenant, &item.task_token, item.output.unwrap_or(Value::Null)).await,
            };
            match r {
                Ok(()) => json!({"ok": true}),
                Err(e) => {
                    let e = ApiError::from(e);
                    json!({"error": {"code": e.code, "message": e.message}})
                }
            }
        }
    });
    let results = join_all(futures).await;
    Ok(Json(json!({ "results": results })))
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn join_all<F: std::future::Future<Output = Value>>(futs: impl IntoIterator<Item = F>) -> Vec<Value> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> = handles.into_iter().enumerate().collect();
    let mut results: Vec<Option<Value>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                results[*i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().map(|r| r.unwrap_or(Value::Null)));
    out
}
