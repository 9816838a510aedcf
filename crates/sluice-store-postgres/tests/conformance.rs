//! The store conformance suite, run against PostgreSQL: one test per case, each in a database of
//! its own, plus the cases only this backend has (migrations, connection errors, collation).
//!
//! The server is `SLUICE_TEST_POSTGRES` (an admin URL whose user may create databases), by
//! default `postgres://postgres@127.0.0.1:5432/postgres`; `scripts/ensure-postgres` starts one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sluice_core::event::EventKind;
use sluice_core::{Event, ExecStatus};
use sluice_store::{
    AuditFilter, AuditRow, Batch, BoxFuture, BudgetAlertRow, Doc, ExecChange, ExecutionFilter, ExecutionRow, Page,
    PostedChange, QueueDepth, Result, RunChange, Store, StoreError, TaskOutcome, TaskRow, TimerRow, UsageFilter,
    UsageRow, UsageTotal, Wake, WakeSink, WorkflowSummary, WorkflowVersion,
};
use sluice_store_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use tokio_postgres::NoTls;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PREFIX: &str = "sluice_test_";
/// Test databases older than this are left over from runs that did not clean up.
const STALE_SECS: u64 = 3_600;

fn admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Small pools: every test has its own, and nextest runs many tests at once against one server.
fn options() -> PostgresOptions {
    PostgresOptions { max_connections: 5, ..PostgresOptions::default() }
}

async fn admin() -> tokio_postgres::Client {
    let url = admin_url();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach PostgreSQL at {url}: {e} ({}). Run scripts/ensure-postgres, or set SLUICE_TEST_POSTGRES \
             to the URL of a server where this user may create databases",
            std::error::Error::source(&e).map_or_else(String::new, ToString::to_string)
        )
    });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `url` with its database replaced by `db`, for URLs (`postgres://...`) and key-value strings.
