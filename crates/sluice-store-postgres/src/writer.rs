//! Writes: the statements that commit batches, one or many at a time (see `group`), and a lone
//! batch's READ COMMITTED transaction with precise errors. Optimistic concurrency is a row check
//! (`UPDATE ... WHERE next_seq = $n` must match the row), and the partial unique index on running
//! runs makes starts idempotent; a failing batch is rolled back whole and concurrent batches do
//! not wait for each other beyond the rows they share.

use std::collections::HashSet;

use deadpool_postgres::{Client, Pool, Transaction};
use sluice_core::event::{TaskKind, Visibility};
use sluice_store::{
    AuditRow, Batch, BudgetAlertRow, Doc, ExecChange, Settle, StoreError, TaskRow, TimerRow, UsageRow, Wake,
    WorkflowVersion,
};

use crate::codec::{enum_name, opt_json, opt_to_i64, to_i64, to_json};
use crate::error::{db_err, describe, is_transient, is_unique_violation, pool_err};

// The statements for the rows beside executions, shared by lone batches and groups.
const SETTLE_TASKS: &str = "DELETE FROM tasks t USING unnest($1::text[], $2::bool[]) AS s(id, posted)
             WHERE t.id = s.id AND (t.outcome IS NOT NULL) = s.posted";
const DELETE_CHANGES: &str = "DELETE FROM changes WHERE id = ANY($1::text[])";
const DELETE_TASKS: &str = "DELETE FROM tasks WHERE id = ANY($1::text[])";
const INSERT_TASKS: &str = "INSERT INTO tasks (id, tenant, queue, kind, run_id, workflow_id, step, attempt, input,
                 visible_at_ms, schedule_to_start_ms, start_to_close_ms, heartbeat_ms, created_at_ms, trace_id,
                 deadline_ms, claimed_by)
             SELECT u.*,
                 CASE WHEN u.kind = 'worker' AND $16::bigint IS NULL THEN u.visible_at_ms + u.schedule_to_start_ms END,
                 CASE WHEN u.kind = 'worker' THEN $16::bigint END
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::bigint[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[],
                 $13::bigint[], $14::bigint[], $15::text[])
                 AS u(id, tenant, queue, kind, run_id, workflow_id, step, attempt, input, visible_at_ms,
                      schedule_to_start_ms, start_to_close_ms, heartbeat_ms, created_at_ms, trace_id)";
const DELETE_TIMERS: &str = "DELETE FROM timers t USING unnest($1::text[], $2::text[]) AS d(run_id, step)
                 WHERE t.run_id = d.run_id AND t.step = d.step";
const UPSERT_TIMERS: &str = "INSERT INTO timers (run_id, step, tenant, workflow_id, fire_at_ms)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
             ON CONFLICT (run_id, step) DO UPDATE
                 SET tenant = EXCLUDED.tenant, workflow_id = EXCLUDED.workflow_id, fire_at_ms = EXCLUDED.fire_at_ms";

// The statements for executions and events: the optimistic check and the change in one
// statement, for one change or many. An update only matches while the stored history ends
// where its batch begins and the writer owns the run; a concurrent writer of the same run holds
// the row until it commits, and the check is then made again on its result. Immutable columns
// (input, workflow, version, parent) are written once, at create.
pub(crate) const UPDATE_EXECS: &str =
    "UPDATE executions e SET status = u.status, paused = u.paused, dead_letter = u.dead_letter,
                 output = u.output, error = u.error, failed_step = u.failed_step, next_seq = u.next_seq,
                 updated_at_ms = u.updated_at_ms, owner = COALESCE(u.fence, e.owner)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::text[],
                     $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
                 AS u(run_id, tenant, status, paused, dead_letter, output, error, failed_step, next_seq,
                      updated_at_ms, expected, fence)
             WHERE e.run_id = u.run_id AND e.tenant = u.tenant
               AND (u.expected IS NULL OR e.next_seq = u.expected)
               AND (u.fence IS NULL OR e.owner IS NULL OR e.owner = u.fence
                    OR (e.status <> 'running' AND e.owner NOT IN (SELECT epoch FROM nodes)))
             RETURNING e.run_id";
pub(crate) const INSERT_EXECS: &str =
    "INSERT INTO executions (run_id, tenant, workflow_id, workflow, version, status, paused,
                 dead_letter, input, output, error, failed_step, parent, next_seq, created_at_ms,
                 updated_at_ms, owner, started_by, private, scope)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::bool[], $8::bool[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                 $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], $18::text[], $19::bool[],
                 $20::text[])
             ON CONFLICT DO NOTHING
             RETURNING run_id";
