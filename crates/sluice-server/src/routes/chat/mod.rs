//! `POST /v1/chat/completions`: the OpenAI Chat Completions wire format answered through the AI
//! gateway, whole or streamed as server-sent events, so any OpenAI SDK can use Sluice.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use sluice_engine::{CallContext, Engine, Refused};
use sluice_gateway::budget::Reservation;
use sluice_gateway::{
    CallOptions, ChatRequest, ChatResponse, Error as GatewayError, Gateway, Message, Role, StreamEvent, Tool, ToolCall,
    UpstreamError, Usage, UsageRecord,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::auth::Caller;
use crate::body::{parse_json, Body as RequestBody};
use crate::error::ApiError;
use crate::AppState;

/// The request as OpenAI clients send it. Fields this gateway does not use are ignored, as
/// OpenAI-compatible servers do, except those that would change the answer's shape (`n`).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The gateway route to call.
    pub model: String,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireRole {
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: WireRole,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content: a string, or an array of `{"type": "text", "text": ...}` parts.
#[derive(Debug)]
pub struct Content(pub String);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let parts_only = "content must be a string or an array of {\"type\": \"text\", \"text\": ...} parts";
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Content(s)),
            Value::Array(parts) => {
                let mut texts = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(text)) => texts.push(text.to_string()),
                        (Some(other), _) if other != "text" => {
                            return Err(D::Error::custom(format!(
                                "part {i} has type `{other}`; only text parts are supported"
                            )))
                        }
                        _ => return Err(D::Error::custom(format!("part {i}: {parts_only}"))),
                    }
                }
                Ok(Content(texts.join("\n")))
            }
            _ => Err(D::Error::custom(parts_only)),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    pub function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: WireFunction,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolKind {
    Function,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: FormatKind,
}

/// `json_schema` is refused rather than quietly weakened to `json_object`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    Text,
    JsonObject,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

impl CompletionRequest {
    /// The gateway's request, or the field that makes it invalid.
    fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "at least one message is required"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only one choice (n = 1) is supported"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = m.content.as_ref().map(|c| c.0.clone()).unwrap_or_default();
            let role = match m.role {
                WireRole::System | WireRole::Developer => Role::System,
                WireRole::User => Role::User,
                WireRole::Assistant => Role::Assistant,
                WireRole::Tool => Role::Tool,
            };
            if matches!(role, Role::Tool) && m.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message must name the call it answers",
                ));
            }
            let tool_calls = m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| ToolCall {
                    id: c.id.clone(),
                    name: c.function.name.clone(),
                    arguments: c.function.arguments.clone(),
                })
                .collect();
            messages.push(Message { role, content, tool_calls, tool_call_id: m.tool_call_id.clone() });
        }
        let tools = self
            .tools
            .iter()
            .flatten()
            .map(|t| Tool {
                name: t.function.name.clone(),
                description: t.function.description.clone(),
                parameters: t
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
            .collect();
        Ok(ChatRequest {
            messages,
            tools,
            temperature: self.temperature,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            json_mode: self.response_format.as_ref().is_some_and(|f| f.kind == FormatKind::JsonObject),
        })
    }
}

