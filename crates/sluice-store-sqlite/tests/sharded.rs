//! The conformance suite against two SQLite files behind a `ShardedStore`, and a check that
//! executions spread over both shards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use sluice_core::ExecStatus;
use sluice_store::{Batch, ExecChange, ExecutionFilter, ExecutionRow, ShardedStore, Store, StoreError};
use sluice_store_sqlite::SqliteStore;

fn unique_temp_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sharded");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{nanos}-{n}.db", std::process::id()))
}

fn two_shards() -> ShardedStore {
    let a: Arc<dyn Store> = Arc::new(SqliteStore::open(&unique_temp_path()).unwrap());
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&unique_temp_path()).unwrap());
    ShardedStore::new(vec![a, b]).unwrap()
}

// Every case but the two that commit unrelated executions in one batch: across shards a batch
// is atomic only when its executions share a shard, which the engine guarantees and which
// `a_batch_across_shards_is_refused` checks.
sluice_store::store_suite!(@borrowed async { two_shards() };
    workflow_versions,
    commit_and_read_history,
    execution_row_round_trips,
    update_of_unknown_run_is_not_found,
    idempotent_start,
    continue_as_new_is_atomic,
    tasks_and_timers,
    tenant_isolation,
    list_executions_order_and_filters,
    usage_ledger,
    directory_and_audit,
    leases_and_fencing,
    ping,
);
sluice_store::store_suite!(@shared async { two_shards() };
    concurrent_commits,
    failing_batch_does_not_fail_its_group,
    concurrent_steps_commit_and_fenced_ones_fail_alone,
    racing_starts_one_wins,
);

fn row(run: &str, wid: &str) -> ExecutionRow {
    ExecutionRow {
        run_id: run.into(),
        workflow_id: wid.into(),
        workflow: "orders".into(),
        version: "v1".into(),
        status: ExecStatus::Running,
        paused: false,
        dead_letter: false,
        input: serde_json::json!({}),
        output: None,
        error: None,
        failed_step: None,
        parent: None,
        access: Default::default(),
        next_seq: 1,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

fn create(wid: &str, run: &str) -> ExecChange {
    ExecChange { tenant: "t".into(), row: row(run, wid), events: Vec::new(), create: true, fence: None }
}

#[tokio::test]
async fn a_batch_across_shards_is_refused_and_pages_cover_every_shard() {
    let s = two_shards();
    let (a, b) = (0..100).map(|i| format!("w-{i}")).fold((None, None), |(a, b), w| match s.shard_of(&w) {
        0 if a.is_none() => (Some(w), b),
        1 if b.is_none() => (a, Some(w)),
        _ => (a, b),
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    let across = Batch { execs: vec![create(&a, "0190-x1"), create(&b, "0190-x2")], ..Batch::default() };
    assert!(matches!(s.commit(across).await, Err(StoreError::Internal(_))));
    assert_eq!(s.get_run("t", "0190-x1").await.unwrap(), None);

    let mut runs = Vec::new();
    for i in 0..23 {
        let run = format!("0190-{i:04}");
        s.commit(Batch { execs: vec![create(&format!("w-{i}"), &run)], ..Batch::default() }).await.unwrap();
        runs.push(run);
    }
    for shard in 0..2 {
        let page =
            s.shard(shard).list_executions("t", ExecutionFilter { limit: 100, ..ExecutionFilter::default() }).await;
        assert!(!page.unwrap().items.is_empty(), "shard {shard} holds none of the executions");
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .list_executions("t", ExecutionFilter { limit: 7, cursor: cursor.clone(), ..ExecutionFilter::default() })
            .await
            .unwrap();
        assert!(page.items.len() <= 7);
        seen.extend(page.items.into_iter().map(|r| r.run_id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    runs.reverse();
    assert_eq!(seen, runs, "every run once, newest first, across shards");
    for run in &runs {
        assert!(s.get_run("t", run).await.unwrap().is_some());
    }
}

#[test]
fn workflow_ids_spread_over_shards_and_children_stay_with_their_parent() {
    let s = two_shards();
    let mut counts = [0usize; 2];
    for i in 0..200 {
        let wid = format!("order-{i}");
        counts[s.shard_of(&wid)] += 1;
        assert_eq!(s.shard_of(&wid), s.shard_of(&format!("{wid}.charge")));
        assert_eq!(s.shard_of(&wid), s.shard_of(&format!("{wid}.each-3.enrich.attempt-2")));
    }
    assert!(counts[0] > 60 && counts[1] > 60, "uneven spread: {counts:?}");
}
