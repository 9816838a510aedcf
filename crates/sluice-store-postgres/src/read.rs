//! Reads, each one statement on a pooled connection; under READ COMMITTED every read sees the
//! batches committed before it started.

use deadpool_postgres::Pool;
use sluice_core::event::{RunAccess, Visibility};
use sluice_core::Event;
use sluice_store::{
    page_limit, AuditFilter, AuditRow, BudgetAlertRow, Doc, ExecutionFilter, ExecutionRow, Page, StoreError, TaskRow,
    TimerRow, UsageFilter, UsageRow, UsageTotal, WorkflowSummary, WorkflowVersion,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::codec::{enum_from, from_i64, from_json, opt_from_json, status_from};
use crate::error::{db_err, pool_err};

type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Prepares `sql` through the connection's statement cache and runs it.
pub(crate) async fn query(pool: &Pool, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client.prepare_cached(sql).await.map_err(db_err)?;
    client.query(&st, params).await.map_err(db_err)
}

pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).map_err(db_err)
}

/// `SELECT`s the columns `exec_row` reads, followed by the rest of the query.
macro_rules! select_exec {
    ($rest:literal) => {
        concat!(
            "SELECT run_id, workflow_id, workflow, version, status, paused, dead_letter, input, output,
                    error, failed_step, parent, next_seq, created_at_ms, updated_at_ms,
                    started_by, private, scope
             FROM executions ",
            $rest
        )
    };
}

fn exec_row(r: &Row) -> Result<ExecutionRow, StoreError> {
    Ok(ExecutionRow {
        run_id: get(r, 0)?,
        workflow_id: get(r, 1)?,
        workflow: get(r, 2)?,
        version: get(r, 3)?,
        status: status_from(get(r, 4)?)?,
        paused: get(r, 5)?,
        dead_letter: get(r, 6)?,
        input: from_json(get(r, 7)?, "input")?,
        output: opt_from_json(get(r, 8)?, "output")?,
        error: opt_from_json(get(r, 9)?, "error")?,
        failed_step: get(r, 10)?,
        parent: opt_from_json(get(r, 11)?, "parent")?,
        next_seq: from_i64(get(r, 12)?, "next_seq")?,
        created_at_ms: get(r, 13)?,
        updated_at_ms: get(r, 14)?,
        access: RunAccess {
            owner: get(r, 15)?,
            visibility: if get(r, 16)? { Visibility::Private } else { Visibility::Tenant },
            scope: opt_from_json(get(r, 17)?, "scope")?.unwrap_or_default(),
        },
    })
}

fn workflow_row(r: &Row) -> Result<WorkflowVersion, StoreError> {
    Ok(WorkflowVersion { name: get(r, 0)?, version: get(r, 1)?, definition: get(r, 2)?, created_at_ms: get(r, 3)? })
}

pub(crate) async fn get_workflow(
    pool: &Pool,
    tenant: &str,
    name: &str,
    version: Option<&str>,
) -> Result<Option<WorkflowVersion>, StoreError> {
    let rows = match version {
        Some(version) => {
            query(
                pool,
                "SELECT name, version, definition, created_at_ms FROM workflows
                 WHERE tenant = $1 AND name = $2 AND version = $3",
                &[&tenant, &name, &version],
            )
            .await?
        }
        None => {
            query(
                pool,
                "SELECT name, version, definition, created_at_ms FROM workflows
                 WHERE tenant = $1 AND name = $2
                 ORDER BY created_at_ms DESC, version DESC LIMIT 1",
                &[&tenant, &name],
            )
            .await?
        }
    };
    rows.first().map(workflow_row).transpose()
}

