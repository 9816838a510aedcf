//! A fake LLM vendor: a real HTTP server on 127.0.0.1 speaking the OpenAI
//! `/v1/chat/completions` and Anthropic `/v1/messages` wire formats, scripted per request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// What the vendor does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A normal answer with this text and these token counts in `usage`.
    Text { text: String, input_tokens: u64, output_tokens: u64 },
    /// An answer that calls one tool.
    ToolCall { id: String, name: String, arguments: Value, input_tokens: u64, output_tokens: u64 },
    /// Waits, then does `then`.
    Slow { delay: Duration, then: Box<Reply> },
    /// An error status in the vendor's error format, with an optional `Retry-After` value.
    Status { status: u16, retry_after: Option<String> },
    /// A streamed answer (server-sent events) sending `pieces` of text. With `cut`, the body
    /// ends cleanly after the pieces but without the end of the answer (no finish reason, no
    /// usage, no `[DONE]` / `message_stop`): what a dropped upstream looks like.
    Stream { pieces: Vec<String>, input_tokens: u64, output_tokens: u64, cut: bool },
    /// Never answers.
    Hang,
    /// A 200 whose body is not valid JSON.
    Malformed,
    /// A deterministic classifier: answers with the label of the first rule whose keyword occurs
    /// (ignoring case) in the text of the request's last user message, else with `fallback`.
    /// Meant as the default reply (`set_default`) for evaluations.
    Classify { rules: Vec<(String, String)>, fallback: String, input_tokens: u64, output_tokens: u64 },
}

impl Reply {
    pub fn text(text: &str, input_tokens: u64, output_tokens: u64) -> Self {
        Self::Text { text: text.to_string(), input_tokens, output_tokens }
    }

    pub fn slow(delay: Duration, then: Reply) -> Self {
        Self::Slow { delay, then: Box::new(then) }
    }

    pub fn status(status: u16) -> Self {
        Self::Status { status, retry_after: None }
    }

    pub fn stream(pieces: &[&str], input_tokens: u64, output_tokens: u64) -> Self {
        Self::Stream { pieces: pieces.iter().map(|p| p.to_string()).collect(), input_tokens, output_tokens, cut: false }
    }

    /// A stream that stops after `pieces` without its end.
    pub fn cut_stream(pieces: &[&str]) -> Self {
        Self::Stream {
            pieces: pieces.iter().map(|p| p.to_string()).collect(),
            input_tokens: 0,
            output_tokens: 0,
            cut: true,
        }
    }

    /// A [`Reply::Classify`] from `(keyword, label)` rules.
    pub fn classify(rules: &[(&str, &str)], fallback: &str, input_tokens: u64, output_tokens: u64) -> Self {
        Self::Classify {
            rules: rules.iter().map(|(k, l)| (k.to_string(), l.to_string())).collect(),
            fallback: fallback.to_string(),
            input_tokens,
            output_tokens,
        }
    }

    /// The answer of a [`Reply::Classify`] to a last user message `text`.
    pub fn classify_text(rules: &[(String, String)], fallback: &str, text: &str) -> String {
        let text = text.to_lowercase();
        rules.iter().find(|(k, _)| text.contains(&k.to_lowercase())).map_or(fallback, |(_, l)| l).to_string()
    }

    /// A 429 with `Retry-After: value` (seconds or an HTTP date).
    pub fn rate_limited(retry_after: &str) -> Self {
        Self::Status { status: 429, retry_after: Some(retry_after.to_string()) }
    }
}

/// One request as the vendor received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names in lowercase.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Value::Null` if it did not parse).
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
}

impl Shared {
    fn next_reply(&self) -> Reply {
        let scripted = self.script.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        scripted
            .or_else(|| self.default.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_else(|| Reply::text("ok", 1, 1))
    }
}

#[derive(Clone, Copy)]
enum Format {
    OpenAi,
    Anthropic,
}

/// The running fake vendor; the server stops when this is dropped.
pub struct FakeVendor {
    base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeVendor {
    /// Starts the server on a free port. Until scripted it answers `Reply::text("ok", 1, 1)`.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("fake vendor cannot bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("fake vendor has no address: {e}"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url: format!("http://{addr}/v1"), shared, server }
    }

    /// The base URL both clients take: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Queues the reply for the next request not yet scripted.
    pub fn push(&self, reply: Reply) -> &Self {
        self.shared.script.lock().unwrap_or_else(|p| p.into_inner()).push_back(reply);
        self
    }

    /// The reply once the queue is empty.
    pub fn set_default(&self, reply: Reply) {
        *self.shared.default.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
    }

