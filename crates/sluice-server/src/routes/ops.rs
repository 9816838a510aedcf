//! Health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use sluice_auth::Principal;
use sluice_store::StoreError;

use crate::error::ApiError;
use crate::{AppState, MetricsAccess};

/// The OpenAPI document of the whole API.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the store answers (and, on SQLite, its file is still the one opened).
pub async fn readyz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match app.engine.store().ping().await {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        // A reason that names no host or address: said to whoever asks.
        Err(StoreError::Unavailable(reason)) if reason.starts_with("the database file") => {
            tracing::warn!(%reason, "not ready");
            Err(ApiError::new("storage_unavailable", format!("not ready: {reason}"))
                .with_details(json!({"reason": reason})))
        }
        Err(e) => Err(sluice_engine::Error::from(e).into()),
    }
}

/// `/metrics` on the API's listener: see [`MetricsAccess`].
pub async fn metrics(State(app): State<AppState>, principal: Option<Extension<Principal>>) -> Response {
    let tenant = match (app.metrics_access, principal) {
        (MetricsAccess::Public, _) => None,
        (MetricsAccess::Admin, Some(Extension(p))) => Some(p.tenant),
        (MetricsAccess::Elsewhere, _) | (MetricsAccess::Admin, None) => {
            return ApiError::new(
                "not_found",
                "this server serves its metrics on its metrics listener (--metrics-addr), not here",
            )
            .into_response()
        }
    };
    render(&app, tenant.as_deref()).await
}

/// `/metrics` on the metrics listener: every series.
pub async fn metrics_of_node(State(app): State<AppState>) -> Response {
    render(&app, None).await
}

/// The metrics; with `tenant`, the queue series of that tenant only.
async fn render(app: &AppState, tenant: Option<&str>) -> Response {
    let mut depths = app.engine.queue_depths().await;
    if let Some(tenant) = tenant {
        depths.retain(|(t, ..)| t == tenant);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics.render(&app.engine, &depths, app.gateway.as_deref(), app.tls.as_ref(), &app.connections),
    )
        .into_response()
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
