//! The schema and its migrations. `schema_migrations` holds one row per migration applied; all
//! pending migrations run in one transaction under an advisory lock, so that nodes starting at
//! once migrate one after the other, and a database newer than this build is refused.

use deadpool_postgres::Client;
use sluice_store::StoreError;

use crate::error::db_err;

/// Key of the transaction-level advisory lock that serialises migrations ("sluice" and 1).
const MIGRATION_LOCK: i64 = 0x736c_7569_6365_0001;

/// Migration `i` brings the schema from version `i` to `i + 1`. Never edit one that shipped.
///
/// Keys and names use the "C" collation: ordering (`list_executions` by run id, workflows by
/// name) is by bytes, as in SQLite, whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    // 1: the tables.
    r#"
    CREATE TABLE workflows (
        tenant        TEXT COLLATE "C" NOT NULL,
        name          TEXT COLLATE "C" NOT NULL,
        version       TEXT COLLATE "C" NOT NULL,
        definition    TEXT   NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, name, version)
    );

    CREATE TABLE executions (
        run_id        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tenant        TEXT COLLATE "C" NOT NULL,
        workflow_id   TEXT COLLATE "C" NOT NULL,
        workflow      TEXT COLLATE "C" NOT NULL,
        version       TEXT COLLATE "C" NOT NULL,
        status        TEXT    NOT NULL,
        paused        BOOLEAN NOT NULL,
        dead_letter   BOOLEAN NOT NULL,
        input         TEXT    NOT NULL,
        output        TEXT,
        error         TEXT,
        failed_step   TEXT,
        parent        TEXT,
        next_seq      BIGINT  NOT NULL,
        created_at_ms BIGINT  NOT NULL,
        updated_at_ms BIGINT  NOT NULL
    );
    -- Idempotent start: at most one running run per workflow id.
    CREATE UNIQUE INDEX executions_running ON executions (tenant, workflow_id) WHERE status = 'running';
    CREATE INDEX executions_by_tenant ON executions (tenant, run_id);
    CREATE INDEX executions_by_workflow_id ON executions (tenant, workflow_id, run_id);
    CREATE INDEX executions_by_workflow ON executions (tenant, workflow, run_id);
    CREATE INDEX executions_dead_letter ON executions (tenant, run_id) WHERE dead_letter;

    CREATE TABLE events (
        run_id TEXT COLLATE "C" NOT NULL,
        seq    BIGINT NOT NULL,
        at_ms  BIGINT NOT NULL,
        data   TEXT   NOT NULL,
        PRIMARY KEY (run_id, seq)
    );

    CREATE TABLE tasks (
        id                   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tenant               TEXT COLLATE "C" NOT NULL,
        queue                TEXT   NOT NULL,
        kind                 TEXT   NOT NULL,
        run_id               TEXT COLLATE "C" NOT NULL,
        workflow_id          TEXT COLLATE "C" NOT NULL,
        step                 TEXT COLLATE "C" NOT NULL,
        attempt              BIGINT NOT NULL,
        input                TEXT   NOT NULL,
        visible_at_ms        BIGINT NOT NULL,
        schedule_to_start_ms BIGINT,
        start_to_close_ms    BIGINT NOT NULL,
        heartbeat_ms         BIGINT,
        created_at_ms        BIGINT NOT NULL
    );

    CREATE TABLE timers (
        run_id      TEXT COLLATE "C" NOT NULL,
        step        TEXT COLLATE "C" NOT NULL,
        tenant      TEXT COLLATE "C" NOT NULL,
        workflow_id TEXT COLLATE "C" NOT NULL,
        fire_at_ms  BIGINT NOT NULL,
        PRIMARY KEY (run_id, step)
    );
    "#,
    // 2: the usage ledger of AI gateway calls and budget alerts.
    r#"
    CREATE TABLE usage (
        id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tenant        TEXT COLLATE "C" NOT NULL,
        at_ms         BIGINT NOT NULL,
        api_key       TEXT COLLATE "C",
        source        TEXT   NOT NULL,
        route         TEXT   NOT NULL,
        target        TEXT   NOT NULL,
        provider      TEXT   NOT NULL,
        model         TEXT   NOT NULL,
        attempt       BIGINT NOT NULL,
        input_tokens  BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_usd      DOUBLE PRECISION,
        latency_us    BIGINT NOT NULL,
        outcome       TEXT   NOT NULL,
        experiment    TEXT,
        arm           TEXT,
        run_id        TEXT COLLATE "C",
        workflow_id   TEXT COLLATE "C",
        step          TEXT
    );
    CREATE INDEX usage_by_tenant ON usage (tenant, id);
    CREATE INDEX usage_by_time ON usage (tenant, at_ms);
    CREATE INDEX usage_by_key ON usage (tenant, api_key, at_ms) WHERE api_key IS NOT NULL;
    CREATE INDEX usage_by_run ON usage (tenant, run_id, id) WHERE run_id IS NOT NULL;

    CREATE TABLE budget_alerts (
        tenant          TEXT COLLATE "C" NOT NULL,
        budget          TEXT COLLATE "C" NOT NULL,
        period_start_ms BIGINT NOT NULL,
        level           TEXT COLLATE "C" NOT NULL,
        limit_usd       DOUBLE PRECISION NOT NULL,
        spent_usd       DOUBLE PRECISION NOT NULL,
        at_ms           BIGINT NOT NULL,
        PRIMARY KEY (tenant, budget, period_start_ms, level)
    );
    "#,
    // 3: the identity directory and the audit log.
    r#"
    CREATE TABLE docs (
        tenant        TEXT COLLATE "C" NOT NULL,
        kind          TEXT COLLATE "C" NOT NULL,
        id            TEXT COLLATE "C" NOT NULL,
        body          TEXT   NOT NULL,
        version       BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, kind, id)
    );
    CREATE INDEX docs_by_id ON docs (kind, id);

    CREATE TABLE audit (
        id        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tenant    TEXT COLLATE "C" NOT NULL,
        at_ms     BIGINT  NOT NULL,
        actor     TEXT COLLATE "C" NOT NULL,
        role      TEXT,
        action    TEXT    NOT NULL,
        target    TEXT    NOT NULL,
        status    INTEGER NOT NULL,
        source_ip TEXT,
        trace_id  TEXT
    );
    CREATE INDEX audit_by_tenant ON audit (tenant, id);
    "#,
    // 4: the trace id of the execution a task belongs to, handed to workers.
    r#"
    ALTER TABLE tasks ADD COLUMN trace_id TEXT;
    "#,
    // 5: running runs per workflow, counted for concurrency limits.
    r#"
    CREATE INDEX executions_running_by_workflow ON executions (tenant, workflow) WHERE status = 'running';
    "#,
    // 6: node leases and fencing epochs: each running execution is owned by one node's epoch.
    r#"
    CREATE TABLE nodes (
        epoch         BIGSERIAL PRIMARY KEY,
        node          TEXT   NOT NULL,
        started_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        url           TEXT
    );
    CREATE INDEX nodes_by_name ON nodes (node);
    ALTER TABLE executions ADD COLUMN owner BIGINT;
    CREATE INDEX executions_running_by_owner ON executions (owner) WHERE status = 'running';
    "#,
    // 7: task queues shared by the nodes (claims, answers posted for the owner, deadlines), and
    // changes to runs posted for their owner.
    r#"
    ALTER TABLE tasks ADD COLUMN claimed_by BIGINT;
    ALTER TABLE tasks ADD COLUMN claim_until_ms BIGINT;
    ALTER TABLE tasks ADD COLUMN heartbeat_until_ms BIGINT;
    ALTER TABLE tasks ADD COLUMN deadline_ms BIGINT;
    ALTER TABLE tasks ADD COLUMN outcome TEXT;
    UPDATE tasks SET deadline_ms = visible_at_ms + schedule_to_start_ms WHERE kind = 'worker';
    CREATE INDEX tasks_claimable ON tasks (tenant, queue, visible_at_ms) WHERE claimed_by IS NULL AND kind = 'worker';
    CREATE INDEX tasks_by_deadline ON tasks (deadline_ms) WHERE outcome IS NULL AND deadline_ms IS NOT NULL;
    CREATE INDEX tasks_with_outcome ON tasks (run_id) WHERE outcome IS NOT NULL;
    CREATE TABLE changes (
        id     TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tenant TEXT COLLATE "C" NOT NULL,
        run_id TEXT COLLATE "C" NOT NULL,
        body   TEXT NOT NULL
    );
    CREATE INDEX changes_by_run ON changes (run_id);
    "#,
    // 8: who started each execution and who may see it (`started_by`: `user:<email>` or
    // `key:<id>`; `scope`: a JSON array of the workflows of its ancestors).
    r#"
    ALTER TABLE executions ADD COLUMN started_by TEXT;
    ALTER TABLE executions ADD COLUMN private BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE executions ADD COLUMN scope TEXT;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Refuses a server that acknowledges commits before they are on disk: the store promises that
