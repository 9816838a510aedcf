//! The schema and its migrations. `PRAGMA user_version` is the number of migrations applied;
//! each migration runs in its own transaction, and a database newer than this build is refused.

use rusqlite::{Connection, TransactionBehavior};
use sluice_store::StoreError;

use crate::error::db_err;

/// Migration `i` brings the schema from version `i` to `i + 1`. Never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the tables.
    "
    CREATE TABLE workflows (
        tenant        TEXT    NOT NULL,
        name          TEXT    NOT NULL,
        version       TEXT    NOT NULL,
        definition    TEXT    NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name, version)
    ) STRICT;

    CREATE TABLE executions (
        run_id        TEXT    NOT NULL PRIMARY KEY,
        tenant        TEXT    NOT NULL,
        workflow_id   TEXT    NOT NULL,
        workflow      TEXT    NOT NULL,
        version       TEXT    NOT NULL,
        status        TEXT    NOT NULL,
        paused        INTEGER NOT NULL,
        dead_letter   INTEGER NOT NULL,
        input         TEXT    NOT NULL,
        output        TEXT,
        error         TEXT,
        failed_step   TEXT,
        parent        TEXT,
        next_seq      INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) STRICT;
    -- Idempotent start: at most one running run per workflow id.
    CREATE UNIQUE INDEX executions_running ON executions (tenant, workflow_id) WHERE status = 'running';
    CREATE INDEX executions_by_tenant ON executions (tenant, run_id);
    CREATE INDEX executions_by_workflow_id ON executions (tenant, workflow_id, run_id);
    CREATE INDEX executions_by_workflow ON executions (tenant, workflow, run_id);
    CREATE INDEX executions_dead_letter ON executions (tenant, run_id) WHERE dead_letter = 1;

    CREATE TABLE events (
        run_id TEXT    NOT NULL,
        seq    INTEGER NOT NULL,
        at_ms  INTEGER NOT NULL,
        data   TEXT    NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID, STRICT;

    CREATE TABLE tasks (
        id                   TEXT    NOT NULL PRIMARY KEY,
        tenant               TEXT    NOT NULL,
        queue                TEXT    NOT NULL,
        kind                 TEXT    NOT NULL,
        run_id               TEXT    NOT NULL,
        workflow_id          TEXT    NOT NULL,
        step                 TEXT    NOT NULL,
        attempt              INTEGER NOT NULL,
        input                TEXT    NOT NULL,
        visible_at_ms        INTEGER NOT NULL,
        schedule_to_start_ms INTEGER,
        start_to_close_ms    INTEGER NOT NULL,
        heartbeat_ms         INTEGER,
        created_at_ms        INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE timers (
        run_id      TEXT    NOT NULL,
        step        TEXT    NOT NULL,
        tenant      TEXT    NOT NULL,
        workflow_id TEXT    NOT NULL,
        fire_at_ms  INTEGER NOT NULL,
        PRIMARY KEY (run_id, step)
    ) WITHOUT ROWID, STRICT;
    ",
    // 2: the usage ledger of AI gateway calls and budget alerts.
    "
    CREATE TABLE usage (
        id            TEXT    NOT NULL PRIMARY KEY,
        tenant        TEXT    NOT NULL,
        at_ms         INTEGER NOT NULL,
        api_key       TEXT,
        source        TEXT    NOT NULL,
        route         TEXT    NOT NULL,
        target        TEXT    NOT NULL,
        provider      TEXT    NOT NULL,
        model         TEXT    NOT NULL,
        attempt       INTEGER NOT NULL,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_usd      REAL,
        latency_us    INTEGER NOT NULL,
        outcome       TEXT    NOT NULL,
        experiment    TEXT,
        arm           TEXT,
        run_id        TEXT,
        workflow_id   TEXT,
        step          TEXT
    ) STRICT;
    CREATE INDEX usage_by_tenant ON usage (tenant, id);
    CREATE INDEX usage_by_time ON usage (tenant, at_ms);
    CREATE INDEX usage_by_key ON usage (tenant, api_key, at_ms) WHERE api_key IS NOT NULL;
    CREATE INDEX usage_by_run ON usage (tenant, run_id, id) WHERE run_id IS NOT NULL;

    CREATE TABLE budget_alerts (
        tenant          TEXT    NOT NULL,
        budget          TEXT    NOT NULL,
        period_start_ms INTEGER NOT NULL,
        level           TEXT    NOT NULL,
        limit_usd       REAL    NOT NULL,
        spent_usd       REAL    NOT NULL,
        at_ms           INTEGER NOT NULL,
        PRIMARY KEY (tenant, budget, period_start_ms, level)
    ) WITHOUT ROWID, STRICT;
    ",
    // 3: the identity directory and the audit log.
    "
    CREATE TABLE docs (
        tenant        TEXT    NOT NULL,
        kind          TEXT    NOT NULL,
        id            TEXT    NOT NULL,
        body          TEXT    NOT NULL,
        version       INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, kind, id)
    ) WITHOUT ROWID, STRICT;
    CREATE INDEX docs_by_id ON docs (kind, id);

    CREATE TABLE audit (
        id         TEXT    NOT NULL PRIMARY KEY,
        tenant     TEXT    NOT NULL,
        at_ms      INTEGER NOT NULL,
        actor      TEXT    NOT NULL,
        role       TEXT,
        action     TEXT    NOT NULL,
        target     TEXT    NOT NULL,
        status     INTEGER NOT NULL,
        source_ip  TEXT,
        trace_id   TEXT
    ) WITHOUT ROWID, STRICT;
    CREATE INDEX audit_by_tenant ON audit (tenant, id);
    ",
    // 4: the trace id of the execution a task belongs to, handed to workers.
    "
    ALTER TABLE tasks ADD COLUMN trace_id TEXT;
    ",
    // 5: running runs per workflow, counted for concurrency limits.
    "
    CREATE INDEX executions_running_by_workflow ON executions (tenant, workflow) WHERE status = 'running';
    ",
    // 6: node leases and fencing epochs: each running execution is owned by one node's epoch.
    "
    CREATE TABLE nodes (
        epoch         INTEGER PRIMARY KEY AUTOINCREMENT,
        node          TEXT    NOT NULL,
        started_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        url           TEXT
    ) STRICT;
    CREATE INDEX nodes_by_name ON nodes (node);
    ALTER TABLE executions ADD COLUMN owner INTEGER;
    CREATE INDEX executions_running_by_owner ON executions (owner) WHERE status = 'running';
    ",
    // 7: who started each execution and who may see it (`started_by`: `user:<email>` or
    // `key:<id>`; `scope`: a JSON array of the workflows of its ancestors).
    "
    ALTER TABLE executions ADD COLUMN started_by TEXT;
    ALTER TABLE executions ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN scope TEXT;
    ",
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Brings the database to `SCHEMA_VERSION`.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        // IMMEDIATE: a second process opening the same file waits instead of migrating twice.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let current = schema_version(&tx)?;
        let Some(sql) = MIGRATIONS.get(current) else {
            if current > SCHEMA_VERSION {
                return Err(StoreError::Internal(format!(
                    "the database has schema version {current} but this build knows only up to \
                     {SCHEMA_VERSION}; run a newer sluice"
                )));
            }
            return Ok(());
        };
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", current + 1).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
}

pub(crate) fn schema_version(conn: &Connection) -> Result<usize, StoreError> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db_err)?;
    usize::try_from(v).map_err(|_| StoreError::Internal(format!("invalid schema version {v}")))
}
