//! Several stores as one: each execution lives on the shard chosen by a stable hash of its
//! workflow id's first segment (the part before the first `.`), so a parent and its children
//! (`order-7.charge`) and every run of a continue-as-new chain share a shard and one batch stays
//! one transaction. Lookups by run id and listings ask every shard; workflow definitions are
//! written to all of them. The identity directory and the audit log live on the first shard.

use std::sync::Arc;

use sluice_core::Event;

use crate::{
    page_limit, AuditFilter, AuditRow, Batch, BoxFuture, BudgetAlertRow, Doc, ExecutionFilter, ExecutionRow, Page,
    PostedChange, QueueDepth, Result, RunChange, Store, StoreError, TaskOutcome, TaskRow, TimerRow, UsageFilter,
    UsageRow, UsageTotal, Wake, WakeSink, WorkflowSummary, WorkflowVersion,
};

pub struct ShardedStore {
    shards: Vec<Arc<dyn Store>>,
    /// A node's epoch (its epoch on shard 0) → its epoch on each shard.
    epochs: Arc<std::sync::Mutex<std::collections::HashMap<i64, Vec<i64>>>>,
    /// The shard the next claim starts at, so no shard's queue is always asked last.
    next_claim: std::sync::atomic::AtomicUsize,
}

impl ShardedStore {
    /// Panics never; with one shard it behaves exactly like that store.
    pub fn new(shards: Vec<Arc<dyn Store>>) -> Result<Self> {
        if shards.is_empty() {
            return Err(StoreError::Internal("a sharded store needs at least one shard".into()));
        }
        Ok(Self { shards, epochs: Arc::default(), next_claim: std::sync::atomic::AtomicUsize::new(0) })
    }

    /// The epochs on each shard of the node whose epoch is `epoch`.
    fn epochs_of(&self, epoch: i64) -> Result<Vec<i64>> {
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&epoch)
            .cloned()
            .ok_or_else(|| StoreError::Internal(format!("node epoch {epoch} was not registered through this store")))
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of a workflow id: stable across restarts and builds (FNV-1a of its first segment).
    pub fn shard_of(&self, workflow_id: &str) -> usize {
        let key = workflow_id.split('.').next().unwrap_or(workflow_id);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.shards.len() as u64) as usize
    }

    pub fn shard(&self, i: usize) -> &Arc<dyn Store> {
        &self.shards[i % self.shards.len()]
    }
}

async fn all<T>(futs: Vec<BoxFuture<'_, Result<T>>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(futs.len());
    // Sequential awaits keep this free of extra dependencies; shards are few.
    for f in futs {
        out.push(f.await?);
    }
    Ok(out)
}

/// One page, newest first, out of one page per shard. Every shard was asked with the same cursor
/// (items older than it), so the page is the `limit` newest of theirs; another follows if any
/// shard had more or some were cut here. `key` is the time-ordered id the cursor is made of.
fn merge_pages<T>(pages: Vec<Page<T>>, limit: usize, key: impl Fn(&T) -> &String) -> Page<T> {
    let limit = page_limit(limit);
    let more = pages.iter().any(|p| p.next_cursor.is_some());
    let mut items: Vec<T> = pages.into_iter().flat_map(|p| p.items).collect();
    items.sort_by(|a, b| key(b).cmp(key(a)));
    let cut = items.len() > limit;
    items.truncate(limit);
    let next_cursor = if cut || more { items.last().map(|r| key(r).clone()) } else { None };
    Page { items, next_cursor }
}

