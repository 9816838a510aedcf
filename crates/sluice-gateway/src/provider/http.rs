//! The HTTP exchange shared by the providers: post JSON, classify failures, read `Retry-After`.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use crate::error::UpstreamError;
use crate::retry::parse_retry_after;

/// How much of an upstream's error body is kept in an error message.
const MAX_MESSAGE: usize = 500;

/// `{base_url}/{path}` as a URL: parsed once per provider, since parsing one costs more than the
/// rest of building a request.
pub(crate) fn endpoint(base_url: &str, path: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(&format!("{base_url}/{path}"))
        .map_err(|e| format!("the base URL `{base_url}` is not valid: {e}"))
}

/// Posts `body` and returns the answer's body on a 2xx; everything else becomes an
/// [`UpstreamError`]. The whole exchange, body included, must finish within `timeout`.
pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    body: &impl serde::Serialize,
    timeout: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let exchange = async {
        let resp = send(client, url, headers, body).await?;
        Ok(resp.bytes().await.map_err(classify)?.to_vec())
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| UpstreamError::Timeout(timeout))?
}

/// Posts `body` and returns the response once a 2xx status and headers arrived within `timeout`;
/// its body (a stream) is the caller's to read.
pub(crate) async fn post_for_stream(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    body: &impl serde::Serialize,
    timeout: Duration,
) -> Result<reqwest::Response, UpstreamError> {
    tokio::time::timeout(timeout, send(client, url, headers, body))
        .await
        .map_err(|_| UpstreamError::Timeout(timeout))?
}

async fn send(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    body: &impl serde::Serialize,
) -> Result<reqwest::Response, UpstreamError> {
    let resp = client.post(url).headers(headers).json(body).send().await.map_err(classify)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let bytes = resp.bytes().await.map_err(classify)?;
    Err(UpstreamError::Status { status: status.as_u16(), message: error_message(&bytes), retry_after })
}

fn classify(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout(Duration::ZERO)
    } else if e.is_connect() {
        UpstreamError::Connect(e.to_string())
    } else {
        UpstreamError::Request(e.to_string())
    }
}

/// The upstream's `error.message` (both OpenAI and Anthropic put it there), else the body's start.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(msg) = parsed.as_ref().and_then(|v| v.pointer("/error/message")).and_then(|m| m.as_str()) {
        return truncate(msg);
    }
    truncate(&String::from_utf8_lossy(body))
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_upstream_message() {
        assert_eq!(error_message(br#"{"error":{"message":"bad model","type":"x"}}"#), "bad model");
        assert_eq!(error_message(br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#), "busy");
        assert_eq!(error_message(b"gateway down"), "gateway down");
        assert_eq!(error_message("é".repeat(600).as_bytes()).chars().count(), MAX_MESSAGE + 3);
    }
}
