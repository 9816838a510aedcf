//! Group commit: the batches that callers queue while the writers are busy are applied together,
//! in one transaction with one statement per table for all of them, so PostgreSQL parses,
//! plans, executes and flushes its log once for many engine decisions instead of once each.
//!
//! A group holds batches of different runs written by the same node. Its statements check
//! every row as a lone batch's do (the history continues where the batch begins, the writer
//! owns the run, a new run's workflow id is free, each settled task is pending, each posted
//! change is still there) but only in total: when any check or statement fails, the group is
//! rolled back. The batches a check singled out are applied alone, each in its own transaction
//! with its own precise error, and the rest tried again as a group; after a second failure, or a
//! failing statement, every batch goes alone. A failing batch never fails the others. A group whose `COMMIT` itself
//! fails fails whole: whether it was applied is unknown, as for a lone batch.

use std::collections::HashSet;
use std::sync::Arc;

use deadpool_postgres::{Client, Pool, Transaction};
use sluice_store::{Batch, ExecChange, StoreError};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::error::{db_err, describe, pool_err};
use crate::writer::{
    self, apply_rows, insert_events, insert_execs, update_execs, writer_epoch, Rows, INSERT_EVENTS, INSERT_EXECS,
    UPDATE_EXECS,
};

/// Batches taken into one group at most.
const MAX_GROUP: usize = 64;

struct Job {
    batch: Batch,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The queue of batches to commit, served by a fixed number of writer tasks that each hold one
/// connection while they commit. The tasks end when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Writers {
    queue: mpsc::UnboundedSender<Job>,
}

impl Writers {
    pub(crate) fn start(pool: Pool, writers: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(serve(pool.clone(), rx.clone()));
        }
        Self { queue }
    }

    /// Commits `batch`, alone or in a group; durable when it returns `Ok`. The writer task, not
    /// the caller, drives the transaction, so a caller that stops waiting cuts nothing short.
    pub(crate) async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.queue
            .send(Job { batch, done })
            .map_err(|_| StoreError::Unavailable("the postgres writers have stopped".into()))?;
        result.await.map_err(|_| StoreError::Internal("a postgres commit did not finish".into()))?
    }
}

async fn serve(pool: Pool, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let mut jobs = Vec::new();
        {
            // One writer at a time takes what is queued; the others wait their turn here.
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let mut client = match pool.get().await {
            Ok(client) => client,
            Err(e) => {
                let e = pool_err(e);
                for job in jobs {
                    let _ = job.done.send(Err(e.clone()));
                }
                continue;
            }
        };
        for group in groups(jobs) {
            commit_group(&mut client, group).await;
        }
    }
}

/// Splits jobs into groups that may share a transaction: batches of different runs, by the same
/// writer. Each job goes into the first group it fits, so the order of a run's batches is kept.
fn groups(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<(Option<i64>, HashSet<String>, Vec<Job>)> = Vec::new();
    for job in jobs {
        let epoch = writer_epoch(&job.batch);
        let runs: Vec<&str> = job.batch.execs.iter().map(|c| c.row.run_id.as_str()).collect();
        // A run already in a group keeps its later batches out of every earlier group.
        let last_with_run = groups.iter().rposition(|(_, seen, _)| runs.iter().any(|r| seen.contains(*r)));
        let start = last_with_run.map_or(0, |i| i + 1);
        let fits = groups.iter().skip(start).position(|(e, _, _)| *e == epoch).map(|i| i + start);
        let slot = match fits {
            Some(i) => i,
            None => {
                groups.push((epoch, HashSet::new(), Vec::new()));
                groups.len() - 1
            }
        };
        let (_, seen, group) = &mut groups[slot];
        seen.extend(runs.into_iter().map(str::to_owned));
        group.push(job);
    }
    groups.into_iter().map(|(_, _, group)| group).collect()
}

async fn commit_group(client: &mut Client, mut jobs: Vec<Job>) {
    // A batch the group's checks single out is applied alone, and the rest tried again as a
    // group (once): one duplicate start does not send 63 other batches down the slow path.
    for _ in 0..2 {
        let batches: Vec<&Batch> = jobs.iter().map(|j| &j.batch).collect();
        match try_group(client, &batches).await {
            Outcome::Committed => {
                for job in jobs {
                    let _ = job.done.send(Ok(()));
                }
                return;
            }
            Outcome::Unknown(e) => {
                for job in jobs {
                    let _ = job.done.send(Err(e.clone()));
                }
                return;
            }
            Outcome::Without(bad) => {
                let mut rest = Vec::with_capacity(jobs.len());
                for (i, job) in jobs.into_iter().enumerate() {
                    if bad.contains(&i) {
                        let result = writer::commit_on(client, &job.batch).await;
                        let _ = job.done.send(result);
                    } else {
                        rest.push(job);
                    }
                }
                jobs = rest;
                if jobs.is_empty() {
                    return;
                }
            }
            Outcome::RolledBack => break,
        }
    }
    for job in jobs {
        let result = writer::commit_on(client, &job.batch).await;
        let _ = job.done.send(result);
    }
}

