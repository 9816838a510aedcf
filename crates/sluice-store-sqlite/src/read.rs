//! Reads: a few read-only connections, used from the blocking pool so that queries never stall
//! the async runtime. WAL lets them read the last committed state while the writer writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use sluice_core::event::{RunAccess, Visibility};
use sluice_core::Event;
use sluice_store::{
    page_limit, AuditFilter, AuditRow, BudgetAlertRow, Doc, ExecutionFilter, ExecutionRow, Page, StoreError, TaskRow,
    TimerRow, UsageFilter, UsageRow, UsageTotal, WorkflowSummary, WorkflowVersion,
};
use tokio::sync::Semaphore;

use crate::codec::{enum_col, json_col, opt_json_col, status_col};
use crate::error::db_err;

/// Read connections open at once.
const READERS: usize = 4;

pub(crate) struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    /// Bounds the connections: one permit per connection in use.
    permits: Arc<Semaphore>,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, busy_timeout: Duration) -> Self {
        Self { path, busy_timeout, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(READERS)) }
    }

    /// Runs `f` on a read connection on the blocking pool.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the sqlite store is closing".into()))?;
        let this = Arc::clone(self);
        // The permit moves along: a read whose caller stopped waiting still holds it until done.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = this.take()?;
            let result = f(&conn).map_err(db_err);
            this.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("a sqlite read did not finish: {e}")))?
    }

    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(db_err)?;
        conn.busy_timeout(self.busy_timeout).map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(crate::STATEMENT_CACHE);
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
    }

    /// Closes the idle connections.
    pub(crate) fn close(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
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

fn exec_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExecutionRow> {
    Ok(ExecutionRow {
        run_id: r.get(0)?,
        workflow_id: r.get(1)?,
        workflow: r.get(2)?,
        version: r.get(3)?,
        status: status_col(r, 4)?,
        paused: r.get(5)?,
        dead_letter: r.get(6)?,
        input: json_col(r, 7)?,
        output: opt_json_col(r, 8)?,
        error: opt_json_col(r, 9)?,
        failed_step: r.get(10)?,
        parent: opt_json_col(r, 11)?,
        next_seq: r.get(12)?,
        created_at_ms: r.get(13)?,
        updated_at_ms: r.get(14)?,
        access: RunAccess {
            owner: r.get(15)?,
            visibility: if r.get(16)? { Visibility::Private } else { Visibility::Tenant },
            scope: opt_json_col(r, 17)?.unwrap_or_default(),
        },
    })
}

fn workflow_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkflowVersion> {
    Ok(WorkflowVersion { name: r.get(0)?, version: r.get(1)?, definition: r.get(2)?, created_at_ms: r.get(3)? })
}

pub(crate) fn get_workflow(
    conn: &Connection,
    tenant: &str,
    name: &str,
    version: Option<&str>,
) -> rusqlite::Result<Option<WorkflowVersion>> {
    match version {
        Some(version) => conn
            .prepare_cached(
                "SELECT name, version, definition, created_at_ms FROM workflows
                 WHERE tenant = ?1 AND name = ?2 AND version = ?3",
            )?
            .query_row([tenant, name, version], workflow_row)
            .optional(),
        None => conn
            .prepare_cached(
                "SELECT name, version, definition, created_at_ms FROM workflows
                 WHERE tenant = ?1 AND name = ?2
                 ORDER BY created_at_ms DESC, version DESC LIMIT 1",
            )?
            .query_row([tenant, name], workflow_row)
            .optional(),
    }
}

pub(crate) fn list_workflows(conn: &Connection, tenant: &str) -> rusqlite::Result<Vec<WorkflowSummary>> {
    let mut st = conn.prepare_cached(
        "SELECT w.name,
                (SELECT l.version FROM workflows l WHERE l.tenant = w.tenant AND l.name = w.name
                 ORDER BY l.created_at_ms DESC, l.version DESC LIMIT 1),
                COUNT(*), MAX(w.created_at_ms)
         FROM workflows w WHERE w.tenant = ?1 GROUP BY w.name ORDER BY w.name",
    )?;
    let rows = st.query_map([tenant], |r| {
        Ok(WorkflowSummary {
            name: r.get(0)?,
            latest_version: r.get(1)?,
            versions: r.get(2)?,
            updated_at_ms: r.get(3)?,
        })
    })?;
    rows.collect()
}

pub(crate) fn list_versions(conn: &Connection, tenant: &str, name: &str) -> rusqlite::Result<Vec<WorkflowVersion>> {
    let mut st = conn.prepare_cached(
        "SELECT name, version, definition, created_at_ms FROM workflows
         WHERE tenant = ?1 AND name = ?2 ORDER BY created_at_ms DESC, version DESC",
    )?;
    let rows = st.query_map([tenant, name], workflow_row)?;
    rows.collect()
}

pub(crate) fn get_execution(
    conn: &Connection,
    tenant: &str,
    workflow_id: &str,
    run_id: Option<&str>,
) -> rusqlite::Result<Option<ExecutionRow>> {
    match run_id {
        Some(run_id) => conn
            .prepare_cached(select_exec!("WHERE run_id = ?1 AND tenant = ?2 AND workflow_id = ?3"))?
            .query_row([run_id, tenant, workflow_id], exec_row)
            .optional(),
        None => conn
            .prepare_cached(select_exec!("WHERE tenant = ?1 AND workflow_id = ?2 ORDER BY run_id DESC LIMIT 1"))?
            .query_row([tenant, workflow_id], exec_row)
            .optional(),
    }
}

pub(crate) fn get_run(conn: &Connection, tenant: &str, run_id: &str) -> rusqlite::Result<Option<ExecutionRow>> {
    conn.prepare_cached(select_exec!("WHERE run_id = ?1 AND tenant = ?2"))?
        .query_row([run_id, tenant], exec_row)
        .optional()
}

/// Newest first; the cursor is the last run id of the previous page.
pub(crate) fn list_executions(
    conn: &Connection,
    tenant: &str,
    filter: &ExecutionFilter,
) -> rusqlite::Result<Page<ExecutionRow>> {
    let limit = page_limit(filter.limit);
    // Static fragments only; every value is bound. At most 64 shapes, each cached once.
    let mut sql = String::from(select_exec!("WHERE tenant = ?"));
    let mut args = vec![SqlValue::Text(tenant.to_owned())];
    if let Some(workflow) = &filter.workflow {
        sql.push_str(" AND workflow = ?");
        args.push(SqlValue::Text(workflow.clone()));
    }
    if let Some(workflow_id) = &filter.workflow_id {
        sql.push_str(" AND workflow_id = ?");
        args.push(SqlValue::Text(workflow_id.clone()));
    }
    if let Some(status) = filter.status {
        sql.push_str(" AND status = ?");
        args.push(SqlValue::Text(status.as_str().to_owned()));
    }
    if filter.dead_letter {
        sql.push_str(" AND dead_letter = 1");
    }
    if !filter.hidden_workflows.is_empty() {
        // One bound JSON array, whatever its length: one statement shape.
        let hidden = serde_json::to_string(&filter.hidden_workflows).unwrap_or_else(|_| "[]".into());
        sql.push_str(
            " AND workflow NOT IN (SELECT value FROM json_each(?)) AND (scope IS NULL OR NOT EXISTS \
             (SELECT 1 FROM json_each(scope) s WHERE s.value IN (SELECT value FROM json_each(?))))",
        );
        args.push(SqlValue::Text(hidden.clone()));
        args.push(SqlValue::Text(hidden));
    }
    if let Some(viewer) = &filter.viewer {
        sql.push_str(" AND (private = 0 OR started_by = ?)");
        args.push(SqlValue::Text(viewer.clone()));
    }
    keyset_page(conn, sql, args, "run_id", filter.cursor.as_ref(), limit, exec_row, |r| &r.run_id)
}

/// Ends a listing paged by keys, newest first: rows with `key` below the cursor, one row more than
/// the page (it tells whether another page follows), and the page.
#[allow(clippy::too_many_arguments)]
fn keyset_page<T>(
    conn: &Connection,
    mut sql: String,
    mut args: Vec<SqlValue>,
    key: &'static str,
    cursor: Option<&String>,
    limit: usize,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    key_of: impl Fn(&T) -> &String,
) -> rusqlite::Result<Page<T>> {
    if let Some(cursor) = cursor {
        sql.push_str(&format!(" AND {key} < ?"));
        args.push(SqlValue::Text(cursor.clone()));
    }
    sql.push_str(&format!(" ORDER BY {key} DESC LIMIT ?"));
    args.push(SqlValue::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
    let mut st = conn.prepare_cached(&sql)?;
    let items = st.query_map(params_from_iter(args), row)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Page::from_fetched(items, limit, key_of))
}

pub(crate) fn owner_url(conn: &Connection, tenant: &str, run_id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT n.url FROM executions x JOIN nodes n ON n.epoch = x.owner WHERE x.run_id = ?1 AND x.tenant = ?2",
    )?
    .query_row(params![run_id, tenant], |r| r.get::<_, Option<String>>(0))
    .optional()
    .map(Option::flatten)
}

