//! Upstream providers: one client per wire format, behind the [`Provider`] enum.

pub mod anthropic;
mod http;
pub mod openai;
mod sse;
pub mod stream;

use std::fmt;
use std::time::Duration;

use crate::error::UpstreamError;
use crate::model::{ChatRequest, ChatResponse};

pub use anthropic::Anthropic;
pub use http::{client as http_client, HttpClient};
pub use openai::OpenAi;
pub use stream::ChatStream;

/// A secret API key. Its `Debug` never shows the key, so it cannot leak through logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// An upstream that answers chat requests.
#[derive(Debug, Clone)]
pub enum Provider {
    OpenAi(OpenAi),
    Anthropic(Anthropic),
}

impl Provider {
    /// Sends one request to `model`, giving up after `timeout` (connection, answer and body).
    pub async fn chat(&self, model: &str, req: &ChatRequest, timeout: Duration) -> Result<ChatResponse, UpstreamError> {
        match self {
            Self::OpenAi(p) => p.chat(model, req, timeout).await,
            Self::Anthropic(p) => p.chat(model, req, timeout).await,
        }
    }

    /// Opens a streamed answer. `timeout` bounds the wait for the answer's headers and then
    /// each silence between chunks.
    pub async fn chat_stream(
        &self,
        model: &str,
        req: &ChatRequest,
        timeout: Duration,
    ) -> Result<ChatStream, UpstreamError> {
        match self {
            Self::OpenAi(p) => p.chat_stream(model, req, timeout).await,
            Self::Anthropic(p) => p.chat_stream(model, req, timeout).await,
        }
    }

    /// The wire format's name, for usage records and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::OpenAi(_) => "openai",
            Self::Anthropic(_) => "anthropic",
        }
    }
}
