//! `POST /v1/chat/completions`: the OpenAI Chat Completions wire format answered through the AI
//! gateway, whole or streamed as server-sent events, so any OpenAI SDK can use Sluice. `model`
//! names a route or an experiment (whose arm is picked by `user`); `precision: true` asks for the
//! route's precision tier; `response_format` `json_schema` checks the answer, with one repair.

mod stream;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sluice_auth::Principal;
use sluice_engine::{CallContext, Engine, Refused};
use sluice_gateway::budget::Reservation;
use sluice_gateway::structured::Error as StructuredError;
use sluice_gateway::{
    CallError, CallOptions, ChatResponse, Error as GatewayError, ExperimentArm, Gateway, UpstreamError, UsageRecord,
};

use crate::auth::Caller;
use crate::body::{parse_json, Body as RequestBody};
use crate::error::ApiError;
use crate::AppState;
use wire::Completion;
pub use wire::CompletionRequest;

/// Answers of calls made through an experiment name it and the arm that served them.
pub const X_EXPERIMENT: HeaderName = HeaderName::from_static("x-sluice-experiment");
pub const X_ARM: HeaderName = HeaderName::from_static("x-sluice-arm");

pub async fn completions(State(app): State<AppState>, Caller(p): Caller, RequestBody(bytes): RequestBody) -> Response {
    let Some(gateway) = app.gateway.clone() else {
        return ApiError::gateway_not_configured().into_response();
    };
    let mut body: CompletionRequest = match parse_json(&bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (model, user) = (std::mem::take(&mut body.model), body.user.take());
    let (req, asked) = match body.into_chat() {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(target) = Served::resolve(&gateway, &model, user.as_deref(), &p, asked.precision) else {
        return route_not_found(&model).into_response();
    };
    // Budgets apply to the caller's tenant and, when it called with one, its API key.
    let ctx = CallContext {
        tenant: p.tenant.clone(),
        api_key: p.api_key().map(str::to_string),
        source: "chat",
        ..CallContext::default()
    };
    let options = CallOptions { precision: false, schema: asked.schema };
    let estimate = || gateway.estimate_cost(&target.route, &req, &options);
    let reservation = match app.engine.admit_call(&gateway, &ctx, estimate).await {
        Ok(r) => r,
        Err(Refused::Budget(e)) => {
            return ApiError::new("budget_exceeded", e.to_string()).with_details(e.details()).into_response()
        }
        Err(Refused::Store(e)) => return ApiError::from(e).into_response(),
    };
    let meta = Meta {
        id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        route: target.route,
    };
    let arm = target.arm;
    let acct = Accounting { engine: app.engine.clone(), gateway: gateway.clone(), ctx, reservation, arm: arm.clone() };
    let mut resp = if asked.stream {
        stream::stream(gateway, meta, req, asked.include_usage, acct).await
    } else {
        complete(&gateway, &meta, &req, &options, acct).await
    };
    if let Some(arm) = arm {
        let headers = resp.headers_mut();
        for (name, value) in [(X_EXPERIMENT, &arm.experiment), (X_ARM, &arm.arm)] {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        }
    }
    resp
}

/// The route that serves a call, and the experiment arm that chose it.
struct Served {
    route: String,
    arm: Option<ExperimentArm>,
}

impl Served {
    /// `model` as a route, else as an experiment: its arm for the sticky key (`user`, else the
    /// caller's API key, else its tenant). Then the precision tier when asked for. `None` when
    /// `model` names neither.
    fn resolve(gateway: &Gateway, model: &str, user: Option<&str>, p: &Principal, precision: bool) -> Option<Self> {
        let (route, arm) = if gateway.route(model).is_some() {
            (model, None)
        } else {
            let experiment = gateway.experiment(model)?;
            let key = user.or(p.api_key()).unwrap_or(&p.tenant);
            let arm = experiment.assign(key)?;
            let tag = ExperimentArm { experiment: experiment.name.clone(), arm: arm.name.clone() };
            (arm.route.as_str(), Some(tag))
        };
        let route = gateway.precision_tiers().resolve(route, precision).to_string();
        Some(Self { route, arm })
    }
}

/// Settles a call with its budgets and queues its ledger rows, off the answer's path: the
/// engine's usage writer commits them within milliseconds, and at shutdown.
struct Accounting {
    engine: Engine,
    gateway: Arc<Gateway>,
    ctx: CallContext,
    reservation: Reservation,
    /// Stamped on every usage record of a call made through an experiment.
    arm: Option<ExperimentArm>,
}

impl Accounting {
    fn done(self, route: &str, usage: &[UsageRecord], latency: Duration, outcome: &str, stream: bool) {
        log_call(route, usage, latency, outcome, stream);
        let ledger = match &self.arm {
            None => self.engine.settle_call(&self.gateway, &self.ctx, self.reservation, usage),
            Some(arm) => {
                let mut usage = usage.to_vec();
                for u in &mut usage {
                    u.experiment = Some(arm.clone());
                }
                self.engine.settle_call(&self.gateway, &self.ctx, self.reservation, &usage)
            }
        };
        self.engine.queue_usage(ledger);
    }
}

/// What every answer of one call carries.
struct Meta {
    id: String,
    created: u64,
    /// The route that serves the call (after experiment and precision tier).
    route: String,
}

fn route_not_found(route: &str) -> ApiError {
    ApiError::new(
        "route_not_found",
        format!("no gateway route or experiment `{route}`; `model` must name a route or an experiment of the gateway config"),
    )
    .with_details(json!({"route": route}))
}

async fn complete(
    gateway: &Gateway,
    meta: &Meta,
    req: &sluice_gateway::ChatRequest,
    options: &CallOptions,
    acct: Accounting,
) -> Response {
    let started = Instant::now();
    let answer = gateway.chat_with(&meta.route, req, options).await;
    match answer.result {
        Ok(resp) => {
            acct.done(&meta.route, &answer.usage, started.elapsed(), "success", false);
            let model = answered_model(&resp, &answer.usage);
            // A structured answer is sent as the JSON that was checked (without a code fence).
            let json_text = answer.json.as_ref().map(Value::to_string);
            let content = json_text.as_deref().unwrap_or(&resp.text);
            axum::Json(Completion::new(&meta.id, meta.created, model, &resp, content)).into_response()
        }
        Err(e) => {
            acct.done(&meta.route, &answer.usage, started.elapsed(), outcome_of(&e), false);
            call_error(gateway, e)
        }
    }
}

/// The model as the upstream named it, or else the target's.
fn answered_model<'a>(resp: &'a ChatResponse, usage: &'a [UsageRecord]) -> &'a str {
    if resp.model.is_empty() {
        usage.last().map(|u| u.model.as_str()).unwrap_or_default()
    } else {
        &resp.model
    }
}

fn outcome_of(e: &CallError) -> &'static str {
    match e {
        CallError::Route(e) => route_outcome(e),
        CallError::Experiment(_) => "route_not_found",
        CallError::Structured(StructuredError::BadSchema(_)) => "rejected",
        CallError::Structured(StructuredError::Invalid { .. }) => "invalid_output",
    }
}

fn route_outcome(e: &GatewayError) -> &'static str {
    match e {
        GatewayError::UnknownRoute(_) => "route_not_found",
        GatewayError::Rejected { .. } => "rejected",
        GatewayError::Exhausted { failures, .. } if all_circuit_open(failures) => "circuit_open",
        GatewayError::Exhausted { .. } => "upstream_failed",
    }
}