pub(crate) fn count_running(conn: &Connection, tenant: &str, workflow: Option<&str>) -> rusqlite::Result<u64> {
    let n: i64 = match workflow {
        Some(w) => conn
            .prepare_cached(
                "SELECT count(*) FROM executions WHERE tenant = ?1 AND workflow = ?2 AND status = 'running'",
            )?
            .query_row(params![tenant, w], |r| r.get(0))?,
        None => conn
            .prepare_cached("SELECT count(*) FROM executions WHERE tenant = ?1 AND status = 'running'")?
            .query_row(params![tenant], |r| r.get(0))?,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) fn history(
    conn: &Connection,
    tenant: &str,
    run_id: &str,
    after: u64,
    limit: usize,
) -> rusqlite::Result<Vec<Event>> {
    let mut st = conn.prepare_cached(
        "SELECT e.data FROM executions x JOIN events e ON e.run_id = x.run_id
         WHERE x.run_id = ?1 AND x.tenant = ?2 AND e.seq > ?3
         ORDER BY e.seq LIMIT ?4",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = st.query_map(params![run_id, tenant, after, limit], |r| json_col(r, 0))?;
    rows.collect()
}

const TASK_COLUMNS: &str = "id, tenant, queue, kind, run_id, workflow_id, step, attempt, input, visible_at_ms, \
     schedule_to_start_ms, start_to_close_ms, heartbeat_ms, created_at_ms, trace_id";

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        queue: r.get(2)?,
        kind: enum_col(r, 3)?,
        run_id: r.get(4)?,
        workflow_id: r.get(5)?,
        step: r.get(6)?,
        attempt: r.get(7)?,
        input: json_col(r, 8)?,
        visible_at_ms: r.get(9)?,
        schedule_to_start_ms: r.get(10)?,
        start_to_close_ms: r.get(11)?,
        heartbeat_ms: r.get(12)?,
        created_at_ms: r.get(13)?,
        trace_id: r.get(14)?,
    })
}

