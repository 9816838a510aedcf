//! Task queues shared by every node on the database: claims with `FOR UPDATE SKIP LOCKED`,
//! answers posted for the owning node, timeouts found by deadline, and wake-ups through
//! `LISTEN`/`NOTIFY` on one channel.
//!
//! A claim is written with `synchronous_commit` off: losing one in a database crash only means
//! the task is claimed again (delivery is at least once, with the same idempotency key). A posted
//! answer is written like any commit: when `post_outcome` returns it survives a crash.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::Pool;
use sluice_store::{
    timeout_kind, PostedChange, QueueDepth, RunChange, StoreError, TaskOutcome, TaskRow, Wake, WakeSink,
};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::codec::{from_json, to_json};
use crate::error::{db_err, describe, pool_err};
use crate::read::{get, query, task_row, TASK_COLUMNS};

/// The one channel every node listens on.
pub(crate) const CHANNEL: &str = "sluice";

pub(crate) async fn claim(
    pool: &Pool,
    tenant: &str,
    queue: &str,
    max: usize,
    now_ms: i64,
    epoch: i64,
) -> Result<Vec<TaskRow>, StoreError> {
    let max = i64::try_from(max.clamp(1, 1000)).unwrap_or(1000);
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    tx.batch_execute("SET LOCAL synchronous_commit = off").await.map_err(db_err)?;
    let sql = format!(
        "UPDATE tasks t SET claimed_by = $5, claim_until_ms = $4 + t.start_to_close_ms,
             heartbeat_until_ms = $4 + t.heartbeat_ms,
             deadline_ms = LEAST($4 + t.start_to_close_ms, $4 + t.heartbeat_ms)
         FROM (SELECT id FROM tasks
               WHERE tenant = $1 AND queue = $2 AND kind = 'worker' AND claimed_by IS NULL AND visible_at_ms <= $4
               ORDER BY visible_at_ms LIMIT $3
               FOR UPDATE SKIP LOCKED) c
         WHERE t.id = c.id
         RETURNING {TASK_COLUMNS}"
    );
    let st = tx.prepare_cached(&sql).await.map_err(db_err)?;
    let rows = tx.query(&st, &[&tenant, &queue, &max, &now_ms, &epoch]).await.map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    let mut tasks = rows.iter().map(task_row).collect::<Result<Vec<_>, _>>()?;
    tasks.sort_by(|a, b| a.visible_at_ms.cmp(&b.visible_at_ms).then_with(|| a.id.cmp(&b.id)));
    Ok(tasks)
}

pub(crate) async fn release(pool: &Pool, epoch: i64, ids: &[String]) -> Result<Vec<String>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "WITH released AS (
                 UPDATE tasks SET claimed_by = NULL,
                     deadline_ms = CASE WHEN kind = 'worker' THEN visible_at_ms + schedule_to_start_ms END
                 WHERE id = ANY($1::text[]) AND claimed_by = $2 AND claim_until_ms IS NULL AND outcome IS NULL
                 RETURNING id, tenant, queue),
             woken AS (
                 SELECT pg_notify('sluice', json_build_array('t', tenant, queue, count(*))::text)
                 FROM released GROUP BY tenant, queue)
             SELECT id FROM released WHERE (SELECT count(*) FROM woken) >= 0",
        )
        .await
        .map_err(db_err)?;
    let rows = client.query(&st, &[&ids, &epoch]).await.map_err(db_err)?;
    rows.iter().map(|r| get(r, 0)).collect()
}

pub(crate) async fn live_nodes(pool: &Pool) -> Result<u64, StoreError> {
    let rows = query(
        pool,
        "SELECT count(*) FROM nodes WHERE expires_at_ms >= (extract(epoch from clock_timestamp()) * 1000)::bigint",
        &[],
    )
    .await?;
    let n: i64 = rows.first().map(|r| get(r, 0)).transpose()?.unwrap_or(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn heartbeat(pool: &Pool, tenant: &str, id: &str, now_ms: i64) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "UPDATE tasks SET heartbeat_until_ms = $3 + heartbeat_ms, deadline_ms = LEAST(claim_until_ms, $3 + heartbeat_ms)
             WHERE id = $1 AND tenant = $2 AND claimed_by IS NOT NULL AND outcome IS NULL",
        )
        .await
        .map_err(db_err)?;
    Ok(client.execute(&st, &[&id, &tenant, &now_ms]).await.map_err(db_err)? == 1)
}

