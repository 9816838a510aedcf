//! OpenID Connect login (authorization code flow with PKCE) against one configured issuer.
//!
//! [`Oidc::begin`] makes a state, a nonce and a PKCE verifier, keeps them briefly and returns the
//! issuer's authorization URL; [`Oidc::finish`] takes the callback's state back (once), exchanges
//! the code with the verifier, verifies the ID token against the issuer's keys, maps its claims
//! to a role, finds or provisions the user in the configured tenant and issues a Sluice session
//! token like a password login does.

pub mod config;
pub mod idtoken;
pub mod pending;
pub mod provider;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::{ClientAuth, Config, ConfigError, Provision, RoleMap, Secret};
pub use idtoken::{IdToken, Jwks, TokenError};
pub use pending::StateError;
pub use provider::ProviderError;

use self::pending::{Pending, PendingLogins};
use self::provider::Provider;
use crate::directory::Directory;
use crate::role::Role;
use crate::AuthError;

/// How long a login may take between the redirect and the callback.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Logins in flight on one node at most.
const MAX_PENDING: usize = 10_000;
/// Clock skew allowed on the ID token's times.
const LEEWAY_S: i64 = 60;

/// Why an OIDC login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The callback's `state` is missing, unknown, used or expired (400).
    #[error("{0}")]
    State(String),
    /// The issuer refused the sign-in or the code (401).
    #[error("{0}")]
    Refused(String),
    /// The ID token failed a check (401).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The user proved who they are but may not sign in (403).
    #[error("{0}")]
    Forbidden(String),
    /// Too many logins in flight on this node (429).
    #[error("too many logins in progress; retry in a minute")]
    Busy,
    /// The issuer is unreachable or broken, or this server's client config is wrong (502).
    #[error("{0}")]
    Provider(String),
    #[error(transparent)]
    Directory(#[from] AuthError),
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Refused { .. } => Self::Refused(e.to_string()),
            ProviderError::Failed(m) => Self::Provider(m),
        }
    }
}

/// A finished login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub tenant: String,
    pub email: String,
    /// The user's role in Sluice now.
    pub role: Role,
    pub token: String,
    pub expires_at_ms: i64,
    /// Whether this login created the user.
    pub created: bool,
}

/// The outcome of a callback, with the email of who tried when the ID token named one (for the
/// audit log).
#[derive(Debug)]
pub struct Attempt {
    pub email: Option<String>,
    pub result: Result<Login, Error>,
}

/// See the module docs.
pub struct Oidc {
    config: Config,
    provider: Provider,
    pending: PendingLogins,
}

impl Oidc {
    pub fn new(config: Config) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self { config, provider: Provider::new()?, pending: PendingLogins::new(LOGIN_TTL, MAX_PENDING) }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Fetches the discovery document and the signing keys, so that a wrong issuer shows at
    /// start rather than at the first login.
    pub async fn warm_up(&self) -> Result<usize, Error> {
        let d = self.provider.discovery(&self.config).await?;
        Ok(self.provider.jwks(&d, false).await?.0.len())
    }

    /// Starts a login: the URL of the issuer's authorization endpoint to send the browser to.
    pub async fn begin(&self) -> Result<String, Error> {
        let d = self.provider.discovery(&self.config).await?;
        let state = pending::random_token()?;
        let nonce = pending::random_token()?;
        let verifier = pending::random_token()?;
        let mut url = reqwest::Url::parse(&d.authorization_endpoint).map_err(|e| {
            Error::Provider(format!("the discovery document's authorization_endpoint is not a URL: {e}"))
        })?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.config.redirect_url)
            .append_pair("scope", &self.config.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &pending::challenge(&verifier))
            .append_pair("code_challenge_method", "S256");
        self.pending.insert(state, Pending { nonce, verifier }, Instant::now()).map_err(|_| Error::Busy)?;
        Ok(url.into())
    }

    /// Takes the login of `state` out (a state works once), for a callback that carries one.
    fn take(&self, state: Option<&str>) -> Result<Pending, Error> {
        let state = state
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::State("the callback has no `state`; start again at /v1/auth/oidc/login".into()))?;
        self.pending.take(state, Instant::now()).map_err(|e| {
            Error::State(match e {
                StateError::Expired => format!(
                    "this login expired (logins must finish within {} minutes); start again at /v1/auth/oidc/login",
                    LOGIN_TTL.as_secs() / 60
                ),
                _ => "unknown or already used `state`; start again at /v1/auth/oidc/login".into(),
            })
        })
    }

    /// The issuer sent the browser back with an error (`access_denied`, say): the login ends.
    pub fn refused(&self, state: Option<&str>, error: &str, description: Option<&str>) -> Error {
        if let Err(e) = self.take(state) {
            return e;
        }
        Error::Refused(format!(
            "the identity provider refused the login: {error}{}",
            description.map(|d| format!(" ({d})")).unwrap_or_default()
        ))
    }

    /// Finishes a login from the callback's `code` and `state`.
    pub async fn finish(&self, dir: &Directory, code: Option<&str>, state: Option<&str>) -> Attempt {
        let mut email = None;
        let result = self.finish_inner(dir, code, state, &mut email).await;
        Attempt { email, result }
    }

    async fn finish_inner(
        &self,
        dir: &Directory,
        code: Option<&str>,
        state: Option<&str>,
        who: &mut Option<String>,
    ) -> Result<Login, Error> {
        let pending = self.take(state)?;
        let code = code
            .filter(|c| !c.is_empty())
            .ok_or_else(|| Error::State("the callback has no `code`; start again at /v1/auth/oidc/login".into()))?;
        let d = self.provider.discovery(&self.config).await?;
        let tokens = self.provider.exchange(&self.config, &d, code, &pending.verifier).await?;
        let id = self.verify(&d, &tokens.id_token, &pending.nonce).await?;
        let email = crate::text::normalize_email(&id.email.clone().ok_or(TokenError::Missing("email"))?);
        *who = Some(email.clone());
        if id.email_verified == Some(false) {
            return Err(Error::Forbidden(format!(
                "the identity provider has not verified the email {email}; verify it there and sign in again"
            )));
        }
        let role = self.config.roles.role_of(&id.claims);
        let source = format!("oidc:{}", self.config.issuer);
        let auto = self.config.provision == Provision::Auto;
        let (user, created) = dir.sign_in_external(&self.config.tenant, &email, role, auto, &source).await?;
        let (token, expires_at_ms) = dir.issue_token(&self.config.tenant, &user).await?;
        Ok(Login {
            tenant: self.config.tenant.clone(),
            email: user.email,
            role: user.role,
            token,
            expires_at_ms,
            created,
        })
    }

    async fn verify(&self, d: &provider::Discovery, token: &str, nonce: &str) -> Result<IdToken, Error> {
        let expected = idtoken::Expected {
            issuer: &self.config.issuer,
            client_id: &self.config.client_id,
            nonce,
            now_s: crate::now_ms() / 1000,
            leeway_s: LEEWAY_S,
        };
        let (jwks, fetched) = self.provider.jwks(d, false).await?;
        match idtoken::verify(token, &jwks, &expected) {
            Err(TokenError::UnknownKey(_)) if !fetched => {
                // The issuer may have rotated its keys since they were cached.
                let (jwks, _) = self.provider.jwks(d, true).await?;
                Ok(idtoken::verify(token, &jwks, &expected)?)
            }
            other => Ok(other?),
        }
    }
}
