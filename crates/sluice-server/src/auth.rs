//! Authentication, authorization, rate limiting and auditing of every request, as one
//! middleware: the bearer credential becomes a [`Principal`] (or a 401), the route's
//! [`Perm`] is checked (403), the caller's quotas are taken (429 with `Retry-After`), and
//! handlers read the principal with the [`Caller`] extractor. Every change (any method but GET)
//! and every refusal of a known caller is written to the audit log.
//!
//! Which permission each route needs is the table in [`need`]; a test walks the OpenAPI
//! document and checks every operation against it.

use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_auth::oidc::Oidc;
use sluice_auth::{Actor, Auditor, Directory, Perm, Principal, Quota, RateLimitConfig, RateLimiter, Role, Shares};
use sluice_store::AuditRow;

use crate::error::ApiError;
use crate::trace::TraceContext;
use crate::{AppState, Peer};

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health, the API document, login (password and OIDC).
    Public,
    /// Any valid credential.
    Authenticated,
    Perm(Perm),
}

/// The permission each route needs. Unknown routes are public here because they answer 404.
pub fn need(method: &Method, route: &str) -> Need {
    use Perm::*;
    let read_or = |write: Perm| if method == Method::GET { Need::Perm(Read) } else { Need::Perm(write) };
    match route {
        "/healthz"
        | "/readyz"
        | "/openapi.json"
        | "/v1/auth/login"
        | "/v1/auth/oidc/login"
        | "/v1/auth/oidc/callback"
        | "/v1/schemas/workflow" => Need::Public,
        "/v1/auth/whoami" => Need::Authenticated,
        "/v1/workflows" | "/v1/workflows/{name}/sharing" => read_or(Publish),
        "/v1/executions" => read_or(Operate),
        "/v1/executions/{workflow_id}/signals/{name}"
        | "/v1/executions/{workflow_id}/cancel"
        | "/v1/dlq/{workflow_id}/redrive" => Need::Perm(Operate),
        r if r.starts_with("/v1/tasks/") => Need::Perm(Work),
        "/v1/chat/completions" => Need::Perm(Gateway),
        r if r.starts_with("/v1/users") || r.starts_with("/v1/api-keys") || r == "/v1/audit" => Need::Perm(Manage),
        // Unless the server says otherwise (see `MetricsAccess`).
        "/metrics" => Need::Perm(Manage),
        r if r.starts_with("/v1/") => Need::Perm(Read),
        _ => Need::Public,
    }
}

/// How requests are authenticated and limited.
pub struct Security {
    /// `None`: authentication is off (`--insecure-no-auth`) and every request acts as the owner
    /// of `open_tenant`.
    pub directory: Option<Arc<Directory>>,
    /// OIDC login, when configured.
    pub oidc: Option<Arc<Oidc>>,
    pub open_tenant: String,
    pub limiter: RateLimiter,
    /// Login attempts per account: 10 a minute.
    pub login_limiter: RateLimiter,
    pub auditor: Auditor,
    /// Who may reach which workflow beyond their role.
    pub shares: Shares,
}

impl Security {
    pub fn new(
        directory: Option<Arc<Directory>>,
        oidc: Option<Arc<Oidc>>,
        limits: RateLimitConfig,
        auditor: Auditor,
        shares: Shares,
    ) -> Self {
        let login = RateLimitConfig { per_user: Quota::parse("10/minute").ok(), ..RateLimitConfig::default() };
        Self {
            directory,
            oidc,
            open_tenant: "default".into(),
            limiter: RateLimiter::new(limits),
            login_limiter: RateLimiter::new(login),
            auditor,
            shares,
        }
    }
}

/// Empties the limiters' buckets whose quota is back to full, every minute, so that their maps
/// stay as small as the set of recent callers (logins naming made-up accounts included). Ends
/// when the router is dropped.
pub fn spawn_housekeeping(security: &Arc<Security>) {
    let security = Arc::downgrade(security);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(s) = security.upgrade() else { return };
            s.limiter.housekeep();
            s.login_limiter.housekeep();
        }
    });
}