impl Store for ShardedStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut targets: Vec<usize> = batch
                .execs
                .iter()
                .map(|c| self.shard_of(&c.row.workflow_id))
                .chain(batch.add_tasks.iter().map(|t| self.shard_of(&t.workflow_id)))
                .chain(batch.add_timers.iter().map(|t| self.shard_of(&t.workflow_id)))
                // Ledger rows live with their execution; the rest (chat calls, alerts) on shard 0.
                .chain(batch.usage.iter().map(|u| u.workflow_id.as_deref().map_or(0, |w| self.shard_of(w))))
                .chain(batch.alerts.iter().map(|_| 0))
                .collect();
            targets.sort_unstable();
            targets.dedup();
            match targets.as_slice() {
                [one] => {
                    let mut batch = batch;
                    // Each shard fences with the node's epoch on that shard.
                    for c in &mut batch.execs {
                        if let Some(fence) = c.fence {
                            c.fence = self.epochs_of(fence)?.get(*one).copied();
                        }
                    }
                    self.shards[*one].commit(batch).await
                }
                // Only removals: deleting what is not there is a no-op, so every shard gets them.
                [] => {
                    all(self.shards.iter().map(|s| s.commit(batch.clone())).collect()).await?;
                    Ok(())
                }
                _ => Err(StoreError::Internal(
                    "a batch touches executions on different shards; related executions must share the first segment of their workflow id".into(),
                )),
            }
        })
    }

    fn put_workflow(&self, tenant: &str, version: WorkflowVersion) -> BoxFuture<'_, Result<bool>> {
        let tenant = tenant.to_string();
        Box::pin(async move {
            let created = all(self.shards.iter().map(|s| s.put_workflow(&tenant, version.clone())).collect()).await?;
            Ok(created.into_iter().any(|c| c))
        })
    }

    fn get_workflow(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<WorkflowVersion>>> {
        self.shards[0].get_workflow(tenant, name, version)
    }

    fn list_workflows(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<WorkflowSummary>>> {
        self.shards[0].list_workflows(tenant)
    }

    fn list_versions(&self, tenant: &str, name: &str) -> BoxFuture<'_, Result<Vec<WorkflowVersion>>> {
        self.shards[0].list_versions(tenant, name)
    }

    fn get_execution(
        &self,
        tenant: &str,
        workflow_id: &str,
        run_id: Option<&str>,
    ) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        self.shards[self.shard_of(workflow_id)].get_execution(tenant, workflow_id, run_id)
    }

    fn get_run(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<ExecutionRow>>> {
        let (tenant, run_id) = (tenant.to_string(), run_id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if let Some(row) = s.get_run(&tenant, &run_id).await? {
                    return Ok(Some(row));
                }
            }
            Ok(None)
        })
    }

    fn list_executions(&self, tenant: &str, filter: ExecutionFilter) -> BoxFuture<'_, Result<Page<ExecutionRow>>> {
        let tenant = tenant.to_string();
        Box::pin(async move {
            if let Some(wid) = &filter.workflow_id {
                return self.shards[self.shard_of(wid)].list_executions(&tenant, filter).await;
            }
            let pages = all(self.shards.iter().map(|s| s.list_executions(&tenant, filter.clone())).collect()).await?;
            // Run ids are time-ordered.
            Ok(merge_pages(pages, filter.limit, |r| &r.run_id))
        })
    }

    fn count_running(&self, tenant: &str, workflow: Option<&str>) -> BoxFuture<'_, Result<u64>> {
        let (tenant, workflow) = (tenant.to_string(), workflow.map(str::to_string));
        Box::pin(async move {
            let counts =
                all(self.shards.iter().map(|s| s.count_running(&tenant, workflow.as_deref())).collect()).await?;
            Ok(counts.into_iter().sum())
        })
    }

    fn history(&self, tenant: &str, run_id: &str, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Event>>> {
        let (tenant, run_id) = (tenant.to_string(), run_id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.get_run(&tenant, &run_id).await?.is_some() {
                    return s.history(&tenant, &run_id, after, limit).await;
                }
            }
            Ok(Vec::new())
        })
    }

    fn load_tasks(&self) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        Box::pin(async move {
            Ok(all(self.shards.iter().map(|s| s.load_tasks()).collect()).await?.into_iter().flatten().collect())
        })
    }

    fn load_timers(&self) -> BoxFuture<'_, Result<Vec<TimerRow>>> {
        Box::pin(async move {
            Ok(all(self.shards.iter().map(|s| s.load_timers()).collect()).await?.into_iter().flatten().collect())
        })
    }

    fn run_work(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<(Vec<TaskRow>, Vec<TimerRow>)>> {
        let (tenant, run_id) = (tenant.to_string(), run_id.to_string());
        Box::pin(async move {
            let parts = all(self.shards.iter().map(|s| s.run_work(&tenant, &run_id)).collect()).await?;
            Ok(parts.into_iter().fold((Vec::new(), Vec::new()), |(mut tasks, mut timers), (t, w)| {
                tasks.extend(t);
                timers.extend(w);
                (tasks, timers)
            }))
        })
    }

    fn list_usage(&self, tenant: &str, filter: UsageFilter) -> BoxFuture<'_, Result<Page<UsageRow>>> {
        let tenant = tenant.to_string();
        Box::pin(async move {
            let pages = all(self.shards.iter().map(|s| s.list_usage(&tenant, filter.clone())).collect()).await?;
            // Ledger ids are time-ordered.
            Ok(merge_pages(pages, filter.limit, |u| &u.id))
        })
    }

    fn usage_total(&self, tenant: &str, api_key: Option<&str>, since_ms: i64) -> BoxFuture<'_, Result<UsageTotal>> {
        let (tenant, api_key) = (tenant.to_string(), api_key.map(str::to_string));
        Box::pin(async move {
            let parts =
                all(self.shards.iter().map(|s| s.usage_total(&tenant, api_key.as_deref(), since_ms)).collect()).await?;
            Ok(parts.into_iter().fold(UsageTotal::default(), |a, b| UsageTotal {
                calls: a.calls + b.calls,
                input_tokens: a.input_tokens + b.input_tokens,
                output_tokens: a.output_tokens + b.output_tokens,
                cost_usd: a.cost_usd + b.cost_usd,
            }))
        })
    }

    fn list_alerts(&self, tenant: &str) -> BoxFuture<'_, Result<Vec<BudgetAlertRow>>> {
        self.shards[0].list_alerts(tenant)
    }

    fn put_doc(&self, doc: Doc) -> BoxFuture<'_, Result<bool>> {
        self.shards[0].put_doc(doc)
    }

    fn get_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        self.shards[0].get_doc(tenant, kind, id)
    }

    fn list_docs(&self, tenant: &str, kind: &str) -> BoxFuture<'_, Result<Vec<Doc>>> {
        self.shards[0].list_docs(tenant, kind)
    }

    fn delete_doc(&self, tenant: &str, kind: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        self.shards[0].delete_doc(tenant, kind, id)
    }

    fn find_doc(&self, kind: &str, id: &str) -> BoxFuture<'_, Result<Option<Doc>>> {
        self.shards[0].find_doc(kind, id)
    }

    fn append_audit(&self, rows: Vec<AuditRow>) -> BoxFuture<'_, Result<()>> {
        self.shards[0].append_audit(rows)
    }

    fn list_audit(&self, tenant: &str, filter: AuditFilter) -> BoxFuture<'_, Result<Page<AuditRow>>> {
        self.shards[0].list_audit(tenant, filter)
    }

    fn register_node(&self, node: &str, url: Option<&str>, lease_ms: i64) -> BoxFuture<'_, Result<i64>> {
        let (node, url) = (node.to_string(), url.map(str::to_string));
        Box::pin(async move {
            let epochs =
                all(self.shards.iter().map(|s| s.register_node(&node, url.as_deref(), lease_ms)).collect()).await?;
            let epoch = epochs[0];
            self.epochs.lock().unwrap_or_else(|p| p.into_inner()).insert(epoch, epochs);
            Ok(epoch)
        })
    }

    fn owner_url(&self, tenant: &str, run_id: &str) -> BoxFuture<'_, Result<Option<String>>> {
        let (tenant, run_id) = (tenant.to_string(), run_id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.get_run(&tenant, &run_id).await?.is_some() {
                    return s.owner_url(&tenant, &run_id).await;
                }
            }
            Ok(None)
        })
    }

    fn renew_lease(&self, epoch: i64, lease_ms: i64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let renewed =
                all(self.shards.iter().zip(&epochs).map(|(s, e)| s.renew_lease(*e, lease_ms)).collect()).await?;
            Ok(renewed.into_iter().all(|r| r))
        })
    }

    fn take_over(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(String, String)>>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let taken = all(self.shards.iter().zip(&epochs).map(|(s, e)| s.take_over(*e)).collect()).await?;
            Ok(taken.into_iter().flatten().collect())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            all(self.shards.iter().map(|s| s.ping()).collect()).await?;
            Ok(())
        })
    }

    fn shared_queues(&self) -> bool {
        self.shards.iter().all(|s| s.shared_queues())
    }

    fn live_nodes(&self) -> BoxFuture<'_, Result<u64>> {
        self.shards[0].live_nodes()
    }

    /// Each shard releases the tasks it holds, with the node's epoch there.
    fn release_tasks(&self, epoch: i64, ids: Vec<String>) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let released =
                all(self.shards.iter().zip(&epochs).map(|(s, e)| s.release_tasks(*e, ids.clone())).collect()).await?;
            Ok(released.into_iter().flatten().collect())
        })
    }

    /// Claims from the shards in turn, starting at a different one each time, until `max`.
    fn claim_tasks(
        &self,
        tenant: &str,
        queue: &str,
        max: usize,
        now_ms: i64,
        epoch: i64,
    ) -> BoxFuture<'_, Result<Vec<TaskRow>>> {
        let (tenant, queue) = (tenant.to_string(), queue.to_string());
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let first = self.next_claim.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut out = Vec::new();
            for k in 0..self.shards.len() {
                let i = (first + k) % self.shards.len();
                if out.len() >= max {
                    break;
                }
                out.extend(self.shards[i].claim_tasks(&tenant, &queue, max - out.len(), now_ms, epochs[i]).await?);
            }
            Ok(out)
        })
    }

    /// A task id names its run, not its shard: the one shard that holds it answers true.
    fn heartbeat_task(&self, tenant: &str, id: &str, now_ms: i64) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.heartbeat_task(&tenant, &id, now_ms).await? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn post_outcome(&self, tenant: &str, id: &str, outcome: TaskOutcome) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.post_outcome(&tenant, &id, outcome.clone()).await? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn posted_outcomes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, TaskOutcome)>>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let found = all(self.shards.iter().zip(&epochs).map(|(s, e)| s.posted_outcomes(*e)).collect()).await?;
            Ok(found.into_iter().flatten().collect())
        })
    }

    fn expired_tasks(&self, epoch: i64, now_ms: i64) -> BoxFuture<'_, Result<Vec<(TaskRow, &'static str)>>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let found =
                all(self.shards.iter().zip(&epochs).map(|(s, e)| s.expired_tasks(*e, now_ms)).collect()).await?;
            Ok(found.into_iter().flatten().collect())
        })
    }

    /// Posted on the shard that holds the run (the others have no such run).
    fn post_change(&self, tenant: &str, run_id: &str, id: &str, change: RunChange) -> BoxFuture<'_, Result<bool>> {
        let (tenant, run_id, id) = (tenant.to_string(), run_id.to_string(), id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.post_change(&tenant, &run_id, &id, change.clone()).await? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn posted_changes(&self, epoch: i64) -> BoxFuture<'_, Result<Vec<PostedChange>>> {
        Box::pin(async move {
            let epochs = self.epochs_of(epoch)?;
            let found = all(self.shards.iter().zip(&epochs).map(|(s, e)| s.posted_changes(*e)).collect()).await?;
            Ok(found.into_iter().flatten().collect())
        })
    }

    fn drop_change(&self, tenant: &str, id: &str) -> BoxFuture<'_, Result<bool>> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        Box::pin(async move {
            for s in &self.shards {
                if s.drop_change(&tenant, &id).await? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn queue_depths(&self, now_ms: i64) -> BoxFuture<'_, Result<Vec<QueueDepth>>> {
        Box::pin(async move {
            let mut merged: std::collections::BTreeMap<(String, String), (u64, i64)> = Default::default();
            for rows in all(self.shards.iter().map(|s| s.queue_depths(now_ms)).collect()).await? {
                for d in rows {
                    let e = merged.entry((d.tenant, d.queue)).or_insert((0, d.oldest_visible_ms));
                    e.0 += d.ready;
                    e.1 = e.1.min(d.oldest_visible_ms);
                }
            }
            Ok(merged
                .into_iter()
                .map(|((tenant, queue), (ready, oldest_visible_ms))| QueueDepth {
                    tenant,
                    queue,
                    ready,
                    oldest_visible_ms,
                })
                .collect())
        })
    }

    /// A wake-up about a queue goes to every shard's listeners (which are every node).
    fn notify_all(&self, wakes: Vec<Wake>) -> BoxFuture<'_, Result<()>> {
        self.shards[0].notify_all(wakes)
    }

    /// Listens on every shard; an answer posted for a node's epoch on one shard is told as
    /// posted for its epoch on the first, which is how the node knows itself.
    fn listen(&self, sink: WakeSink) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for (i, s) in self.shards.iter().enumerate() {
                let sink = sink.clone();
                let epochs = self.epochs.clone();
                s.listen(std::sync::Arc::new(move |w| match w {
                    Wake::Outcome { epoch } if i > 0 => {
                        let node = epochs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .find(|(_, on)| on.get(i) == Some(&epoch))
                            .map(|(first, _)| *first);
                        if let Some(epoch) = node {
                            sink(Wake::Outcome { epoch });
                        }
                    }
                    w => sink(w),
                }))
                .await?;
            }
            Ok(())
        })
    }
}
