//! The HTTP exchange shared by the providers: post JSON over a pooled keep-alive client, classify
//! failures, read `Retry-After`. The URL and headers of an endpoint are built once, not per call.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::UpstreamError;
use crate::retry::parse_retry_after;

/// How much of an upstream's error body is kept in an error message.
const MAX_MESSAGE: usize = 500;

/// Idle keep-alive connections are closed after this long (below the 2 to 5 minutes after which
/// providers' load balancers drop them, so the gateway rarely sends on a connection being closed).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The upstream client: HTTP/1.1 with a pool of keep-alive connections per host, HTTPS through
/// rustls with the Mozilla roots, `TCP_NODELAY` on. Cheap to clone (the pool is shared).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A new upstream client (must be used inside a Tokio runtime).
pub fn client() -> Result<HttpClient, String> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("cannot set up TLS for upstreams: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).build(https))
}

/// One upstream URL with the headers every request to it carries, both made once. Either may be
/// invalid (a bad base URL, a key that is no header value): then every call fails with why.
#[derive(Clone)]
pub(crate) struct Endpoint {
    client: HttpClient,
    target: Result<(Uri, HeaderMap), String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The headers hold the API key: only the URL is shown, and whether a key is sent.
        let (uri, secret) = match &self.target {
            Ok((u, headers)) => (Ok(u.to_string()), headers.values().any(HeaderValue::is_sensitive)),
            Err(e) => (Err(e.clone()), false),
        };
        let key = if secret { "<redacted>" } else { "none" };
        f.debug_struct("Endpoint").field("uri", &uri).field("api_key", &key).finish()
    }
}

impl Endpoint {
    /// `{base_url}/{path}` with `headers` and `content-type: application/json`; `secret` is a
    /// header whose value is marked sensitive (never shown by `Debug`).
    pub(crate) fn new(
        client: HttpClient,
        base_url: &str,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        secret: Option<(HeaderName, String)>,
    ) -> Self {
        let target = Self::target(base_url, path, headers, secret);
        Self { client, target }
    }

    fn target(
        base_url: &str,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        secret: Option<(HeaderName, String)>,
    ) -> Result<(Uri, HeaderMap), String> {
        let base_url = base_url.trim_end_matches('/');
        let uri: Uri =
            format!("{base_url}/{path}").parse().map_err(|e| format!("the base URL `{base_url}` is not valid: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!("the base URL `{base_url}` is not valid: it must start with http:// or https://"));
        }
        let mut map = HeaderMap::with_capacity(headers.len() + 2);
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            map.insert(name.clone(), value.clone());
        }
        if let Some((name, value)) = secret {
            let mut value =
                HeaderValue::from_str(&value).map_err(|_| "the API key is not a valid header value".to_string())?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        Ok((uri, map))
    }

    /// Posts `body` and returns the answer's body on a 2xx; everything else becomes an
    /// [`UpstreamError`]. The whole exchange, body included, must finish within `timeout`.
    pub(crate) async fn post_json(
        &self,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        let exchange = async {
            let resp = self.send(body).await?;
            Ok(resp.into_body().collect().await.map_err(|e| UpstreamError::Request(chain(&e)))?.to_bytes())
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| UpstreamError::Timeout(timeout))?
    }

    /// Posts `body` and returns the answer's body once a 2xx status and headers arrived within
    /// `timeout`; the body (a stream) is the caller's to read.
    pub(crate) async fn post_for_stream(
        &self,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<Incoming, UpstreamError> {
        let resp =
            tokio::time::timeout(timeout, self.send(body)).await.map_err(|_| UpstreamError::Timeout(timeout))??;
        Ok(resp.into_body())
    }

    async fn send(&self, body: &impl serde::Serialize) -> Result<Response<Incoming>, UpstreamError> {
        let (uri, headers) = self.target.as_ref().map_err(|e| UpstreamError::Request(e.clone()))?;
        let bytes = serde_json::to_vec(body).map_err(|e| UpstreamError::Request(format!("cannot encode: {e}")))?;
        let mut req = Request::post(uri.clone())
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        *req.headers_mut() = headers.clone();
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                UpstreamError::Connect(chain(&e))
            } else {
                UpstreamError::Request(chain(&e))
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = resp.into_body().collect().await.map_err(|e| UpstreamError::Request(chain(&e)))?.to_bytes();
        Err(UpstreamError::Status { status: status.as_u16(), message: error_message(&bytes), retry_after })
    }
}

/// An error with its causes, `a: b: c` (hyper's own message names only the outermost).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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

    #[tokio::test]
    async fn bad_base_urls_and_keys_fail_every_call_with_why() {
        let client = client().unwrap_or_else(|e| panic!("{e}"));
        let cases = [
            ("not a url", None, "is not valid"),
            ("ftp://example.com/v1", None, "must start with http:// or https://"),
            ("http://127.0.0.1:9/v1", Some("bad\nkey"), "the API key is not a valid header value"),
        ];
        for (base, key, expect) in cases {
            let secret = key.map(|k| (hyper::header::AUTHORIZATION, k.to_string()));
            let e = Endpoint::new(client.clone(), base, "chat/completions", &[], secret);
            match e.post_json(&serde_json::json!({}), Duration::from_secs(1)).await {
                Err(UpstreamError::Request(m)) => assert!(m.contains(expect), "{base}: {m}"),
                other => panic!("{base}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let client = client().unwrap_or_else(|e| panic!("{e}"));
        let e = Endpoint::new(client, "http://127.0.0.1:9/v1", "chat/completions", &[], None);
        let got = e.post_json(&serde_json::json!({}), Duration::from_secs(5)).await;
        assert!(matches!(got, Err(UpstreamError::Connect(_))), "{got:?}");
    }
}