fn timer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimerRow> {
    Ok(TimerRow {
        tenant: r.get(0)?,
        run_id: r.get(1)?,
        workflow_id: r.get(2)?,
        step: r.get(3)?,
        fire_at_ms: r.get(4)?,
    })
}

pub(crate) fn load_tasks(conn: &Connection) -> rusqlite::Result<Vec<TaskRow>> {
    let mut st = conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks ORDER BY visible_at_ms, id"))?;
    let rows = st.query_map([], task_row)?;
    rows.collect()
}

pub(crate) fn load_timers(conn: &Connection) -> rusqlite::Result<Vec<TimerRow>> {
    let mut st = conn.prepare_cached(
        "SELECT tenant, run_id, workflow_id, step, fire_at_ms FROM timers ORDER BY fire_at_ms, run_id, step",
    )?;
    let rows = st.query_map([], timer_row)?;
    rows.collect()
}

/// The pending tasks and timers of one run. A task's id starts with its run id and `/`, so the
/// primary key finds them as a range (`0` follows `/`).
pub(crate) fn run_work(
    conn: &Connection,
    tenant: &str,
    run_id: &str,
) -> rusqlite::Result<(Vec<TaskRow>, Vec<TimerRow>)> {
    let (from, to) = (format!("{run_id}/"), format!("{run_id}0"));
    let mut st = conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE id >= ?1 AND id < ?2 AND run_id = ?3 AND tenant = ?4 ORDER BY id"
    ))?;
    let tasks =
        st.query_map(rusqlite::params![from, to, run_id, tenant], task_row)?.collect::<rusqlite::Result<_>>()?;
    let mut st = conn.prepare_cached(
        "SELECT tenant, run_id, workflow_id, step, fire_at_ms FROM timers WHERE run_id = ?1 AND tenant = ?2 ORDER BY step",
    )?;
    let timers = st.query_map(rusqlite::params![run_id, tenant], timer_row)?.collect::<rusqlite::Result<_>>()?;
    Ok((tasks, timers))
}