/// The principal of the request, put there by the middleware.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Principal>().cloned().map(Caller).ok_or_else(|| {
            tracing::error!(path = %parts.uri.path(), "a handler needs a caller but the route is public");
            ApiError::new("internal", "internal error; the cause is in the server log")
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn perm_name(p: Perm) -> &'static str {
    match p {
        Perm::Read => "read",
        Perm::Publish => "publish",
        Perm::Operate => "operate",
        Perm::Work => "work",
        Perm::Gateway => "gateway",
        Perm::Manage => "manage",
    }
}

/// The middleware; see the module docs.
pub async fn authenticate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let need = match route.as_deref() {
        None => Need::Public,
        // Public, or answered with where the metrics are.
        Some("/metrics") if app.metrics_access != crate::MetricsAccess::Admin => Need::Public,
        Some(r) => need(req.method(), r),
    };
    if need == Need::Public {
        return next.run(req).await;
    }
    let security = &app.security;
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
    let cert = peer.as_ref().and_then(|p| p.client_cert.as_ref()).map(|c| c.fingerprint_sha256.clone());
    let principal = match &security.directory {
        None => Principal { tenant: security.open_tenant.clone(), actor: Actor::Anonymous, role: Role::Owner },
        Some(dir) => {
            let found = match (bearer(req.headers()), &cert) {
                (Some(credential), _) => dir.authenticate(credential, cert.as_deref()).await,
                // Mutual TLS: a certificate bound to a key stands for it.
                (None, Some(fingerprint)) => dir.authenticate_certificate(fingerprint).await,
                (None, None) => {
                    return ApiError::new(
                        "unauthenticated",
                        "no credentials: send `Authorization: Bearer <API key or session token>`",
                    )
                    .into_response();
                }
            };
            match found {
                Ok(p) => p,
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
    };
    let trace = req.extensions().get::<TraceContext>();
    if let Some(t) = trace {
        t.record_tenant(&principal.tenant);
    }
    let trace_id = trace.map(|t| t.trace_id.to_string());
    let method = req.method().clone();
    let target = req.uri().path().to_string();
    let source_ip = peer.map(|p| p.addr.ip().to_string());
    let audit = |status: u16| AuditRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: principal.tenant.clone(),
        at_ms: sluice_auth::now_ms(),
        actor: principal.label(),
        role: Some(principal.role.as_str().to_string()),
        action: format!("{method} {}", route.as_deref().unwrap_or("")),
        target: target.clone(),
        status,
        source_ip: source_ip.clone(),
        trace_id: trace_id.clone(),
    };
    if let Need::Perm(perm) = need {
        if !principal.can(perm) {
            security.auditor.record(audit(403));
            return ApiError::new(
                "forbidden",
                format!("the role {} does not allow this ({} permission needed)", principal.role, perm_name(perm)),
            )
            .with_details(json!({"role": principal.role.as_str(), "needs": perm_name(perm)}))
            .into_response();
        }
    }
    let rate = match security.limiter.check(&principal) {
        Ok(state) => state,
        Err(limited) => {
            security.auditor.record(audit(429));
            let secs = limited.retry_after_secs();
            let mut resp = ApiError::new(
                "rate_limited",
                format!(
                    "rate limit of {} reached ({} quota); retry in {secs} s",
                    String::from(limited.quota),
                    limited.scope
                ),
            )
            .with_details(json!({"scope": limited.scope, "retry_after_s": secs}))
            .into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            rate_headers(resp.headers_mut(), limited.quota, 0, secs);
            return resp;
        }
    };
    req.extensions_mut().insert(principal.clone());
    let mut resp = next.run(req).await;
    if let Some(state) = rate {
        rate_headers(resp.headers_mut(), state.quota, state.remaining, state.reset_secs);
    }
    if method != Method::GET {
        security.auditor.record(audit(resp.status().as_u16()));
    }
    resp
}

/// The `RateLimit-*` headers of the tightest quota a request met.
fn rate_headers(h: &mut HeaderMap, quota: Quota, remaining: u32, reset_secs: u64) {
    if let Ok(v) = HeaderValue::from_str(&quota.policy()) {
        h.insert("ratelimit-policy", v);
    }
    h.insert("ratelimit-limit", HeaderValue::from(quota.requests));
    h.insert("ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("ratelimit-reset", HeaderValue::from(reset_secs));
}