pub(crate) const INSERT_EVENTS: &str = "INSERT INTO events (run_id, seq, at_ms, data)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[])";

/// Every statement that [`apply_rows`] may send, for [`warm`].
pub(crate) const ROW_STATEMENTS: [&str; 6] =
    [SETTLE_TASKS, DELETE_CHANGES, DELETE_TASKS, INSERT_TASKS, DELETE_TIMERS, UPSERT_TIMERS];

/// Prepares `statements` on the transaction's connection unless they are already (each
/// connection keeps its prepared statements). Statements sent together must be prepared first:
/// preparing one costs a round trip, which would let a later statement overtake it.
pub(crate) async fn warm(tx: &Transaction<'_>, statements: &[&str]) -> Result<(), Failure> {
    for sql in statements {
        tx.prepare_cached(sql).await?;
    }
    Ok(())
}

/// How often a batch that PostgreSQL failed to break a deadlock is tried again.
const TRANSIENT_RETRIES: u32 = 3;

/// Why a batch was not applied.
pub(crate) enum Failure {
    /// A domain error, final.
    Store(StoreError),
    /// An unexpected database error.
    Db(tokio_postgres::Error),
    /// An update of `execs[i]` back to running collided with another running run; which run that
    /// is can be asked only once the aborted transaction is rolled back.
    Running(usize, tokio_postgres::Error),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

/// Applies one batch in its own transaction on `client`, with precise errors: the batch's
/// changes are checked one by one.
pub(crate) async fn commit_on(client: &mut Client, batch: &Batch) -> Result<(), StoreError> {
    let mut retries = 0;
    loop {
        match try_commit(client, batch).await {
            Ok(()) => return Ok(()),
            Err(Failure::Store(e)) => return Err(e),
            Err(Failure::Db(e)) if is_transient(&e) && retries < TRANSIENT_RETRIES => {
                retries += 1;
                tracing::warn!(error = %describe(&e), retries, "postgres aborted a batch; retrying it");
            }
            Err(Failure::Db(e)) => return Err(db_err(e)),
            Err(Failure::Running(i, e)) => {
                let change = batch.execs.get(i).ok_or_else(|| db_err(e))?;
                let tx = client.transaction().await.map_err(db_err)?;
                let running = running_run(&tx, change).await;
                tx.rollback().await.map_err(db_err)?;
                return Err(match running? {
                    Some(running) => StoreError::AlreadyRunning(running),
                    None => StoreError::Conflict(format!(
                        "run {} cannot run again: another run of {} started; retry",
                        change.row.run_id, change.row.workflow_id
                    )),
                });
            }
        }
    }
}

async fn try_commit(client: &mut Client, batch: &Batch) -> Result<(), Failure> {
    let tx = client.transaction().await?;
    match apply_batch(&tx, batch).await {
        Ok(()) => Ok(tx.commit().await?),
        Err(failure) => {
            if let Err(e) = tx.rollback().await {
                tracing::error!(error = %describe(&e), "postgres rollback failed");
            }
            Err(failure)
        }
    }
}

/// A version stored again keeps its definition but takes the later publishing time, so that
/// publishing it makes it the latest again.
pub(crate) async fn put_workflow(pool: &Pool, tenant: &str, v: &WorkflowVersion) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "INSERT INTO workflows AS w (tenant, name, version, definition, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, name, version)
             DO UPDATE SET created_at_ms = GREATEST(w.created_at_ms, excluded.created_at_ms)
             RETURNING (xmax = 0) AS inserted",
        )
        .await
        .map_err(db_err)?;
    let row = client
        .query_one(&st, &[&tenant, &v.name, &v.version, &v.definition, &v.created_at_ms])
        .await
        .map_err(db_err)?;
    row.try_get::<_, bool>(0).map_err(db_err)
}

/// Compare-and-set on the stored version: an insert when the caller read none (`version` 0).
pub(crate) async fn put_doc(pool: &Pool, d: &Doc) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let body = to_json(&d.body)?;
    let n = if d.version == 0 {
        let st = client
            .prepare_cached(
                "INSERT INTO docs (tenant, kind, id, body, version, updated_at_ms) VALUES ($1, $2, $3, $4, 1, $5)
                 ON CONFLICT (tenant, kind, id) DO NOTHING",
            )
            .await
            .map_err(db_err)?;
        client.execute(&st, &[&d.tenant, &d.kind, &d.id, &body, &d.updated_at_ms]).await
    } else {
        let st = client
            .prepare_cached(
                "UPDATE docs SET body = $4, version = version + 1, updated_at_ms = $5
                 WHERE tenant = $1 AND kind = $2 AND id = $3 AND version = $6",
            )
            .await
            .map_err(db_err)?;
        client.execute(&st, &[&d.tenant, &d.kind, &d.id, &body, &d.updated_at_ms, &d.version]).await
    }
    .map_err(db_err)?;
    Ok(n == 1)
}

