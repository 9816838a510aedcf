//! Starting, reading, signalling and cancelling executions; the dead-letter queue.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_auth::Access;
use sluice_core::event::RunAccess;
use sluice_core::ExecStatus;
use sluice_engine::StartRequest;
use sluice_store::ExecutionFilter;

use super::execution_json;
use crate::auth::Caller;
use crate::body::{parse_json, parse_payload, Body, JsonBody};
use crate::error::ApiError;
use crate::routes::sharing::{owner_of, parse_visibility, require_execution, require_row, require_workflow, sight};
use crate::trace::TraceContext;
use crate::AppState;

/// Largest page of a list.
pub const MAX_PAGE: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    workflow: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    workflow_id: Option<String>,
    #[serde(default)]
    input: Value,
    /// `tenant` or `private`; by default the workflow's sharing says.
    #[serde(default)]
    visibility: Option<String>,
}

#[tracing::instrument(skip_all, fields(workflow = %body.workflow))]
pub async fn start(
    State(app): State<AppState>,
    Caller(p): Caller,
    Extension(trace): Extension<TraceContext>,
    JsonBody(body): JsonBody<StartBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.workflow.is_empty() {
        return Err(ApiError::invalid("workflow", "expected a workflow name"));
    }
    require_workflow(&app, &p, &body.workflow, Access::Run).await?;
    let visibility = match body.visibility.as_deref() {
        Some(v) => parse_visibility(v)?,
        None => app.security.shares.default_visibility(&p.tenant, &body.workflow).await?,
    };
    // A workflow id whose run the caller may not see is neither joined nor reused.
    let sight = match body.workflow_id {
        Some(_) => Some(sight(&app, &p).await?),
        None => None,
    };
    let started = app
        .engine
        .start_execution(
            &p.tenant,
            StartRequest {
                workflow: body.workflow,
                version: body.version,
                workflow_id: body.workflow_id,
                input: body.input,
                trace_id: Some(trace.trace_id),
                access: RunAccess { owner: owner_of(&p), visibility, scope: Vec::new() },
                sight,
            },
        )
        .await?;
    tracing::info!(workflow_id = %started.workflow_id, run_id = %started.run_id, created = started.created, "execution started");
    let status = if started.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!(started))))
}

#[derive(Deserialize)]
pub struct ListQuery {
    workflow: Option<String>,
    workflow_id: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn filter_of(q: ListQuery, dead_letter: bool) -> Result<ExecutionFilter, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(ExecStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                format!("expected running, completed, failed, cancelled or continued_as_new, got `{s}`"),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid("limit", format!("expected 1 to {MAX_PAGE}, got {limit}")));
    }
    Ok(ExecutionFilter {
        workflow: q.workflow,
        workflow_id: q.workflow_id,
        status,
        dead_letter,
        hidden_workflows: Vec::new(),
        viewer: None,
        cursor: q.cursor,
        limit,
    })
}

pub async fn list(
    State(app): State<AppState>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut filter = filter_of(q, false)?;
    let sight = sight(&app, &p).await?;
    (filter.hidden_workflows, filter.viewer) = (sight.hidden_workflows, sight.viewer);
    let page = app.engine.list_executions(&p.tenant, filter).await?;
    let items: Vec<Value> = page.items.iter().map(execution_json).collect();
    Ok(Json(json!({"executions": items, "next_cursor": page.next_cursor})))
}

pub async fn dlq(
    State(app): State<AppState>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut filter = filter_of(q, true)?;
    let sight = sight(&app, &p).await?;
    (filter.hidden_workflows, filter.viewer) = (sight.hidden_workflows, sight.viewer);
    let page = app.engine.list_executions(&p.tenant, filter).await?;
    let items: Vec<Value> = page.items.iter().map(execution_json).collect();
    Ok(Json(json!({"executions": items, "next_cursor": page.next_cursor})))
}

#[derive(Deserialize)]
pub struct RunQuery {
    run_id: Option<String>,
}

#[tracing::instrument(skip_all, fields(workflow_id = %id))]
pub async fn get(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<RunQuery>,
) -> Result<Json<Value>, ApiError> {
    let row = app.engine.get_execution(&p.tenant, &id, q.run_id.as_deref()).await?;
    require_row(&app, &p, &row, Access::View).await?;
    Ok(Json(execution_json(&row)))
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait_ms: Option<u64>,
}