pub async fn completions(State(app): State<AppState>, Caller(p): Caller, RequestBody(bytes): RequestBody) -> Response {
    let Some(gateway) = app.gateway.clone() else {
        return ApiError::gateway_not_configured().into_response();
    };
    let body: CompletionRequest = match parse_json(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let req = match body.to_chat() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if gateway.route(&body.model).is_none() {
        return route_not_found(&body.model).into_response();
    }
    // Budgets apply to the caller's tenant and, when it called with one, its API key.
    let ctx = CallContext {
        tenant: p.tenant.clone(),
        api_key: p.api_key().map(str::to_string),
        source: "chat",
        ..CallContext::default()
    };
    let estimate = || gateway.estimate_cost(&body.model, &req, &CallOptions::default());
    let reservation = match app.engine.admit_call(&gateway, &ctx, estimate).await {
        Ok(r) => r,
        Err(Refused::Budget(e)) => {
            return ApiError::new("budget_exceeded", e.to_string()).with_details(e.details()).into_response()
        }
        Err(Refused::Store(e)) => return ApiError::from(e).into_response(),
    };
    let meta = Meta {
        id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        route: body.model.clone(),
    };
    let acct = Accounting { engine: app.engine.clone(), gateway: gateway.clone(), ctx, reservation };
    if body.stream == Some(true) {
        let include_usage = body.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        stream(gateway, meta, req, include_usage, acct).await
    } else {
        complete(&gateway, &meta, &req, acct).await
    }
}

/// Settles a call with its budgets and writes its ledger rows, off the answer's path.
struct Accounting {
    engine: Engine,
    gateway: Arc<Gateway>,
    ctx: CallContext,
    reservation: Reservation,
}

impl Accounting {
    fn done(self, route: &str, usage: &[UsageRecord], latency: Duration, outcome: &str, stream: bool) {
        log_call(route, usage, latency, outcome, stream);
        let ledger = self.engine.settle_call(&self.gateway, &self.ctx, self.reservation, usage);
        let engine = self.engine;
        let record = async move {
            if let Err(e) = engine.record_usage(ledger).await {
                tracing::warn!(error = %e, "could not record the usage of a chat completion");
            }
        };
        // In the request's span, so that its lines carry the request's trace id.
        tokio::spawn(record.in_current_span());
    }
}

/// What every answer of one call carries.
struct Meta {
    id: String,
    created: u64,
    route: String,
}

fn route_not_found(route: &str) -> ApiError {
    ApiError::new(
        "route_not_found",
        format!("no gateway route `{route}`; `model` must name a route of the gateway config"),
    )
    .with_details(json!({"route": route}))
}

async fn complete(gateway: &Gateway, meta: &Meta, req: &ChatRequest, acct: Accounting) -> Response {
    let started = Instant::now();
    let call = gateway.chat(&meta.route, req).await;
    match call.result {
        Ok(resp) => {
            acct.done(&meta.route, &call.usage, started.elapsed(), "success", false);
            let model = answered_model(&resp, &call.usage);
            axum::Json(completion_json(meta, &model, &resp)).into_response()
        }
        Err(e) => {
            acct.done(&meta.route, &call.usage, started.elapsed(), outcome_of(&e), false);
            gateway_error(gateway, e)
        }
    }
}

/// The model as the upstream named it, or else the target's.
fn answered_model(resp: &ChatResponse, usage: &[UsageRecord]) -> String {
    if resp.model.is_empty() {
        usage.last().map(|u| u.model.clone()).unwrap_or_default()
    } else {
        resp.model.clone()
    }
}

fn completion_json(meta: &Meta, model: &str, resp: &ChatResponse) -> Value {
    let mut message = json!({"role": "assistant", "content": resp.text});
    if !resp.tool_calls.is_empty() {
        if resp.text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = resp
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": resp.finish_reason.to_string()}],
        "usage": usage_json(resp.usage),
    })
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
    })
}

fn outcome_of(e: &GatewayError) -> &'static str {
    match e {
        GatewayError::UnknownRoute(_) => "route_not_found",
        GatewayError::Rejected { .. } => "rejected",
        GatewayError::Exhausted { failures, .. } if all_circuit_open(failures) => "circuit_open",
        GatewayError::Exhausted { .. } => "upstream_failed",
    }
}

fn all_circuit_open(failures: &[(String, UpstreamError)]) -> bool {
    !failures.is_empty() && failures.iter().all(|(_, e)| matches!(e, UpstreamError::CircuitOpen))
}

/// One line per call: which target answered, tokens, latency and outcome; never keys or content.
fn log_call(route: &str, usage: &[UsageRecord], latency: Duration, outcome: &str, stream: bool) {
    let last = usage.last();
    tracing::info!(
        route = %route,
        target = %last.map(|u| u.target.as_str()).unwrap_or(""),
        model = %last.map(|u| u.model.as_str()).unwrap_or(""),
        input_tokens = last.map_or(0, |u| u.input_tokens),
        output_tokens = last.map_or(0, |u| u.output_tokens),
        cost_usd = last.and_then(|u| u.cost_usd),
        attempts = usage.len(),
        latency_ms = latency.as_millis() as u64,
        outcome,
        stream,
        "chat completion"
    );
}

/// The error answer for a failed call: what each target did, without upstream internals.
fn gateway_error(gateway: &Gateway, e: GatewayError) -> Response {
    match e {
        GatewayError::UnknownRoute(route) => route_not_found(&route).into_response(),
        GatewayError::Rejected { route, target, source } => {
            let status = match &source {
                UpstreamError::Status { status, .. } => Some(*status),
                _ => None,
            };
            // 401, 403 and 404 say the gateway's key or model is wrong, not the caller's request.
            if matches!(status, Some(401 | 403 | 404)) {
                let failures = vec![failure_json(&target, &source)];
                return ApiError::new(
                    "upstream_failed",
                    format!("target `{target}` of route `{route}` refused the gateway's credentials or model; check the gateway config"),
                )
                .with_details(json!({"route": route, "failures": failures}))
                .into_response();
            }
            let upstream_message = match &source {
                UpstreamError::Status { message, .. } => message.clone(),
                other => other.to_string(),
            };
            ApiError::new(
                "upstream_rejected",
                format!("target `{target}` of route `{route}` refused the request: {upstream_message}"),
            )
            .with_details(json!({"route": route, "target": target, "status": status}))
            .into_response()
        }
        GatewayError::Exhausted { route, failures } => {
            let details = json!({
                "route": route,
                "failures": failures.iter().map(|(t, e)| failure_json(t, e)).collect::<Vec<_>>(),
            });
            if all_circuit_open(&failures) {
                let wait = retry_after(gateway, &route);
                let mut resp = ApiError::new(
                    "upstream_unavailable",
                    format!("every target of route `{route}` is paused by its circuit breaker; retry after {wait} s"),
                )
                .with_details(details)
                .into_response();
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
                return resp;
            }
            ApiError::new("upstream_failed", format!("every target of route `{route}` failed"))
                .with_details(details)
                .into_response()
        }
    }
}