fn all_circuit_open(failures: &[(String, UpstreamError)]) -> bool {
    !failures.is_empty() && failures.iter().all(|(_, e)| matches!(e, UpstreamError::CircuitOpen))
}

/// One line per call: which target answered, tokens, latency and outcome; never keys or content.
fn log_call(route: &str, usage: &[UsageRecord], latency: Duration, outcome: &str, stream: bool) {
    let last = usage.last();
    tracing::info!(
        route = %route,
        target = %last.map(|u| u.target.as_str()).unwrap_or(""),
        model = %last.map(|u| u.model.as_str()).unwrap_or(""),
        input_tokens = last.map_or(0, |u| u.input_tokens),
        output_tokens = last.map_or(0, |u| u.output_tokens),
        cost_usd = last.and_then(|u| u.cost_usd),
        attempts = usage.len(),
        latency_ms = latency.as_millis() as u64,
        outcome,
        stream,
        "chat completion"
    );
}

/// The error answer for a failed structured call, or for a failed route call.
fn call_error(gateway: &Gateway, e: CallError) -> Response {
    match e {
        CallError::Route(e) => gateway_error(gateway, e),
        CallError::Experiment(e) => ApiError::new("route_not_found", e.to_string()).into_response(),
        CallError::Structured(StructuredError::BadSchema(e)) => {
            ApiError::invalid("response_format.json_schema.schema", format!("not a valid JSON Schema: {e}"))
                .into_response()
        }
        // The model's answer is not echoed: only where it is wrong.
        CallError::Structured(StructuredError::Invalid { errors, .. }) => ApiError::new(
            "invalid_output",
            "the model's answer does not match the response_format JSON Schema, even after one repair call",
        )
        .with_details(json!({"errors": errors}))
        .into_response(),
    }
}