pub(crate) fn ping(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached("SELECT 1")?.query_row([], |r| r.get::<_, i64>(0)).map(|_| ())
}

const USAGE_COLUMNS: &str = "id, tenant, at_ms, api_key, source, route, target, provider, model, attempt,
    input_tokens, output_tokens, cost_usd, latency_us, outcome, experiment, arm, run_id, workflow_id, step";

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok(UsageRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        at_ms: r.get(2)?,
        api_key: r.get(3)?,
        source: r.get(4)?,
        route: r.get(5)?,
        target: r.get(6)?,
        provider: r.get(7)?,
        model: r.get(8)?,
        attempt: r.get(9)?,
        input_tokens: u64::try_from(r.get::<_, i64>(10)?).unwrap_or(0),
        output_tokens: u64::try_from(r.get::<_, i64>(11)?).unwrap_or(0),
        cost_usd: r.get(12)?,
        latency_us: u64::try_from(r.get::<_, i64>(13)?).unwrap_or(0),
        outcome: r.get(14)?,
        experiment: r.get(15)?,
        arm: r.get(16)?,
        run_id: r.get(17)?,
        workflow_id: r.get(18)?,
        step: r.get(19)?,
    })
}

pub(crate) fn list_usage(conn: &Connection, tenant: &str, filter: &UsageFilter) -> rusqlite::Result<Page<UsageRow>> {
    let limit = page_limit(filter.limit);
    let mut sql = format!("SELECT {USAGE_COLUMNS} FROM usage WHERE tenant = ?");
    let mut args = vec![SqlValue::Text(tenant.to_owned())];
    if let Some(run_id) = &filter.run_id {
        sql.push_str(" AND run_id = ?");
        args.push(SqlValue::Text(run_id.clone()));
    }
    if let Some(key) = &filter.api_key {
        sql.push_str(" AND api_key = ?");
        args.push(SqlValue::Text(key.clone()));
    }
    if let Some(since) = filter.since_ms {
        sql.push_str(" AND at_ms >= ?");
        args.push(SqlValue::Integer(since));
    }
    keyset_page(conn, sql, args, "id", filter.cursor.as_ref(), limit, usage_row, |r| &r.id)
}

pub(crate) fn usage_total(
    conn: &Connection,
    tenant: &str,
    api_key: Option<&str>,
    since_ms: i64,
) -> rusqlite::Result<UsageTotal> {
    const SUMS: &str = "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),
        COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE tenant = ?1 AND at_ms >= ?2";
    let total = |r: &rusqlite::Row<'_>| {
        Ok(UsageTotal {
            calls: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
            input_tokens: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            output_tokens: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            cost_usd: r.get(3)?,
        })
    };
    match api_key {
        Some(key) => {
            conn.prepare_cached(&format!("{SUMS} AND api_key = ?3"))?.query_row(params![tenant, since_ms, key], total)
        }
        None => conn.prepare_cached(SUMS)?.query_row(params![tenant, since_ms], total),
    }
}