fn with_database(url: &str, db: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={db}");
    };
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base[scheme_end + 3..].find('/').map_or(base.len(), |i| scheme_end + 3 + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Drops databases that earlier runs left behind; their names start with their creation time.
async fn drop_stale(admin: &tokio_postgres::Client, now: u64) {
    let rows = admin
        .query("SELECT datname FROM pg_database WHERE starts_with(datname, $1)", &[&PREFIX])
        .await
        .expect("list test databases");
    for row in rows {
        let name: String = row.get(0);
        let created = name[PREFIX.len()..].split('_').next().and_then(|s| s.parse::<u64>().ok());
        if created.is_some_and(|t| t + STALE_SECS < now) && is_test_name(&name) {
            // Another test process may be dropping it too.
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

/// Identifiers cannot be bound, so the names spliced into DDL here are checked to be ours.
fn is_test_name(name: &str) -> bool {
    name.starts_with(PREFIX) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A database of its own for one test: its name and URL.
async fn create_database() -> (String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    static CLEANED: AtomicBool = AtomicBool::new(false);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = format!("{PREFIX}{now}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    assert!(is_test_name(&name));
    let admin = admin().await;
    if !CLEANED.swap(true, Ordering::Relaxed) {
        drop_stale(&admin, now).await;
    }
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create the test database");
    let url = with_database(&admin_url(), &name);
    (name, url)
}

/// Drops a test database, from a thread of its own so that it works inside `Drop`.
fn drop_database(name: String) {
    let dropped = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let url = admin_url();
            if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            }
        });
    });
    let _ = dropped.join();
}

/// A store in a fresh database that is dropped with it.
struct TestStore {
    store: PostgresStore,
    db: String,
}

impl TestStore {
    async fn new() -> Self {
        let (db, url) = create_database().await;
        let store = PostgresStore::connect_with(&url, options()).await.expect("connect to the test database");
        Self { store, db }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        self.store.close();
        drop_database(std::mem::take(&mut self.db));
    }
}

impl Store for TestStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<()>> {
        self.store.commit(batch)
    }
    fn put_workflow(&self, tenant: &str, version: WorkflowVersion) -> BoxFuture<'_, Result<bool>> {
        self.store.put_workflow(tenant, version)
    }
    fn get_workflow(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<WorkflowVersion>>> {
        self.store.get_workflow(tenant, name, version)
    }
    fn list_workflows(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<WorkflowSummary>>> {
        self.store.list_workflows(tenant)
    }
    fn list_versions(&self, tenant: &str, name: &str) -> BoxFuture<'_, Result<Vec<WorkflowVersion>>> {
        self.store.list_versions(tenant, name)
    }
    fn get_execution(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        self.store.get_execution(tenant, workflow_id, run_id)
    }
    fn get_run(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        self.store.get_run(tenant, run_id)
    }
    fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> BoxFuture<'_, Result<Page<ExecutionRow>>> {
        self.store.list_executions(tenant, filter)
    }
    fn count_running(&self, tenant: &str, workflow: Option<&str>) -> BoxFuture<'_, Result<u64>> {
        self.store.count_running(tenant, workflow)
    }
    fn history(&self, tenant: &str, run_id: &str, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Event>>> {
        self.store.history(tenant, run_id, after, limit)
    }
    fn load_tasks(&self) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        self.store.load_tasks()
    }
    fn load_timers(&self) -> BoxFuture<'_, Result<Vec<TimerRow>>> {
        self.store.load_timers()
    }
    fn run_work(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<(Vec<TaskRow>, Vec<TimerRow>)>> {
        self.store.run_work(tenant, run_id)
    }
    fn list_usage(&self, tenant: &str, filter: UsageFilter) -> BoxFuture<'_, Result<Page<UsageRow>>> {
        self.store.list_usage(tenant, filter)
    }
    fn usage_total(&self, tenant: &str, api_key: Option<&str>, since_ms: i64) -> BoxFuture<'_, Result<UsageTotal>> {
        self.store.usage_total(tenant, api_key, since_ms)
    }
    fn list_alerts(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<BudgetAlertRow>>> {
        self.store.list_alerts(tenant)
    }
    fn put_doc(&self, doc: Doc) -> BoxFuture<'_, Result<bool>> {
        self.store.put_doc(doc)
    }
    fn get_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        self.store.get_doc(tenant, kind, id)
    }
    fn list_docs(&self, tenant: &str, kind: &str) -> BoxFuture<'_, Result<Vec<Doc>>> {
        self.store.list_docs(tenant, kind)
    }
    fn delete_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        self.store.delete_doc(tenant, kind, id)
    }
    fn find_doc(&self, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        self.store.find_doc(kind, id)
    }
    fn append_audit(&self, rows: Vec<AuditRow>) -> BoxFuture<'_, Result<()>> {
        self.store.append_audit(rows)
    }
    fn list_audit(&self, tenant: &str, filter: AuditFilter) -> BoxFuture<'_, Result<Page<AuditRow>>> {
        self.store.list_audit(tenant, filter)
    }
    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        self.store.ping()
    }
    fn register_node(&self, node: &str, url: Option<&str>, lease_ms: i64) -> BoxFuture<'_, Result<i64>> {
        self.store.register_node(node, url, lease_ms)
    }
    fn owner_url(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<String>>> {
        self.store.owner_url(tenant, run_id)
    }
    fn renew_lease(&self, epoch: i64, lease_ms: i64) -> BoxFuture<'_, Result<bool>> {
        self.store.renew_lease(epoch, lease_ms)
    }
    fn take_over(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(String, String)>>> {
        self.store.take_over(epoch)
    }
    fn shared_queues(&self) -> bool {
        self.store.shared_queues()
    }
    fn live_nodes(&self) -> BoxFuture<'_, Result<u64>> {
        self.store.live_nodes()
    }
    fn release_tasks(&self, epoch: i64, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<String>>> {
        self.store.release_tasks(epoch, ids)
    }
    fn claim_tasks(
        &self,
        tenant: &str,
        queue: &str,
        max: usize,
        now_ms: i64,
        epoch: i64,
    ) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        self.store.claim_tasks(tenant, queue, max, now_ms, epoch)
    }
    fn heartbeat_task(&self, tenant: &str, id: &str, now_ms: i64) -> BoxFuture<'_, Result<bool>> {
        self.store.heartbeat_task(tenant, id, now_ms)
    }
    fn post_outcome(&self, tenant: &str, id: &str, outcome: TaskOutcome) -> BoxFuture<'_, Result<bool>> {
        self.store.post_outcome(tenant, id, outcome)
    }
    fn posted_outcomes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, TaskOutcome)>>> {
        self.store.posted_outcomes(epoch)
    }
    fn expired_tasks(&self, epoch: i64, now_ms: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, &'static str)>>> {
        self.store.expired_tasks(epoch, now_ms)
    }
    fn post_change(&self, tenant: &str, run_id: &str, id: &str, change: RunChange) -> BoxFuture<'_, Result<bool>> {
        self.store.post_change(tenant, run_id, id, change)
    }
    fn posted_changes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<PostedChange>>> {
        self.store.posted_changes(epoch)
    }
    fn drop_change(&self, tenant: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        self.store.drop_change(tenant, id)
    }
    fn queue_depths(&self, now_ms: i64) -> BoxFuture<'_, Result<Vec<QueueDepth>>> {
        self.store.queue_depths(now_ms)
    }

    fn notify_all(&self, wakes: Vec<Wake>) -> BoxFuture<'_, Result<()>> {
        self.store.notify_all(wakes)
    }
    fn listen(&self, sink: WakeSink) -> BoxFuture<'_, Result<()>> {
        self.store.listen(sink)
    }
}

