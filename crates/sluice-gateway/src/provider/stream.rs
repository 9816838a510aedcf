//! A streamed answer from one upstream: SSE chunks decoded into [`StreamEvent`]s, ending with
//! `Done` only when the upstream sent its end marker.

use std::collections::VecDeque;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::sse::{SseEvent, SseParser};
use super::{anthropic, openai};
use crate::error::UpstreamError;
use crate::model::{ChatResponse, FinishReason, StreamEvent, ToolCall, Usage};

/// What a wire decoder makes of an SSE event.
#[derive(Debug)]
pub(crate) enum Piece {
    Text(String),
    End { model: String, finish_reason: FinishReason, tool_calls: Vec<ToolCall>, usage: Usage },
}

#[derive(Debug)]
pub(crate) enum Decoder {
    OpenAi(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

impl Decoder {
    fn on_event(&mut self, event: SseEvent) -> Result<Vec<Piece>, UpstreamError> {
        match self {
            Self::OpenAi(d) => d.on_event(event),
            Self::Anthropic(d) => d.on_event(event),
        }
    }
}

#[derive(Debug)]
pub struct ChatStream {
    body: Incoming,
    /// The longest silence tolerated between two chunks.
    idle_timeout: Duration,
    parser: SseParser,
    decoder: Decoder,
    pending: VecDeque<Piece>,
    text: String,
    finished: bool,
}

impl ChatStream {
    pub(crate) fn new(body: Incoming, idle_timeout: Duration, decoder: Decoder) -> Self {
        Self {
            body,
            idle_timeout,
            parser: SseParser::default(),
            decoder,
            pending: VecDeque::new(),
            text: String::new(),
            finished: false,
        }
    }

    /// The next event; `None` after `Done` or after an error.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        loop {
            if let Some(piece) = self.pending.pop_front() {
                return Some(Ok(self.emit(piece)));
            }
            if self.finished {
                return None;
            }
            let chunk = match tokio::time::timeout(self.idle_timeout, self.body.frame()).await {
                // Trailers carry no data.
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(_) => continue,
                },
                Ok(None) => return self.fail(UpstreamError::StreamCut("the upstream closed the stream early".into())),
                Ok(Some(Err(e))) => return self.fail(UpstreamError::StreamCut(super::http::chain(&e))),
                Err(_) => {
                    let silence = format!("no data for {:?}", self.idle_timeout);
                    return self.fail(UpstreamError::StreamCut(silence));
                }
            };
            for event in self.parser.push(&chunk) {
                match self.decoder.on_event(event) {
                    Ok(pieces) => {
                        // Nothing after the end marker counts.
                        let end = pieces.iter().position(|p| matches!(p, Piece::End { .. }));
                        let keep = end.map_or(pieces.len(), |i| i + 1);
                        self.pending.extend(pieces.into_iter().take(keep));
                        if end.is_some() {
                            self.finished = true;
                            break;
                        }
                    }
                    Err(e) => {
                        self.pending.clear();
                        return self.fail(e);
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Option<Result<StreamEvent, UpstreamError>> {
        self.finished = true;
        Some(Err(e))
    }

    fn emit(&mut self, piece: Piece) -> StreamEvent {
        match piece {
            Piece::Text(t) => {
                self.text.push_str(&t);
                StreamEvent::Text(t)
            }
            Piece::End { model, finish_reason, tool_calls, usage } => StreamEvent::Done(ChatResponse {
                model,
                text: std::mem::take(&mut self.text),
                tool_calls,
                finish_reason,
                usage,
            }),
        }
    }
}
