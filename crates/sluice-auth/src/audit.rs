//! The audit log writer: rows are queued without waiting and written to the store in batches
//! (every 100 ms or 500 rows), off the request's path. A crash loses at most the last batch;
//! a store outage keeps rows queued (up to a bound) and retries.

use std::sync::Arc;
use std::time::Duration;

use sluice_store::{AuditRow, Store};
use tokio::sync::{mpsc, oneshot};

const BATCH: usize = 500;
const EVERY: Duration = Duration::from_millis(100);
/// Rows held while the store is down; beyond it the oldest are dropped (and counted in the log).
const MAX_QUEUED: usize = 100_000;

enum Msg {
    Row(AuditRow),
    Flush(oneshot::Sender<()>),
    Tick,
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Auditor {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    pub fn record(&self, row: AuditRow) {
        let _ = self.tx.send(Msg::Row(row));
    }

    /// Waits until every row recorded before this call is written (or the store refused it).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut pending: Vec<AuditRow> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut failures = 0u32;
    loop {
        let msg = if pending.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(EVERY, rx.recv()).await {
                Ok(m) => m,
                // Time to write what is pending.
                Err(_) => Some(Msg::Tick),
            }
        };
        let Some(msg) = msg else {
            write(&*store, &mut pending).await;
            return;
        };
        let flush_now = match msg {
            Msg::Row(r) => {
                pending.push(r);
                pending.len() >= BATCH
            }
            Msg::Flush(done) => {
                waiters.push(done);
                true
            }
            Msg::Tick => true,
        };
        if !flush_now {
            continue;
        }
        if write(&*store, &mut pending).await {
            failures = 0;
        } else {
            failures += 1;
            if pending.len() > MAX_QUEUED {
                let drop = pending.len() - MAX_QUEUED;
                pending.drain(..drop);
                tracing::error!(dropped = drop, "audit rows dropped: the store has refused them too long");
            }
            tokio::time::sleep(EVERY * failures.min(50)).await;
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Writes and clears `pending`; false (keeping the rows) when the store refuses.
async fn write(store: &dyn Store, pending: &mut Vec<AuditRow>) -> bool {
    if pending.is_empty() {
        return true;
    }
    for chunk in pending.chunks(BATCH) {
        if let Err(e) = store.append_audit(chunk.to_vec()).await {
            tracing::warn!(error = %e, rows = pending.len(), "cannot write audit rows; will retry");
            return false;
        }
    }
    pending.clear();
    true
}