/// The database's clock in ms: leases are judged by one clock whatever the nodes' clocks say.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Ends the earlier epochs of `node` and starts a new one.
pub(crate) async fn register_node(
    pool: &Pool,
    node: &str,
    url: Option<&str>,
    lease_ms: i64,
) -> Result<i64, StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    tx.execute("DELETE FROM nodes WHERE node = $1", &[&node]).await.map_err(db_err)?;
    let sql = format!(
        "INSERT INTO nodes (node, started_at_ms, expires_at_ms, url) VALUES ($1, {DB_NOW_MS}, {DB_NOW_MS} + $2, $3)
         RETURNING epoch"
    );
    let row = tx.query_one(&sql, &[&node, &lease_ms, &url]).await.map_err(db_err)?;
    let epoch: i64 = row.try_get(0).map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(epoch)
}

pub(crate) async fn renew_lease(pool: &Pool, epoch: i64, lease_ms: i64) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let sql = format!("UPDATE nodes SET expires_at_ms = {DB_NOW_MS} + $2 WHERE epoch = $1");
    Ok(client.execute(&sql, &[&epoch, &lease_ms]).await.map_err(db_err)? == 1)
}

/// Ends expired leases and moves the running executions no live lease owns to `epoch`. Rows
/// being written are skipped (their writer holds a live lease or will fail its fence check).
pub(crate) async fn take_over(pool: &Pool, epoch: i64) -> Result<Vec<(String, String)>, StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    let sql = format!("DELETE FROM nodes WHERE expires_at_ms < {DB_NOW_MS} AND epoch <> $1");
    tx.execute(&sql, &[&epoch]).await.map_err(db_err)?;
    // The claims of ended nodes (expired, or registered again under their name) die with them:
    // their tasks are delivered again (the same attempt, the same idempotency key), and every
    // node's pollers hear of it at commit.
    tx.execute(
            "WITH released AS (
                 UPDATE tasks SET claimed_by = NULL, claim_until_ms = NULL, heartbeat_until_ms = NULL, deadline_ms = NULL
                 WHERE claimed_by IS NOT NULL AND outcome IS NULL AND claimed_by NOT IN (SELECT epoch FROM nodes)
                 RETURNING tenant, queue)
             SELECT pg_notify('sluice', json_build_array('t', tenant, queue, count(*))::text)
             FROM released GROUP BY tenant, queue",
        &[],
    )
    .await
    .map_err(db_err)?;
    let rows = tx
        .query(
            "UPDATE executions SET owner = $1
             WHERE status = 'running' AND (owner IS NULL OR owner NOT IN (SELECT epoch FROM nodes))
             RETURNING tenant, run_id",
            &[&epoch],
        )
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    rows.iter().map(|r| Ok((r.try_get(0).map_err(db_err)?, r.try_get(1).map_err(db_err)?))).collect()
}

pub(crate) async fn delete_doc(pool: &Pool, tenant: &str, kind: &str, id: &str) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st =
        client.prepare_cached("DELETE FROM docs WHERE tenant = $1 AND kind = $2 AND id = $3").await.map_err(db_err)?;
    Ok(client.execute(&st, &[&tenant, &kind, &id]).await.map_err(db_err)? == 1)
}

