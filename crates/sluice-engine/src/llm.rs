//! `llm` steps: the engine calls the AI gateway itself and journals the answer like a worker's
//! result, so neither a restart nor a replay calls the model again for a finished step.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::def::{Step, StepKind};
use sluice_core::{DefError, ErrorInfo, WorkflowDef};
use sluice_gateway::{CallError, CallOptions, ChatRequest, Error as RouteError, Gateway, Message, Outcome};
use sluice_store::TaskRow;
use tracing::Instrument;

use crate::trace::task_span;
use crate::{lock, CallContext, Engine, Ledger, Refused};

impl Engine {
    pub(crate) fn run_llm(&self, row: TaskRow) {
        let engine = self.clone();
        let span = task_span(&row);
        let work = async move {
            let limit = Duration::from_millis(row.start_to_close_ms.max(1));
            let mut ledger = Ledger::default();
            let outcome = match tokio::time::timeout(limit, engine.llm_call(&row, &mut ledger)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    Err((ErrorInfo::new("llm.timeout", format!("no answer within {} ms", limit.as_millis())), true))
                }
            };
            // The reaper may have failed the attempt for taking too long; then it is not ours.
            if lock(&engine.inner.tasks).remove(&row.id).is_none() {
                if let Err(e) = engine.record_usage(ledger).await {
                    tracing::warn!(error = %e, "could not record the usage of a timed-out llm step");
                }
                return;
            }
            let (output, failure) = match outcome {
                Ok(v) => (Some(v), None),
                Err(f) => (None, Some(f)),
            };
            if let Err(e) = engine.finish_task_with(row, output, failure, ledger).await {
                tracing::warn!(error = %e, "could not record an llm step result");
            }
        };
        tokio::spawn(work.instrument(span));
    }

    /// Admits the call against the budgets, makes it, and leaves its usage in `ledger`.
    async fn llm_call(&self, row: &TaskRow, ledger: &mut Ledger) -> Result<Value, (ErrorInfo, bool)> {
        let Some(gateway) = self.inner.opts.gateway.clone() else {
            return Err((
                ErrorInfo::new(
                    "llm.no_gateway",
                    "this server runs without an AI gateway; start it with --gateway FILE",
                ),
                false,
            ));
        };
        let (route, req, options) = request_of(&row.input).map_err(|e| (e, false))?;
        // Charged to the principal that started the execution as well as to its tenant.
        let access = match self.run_access(&row.tenant, &row.run_id).await {
            Ok(a) => a,
            Err(e) => return Err((ErrorInfo::new("llm.ledger_unavailable", e.to_string()), true)),
        };
        let ctx = CallContext {
            tenant: row.tenant.clone(),
            api_key: access.api_key().map(str::to_string),
            source: "llm_step",
            run_id: Some(row.run_id.clone()),
            workflow_id: Some(row.workflow_id.clone()),
            step: Some(row.step.clone()),
        };
        let estimate = || gateway.estimate_cost(&route, &req, &options);
        let reservation = match self.admit_call(&gateway, &ctx, estimate).await {
            Ok(r) => r,
            Err(Refused::Budget(e)) => {
                let mut info = ErrorInfo::new("llm.budget_exceeded", e.to_string());
                info.details = Some(e.details());
                return Err((info, false));
            }
            Err(Refused::Store(e)) => return Err((ErrorInfo::new("llm.ledger_unavailable", e.to_string()), true)),
        };
        let answer = gateway.chat_with(&route, &req, &options).await;
        *ledger = self.settle_call(&gateway, &ctx, reservation, &answer.usage);
        let served = answer.usage.iter().rev().find(|u| u.outcome == Outcome::Success);
        let cost: Option<f64> = answer.usage.iter().map(|u| u.cost_usd).sum();
        match answer.result {
            Ok(resp) => {
                let mut out = json!({
                    "text": resp.text,
                    "model": resp.model,
                    "finish_reason": resp.finish_reason.to_string(),
                    "target": served.map(|u| u.target.as_str()),
                    "provider": served.map(|u| u.provider.as_str()),
                    "usage": {
                        "input_tokens": resp.usage.input_tokens,
                        "output_tokens": resp.usage.output_tokens,
                        "cost_usd": cost,
                    },
                });
                if let Some(j) = answer.json {
                    out["json"] = j;
                }
                if !resp.tool_calls.is_empty() {
                    out["tool_calls"] = resp
                        .tool_calls
                        .iter()
                        .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
                        .collect();
                }
                Ok(out)
            }
            Err(e) => Err(error_info(&e)),
        }
    }
}

