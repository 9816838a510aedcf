//! Client of Anthropic's Messages API: `POST {base_url}/messages` with `x-api-key` and
//! `anthropic-version`.

use std::time::Duration;

use std::collections::BTreeMap;

use hyper::header::{HeaderName, HeaderValue};

use serde::{Deserialize, Serialize};

use super::http::{Endpoint, HttpClient};
use super::sse::SseEvent;
use super::stream::{ChatStream, Decoder, Piece};
use super::ApiKey;
use crate::error::UpstreamError;
use crate::model::{ChatRequest, ChatResponse, FinishReason, Role, ToolCall, Usage};

const API_VERSION: &str = "2023-06-01";
/// The Messages API requires `max_tokens`; this is used when the request leaves it open.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
const JSON_INSTRUCTION: &str = "Answer with a single JSON object and nothing else.";

/// An Anthropic Messages API upstream.
#[derive(Clone, Debug)]
pub struct Anthropic {
    /// `{base_url}/messages` with its headers (the version and the key), made once.
    endpoint: Endpoint,
}

impl Anthropic {
    /// `base_url` ends before `/messages`, e.g. `https://api.anthropic.com/v1`.
    pub fn new(client: HttpClient, base_url: &str, api_key: Option<ApiKey>) -> Self {
        let version = (HeaderName::from_static("anthropic-version"), HeaderValue::from_static(API_VERSION));
        let secret = api_key.map(|k| (HeaderName::from_static("x-api-key"), k.expose().to_string()));
        Self { endpoint: Endpoint::new(client, base_url, "messages", &[version], secret) }
    }

    pub async fn chat(&self, model: &str, req: &ChatRequest, timeout: Duration) -> Result<ChatResponse, UpstreamError> {
        let body = self.endpoint.post_json(&to_wire(model, req), timeout).await?;
        let wire: WireResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Malformed(format!("message: {e}")))?;
        Ok(from_wire(wire))
    }

    pub async fn chat_stream(
        &self,
        model: &str,
        req: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatStream, UpstreamError> {
        let mut wire = to_wire(model, req);
        wire.stream = true;
        let body = self.endpoint.post_for_stream(&wire, timeout).await?;
        Ok(ChatStream::new(body, timeout, Decoder::Anthropic(StreamDecoder::default())))
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage {
    role: &'static str,
    content: Vec<Block>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
    },
    /// Blocks this gateway does not use (thinking, ...): kept out of the answer.
    #[serde(other)]
    Unknown,
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a serde_json::Value,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: String,
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

fn to_wire<'a>(model: &'a str, req: &'a ChatRequest) -> WireRequest<'a> {
    let mut system: Vec<&str> = Vec::new();
    let mut messages: Vec<WireMessage> = Vec::new();
    for m in &req.messages {
        let (role, blocks) = match m.role {
            Role::System => {
                system.push(&m.content);
                continue;
            }
            Role::User => ("user", text_block(&m.content)),
            Role::Assistant => {
                let mut blocks = text_block(&m.content);
                for c in &m.tool_calls {
                    let input = serde_json::from_str(&c.arguments).unwrap_or_else(|_| serde_json::json!({}));
                    blocks.push(Block::ToolUse { id: c.id.clone(), name: c.name.clone(), input });
                }
                ("assistant", blocks)
            }
            Role::Tool => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: m.tool_call_id.clone().unwrap_or_default(),
                    content: m.content.clone(),
                }],
            ),
        };
        // The API wants user and assistant turns to alternate; tool results join the user turn.
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(WireMessage { role, content: blocks }),
        }
    }
    if req.json_mode {
        system.push(JSON_INSTRUCTION);
    }
    WireRequest {
        model,
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        tools: req
            .tools
            .iter()
            .map(|t| WireTool { name: &t.name, description: t.description.as_deref(), input_schema: &t.parameters })
            .collect(),
        temperature: req.temperature,
        stream: false,
    }
}

fn text_block(text: &str) -> Vec<Block> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Block::Text { text: text.to_string() }]
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_string()),
    }
}

impl WireUsage {
    /// Cached prompt tokens are counted apart from `input_tokens`; all of them were read.
    fn input(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens.unwrap_or(0) + self.cache_read_input_tokens.unwrap_or(0)
    }
}

fn from_wire(wire: WireResponse) -> ChatResponse {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in wire.content {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::ToolUse { id, name, input } => tool_calls.push(ToolCall { id, name, arguments: input.to_string() }),
            Block::ToolResult { .. } | Block::Unknown => {}
        }
    }
    let input_tokens = wire.usage.input();
    ChatResponse {
        model: wire.model,
        text,
        tool_calls,
        finish_reason: finish_reason(wire.stop_reason.as_deref().unwrap_or("end_turn")),
        usage: Usage { input_tokens, output_tokens: wire.usage.output_tokens },
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: Block,
    },
    ContentBlockDelta {
        index: usize,
        delta: WireDelta,
    },
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<DeltaUsage>,
    },
    MessageStop,
    Error {
        error: serde_json::Value,
    },
    /// `ping`, `content_block_stop` and whatever comes later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    model: String,
    usage: WireUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    output_tokens: u64,
}

/// Assembles a Messages stream: text deltas pass through, tool inputs and usage are gathered
/// for the end, which is `message_stop`.
#[derive(Debug, Default)]
pub(crate) struct StreamDecoder {
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    stop_reason: Option<String>,
    /// Tool-use blocks by content index: id, name and the input JSON so far.
    tools: BTreeMap<usize, ToolCall>,
}

