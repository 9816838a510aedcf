//! The PostgreSQL backend of the Sluice store: a pool of connections, READ COMMITTED
//! transactions that each commit one batch or a group of concurrent ones, optimistic
//! concurrency by row checks and a partial unique index.
//!
//! Architecture invariant: a batch is applied whole or not at all, and is durable (committed,
//! with `synchronous_commit` not off) when `commit` resolves `Ok`. A commit, once queued, is
//! carried through even if the caller stops waiting. Batches queued together are committed in
//! one transaction by one of a few writers; a failing batch fails alone. Every statement is a
//! static string with binds.

mod codec;
mod error;
mod group;
mod queues;
mod read;
mod schema;
mod writer;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sluice_core::Event;
use sluice_store::{
    AuditFilter, AuditRow, Batch, BoxFuture, BudgetAlertRow, Doc, ExecutionFilter, ExecutionRow, Page, PostedChange,
    QueueDepth, Result, RunChange, Store, StoreError, TaskOutcome, TaskRow, TimerRow, UsageFilter, UsageRow,
    UsageTotal, Wake, WakeSink, WorkflowSummary, WorkflowVersion,
};
use tokio_postgres::NoTls;

use crate::error::pool_err;
pub use crate::schema::SCHEMA_VERSION;

/// How the store connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections the pool opens at most; each concurrent commit or read holds one.
    pub max_connections: usize,
    /// How long a call waits for a free connection, or for a new one to connect, before it fails
    /// with `Unavailable`.
    pub acquire_timeout: Duration,
    /// Transactions that commit batches at once, each holding a connection of the pool while
    /// it commits; the batches queued meanwhile are committed together (see `group`).
    pub writers: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self { max_connections: 16, acquire_timeout: Duration::from_secs(10), writers: 4 }
    }
}

