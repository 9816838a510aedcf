//! Sharing of workflows with users, keys and roles, and the checks every workflow and execution
//! handler makes with it. A workflow the caller does not reach answers 404, as one that does not
//! exist; one they reach below what the call needs answers 403. An execution is reached through
//! its workflow and the workflows of its ancestors; a private one only by its owner and the
//! tenant's owners and admins (404 to everyone else).

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_auth::{Access, Actor, Grant, Perm, Principal, Sharing, Visibility};
use sluice_engine::Error as EngineError;
use sluice_store::{ExecutionRow, Sight};

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

/// Checks that `p` reaches `workflow` (and each of `scope`) to `need`: not at all answers
/// `not_found`, not far enough 403.
async fn require(
    app: &AppState,
    p: &Principal,
    workflow: &str,
    scope: &[String],
    need: Access,
    not_found: impl FnOnce() -> ApiError,
) -> Result<(), ApiError> {
    let shares = &app.security.shares;
    let have = if scope.is_empty() {
        shares.access(p, workflow).await?
    } else {
        shares.access_all(p, std::iter::once(workflow).chain(scope.iter().map(String::as_str))).await?
    };
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
    require(app, p, workflow, &[], need, || workflow_not_found(workflow)).await
}

/// Whether `p` reaches every execution of its tenant, private ones and those of restricted
/// workflows included: the tenant's owners and admins.
fn reaches_all(p: &Principal) -> bool {
    p.can(Perm::Manage)
}

/// The owner of an execution `p` starts: `user:<email>` or `key:<id>`; none on a server without
/// authentication.
pub fn owner_of(p: &Principal) -> Option<String> {
    match p.actor {
        Actor::Anonymous => None,
        _ => Some(p.label()),
    }
}

/// Checks an execution row already read: a private run answers "not found" to all but its owner,
/// owners and admins; then its workflow and its ancestors' decide.
pub async fn require_row(app: &AppState, p: &Principal, row: &ExecutionRow, need: Access) -> Result<(), ApiError> {
    let not_found = || execution_not_found(&row.workflow_id);
    if row.access.visibility == Visibility::Private && !reaches_all(p) && row.access.owner != owner_of(p) {
        return Err(not_found());
    }
    require(app, p, &row.workflow, &row.access.scope, need, not_found).await
}

/// Checks that `p` reaches the execution `workflow_id` (its latest run) to `need`. Costs nothing
/// for the tenant's owners and admins; otherwise one read of the execution.
pub async fn require_execution(app: &AppState, p: &Principal, workflow_id: &str, need: Access) -> Result<(), ApiError> {
    if reaches_all(p) {
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

/// What `p` sees of its tenant's executions: for listings, and for the workflow ids it may start
/// under.
pub async fn sight(app: &AppState, p: &Principal) -> Result<Sight, ApiError> {
    if reaches_all(p) {
        return Ok(Sight::default());
    }
    Ok(Sight { hidden_workflows: hidden(app, p).await?, viewer: Some(owner_of(p).unwrap_or_else(|| p.label())) })
}

fn view(name: &str, s: &Sharing) -> Value {
    json!({
        "workflow": name,
        "restricted": s.restricted,
        "created_by": s.created_by,
        "grants": s.grants,
        "visibility": s.visibility.as_str(),
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
    /// The visibility of executions started without one; unchanged when absent.
    #[serde(default)]
    visibility: Option<String>,
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
    let visibility = match body.visibility.as_deref() {
        Some(v) => parse_visibility(v)?,
        None => app.security.shares.get(&p.tenant, &name).await?.0.visibility,
    };
    let sharing = app.security.shares.set(&p, &name, body.restricted, body.grants, visibility).await?;
    tracing::info!(workflow = %name, restricted = sharing.restricted, grants = sharing.grants.len(), "sharing changed");
    Ok(Json(view(&name, &sharing)))
}

/// Reads a `visibility` field: `tenant` or `private`.
pub fn parse_visibility(v: &str) -> Result<Visibility, ApiError> {
    Visibility::parse(v)
        .ok_or_else(|| ApiError::invalid("visibility", format!("expected `tenant` or `private`, got `{v}`")))
}