pub(crate) async fn list_workflows(pool: &Pool, tenant: &str) -> Result<Vec<WorkflowSummary>, StoreError> {
    let rows = query(
        pool,
        "SELECT w.name,
                (SELECT l.version FROM workflows l WHERE l.tenant = $1 AND l.name = w.name
                 ORDER BY l.created_at_ms DESC, l.version DESC LIMIT 1),
                COUNT(*), MAX(w.created_at_ms)
         FROM workflows w WHERE w.tenant = $1 GROUP BY w.name ORDER BY w.name",
        &[&tenant],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WorkflowSummary {
                name: get(r, 0)?,
                latest_version: get(r, 1)?,
                versions: from_i64(get(r, 2)?, "count")?,
                updated_at_ms: get(r, 3)?,
            })
        })
        .collect()
}

pub(crate) async fn list_versions(pool: &Pool, tenant: &str, name: &str) -> Result<Vec<WorkflowVersion>, StoreError> {
    let rows = query(
        pool,
        "SELECT name, version, definition, created_at_ms FROM workflows
         WHERE tenant = $1 AND name = $2 ORDER BY created_at_ms DESC, version DESC",
        &[&tenant, &name],
    )
    .await?;
    rows.iter().map(workflow_row).collect()
}

pub(crate) async fn get_execution(
    pool: &Pool,
    tenant: &str,
    workflow_id: &str,
    run_id: Option<&str>,
) -> Result<Option<ExecutionRow>, StoreError> {
    let rows = match run_id {
        Some(run_id) => {
            query(
                pool,
                select_exec!("WHERE run_id = $1 AND tenant = $2 AND workflow_id = $3"),
                &[&run_id, &tenant, &workflow_id],
            )
            .await?
        }
        None => {
            query(
                pool,
                select_exec!("WHERE tenant = $1 AND workflow_id = $2 ORDER BY run_id DESC LIMIT 1"),
                &[&tenant, &workflow_id],
            )
            .await?
        }
    };
    rows.first().map(exec_row).transpose()
}

pub(crate) async fn get_run(pool: &Pool, tenant: &str, run_id: &str) -> Result<Option<ExecutionRow>, StoreError> {
    let rows = query(pool, select_exec!("WHERE run_id = $1 AND tenant = $2"), &[&run_id, &tenant]).await?;
    rows.first().map(exec_row).transpose()
}

/// The filters `list_executions` binds after the tenant, each NULL when unused.
macro_rules! list_filters {
    () => {
        " AND ($2::text IS NULL OR workflow = $2::text)
          AND ($3::text IS NULL OR workflow_id = $3::text)
          AND ($4::text IS NULL OR status = $4::text)
          AND (NOT $5::boolean OR dead_letter)
          AND ($6::text IS NULL OR run_id < $6::text)
          AND workflow <> ALL($8::text[])
          AND (scope IS NULL OR NOT jsonb_exists_any(scope::jsonb, $8::text[]))
          AND ($9::text IS NULL OR NOT private OR started_by = $9::text)
          ORDER BY run_id DESC LIMIT $7"
    };
}

/// Newest first; the cursor is the last run id of the previous page.
///
/// One static statement per leading index, so that a cached generic plan still walks the index
/// of the most selective filter given: the other filters are bound and may be NULL.
pub(crate) async fn list_executions(
    pool: &Pool,
    tenant: &str,
    filter: &ExecutionFilter,
) -> Result<Page<ExecutionRow>, StoreError> {
    let limit = page_limit(filter.limit);
    let sql = if filter.workflow_id.is_some() {
        concat!(select_exec!("WHERE tenant = $1 AND workflow_id = $3::text"), list_filters!())
    } else if filter.workflow.is_some() {
        concat!(select_exec!("WHERE tenant = $1 AND workflow = $2::text"), list_filters!())
    } else if filter.dead_letter {
        concat!(select_exec!("WHERE tenant = $1 AND dead_letter"), list_filters!())
    } else {
        concat!(select_exec!("WHERE tenant = $1"), list_filters!())
    };
    let status = filter.status.map(|s| s.as_str());
    // One row more than the page tells whether another page follows.
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    let rows = query(
        pool,
        sql,
        &[
            &tenant,
            &filter.workflow,
            &filter.workflow_id,
            &status,
            &filter.dead_letter,
            &filter.cursor,
            &fetch,
            &filter.hidden_workflows,
            &filter.viewer,
        ],
    )
    .await?;
    let items = rows.iter().map(exec_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_fetched(items, limit, |r| &r.run_id))
}

