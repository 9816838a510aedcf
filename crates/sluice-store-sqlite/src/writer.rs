//! The single writer: a thread that owns the write connection and applies every write. Batches
//! that queue up while it is busy are committed together in one transaction (one fsync), each
//! inside its own savepoint, so that a failing batch fails alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use sluice_core::event::Visibility;
use sluice_core::Event;
use sluice_store::{
    now_ms, AuditRow, Batch, BudgetAlertRow, Doc, ExecChange, StoreError, TaskRow, TimerRow, UsageRow, WorkflowVersion,
};
use tokio::sync::oneshot;

use crate::codec::{enum_name, opt_json, to_json};
use crate::error::{db_err, is_constraint};

/// The most writes committed in one transaction.
const MAX_GROUP: usize = 1_000;

pub(crate) enum Op {
    Commit(Batch),
    PutWorkflow { tenant: String, version: WorkflowVersion },
    PutDoc(Doc),
    DeleteDoc { tenant: String, kind: String, id: String },
    Audit(Vec<AuditRow>),
    RegisterNode { node: String, url: Option<String>, lease_ms: i64 },
    RenewLease { epoch: i64, lease_ms: i64 },
    TakeOver { epoch: i64 },
}

/// What a write answers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// Whether the write changed anything.
    Changed(bool),
    /// A new node's fencing epoch.
    Epoch(i64),
    /// `(tenant, run_id)` of the runs taken over.
    Runs(Vec<(String, String)>),
}

/// One write and where its result goes.
pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Reply, StoreError>>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) batches: AtomicU64,
}

/// The writer thread's loop; returns when every sender is gone and the queue is drained.
pub(crate) fn run(conn: Connection, requests: Receiver<Request>, counters: Arc<Counters>) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(next) => group.push(next),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let (ops, replies): (Vec<Op>, Vec<_>) = group.into_iter().map(|r| (r.op, r.reply)).unzip();
        let results = apply_group(&conn, &ops);
        let committed = ops.iter().zip(&results).filter(|(op, r)| matches!(op, Op::Commit(_)) && r.is_ok()).count();
        if results.iter().any(Result::is_ok) {
            counters.transactions.fetch_add(1, Ordering::Relaxed);
            counters.batches.fetch_add(committed as u64, Ordering::Relaxed);
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have stopped waiting; the write stands either way.
            let _ = reply.send(result);
        }
    }
}

/// Applies `ops` in one transaction, each in its own savepoint, and returns one result per op.
/// An op that fails is rolled back alone; if the transaction itself fails, every op fails.
pub(crate) fn apply_group(conn: &Connection, ops: &[Op]) -> Vec<Result<Reply, StoreError>> {
    let mut results = Vec::with_capacity(ops.len());
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let e = db_err(e);
        return ops.iter().map(|_| Err(e.clone())).collect();
    }
    for op in ops {
        if let Err(e) = exec(conn, "SAVEPOINT batch") {
            return abort(conn, results, ops.len(), db_err(e));
        }
        let applied = apply(conn, op);
        let settled = match &applied {
            Ok(_) => exec(conn, "RELEASE batch").map_err(db_err),
            // SQLite rolls the whole transaction back after some errors (I/O, full disk); then
            // there is no savepoint to return to and the group is lost.
            Err(e) if conn.is_autocommit() => Err(e.clone()),
            Err(_) => exec(conn, "ROLLBACK TO batch").and_then(|()| exec(conn, "RELEASE batch")).map_err(db_err),
        };
        if let Err(e) = settled {
            return abort(conn, results, ops.len(), e);
        }
        results.push(applied);
    }
    if let Err(e) = exec(conn, "COMMIT") {
        return abort(conn, results, ops.len(), db_err(e));
    }
    results
}