/// a committed batch survives a crash.
pub(crate) async fn check_durability(client: &Client) -> Result<(), StoreError> {
    let row = client.query_one("SHOW synchronous_commit", &[]).await.map_err(db_err)?;
    let mode: String = row.try_get(0).map_err(db_err)?;
    if mode.eq_ignore_ascii_case("off") {
        return Err(StoreError::Internal(
            "postgres has synchronous_commit = off, so a commit could be lost in a crash; \
             set it to on (or local, remote_write, remote_apply) for the sluice database or role"
                .into(),
        ));
    }
    Ok(())
}

/// Brings the database to `SCHEMA_VERSION`.
pub(crate) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db_err)?;
    // Held until commit or rollback: a second node waits here, then finds the work done.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER     NOT NULL PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db_err)?;
    let row = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await.map_err(db_err)?;
    let current: i32 = row.try_get(0).map_err(db_err)?;
    let current = usize::try_from(current)
        .map_err(|_| StoreError::Internal(format!("invalid schema version {current} in schema_migrations")))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "the database has schema version {current} but this build knows only up to {SCHEMA_VERSION}; \
             run a newer sluice"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i32::try_from(i + 1).map_err(|_| StoreError::Internal("too many migrations".into()))?;
        tx.batch_execute(sql).await.map_err(db_err)?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version]).await.map_err(db_err)?;
        tracing::info!(version, "applied postgres migration");
    }
    tx.commit().await.map_err(db_err)
}