pub(crate) async fn owner_url(pool: &Pool, tenant: &str, run_id: &str) -> Result<Option<String>, StoreError> {
    let rows = query(
        pool,
        "SELECT n.url FROM executions x JOIN nodes n ON n.epoch = x.owner WHERE x.run_id = $1 AND x.tenant = $2",
        &[&run_id, &tenant],
    )
    .await?;
    match rows.first() {
        Some(r) => get::<Option<String>>(r, 0),
        None => Ok(None),
    }
}

pub(crate) async fn count_running(pool: &Pool, tenant: &str, workflow: Option<&str>) -> Result<u64, StoreError> {
    let rows = match workflow {
        Some(w) => {
            query(
                pool,
                "SELECT count(*) FROM executions WHERE tenant = $1 AND workflow = $2 AND status = 'running'",
                &[&tenant, &w],
            )
            .await?
        }
        None => {
            query(pool, "SELECT count(*) FROM executions WHERE tenant = $1 AND status = 'running'", &[&tenant]).await?
        }
    };
    let n: i64 = match rows.first() {
        Some(r) => get(r, 0)?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn history(
    pool: &Pool,
    tenant: &str,
    run_id: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = query(
        pool,
        "SELECT e.data FROM executions x JOIN events e ON e.run_id = x.run_id
         WHERE x.run_id = $1 AND x.tenant = $2 AND e.seq > $3
         ORDER BY e.seq LIMIT $4",
        &[&run_id, &tenant, &after, &limit],
    )
    .await?;
    rows.iter().map(|r| from_json(get(r, 0)?, "data")).collect()
}

/// The columns [`task_row`] reads, in its order, for `SELECT`s of tasks (alias `t`).
pub(crate) const TASK_COLUMNS: &str = "t.id, t.tenant, t.queue, t.kind, t.run_id, t.workflow_id, t.step, t.attempt, \
     t.input, t.visible_at_ms, t.schedule_to_start_ms, t.start_to_close_ms, t.heartbeat_ms, t.created_at_ms, t.trace_id";

/// A task row from the first 15 columns of `r` ([`TASK_COLUMNS`]).
pub(crate) fn task_row(r: &Row) -> Result<TaskRow, StoreError> {
    Ok(TaskRow {
        id: get(r, 0)?,
        tenant: get(r, 1)?,
        queue: get(r, 2)?,
        kind: enum_from(get(r, 3)?, "kind")?,
        run_id: get(r, 4)?,
        workflow_id: get(r, 5)?,
        step: get(r, 6)?,
        attempt: from_i64(get(r, 7)?, "attempt")?,
        input: from_json(get(r, 8)?, "input")?,
        visible_at_ms: get(r, 9)?,
        schedule_to_start_ms: get::<Option<i64>>(r, 10)?.map(|v| from_i64(v, "schedule_to_start_ms")).transpose()?,
        start_to_close_ms: from_i64(get(r, 11)?, "start_to_close_ms")?,
        heartbeat_ms: get::<Option<i64>>(r, 12)?.map(|v| from_i64(v, "heartbeat_ms")).transpose()?,
        created_at_ms: get(r, 13)?,
        trace_id: get(r, 14)?,
    })
}

pub(crate) async fn load_tasks(pool: &Pool) -> Result<Vec<TaskRow>, StoreError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks t ORDER BY t.visible_at_ms, t.id");
    let rows = query(pool, &sql, &[]).await?;
    rows.iter().map(task_row).collect()
}

fn timer_row(r: &Row) -> Result<TimerRow, StoreError> {
    Ok(TimerRow {
        tenant: get(r, 0)?,
        run_id: get(r, 1)?,
        workflow_id: get(r, 2)?,
        step: get(r, 3)?,
        fire_at_ms: get(r, 4)?,
    })
}

pub(crate) async fn load_timers(pool: &Pool) -> Result<Vec<TimerRow>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, run_id, workflow_id, step, fire_at_ms FROM timers ORDER BY fire_at_ms, run_id, step",
        &[],
    )
    .await?;
    rows.iter().map(timer_row).collect()
}