/// Rolls the group back: ops that had succeeded, and those not tried, fail with `e`.
fn abort(
    conn: &Connection,
    mut results: Vec<Result<Reply, StoreError>>,
    n: usize,
    e: StoreError,
) -> Vec<Result<Reply, StoreError>> {
    tracing::error!(error = %e, writes = n, "sqlite group commit failed; rolled back");
    if !conn.is_autocommit() {
        if let Err(rollback) = exec(conn, "ROLLBACK") {
            tracing::error!(error = %rollback, "sqlite rollback failed");
        }
    }
    for r in &mut results {
        if r.is_ok() {
            *r = Err(e.clone());
        }
    }
    results.resize(n, Err(e));
    results
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn apply(conn: &Connection, op: &Op) -> Result<Reply, StoreError> {
    let changed = match op {
        Op::Commit(batch) => apply_batch(conn, batch).map(|()| true),
        Op::PutWorkflow { tenant, version } => put_workflow(conn, tenant, version),
        Op::PutDoc(doc) => put_doc(conn, doc),
        Op::DeleteDoc { tenant, kind, id } => {
            let mut st =
                conn.prepare_cached("DELETE FROM docs WHERE tenant = ?1 AND kind = ?2 AND id = ?3").map_err(db_err)?;
            Ok(st.execute(params![tenant, kind, id]).map_err(db_err)? == 1)
        }
        Op::Audit(rows) => append_audit(conn, rows).map(|()| true),
        Op::RegisterNode { node, url, lease_ms } => {
            return register_node(conn, node, url.as_deref(), *lease_ms).map(Reply::Epoch)
        }
        Op::RenewLease { epoch, lease_ms } => {
            let mut st = conn.prepare_cached("UPDATE nodes SET expires_at_ms = ?2 WHERE epoch = ?1").map_err(db_err)?;
            Ok(st.execute(params![epoch, now_ms().saturating_add(*lease_ms)]).map_err(db_err)? == 1)
        }
        Op::TakeOver { epoch } => return take_over(conn, *epoch).map(Reply::Runs),
    };
    changed.map(Reply::Changed)
}

/// Ends the earlier epochs of `node` and starts a new one.
fn register_node(conn: &Connection, node: &str, url: Option<&str>, lease_ms: i64) -> Result<i64, StoreError> {
    let now = now_ms();
    conn.prepare_cached("DELETE FROM nodes WHERE node = ?1").and_then(|mut st| st.execute([node])).map_err(db_err)?;
    conn.prepare_cached("INSERT INTO nodes (node, started_at_ms, expires_at_ms, url) VALUES (?1, ?2, ?3, ?4)")
        .and_then(|mut st| st.execute(params![node, now, now.saturating_add(lease_ms), url]))
        .map_err(db_err)?;
    Ok(conn.last_insert_rowid())
}

/// Ends expired leases and moves the running executions no live lease owns to `epoch`.
fn take_over(conn: &Connection, epoch: i64) -> Result<Vec<(String, String)>, StoreError> {
    conn.prepare_cached("DELETE FROM nodes WHERE expires_at_ms < ?1 AND epoch <> ?2")
        .and_then(|mut st| st.execute(params![now_ms(), epoch]))
        .map_err(db_err)?;
    let mut st = conn
        .prepare_cached(
            "UPDATE executions SET owner = ?1
             WHERE status = 'running' AND (owner IS NULL OR owner NOT IN (SELECT epoch FROM nodes))
             RETURNING tenant, run_id",
        )
        .map_err(db_err)?;
    let rows = st.query_map([epoch], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// Compare-and-set on the stored version: an insert when the caller read none (`version` 0).
fn put_doc(conn: &Connection, d: &Doc) -> Result<bool, StoreError> {
    let body = to_json(&d.body)?;
    let n = if d.version == 0 {
        conn.prepare_cached(
            "INSERT INTO docs (tenant, kind, id, body, version, updated_at_ms) VALUES (?1, ?2, ?3, ?4, 1, ?5)
             ON CONFLICT (tenant, kind, id) DO NOTHING",
        )
        .map_err(db_err)?
        .execute(params![d.tenant, d.kind, d.id, body, d.updated_at_ms])
    } else {
        conn.prepare_cached(
            "UPDATE docs SET body = ?4, version = version + 1, updated_at_ms = ?5
             WHERE tenant = ?1 AND kind = ?2 AND id = ?3 AND version = ?6",
        )
        .map_err(db_err)?
        .execute(params![d.tenant, d.kind, d.id, body, d.updated_at_ms, d.version])
    }
    .map_err(db_err)?;
    Ok(n == 1)
}

fn append_audit(conn: &Connection, rows: &[AuditRow]) -> Result<(), StoreError> {
    let mut st = conn
        .prepare_cached(
            "INSERT INTO audit (id, tenant, at_ms, actor, role, action, target, status, source_ip, trace_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id) DO NOTHING",
        )
        .map_err(db_err)?;
    for r in rows {
        st.execute(params![
            r.id,
            r.tenant,
            r.at_ms,
            r.actor,
            r.role,
            r.action,
            r.target,
            r.status,
            r.source_ip,
            r.trace_id
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

/// A version stored again keeps its definition but takes the later publishing time, so that
/// publishing it makes it the latest again.
fn put_workflow(conn: &Connection, tenant: &str, v: &WorkflowVersion) -> Result<bool, StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM workflows WHERE tenant = ?1 AND name = ?2 AND version = ?3")
        .map_err(db_err)?
        .exists(params![tenant, v.name, v.version])
        .map_err(db_err)?;
    let mut st = conn
        .prepare_cached(
            "INSERT INTO workflows (tenant, name, version, definition, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant, name, version)
             DO UPDATE SET created_at_ms = MAX(created_at_ms, excluded.created_at_ms)",
        )
        .map_err(db_err)?;
    st.execute(params![tenant, v.name, v.version, v.definition, v.created_at_ms]).map_err(db_err)?;
    Ok(!exists)
}

fn apply_batch(conn: &Connection, batch: &Batch) -> Result<(), StoreError> {
    for change in &batch.execs {
        apply_exec(conn, change)?;
    }
    if !batch.remove_tasks.is_empty() {
        let mut st = conn.prepare_cached("DELETE FROM tasks WHERE id = ?1").map_err(db_err)?;
        for id in &batch.remove_tasks {
            st.execute([id]).map_err(db_err)?;
        }
    }
    for task in &batch.add_tasks {
        insert_task(conn, task)?;
    }
    if !batch.remove_timers.is_empty() {
        let mut st = conn.prepare_cached("DELETE FROM timers WHERE run_id = ?1 AND step = ?2").map_err(db_err)?;
        for (run_id, step) in &batch.remove_timers {
            st.execute([run_id, step]).map_err(db_err)?;
        }
    }
    for timer in &batch.add_timers {
        insert_timer(conn, timer)?;
    }
    for row in &batch.usage {
        insert_usage(conn, row)?;
    }
    for alert in &batch.alerts {
        insert_alert(conn, alert)?;
    }
    Ok(())
}

fn insert_usage(conn: &Connection, u: &UsageRow) -> Result<(), StoreError> {
    let mut st = conn
        .prepare_cached(
            "INSERT INTO usage (id, tenant, at_ms, api_key, source, route, target, provider, model,
                 attempt, input_tokens, output_tokens, cost_usd, latency_us, outcome, experiment, arm,
                 run_id, workflow_id, step)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20)
             ON CONFLICT (id) DO NOTHING",
        )
        .map_err(db_err)?;
    st.execute(params![
        u.id,
        u.tenant,
        u.at_ms,
        u.api_key,
        u.source,
        u.route,
        u.target,
        u.provider,
        u.model,
        u.attempt,
        i64::try_from(u.input_tokens).unwrap_or(i64::MAX),
        i64::try_from(u.output_tokens).unwrap_or(i64::MAX),
        u.cost_usd,
        i64::try_from(u.latency_us).unwrap_or(i64::MAX),
        u.outcome,
        u.experiment,
        u.arm,
        u.run_id,
        u.workflow_id,
        u.step,
    ])
    .map_err(db_err)?;
    Ok(())
}

fn insert_alert(conn: &Connection, a: &BudgetAlertRow) -> Result<(), StoreError> {
    let mut st = conn
        .prepare_cached(
            "INSERT INTO budget_alerts (tenant, budget, period_start_ms, level, limit_usd, spent_usd, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (tenant, budget, period_start_ms, level) DO NOTHING",
        )
        .map_err(db_err)?;
    st.execute(params![a.tenant, a.budget, a.period_start_ms, a.level, a.limit_usd, a.spent_usd, a.at_ms])
        .map_err(db_err)?;
    Ok(())
}

fn apply_exec(conn: &Connection, change: &ExecChange) -> Result<(), StoreError> {
    let row = &change.row;
    if let Some(gap) = change.events.windows(2).find(|w| w[1].seq != w[0].seq + 1) {
        return Err(StoreError::Conflict(format!(
            "run {}: events {} and {} of a batch are not consecutive",
            row.run_id, gap[0].seq, gap[1].seq
        )));
    }
    if change.create {
        insert_exec(conn, change)?;
    } else {
        update_exec(conn, change)?;
    }
    insert_events(conn, &row.run_id, &change.events)
}

fn insert_exec(conn: &Connection, change: &ExecChange) -> Result<(), StoreError> {
    let row = &change.row;
    let mut st = conn
        .prepare_cached(
            "INSERT INTO executions (run_id, tenant, workflow_id, workflow, version, status, paused,
                 dead_letter, input, output, error, failed_step, parent, next_seq, created_at_ms,
                 updated_at_ms, owner, started_by, private, scope)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                 ?20)",
        )
        .map_err(db_err)?;
    let inserted = st.execute(params![
        row.run_id,
        change.tenant,
        row.workflow_id,
        row.workflow,
        row.version,
        row.status.as_str(),
        row.paused,
        row.dead_letter,
        to_json(&row.input)?,
        opt_json(row.output.as_ref())?,
        opt_json(row.error.as_ref())?,
        row.failed_step,
        opt_json(row.parent.as_ref())?,
        row.next_seq,
        row.created_at_ms,
        row.updated_at_ms,
        change.fence,
        row.access.owner,
        row.access.visibility == Visibility::Private,
        if row.access.scope.is_empty() { None } else { Some(to_json(&row.access.scope)?) },
    ]);
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_constraint(&e) => Err(match running_run(conn, change)? {
            Some(running) => StoreError::AlreadyRunning(running),
            None => StoreError::Conflict(format!("run {} already exists", row.run_id)),
        }),
        Err(e) => Err(db_err(e)),
    }
}

fn update_exec(conn: &Connection, change: &ExecChange) -> Result<(), StoreError> {
    let row = &change.row;
    // The optimistic check and the update in one statement: it only matches while the stored
    // history ends where this batch begins. Immutable columns (input, workflow, version,
    // parent) are written once, at create.
    let expected = change.events.first().map(|e| e.seq);
    let mut st = conn
        .prepare_cached(
            "UPDATE executions SET status = ?3, paused = ?4, dead_letter = ?5, output = ?6, error = ?7,
                 failed_step = ?8, next_seq = ?9, updated_at_ms = ?10, owner = COALESCE(?12, owner)
             WHERE run_id = ?1 AND tenant = ?2 AND (?11 IS NULL OR next_seq = ?11)
               AND (?12 IS NULL OR owner IS NULL OR owner = ?12
                    OR (status <> 'running' AND owner NOT IN (SELECT epoch FROM nodes)))",
        )
        .map_err(db_err)?;
    let updated = st.execute(params![
        row.run_id,
        change.tenant,
        row.status.as_str(),
        row.paused,
        row.dead_letter,
        opt_json(row.output.as_ref())?,
        opt_json(row.error.as_ref())?,
        row.failed_step,
        row.next_seq,
        row.updated_at_ms,
        expected,
        change.fence,
    ]);
    match updated {
        Ok(1) => Ok(()),
        Ok(_) => {
            let stored: Option<(u64, Option<i64>)> = conn
                .prepare_cached("SELECT next_seq, owner FROM executions WHERE run_id = ?1 AND tenant = ?2")
                .and_then(|mut st| {
                    st.query_row([&row.run_id, &change.tenant], |r| Ok((r.get(0)?, r.get(1)?))).optional()
                })
                .map_err(db_err)?;
            match stored {
                None => Err(StoreError::NotFound),
                Some((_, Some(owner))) if change.fence.is_some_and(|f| f != owner) => {
                    Err(StoreError::Conflict(format!(
                        "run {}: fenced: it is owned by node epoch {owner}, not {}",
                        row.run_id,
                        change.fence.unwrap_or_default()
                    )))
                }
                Some((stored, _)) => Err(StoreError::Conflict(format!(
                    "run {}: the history continues at event {stored}, the batch starts at {}; reload and retry",
                    row.run_id,
                    expected.unwrap_or(0)
                ))),
            }
        }
        // Back to running (a redrive) while another run of the workflow id runs.
        Err(e) if is_constraint(&e) => Err(match running_run(conn, change)? {
            Some(running) => StoreError::AlreadyRunning(running),
            None => db_err(e),
        }),
        Err(e) => Err(db_err(e)),
    }
}

/// The run of the change's workflow id that is running, other than the change's own.
fn running_run(conn: &Connection, change: &ExecChange) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(
        "SELECT run_id FROM executions
         WHERE tenant = ?1 AND workflow_id = ?2 AND status = 'running' AND run_id <> ?3",
    )
    .and_then(|mut st| {
        st.query_row([&change.tenant, &change.row.workflow_id, &change.row.run_id], |r| r.get(0)).optional()
    })
    .map_err(db_err)
}

