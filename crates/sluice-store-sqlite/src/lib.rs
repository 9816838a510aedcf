//! The embedded SQLite backend of the Sluice store: one writer thread that commits concurrent
//! batches together (group commit: one transaction and one fsync for many batches), and a few
//! read-only connections that WAL lets read while it writes.
//!
//! Architecture invariant: only the writer thread writes. A batch is durable when `commit`
//! resolves `Ok` (`synchronous = FULL`). A batch already handed to the writer is applied even if
//! the caller stops waiting for it.

mod codec;
mod error;
mod read;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use sluice_core::Event;
use sluice_store::{
    AuditFilter, AuditRow, Batch, BoxFuture, BudgetAlertRow, Doc, ExecutionFilter, ExecutionRow, Page, Result, Store,
    StoreError, TaskRow, TimerRow, UsageFilter, UsageRow, UsageTotal, WorkflowSummary, WorkflowVersion,
};
use tokio::sync::oneshot;

use crate::error::{db_err, writer_gone};
use crate::read::Readers;
use crate::writer::{Counters, Op, Reply, Request};

/// How long a connection waits for a lock held by another connection before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// `PRAGMA synchronous` reads FULL back as 2.
const SYNCHRONOUS_FULL: i64 = 2;
/// Prepared statements kept per connection: every static query, and the shapes of listings.
const STATEMENT_CACHE: usize = 64;

/// A `Store` in one SQLite file (plus its `-wal` and `-shm` files).
pub struct SqliteStore {
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    readers: Arc<Readers>,
    counters: Arc<Counters>,
    file: FileIdentity,
}

/// The database file as it was opened (device and inode), to notice it was deleted or replaced
/// under the running server: writes would go on into a file nobody will open again.
struct FileIdentity {
    path: PathBuf,
    id: Option<(u64, u64)>,
    /// Once gone, for good: the file now at the path is not this store's.
    gone: AtomicBool,
    /// When writes last looked (ms since the Unix epoch): at most every [`FILE_CHECK_MS`].
    checked_ms: AtomicU64,
}

/// How often writes look at the database file.
const FILE_CHECK_MS: u64 = 100;

impl FileIdentity {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            id: file_id(path).ok().flatten(),
            gone: AtomicBool::new(false),
            checked_ms: AtomicU64::new(0),
        }
    }

    /// Whether the file at the path is still the one opened; `force` looks now.
    fn check(&self, force: bool) -> Result<()> {
        // Not known at open (no inodes here): nothing to compare with.
        let Some(opened) = self.id else { return Ok(()) };
        if !self.gone.load(Ordering::Relaxed) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            if !force && now.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) < FILE_CHECK_MS {
                return Ok(());
            }
            self.checked_ms.store(now, Ordering::Relaxed);
            let same = match file_id(&self.path) {
                Ok(id) => id == Some(opened),
                // Cannot look (permissions, I/O): no news is good news.
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => true,
                Err(_) => false,
            };
            if same {
                return Ok(());
            }
            if !self.gone.swap(true, Ordering::Relaxed) {
                tracing::error!(path = %self.path.display(),
                    "the database file was deleted or replaced while the server ran: writes are refused and \
                     /readyz fails; restore the file (or its directory) and restart the server");
            }
        }
        Err(StoreError::Unavailable("the database file was deleted or replaced while the server ran".into()))
    }
}

/// The device and inode of a file (`None` where the platform has none).
fn file_id(path: &Path) -> std::io::Result<Option<(u64, u64)>> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(Some((meta.dev(), meta.ino())))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok(None)
    }
}

/// Write counters since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed (each one fsync).
    pub transactions: u64,
    /// `commit` batches committed; more than `transactions` when group commit merged some.
    pub batches: u64,
}

impl SqliteStore {
    /// Opens or creates the database at `path`, migrates it to this build's schema and starts
    /// the writer thread. Blocks while it does so.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path).map_err(db_err)?;
        configure_writer(&conn)?;
        schema::migrate(&mut conn)?;