/// The pending tasks and timers of one run. A task's id starts with its run id and `/`, so the
/// primary key (collation "C") finds them as a range (`0` follows `/`).
pub(crate) async fn run_work(
    pool: &Pool,
    tenant: &str,
    run_id: &str,
) -> Result<(Vec<TaskRow>, Vec<TimerRow>), StoreError> {
    let (from, to) = (format!("{run_id}/"), format!("{run_id}0"));
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks t WHERE t.id >= $1 AND t.id < $2 AND t.run_id = $3 AND t.tenant = $4 ORDER BY t.id"
    );
    let rows = query(pool, &sql, &[&from, &to, &run_id, &tenant]).await?;
    let tasks = rows.iter().map(task_row).collect::<Result<_, _>>()?;
    let rows = query(
        pool,
        "SELECT tenant, run_id, workflow_id, step, fire_at_ms FROM timers WHERE run_id = $1 AND tenant = $2 ORDER BY step",
        &[&run_id, &tenant],
    )
    .await?;
    let timers = rows.iter().map(timer_row).collect::<Result<_, _>>()?;
    Ok((tasks, timers))
}

pub(crate) async fn ping(pool: &Pool) -> Result<(), StoreError> {
    query(pool, "SELECT 1", &[]).await.map(|_| ())
}

fn usage_row(r: &Row) -> Result<UsageRow, StoreError> {
    Ok(UsageRow {
        id: get(r, 0)?,
        tenant: get(r, 1)?,
        at_ms: get(r, 2)?,
        api_key: get(r, 3)?,
        source: get(r, 4)?,
        route: get(r, 5)?,
        target: get(r, 6)?,
        provider: get(r, 7)?,
        model: get(r, 8)?,
        attempt: from_i64(get(r, 9)?, "attempt")?,
        input_tokens: from_i64(get(r, 10)?, "input_tokens")?,
        output_tokens: from_i64(get(r, 11)?, "output_tokens")?,
        cost_usd: get(r, 12)?,
        latency_us: from_i64(get(r, 13)?, "latency_us")?,
        outcome: get(r, 14)?,
        experiment: get(r, 15)?,
        arm: get(r, 16)?,
        run_id: get(r, 17)?,
        workflow_id: get(r, 18)?,
        step: get(r, 19)?,
    })
}

/// Filters that are not given are bound as NULL.
pub(crate) async fn list_usage(pool: &Pool, tenant: &str, filter: &UsageFilter) -> Result<Page<UsageRow>, StoreError> {
    let limit = page_limit(filter.limit);
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    let rows = query(
        pool,
        "SELECT id, tenant, at_ms, api_key, source, route, target, provider, model, attempt,
                input_tokens, output_tokens, cost_usd, latency_us, outcome, experiment, arm, run_id,
                workflow_id, step
         FROM usage
         WHERE tenant = $1 AND ($2::text IS NULL OR run_id = $2) AND ($3::text IS NULL OR api_key = $3)
           AND ($4::bigint IS NULL OR at_ms >= $4) AND ($5::text IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6",
        &[&tenant, &filter.run_id, &filter.api_key, &filter.since_ms, &filter.cursor, &fetch],
    )
    .await?;
    let items = rows.iter().map(usage_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_fetched(items, limit, |r| &r.id))
}

pub(crate) async fn usage_total(
    pool: &Pool,
    tenant: &str,
    api_key: Option<&str>,
    since_ms: i64,
) -> Result<UsageTotal, StoreError> {
    let rows = query(
        pool,
        "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0)::bigint, COALESCE(SUM(output_tokens), 0)::bigint,
                COALESCE(SUM(cost_usd), 0)::double precision
         FROM usage WHERE tenant = $1 AND at_ms >= $2 AND ($3::text IS NULL OR api_key = $3)",
        &[&tenant, &since_ms, &api_key],
    )
    .await?;
    let r = rows.first().ok_or_else(|| StoreError::Internal("a sum returned no row".into()))?;
    Ok(UsageTotal {
        calls: from_i64(get(r, 0)?, "count")?,
        input_tokens: from_i64(get(r, 1)?, "input_tokens")?,
        output_tokens: from_i64(get(r, 2)?, "output_tokens")?,
        cost_usd: get(r, 3)?,
    })
}

pub(crate) async fn list_alerts(pool: &Pool, tenant: &str) -> Result<Vec<BudgetAlertRow>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, budget, period_start_ms, level, limit_usd, spent_usd, at_ms FROM budget_alerts
         WHERE tenant = $1 ORDER BY at_ms DESC, budget, level LIMIT 1000",
        &[&tenant],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(BudgetAlertRow {
                tenant: get(r, 0)?,
                budget: get(r, 1)?,
                period_start_ms: get(r, 2)?,
                level: get(r, 3)?,
                limit_usd: get(r, 4)?,
                spent_usd: get(r, 5)?,
                at_ms: get(r, 6)?,
            })
        })
        .collect()
}

