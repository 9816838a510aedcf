//! The OpenAI Chat Completions wire format as the endpoint reads and writes it: the request
//! (with Sluice's `precision` extension), its conversion to the gateway's model, and the answer.

use std::fmt;

use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use sluice_gateway::{ChatRequest, ChatResponse, Message, Role, Tool, ToolCall, Usage};

use crate::error::ApiError;

/// The request as OpenAI clients send it. Fields this gateway does not use are ignored, as
/// OpenAI-compatible servers do, except those that would change the answer's shape (`n`).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The gateway route to call, or an experiment whose arm (by `user`) names the route.
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
    /// OpenAI's stable id of the end user: the sticky key of experiments.
    #[serde(default)]
    pub user: Option<String>,
    /// Sluice's extension: serve the call by the route's precision tier.
    #[serde(default)]
    pub precision: Option<bool>,
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

/// Message content: a string, or an array of `{"type": "text", "text": ...}` parts. Read
/// straight from the body, without a `serde_json::Value` in between.
#[derive(Debug)]
pub struct Content(pub String);

const PARTS_ONLY: &str = "content must be a string or an array of {\"type\": \"text\", \"text\": ...} parts";

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

struct ContentVisitor;

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PARTS_ONLY)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Content, E> {
        Ok(Content(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Content, E> {
        Ok(Content(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
        let mut text = String::new();
        let mut i = 0;
        while let Some(part) = seq.next_element::<Value>()? {
            let part = Part::deserialize(part).map_err(|_| A::Error::custom(format!("part {i}: {PARTS_ONLY}")))?;
            match (part.kind.as_deref(), part.text) {
                (Some("text"), Some(t)) => {
                    if i > 0 {
                        text.push('\n');
                    }
                    text.push_str(&t);
                }
                (Some(other), _) if other != "text" => {
                    return Err(A::Error::custom(format!("part {i} has type `{other}`; only text parts are supported")))
                }
                _ => return Err(A::Error::custom(format!("part {i}: {PARTS_ONLY}"))),
            }
            i += 1;
        }
        Ok(Content(text))
    }

    // Anything else gets the one message that says what is accepted.
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Content, E> {
        Err(E::custom(PARTS_ONLY))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Content, E> {
        Err(E::custom(PARTS_ONLY))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Content, E> {
        Err(E::custom(PARTS_ONLY))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Content, E> {
        Err(E::custom(PARTS_ONLY))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Content, A::Error> {
        Err(A::Error::custom(PARTS_ONLY))
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ContentVisitor)
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

/// `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`.
#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: FormatKind,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    Text,
    JsonObject,
    JsonSchema,
}

/// OpenAI's `response_format.json_schema`. `strict` is accepted; the answer is always checked.
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// What a request asks of the gateway besides the conversation.
#[derive(Debug, Default, PartialEq)]
pub struct Asked {
    pub precision: bool,
    /// The JSON Schema the answer must be valid against.
    pub schema: Option<Value>,
    pub stream: bool,
    pub include_usage: bool,
}

impl CompletionRequest {
    /// The gateway's request and what else the caller asks for, or the field that makes the
    /// request invalid. Takes the strings out of the parsed body rather than copying them.
    pub fn into_chat(self) -> Result<(ChatRequest, Asked), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "at least one message is required"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only one choice (n = 1) is supported"));
        }
        let stream = self.stream == Some(true);
        let json_object = self.response_format.as_ref().is_some_and(|f| f.kind == FormatKind::JsonObject);
        let schema = match self.response_format {
            Some(ResponseFormat { kind: FormatKind::JsonSchema, json_schema }) => {
                let Some(schema) = json_schema.and_then(|j| j.schema) else {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "a json_schema response format needs the schema the answer must match",
                    ));
                };
                if let Err(e) = sluice_gateway::structured::check_schema(&schema) {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        format!("not a valid JSON Schema: {e}"),
                    ));
                }
                if stream {
                    return Err(ApiError::invalid(
                        "stream",
                        "an answer checked against a JSON Schema cannot be streamed (it may need a repair call); ask without `stream`",
                    ));
                }
                Some(schema)
            }
            _ => None,
        };
        // With a schema the upstream is asked for a JSON object too (OpenAI-compatible servers get
        // `json_object`, Anthropic an instruction); the schema itself is checked here.
        let json_mode = json_object || schema.is_some();
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
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
                .into_iter()
                .flatten()
                .map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments })
                .collect();
            let content = m.content.map(|c| c.0).unwrap_or_default();
            messages.push(Message { role, content, tool_calls, tool_call_id: m.tool_call_id });
        }
        let tools = self
            .tools
            .into_iter()
            .flatten()
            .map(|t| Tool {
                name: t.function.name,
                description: t.function.description,
                parameters: t.function.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
            .collect();
        let req = ChatRequest {
            messages,
            tools,
            temperature: self.temperature,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            json_mode,
        };
        let include_usage = self.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        Ok((req, Asked { precision: self.precision.unwrap_or(false), schema, stream, include_usage }))
    }
}

/// A whole answer, `chat.completion`, written straight from the gateway's response.
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: WireUsage,
}