/// One statement for all rows (arrays unnested), so a flush of the audit buffer is one round trip.
pub(crate) async fn append_audit(pool: &Pool, rows: &[AuditRow]) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "INSERT INTO audit (id, tenant, at_ms, actor, role, action, target, status, source_ip, trace_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                                  $7::text[], $8::int[], $9::text[], $10::text[])
             ON CONFLICT (id) DO NOTHING",
        )
        .await
        .map_err(db_err)?;
    let col = |f: fn(&AuditRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
    let opt = |f: fn(&AuditRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
    let at: Vec<i64> = rows.iter().map(|r| r.at_ms).collect();
    let status: Vec<i32> = rows.iter().map(|r| i32::from(r.status)).collect();
    client
        .execute(
            &st,
            &[
                &col(|r| &r.id),
                &col(|r| &r.tenant),
                &at,
                &col(|r| &r.actor),
                &opt(|r| r.role.as_deref()),
                &col(|r| &r.action),
                &col(|r| &r.target),
                &status,
                &opt(|r| r.source_ip.as_deref()),
                &opt(|r| r.trace_id.as_deref()),
            ],
        )
        .await
        .map_err(db_err)?;
    Ok(())
}

async fn apply_batch(tx: &Transaction<'_>, batch: &Batch) -> Result<(), Failure> {
    for (i, change) in batch.execs.iter().enumerate() {
        apply_exec(tx, i, change).await?;
    }
    apply_rows(tx, &Rows::of(std::slice::from_ref(batch))).await
}

/// What one or more batches write beside their executions and events, gathered so that each
/// table takes one statement for all of them.
pub(crate) struct Rows<'a> {
    settles: Vec<&'a Settle>,
    applied_changes: Vec<&'a str>,
    remove_tasks: Vec<&'a str>,
    add_tasks: Vec<&'a TaskRow>,
    /// The node the tasks are reserved for: the writer of the batches (see [`writer_epoch`]).
    reserve_for: Option<i64>,
    remove_timers: Vec<(&'a str, &'a str)>,
    add_timers: Vec<&'a TimerRow>,
    usage: Vec<&'a UsageRow>,
    alerts: Vec<&'a BudgetAlertRow>,
}

impl<'a> Rows<'a> {
    /// The rows of `batches`, which must all have the same writer.
    pub(crate) fn of(batches: &'a [impl std::borrow::Borrow<Batch>]) -> Self {
        let mut rows = Rows {
            settles: Vec::new(),
            applied_changes: Vec::new(),
            remove_tasks: Vec::new(),
            add_tasks: Vec::new(),
            reserve_for: batches.first().and_then(|b| writer_epoch(b.borrow())),
            remove_timers: Vec::new(),
            add_timers: Vec::new(),
            usage: Vec::new(),
            alerts: Vec::new(),
        };
        for b in batches {
            let b = b.borrow();
            rows.settles.extend(&b.settles);
            rows.applied_changes.extend(b.applied_changes.iter().map(String::as_str));
            // The tasks a batch settles are deleted with the settle; most remove only those.
            if b.remove_tasks.iter().any(|id| !b.settles.iter().any(|s| &s.task_id == id)) {
                rows.remove_tasks.extend(b.remove_tasks.iter().map(String::as_str));
            }
            rows.add_tasks.extend(&b.add_tasks);
            rows.remove_timers.extend(b.remove_timers.iter().map(|(run, step)| (run.as_str(), step.as_str())));
            rows.add_timers.extend(&b.add_timers);
            rows.usage.extend(&b.usage);
            rows.alerts.extend(&b.alerts);
        }
        rows
    }
}

