//! Client of the OpenAI Chat Completions API and everything compatible with it (xAI Grok,
//! Ollama, vLLM): `POST {base_url}/chat/completions` with a bearer key.

use std::time::Duration;

use hyper::header::AUTHORIZATION;
use serde::{Deserialize, Serialize};

use super::http::{Endpoint, HttpClient};
use super::sse::SseEvent;
use super::stream::{ChatStream, Decoder, Piece};
use super::ApiKey;
use crate::error::UpstreamError;
use crate::model::{ChatRequest, ChatResponse, FinishReason, Message, Role, ToolCall, Usage};

/// An OpenAI-compatible upstream.
#[derive(Clone, Debug)]
pub struct OpenAi {
    /// `{base_url}/chat/completions` with its headers (the bearer key), made once.
    endpoint: Endpoint,
}

impl OpenAi {
    /// `base_url` ends before `/chat/completions`, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:11434/v1`; local servers often need no key.
    pub fn new(client: HttpClient, base_url: &str, api_key: Option<ApiKey>) -> Self {
        let secret = api_key.map(|k| (AUTHORIZATION, format!("Bearer {}", k.expose())));
        Self { endpoint: Endpoint::new(client, base_url, "chat/completions", &[], secret) }
    }

    pub async fn chat(&self, model: &str, req: &ChatRequest, timeout: Duration) -> Result<ChatResponse, UpstreamError> {
        let body = self.endpoint.post_json(&to_wire(model, req), timeout).await?;
        let wire: WireResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Malformed(format!("chat completion: {e}")))?;
        from_wire(wire)
    }

    /// Streams the answer; usage is asked for with `stream_options.include_usage`.
    pub async fn chat_stream(
        &self,
        model: &str,
        req: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatStream, UpstreamError> {
        let mut wire = to_wire(model, req);
        wire.stream = true;
        wire.stream_options = Some(StreamOptions { include_usage: true });
        let body = self.endpoint.post_for_stream(&wire, timeout).await?;
        Ok(ChatStream::new(body, timeout, Decoder::OpenAi(StreamDecoder::default())))
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type", default = "function")]
    kind: String,
    function: WireFunctionCall,
}

fn function() -> String {
    "function".to_string()
}

#[derive(Serialize, Deserialize)]
struct WireFunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a serde_json::Value,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: String,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

fn role(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn to_wire<'a>(model: &'a str, req: &'a ChatRequest) -> WireRequest<'a> {
    WireRequest {
        model,
        messages: req.messages.iter().map(message_to_wire).collect(),
        tools: req
            .tools
            .iter()
            .map(|t| WireTool {
                kind: "function",
                function: WireFunction {
                    name: &t.name,
                    description: t.description.as_deref(),
                    parameters: &t.parameters,
                },
            })
            .collect(),
        temperature: req.temperature,
        max_tokens: req.max_tokens,
        response_format: req.json_mode.then_some(ResponseFormat { kind: "json_object" }),
        stream: false,
        stream_options: None,
    }
}

fn message_to_wire(m: &Message) -> WireMessage {
    WireMessage {
        role: role(m.role).to_string(),
        content: Some(m.content.clone()),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| WireToolCall {
                id: c.id.clone(),
                kind: function(),
                function: WireFunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_string()),
    }
}

fn from_wire(wire: WireResponse) -> Result<ChatResponse, UpstreamError> {
    let usage = wire
        .usage
        .map(|u| Usage { input_tokens: u.prompt_tokens, output_tokens: u.completion_tokens })
        .unwrap_or_default();
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| UpstreamError::Malformed("chat completion has no choices".into()))?;
    Ok(ChatResponse {
        model: wire.model,
        text: choice.message.content.unwrap_or_default(),
        tool_calls: choice
            .message
            .tool_calls
            .into_iter()
            .map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments })
            .collect(),
        finish_reason: finish_reason(choice.finish_reason.as_deref().unwrap_or("stop")),
        usage,
    })
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Some compatible servers report a failure inside the stream.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: ChunkDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ChunkToolCall>,
}

#[derive(Deserialize)]
struct ChunkToolCall {
    #[serde(default)]
    index: usize,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<ChunkFunction>,
}