sluice_store::store_suite!(TestStore::new());

/// The versions recorded in `schema_migrations`, read with a connection of its own.
async fn recorded_versions(url: &str) -> Vec<i32> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let rows = client.query("SELECT version FROM schema_migrations ORDER BY version", &[]).await.expect("versions");
    rows.iter().map(|r| r.get(0)).collect()
}

fn all_versions() -> Vec<i32> {
    (1..=i32::try_from(SCHEMA_VERSION).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_at_once_migrate_once() {
    let (db, url) = create_database().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let url = url.clone();
        set.spawn(async move {
            PostgresStore::connect_with(&url, PostgresOptions { max_connections: 1, ..options() }).await
        });
    }
    while let Some(joined) = set.join_next().await {
        let store = joined.expect("join").expect("concurrent connect");
        store.ping().await.expect("ping");
        store.close();
    }
    assert_eq!(recorded_versions(&url).await, all_versions());

    // Connecting again to a current database changes nothing.
    PostgresStore::connect_with(&url, options()).await.expect("connect again").close();
    assert_eq!(recorded_versions(&url).await, all_versions());
    drop_database(db);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let (db, url) = create_database().await;
    PostgresStore::connect_with(&url, options()).await.expect("connect").close();
    let newer = i32::try_from(SCHEMA_VERSION + 1).unwrap();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&newer]).await.expect("insert");
    match PostgresStore::connect_with(&url, options()).await {
        Err(StoreError::Internal(message)) => assert!(message.contains("run a newer sluice"), "{message}"),
        other => panic!("expected Internal, got {other:?}"),
    }
    drop_database(db);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    // Port 1 on the loopback: nothing listens there, the connection is refused at once.
    let options = PostgresOptions { acquire_timeout: Duration::from_secs(2), ..options() };
    match PostgresStore::connect_with("postgres://postgres@127.0.0.1:1/postgres", options).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_invalid_url_is_refused() {
    match PostgresStore::connect("postgres://[bad").await {
        Err(StoreError::Internal(message)) => assert!(message.contains("invalid postgres url"), "{message}"),
        other => panic!("expected Internal, got {other:?}"),
    }
}

