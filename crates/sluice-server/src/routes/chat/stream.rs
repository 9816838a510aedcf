//! A streamed answer: the route's stream forwarded as `chat.completion.chunk` server-sent events,
//! ending with `[DONE]` only when the upstream finished; a cut ends with an error event instead.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use sluice_gateway::{ChatRequest, Error as GatewayError, Gateway, StreamEvent};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::wire::WireUsage;
use super::{gateway_error, route_outcome, Accounting, Meta};
use crate::error::ApiError;

/// Streams the answer. The route is opened (with fallback and retries) before the answer's
/// status is chosen, so a call that cannot start still gets a JSON error with its status.
pub(super) async fn stream(
    gateway: Arc<Gateway>,
    meta: Meta,
    req: ChatRequest,
    include_usage: bool,
    acct: Accounting,
) -> Response {
    let (opened_tx, opened_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(64);
    let pump_gateway = gateway.clone();
    let pumping = pump(pump_gateway, meta, req, include_usage, opened_tx, tx, acct);
    // In the request's span, so that its lines carry the request's trace id.
    tokio::spawn(pumping.in_current_span());
    match opened_rx.await {
        Ok(Ok(())) => {
            let headers = [
                (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (header::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no")),
            ];
            (StatusCode::OK, headers, axum::body::Body::from_stream(Events(rx))).into_response()
        }
        Ok(Err(e)) => gateway_error(&gateway, e),
        Err(_) => {
            tracing::error!("chat stream task ended before the stream opened");
            ApiError::new("internal", "internal error; the cause is in the server log").into_response()
        }
    }
}

/// Opens the route's stream and forwards it as `chat.completion.chunk` events. A stream that
/// breaks after it opened ends with an error event and no `[DONE]`: a cut never looks complete.
async fn pump(
    gateway: Arc<Gateway>,
    meta: Meta,
    req: ChatRequest,
    include_usage: bool,
    opened: oneshot::Sender<Result<(), GatewayError>>,
    tx: mpsc::Sender<Bytes>,
    acct: Accounting,
) {
    let started = Instant::now();
    let mut upstream = match gateway.chat_stream(&meta.route, &req).await {
        Ok(s) => s,
        Err(failure) => {
            acct.done(&meta.route, &failure.usage, started.elapsed(), route_outcome(&failure.error), true);
            let _ = opened.send(Err(failure.error));
            return;
        }
    };
    let model = gateway
        .route(&meta.route)
        .and_then(|r| r.targets.iter().find(|t| t.name == upstream.target()))
        .map(|t| t.model.clone())
        .unwrap_or_default();
    if opened.send(Ok(())).is_err() {
        return acct.done(&meta.route, upstream.usage(), started.elapsed(), "client_closed", true);
    }
    let chunk = |delta: Value, finish_reason: Value| {
        let mut c = json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let send = |v: &Value| tx.send(Bytes::from(format!("data: {v}\n\n")));
    if send(&chunk(json!({"role": "assistant", "content": ""}), Value::Null)).await.is_err() {
        return acct.done(&meta.route, upstream.usage(), started.elapsed(), "client_closed", true);
    }
    loop {
        let event = upstream.next().await;
        let outcome = match event {
            Some(Ok(StreamEvent::Text(text))) => {
                if text.is_empty() {
                    continue;
                }
                if send(&chunk(json!({"content": text}), Value::Null)).await.is_ok() {
                    continue;
                }
                "client_closed"
            }
            Some(Ok(StreamEvent::Done(resp))) => {
                let mut last = Vec::new();
                if !resp.tool_calls.is_empty() {
                    let calls: Vec<Value> = resp
                        .tool_calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            json!({"index": i, "id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                        })
                        .collect();
                    last.push(chunk(json!({"tool_calls": calls}), Value::Null));
                }
                last.push(chunk(json!({}), json!(resp.finish_reason.to_string())));
                if include_usage {
                    let mut u = chunk(json!({}), Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = serde_json::to_value(WireUsage::from(resp.usage)).unwrap_or(Value::Null);
                    last.push(u);
                }
                let mut ok = true;
                for c in &last {
                    ok = ok && send(c).await.is_ok();
                }
                ok = ok && tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await.is_ok();
                if ok {
                    "success"
                } else {
                    "client_closed"
                }
            }
            Some(Err(_)) | None => {
                // The cause is logged by the gateway; the caller learns only that the answer is cut.
                let error = json!({"error": {
                    "message": "the upstream stream was cut before the answer finished; the answer is incomplete",
                    "type": "upstream_stream_cut",
                    "code": "upstream_stream_cut",
                }});
                let _ = send(&error).await;
                "stream_cut"
            }
        };
        return acct.done(&meta.route, upstream.usage(), started.elapsed(), outcome, true);
    }
}

/// The event bytes of a streamed answer, as a body stream.
struct Events(mpsc::Receiver<Bytes>);

impl futures_core::Stream for Events {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|b| b.map(Ok))
    }
}