/// Checks the `llm` steps of a definition against the gateway this engine runs with: the route
/// exists and the output schema compiles. Paths are those of the parser (`steps[1].route`).
pub(crate) fn check_definition(def: &WorkflowDef, gateway: Option<&Gateway>) -> Vec<DefError> {
    fn walk(steps: &[Step], path: &str, gateway: Option<&Gateway>, out: &mut Vec<DefError>) {
        for (i, step) in steps.iter().enumerate() {
            let here = format!("{path}[{i}]");
            match &step.kind {
                StepKind::Llm(l) => match gateway {
                    None => out.push(DefError::new(
                        format!("{here}.type"),
                        "`llm` steps need the AI gateway: start the server with --gateway FILE",
                    )),
                    Some(g) => {
                        if g.route(&l.route).is_none() {
                            let mut known: Vec<&str> = g.route_names().collect();
                            known.sort_unstable();
                            out.push(DefError::new(
                                format!("{here}.route"),
                                format!("unknown route `{}`; the gateway has: {}", l.route, known.join(", ")),
                            ));
                        }
                        if let Some(schema) = &l.schema {
                            if let Err(e) = sluice_gateway::structured::check_schema(schema) {
                                out.push(DefError::new(
                                    format!("{here}.schema"),
                                    format!("not a valid JSON Schema: {e}"),
                                ));
                            }
                        }
                    }
                },
                StepKind::Switch(sw) => {
                    for (c, case) in sw.cases.iter().enumerate() {
                        walk(&case.steps, &format!("{here}.cases[{c}].steps"), gateway, out);
                    }
                    walk(&sw.default, &format!("{here}.default"), gateway, out);
                }
                StepKind::Parallel(p) => {
                    for (name, branch) in &p.branches {
                        walk(branch, &format!("{here}.branches.{name}"), gateway, out);
                    }
                }
                StepKind::Map(m) => walk(&m.steps, &format!("{here}.steps"), gateway, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&def.steps, "steps", gateway, &mut out);
    out
}

/// The step's error for a failed call, and whether another attempt may succeed.
fn error_info(e: &CallError) -> (ErrorInfo, bool) {
    let (kind, retryable) = match e {
        CallError::Route(RouteError::UnknownRoute(_)) => ("llm.unknown_route", false),
        CallError::Route(RouteError::Rejected { .. }) => ("llm.rejected", false),
        CallError::Route(RouteError::Exhausted { .. }) => ("llm.unavailable", true),
        CallError::Experiment(_) => ("llm.experiment", false),
        CallError::Structured(sluice_gateway::structured::Error::BadSchema(_)) => ("llm.bad_schema", false),
        CallError::Structured(sluice_gateway::structured::Error::Invalid { .. }) => ("llm.invalid_output", true),
    };
    (ErrorInfo::new(kind, e.to_string()), retryable)
}

/// Reads the task input `decide` built: `{route, precision, messages, max_tokens?,
/// temperature?, schema?}`.
fn request_of(input: &Value) -> Result<(String, ChatRequest, CallOptions), ErrorInfo> {
    let bad = |m: String| ErrorInfo::new("llm.bad_request", m);
    let route = input.get("route").and_then(Value::as_str).unwrap_or_default().to_string();
    let list = input.get("messages").and_then(Value::as_array).ok_or_else(|| {
        bad(format!(
            "`messages` must evaluate to a list of {{role, content}}, got {}",
            input.get("messages").unwrap_or(&Value::Null)
        ))
    })?;
    if list.is_empty() {
        return Err(bad("`messages` is empty: the model needs at least one message".into()));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(other) if !other.is_null() => other.to_string(),
            _ => return Err(bad(format!("messages[{i}].content: expected a string"))),
        };
        messages.push(match m.get("role").and_then(Value::as_str) {
            Some("system") => Message::system(content),
            Some("user") => Message::user(content),
            Some("assistant") => Message::assistant(content),
            other => {
                return Err(bad(format!(
                    "messages[{i}].role: expected `system`, `user` or `assistant`, got {}",
                    other.map(|r| format!("`{r}`")).unwrap_or_else(|| "nothing".into())
                )))
            }
        });
    }
    let mut req = ChatRequest::new(messages);
    req.max_tokens = input.get("max_tokens").and_then(Value::as_u64).map(|n| n.min(u32::MAX as u64) as u32);
    req.temperature = input.get("temperature").and_then(Value::as_f64).map(|t| t as f32);
    let schema = input.get("schema").filter(|s| s.is_object()).cloned();
    let options = CallOptions { precision: input.get("precision").and_then(Value::as_bool).unwrap_or(false), schema };
    Ok((route, req, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_back_from_the_task_input() {
        let input = json!({
            "route": "fast", "precision": true, "max_tokens": 20, "temperature": 0.5,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "schema": {"type": "object"},
        });
        let (route, req, options) = request_of(&input).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(route, "fast");
        assert_eq!(req.messages, vec![Message::system("be brief"), Message::user("hi")]);
        assert_eq!((req.max_tokens, req.temperature), (Some(20), Some(0.5)));
        assert!(options.precision);
        assert_eq!(options.schema, Some(json!({"type": "object"})));
    }

    #[test]
    fn bad_messages_name_the_field() {
        let e = request_of(&json!({"route": "r", "messages": [{"role": "robot", "content": "x"}]})).err();
        assert!(e.is_some_and(|e| e.message.contains("messages[0].role") && e.message.contains("robot")));
        let e = request_of(&json!({"route": "r", "messages": "hello"})).err();
        assert!(e.is_some_and(|e| e.message.contains("`messages` must evaluate to a list")));
        let e = request_of(&json!({"route": "r", "messages": []})).err();
        assert!(e.is_some_and(|e| e.message.contains("empty")));
    }
}