/// Applies `rows`: the statements for settles, posted changes, tasks and timers are sent at once,
/// in this order, and their answers read in the same order, so the first error is the one
/// reported (a statement after a failed one fails too, and the transaction is rolled back).
/// Ledger rows and alerts, which few batches carry, follow one by one.
pub(crate) async fn apply_rows(tx: &Transaction<'_>, rows: &Rows<'_>) -> Result<(), Failure> {
    warm(tx, &ROW_STATEMENTS).await?;
    let (settled, changes, removed, added, unset, set) = tokio::join!(
        async {
            if rows.settles.is_empty() {
                return Ok::<(), Failure>(());
            }
            settle(tx, &rows.settles).await
        },
        async {
            if rows.applied_changes.is_empty() {
                return Ok::<(), Failure>(());
            }
            let st = tx.prepare_cached(DELETE_CHANGES).await?;
            if tx.execute(&st, &[&rows.applied_changes]).await? as usize != rows.applied_changes.len() {
                return Err(Failure::Store(StoreError::Conflict(format!(
                    "change {} was applied already",
                    rows.applied_changes.join(", ")
                ))));
            }
            Ok(())
        },
        async {
            if rows.remove_tasks.is_empty() {
                return Ok::<(), Failure>(());
            }
            let st = tx.prepare_cached(DELETE_TASKS).await?;
            tx.execute(&st, &[&rows.remove_tasks]).await?;
            Ok(())
        },
        async {
            if rows.add_tasks.is_empty() {
                return Ok::<(), Failure>(());
            }
            insert_tasks(tx, &rows.add_tasks, rows.reserve_for).await
        },
        async {
            if rows.remove_timers.is_empty() {
                return Ok::<(), Failure>(());
            }
            let (runs, steps): (Vec<&str>, Vec<&str>) = rows.remove_timers.iter().copied().unzip();
            let st = tx.prepare_cached(DELETE_TIMERS).await?;
            tx.execute(&st, &[&runs, &steps]).await?;
            Ok(())
        },
        async {
            if rows.add_timers.is_empty() {
                return Ok::<(), Failure>(());
            }
            upsert_timers(tx, &rows.add_timers).await
        },
    );
    settled?;
    changes?;
    removed?;
    added?;
    unset?;
    set?;
    for u in &rows.usage {
        let st = tx
            .prepare_cached(
                "INSERT INTO usage (id, tenant, at_ms, api_key, source, route, target, provider, model,
                     attempt, input_tokens, output_tokens, cost_usd, latency_us, outcome, experiment, arm,
                     run_id, workflow_id, step)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                     $19, $20)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let attempt = i64::from(u.attempt);
        let (input, output, latency) = (
            to_i64(u.input_tokens, "input_tokens")?,
            to_i64(u.output_tokens, "output_tokens")?,
            to_i64(u.latency_us, "latency_us")?,
        );
        tx.execute(
            &st,
            &[
                &u.id,
                &u.tenant,
                &u.at_ms,
                &u.api_key,
                &u.source,
                &u.route,
                &u.target,
                &u.provider,
                &u.model,
                &attempt,
                &input,
                &output,
                &u.cost_usd,
                &latency,
                &u.outcome,
                &u.experiment,
                &u.arm,
                &u.run_id,
                &u.workflow_id,
                &u.step,
            ],
        )
        .await?;
    }
    for a in &rows.alerts {
        let st = tx
            .prepare_cached(
                "INSERT INTO budget_alerts (tenant, budget, period_start_ms, level, limit_usd, spent_usd, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (tenant, budget, period_start_ms, level) DO NOTHING",
            )
            .await?;
        tx.execute(&st, &[&a.tenant, &a.budget, &a.period_start_ms, &a.level, &a.limit_usd, &a.spent_usd, &a.at_ms])
            .await?;
    }
    let wakes = wakes(&rows.add_tasks, rows.reserve_for);
    if !wakes.is_empty() {
        // Delivered when the transaction commits, and only then: nothing leaves before it is durable.
        let st = tx.prepare_cached("SELECT pg_notify('sluice', w) FROM unnest($1::text[]) AS w").await?;
        tx.query(&st, &[&wakes]).await?;
    }
    Ok(())
}

/// Deletes the tasks a batch records the outcome of; each must be pending, with a posted answer
/// exactly when the batch records that one.
async fn settle(tx: &Transaction<'_>, settles: &[&Settle]) -> Result<(), Failure> {
    let ids = column(settles, |s| s.task_id.as_str());
    let posted = column(settles, |s| s.posted);
    let st = tx.prepare_cached(SETTLE_TASKS).await?;
    let n = tx.execute(&st, &[&ids, &posted]).await?;
    if n as usize != settles.len() {
        return Err(Failure::Store(StoreError::Conflict(format!(
            "task {} is no longer pending here: it was finished, or answered on another node",
            ids.join(", ")
        ))));
    }
    Ok(())
}

/// The wake-ups a batch sends: worker tasks added to the shared queue, per queue. (A `NOTIFY`
/// holds a lock that serializes committing transactions until they end, so batches send none
/// in the usual case: their tasks are reserved for the writer, and the engine tells of ended
/// runs after the commit, many in one statement.)
fn wakes(tasks: &[&TaskRow], reserve_for: Option<i64>) -> Vec<String> {
    let mut queues: Vec<(&str, &str, u32)> = Vec::new();
    // Tasks reserved for the writer wake no one: it releases those its workers do not take.
    let unreserved = if reserve_for.is_some() { &[][..] } else { tasks };
    for t in unreserved.iter().filter(|t| t.kind == TaskKind::Worker) {
        match queues.iter_mut().find(|(tenant, queue, _)| *tenant == t.tenant && *queue == t.queue) {
            Some(q) => q.2 += 1,
            None => queues.push((&t.tenant, &t.queue, 1)),
        }
    }
    let tasks =
        queues.into_iter().map(|(tenant, queue, n)| Wake::Tasks { tenant: tenant.into(), queue: queue.into(), n });
    tasks.map(|w| w.encode()).collect()
}