        let counters = Arc::new(Counters::default());
        let (requests, queue) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("sluice-sqlite-writer".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || writer::run(conn, queue, counters)
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the sqlite writer thread: {e}")))?;
        Ok(Self {
            requests: Some(requests),
            writer: Some(writer),
            readers: Arc::new(Readers::new(path.to_path_buf(), BUSY_TIMEOUT)),
            counters,
            file: FileIdentity::new(path),
        })
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
        }
    }

    /// Hands `op` to the writer thread and waits for its result.
    async fn write(&self, op: Op) -> Result<bool> {
        match self.write_reply(op).await? {
            Reply::Changed(changed) => Ok(changed),
            other => Err(StoreError::Internal(format!("the writer answered {other:?} to a write"))),
        }
    }

    async fn write_reply(&self, op: Op) -> Result<Reply> {
        self.file.check(false)?;
        let (reply, result) = oneshot::channel();
        let requests = self.requests.as_ref().ok_or_else(writer_gone)?;
        requests.send(Request { op, reply }).map_err(|_| writer_gone())?;
        result.await.map_err(|_| writer_gone())?
    }
}

fn configure_writer(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Internal(format!(
            "the database stays in journal mode {mode:?} instead of WAL; use a file on a local disk"
        )));
    }
    // FULL: the WAL is fsynced at every commit, so a committed batch survives a power cut.
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0)).map_err(db_err)?;
    if synchronous != SYNCHRONOUS_FULL {
        return Err(StoreError::Internal(format!("sqlite refused synchronous = FULL (got {synchronous})")));
    }
    // 64 MiB of page cache: the hot B-tree pages of events, tasks and runs stay in memory.
    conn.pragma_update(None, "cache_size", -65_536).map_err(db_err)?;
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(db_err)?;
    Ok(())
}

impl Drop for SqliteStore {
    /// Lets the writer finish what is queued, then waits for it: the database is closed cleanly
    /// when the store is gone.
    fn drop(&mut self) {
        // Readers close first: the last connection to close checkpoints the WAL into the
        // database and deletes it, and a read-only one cannot.
        self.readers.close();
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the sqlite writer thread panicked");
            }
        }
    }
}

