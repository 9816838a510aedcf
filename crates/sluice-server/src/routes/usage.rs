//! The usage ledger and budgets of the AI gateway: `GET /v1/usage` lists what every call cost,
//! `GET /v1/budgets` shows each budget's spend in its current period and the alerts raised.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_engine::{now_ms, Error as EngineError};
use sluice_store::{UsageFilter, UsageRow};

use super::executions::MAX_PAGE;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    run_id: Option<String>,
    /// The latest run of this workflow id.
    workflow_id: Option<String>,
    api_key: Option<String>,
    since_ms: Option<i64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn usage_json(u: &UsageRow) -> Value {
    json!({
        "id": u.id,
        "at_ms": u.at_ms,
        "api_key": u.api_key,
        "source": u.source,
        "route": u.route,
        "target": u.target,
        "provider": u.provider,
        "model": u.model,
        "attempt": u.attempt,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cost_usd": u.cost_usd,
        "latency_us": u.latency_us,
        "outcome": u.outcome,
        "experiment": u.experiment,
        "arm": u.arm,
        "run_id": u.run_id,
        "workflow_id": u.workflow_id,
        "step": u.step,
    })
}

pub async fn list(
    State(app): State<AppState>,
    Caller(p): Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid("limit", format!("expected 1 to {MAX_PAGE}, got {limit}")));
    }
    let run_id = match (q.run_id, q.workflow_id) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("workflow_id", "give `run_id` or `workflow_id`, not both")),
        (Some(run), None) => Some(run),
        (None, Some(wid)) => Some(app.engine.get_execution(&p.tenant, &wid, None).await?.run_id),
        (None, None) => None,
    };
    // Chat calls queue their rows: what was answered before this request is listed.
    app.engine.flush_usage().await?;
    let filter = UsageFilter { run_id, api_key: q.api_key, since_ms: q.since_ms, cursor: q.cursor, limit };
    let page = app.engine.store().list_usage(&p.tenant, filter).await.map_err(EngineError::from)?;
    let items: Vec<Value> = page.items.iter().map(usage_json).collect();
    Ok(Json(json!({"usage": items, "next_cursor": page.next_cursor})))
}

/// Every budget of the tenant with its spend in the current period, read from the ledger, and
/// the alerts raised so far.
pub async fn budgets(State(app): State<AppState>, Caller(p): Caller) -> Result<Json<Value>, ApiError> {
    let Some(gateway) = app.gateway.clone() else {
        return Err(ApiError::gateway_not_configured());
    };
    app.engine.flush_usage().await?;
    let now = now_ms();
    let store = app.engine.store();
    let mut budgets = Vec::new();
    for b in gateway.budgets().list().iter().filter(|b| b.tenant == p.tenant) {
        let since = b.period.start_ms(now);
        let total = store.usage_total(&b.tenant, b.key.as_deref(), since).await.map_err(EngineError::from)?;
        budgets.push(json!({
            "name": b.name,
            "key": b.key,
            "period": b.period.as_str(),
            "period_start_ms": since,
            "soft_usd": b.soft_usd,
            "hard_usd": b.hard_usd,
            "spent_usd": total.cost_usd,
            "calls": total.calls,
            "input_tokens": total.input_tokens,
            "output_tokens": total.output_tokens,
        }));
    }
    let alerts = store.list_alerts(&p.tenant).await.map_err(EngineError::from)?;
    Ok(Json(json!({"budgets": budgets, "alerts": alerts})))
}