impl StreamDecoder {
    pub(crate) fn on_event(&mut self, event: SseEvent) -> Result<Vec<Piece>, UpstreamError> {
        let wire: WireEvent =
            serde_json::from_str(&event.data).map_err(|e| UpstreamError::StreamCut(format!("malformed event: {e}")))?;
        match wire {
            WireEvent::MessageStart { message } => {
                self.model = message.model;
                self.input_tokens = message.usage.input();
                self.output_tokens = message.usage.output_tokens;
            }
            WireEvent::ContentBlockStart { index, content_block } => match content_block {
                Block::Text { text } if !text.is_empty() => return Ok(vec![Piece::Text(text)]),
                Block::ToolUse { id, name, .. } => {
                    self.tools.insert(index, ToolCall { id, name, arguments: String::new() });
                }
                _ => {}
            },
            WireEvent::ContentBlockDelta { index, delta } => match delta {
                WireDelta::TextDelta { text } => return Ok(vec![Piece::Text(text)]),
                WireDelta::InputJsonDelta { partial_json } => {
                    if let Some(call) = self.tools.get_mut(&index) {
                        call.arguments.push_str(&partial_json);
                    }
                }
                WireDelta::Other => {}
            },
            WireEvent::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(u) = usage {
                    self.output_tokens = u.output_tokens;
                }
            }
            WireEvent::MessageStop => {
                let tool_calls = std::mem::take(&mut self.tools)
                    .into_values()
                    .map(|c| ToolCall {
                        arguments: if c.arguments.is_empty() { "{}".into() } else { c.arguments },
                        ..c
                    })
                    .collect();
                return Ok(vec![Piece::End {
                    model: std::mem::take(&mut self.model),
                    finish_reason: finish_reason(self.stop_reason.as_deref().unwrap_or("end_turn")),
                    tool_calls,
                    usage: Usage { input_tokens: self.input_tokens, output_tokens: self.output_tokens },
                }]);
            }
            WireEvent::Error { error } => {
                let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("unknown error");
                return Err(UpstreamError::StreamCut(format!("upstream error: {message}")));
            }
            WireEvent::Other => {}
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Message, Tool};

    #[test]
    fn system_goes_apart_and_tool_results_join_the_user_turn() {
        let mut req = ChatRequest::new(vec![
            Message::system("be brief"),
            Message::user("weather?"),
            Message {
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "weather".into(),
                    arguments: "{\"city\":\"Oslo\"}".into(),
                }],
                ..Message::assistant("")
            },
            Message::tool_result("c1", "sunny"),
            Message::user("thanks"),
        ]);
        req.tools = vec![Tool { name: "weather".into(), description: Some("w".into()), parameters: json!({}) }];
        req.json_mode = true;
        let wire = serde_json::to_value(to_wire("claude", &req)).unwrap_or_default();
        assert_eq!(
            wire,
            json!({
                "model": "claude",
                "max_tokens": DEFAULT_MAX_TOKENS,
                "system": format!("be brief\n\n{JSON_INSTRUCTION}"),
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
                        {"type": "text", "text": "thanks"}
                    ]}
                ],
                "tools": [{"name": "weather", "description": "w", "input_schema": {}}]
            })
        );
    }

    #[test]
    fn response_joins_text_and_counts_cached_input() {
        let wire: WireResponse = serde_json::from_value(json!({
            "id": "m", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm"},
                {"type": "text", "text": "a"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}},
                {"type": "text", "text": "b"}
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 10}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = from_wire(wire);
        assert_eq!(r.text, "ab");
        assert_eq!(r.tool_calls, vec![ToolCall { id: "t".into(), name: "f".into(), arguments: "{\"x\":1}".into() }]);
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(r.usage, Usage { input_tokens: 15, output_tokens: 7 });
    }

    #[test]
    fn stream_events_assemble_text_tools_and_usage_until_message_stop() {
        let mut d = StreamDecoder::default();
        let mut pieces = Vec::new();
        let events = [
            json!({"type": "message_start",
                "message": {"model": "claude-x", "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 22}}),
            json!({"type": "message_stop"}),
        ];
        for e in events {
            pieces.extend(d.on_event(SseEvent { event: None, data: e.to_string() }).unwrap_or_else(|e| panic!("{e}")));
        }
        match &pieces[..] {
            [Piece::Text(a), Piece::Text(b), Piece::End { model, finish_reason, tool_calls, usage }] => {
                assert_eq!((a.as_str(), b.as_str(), model.as_str()), ("Hel", "lo", "claude-x"));
                assert_eq!(finish_reason, &FinishReason::ToolCalls);
                assert_eq!(
                    tool_calls,
                    &vec![ToolCall { id: "t1".into(), name: "f".into(), arguments: "{\"a\":1}".into() }]
                );
                assert_eq!(usage, &Usage { input_tokens: 11, output_tokens: 22 });
            }
            other => panic!("{other:?}"),
        }
        let err = d.on_event(SseEvent {
            event: None,
            data: json!({"type": "error", "error": {"message": "overloaded"}}).to_string(),
        });
        assert_eq!(err.err(), Some(UpstreamError::StreamCut("upstream error: overloaded".into())));
    }
}
