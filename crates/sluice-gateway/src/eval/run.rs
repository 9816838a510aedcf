//! Running a dataset through the gateway: one call per example, a few at a time, each answer
//! read as a label, then the scores, the usage per target, and the cost and latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::answer::predict;
use super::dataset::{Dataset, Example, Input};
use super::metrics::{percentile, score, Predicted, Scores};
use crate::clock::SystemClock;
use crate::gateway::Gateway;
use crate::model::{ChatRequest, Message, Role};
use crate::route::{Call, Policy, Route, Target};
use crate::usage::{Outcome, UsageRecord};

/// What a run calls: a route (with its fallback and retries), or one target of a route alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Route(String),
    /// Only this target, with the route's retries and without fallback.
    Target {
        route: String,
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no route or target named `{name}`; the gateway config has the routes {routes}")]
    Unknown { name: String, routes: String },
    #[error("`{name}` is a target of several routes ({routes}); name one as ROUTE/TARGET")]
    Ambiguous { name: String, routes: String },
}

impl Subject {
    /// Resolves `name`: a route's name, `ROUTE/TARGET`, or a target name found in one route only.
    pub fn resolve(gateway: &Gateway, name: &str) -> Result<Self, Error> {
        if gateway.route(name).is_some() {
            return Ok(Self::Route(name.to_string()));
        }
        if let Some((route, target)) = name.split_once('/') {
            if gateway.route(route).is_some_and(|r| r.targets.iter().any(|t| t.name == target)) {
                return Ok(Self::Target { route: route.to_string(), target: target.to_string() });
            }
        }
        let mut names: Vec<String> = gateway.route_names().map(str::to_string).collect();
        names.sort();
        let holders: Vec<&String> = names
            .iter()
            .filter(|r| gateway.route(r).is_some_and(|r| r.targets.iter().any(|t| t.name == name)))
            .collect();
        match holders.as_slice() {
            [route] => Ok(Self::Target { route: route.to_string(), target: name.to_string() }),
            [] => Err(Error::Unknown {
                name: name.to_string(),
                routes: names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
            }),
            many => Err(Error::Ambiguous {
                name: name.to_string(),
                routes: many.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// `ROUTE` or `ROUTE/TARGET`.
    pub fn name(&self) -> String {
        match self {
            Self::Route(route) => route.clone(),
            Self::Target { route, target } => format!("{route}/{target}"),
        }
    }
}

/// How the examples become requests, and how many calls run at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Calls in flight at once (at least 1).
    pub concurrency: usize,
    /// Put before each example's messages, unless the example starts with its own system message.
    pub system: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self { concurrency: 4, system: None, temperature: None, max_tokens: None }
    }
}

/// The request sent for one example.
pub fn request(example: &Example, options: &Options) -> ChatRequest {
    let mut messages = match &example.input {
        Input::Text(text) => vec![Message::user(text.clone())],
        Input::Messages(messages) => messages.clone(),
    };
    if let Some(system) = &options.system {
        if messages.first().is_none_or(|m| m.role != Role::System) {
            messages.insert(0, Message::system(system.clone()));
        }
    }
    ChatRequest { temperature: options.temperature, max_tokens: options.max_tokens, ..ChatRequest::new(messages) }
}

/// The outcome of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleResult {
    /// The answer's text, or why the call failed.
    pub answer: Result<String, String>,
    pub predicted: Predicted,
    /// The whole call, retries and fallbacks included.
    pub latency: Duration,
    /// A record of every attempt the call made.
    pub usage: Vec<UsageRecord>,
}

/// Usage, cost and latency of one target over a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetStats {
    pub route: String,
    pub target: String,
    pub provider: String,
    pub model: String,
    /// Attempts that called the upstream.
    pub calls: usize,
    /// Of those, the ones that failed.
    pub failed: usize,
    /// Attempts skipped because the target's circuit breaker was open.
    pub skipped: usize,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The sum over attempts with a price; `None` when no attempt had one.
    pub cost_usd: Option<f64>,
    /// Latency of the attempts that called the upstream.
    pub latency_p50: Option<Duration>,
    pub latency_p95: Option<Duration>,
}