#[derive(Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: AnswerMessage<'a>,
    pub finish_reason: &'a str,
}

#[derive(Serialize)]
pub struct AnswerMessage<'a> {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: Vec<AnswerToolCall<'a>>,
}

#[derive(Serialize)]
pub struct AnswerToolCall<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: AnswerFunction<'a>,
}

#[derive(Serialize)]
pub struct AnswerFunction<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

#[derive(Serialize)]
pub struct WireUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.input_tokens + u.output_tokens,
        }
    }
}

impl<'a> Completion<'a> {
    /// The answer `resp` as OpenAI writes it; `content` replaces its text (the canonical JSON of
    /// a structured answer).
    pub fn new(id: &'a str, created: u64, model: &'a str, resp: &'a ChatResponse, content: &'a str) -> Self {
        let tool_calls: Vec<AnswerToolCall<'a>> = resp
            .tool_calls
            .iter()
            .map(|c| AnswerToolCall {
                id: &c.id,
                kind: "function",
                function: AnswerFunction { name: &c.name, arguments: &c.arguments },
            })
            .collect();
        let content = if content.is_empty() && !tool_calls.is_empty() { None } else { Some(content) };
        Self {
            id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice {
                index: 0,
                message: AnswerMessage { role: "assistant", content, tool_calls },
                finish_reason: resp.finish_reason.as_str(),
            }],
            usage: resp.usage.into(),
        }
    }
}

/// One event of a streamed answer, `chat.completion.chunk`.
#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// One choice, or none in the closing usage chunk.
    pub choices: Vec<ChunkChoice<'a>>,
    /// Absent unless `stream_options.include_usage`; then `null` but in the closing chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<WireUsage>>,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'a str>,
}

/// What a chunk adds to the answer.
#[derive(Serialize, Default)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: Vec<DeltaToolCall<'a>>,
}

#[derive(Serialize)]
pub struct DeltaToolCall<'a> {
    pub index: usize,
    #[serde(flatten)]
    pub call: AnswerToolCall<'a>,
}