/// The error answer for a failed call: what each target did, without upstream internals.
fn gateway_error(gateway: &Gateway, e: GatewayError) -> Response {
    match e {
        GatewayError::UnknownRoute(route) => route_not_found(&route).into_response(),
        GatewayError::Rejected { route, target, source } => {
            let status = match &source {
                UpstreamError::Status { status, .. } => Some(*status),
                _ => None,
            };
            // 401, 403 and 404 say the gateway's key or model is wrong, not the caller's request.
            if matches!(status, Some(401 | 403 | 404)) {
                let failures = vec![failure_json(&target, &source)];
                return ApiError::new(
                    "upstream_failed",
                    format!("target `{target}` of route `{route}` refused the gateway's credentials or model; check the gateway config"),
                )
                .with_details(json!({"route": route, "failures": failures}))
                .into_response();
            }
            let upstream_message = match &source {
                UpstreamError::Status { message, .. } => message.clone(),
                other => other.to_string(),
            };
            ApiError::new(
                "upstream_rejected",
                format!("target `{target}` of route `{route}` refused the request: {upstream_message}"),
            )
            .with_details(json!({"route": route, "target": target, "status": status}))
            .into_response()
        }
        GatewayError::Exhausted { route, failures } => {
            let details = json!({
                "route": route,
                "failures": failures.iter().map(|(t, e)| failure_json(t, e)).collect::<Vec<_>>(),
            });
            if all_circuit_open(&failures) {
                let wait = retry_after(gateway, &route);
                let mut resp = ApiError::new(
                    "upstream_unavailable",
                    format!("every target of route `{route}` is paused by its circuit breaker; retry after {wait} s"),
                )
                .with_details(details)
                .into_response();
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
                return resp;
            }
            ApiError::new("upstream_failed", format!("every target of route `{route}` failed"))
                .with_details(details)
                .into_response()
        }
    }
}

/// Seconds until the first breaker of the route lets a trial through, at the latest.
fn retry_after(gateway: &Gateway, route: &str) -> u64 {
    gateway
        .route(route)
        .and_then(|r| r.targets.iter().map(|t| t.breaker().config().cool_down).min())
        .map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64)
}

/// A failure as the caller sees it: the kind and status, not the upstream's own words.
fn failure_json(target: &str, e: &UpstreamError) -> Value {
    let (kind, status, message) = match e {
        UpstreamError::Status { status, .. } => ("status", Some(*status), format!("upstream answered {status}")),
        UpstreamError::Timeout(d) => ("timeout", None, format!("no answer within {} ms", d.as_millis())),
        UpstreamError::Connect(_) => ("connect", None, "cannot reach the upstream".to_string()),
        UpstreamError::Malformed(_) => ("malformed", None, "the upstream's answer was malformed".to_string()),
        UpstreamError::StreamCut(_) => ("stream_cut", None, "the upstream stream was cut".to_string()),
        UpstreamError::Request(_) => ("request_failed", None, "the request to the upstream failed".to_string()),
        UpstreamError::CircuitOpen => {
            ("circuit_open", None, "circuit breaker open; the target was not called".to_string())
        }
    };
    json!({"target": target, "error": kind, "status": status, "message": message})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_show_kinds_not_upstream_words() {
        let e = UpstreamError::Status { status: 500, message: "secret internals".into(), retry_after: None };
        let v = failure_json("t", &e);
        assert_eq!(v, json!({"target": "t", "error": "status", "status": 500, "message": "upstream answered 500"}));
        let v = failure_json("t", &UpstreamError::Connect("http://10.0.0.1:9 refused".into()));
        assert!(!v.to_string().contains("10.0.0.1"), "{v}");
    }
}