/// The most directory documents one listing returns; directories are small, this only bounds a
/// runaway.
const MAX_DOCS: i64 = 10_000;

fn doc_row(r: &Row) -> Result<Doc, StoreError> {
    Ok(Doc {
        tenant: get(r, 0)?,
        kind: get(r, 1)?,
        id: get(r, 2)?,
        body: from_json(get(r, 3)?, "body")?,
        version: get(r, 4)?,
        updated_at_ms: get(r, 5)?,
    })
}

pub(crate) async fn get_doc(pool: &Pool, tenant: &str, kind: &str, id: &str) -> Result<Option<Doc>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, kind, id, body, version, updated_at_ms FROM docs WHERE tenant = $1 AND kind = $2 AND id = $3",
        &[&tenant, &kind, &id],
    )
    .await?;
    rows.first().map(doc_row).transpose()
}

pub(crate) async fn list_docs(pool: &Pool, tenant: &str, kind: &str) -> Result<Vec<Doc>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, kind, id, body, version, updated_at_ms FROM docs WHERE tenant = $1 AND kind = $2
         ORDER BY id LIMIT $3",
        &[&tenant, &kind, &MAX_DOCS],
    )
    .await?;
    rows.iter().map(doc_row).collect()
}

pub(crate) async fn find_doc(pool: &Pool, kind: &str, id: &str) -> Result<Option<Doc>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, kind, id, body, version, updated_at_ms FROM docs WHERE kind = $1 AND id = $2 LIMIT 1",
        &[&kind, &id],
    )
    .await?;
    rows.first().map(doc_row).transpose()
}

pub(crate) async fn list_audit(pool: &Pool, tenant: &str, filter: &AuditFilter) -> Result<Page<AuditRow>, StoreError> {
    let limit = page_limit(filter.limit);
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    let rows = query(
        pool,
        "SELECT id, tenant, at_ms, actor, role, action, target, status, source_ip, trace_id FROM audit
         WHERE tenant = $1 AND ($2::text IS NULL OR actor = $2) AND ($3::bigint IS NULL OR at_ms >= $3)
           AND ($4::text IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5",
        &[&tenant, &filter.actor, &filter.since_ms, &filter.cursor, &fetch],
    )
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let status: i32 = get(r, 7)?;
            Ok(AuditRow {
                id: get(r, 0)?,
                tenant: get(r, 1)?,
                at_ms: get(r, 2)?,
                actor: get(r, 3)?,
                role: get(r, 4)?,
                action: get(r, 5)?,
                target: get(r, 6)?,
                status: u16::try_from(status)
                    .map_err(|_| StoreError::Internal(format!("invalid status {status} in the audit log")))?,
                source_ip: get(r, 8)?,
                trace_id: get(r, 9)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Page::from_fetched(items, limit, |r| &r.id))
}
