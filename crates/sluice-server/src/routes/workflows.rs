//! Publishing and reading workflow definitions.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::def::{parse_definition, Format};

use sluice_auth::Access;

use crate::auth::Caller;
use crate::body::Body;
use crate::error::ApiError;
use crate::routes::sharing::{hidden, require_workflow};
use crate::AppState;

#[derive(Deserialize)]
pub struct PublishQuery {
    /// `yaml` or `json`; otherwise taken from Content-Type, else detected.
    format: Option<String>,
}

pub async fn publish(
    State(app): State<AppState>,
    Caller(p): Caller,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let format = match q.format.as_deref() {
        Some("yaml") => Format::Yaml,
        Some("json") => Format::Json,
        Some(other) => return Err(ApiError::invalid("format", format!("expected `yaml` or `json`, got `{other}`"))),
        None if ctype.contains("json") => Format::Json,
        None if ctype.contains("yaml") => Format::Yaml,
        None => Format::Auto,
    };
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::new("invalid_request", "definition is not UTF-8 text"))?;
    if text.contains('\0') {
        return Err(ApiError::invalid("definition", "must not contain the NUL character"));
    }
    let def = parse_definition(text, format).map_err(sluice_engine::Error::InvalidDefinition)?;
    require_workflow(&app, &p, &def.name, Access::Edit).await?;
    let store = app.engine.store();
    let is_new = store.get_workflow(&p.tenant, &def.name, None).await.map_err(sluice_engine::Error::from)?.is_none();
    let published = app.engine.publish(&p.tenant, def).await?;
    if is_new {
        // Its creator may restrict it later; the workflow is published either way.
        if let Err(e) = app.security.shares.record_creator(&p, &published.name).await {
            tracing::warn!(workflow = %published.name, error = %e, "cannot record the workflow's creator");
        }
    }
    tracing::info!(workflow = %published.name, version = %published.version, created = published.created, "workflow published");
    let status = if published.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!(published))))
}

pub async fn list(State(app): State<AppState>, Caller(p): Caller) -> Result<Json<Value>, ApiError> {
    let mut list = app.engine.store().list_workflows(&p.tenant).await.map_err(sluice_engine::Error::from)?;
    let hidden = hidden(&app, &p).await?;
    list.retain(|w| !hidden.contains(&w.name));
    Ok(Json(json!({ "workflows": list })))
}

pub async fn get(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_workflow(&app, &p, &name, Access::View).await?;
    let versions = app.engine.store().list_versions(&p.tenant, &name).await.map_err(sluice_engine::Error::from)?;
    let Some(latest) = versions.first() else {
        return Err(sluice_engine::Error::NotFound { what: "workflow", id: name }.into());
    };
    let definition: Value = serde_json::from_str(&latest.definition).unwrap_or(Value::Null);
    let versions: Vec<Value> =
        versions.iter().map(|v| json!({"version": v.version, "created_at_ms": v.created_at_ms})).collect();
    Ok(Json(json!({"name": name, "latest_version": latest.version, "definition": definition, "versions": versions})))
}

pub async fn get_version(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require_workflow(&app, &p, &name, Access::View).await?;
    let row = app
        .engine
        .store()
        .get_workflow(&p.tenant, &name, Some(&version))
        .await
        .map_err(sluice_engine::Error::from)?
        .ok_or_else(|| sluice_engine::Error::NotFound { what: "workflow", id: format!("{name}@{version}") })?;
    let definition: Value = serde_json::from_str(&row.definition).unwrap_or(Value::Null);
    Ok(Json(
        json!({"name": row.name, "version": row.version, "created_at_ms": row.created_at_ms, "definition": definition}),
    ))
}

/// The JSON Schema of workflow files.
pub async fn schema() -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "application/schema+json")], sluice_core::schema::workflow_schema())
}
