//! The API's one table of error codes: each maps to an HTTP status and a stable name, and is
//! returned as `{"error": {"code", "message", "details"}}`. A 5xx never shows internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sluice_auth::oidc::Error as OidcError;
use sluice_auth::AuthError;
use sluice_engine::Error as EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

/// `(code, status)`: the stable names clients can match on.
pub const CODES: &[(&str, u16)] = &[
    ("invalid_json", 400),
    ("invalid_request", 400),
    ("oidc_invalid_state", 400),
    ("upstream_rejected", 400),
    ("unauthenticated", 401),
    ("invalid_credentials", 401),
    ("oidc_refused", 401),
    ("invalid_id_token", 401),
    ("budget_exceeded", 402),
    ("forbidden", 403),
    ("not_found", 404),
    ("workflow_not_found", 404),
    ("execution_not_found", 404),
    ("query_not_found", 404),
    ("task_not_found", 404),
    ("gateway_not_configured", 404),
    ("auth_disabled", 404),
    ("oidc_not_configured", 404),
    ("route_not_found", 404),
    ("method_not_allowed", 405),
    ("execution_not_running", 409),
    ("conflict", 409),
    ("payload_too_large", 413),
    ("unsupported_media_type", 415),
    ("invalid_definition", 422),
    ("rate_limited", 429),
    ("concurrency_limited", 429),
    ("too_many_queues", 429),
    ("internal", 500),
    ("upstream_failed", 502),
    ("invalid_output", 502),
    ("identity_provider_failed", 502),
    ("upstream_unavailable", 503),
    ("storage_unavailable", 503),
];

pub fn status_of(code: &str) -> StatusCode {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .and_then(|(_, s)| StatusCode::from_u16(*s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), details: Value::Null }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// For routes of the AI gateway on a server started without one.
    pub fn gateway_not_configured() -> Self {
        Self::new(
            "gateway_not_configured",
            "the AI gateway is not configured; start the server with --gateway FILE (see docs/ai-gateway.md)",
        )
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new("invalid_request", format!("{field}: {}", message.into())).with_details(json!({"field": field}))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound { what, ref id } => {
                let code = match what {
                    "workflow" => "workflow_not_found",
                    "execution" => "execution_not_found",
                    "query" => "query_not_found",
                    _ => "not_found",
                };
                Self::new(code, e.to_string()).with_details(json!({"id": id}))
            }
            EngineError::InvalidDefinition(errors) => Self::new(
                "invalid_definition",
                format!(
                    "the workflow definition has {} problem(s): {}",
                    errors.len(),
                    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
                ),
            )
            .with_details(json!({"errors": errors})),
            EngineError::InvalidInput { ref field, .. } => {
                let field = field.clone();
                Self::new("invalid_request", e.to_string()).with_details(json!({"field": field}))
            }
            EngineError::NotRunning(_) => Self::new("execution_not_running", e.to_string()),
            EngineError::TaskNotFound(_) => Self::new("task_not_found", e.to_string()),
            EngineError::Conflict(_) => Self::new("conflict", e.to_string()),
            EngineError::ConcurrencyLimited { scope, ref name, limit, running } => {
                let details =
                    json!({"scope": scope, "name": name, "limit": limit, "running": running, "retry_after_s": 1});
                Self::new("concurrency_limited", e.to_string()).with_details(details)
            }
            EngineError::TooLarge { size, limit, setting, .. } => Self::new("payload_too_large", e.to_string())
                .with_details(json!({"size": size, "limit": limit, "setting": setting})),
            EngineError::TooManyQueues { limit } => {
                Self::new("too_many_queues", e.to_string()).with_details(json!({"limit": limit, "retry_after_s": 10}))
            }
            EngineError::Unavailable(ref cause) => {
                tracing::warn!(cause = %cause, "storage unavailable");
                Self::new("storage_unavailable", "storage is unavailable, retry shortly")
            }
            EngineError::Internal(ref cause) => {
                tracing::error!(cause = %cause, "internal error");
                Self::new("internal", "internal error; the cause is in the server log")
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => Self::new("unauthenticated", m),
            AuthError::InvalidCredentials(_) => Self::new("invalid_credentials", e.to_string()),
            AuthError::Forbidden(m) => Self::new("forbidden", m),
            AuthError::Invalid { ref field, .. } => {
                let field = field.clone();
                Self::new("invalid_request", e.to_string()).with_details(json!({"field": field}))
            }
            AuthError::Conflict(m) => Self::new("conflict", m),
            AuthError::NotFound(m) => Self::new("not_found", m),
            AuthError::Unavailable(ref cause) => {
                tracing::warn!(cause = %cause, "storage unavailable");
                Self::new("storage_unavailable", "storage is unavailable, retry shortly")
            }
            AuthError::Internal(ref cause) => {
                tracing::error!(cause = %cause, "internal error");
                Self::new("internal", "internal error; the cause is in the server log")
            }
        }
    }
}

impl From<OidcError> for ApiError {
    fn from(e: OidcError) -> Self {
        match e {
            OidcError::State(m) => Self::new("oidc_invalid_state", m),
            OidcError::Refused(m) => Self::new("oidc_refused", m),
            OidcError::Token(t) => Self::new("invalid_id_token", t.to_string()),
            OidcError::Forbidden(m) => Self::new("forbidden", m),
            OidcError::Busy => Self::new("rate_limited", e.to_string()).with_details(json!({"retry_after_s": 60})),
            OidcError::Provider(ref cause) => {
                tracing::warn!(cause = %cause, "identity provider failed");
                Self::new(
                    "identity_provider_failed",
                    "the identity provider could not be reached or answered wrongly; the cause is in the server log",
                )
            }
            OidcError::Directory(a) => a.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.code);
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if !self.details.is_null() {
            body["error"]["details"] = self.details;
        }
        let mut resp = (status, axum::Json(body)).into_response();
        if self.code == "too_many_queues" {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        } else if status == StatusCode::SERVICE_UNAVAILABLE || self.code == "concurrency_limited" {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sluice\""));
        }
        resp
    }
}