    /// How many requests arrived (including those still waiting for their answer).
    pub fn requests(&self) -> usize {
        self.shared.received.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn openai(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(shared, Format::OpenAi, "/v1/chat/completions", headers, body).await
}

async fn anthropic(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(shared, Format::Anthropic, "/v1/messages", headers, body).await
}

async fn handle(shared: Arc<Shared>, format: Format, path: &str, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or("unknown").to_string();
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let last_user = last_user_text(&body);
    let n = {
        let mut received = shared.received.lock().unwrap_or_else(|p| p.into_inner());
        received.push(Received { path: path.to_string(), headers, body });
        received.len()
    };
    let mut reply = shared.next_reply();
    loop {
        match reply {
            Reply::Slow { delay, then } => {
                tokio::time::sleep(delay).await;
                reply = *then;
            }
            Reply::Hang => std::future::pending::<()>().await,
            Reply::Malformed => return json_response(StatusCode::OK, None, "{\"choices\": [".to_string()),
            Reply::Status { status, retry_after } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return json_response(status, retry_after, error_body(format, status).to_string());
            }
            Reply::Text { text, input_tokens, output_tokens } => {
                let answer = Answer { n, model: &model, text: Some(&text), tool: None, input_tokens, output_tokens };
                return json_response(StatusCode::OK, None, answer.body(format).to_string());
            }
            Reply::Stream { pieces, input_tokens, output_tokens, cut } => {
                let stream = Stream { n, model: &model, pieces: &pieces, input_tokens, output_tokens, cut };
                let mut headers = HeaderMap::new();
                headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
                headers.insert("cache-control", HeaderValue::from_static("no-cache"));
                return (StatusCode::OK, headers, stream.body(format)).into_response();
            }
            Reply::Classify { rules, fallback, input_tokens, output_tokens } => {
                let text = Reply::classify_text(&rules, &fallback, &last_user);
                reply = Reply::Text { text, input_tokens, output_tokens };
            }
            Reply::ToolCall { id, name, arguments, input_tokens, output_tokens } => {
                let tool = Some((id.as_str(), name.as_str(), &arguments));
                let answer = Answer { n, model: &model, text: None, tool, input_tokens, output_tokens };
                return json_response(StatusCode::OK, None, answer.body(format).to_string());
            }
        }
    }
}

/// The text of the last `user` message, in either wire format (a string or text parts).
fn last_user_text(body: &Value) -> String {
    let Some(message) = body["messages"].as_array().and_then(|m| m.iter().rev().find(|m| m["role"] == "user")) else {
        return String::new();
    };
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

fn json_response(status: StatusCode, retry_after: Option<String>, body: String) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert("retry-after", v);
    }
    (status, headers, body).into_response()
}

fn error_body(format: Format, status: StatusCode) -> Value {
    let message = format!("fake vendor error {}", status.as_u16());
    match format {
        Format::OpenAi => {
            let kind = match status.as_u16() {
                429 => "rate_limit_exceeded",
                400..=499 => "invalid_request_error",
                _ => "server_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
        Format::Anthropic => {
            let kind = match status.as_u16() {
                429 => "rate_limit_error",
                529 => "overloaded_error",
                400..=499 => "invalid_request_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    }
}

struct Answer<'a> {
    n: usize,
    model: &'a str,
    text: Option<&'a str>,
    tool: Option<(&'a str, &'a str, &'a Value)>,
    input_tokens: u64,
    output_tokens: u64,
}

impl Answer<'_> {
    fn body(&self, format: Format) -> Value {
        match format {
            Format::OpenAi => {
                let mut message = json!({"role": "assistant", "content": self.text, "refusal": null});
                if let Some((id, name, args)) = self.tool {
                    message["tool_calls"] = json!([{
                        "id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}
                    }]);
                }
                json!({
                    "id": format!("chatcmpl-fake-{}", self.n),
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "message": message,
                        "logprobs": null,
                        "finish_reason": if self.tool.is_some() { "tool_calls" } else { "stop" }
                    }],
                    "usage": {
                        "prompt_tokens": self.input_tokens,
                        "completion_tokens": self.output_tokens,
                        "total_tokens": self.input_tokens + self.output_tokens
                    }
                })
            }
            Format::Anthropic => {
                let mut content = Vec::new();
                if let Some(text) = self.text {
                    content.push(json!({"type": "text", "text": text}));
                }
                if let Some((id, name, args)) = self.tool {
                    content.push(json!({"type": "tool_use", "id": id, "name": name, "input": args}));
                }
                json!({
                    "id": format!("msg_fake_{}", self.n),
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": content,
                    "stop_reason": if self.tool.is_some() { "tool_use" } else { "end_turn" },
                    "stop_sequence": null,
                    "usage": {
                        "input_tokens": self.input_tokens,
                        "output_tokens": self.output_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0
                    }
                })
            }
        }
    }
}

struct Stream<'a> {
    n: usize,
    model: &'a str,
    pieces: &'a [String],
    input_tokens: u64,
    output_tokens: u64,
    cut: bool,
}

impl Stream<'_> {
    fn body(&self, format: Format) -> String {
        let mut out = String::new();
        match format {
            Format::OpenAi => {
                let chunk = |choices: Value, usage: Value| {
                    json!({
                        "id": format!("chatcmpl-fake-{}", self.n),
                        "object": "chat.completion.chunk",
                        "created": 1_700_000_000,
                        "model": self.model,
                        "choices": choices,
                        "usage": usage
                    })
                };
                let mut data = |v: Value| out.push_str(&format!("data: {v}\n\n"));
                data(chunk(
                    json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                    Value::Null,
                ));
                for p in self.pieces {
                    data(chunk(json!([{"index": 0, "delta": {"content": p}, "finish_reason": null}]), Value::Null));
                }
                if !self.cut {
                    data(chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]), Value::Null));
                    let usage = json!({
                        "prompt_tokens": self.input_tokens,
                        "completion_tokens": self.output_tokens,
                        "total_tokens": self.input_tokens + self.output_tokens
                    });
                    data(chunk(json!([]), usage));
                    out.push_str("data: [DONE]\n\n");
                }
            }
            Format::Anthropic => {
                let mut event = |name: &str, v: Value| out.push_str(&format!("event: {name}\ndata: {v}\n\n"));
                event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                        "id": format!("msg_fake_{}", self.n), "type": "message", "role": "assistant",
                        "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}
                    }}),
                );
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                );
                event("ping", json!({"type": "ping"}));
                for p in self.pieces {
                    event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
                    );
                }
                if !self.cut {
                    event("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
                    event(
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                            "usage": {"output_tokens": self.output_tokens}}),
                    );
                    event("message_stop", json!({"type": "message_stop"}));
                }
            }
        }
        out
    }
}
