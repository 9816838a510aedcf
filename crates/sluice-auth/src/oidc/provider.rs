//! The issuer over HTTP: its discovery document, its signing keys (cached, fetched again for a
//! key id it did not publish before, at most every few seconds) and the code exchange at its
//! token endpoint.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::config::{ClientAuth, Config};
use super::idtoken::Jwks;

/// Discovery documents and key sets are used this long before they are fetched again.
const CACHE_FOR: Duration = Duration::from_secs(3600);
/// A token naming a key not in the cached set fetches the set again at most this often.
const REFETCH_EVERY: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(10);
/// Answers from the issuer larger than this are refused.
const MAX_BODY: usize = 1 << 20;

/// What went wrong talking to the issuer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Unreachable, or it answered with something other than what OIDC prescribes.
    #[error("{0}")]
    Failed(String),
    /// The token endpoint refused the code (an OAuth error such as `invalid_grant`).
    #[error("the identity provider refused the login: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused { error: String, description: Option<String> },
}

/// The parts of the discovery document this server uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// The token endpoint's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub id_token: String,
    #[serde(default)]
    pub token_type: Option<String>,
}

struct Cached<T> {
    value: Arc<T>,
    at: Instant,
}

/// See the module docs.
pub struct Provider {
    http: reqwest::Client,
    discovery: tokio::sync::Mutex<Option<Cached<Discovery>>>,
    jwks: tokio::sync::Mutex<Option<Cached<Jwks>>>,
    /// When a token with an unknown key last made this node fetch the key set.
    refetched: Mutex<Option<Instant>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

impl Provider {
    pub fn new() -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| failed("cannot build the HTTP client", e))?;
        Ok(Self {
            http,
            discovery: tokio::sync::Mutex::default(),
            jwks: tokio::sync::Mutex::default(),
            refetched: Mutex::default(),
        })
    }

    async fn get_json(&self, what: &str, url: &str) -> Result<Value, ProviderError> {
        let resp = self.http.get(url).header("accept", "application/json").send().await.map_err(|e| {
            failed(&format!("the identity provider cannot be reached for its {what} at {url}"), e.without_url())
        })?;
        let status = resp.status();
        let body = read_body(resp).await.map_err(|e| failed(&format!("reading the {what} from {url}"), e))?;
        if !status.is_success() {
            return Err(ProviderError::Failed(format!(
                "the identity provider answered {status} for its {what} at {url}"
            )));
        }
        serde_json::from_slice(&body).map_err(|e| failed(&format!("the {what} at {url} is not JSON"), e))
    }

    /// The discovery document of `config.issuer`, checked to name that issuer.
    pub async fn discovery(&self, config: &Config) -> Result<Arc<Discovery>, ProviderError> {
        let mut cached = self.discovery.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.at.elapsed() < CACHE_FOR) {
            return Ok(Arc::clone(&c.value));
        }
        let url = format!("{}/.well-known/openid-configuration", config.issuer.trim_end_matches('/'));
        let doc = self.get_json("discovery document", &url).await?;
        let d: Discovery =
            serde_json::from_value(doc).map_err(|e| failed(&format!("the discovery document at {url}"), e))?;
        if d.issuer != config.issuer {
            return Err(ProviderError::Failed(format!(
                "the discovery document at {url} names the issuer {:?}, not the configured {:?}; fix `issuer`",
                d.issuer, config.issuer
            )));
        }
        let d = Arc::new(d);
        *cached = Some(Cached { value: Arc::clone(&d), at: Instant::now() });
        Ok(d)
    }

    /// The issuer's signing keys; with `fresh`, fetched again unless that happened moments ago
    /// (a token names a key the cached set lacks: the issuer may have rotated). Returns whether
    /// this call fetched them.
    pub async fn jwks(&self, d: &Discovery, fresh: bool) -> Result<(Arc<Jwks>, bool), ProviderError> {
        let mut cached = self.jwks.lock().await;
        let refetch = fresh && {
            let mut last = self.refetched.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= REFETCH_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if let Some(c) = cached.as_ref().filter(|c| c.at.elapsed() < CACHE_FOR && !refetch) {
            return Ok((Arc::clone(&c.value), false));
        }
        let doc = self.get_json("signing keys", &d.jwks_uri).await?;
        let jwks = Jwks::parse(&doc).map_err(|e| failed(&format!("the signing keys at {}", d.jwks_uri), e))?;
        let jwks = Arc::new(jwks);
        *cached = Some(Cached { value: Arc::clone(&jwks), at: Instant::now() });
        Ok((jwks, true))
    }

    /// Exchanges an authorization code (with its PKCE verifier) for tokens.
    pub async fn exchange(
        &self,
        config: &Config,
        d: &Discovery,
        code: &str,
        verifier: &str,
    ) -> Result<Tokens, ProviderError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", config.redirect_url.as_str()),
            ("code_verifier", verifier),
        ];
        let mut req = self.http.post(&d.token_endpoint).header("accept", "application/json");
        match config.client_auth {
            ClientAuth::ClientSecretBasic => {
                // RFC 6749 §2.3.1: both parts are form-encoded before they are joined.
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&config.client_id), enc(config.client_secret.expose()));
                req = req.header("authorization", format!("Basic {}", STANDARD.encode(pair)));
            }
            ClientAuth::ClientSecretPost => {
                form.push(("client_id", config.client_id.as_str()));
                form.push(("client_secret", config.client_secret.expose()));
            }
        }
        let resp = req.form(&form).send().await.map_err(|e| {
            failed(
                &format!("the identity provider's token endpoint {} cannot be reached", d.token_endpoint),
                e.without_url(),
            )
        })?;
        let status = resp.status();
        let body = read_body(resp).await.map_err(|e| failed("reading the token endpoint's answer", e))?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            // OAuth errors (RFC 6749 §5.2) are the issuer refusing this login; `invalid_client`
            // and anything else mean this server is misconfigured or the issuer is broken.
            return match json["error"].as_str() {
                Some(error) if error != "invalid_client" && status.is_client_error() => Err(ProviderError::Refused {
                    error: error.to_string(),
                    description: json["error_description"].as_str().map(str::to_string),
                }),
                other => Err(ProviderError::Failed(format!(
                    "the token endpoint {} answered {status}{}",
                    d.token_endpoint,
                    other.map(|e| format!(" ({e}); check client_id and the client secret")).unwrap_or_default()
                ))),
            };
        }
        let tokens: Tokens =
            serde_json::from_value(json).map_err(|e| failed("the token endpoint's answer has no id_token", e))?;
        if tokens.token_type.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
            return Err(ProviderError::Failed(format!(
                "the token endpoint answered token_type {:?}, expected Bearer",
                tokens.token_type.as_deref().unwrap_or_default()
            )));
        }
        Ok(tokens)
    }
}

async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.without_url().to_string())? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("the answer is larger than {MAX_BODY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