#[tracing::instrument(skip_all, fields(workflow_id = %id))]
pub async fn result(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    require_execution(&app, &p, &id, Access::View).await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000));
    let row = app.engine.wait_result(&p.tenant, &id, wait).await?;
    // The id may have been started again meanwhile, by a run the caller does not see.
    require_row(&app, &p, &row, Access::View).await?;
    Ok(Json(execution_json(&row)))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    run_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// Events of a history page unless `limit` says otherwise.
pub const HISTORY_PAGE: usize = 100;
/// Most events of a history page.
pub const MAX_HISTORY_PAGE: usize = 10_000;
/// A history page ends once its events take this many bytes of JSON (it holds one event at
/// least): a page of large events stays a few megabytes.
pub const MAX_HISTORY_PAGE_BYTES: usize = 4 << 20;
/// Events read from the store at once while a page is filled.
const HISTORY_CHUNK: usize = 32;

#[tracing::instrument(skip_all, fields(workflow_id = %id))]
pub async fn history(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(HISTORY_PAGE);
    if limit == 0 || limit > MAX_HISTORY_PAGE {
        return Err(ApiError::invalid("limit", format!("expected 1 to {MAX_HISTORY_PAGE}, got {limit}")));
    }
    let after = q.after.unwrap_or(0);
    let (row, mut chunk) =
        app.engine.history(&p.tenant, &id, q.run_id.as_deref(), after, limit.min(HISTORY_CHUNK)).await?;
    require_row(&app, &p, &row, Access::View).await?;
    let mut events = Vec::new();
    let mut bytes = 0;
    let mut want = limit.min(HISTORY_CHUNK);
    let more = loop {
        let full = chunk.len() == want;
        let mut capped = false;
        for event in chunk {
            let size = json_len(&event);
            if !events.is_empty() && bytes + size > MAX_HISTORY_PAGE_BYTES {
                capped = true;
                break;
            }
            bytes += size;
            events.push(event);
        }
        if capped || events.len() >= limit {
            break true;
        }
        if !full {
            break false;
        }
        let from = events.last().map_or(after, |e| e.seq);
        want = (limit - events.len()).min(HISTORY_CHUNK);
        chunk =
            app.engine.store().history(&p.tenant, &row.run_id, from, want).await.map_err(sluice_engine::Error::from)?;
    };
    // Where the next page starts, while there may be one.
    let next_after = if more { events.last().map(|e| e.seq) } else { None };
    Ok(Json(json!({"workflow_id": row.workflow_id, "run_id": row.run_id, "events": events, "next_after": next_after})))
}

/// The length of a value's JSON, without keeping it.
fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[tracing::instrument(skip_all, fields(workflow_id = %id, signal = %name))]
pub async fn signal(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path((id, name)): Path<(String, String)>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::invalid("name", "expected a signal name of 1 to 64 characters"));
    }
    let payload: Value = if body.is_empty() { Value::Null } else { parse_payload(&body)? };
    require_execution(&app, &p, &id, Access::Run).await?;
    app.engine.signal(&p.tenant, &id, &name, payload).await?;
    tracing::info!("signal delivered");
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response())
}

#[tracing::instrument(skip_all, fields(workflow_id = %id, query = %name))]
pub async fn query(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require_execution(&app, &p, &id, Access::View).await?;
    let result = app.engine.query(&p.tenant, &id, &name).await?;
    Ok(Json(json!({"result": result})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

#[tracing::instrument(skip_all, fields(workflow_id = %id))]
pub async fn cancel(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Body(raw): Body,
) -> Result<Response, ApiError> {
    // No body, `null` and `{}` all mean "no reason given".
    let body: CancelBody = if raw.is_empty() {
        CancelBody::default()
    } else {
        parse_json::<Option<CancelBody>>(&raw)?.unwrap_or_default()
    };
    require_execution(&app, &p, &id, Access::Run).await?;
    app.engine.cancel(&p.tenant, &id, body.reason).await?;
    tracing::info!("execution cancelled");
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response())
}

#[tracing::instrument(skip_all, fields(workflow_id = %id))]
pub async fn redrive(
    State(app): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_execution(&app, &p, &id, Access::Run).await?;
    let run_id = app.engine.redrive(&p.tenant, &id).await?;
    tracing::info!(run_id = %run_id, "execution redriven");
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true, "run_id": run_id}))).into_response())
}
