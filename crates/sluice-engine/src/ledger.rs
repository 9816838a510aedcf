//! The usage ledger and budgets around AI gateway calls: a call is admitted against the budgets
//! of its tenant and API key (their spend loaded from the ledger when first needed), and every
//! upstream attempt becomes a [`UsageRow`]. An `llm` step's rows are committed with the result
//! they paid for; other calls (the chat endpoint) queue theirs for the [`UsageQueue`], which
//! commits what is queued every few milliseconds in one batch.

use sluice_gateway::budget::{Alert, Reservation};
use sluice_gateway::{Exceeded, Gateway, Outcome, UsageRecord};
use sluice_store::{Batch, BudgetAlertRow, UsageRow};

use crate::{lock, new_id, now_ms, Engine, Error, Result};

/// Queued rows that make the writer commit at once rather than at its next tick.
const USAGE_BATCH: usize = 1000;
/// Rows kept while the store refuses them; beyond this the oldest are dropped, loudly.
const USAGE_MAX_QUEUED: usize = 200_000;

/// Ledger rows waiting to be committed. Queuing one takes a lock and wakes no one (a wake-up per
/// call costs more than the row), and one commit carries every row queued since the last: at
/// thousands of calls a second the store sees fifty batches instead of thousands.
#[derive(Default)]
pub(crate) struct UsageQueue {
    pending: std::sync::Mutex<Ledger>,
    /// Held while rows are taken and committed, so that a flush waits for a commit under way.
    writing: tokio::sync::Mutex<()>,
    full: tokio::sync::Notify,
}

/// Who a gateway call is made for, as recorded in its ledger rows.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub tenant: String,
    /// The API key of the caller, for per-key budgets.
    pub api_key: Option<String>,
    /// `llm_step` or `chat`.
    pub source: &'static str,
    pub run_id: Option<String>,
    pub workflow_id: Option<String>,
    pub step: Option<String>,
}

/// Why a call was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Budget(#[from] Exceeded),
    /// The spend could not be read from the ledger.
    #[error(transparent)]
    Store(#[from] Error),
}

/// What one call leaves in the ledger.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub usage: Vec<UsageRow>,
    pub alerts: Vec<BudgetAlertRow>,
}

impl Ledger {
    pub fn is_empty(&self) -> bool {
        self.usage.is_empty() && self.alerts.is_empty()
    }
}

/// Totals of gateway attempts by `(route, target, outcome)`, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CallStats {
    pub attempts: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub latency_seconds: f64,
}

/// The ledger's name of an outcome.
pub fn outcome_name(o: Outcome) -> String {
    match o {
        Outcome::Success => "success".into(),
        Outcome::HttpError(status) => format!("http_{status}"),
        Outcome::Timeout => "timeout".into(),
        Outcome::Connect => "connect".into(),
        Outcome::Malformed => "malformed".into(),
        Outcome::StreamCut => "stream_cut".into(),
        Outcome::RequestFailed => "request_failed".into(),
        Outcome::CircuitOpen => "circuit_open".into(),
    }
}

impl Engine {
    /// Admits a call estimated at `estimate_usd()` against the budgets of its tenant and key;
    /// without budgets nothing is estimated.
    pub async fn admit_call(
        &self,
        gateway: &Gateway,
        ctx: &CallContext,
        estimate_usd: impl FnOnce() -> f64,
    ) -> std::result::Result<Reservation, Refused> {
        let budgets = gateway.budgets();
        if budgets.is_empty() {
            return Ok(Reservation::default());
        }
        let now = now_ms();
        let missing = budgets.missing(&ctx.tenant, ctx.api_key.as_deref(), now);
        if !missing.is_empty() {
            // A spend read from the ledger must include the rows still queued.
            self.flush_usage().await?;
        }
        for load in missing {
            let total = self
                .inner
                .store
                .usage_total(&load.tenant, load.key.as_deref(), load.since_ms)
                .await
                .map_err(Error::from)?;
            budgets.load(&load, total.cost_usd);
        }
        Ok(budgets.reserve(&ctx.tenant, ctx.api_key.as_deref(), estimate_usd(), now)?)
    }

