//! `http` steps: the engine makes the request itself and records the outcome like a worker's.
//! The request carries a `traceparent` continuing the execution's trace.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_core::ErrorInfo;
use sluice_store::TaskRow;
use tracing::Instrument;

use crate::trace::{task_span, TraceId, TraceParent};
use crate::{lock, Engine};

/// Largest response body kept as the step output.
const MAX_BODY: usize = 1024 * 1024;

impl Engine {
    /// Runs a task that the engine does itself (`http`, `llm`) rather than a worker.
    pub(crate) fn run_engine_task(&self, row: TaskRow) {
        match row.kind {
            sluice_core::event::TaskKind::Llm => self.run_llm(row),
            _ => self.run_http(row),
        }
    }

    fn run_http(&self, row: TaskRow) {
        let engine = self.clone();
        let span = task_span(&row);
        let work = async move {
            let outcome = engine.http_call(&row).await;
            // The reaper may have failed the attempt for taking too long; then it is not ours.
            if lock(&engine.inner.tasks).remove(&row.id).is_none() {
                return;
            }
            let (output, failure) = match outcome {
                Ok(v) => (Some(v), None),
                Err((e, retryable)) => (None, Some((e, retryable))),
            };
            if let Err(e) = engine.finish_task(row, output, failure).await {
                tracing::warn!(error = %e, "could not record an http step result");
            }
        };
        tokio::spawn(work.instrument(span));
    }

    async fn http_call(&self, row: &TaskRow) -> Result<Value, (ErrorInfo, bool)> {
        let req = &row.input;
        let method = req.get("method").and_then(Value::as_str).unwrap_or("GET");
        let url = req.get("url").and_then(Value::as_str).unwrap_or_default();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err((
                ErrorInfo::new("http.bad_url", format!("url must start with http:// or https://, got `{url}`")),
                false,
            ));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| (ErrorInfo::new("http.bad_method", format!("unknown method `{method}`")), false))?;
        let mut builder =
            self.inner.http.request(method, url).timeout(Duration::from_millis(row.start_to_close_ms.max(1)));
        let headers = req.get("headers").and_then(Value::as_object);
        // A `traceparent` the step sets itself wins over ours.
        if !headers.is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("traceparent"))) {
            builder = builder.header("traceparent", TraceParent::child_of(&TraceId::of_task(row)));
        }
        if let Some(headers) = headers {
            for (k, v) in headers {
                if let Some(v) = v.as_str() {
                    builder = builder.header(k.as_str(), v);
                }
            }
        }
        if let Some(body) = req.get("body").filter(|b| !b.is_null()) {
            builder = builder.json(body);
        }
        let sent = Instant::now();
        let resp = builder.send().await.map_err(|e| {
            let kind = if e.is_timeout() { "http.timeout" } else { "http.connect" };
            tracing::debug!(error_type = kind, "http step request failed");
            (ErrorInfo::new(kind, e.to_string()), true)
        })?;
        let status = resp.status().as_u16();
        tracing::debug!(status, elapsed_us = sent.elapsed().as_micros() as u64, "http step answered");
        let bytes = resp.bytes().await.map_err(|e| (ErrorInfo::new("http.body", e.to_string()), true))?;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_BODY)]).into_owned();
        let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(json!({"status": status, "body": body}))
        } else {
            let retryable = status >= 500 || status == 429 || status == 408;
            let mut err = ErrorInfo::new(format!("http.{status}"), format!("{url} answered {status}"));
            err.details = Some(body);
            Err((err, retryable))
        }
    }
}
