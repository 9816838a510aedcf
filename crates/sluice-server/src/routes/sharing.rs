//! Sharing of workflows with users, keys and roles, and the checks every workflow and execution
//! handler makes with it. A workflow the caller does not reach answers 404, as one that does not
//! exist; one they reach below what the call needs answers 403.

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_auth::{Access, Grant, Principal, Sharing};
use sluice_engine::Error as EngineError;
use sluice_store::ExecutionRow;

use crate::auth::Caller;
use crate::body::{parse_json, Body};
use crate::error::ApiError;
use crate::AppState;

fn workflow_not_found(name: &str) -> ApiError {
    EngineError::NotFound { what: "workflow", id: name.to_string() }.into()
}

fn execution_not_found(id: &str) -> ApiError {
    EngineError::NotFound { what: "execution", id: id.to_string() }.into()
}

/// Checks that `p` reaches `workflow` to `need`: not at all answers `not_found`, not far enough 403.
async fn require(
    app: &AppState,
    p: &Principal,
    workflow: &str,
    need: Access,
    not_found: impl FnOnce() -> ApiError,
) -> Result<(), ApiError> {
    let have = app.security.shares.access(p, workflow).await?;
    if have == Access::None {
        return Err(not_found());
    }
    if have < need {
        return Err(ApiError::new(
            "forbidden",
            format!("the workflow `{workflow}` is shared with you to {have}; this needs {need}"),
        )
        .with_details(json!({"workflow": workflow, "access": have.as_str(), "needed": need.as_str()})));
    }
    Ok(())
}

/// Checks that `p` reaches `workflow` to `need`; a workflow they do not reach at all is "not found".
pub async fn require_workflow(app: &AppState, p: &Principal, workflow: &str, need: Access) -> Result<(), ApiError> {
    require(app, p, workflow, need, || workflow_not_found(workflow)).await
}

/// Checks an execution row already read: its workflow decides.
pub async fn require_row(app: &AppState, p: &Principal, row: &ExecutionRow, need: Access) -> Result<(), ApiError> {
    require(app, p, &row.workflow, need, || execution_not_found(&row.workflow_id)).await
}

/// Checks that `p` reaches the execution `workflow_id` to `need`. Costs nothing while no workflow
/// of the tenant is restricted; otherwise one read of the execution.
pub async fn require_execution(app: &AppState, p: &Principal, workflow_id: &str, need: Access) -> Result<(), ApiError> {
    if !app.security.shares.any_restricted(&p.tenant).await? {
        return Ok(());
    }
    match app.engine.store().get_execution(&p.tenant, workflow_id, None).await.map_err(EngineError::from)? {
        Some(row) => require_row(app, p, &row, need).await,
        // The handler answers for executions that do not exist.
        None => Ok(()),
    }
}

/// The workflows `p` does not reach, to leave out of listings.
pub async fn hidden(app: &AppState, p: &Principal) -> Result<Vec<String>, ApiError> {
    Ok(app.security.shares.hidden(p).await?)
}

fn view(name: &str, s: &Sharing) -> Value {
    json!({
        "workflow": name,
        "restricted": s.restricted,
        "created_by": s.created_by,
        "grants": s.grants,
        "updated_by": s.updated_by,
        "updated_at_ms": s.updated_at_ms,
    })
}

async fn exists(app: &AppState, tenant: &str, name: &str) -> Result<bool, ApiError> {
    let found = app.engine.store().get_workflow(tenant, name, None).await.map_err(EngineError::from)?;
    Ok(found.is_some())
}

/// `GET /v1/workflows/{name}/sharing`
pub async fn get(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_workflow(&app, &p, &name, Access::View).await?;
    if !exists(&app, &p.tenant, &name).await? {
        return Err(workflow_not_found(&name));
    }
    let (sharing, _) = app.security.shares.get(&p.tenant, &name).await?;
    Ok(Json(view(&name, &sharing)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingBody {
    restricted: bool,
    #[serde(default)]
    grants: Vec<Grant>,
}

/// `PUT /v1/workflows/{name}/sharing`: replaces who the workflow is shared with.
pub async fn put(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    // The workflow first: another tenant's name is 404 whatever the body says.
    require_workflow(&app, &p, &name, Access::View).await?;
    if !exists(&app, &p.tenant, &name).await? {
        return Err(workflow_not_found(&name));
    }
    let body: SharingBody = parse_json(&body)?;
    let sharing = app.security.shares.set(&p, &name, body.restricted, body.grants).await?;
    tracing::info!(workflow = %name, restricted = sharing.restricted, grants = sharing.grants.len(), "sharing changed");
    Ok(Json(view(&name, &sharing)))
}