    /// Settles a call's reservation with what its attempts cost, and returns its ledger rows
    /// and the budget alerts it raised.
    pub fn settle_call(
        &self,
        gateway: &Gateway,
        ctx: &CallContext,
        reservation: Reservation,
        usage: &[UsageRecord],
    ) -> Ledger {
        let cost: f64 = usage.iter().filter_map(|u| u.cost_usd).sum();
        let now = now_ms();
        {
            let mut stats = lock(&self.inner.call_stats);
            for u in usage {
                let s = stats.entry((u.route.clone(), u.target.clone(), outcome_name(u.outcome))).or_default();
                s.attempts += 1;
                s.input_tokens += u.input_tokens;
                s.output_tokens += u.output_tokens;
                s.cost_usd += u.cost_usd.unwrap_or(0.0);
                s.latency_seconds += u.latency.as_secs_f64();
            }
        }
        let alerts = gateway.budgets().settle(reservation, cost);
        for a in &alerts {
            tracing::warn!(
                budget = %a.budget,
                tenant = %a.tenant,
                level = a.level,
                limit_usd = a.limit_usd,
                spent_usd = a.spent_usd,
                "budget limit reached"
            );
        }
        Ledger {
            usage: usage
                .iter()
                .map(|u| UsageRow {
                    id: new_id(),
                    tenant: ctx.tenant.clone(),
                    at_ms: now,
                    api_key: ctx.api_key.clone(),
                    source: ctx.source.to_string(),
                    route: u.route.clone(),
                    target: u.target.clone(),
                    provider: u.provider.clone(),
                    model: u.model.clone(),
                    attempt: u.attempt,
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cost_usd: u.cost_usd,
                    latency_us: u64::try_from(u.latency.as_micros()).unwrap_or(u64::MAX),
                    outcome: outcome_name(u.outcome),
                    experiment: u.experiment.as_ref().map(|e| e.experiment.clone()),
                    arm: u.experiment.as_ref().map(|e| e.arm.clone()),
                    run_id: ctx.run_id.clone(),
                    workflow_id: ctx.workflow_id.clone(),
                    step: ctx.step.clone(),
                })
                .collect(),
            alerts: alerts.into_iter().map(|a| alert_row(a, now)).collect(),
        }
    }

    /// Totals of the gateway attempts made through this engine, sorted by key.
    pub fn call_stats(&self) -> Vec<((String, String, String), CallStats)> {
        let mut out: Vec<_> = lock(&self.inner.call_stats).iter().map(|(k, v)| (k.clone(), *v)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Commits ledger rows that no execution carries.
    pub async fn record_usage(&self, ledger: Ledger) -> Result<()> {
        if ledger.is_empty() {
            return Ok(());
        }
        self.inner.store.commit(Batch { usage: ledger.usage, alerts: ledger.alerts, ..Batch::default() }).await?;
        Ok(())
    }

    /// Queues ledger rows that no execution carries; the usage writer commits them within
    /// `EngineOptions::usage_every` (20 ms by default). [`Engine::flush_usage`] commits them now (readers of the ledger and
    /// shutdown call it).
    pub fn queue_usage(&self, ledger: Ledger) {
        if ledger.is_empty() {
            return;
        }
        let queue = &self.inner.usage;
        let queued = {
            let mut pending = lock(&queue.pending);
            pending.usage.extend(ledger.usage);
            pending.alerts.extend(ledger.alerts);
            pending.usage.len()
        };
        if queued >= USAGE_BATCH {
            queue.full.notify_one();
        }
    }

    /// Commits every queued ledger row, waiting for a commit under way; on failure the rows stay
    /// queued for the next try.
    pub async fn flush_usage(&self) -> Result<()> {
        let queue = &self.inner.usage;
        let _writing = queue.writing.lock().await;
        let ledger = std::mem::take(&mut *lock(&queue.pending));
        if ledger.is_empty() {
            return Ok(());
        }
        let (usage, alerts) = (ledger.usage.len(), ledger.alerts.len());
        match self.record_usage(ledger.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut pending = lock(&queue.pending);
                let newer = std::mem::take(&mut *pending);
                *pending = ledger;
                pending.usage.extend(newer.usage);
                pending.alerts.extend(newer.alerts);
                if pending.usage.len() > USAGE_MAX_QUEUED {
                    let drop = pending.usage.len() - USAGE_MAX_QUEUED;
                    pending.usage.drain(..drop);
                    tracing::error!(dropped = drop, "usage rows dropped: the store has refused them too long");
                }
                tracing::warn!(error = %e, usage, alerts, "cannot write usage rows; will retry");
                Err(e)
            }
        }
    }

    /// The usage writer: commits queued rows every `usage_every`, or at once when many wait.
    pub(crate) async fn write_usage(self) {
        let mut failures = 0u32;
        loop {
            let wait = self.inner.opts.usage_every * failures.clamp(1, 50);
            let _ = tokio::time::timeout(wait, self.inner.usage.full.notified()).await;
            failures = match self.flush_usage().await {
                Ok(()) => 0,
                Err(_) => failures + 1,
            };
        }
    }
}

fn alert_row(a: Alert, at_ms: i64) -> BudgetAlertRow {
    BudgetAlertRow {
        tenant: a.tenant,
        budget: a.budget,
        period_start_ms: a.period_start_ms,
        level: a.level.to_string(),
        limit_usd: a.limit_usd,
        spent_usd: a.spent_usd,
        at_ms,
    }
}
