//! OIDC login: `GET /v1/auth/oidc/login` sends the browser to the issuer; the issuer sends it
//! back to `GET /v1/auth/oidc/callback`, which answers with a session token like
//! `POST /v1/auth/login`. Both are public; every callback is audited.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, Extensions, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sluice_auth::oidc::{Error as OidcError, Oidc};
use sluice_store::AuditRow;

use crate::error::ApiError;
use crate::trace::TraceContext;
use crate::{AppState, Peer};

fn oidc(app: &AppState) -> Result<Arc<Oidc>, ApiError> {
    app.security.oidc.clone().ok_or_else(|| {
        ApiError::new(
            "oidc_not_configured",
            "OIDC login is not configured on this server; start it with --oidc FILE (see docs/security.md)",
        )
    })
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub async fn login(State(app): State<AppState>) -> Result<Response, ApiError> {
    let url = oidc(&app)?.begin().await?;
    let location = HeaderValue::from_str(&url)
        .map_err(|_| ApiError::from(OidcError::Provider("the authorization URL is not a valid header".into())))?;
    Ok(no_store((StatusCode::FOUND, [(header::LOCATION, location)]).into_response()))
}

/// What the issuer appends to the redirect URI (RFC 6749 §4.1.2, RFC 9207 for `iss`). Other
/// parameters (`session_state`, `scope`, ...) are ignored.
#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    iss: Option<String>,
}

pub async fn callback(
    State(app): State<AppState>,
    ext: Extensions,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    let oidc = oidc(&app)?;
    let dir = app.security.directory.clone().ok_or_else(|| {
        ApiError::new("auth_disabled", "authentication is off on this server (--insecure-no-auth): there are no users")
    })?;
    let state = q.state.as_deref();
    let (email, result) = match (&q.error, &q.iss) {
        (Some(error), _) => (None, Err(oidc.refused(state, error, q.error_description.as_deref()))),
        // Answers of another issuer are not for this login (a mix-up attack).
        (None, Some(iss)) if *iss != oidc.config().issuer => (
            None,
            Err(OidcError::State(format!(
                "the callback comes from the issuer {iss:?}, not the configured {:?}",
                oidc.config().issuer
            ))),
        ),
        _ => {
            let attempt = oidc.finish(&dir, q.code.as_deref(), state).await;
            (attempt.email, attempt.result)
        }
    };
    let status = match &result {
        Ok(_) => 200,
        Err(e) => crate::error::status_of(ApiError::from(e.clone()).code).as_u16(),
    };
    let role = result.as_ref().ok().map(|l| l.role.as_str().to_string());
    app.security.auditor.record(AuditRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: oidc.config().tenant.clone(),
        at_ms: sluice_auth::now_ms(),
        actor: email.map_or_else(|| "oidc".to_string(), |e| format!("user:{e}")),
        role,
        action: "auth.oidc".into(),
        target: "/v1/auth/oidc/callback".into(),
        status,
        source_ip: ext.get::<ConnectInfo<Peer>>().map(|c| c.0.addr.ip().to_string()),
        trace_id: ext.get::<TraceContext>().map(|t| t.trace_id.to_string()),
    });
    let login = result?;
    Ok(no_store(
        Json(json!({
            "token": login.token,
            "token_type": "Bearer",
            "expires_at_ms": login.expires_at_ms,
            "tenant": login.tenant,
            "email": login.email,
            "role": login.role.as_str(),
            "created": login.created,
        }))
        .into_response(),
    ))
}