async fn apply_exec(tx: &Transaction<'_>, i: usize, change: &ExecChange) -> Result<(), Failure> {
    let row = &change.row;
    if let Some(gap) = change.events.windows(2).find(|w| w[1].seq != w[0].seq + 1) {
        return Err(Failure::Store(StoreError::Conflict(format!(
            "run {}: events {} and {} of a batch are not consecutive",
            row.run_id, gap[0].seq, gap[1].seq
        ))));
    }
    if change.create {
        insert_exec(tx, change).await?;
    } else {
        update_exec(tx, i, change).await?;
    }
    insert_events(tx, &[change]).await
}

async fn insert_exec(tx: &Transaction<'_>, change: &ExecChange) -> Result<(), Failure> {
    // DO NOTHING rather than an error: the transaction stays usable to ask which run is running.
    // Under READ COMMITTED a racing insert of the same workflow id waits here for the other
    // transaction and then sees its outcome.
    if insert_execs(tx, &[change]).await?.len() == 1 {
        return Ok(());
    }
    Err(Failure::Store(match running_run(tx, change).await? {
        Some(running) => StoreError::AlreadyRunning(running),
        None => StoreError::Conflict(format!("run {} already exists", change.row.run_id)),
    }))
}

async fn update_exec(tx: &Transaction<'_>, i: usize, change: &ExecChange) -> Result<(), Failure> {
    let row = &change.row;
    match update_execs(tx, &[change]).await {
        Ok(updated) if updated.len() == 1 => Ok(()),
        Ok(_) => {
            let st =
                tx.prepare_cached("SELECT next_seq, owner FROM executions WHERE run_id = $1 AND tenant = $2").await?;
            let stored = tx.query_opt(&st, &[&row.run_id, &change.tenant]).await?;
            match stored {
                None => Err(Failure::Store(StoreError::NotFound)),
                Some(stored) => {
                    let owner: Option<i64> = stored.try_get(1)?;
                    if let (Some(owner), Some(fence)) = (owner, change.fence) {
                        if owner != fence {
                            return Err(Failure::Store(StoreError::Conflict(format!(
                                "run {}: fenced: it is owned by node epoch {owner}, not {fence}",
                                row.run_id
                            ))));
                        }
                    }
                    let stored: i64 = stored.try_get(0)?;
                    let expected = change.events.first().map_or(0, |e| e.seq);
                    Err(Failure::Store(StoreError::Conflict(format!(
                        "run {}: the history continues at event {stored}, the batch starts at {expected}; reload and retry",
                        row.run_id
                    ))))
                }
            }
        }
        // Back to running (a redrive) while another run of the workflow id runs.
        Err(Failure::Db(e)) if is_unique_violation(&e) => Err(Failure::Running(i, e)),
        Err(e) => Err(e),
    }
}

/// The run of the change's workflow id that is running, other than the change's own.
async fn running_run(tx: &Transaction<'_>, change: &ExecChange) -> Result<Option<String>, StoreError> {
    let st = tx
        .prepare_cached(
            "SELECT run_id FROM executions
             WHERE tenant = $1 AND workflow_id = $2 AND status = 'running' AND run_id <> $3",
        )
        .await
        .map_err(db_err)?;
    let row =
        tx.query_opt(&st, &[&change.tenant, &change.row.workflow_id, &change.row.run_id]).await.map_err(db_err)?;
    row.map(|r| r.try_get(0)).transpose().map_err(db_err)
}

/// Every update checks that the history continues where its batch begins and that the writer
/// owns the run (as a lone batch's does); returns the runs that matched.
pub(crate) async fn update_execs(tx: &Transaction<'_>, changes: &[&ExecChange]) -> Result<Vec<String>, Failure> {
    let mut runs = Vec::with_capacity(changes.len());
    let mut tenants = Vec::with_capacity(changes.len());
    let mut statuses = Vec::with_capacity(changes.len());
    let mut paused = Vec::with_capacity(changes.len());
    let mut dead = Vec::with_capacity(changes.len());
    let mut outputs = Vec::with_capacity(changes.len());
    let mut errors = Vec::with_capacity(changes.len());
    let mut failed_steps = Vec::with_capacity(changes.len());
    let mut next_seqs = Vec::with_capacity(changes.len());
    let mut updated = Vec::with_capacity(changes.len());
    let mut expected = Vec::with_capacity(changes.len());
    let mut fences = Vec::with_capacity(changes.len());
    for c in changes {
        let row = &c.row;
        runs.push(row.run_id.as_str());
        tenants.push(c.tenant.as_str());
        statuses.push(row.status.as_str());
        paused.push(row.paused);
        dead.push(row.dead_letter);
        outputs.push(opt_json(row.output.as_ref())?);
        errors.push(opt_json(row.error.as_ref())?);
        failed_steps.push(row.failed_step.as_deref());
        next_seqs.push(to_i64(row.next_seq, "next_seq")?);
        updated.push(row.updated_at_ms);
        expected.push(c.events.first().map(|e| to_i64(e.seq, "event seq")).transpose()?);
        fences.push(c.fence);
    }
    let st = tx.prepare_cached(UPDATE_EXECS).await?;
    let returned = tx
        .query(
            &st,
            &[
                &runs,
                &tenants,
                &statuses,
                &paused,
                &dead,
                &outputs,
                &errors,
                &failed_steps,
                &next_seqs,
                &updated,
                &expected,
                &fences,
            ],
        )
        .await?;
    returned.iter().map(|r| r.try_get(0).map_err(Failure::from)).collect()
}