/// A `Store` in one PostgreSQL database, shared by any number of Sluice nodes.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    writers: group::Writers,
    /// For the connection that listens for wake-ups, which lives outside the pool.
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore").field("size", &status.size).field("max_size", &status.max_size).finish()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db` or a key-value string)
    /// with default options and migrates it to this build's schema.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with `options` and migrates the database to this build's schema. Several nodes
    /// may do this at once: migrations run one after the other under an advisory lock.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Internal(format!("invalid postgres url: {e}; expected postgres://user@host/db"))
        })?;
        with_network_defaults(&mut config);
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.acquire_timeout))
            .create_timeout(Some(options.acquire_timeout))
            .recycle_timeout(Some(options.acquire_timeout))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the postgres pool: {e}")))?;
        let mut client = pool.get().await.map_err(pool_err)?;
        schema::check_durability(&client).await?;
        schema::migrate(&mut client).await?;
        drop(client);
        let writers = group::Writers::start(pool.clone(), options.writers);
        Ok(Self { pool, writers, config })
    }

    /// Closes the pool: idle connections are closed now, busy ones when they are returned, and
    /// later calls fail with `Unavailable`.
    pub fn close(&self) {
        self.pool.close();
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVES_RETRIES: u32 = 3;
/// What `tokio_postgres` uses for `keepalives_idle` when none is given.
const DRIVER_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Limits on waiting for a database that stops answering without closing its connections (a
/// network partition, a frozen host), where the URL does not set them: connecting gives up after
/// `connect_timeout`, data the server does not acknowledge ends the connection after
/// `tcp_user_timeout`, and keepalive probes find a silent idle connection. A call on such a
/// connection then fails (`Unavailable`, a 503 to clients) instead of hanging, and the pool opens
/// a new connection.
fn with_network_defaults(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_keepalives_idle() == DRIVER_KEEPALIVES_IDLE {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
}

impl Store for PostgresStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            self.writers.commit(batch).await
        })
    }

    fn put_workflow(&self, tenant: &str, version: WorkflowVersion) -> BoxFuture<'_, Result<bool>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { writer::put_workflow(&self.pool, &tenant, &version).await })
    }

    fn get_workflow(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<WorkflowVersion>>> {
        let (tenant, name, version) = (tenant.to_owned(), name.to_owned(), version.map(str::to_owned));
        Box::pin(async move { read::get_workflow(&self.pool, &tenant, &name, version.as_deref()).await })
    }

    fn list_workflows(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<WorkflowSummary>>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { read::list_workflows(&self.pool, &tenant).await })
    }

    fn list_versions(&self, tenant: &str, name: &str) -> BoxFuture<'_, Result<Vec<WorkflowVersion>>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        Box::pin(async move { read::list_versions(&self.pool, &tenant, &name).await })
    }

    fn get_execution(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        let (tenant, workflow_id, run_id) = (tenant.to_owned(), workflow_id.to_owned(), run_id.map(str::to_owned));
        Box::pin(async move { read::get_execution(&self.pool, &tenant, &workflow_id, run_id.as_deref()).await })
    }

    fn get_run(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(async move { read::get_run(&self.pool, &tenant, &run_id).await })
    }

    fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> BoxFuture<'_, Result<Page<ExecutionRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { read::list_executions(&self.pool, &tenant, &filter).await })
    }

    fn count_running(&self, tenant: &str, workflow: Option<&str>) -> BoxFuture<'_, Result<u64>> {
        let (tenant, workflow) = (tenant.to_owned(), workflow.map(str::to_owned));
        Box::pin(async move { read::count_running(&self.pool, &tenant, workflow.as_deref()).await })
    }

    fn history(&self, tenant: &str, run_id: &str, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Event>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(async move { read::history(&self.pool, &tenant, &run_id, after, limit).await })
    }

    fn load_tasks(&self) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        Box::pin(read::load_tasks(&self.pool))
    }

    fn load_timers(&self) -> BoxFuture<'_, Result<Vec<TimerRow>>> {
        Box::pin(read::load_timers(&self.pool))
    }

    fn run_work(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<(Vec<TaskRow>, Vec<TimerRow>)>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(async move { read::run_work(&self.pool, &tenant, &run_id).await })
    }

    fn list_usage(&self, tenant: &str, filter: UsageFilter) -> BoxFuture<'_, Result<Page<UsageRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { read::list_usage(&self.pool, &tenant, &filter).await })
    }

    fn usage_total(&self, tenant: &str, api_key: Option<&str>, since_ms: i64) -> BoxFuture<'_, Result<UsageTotal>> {
        let (tenant, api_key) = (tenant.to_owned(), api_key.map(str::to_owned));
        Box::pin(async move { read::usage_total(&self.pool, &tenant, api_key.as_deref(), since_ms).await })
    }

    fn list_alerts(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<BudgetAlertRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { read::list_alerts(&self.pool, &tenant).await })
    }

    fn put_doc(&self, doc: Doc) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move { writer::put_doc(&self.pool, &doc).await })
    }

    fn get_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        let (tenant, kind, id) = (tenant.to_owned(), kind.to_owned(), id.to_owned());
        Box::pin(async move { read::get_doc(&self.pool, &tenant, &kind, &id).await })
    }

    fn list_docs(&self, tenant: &str, kind: &str) -> BoxFuture<'_, Result<Vec<Doc>>> {
        let (tenant, kind) = (tenant.to_owned(), kind.to_owned());
        Box::pin(async move { read::list_docs(&self.pool, &tenant, &kind).await })
    }

    fn delete_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        let (tenant, kind, id) = (tenant.to_owned(), kind.to_owned(), id.to_owned());
        Box::pin(async move { writer::delete_doc(&self.pool, &tenant, &kind, &id).await })
    }

    fn find_doc(&self, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        let (kind, id) = (kind.to_owned(), id.to_owned());
        Box::pin(async move { read::find_doc(&self.pool, &kind, &id).await })
    }

    fn append_audit(&self, rows: Vec<AuditRow>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            writer::append_audit(&self.pool, &rows).await
        })
    }

    fn list_audit(&self, tenant: &str, filter: AuditFilter) -> BoxFuture<'_, Result<Page<AuditRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(async move { read::list_audit(&self.pool, &tenant, &filter).await })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(read::ping(&self.pool))
    }

    fn register_node(&self, node: &str, url: Option<&str>, lease_ms: i64) -> BoxFuture<'_, Result<i64>> {
        let (node, url) = (node.to_owned(), url.map(str::to_owned));
        Box::pin(async move { writer::register_node(&self.pool, &node, url.as_deref(), lease_ms).await })
    }

    fn owner_url(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<String>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(async move { read::owner_url(&self.pool, &tenant, &run_id).await })
    }

    fn renew_lease(&self, epoch: i64, lease_ms: i64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(writer::renew_lease(&self.pool, epoch, lease_ms))
    }

    fn take_over(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(String, String)>>> {
        Box::pin(writer::take_over(&self.pool, epoch))
    }

    fn shared_queues(&self) -> bool {
        true
    }

    fn live_nodes(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(queues::live_nodes(&self.pool))
    }

    fn release_tasks(&self, epoch: i64, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move { queues::release(&self.pool, epoch, &ids).await })
    }

    fn claim_tasks(
        &self,
        tenant: &str,
        queue: &str,
        max: usize,
        now_ms: i64,
        epoch: i64,
    ) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        let (tenant, queue) = (tenant.to_owned(), queue.to_owned());
        Box::pin(async move { queues::claim(&self.pool, &tenant, &queue, max, now_ms, epoch).await })
    }

    fn heartbeat_task(&self, tenant: &str, id: &str, now_ms: i64) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        Box::pin(async move { queues::heartbeat(&self.pool, &tenant, &id, now_ms).await })
    }

    fn post_outcome(&self, tenant: &str, id: &str, outcome: TaskOutcome) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        Box::pin(async move { queues::post(&self.pool, &tenant, &id, &outcome).await })
    }

    fn posted_outcomes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, TaskOutcome)>>> {
        Box::pin(queues::posted(&self.pool, epoch))
    }

    fn expired_tasks(&self, epoch: i64, now_ms: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, &'static str)>>> {
        Box::pin(queues::expired(&self.pool, epoch, now_ms))
    }

    fn post_change(&self, tenant: &str, run_id: &str, id: &str, change: RunChange) -> BoxFuture<'_, Result<bool>> {
        let (tenant, run_id, id) = (tenant.to_owned(), run_id.to_owned(), id.to_owned());
        Box::pin(async move { queues::post_change(&self.pool, &tenant, &run_id, &id, &change).await })
    }

    fn posted_changes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<PostedChange>>> {
        Box::pin(queues::posted_changes(&self.pool, epoch))
    }

    fn drop_change(&self, tenant: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        Box::pin(async move { queues::drop_change(&self.pool, &tenant, &id).await })
    }

    fn queue_depths(&self, now_ms: i64) -> BoxFuture<'_, Result<Vec<QueueDepth>>> {
        Box::pin(queues::depths(&self.pool, now_ms))
    }

    fn notify_all(&self, wakes: Vec<Wake>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { queues::notify(&self.pool, &wakes).await })
    }

    fn listen(&self, sink: WakeSink) -> BoxFuture<'_, Result<()>> {
        queues::listen(self.config.clone(), self.pool.clone(), sink);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(url: &str) -> tokio_postgres::Config {
        let mut config: tokio_postgres::Config = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        with_network_defaults(&mut config);
        config
    }

    #[test]
    fn a_url_without_network_limits_gets_ours() {
        let c = configured("postgres://sluice@db.internal/sluice");
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(c.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
    }

    #[test]
    fn limits_in_the_url_are_kept() {
        let c = configured(
            "postgres://sluice@db.internal/sluice?connect_timeout=30&tcp_user_timeout=60&keepalives_idle=120\
             &keepalives_interval=7&keepalives_retries=9",
        );
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(120));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
    }
}