/// One run of a dataset through one subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub subject: Subject,
    /// In the dataset's order.
    pub results: Vec<ExampleResult>,
    pub scores: Scores,
    /// By route, then target name.
    pub targets: Vec<TargetStats>,
    /// The sum over every attempt with a price; `None` when no attempt had one.
    pub cost_usd: Option<f64>,
    /// Attempts that used tokens of a model without a price: their cost is unknown.
    pub unpriced_calls: usize,
    /// Per example (the whole call).
    pub latency_p50: Option<Duration>,
    pub latency_p95: Option<Duration>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Run {
    /// Per example: whether the prediction was the true label.
    pub fn correct(&self, dataset: &Dataset) -> Vec<bool> {
        dataset.examples.iter().zip(&self.results).map(|(e, r)| r.predicted == Predicted::Label(e.label)).collect()
    }
}

enum Caller {
    Route(Arc<Gateway>, String),
    /// A one-target route made for the run, priced by the gateway's table.
    Target(Arc<Gateway>, Route),
}

impl Caller {
    async fn call(&self, req: &ChatRequest) -> Call {
        match self {
            Self::Route(gateway, route) => gateway.chat(route, req).await,
            Self::Target(gateway, route) => route.call(req, gateway.prices(), &SystemClock).await,
        }
    }
}

/// Runs every example of `dataset` through `subject`. `progress` is told how many examples are
/// done after each one. A failed call is an [`Predicted::Error`] for its example, not a failed
/// run.
pub async fn run(
    gateway: Arc<Gateway>,
    subject: &Subject,
    dataset: &Dataset,
    options: &Options,
    progress: Arc<dyn Fn(usize) + Send + Sync>,
) -> Run {
    let caller = Arc::new(match subject {
        Subject::Route(route) => Caller::Route(gateway, route.clone()),
        Subject::Target { route, target } => {
            let single = gateway.route(route).and_then(|r| {
                let t = r.targets.iter().find(|t| t.name == *target)?;
                let alone =
                    Target::new(&t.provider_name, t.provider.clone(), &t.model, t.timeout, t.breaker().config())
                        .with_name(t.name.clone());
                Some(Route {
                    name: r.name.clone(),
                    policy: Policy::Fallback,
                    targets: vec![alone],
                    retry: r.retry.clone(),
                })
            });
            match single {
                Some(single) => Caller::Target(gateway, single),
                // Not resolved by `Subject::resolve`: every call fails as an unknown route.
                None => Caller::Route(gateway, subject.name()),
            }
        }
    });
    let requests: Arc<Vec<ChatRequest>> = Arc::new(dataset.examples.iter().map(|e| request(e, options)).collect());
    let labels = Arc::new(dataset.labels.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.clamp(1, requests.len().max(1)) {
        let (caller, requests, labels) = (caller.clone(), requests.clone(), labels.clone());
        let (next, done, progress) = (next.clone(), done.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = requests.get(i) else { break };
                let t0 = Instant::now();
                let call = caller.call(req).await;
                let latency = t0.elapsed();
                let (answer, predicted) = match call.result {
                    Ok(resp) => {
                        let predicted = predict(&resp.text, &labels);
                        (Ok(resp.text), predicted)
                    }
                    Err(e) => (Err(e.to_string()), Predicted::Error),
                };
                out.push((i, ExampleResult { answer, predicted, latency, usage: call.usage }));
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            }
            out
        }));
    }
    let mut results: Vec<Option<ExampleResult>> = vec![None; requests.len()];
    for worker in workers {
        if let Ok(out) = worker.await {
            for (i, r) in out {
                results[i] = Some(r);
            }
        }
    }
    let elapsed = started.elapsed();
    let results: Vec<ExampleResult> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| ExampleResult {
                answer: Err("the evaluation task stopped before this example".into()),
                predicted: Predicted::Error,
                latency: Duration::ZERO,
                usage: Vec::new(),
            })
        })
        .collect();
    summarize(subject.clone(), dataset, results, elapsed)
}

/// The scores, usage and latency of finished results.
pub fn summarize(subject: Subject, dataset: &Dataset, results: Vec<ExampleResult>, elapsed: Duration) -> Run {
    let pairs: Vec<(usize, Predicted)> =
        dataset.examples.iter().zip(&results).map(|(e, r)| (e.label, r.predicted)).collect();
    let scores = score(&dataset.labels, &pairs);
    let records: Vec<&UsageRecord> = results.iter().flat_map(|r| &r.usage).collect();
    let mut latencies: Vec<f64> = results.iter().map(|r| r.latency.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    let as_duration = |s: Option<f64>| s.map(Duration::from_secs_f64);
    Run {
        subject,
        targets: target_stats(&records),
        cost_usd: total_cost(records.iter().copied()),
        unpriced_calls: records
            .iter()
            .filter(|r| r.cost_usd.is_none() && (r.input_tokens > 0 || r.output_tokens > 0))
            .count(),
        latency_p50: as_duration(percentile(&latencies, 50.0)),
        latency_p95: as_duration(percentile(&latencies, 95.0)),
        results,
        scores,
        elapsed,
    }
}

fn total_cost<'a>(records: impl Iterator<Item = &'a UsageRecord>) -> Option<f64> {
    records.filter_map(|r| r.cost_usd).fold(None, |sum, c| Some(sum.unwrap_or(0.0) + c))
}