enum Outcome {
    Committed,
    /// Nothing of the group was applied: its batches go one by one.
    RolledBack,
    /// Nothing of the group was applied, and these batches (by index) failed its checks.
    Without(HashSet<usize>),
    /// `COMMIT` failed: the group may or may not have been applied.
    Unknown(StoreError),
}

async fn try_group(client: &mut Client, batches: &[&Batch]) -> Outcome {
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => return Outcome::Unknown(db_err(e)),
    };
    let verdict = apply_group(&tx, batches).await;
    if let Ok(Verdict::Applied) = verdict {
        return match tx.commit().await {
            Ok(()) => Outcome::Committed,
            Err(e) => Outcome::Unknown(db_err(e)),
        };
    }
    if let Err(e) = tx.rollback().await {
        tracing::error!(error = %describe(&e), "postgres rollback failed");
    }
    match verdict {
        Ok(Verdict::Without(bad)) => Outcome::Without(bad),
        _ => Outcome::RolledBack,
    }
}

enum Verdict {
    Applied,
    /// These batches (by index) failed a check: the group must go without them.
    Without(HashSet<usize>),
}

/// Applies the group, or says which batches failed its checks. Every statement is sent at once,
/// in order, and the answers read in order.
async fn apply_group(tx: &Transaction<'_>, batches: &[&Batch]) -> Result<Verdict, writer::Failure> {
    let changes: Vec<(usize, &ExecChange)> =
        batches.iter().enumerate().flat_map(|(i, b)| b.execs.iter().map(move |c| (i, c))).collect();
    // A batch whose events leave a gap, or that changes one run twice, is left to the checks of
    // the lone path (one statement cannot write a row twice).
    let mut seen = HashSet::new();
    let twice: HashSet<&str> =
        changes.iter().map(|(_, c)| c.row.run_id.as_str()).filter(|run| !seen.insert(*run)).collect();
    let odd: HashSet<usize> = changes
        .iter()
        .filter(|(_, c)| twice.contains(c.row.run_id.as_str()) || c.events.windows(2).any(|w| w[1].seq != w[0].seq + 1))
        .map(|(i, _)| *i)
        .collect();
    if !odd.is_empty() {
        return Ok(Verdict::Without(odd));
    }
    // Updates first: a run that ends and the run that continues it share a workflow id, and
    // only one of them may be running at a time.
    let updates: Vec<&ExecChange> = changes.iter().filter(|(_, c)| !c.create).map(|(_, c)| *c).collect();
    let creates: Vec<&ExecChange> = changes.iter().filter(|(_, c)| c.create).map(|(_, c)| *c).collect();
    let all: Vec<&ExecChange> = changes.iter().map(|(_, c)| *c).collect();
    let rows = Rows::of(batches);
    writer::warm(tx, &[UPDATE_EXECS, INSERT_EXECS, INSERT_EVENTS]).await?;
    let (updated, created, events, rest) = tokio::join!(
        async {
            if updates.is_empty() {
                return Ok(Vec::new());
            }
            update_execs(tx, &updates).await
        },
        async {
            if creates.is_empty() {
                return Ok(Vec::new());
            }
            insert_execs(tx, &creates).await
        },
        insert_events(tx, &all),
        apply_rows(tx, &rows),
    );
    let written: HashSet<String> = updated?.into_iter().chain(created?).collect();
    let bad: HashSet<usize> =
        changes.iter().filter(|(_, c)| !written.contains(&c.row.run_id)).map(|(i, _)| *i).collect();
    if !bad.is_empty() {
        return Ok(Verdict::Without(bad));
    }
    events?;
    rest?;
    Ok(Verdict::Applied)
}

#[cfg(test)]
mod tests {
    use sluice_core::ExecStatus;
    use sluice_store::ExecutionRow;

    use super::*;

    fn job(run: &str, fence: Option<i64>) -> Job {
        let row = ExecutionRow {
            run_id: run.into(),
            workflow_id: run.into(),
            workflow: "w".into(),
            version: "v1".into(),
            status: ExecStatus::Running,
            paused: false,
            dead_letter: false,
            input: serde_json::Value::Null,
            output: None,
            error: None,
            failed_step: None,
            parent: None,
            access: Default::default(),
            next_seq: 2,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let change = ExecChange { tenant: "t".into(), row, events: Vec::new(), create: false, fence };
        Job { batch: Batch { execs: vec![change], ..Batch::default() }, done: oneshot::channel().0 }
    }

    fn runs(groups: &[Vec<Job>]) -> Vec<Vec<&str>> {
        groups.iter().map(|g| g.iter().map(|j| j.batch.execs[0].row.run_id.as_str()).collect()).collect()
    }

    #[test]
    fn a_group_holds_each_run_once_and_one_writer() {
        let jobs = vec![
            job("a", Some(1)),
            job("b", Some(1)),
            job("a", Some(1)),
            job("c", Some(1)),
            job("c", Some(1)),
            job("d", None),
            job("a", Some(1)),
            job("e", Some(1)),
        ];
        let groups = groups(jobs);
        // A run's later batch goes to a later group, so its batches commit in order; a batch of
        // another writer never joins a group.
        assert_eq!(runs(&groups), vec![vec!["a", "b", "c", "e"], vec!["a", "c"], vec!["d"], vec!["a"]]);
    }
}