#[derive(Deserialize)]
struct ChunkFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Assembles a Chat Completions stream: text deltas pass through, tool calls and usage are
/// gathered for the end, which is `data: [DONE]`.
#[derive(Debug, Default)]
pub(crate) struct StreamDecoder {
    model: String,
    finish_reason: Option<String>,
    usage: Usage,
    tool_calls: Vec<ToolCall>,
}

impl StreamDecoder {
    pub(crate) fn on_event(&mut self, event: SseEvent) -> Result<Vec<Piece>, UpstreamError> {
        if event.data.trim() == "[DONE]" {
            return Ok(vec![Piece::End {
                model: std::mem::take(&mut self.model),
                finish_reason: finish_reason(self.finish_reason.as_deref().unwrap_or("stop")),
                tool_calls: std::mem::take(&mut self.tool_calls),
                usage: self.usage,
            }]);
        }
        let chunk: WireChunk =
            serde_json::from_str(&event.data).map_err(|e| UpstreamError::StreamCut(format!("malformed chunk: {e}")))?;
        if let Some(error) = chunk.error {
            let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("unknown error");
            return Err(UpstreamError::StreamCut(format!("upstream error: {message}")));
        }
        if self.model.is_empty() {
            self.model = chunk.model;
        }
        if let Some(u) = chunk.usage {
            self.usage = Usage { input_tokens: u.prompt_tokens, output_tokens: u.completion_tokens };
        }
        let mut out = Vec::new();
        for choice in chunk.choices {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                out.push(Piece::Text(text));
            }
            for call in choice.delta.tool_calls {
                while self.tool_calls.len() <= call.index {
                    self.tool_calls.push(ToolCall { id: String::new(), name: String::new(), arguments: String::new() });
                }
                let slot = &mut self.tool_calls[call.index];
                if let Some(id) = call.id {
                    slot.id = id;
                }
                if let Some(f) = call.function {
                    slot.name.push_str(&f.name.unwrap_or_default());
                    slot.arguments.push_str(&f.arguments.unwrap_or_default());
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Tool;

    #[test]
    fn request_carries_tools_json_mode_and_tool_results() {
        let mut req = ChatRequest::new(vec![
            Message::system("be brief"),
            Message::user("weather?"),
            Message {
                tool_calls: vec![ToolCall { id: "c1".into(), name: "weather".into(), arguments: "{}".into() }],
                ..Message::assistant("")
            },
            Message::tool_result("c1", "sunny"),
        ]);
        req.tools = vec![Tool { name: "weather".into(), description: None, parameters: json!({"type": "object"}) }];
        req.json_mode = true;
        req.max_tokens = Some(10);
        let wire = serde_json::to_value(to_wire("gpt-4o", &req)).unwrap_or_default();
        assert_eq!(
            wire,
            json!({
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
                ],
                "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
                "max_tokens": 10,
                "response_format": {"type": "json_object"},
                "stream": false
            })
        );
    }

    #[test]
    fn response_with_tool_calls_and_null_content_parses() {
        let wire: WireResponse = serde_json::from_value(json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "grok-2",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]
            }}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = from_wire(wire).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.text, "");
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(r.tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(r.usage, Usage { input_tokens: 12, output_tokens: 3 });
    }

    #[test]
    fn stream_chunks_assemble_tool_calls_and_usage_until_done() {
        let mut d = StreamDecoder::default();
        let mut feed = |data: serde_json::Value| {
            d.on_event(SseEvent { event: None, data: data.to_string() }).unwrap_or_else(|e| panic!("{e}"))
        };
        let first =
            feed(json!({"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}));
        assert!(matches!(&first[..], [Piece::Text(t)] if t == "Hi"));
        feed(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}
        ]}}]}));
        feed(
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
            "finish_reason": "tool_calls"}]}),
        );
        feed(json!({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}));
        let end = d.on_event(SseEvent { event: None, data: "[DONE]".into() }).unwrap_or_default();
        match &end[..] {
            [Piece::End { model, finish_reason, tool_calls, usage }] => {
                assert_eq!((model.as_str(), finish_reason), ("m", &FinishReason::ToolCalls));
                assert_eq!(
                    tool_calls,
                    &vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: "{\"a\":1}".into() }]
                );
                assert_eq!(usage, &Usage { input_tokens: 4, output_tokens: 9 });
            }
            other => panic!("{other:?}"),
        }
    }
}