/// Usage per target, ordered by route and target name.
pub fn target_stats(records: &[&UsageRecord]) -> Vec<TargetStats> {
    let mut by_target: BTreeMap<(&str, &str), Vec<&UsageRecord>> = BTreeMap::new();
    for r in records {
        by_target.entry((r.route.as_str(), r.target.as_str())).or_default().push(r);
    }
    by_target
        .into_iter()
        .map(|((route, target), records)| {
            let called: Vec<&&UsageRecord> = records.iter().filter(|r| r.outcome != Outcome::CircuitOpen).collect();
            let mut latencies: Vec<f64> = called.iter().map(|r| r.latency.as_secs_f64()).collect();
            latencies.sort_by(f64::total_cmp);
            TargetStats {
                route: route.to_string(),
                target: target.to_string(),
                provider: records[0].provider.clone(),
                model: records[0].model.clone(),
                calls: called.len(),
                failed: called.iter().filter(|r| r.outcome != Outcome::Success).count(),
                skipped: records.len() - called.len(),
                input_tokens: records.iter().map(|r| r.input_tokens).sum(),
                output_tokens: records.iter().map(|r| r.output_tokens).sum(),
                cost_usd: total_cost(records.iter().copied()),
                latency_p50: percentile(&latencies, 50.0).map(Duration::from_secs_f64),
                latency_p95: percentile(&latencies, 95.0).map(Duration::from_secs_f64),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: &str, outcome: Outcome, ms: u64, tokens: (u64, u64), cost: Option<f64>) -> UsageRecord {
        UsageRecord {
            route: "r".into(),
            target: target.into(),
            provider: "p".into(),
            model: format!("{target}-model"),
            attempt: 1,
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            cost_usd: cost,
            latency: Duration::from_millis(ms),
            outcome,
            experiment: None,
        }
    }

    #[test]
    fn usage_is_summed_per_target_and_breaker_skips_are_not_calls() {
        let records = [
            record("b", Outcome::Success, 30, (10, 1), Some(0.5)),
            record("a", Outcome::HttpError(500), 10, (0, 0), None),
            record("a", Outcome::Success, 20, (7, 2), Some(0.25)),
            record("a", Outcome::CircuitOpen, 0, (0, 0), None),
            record("a", Outcome::Success, 40, (3, 4), Some(0.25)),
        ];
        let refs: Vec<&UsageRecord> = records.iter().collect();
        let stats = target_stats(&refs);
        assert_eq!(stats.len(), 2);
        let a = &stats[0];
        assert_eq!((a.target.as_str(), a.calls, a.failed, a.skipped), ("a", 3, 1, 1));
        assert_eq!((a.input_tokens, a.output_tokens, a.cost_usd), (10, 6, Some(0.5)));
        assert_eq!((a.latency_p50, a.latency_p95), (Some(Duration::from_millis(20)), Some(Duration::from_millis(40))));
        assert_eq!((stats[1].target.as_str(), stats[1].calls, stats[1].cost_usd), ("b", 1, Some(0.5)));
        assert_eq!(total_cost([record("c", Outcome::Success, 1, (5, 5), None)].iter()), None);
    }

    #[test]
    fn the_system_prompt_goes_first_unless_the_example_has_its_own() {
        let options = Options { system: Some("sys".into()), temperature: Some(0.0), ..Options::default() };
        let text = Example { line: 1, id: "1".into(), input: Input::Text("hi".into()), label: 0 };
        let req = request(&text, &options);
        assert_eq!(req.messages, [Message::system("sys"), Message::user("hi")]);
        assert_eq!(req.temperature, Some(0.0));
        let own = vec![Message::system("own"), Message::user("hi")];
        let conversation = Example { input: Input::Messages(own.clone()), ..text };
        assert_eq!(request(&conversation, &options).messages, own);
    }
}