/// Sets the answer once and wakes the owner, in one statement.
pub(crate) async fn post(pool: &Pool, tenant: &str, id: &str, outcome: &TaskOutcome) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "WITH t AS (
                 UPDATE tasks SET outcome = $3, deadline_ms = NULL
                 WHERE id = $1 AND tenant = $2 AND claimed_by IS NOT NULL AND outcome IS NULL
                 RETURNING run_id)
             SELECT pg_notify('sluice', json_build_array('o', e.owner)::text)
             FROM t LEFT JOIN executions e ON e.run_id = t.run_id",
        )
        .await
        .map_err(db_err)?;
    let rows = client.query(&st, &[&id, &tenant, &to_json(outcome)?]).await.map_err(db_err)?;
    Ok(rows.len() == 1)
}

/// Candidates are found first from their own (small, indexed) side and their runs' owners
/// checked after, by primary key: a join could lead the planner to scan every execution.
const CANDIDATES: i64 = 5_000;

/// Of `run_ids`, those owned by `epoch` (and running, when `running`).
async fn owned(pool: &Pool, epoch: i64, run_ids: Vec<String>, running: bool) -> Result<HashSet<String>, StoreError> {
    if run_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = query(
        pool,
        "SELECT run_id FROM executions WHERE run_id = ANY($1::text[]) AND owner = $2 AND (status = 'running' OR NOT $3)",
        &[&run_ids, &epoch, &running],
    )
    .await?;
    rows.iter().map(|r| get(r, 0)).collect()
}

pub(crate) async fn posted(pool: &Pool, epoch: i64) -> Result<Vec<(TaskRow, TaskOutcome)>, StoreError> {
    let sql =
        format!("SELECT {TASK_COLUMNS}, t.outcome FROM tasks t WHERE t.outcome IS NOT NULL ORDER BY t.id LIMIT $1");
    let rows = query(pool, &sql, &[&CANDIDATES]).await?;
    let found: Vec<(TaskRow, TaskOutcome)> = rows
        .iter()
        .map(|r| Ok((task_row(r)?, from_json(get::<&str>(r, 15)?, "outcome")?)))
        .collect::<Result<_, StoreError>>()?;
    let mine = owned(pool, epoch, found.iter().map(|(t, _)| t.run_id.clone()).collect(), true).await?;
    Ok(found.into_iter().filter(|(t, _)| mine.contains(&t.run_id)).collect())
}

pub(crate) async fn expired(pool: &Pool, epoch: i64, now_ms: i64) -> Result<Vec<(TaskRow, &'static str)>, StoreError> {
    let sql = format!(
        "SELECT {TASK_COLUMNS}, t.claimed_by IS NOT NULL, COALESCE(t.heartbeat_until_ms <= $1, false)
         FROM tasks t WHERE t.deadline_ms <= $1 AND t.outcome IS NULL ORDER BY t.deadline_ms LIMIT $2"
    );
    let rows = query(pool, &sql, &[&now_ms, &CANDIDATES]).await?;
    let found: Vec<(TaskRow, &'static str)> = rows
        .iter()
        .map(|r| Ok((task_row(r)?, timeout_kind(get(r, 15)?, get(r, 16)?))))
        .collect::<Result<_, StoreError>>()?;
    let mine = owned(pool, epoch, found.iter().map(|(t, _)| t.run_id.clone()).collect(), true).await?;
    Ok(found.into_iter().filter(|(t, _)| mine.contains(&t.run_id)).collect())
}

/// Stores the change only if the tenant has the run, and wakes the run's owner, in one statement.
pub(crate) async fn post_change(
    pool: &Pool,
    tenant: &str,
    run_id: &str,
    id: &str,
    change: &RunChange,
) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client
        .prepare_cached(
            "WITH c AS (
                 INSERT INTO changes (id, tenant, run_id, body)
                 SELECT $3, tenant, run_id, $4 FROM executions WHERE run_id = $2 AND tenant = $1
                 RETURNING run_id)
             SELECT pg_notify('sluice', json_build_array('o', e.owner)::text)
             FROM c JOIN executions e ON e.run_id = c.run_id",
        )
        .await
        .map_err(db_err)?;
    let rows = client.query(&st, &[&tenant, &run_id, &id, &to_json(change)?]).await.map_err(db_err)?;
    Ok(rows.len() == 1)
}