fn insert_events(conn: &Connection, run_id: &str, events: &[Event]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut st =
        conn.prepare_cached("INSERT INTO events (run_id, seq, at_ms, data) VALUES (?1, ?2, ?3, ?4)").map_err(db_err)?;
    for e in events {
        match st.execute(params![run_id, e.seq, e.at_ms, to_json(e)?]) {
            Ok(_) => {}
            Err(err) if is_constraint(&err) => {
                return Err(StoreError::Conflict(format!("run {run_id}: event {} is already stored", e.seq)));
            }
            Err(err) => return Err(db_err(err)),
        }
    }
    Ok(())
}

fn insert_task(conn: &Connection, t: &TaskRow) -> Result<(), StoreError> {
    let mut st = conn
        .prepare_cached(
            "INSERT INTO tasks (id, tenant, queue, kind, run_id, workflow_id, step, attempt, input,
                 visible_at_ms, schedule_to_start_ms, start_to_close_ms, heartbeat_ms, created_at_ms, trace_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .map_err(db_err)?;
    let inserted = st.execute(params![
        t.id,
        t.tenant,
        t.queue,
        enum_name(&t.kind)?,
        t.run_id,
        t.workflow_id,
        t.step,
        t.attempt,
        to_json(&t.input)?,
        t.visible_at_ms,
        t.schedule_to_start_ms,
        t.start_to_close_ms,
        t.heartbeat_ms,
        t.created_at_ms,
        t.trace_id,
    ]);
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_constraint(&e) => Err(StoreError::Conflict(format!("task {} already exists", t.id))),
        Err(e) => Err(db_err(e)),
    }
}

fn insert_timer(conn: &Connection, t: &TimerRow) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO timers (run_id, step, tenant, workflow_id, fire_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut st| st.execute(params![t.run_id, t.step, t.tenant, t.workflow_id, t.fire_at_ms]))
    .map(|_| ())
    .map_err(db_err)
}
