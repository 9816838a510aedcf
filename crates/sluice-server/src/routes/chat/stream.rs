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
use serde_json::json;
use sluice_gateway::{ChatRequest, Error as GatewayError, Gateway, StreamEvent};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::wire::{Chunk, ChunkChoice, Delta, DeltaToolCall, WireUsage};
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
    let chunk = |delta: Delta<'_>, finish_reason: Option<&str>| {
        sse(&Chunk {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &model,
            choices: vec![ChunkChoice { index: 0, delta, finish_reason }],
            // In every chunk (as null) when asked for; the tokens come in a closing chunk.
            usage: include_usage.then_some(None),
        })
    };
    let first = Delta { role: Some("assistant"), content: Some(""), ..Delta::default() };
    if tx.send(chunk(first, None)).await.is_err() {
        return acct.done(&meta.route, upstream.usage(), started.elapsed(), "client_closed", true);
    }
    loop {
        let event = upstream.next().await;
        let outcome = match event {
            Some(Ok(StreamEvent::Text(text))) => {
                if text.is_empty() {
                    continue;
                }
                if tx.send(chunk(Delta { content: Some(&text), ..Delta::default() }, None)).await.is_ok() {
                    continue;
                }
                "client_closed"
            }
            Some(Ok(StreamEvent::Done(resp))) => {
                let mut last = Vec::new();
                if !resp.tool_calls.is_empty() {
                    let tool_calls = DeltaToolCall::of(&resp.tool_calls);
                    last.push(chunk(Delta { tool_calls, ..Delta::default() }, None));
                }
                last.push(chunk(Delta::default(), Some(resp.finish_reason.as_str())));
                if include_usage {
                    last.push(sse(&Chunk {
                        id: &meta.id,
                        object: "chat.completion.chunk",
                        created: meta.created,
                        model: &model,
                        choices: Vec::new(),
                        usage: Some(Some(WireUsage::from(resp.usage))),
                    }));
                }
                let mut ok = true;
                for c in last {
                    ok = ok && tx.send(c).await.is_ok();
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
                let _ = tx.send(sse(&error)).await;
                "stream_cut"
            }
        };
        return acct.done(&meta.route, upstream.usage(), started.elapsed(), outcome, true);
    }
}

/// `data: {json}` and the blank line that ends a server-sent event.
fn sse(data: &impl serde::Serialize) -> Bytes {
    let mut buf = b"data: ".to_vec();
    if let Err(e) = serde_json::to_writer(&mut buf, data) {
        tracing::error!(error = %e, "cannot encode a chat stream event");
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// The event bytes of a streamed answer, as a body stream.
struct Events(mpsc::Receiver<Bytes>);

impl futures_core::Stream for Events {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|b| b.map(Ok))
    }
}