pub(crate) async fn posted_changes(pool: &Pool, epoch: i64) -> Result<Vec<PostedChange>, StoreError> {
    let rows = query(pool, "SELECT id, tenant, run_id, body FROM changes ORDER BY id LIMIT $1", &[&CANDIDATES]).await?;
    let found: Vec<PostedChange> = rows
        .iter()
        .map(|r| {
            Ok(PostedChange {
                id: get(r, 0)?,
                tenant: get(r, 1)?,
                run_id: get(r, 2)?,
                change: from_json(get::<&str>(r, 3)?, "body")?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let mine = owned(pool, epoch, found.iter().map(|c| c.run_id.clone()).collect(), false).await?;
    Ok(found.into_iter().filter(|c| mine.contains(&c.run_id)).collect())
}

pub(crate) async fn drop_change(pool: &Pool, tenant: &str, id: &str) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st = client.prepare_cached("DELETE FROM changes WHERE id = $1 AND tenant = $2").await.map_err(db_err)?;
    Ok(client.execute(&st, &[&id, &tenant]).await.map_err(db_err)? == 1)
}

pub(crate) async fn depths(pool: &Pool, now_ms: i64) -> Result<Vec<QueueDepth>, StoreError> {
    let rows = query(
        pool,
        "SELECT tenant, queue, count(*), min(visible_at_ms) FROM tasks
         WHERE claimed_by IS NULL AND kind = 'worker' AND visible_at_ms <= $1
         GROUP BY tenant, queue",
        &[&now_ms],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(QueueDepth {
                tenant: get(r, 0)?,
                queue: get(r, 1)?,
                ready: u64::try_from(get::<i64>(r, 2)?).unwrap_or(0),
                oldest_visible_ms: get(r, 3)?,
            })
        })
        .collect()
}

/// One statement outside any write: it takes the notification lock only for its own short,
/// read-only transaction.
pub(crate) async fn notify(pool: &Pool, wakes: &[Wake]) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let st =
        client.prepare_cached("SELECT pg_notify('sluice', w) FROM unnest($1::text[]) AS w").await.map_err(db_err)?;
    let payloads: Vec<String> = wakes.iter().map(Wake::encode).collect();
    client.query(&st, &[&payloads]).await.map_err(db_err)?;
    Ok(())
}

/// Listens on its own connection (outside the pool) until the pool is closed; reconnects after a
/// second when the connection is lost, and then says `Resync`.
pub(crate) fn listen(config: tokio_postgres::Config, pool: Pool, sink: WakeSink) {
    tokio::spawn(async move {
        let mut resync = false;
        while !pool.is_closed() {
            match listen_once(&config, &pool, &sink, &mut resync).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "lost the postgres connection that listens for wake-ups; reconnecting")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn listen_once(
    config: &tokio_postgres::Config,
    pool: &Pool,
    sink: &WakeSink,
    resync: &mut bool,
) -> Result<(), String> {
    let (client, mut conn) = config.connect(NoTls).await.map_err(|e| describe(&e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(describe(&e)),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| describe(&e))?;
    if std::mem::replace(resync, true) {
        sink(Wake::Resync);
    }
    loop {
        tokio::select! {
            payload = rx.recv() => match payload.as_deref().map(Wake::decode) {
                Some(Some(w)) => sink(w),
                Some(None) => tracing::debug!(payload, "ignored a wake-up this build does not know"),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => if pool.is_closed() {
                break;
            },
        }
    }
    drop(client);
    driver.await.map_err(|e| e.to_string())?
}
