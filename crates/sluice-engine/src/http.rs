//! `http` steps: the engine makes the request itself and records the outcome like a worker's.
//! The request carries a `traceparent` continuing the execution's trace.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_core::ErrorInfo;
use sluice_store::TaskRow;
use tracing::Instrument;

use crate::trace::{task_span, TraceId, TraceParent};
use crate::{egress, lock, Engine};

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
        let bad_url =
            || ErrorInfo::new("http.bad_url", format!("url must start with http:// or https://, got `{url}`"));
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err((bad_url(), false));
        }
        // Parsed once, here: the host checked is the host the client connects to.
        let parsed = reqwest::Url::parse(url).map_err(|_| (bad_url(), false))?;
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| (ErrorInfo::new("http.bad_method", format!("unknown method `{method}`")), false))?;
        let egress = self.inner.http.of(&row.tenant);
        if !egress.allow.permits_url(&parsed) {
            tracing::info!(host = ?parsed.host_str(), "http step denied by the egress policy");
            return Err(egress_denied());
        }
        let mut builder =
            egress.client.request(method, parsed).timeout(Duration::from_millis(row.start_to_close_ms.max(1)));
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
        let mut resp = builder.send().await.map_err(|e| {
            if egress::is_denied(&e) {
                return egress_denied();
            }
            let kind = if e.is_timeout() { "http.timeout" } else { "http.connect" };
            tracing::debug!(error_type = kind, "http step request failed");
            (ErrorInfo::new(kind, e.to_string()), true)
        })?;
        let status = resp.status().as_u16();
        tracing::debug!(status, elapsed_us = sent.elapsed().as_micros() as u64, "http step answered");
        let ok = (200..300).contains(&status);
        let max = self.inner.opts.http_max_body;
        let bytes = match read_body(&mut resp, max).await {
            Ok(Body::Whole(bytes)) => bytes,
            // An error answer's body is only its details: its first `max` bytes do.
            Ok(Body::Over(bytes)) if !ok => bytes,
            Ok(Body::Over(_)) => {
                tracing::debug!(error_type = "http.too_large", limit = max, "http step answer too large");
                let mut err = ErrorInfo::new(
                    "http.too_large",
                    format!(
                        "the response body is larger than {max} bytes, the most an http step keeps; \
                         ask for less, or an operator can raise --http-max-body"
                    ),
                );
                err.details = Some(json!({"limit_bytes": max}));
                return Err((err, false));
            }
            Err(e) if e.is_timeout() => return Err((ErrorInfo::new("http.timeout", e.to_string()), true)),
            Err(e) => return Err((ErrorInfo::new("http.body", e.to_string()), true)),
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        if ok {
            Ok(json!({"status": status, "body": body}))
        } else {
            let retryable = status >= 500 || status == 429 || status == 408;
            let mut err = ErrorInfo::new(format!("http.{status}"), format!("{url} answered {status}"));
            err.details = Some(body);
            Err((err, retryable))
        }
    }
}

/// The one answer to a request the egress policy refused: the same whatever the target, so it
/// tells nothing about it (its addresses, whether it listens, how long it takes).
fn egress_denied() -> (ErrorInfo, bool) {
    let message = "the target of this http step (or of one of its redirects) is not allowed by the server's egress \
                   policy; an operator can allow it (see docs/security.md, Egress policy)";
    (ErrorInfo::new("http.egress_denied", message), false)
}

/// A response body read up to a limit.
enum Body {
    Whole(Vec<u8>),
    /// Longer than the limit: its first bytes up to it; the rest was never read.
    Over(Vec<u8>),
}

/// Reads the body chunk by chunk and stops at `max` bytes, so that an endless answer costs no
/// more memory than a long one.
async fn read_body(resp: &mut reqwest::Response, max: usize) -> reqwest::Result<Body> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Ok(Body::Over(Vec::new()));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if bytes.len() + chunk.len() > max {
            bytes.extend_from_slice(&chunk[..max - bytes.len()]);
            return Ok(Body::Over(bytes));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Body::Whole(bytes))
}