impl<'a> DeltaToolCall<'a> {
    pub fn of(calls: &'a [ToolCall]) -> Vec<Self> {
        calls
            .iter()
            .enumerate()
            .map(|(index, c)| Self {
                index,
                call: AnswerToolCall {
                    id: &c.id,
                    kind: "function",
                    function: AnswerFunction { name: &c.name, arguments: &c.arguments },
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::parse_json;

    /// Parses a request body and converts it, returning the error message or the request.
    fn check(body: Value) -> Result<(ChatRequest, Asked), String> {
        let parsed: CompletionRequest = parse_json(body.to_string().as_bytes()).map_err(|e| e.message)?;
        parsed.into_chat().map_err(|e| e.message)
    }

    #[test]
    fn openai_requests_convert_to_the_gateway_model() {
        let (req, asked) = check(json!({
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
            "user": "ignored here", "seed": 7
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.messages[0].role, Role::System);
        assert_eq!(req.messages[1].content, "a\nb");
        assert_eq!(req.messages[2].tool_calls[0].name, "f");
        assert_eq!(req.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!((req.max_tokens, req.json_mode, req.tools.len()), (Some(20), true, 1));
        assert_eq!(asked, Asked::default());
    }

    #[test]
    fn precision_schema_and_stream_options_are_read() {
        let m = json!([{"role": "user", "content": "x"}]);
        let schema = json!({"type": "object", "required": ["a"]});
        let (req, asked) = check(json!({"model": "r", "messages": m, "precision": true,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}}}))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(req.json_mode, "the upstream is asked for JSON");
        assert_eq!(asked, Asked { precision: true, schema: Some(schema), stream: false, include_usage: false });
        let (_, asked) =
            check(json!({"model": "r", "messages": m, "stream": true, "stream_options": {"include_usage": true}}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(asked, Asked { stream: true, include_usage: true, ..Asked::default() });
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let m = |content: Value| json!({"model": "r", "messages": [{"role": "user", "content": content}]});
        let with = |extra: Value| {
            let mut body = json!({"model": "r", "messages": [{"role": "user", "content": "x"}]});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            body
        };
        let cases = [
            (json!({"messages": []}), "missing field `model`"),
            (json!({"model": "r", "messages": []}), "messages: at least one message"),
            (
                json!({"model": "r", "messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role: unknown variant",
            ),
            (m(json!([{"type": "image_url", "image_url": {}}])), "messages[0].content: part 0 has type `image_url`"),
            (m(json!([5])), "messages[0].content: part 0: content must be a string"),
            (m(json!(5)), "messages[0].content: content must be a string"),
            (m(json!({"text": "x"})), "messages[0].content: content must be a string"),
            (json!({"model": "r", "messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
            (with(json!({"response_format": {"type": "xml"}})), "response_format.type: unknown variant `xml`"),
            (
                with(json!({"response_format": {"type": "json_schema"}})),
                "response_format.json_schema.schema: a json_schema response format needs the schema",
            ),
            (
                with(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}})),
                "response_format.json_schema.schema: not a valid JSON Schema",
            ),
            (
                with(
                    json!({"stream": true, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                ),
                "stream: an answer checked against a JSON Schema cannot be streamed",
            ),
            (with(json!({"precision": "yes"})), "precision"),
            (with(json!({"n": 2})), "n: only one choice"),
            (with(json!({"temperature": "hot"})), "temperature"),
        ];
        for (body, expect) in cases {
            let got = check(body.clone()).err().unwrap_or_else(|| "ok".into());
            assert!(got.contains(expect), "{body}\n  expected: {expect}\n  got: {got}");
        }
    }

    #[test]
    fn answers_are_written_in_openai_shape() {
        let resp = ChatResponse {
            model: "m".into(),
            text: String::new(),
            tool_calls: vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() }],
            finish_reason: sluice_gateway::FinishReason::ToolCalls,
            usage: Usage { input_tokens: 3, output_tokens: 4 },
        };
        let got = serde_json::to_value(Completion::new("chatcmpl-1", 9, "m", &resp, "")).unwrap_or_default();
        assert_eq!(
            got,
            json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 9, "model": "m",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        );
        let text = ChatResponse { text: "hi".into(), tool_calls: Vec::new(), ..resp };
        let got = serde_json::to_value(Completion::new("chatcmpl-1", 9, "m", &text, "hi")).unwrap_or_default();
        assert_eq!(got["choices"][0]["message"], json!({"role": "assistant", "content": "hi"}));
    }

    #[test]
    fn stream_chunks_are_written_in_openai_shape() {
        let calls = [ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() }];
        let chunk = |delta, finish_reason, usage| {
            let c = Chunk {
                id: "x",
                object: "chat.completion.chunk",
                created: 1,
                model: "m",
                choices: vec![ChunkChoice { index: 0, delta, finish_reason }],
                usage,
            };
            serde_json::to_value(c).unwrap_or_default()
        };
        let first = chunk(Delta { role: Some("assistant"), content: Some(""), ..Delta::default() }, None, None);
        assert_eq!(
            first,
            json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
        );
        let tools = chunk(Delta { tool_calls: DeltaToolCall::of(&calls), ..Delta::default() }, None, Some(None));
        assert_eq!(
            tools["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        assert_eq!(tools["usage"], Value::Null, "with include_usage every chunk has `usage`");
        assert!(tools.as_object().is_some_and(|o| o.contains_key("usage")));
        let end = chunk(Delta::default(), Some("stop"), None);
        assert_eq!(end["choices"][0], json!({"index": 0, "delta": {}, "finish_reason": "stop"}));
    }
}
