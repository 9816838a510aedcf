//! Poison-pill quarantine. Whatever makes a run's processing kill its node (an evaluator defect, a
//! limit that fails to hold, memory the system takes back), the node that takes the run on next
//! must not die the same way, and nor must the next. Expressions that need more than a decision
//! may use in place move to the evaluation threads (`eval`); before a decision does, it records
//! the attempt durably in the store: a directory document per run (`eval_attempt`, by run id)
//! naming the step and how many attempts at it have not come back. An attempt that comes back
//! removes the document. A run whose step has that many unreturned attempts as the limit
//! (`EngineOptions::quarantine_after`) does not try again: the step fails with
//! `engine.quarantined` (a `step_aborted` event), counted in `sluice_steps_quarantined_total`
//! and written to the tenant's audit log.
//!
//! In-place decisions write nothing: only the move to the evaluation threads, already the slow
//! path, pays for the marker (a read, a write, and a removal afterwards).

use serde_json::json;
use sluice_core::ErrorInfo;
use sluice_store::{AuditRow, Doc};

use crate::txn::Quarantined;
use crate::{new_id, now_ms, Engine, Result};

/// The kind of the directory documents that mark attempts.
const KIND: &str = "eval_attempt";

/// Marker of the workflow's `output` expression, which belongs to no step.
pub(crate) const OUTPUT: &str = "$output";

/// What to do before a decision moves to the evaluation threads.
pub(crate) enum Verdict {
    /// Evaluate; `marked`: an attempt was recorded, to remove when it comes back.
    Evaluate { marked: bool },
    /// The step crashed its node this many times: fail it instead.
    Quarantine { crashes: u64 },
}

impl Engine {
    /// Records an attempt at `step` of `run_id` before it is evaluated on the evaluation threads,
    /// or says to quarantine the step when as many attempts at it never came back as the limit.
    pub(crate) async fn before_evaluation(&self, tenant: &str, run_id: &str, step: &str) -> Result<Verdict> {
        let limit = u64::from(self.inner.opts.quarantine_after);
        if limit == 0 {
            return Ok(Verdict::Evaluate { marked: false });
        }
        let store = &self.inner.store;
        let doc = store.get_doc(tenant, KIND, run_id).await?;
        let (crashes, version) = match &doc {
            Some(d) if d.body["step"] == step => (d.body["crashes"].as_u64().unwrap_or(0), d.version),
            Some(d) => (0, d.version),
            None => (0, 0),
        };
        if crashes >= limit {
            return Ok(Verdict::Quarantine { crashes });
        }
        let mark = Doc {
            tenant: tenant.to_string(),
            kind: KIND.to_string(),
            id: run_id.to_string(),
            body: json!({"step": step, "crashes": crashes + 1}),
            version,
            updated_at_ms: now_ms(),
        };
        if !store.put_doc(mark).await? {
            // Another node marked an attempt meanwhile: it holds the run, this node's change will
            // be refused; nothing to evaluate here.
            return Err(crate::Error::Conflict(format!("execution `{run_id}` is being changed elsewhere; retry")));
        }
        Ok(Verdict::Evaluate { marked: true })
    }

    /// The attempt came back: removes its marker.
    pub(crate) async fn after_evaluation(&self, tenant: &str, run_id: &str) {
        if let Err(e) = self.inner.store.delete_doc(tenant, KIND, run_id).await {
            tracing::warn!(run_id, error = %e, "cannot remove the marker of an evaluation that came back");
        }
    }

    /// The error a quarantined step fails with.
    pub(crate) fn quarantine_error(&self, step: &str, crashes: u64) -> ErrorInfo {
        let what = if step == OUTPUT { "the workflow's output".to_string() } else { format!("step `{step}`") };
        ErrorInfo {
            details: Some(json!({"crashes": crashes, "limit": self.inner.opts.quarantine_after})),
            ..ErrorInfo::new(
                "engine.quarantined",
                format!(
                    "{what} was not run again: evaluating it stopped the server {crashes} times \
                     (the limit is {})",
                    self.inner.opts.quarantine_after
                ),
            )
        }
    }

    /// After the batch that quarantined a step is durable: the marker goes, the metric counts it,
    /// the log says it and the tenant's audit log records it.
    pub(crate) async fn quarantined(&self, q: Quarantined) {
        let Quarantined { tenant, workflow_id, run_id, trace_id, step, crashes } = q;
        self.inner.counters.steps_quarantined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(workflow_id = %workflow_id, run_id = %run_id, step, crashes,
            "a step that stopped the server too often was quarantined: it failed with engine.quarantined");
        self.after_evaluation(&tenant, &run_id).await;
        let row = AuditRow {
            id: new_id(),
            tenant,
            at_ms: now_ms(),
            actor: "engine".into(),
            role: None,
            action: "engine.quarantined".into(),
            target: format!("{workflow_id}/{run_id}/{step}"),
            status: 500,
            source_ip: None,
            trace_id: Some(trace_id.to_string()),
        };
        if let Err(e) = self.inner.store.append_audit(vec![row]).await {
            tracing::warn!(run_id, error = %e, "cannot write the audit row of a quarantine");
        }
    }
}
