//! Tests of what is particular to the SQLite backend: group commit, the savepoint per batch,
//! reopening a database and its schema version. The shared behaviour is in `tests/conformance.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::json;
use sluice_core::event::EventKind;
use sluice_core::{Event, ExecStatus};
use sluice_store::{Batch, ExecChange, ExecutionRow, Store, StoreError, TaskRow, WorkflowVersion};
use tokio::task::JoinSet;

use crate::writer::{apply_group, Op, Reply};
use crate::{schema, SqliteStore};

/// A database file in the temp dir, removed with its WAL files when dropped.
struct TempDb(PathBuf);

impl TempDb {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("sluice-sqlite-unit-{}-{}.db", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        remove_db_files(&path);
        Self(path)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        remove_db_files(&self.0);
    }
}

fn remove_db_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

fn row(run_id: &str, workflow_id: &str) -> ExecutionRow {
    ExecutionRow {
        run_id: run_id.into(),
        workflow_id: workflow_id.into(),
        workflow: "orders".into(),
        version: "v1".into(),
        status: ExecStatus::Running,
        paused: false,
        dead_letter: false,
        input: json!({}),
        output: None,
        error: None,
        failed_step: None,
        parent: None,
        access: Default::default(),
        next_seq: 2,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

fn event(seq: u64) -> Event {
    Event { seq, at_ms: 1, kind: EventKind::StepStarted { step: format!("s{seq}") } }
}

/// A batch that creates run `run_id` of `workflow_id` with one event.
fn start(run_id: &str, workflow_id: &str) -> Batch {
    let change = ExecChange {
        tenant: "t".into(),
        row: row(run_id, workflow_id),
        events: vec![event(1)],
        create: true,
        fence: None,
    };
    Batch { execs: vec![change], ..Batch::default() }
}

fn task(run_id: &str) -> TaskRow {
    TaskRow {
        id: TaskRow::make_id(run_id, "charge", 1),
        tenant: "t".into(),
        queue: "q".into(),
        kind: sluice_core::event::TaskKind::Worker,
        run_id: run_id.into(),
        workflow_id: "w".into(),
        step: "charge".into(),
        attempt: 1,
        input: json!(null),
        visible_at_ms: 0,
        schedule_to_start_ms: None,
        start_to_close_ms: 1_000,
        heartbeat_ms: None,
        created_at_ms: 0,
        trace_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_merges_concurrent_batches() {
    const N: u32 = 500;
    let db = TempDb::new();
    let store = Arc::new(SqliteStore::open(&db.0).expect("open"));
    let mut set = JoinSet::new();
    for n in 0..N {
        let store = Arc::clone(&store);
        set.spawn(async move { store.commit(start(&format!("run-{n:04}"), &format!("wf-{n}"))).await });
    }
    while let Some(joined) = set.join_next().await {
        joined.expect("join").expect("commit");
    }
    let stats = store.stats();
    assert_eq!(stats.batches, u64::from(N));
    assert!(stats.transactions < stats.batches, "no batches were grouped: {stats:?}");
    assert!(store.get_run("t", "run-0499").await.expect("read").is_some());
}

/// One group, built by hand: each failing batch is rolled back to its savepoint alone, and later
/// batches see what earlier ones wrote.
#[test]
fn a_group_applies_each_batch_alone() {
    let db = TempDb::new();
    let mut conn = Connection::open(&db.0).expect("open");
    crate::configure_writer(&conn).expect("configure");
    schema::migrate(&mut conn).expect("migrate");

    let stale = {
        let mut b = start("run-a", "a");
        b.execs[0].create = false;
        b.execs[0].events = vec![event(5)];
        b
    };
    let half_bad = {
        let mut b = start("run-c", "c");
        b.add_tasks = vec![task("run-c"), task("run-c")];
        b
    };
    let workflow =
        WorkflowVersion { name: "orders".into(), version: "v1".into(), definition: "{}".into(), created_at_ms: 1 };
    let ops = vec![
        Op::Commit(start("run-a", "a")),
        Op::Commit(start("run-a2", "a")),
        Op::Commit(stale),
        Op::PutWorkflow { tenant: "t".into(), version: workflow.clone() },
        Op::PutWorkflow { tenant: "t".into(), version: workflow },
        Op::Commit(half_bad),
        Op::Commit(start("run-b", "b")),
    ];
    let results = apply_group(&conn, &ops);
    assert_eq!(results[0], Ok(Reply::Changed(true)));
    assert_eq!(results[1], Err(StoreError::AlreadyRunning("run-a".into())));
    assert!(matches!(results[2], Err(StoreError::Conflict(_))), "{:?}", results[2]);
    assert_eq!(results[3], Ok(Reply::Changed(true)));
    assert_eq!(results[4], Ok(Reply::Changed(false)));
    assert!(matches!(results[5], Err(StoreError::Conflict(_))), "{:?}", results[5]);
    assert_eq!(results[6], Ok(Reply::Changed(true)));
    assert!(conn.is_autocommit(), "the group's transaction is closed");

    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).expect("count");
    assert_eq!(count("SELECT COUNT(*) FROM executions WHERE run_id IN ('run-a', 'run-b')"), 2);
    assert_eq!(count("SELECT COUNT(*) FROM executions WHERE run_id IN ('run-a2', 'run-c')"), 0);
    assert_eq!(count("SELECT COUNT(*) FROM events"), 2);
    assert_eq!(count("SELECT COUNT(*) FROM tasks"), 0);
    assert_eq!(count("SELECT COUNT(*) FROM workflows"), 1);
}

#[tokio::test]
async fn reopening_keeps_committed_data() {
    let db = TempDb::new();
    {
        let store = SqliteStore::open(&db.0).expect("open");
        store.commit(start("run-1", "wf")).await.expect("commit");
        assert!(store.get_run("t", "run-1").await.expect("read").is_some());
    }
    // Closed cleanly: the WAL was checkpointed into the database and deleted.
    let mut wal = db.0.as_os_str().to_owned();
    wal.push("-wal");
    assert!(!Path::new(&wal).exists(), "the WAL outlived the store");
    let store = SqliteStore::open(&db.0).expect("reopen");
    assert_eq!(store.get_run("t", "run-1").await.expect("read"), Some(row("run-1", "wf")));
    assert_eq!(store.history("t", "run-1", 0, 10).await.expect("history"), vec![event(1)]);

    let conn = Connection::open(&db.0).expect("raw open");
    assert_eq!(schema::schema_version(&conn).expect("version"), schema::SCHEMA_VERSION);
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("journal mode");
    assert_eq!(mode, "wal");
}

#[test]
fn a_newer_schema_is_refused() {
    let db = TempDb::new();
    let conn = Connection::open(&db.0).expect("raw open");
    conn.pragma_update(None, "user_version", 99).expect("set version");
    drop(conn);
    match SqliteStore::open(&db.0) {
        Err(StoreError::Internal(message)) => {
            assert!(message.contains("schema version 99"), "{message}")
        }
        Err(e) => panic!("expected Internal, got {e:?}"),
        Ok(_) => panic!("a database from a newer build was opened"),
    }
}

#[tokio::test]
async fn a_missing_directory_is_unavailable() {
    let path = std::env::temp_dir().join("sluice-no-such-dir").join("x").join("db.sqlite");
    assert!(matches!(SqliteStore::open(&path), Err(StoreError::Unavailable(_))));
}

#[tokio::test]
async fn a_database_file_deleted_or_replaced_under_the_store_refuses_writes_and_pings() {
    for replace in [false, true] {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).expect("open");
        store.commit(start("run-1", "wf")).await.expect("commit");
        store.ping().await.expect("ping");
        std::fs::remove_file(&db.0).expect("delete the database file");
        if replace {
            std::fs::write(&db.0, b"").expect("another file at its path");
        }
        assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))), "ping after the file went");
        match store.commit(start("run-2", "wf")).await {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("deleted or replaced"), "{m}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