/// A running execution summary, stored with its `ExecutionStarted` event by `create`.
fn row(run_id: &str, workflow_id: &str) -> ExecutionRow {
    ExecutionRow {
        run_id: run_id.into(),
        workflow_id: workflow_id.into(),
        workflow: "orders".into(),
        version: "v1".into(),
        status: ExecStatus::Running,
        paused: false,
        dead_letter: false,
        input: json!(null),
        output: None,
        error: None,
        failed_step: None,
        parent: None,
        access: Default::default(),
        next_seq: 2,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn create(tenant: &str, row: ExecutionRow) -> Batch {
    let started = Event {
        seq: 1,
        at_ms: 0,
        kind: EventKind::ExecutionStarted {
            workflow: row.workflow.clone(),
            version: row.version.clone(),
            workflow_id: row.workflow_id.clone(),
            run_id: row.run_id.clone(),
            input: row.input.clone(),
            parent: None,
            continued_from: None,
            chain: 0,
            trace_id: None,
            access: Default::default(),
        },
    };
    let change = ExecChange { tenant: tenant.into(), row, events: vec![started], create: true, fence: None };
    Batch { execs: vec![change], ..Batch::default() }
}

/// A change that moves the run to `status` with one more event.
fn update(tenant: &str, row: &ExecutionRow, status: ExecStatus) -> Batch {
    let event = Event { seq: row.next_seq, at_ms: 1, kind: EventKind::ExecutionRedriven };
    let row = ExecutionRow { status, next_seq: row.next_seq + 1, ..row.clone() };
    let change = ExecChange { tenant: tenant.into(), row, events: vec![event], create: false, fence: None };
    Batch { execs: vec![change], ..Batch::default() }
}

/// Listing orders run ids by bytes, as SQLite does, whatever the database's locale: a locale
/// collation would ignore the dash and fold the case.
#[tokio::test]
async fn run_ids_sort_by_bytes() {
    let s = TestStore::new().await;
    let ids = ["a1", "a-2", "B3", "b-0", "A9"];
    for (n, id) in ids.iter().enumerate() {
        s.commit(create("t", row(id, &format!("w{n}")))).await.expect("create");
    }
    let page = s.list_executions("t", ExecutionFilter::default()).await.expect("list");
    let listed = page.items.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>();
    let mut expected = ids.to_vec();
    expected.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    assert_eq!(listed, expected);
}

/// Redriving a failed run back to running while a newer run of its workflow id runs fails with
/// that run's id (the unique index fails the update; the run is named after the rollback).
#[tokio::test]
async fn redrive_beside_a_running_run_is_already_running() {
    let s = TestStore::new().await;
    let first = row("r1", "order");
    s.commit(create("t", first.clone())).await.expect("create first");
    let failed = update("t", &first, ExecStatus::Failed);
    let failed_row = failed.execs[0].row.clone();
    s.commit(failed).await.expect("fail first");
    s.commit(create("t", row("r2", "order"))).await.expect("create second");

    assert_eq!(
        s.commit(update("t", &failed_row, ExecStatus::Running)).await,
        Err(StoreError::AlreadyRunning("r2".into()))
    );
    assert_eq!(s.get_run("t", "r1").await.expect("run"), Some(failed_row.clone()));
    assert_eq!(s.history("t", "r1", 0, 100).await.expect("history").len(), 2);
}

/// A server that acknowledges commits before they are durable is refused.
#[tokio::test]
async fn asynchronous_commit_is_refused() {
    let (db, url) = create_database().await;
    admin().await.batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = off")).await.expect("alter");
    match PostgresStore::connect_with(&url, options()).await {
        Err(StoreError::Internal(message)) => assert!(message.contains("synchronous_commit"), "{message}"),
        other => panic!("expected Internal, got {other:?}"),
    }
    drop_database(db);
}

#[test]
fn test_database_urls() {
    let cases = [
        ("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/x"),
        ("postgresql://u:p@h/db?sslmode=disable", "postgresql://u:p@h/x?sslmode=disable"),
        ("postgres://h", "postgres://h/x"),
        ("host=/run/postgresql user=postgres", "host=/run/postgresql user=postgres dbname=x"),
    ];
    for (url, expected) in cases {
        assert_eq!(with_database(url, "x"), expected, "{url}");
    }
}