pub(crate) fn list_alerts(conn: &Connection, tenant: &str) -> rusqlite::Result<Vec<BudgetAlertRow>> {
    let mut st = conn.prepare_cached(
        "SELECT tenant, budget, period_start_ms, level, limit_usd, spent_usd, at_ms FROM budget_alerts
         WHERE tenant = ?1 ORDER BY at_ms DESC, budget, level LIMIT 1000",
    )?;
    let rows = st.query_map([tenant], |r| {
        Ok(BudgetAlertRow {
            tenant: r.get(0)?,
            budget: r.get(1)?,
            period_start_ms: r.get(2)?,
            level: r.get(3)?,
            limit_usd: r.get(4)?,
            spent_usd: r.get(5)?,
            at_ms: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// The most directory documents one listing returns; directories are small (users and keys of a
/// tenant), this only bounds a runaway.
const MAX_DOCS: i64 = 10_000;

const DOC_COLUMNS: &str = "tenant, kind, id, body, version, updated_at_ms";

fn doc_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Doc> {
    Ok(Doc {
        tenant: r.get(0)?,
        kind: r.get(1)?,
        id: r.get(2)?,
        body: json_col(r, 3)?,
        version: r.get(4)?,
        updated_at_ms: r.get(5)?,
    })
}

pub(crate) fn get_doc(conn: &Connection, tenant: &str, kind: &str, id: &str) -> rusqlite::Result<Option<Doc>> {
    conn.prepare_cached(&format!("SELECT {DOC_COLUMNS} FROM docs WHERE tenant = ?1 AND kind = ?2 AND id = ?3"))?
        .query_row(params![tenant, kind, id], doc_row)
        .optional()
}

pub(crate) fn list_docs(conn: &Connection, tenant: &str, kind: &str) -> rusqlite::Result<Vec<Doc>> {
    conn.prepare_cached(&format!(
        "SELECT {DOC_COLUMNS} FROM docs WHERE tenant = ?1 AND kind = ?2 ORDER BY id LIMIT ?3"
    ))?
    .query_map(params![tenant, kind, MAX_DOCS], doc_row)?
    .collect()
}

pub(crate) fn find_doc(conn: &Connection, kind: &str, id: &str) -> rusqlite::Result<Option<Doc>> {
    conn.prepare_cached(&format!("SELECT {DOC_COLUMNS} FROM docs WHERE kind = ?1 AND id = ?2 LIMIT 1"))?
        .query_row(params![kind, id], doc_row)
        .optional()
}

const AUDIT_COLUMNS: &str = "id, tenant, at_ms, actor, role, action, target, status, source_ip, trace_id";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        at_ms: r.get(2)?,
        actor: r.get(3)?,
        role: r.get(4)?,
        action: r.get(5)?,
        target: r.get(6)?,
        status: r.get(7)?,
        source_ip: r.get(8)?,
        trace_id: r.get(9)?,
    })
}

pub(crate) fn list_audit(conn: &Connection, tenant: &str, filter: &AuditFilter) -> rusqlite::Result<Page<AuditRow>> {
    let limit = page_limit(filter.limit);
    let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE tenant = ?");
    let mut args = vec![SqlValue::Text(tenant.to_owned())];
    if let Some(actor) = &filter.actor {
        sql.push_str(" AND actor = ?");
        args.push(SqlValue::Text(actor.clone()));
    }
    if let Some(since) = filter.since_ms {
        sql.push_str(" AND at_ms >= ?");
        args.push(SqlValue::Integer(since));
    }
    keyset_page(conn, sql, args, "id", filter.cursor.as_ref(), limit, audit_row, |r| &r.id)
}