/// New runs; one whose workflow id is running already is skipped (`DO NOTHING`). Returns the
/// runs inserted.
pub(crate) async fn insert_execs(tx: &Transaction<'_>, changes: &[&ExecChange]) -> Result<Vec<String>, Failure> {
    let mut runs = Vec::with_capacity(changes.len());
    let mut tenants = Vec::with_capacity(changes.len());
    let mut workflow_ids = Vec::with_capacity(changes.len());
    let mut workflows = Vec::with_capacity(changes.len());
    let mut versions = Vec::with_capacity(changes.len());
    let mut statuses = Vec::with_capacity(changes.len());
    let mut paused = Vec::with_capacity(changes.len());
    let mut dead = Vec::with_capacity(changes.len());
    let mut inputs = Vec::with_capacity(changes.len());
    let mut outputs = Vec::with_capacity(changes.len());
    let mut errors = Vec::with_capacity(changes.len());
    let mut failed_steps = Vec::with_capacity(changes.len());
    let mut parents = Vec::with_capacity(changes.len());
    let mut next_seqs = Vec::with_capacity(changes.len());
    let mut created = Vec::with_capacity(changes.len());
    let mut updated = Vec::with_capacity(changes.len());
    let mut owners = Vec::with_capacity(changes.len());
    let mut started_by = Vec::with_capacity(changes.len());
    let mut private = Vec::with_capacity(changes.len());
    let mut scopes = Vec::with_capacity(changes.len());
    for c in changes {
        let row = &c.row;
        runs.push(row.run_id.as_str());
        tenants.push(c.tenant.as_str());
        workflow_ids.push(row.workflow_id.as_str());
        workflows.push(row.workflow.as_str());
        versions.push(row.version.as_str());
        statuses.push(row.status.as_str());
        paused.push(row.paused);
        dead.push(row.dead_letter);
        inputs.push(to_json(&row.input)?);
        outputs.push(opt_json(row.output.as_ref())?);
        errors.push(opt_json(row.error.as_ref())?);
        failed_steps.push(row.failed_step.as_deref());
        parents.push(opt_json(row.parent.as_ref())?);
        next_seqs.push(to_i64(row.next_seq, "next_seq")?);
        created.push(row.created_at_ms);
        updated.push(row.updated_at_ms);
        owners.push(c.fence);
        started_by.push(row.access.owner.as_deref());
        private.push(row.access.visibility == Visibility::Private);
        scopes.push(if row.access.scope.is_empty() { None } else { Some(to_json(&row.access.scope)?) });
    }
    let st = tx.prepare_cached(INSERT_EXECS).await?;
    let returned = tx
        .query(
            &st,
            &[
                &runs,
                &tenants,
                &workflow_ids,
                &workflows,
                &versions,
                &statuses,
                &paused,
                &dead,
                &inputs,
                &outputs,
                &errors,
                &failed_steps,
                &parents,
                &next_seqs,
                &created,
                &updated,
                &owners,
                &started_by,
                &private,
                &scopes,
            ],
        )
        .await?;
    returned.iter().map(|r| r.try_get(0).map_err(Failure::from)).collect()
}

