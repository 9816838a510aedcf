//! Identity: logging in, who am I, users and API keys of the caller's tenant, and the audit log.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_auth::{Actor, AuthError, Directory, LoginFailure, NewApiKey, NewUser, Principal, Role};
use sluice_store::{AuditFilter, AuditRow};

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::routes::executions::MAX_PAGE;
use crate::trace::TraceContext;
use crate::{AppState, Peer};

fn directory(app: &AppState) -> Result<Arc<Directory>, ApiError> {
    app.security.directory.clone().ok_or_else(|| {
        ApiError::new(
            "auth_disabled",
            "authentication is off on this server (--insecure-no-auth): there are no users or keys",
        )
    })
}

fn role_of(field: &str, s: &str) -> Result<Role, ApiError> {
    Role::parse(s).ok_or_else(|| {
        ApiError::invalid(field, format!("unknown role {s:?}; expected owner, admin, editor, viewer or worker"))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    tenant: String,
    email: String,
    password: String,
}

pub async fn login(
    State(app): State<AppState>,
    ext: Extensions,
    JsonBody(b): JsonBody<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    let dir = directory(&app)?;
    // Guessing is slowed per account (tenant and email), whatever the answer. Names that cannot
    // be a tenant or an email share one bucket each, so made-up text cannot grow the limiter.
    let tenant = if sluice_auth::check_tenant_id(&b.tenant).is_ok() { b.tenant.clone() } else { "?".into() };
    let email = sluice_auth::check_email(&b.email).unwrap_or_else(|_| "?".into());
    let who = Principal { tenant, actor: Actor::User { email }, role: Role::Viewer };
    if let Err(limited) = app.security.login_limiter.check(&who) {
        return Err(ApiError::new(
            "rate_limited",
            format!("too many login attempts for this account; retry in {} s", limited.retry_after_secs()),
        )
        .with_details(json!({"retry_after_s": limited.retry_after_secs()})));
    }
    let source_ip = ext.get::<ConnectInfo<Peer>>().map(|c| c.0.addr.ip().to_string());
    let trace_id = ext.get::<TraceContext>().map(|t| t.trace_id.to_string());
    let result = dir.login(&b.tenant, &b.email, &b.password).await;
    // A tenant's audit log records logins of its real users only: what an anonymous caller
    // names (a tenant, an email) never becomes a row there. The rest goes to the server's log.
    let row = |user: &str, role: Option<Role>, status: u16| AuditRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: b.tenant.clone(),
        at_ms: sluice_auth::now_ms(),
        actor: format!("user:{user}"),
        role: role.map(|r| r.as_str().to_string()),
        action: "auth.login".into(),
        target: "/v1/auth/login".into(),
        status,
        source_ip: source_ip.clone(),
        trace_id: trace_id.clone(),
    };
    let source = source_ip.as_deref().unwrap_or("unknown");
    match &result {
        Ok(session) => app.security.auditor.record(row(&session.user.email, Some(session.user.role), 200)),
        Err(AuthError::InvalidCredentials(LoginFailure::WrongPassword)) => {
            app.security.auditor.record(row(who.user().unwrap_or_default(), None, 401));
        }
        Err(AuthError::InvalidCredentials(LoginFailure::UnknownUser)) => {
            tracing::warn!(tenant = %b.tenant, email = ?clip(&b.email), source_ip = source, "failed login: no such user in the tenant");
        }
        Err(AuthError::InvalidCredentials(LoginFailure::UnknownTenant)) => {
            tracing::warn!(tenant = ?clip(&b.tenant), email = ?clip(&b.email), source_ip = source, "failed login: no such tenant");
        }
        Err(_) => {}
    }
    let session = result?;
    Ok(Json(json!({"token": session.token, "token_type": "Bearer", "expires_at_ms": session.expires_at_ms})))
}

/// At most 100 characters of what a caller sent, for a log line.
fn clip(s: &str) -> &str {
    s.char_indices().nth(100).map_or(s, |(i, _)| &s[..i])
}

pub async fn whoami(Caller(p): Caller) -> Json<Value> {
    let (kind, id) = match &p.actor {
        Actor::User { email } => ("user", email.clone()),
        Actor::ApiKey { id, .. } => ("api_key", id.clone()),
        Actor::Anonymous => ("anonymous", String::new()),
    };
    Json(json!({"tenant": p.tenant, "actor": {"kind": kind, "id": id}, "role": p.role.as_str()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUserBody {
    email: String,
    #[serde(default)]
    password: Option<String>,
    role: String,
}

pub async fn create_user(
    State(app): State<AppState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<NewUserBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role = role_of("role", &b.role)?;
    let user = directory(&app)?
        .create_user(&p.tenant, Some(&p), NewUser { email: b.email, password: b.password, role })
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"user": user}))))
}

pub async fn list_users(State(app): State<AppState>, Caller(p): Caller) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"users": directory(&app)?.list_users(&p.tenant).await?})))
}

pub async fn delete_user(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(email): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let deleted = directory(&app)?.delete_user(&p.tenant, &p, &email).await?;
    Ok(Json(json!({"deleted": deleted})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyBody {
    name: String,
    role: String,
    /// Seconds until the key stops working; none: it works until revoked.
    #[serde(default)]
    expires_in_s: Option<u64>,
    /// Bind the key to a client certificate (SHA-256 of its DER, hex): over mutual TLS the
    /// certificate alone authenticates as the key, and the key works only with it. The request
    /// must come over a connection that presents this certificate.
    #[serde(default)]
    client_cert_sha256: Option<String>,
}

pub async fn create_key(
    State(app): State<AppState>,
    Caller(p): Caller,
    ext: Extensions,
    JsonBody(b): JsonBody<NewKeyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role = role_of("role", &b.role)?;
    if b.expires_in_s == Some(0) || b.expires_in_s.is_some_and(|s| s > 10 * 365 * 86_400) {
        return Err(ApiError::invalid("expires_in_s", "expected 1 second to 10 years"));
    }
    let new = NewApiKey {
        name: b.name,
        role,
        expires_in: b.expires_in_s.map(Duration::from_secs),
        client_cert_sha256: b.client_cert_sha256,
        presented_cert_sha256: ext
            .get::<ConnectInfo<Peer>>()
            .and_then(|c| c.0.client_cert.as_ref().map(|cert| cert.fingerprint_sha256.clone())),
    };
    let (view, key) = directory(&app)?.create_api_key(&p.tenant, Some(&p), new).await?;
    Ok((StatusCode::CREATED, Json(json!({"api_key": view, "key": key, "note": "the key is shown only now; store it"}))))
}

pub async fn list_keys(State(app): State<AppState>, Caller(p): Caller) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"api_keys": directory(&app)?.list_api_keys(&p.tenant).await?})))
}

pub async fn revoke_key(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"api_key": directory(&app)?.revoke_api_key(&p.tenant, &p, &id).await?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    actor: Option<String>,
    since_ms: Option<i64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

pub async fn audit(
    State(app): State<AppState>,
    Caller(p): Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid("limit", format!("expected 1 to {MAX_PAGE}, got {limit}")));
    }
    // What this node recorded so far is in the answer.
    app.security.auditor.flush().await;
    let filter = AuditFilter { actor: q.actor, since_ms: q.since_ms, cursor: q.cursor, limit };
    let page = app.engine.store().list_audit(&p.tenant, filter).await.map_err(sluice_engine::Error::from)?;
    Ok(Json(json!({"entries": page.items, "next_cursor": page.next_cursor})))
}