/// Seconds until the first breaker of the route lets a trial through, at the latest.
fn retry_after(gateway: &Gateway, route: &str) -> u64 {
    gateway
        .route(route)
        .and_then(|r| r.targets.iter().map(|t| t.breaker().config().cool_down).min())
        .map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64)
}

/// A failure as the caller sees it: the kind and status, not the upstream's own words.
fn failure_json(target: &str, e: &UpstreamError) -> Value {
    let (kind, status, message) = match e {
        UpstreamError::Status { status, .. } => ("status", Some(*status), format!("upstream answered {status}")),
        UpstreamError::Timeout(d) => ("timeout", None, format!("no answer within {} ms", d.as_millis())),
        UpstreamError::Connect(_) => ("connect", None, "cannot reach the upstream".to_string()),
        UpstreamError::Malformed(_) => ("malformed", None, "the upstream's answer was malformed".to_string()),
        UpstreamError::StreamCut(_) => ("stream_cut", None, "the upstream stream was cut".to_string()),
        UpstreamError::Request(_) => ("request_failed", None, "the request to the upstream failed".to_string()),
        UpstreamError::CircuitOpen => {
            ("circuit_open", None, "circuit breaker open; the target was not called".to_string())
        }
    };
    json!({"target": target, "error": kind, "status": status, "message": message})
}

/// Streams the answer. The route is opened (with fallback and retries) before the answer's
/// status is chosen, so a call that cannot start still gets a JSON error with its status.
async fn stream(
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
            acct.done(&meta.route, &failure.usage, started.elapsed(), outcome_of(&failure.error), true);
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
                    u["usage"] = usage_json(resp.usage);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a request body and converts it, returning the error message or the request.
    fn check(body: Value) -> Result<ChatRequest, String> {
        let parsed: CompletionRequest = parse_json(body.to_string().as_bytes()).map_err(|e| e.message)?;
        parsed.to_chat().map_err(|e| e.message)
    }

    #[test]
    fn openai_requests_convert_to_the_gateway_model() {
        let req = check(json!({
            "model": "chat",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "temperature": 0.5, "max_tokens": 10, "max_completion_tokens": 20,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "response_format": {"type": "json_object"},
            "user": "ignored"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.messages[0].role, Role::System);
        assert_eq!(req.messages[1].content, "a\nb");
        assert_eq!(req.messages[2].tool_calls[0].name, "f");
        assert_eq!(req.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!((req.max_tokens, req.json_mode, req.tools.len()), (Some(20), true, 1));
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let m = |content: Value| json!({"model": "r", "messages": [{"role": "user", "content": content}]});
        let cases = [
            (json!({"messages": []}), "missing field `model`"),
            (json!({"model": "r", "messages": []}), "messages: at least one message"),
            (
                json!({"model": "r", "messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role: unknown variant",
            ),
            (m(json!([{"type": "image_url", "image_url": {}}])), "messages[0].content: part 0 has type `image_url`"),
            (m(json!(5)), "messages[0].content: content must be a string"),
            (json!({"model": "r", "messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
            (
                json!({"model": "r", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}),
                "response_format.type: unknown variant `json_schema`",
            ),
            (json!({"model": "r", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n: only one choice"),
            (
                json!({"model": "r", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
        ];
        for (body, expect) in cases {
            let got = check(body.clone()).err().unwrap_or_else(|| "ok".into());
            assert!(got.contains(expect), "{body}\n  expected: {expect}\n  got: {got}");
        }
    }

    #[test]
    fn failures_show_kinds_not_upstream_words() {
        let e = UpstreamError::Status { status: 500, message: "secret internals".into(), retry_after: None };
        let v = failure_json("t", &e);
        assert_eq!(v, json!({"target": "t", "error": "status", "status": 500, "message": "upstream answered 500"}));
        let v = failure_json("t", &UpstreamError::Connect("http://10.0.0.1:9 refused".into()));
        assert!(!v.to_string().contains("10.0.0.1"), "{v}");
    }
}