/// The events of every change; one already stored fails the statement with `Conflict`.
pub(crate) async fn insert_events(tx: &Transaction<'_>, changes: &[&ExecChange]) -> Result<(), Failure> {
    let n: usize = changes.iter().map(|c| c.events.len()).sum();
    if n == 0 {
        return Ok(());
    }
    let (mut runs, mut seqs, mut ats, mut data) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for c in changes {
        for e in &c.events {
            runs.push(c.row.run_id.as_str());
            seqs.push(to_i64(e.seq, "event seq")?);
            ats.push(e.at_ms);
            data.push(to_json(e)?);
        }
    }
    let st = tx.prepare_cached(INSERT_EVENTS).await?;
    match tx.execute(&st, &[&runs, &seqs, &ats, &data]).await {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => {
            let mut runs: Vec<&str> = changes.iter().map(|c| c.row.run_id.as_str()).collect();
            runs.dedup();
            Err(Failure::Store(StoreError::Conflict(format!(
                "run {}: an event of the batch is already stored",
                runs.join(", ")
            ))))
        }
        Err(e) => Err(Failure::Db(e)),
    }
}

/// The fencing epoch of the node writing a batch (all its changes carry the same).
pub(crate) fn writer_epoch(batch: &Batch) -> Option<i64> {
    batch.execs.iter().find_map(|c| c.fence)
}

/// Worker tasks written by a node are reserved for it (`claimed_by`, no claim deadline): it hands
/// them to its workers from memory and releases those they do not take. Without a node they go
/// to the shared queue at once.
async fn insert_tasks(tx: &Transaction<'_>, tasks: &[&TaskRow], reserve_for: Option<i64>) -> Result<(), Failure> {
    let ids = column(tasks, |t| t.id.as_str());
    let tenants = column(tasks, |t| t.tenant.as_str());
    let queues = column(tasks, |t| t.queue.as_str());
    let kinds = try_column(tasks, |t| enum_name(&t.kind))?;
    let runs = column(tasks, |t| t.run_id.as_str());
    let workflow_ids = column(tasks, |t| t.workflow_id.as_str());
    let steps = column(tasks, |t| t.step.as_str());
    let attempts = column(tasks, |t| i64::from(t.attempt));
    let inputs = try_column(tasks, |t| to_json(&t.input))?;
    let visible = column(tasks, |t| t.visible_at_ms);
    let to_start = try_column(tasks, |t| opt_to_i64(t.schedule_to_start_ms, "schedule_to_start_ms"))?;
    let to_close = try_column(tasks, |t| to_i64(t.start_to_close_ms, "start_to_close_ms"))?;
    let heartbeats = try_column(tasks, |t| opt_to_i64(t.heartbeat_ms, "heartbeat_ms"))?;
    let created = column(tasks, |t| t.created_at_ms);
    let traces = column(tasks, |t| t.trace_id.as_deref());
    let st = tx.prepare_cached(INSERT_TASKS).await?;
    let inserted = tx
        .execute(
            &st,
            &[
                &ids,
                &tenants,
                &queues,
                &kinds,
                &runs,
                &workflow_ids,
                &steps,
                &attempts,
                &inputs,
                &visible,
                &to_start,
                &to_close,
                &heartbeats,
                &created,
                &traces,
                &reserve_for,
            ],
        )
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => {
            let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or("a task of the batch");
            Err(Failure::Store(StoreError::Conflict(format!("task already exists: {detail}"))))
        }
        Err(e) => Err(Failure::Db(e)),
    }
}

/// Adds timers, replacing a timer of the same run and step; of two in one batch the last wins.
async fn upsert_timers(tx: &Transaction<'_>, timers: &[&TimerRow]) -> Result<(), Failure> {
    // One statement may not touch a row twice, so earlier duplicates are dropped first.
    let mut seen = HashSet::new();
    let mut last =
        timers.iter().rev().filter(|t| seen.insert((t.run_id.as_str(), t.step.as_str()))).collect::<Vec<_>>();
    last.reverse();
    let runs = column(&last, |t| t.run_id.as_str());
    let steps = column(&last, |t| t.step.as_str());
    let tenants = column(&last, |t| t.tenant.as_str());
    let workflow_ids = column(&last, |t| t.workflow_id.as_str());
    let fire_at = column(&last, |t| t.fire_at_ms);
    let st = tx.prepare_cached(UPSERT_TIMERS).await?;
    tx.execute(&st, &[&runs, &steps, &tenants, &workflow_ids, &fire_at]).await?;
    Ok(())
}

/// One column of `rows`, to bind as an array and `unnest` into many rows in one statement.
fn column<'a, R, T>(rows: &'a [R], f: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

fn try_column<'a, R, T>(rows: &'a [R], f: impl Fn(&'a R) -> Result<T, StoreError>) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}
