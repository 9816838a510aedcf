//! Health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// The OpenAPI document of the whole API.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the store answers.
pub async fn readyz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    app.engine.store().ping().await.map_err(sluice_engine::Error::from)?;
    Ok(Json(json!({"status": "ready"})))
}

pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let depths = app.engine.queue_depths().await;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics.render(&app.engine, &depths, app.gateway.as_deref(), app.tls.as_ref()),
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