impl Store for SqliteStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            self.write(Op::Commit(batch)).await.map(|_| ())
        })
    }

    fn put_workflow(&self, tenant: &str, version: WorkflowVersion) -> BoxFuture<'_, Result<bool>> {
        let tenant = tenant.to_owned();
        Box::pin(self.write(Op::PutWorkflow { tenant, version }))
    }

    fn get_workflow(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<WorkflowVersion>>> {
        let (tenant, name, version) = (tenant.to_owned(), name.to_owned(), version.map(str::to_owned));
        Box::pin(self.readers.run(move |c| read::get_workflow(c, &tenant, &name, version.as_deref())))
    }

    fn list_workflows(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<WorkflowSummary>>> {
        let tenant = tenant.to_owned();
        Box::pin(self.readers.run(move |c| read::list_workflows(c, &tenant)))
    }

    fn list_versions(&self, tenant: &str, name: &str) -> BoxFuture<'_, Result<Vec<WorkflowVersion>>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        Box::pin(self.readers.run(move |c| read::list_versions(c, &tenant, &name)))
    }

    fn get_execution(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        let (tenant, workflow_id, run_id) = (tenant.to_owned(), workflow_id.to_owned(), run_id.map(str::to_owned));
        Box::pin(self.readers.run(move |c| read::get_execution(c, &tenant, &workflow_id, run_id.as_deref())))
    }

    fn get_run(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(self.readers.run(move |c| read::get_run(c, &tenant, &run_id)))
    }

    fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> BoxFuture<'_, Result<Page<ExecutionRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(self.readers.run(move |c| read::list_executions(c, &tenant, &filter)))
    }

    fn count_running(&self, tenant: &str, workflow: Option<&str>) -> BoxFuture<'_, Result<u64>> {
        let (tenant, workflow) = (tenant.to_owned(), workflow.map(str::to_owned));
        Box::pin(self.readers.run(move |c| read::count_running(c, &tenant, workflow.as_deref())))
    }

    fn history(&self, tenant: &str, run_id: &str, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Event>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(self.readers.run(move |c| read::history(c, &tenant, &run_id, after, limit)))
    }

    fn load_tasks(&self) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        Box::pin(self.readers.run(read::load_tasks))
    }

    fn load_timers(&self) -> BoxFuture<'_, Result<Vec<TimerRow>>> {
        Box::pin(self.readers.run(read::load_timers))
    }

    fn run_work(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<(Vec<TaskRow>, Vec<TimerRow>)>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(self.readers.run(move |c| read::run_work(c, &tenant, &run_id)))
    }

    fn list_usage(&self, tenant: &str, filter: UsageFilter) -> BoxFuture<'_, Result<Page<UsageRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(self.readers.run(move |c| read::list_usage(c, &tenant, &filter)))
    }

    fn usage_total(&self, tenant: &str, api_key: Option<&str>, since_ms: i64) -> BoxFuture<'_, Result<UsageTotal>> {
        let (tenant, api_key) = (tenant.to_owned(), api_key.map(str::to_owned));
        Box::pin(self.readers.run(move |c| read::usage_total(c, &tenant, api_key.as_deref(), since_ms)))
    }

    fn list_alerts(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<BudgetAlertRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(self.readers.run(move |c| read::list_alerts(c, &tenant)))
    }

    fn put_doc(&self, doc: Doc) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.write(Op::PutDoc(doc)))
    }

    fn get_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        let (tenant, kind, id) = (tenant.to_owned(), kind.to_owned(), id.to_owned());
        Box::pin(self.readers.run(move |c| read::get_doc(c, &tenant, &kind, &id)))
    }

    fn list_docs(&self, tenant: &str, kind: &str) -> BoxFuture<'_, Result<Vec<Doc>>> {
        let (tenant, kind) = (tenant.to_owned(), kind.to_owned());
        Box::pin(self.readers.run(move |c| read::list_docs(c, &tenant, &kind)))
    }

    fn delete_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        let (tenant, kind, id) = (tenant.to_owned(), kind.to_owned(), id.to_owned());
        Box::pin(self.write(Op::DeleteDoc { tenant, kind, id }))
    }

    fn find_doc(&self, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        let (kind, id) = (kind.to_owned(), id.to_owned());
        Box::pin(self.readers.run(move |c| read::find_doc(c, &kind, &id)))
    }

    fn append_audit(&self, rows: Vec<AuditRow>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            self.write(Op::Audit(rows)).await.map(|_| ())
        })
    }

    fn list_audit(&self, tenant: &str, filter: AuditFilter) -> BoxFuture<'_, Result<Page<AuditRow>>> {
        let tenant = tenant.to_owned();
        Box::pin(self.readers.run(move |c| read::list_audit(c, &tenant, &filter)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.file.check(true)?;
            self.readers.run(read::ping).await
        })
    }

    fn register_node(&self, node: &str, url: Option<&str>, lease_ms: i64) -> BoxFuture<'_, Result<i64>> {
        let (node, url) = (node.to_owned(), url.map(str::to_owned));
        Box::pin(async move {
            match self.write_reply(Op::RegisterNode { node, url, lease_ms }).await? {
                Reply::Epoch(epoch) => Ok(epoch),
                other => Err(StoreError::Internal(format!("the writer answered {other:?} to a node registration"))),
            }
        })
    }

    fn renew_lease(&self, epoch: i64, lease_ms: i64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.write(Op::RenewLease { epoch, lease_ms }))
    }

    fn owner_url(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<String>>> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        Box::pin(self.readers.run(move |c| read::owner_url(c, &tenant, &run_id)))
    }

    fn take_over(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(String, String)>>> {
        Box::pin(async move {
            match self.write_reply(Op::TakeOver { epoch }).await? {
                Reply::Runs(runs) => Ok(runs),
                other => Err(StoreError::Internal(format!("the writer answered {other:?} to a takeover"))),
            }
        })
    }
}
