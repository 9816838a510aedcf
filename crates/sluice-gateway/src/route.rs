//! Routes: ordered targets (provider, model, timeout) tried by policy, with retries per target,
//! fallback on errors worth another try, and a circuit breaker per target.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::breaker::{Breaker, BreakerConfig};
use crate::clock::Clock;
use crate::cost::PriceTable;
use crate::error::{Error, UpstreamError};
use crate::model::{ChatRequest, ChatResponse, StreamEvent, Usage};
use crate::provider::{ChatStream, Provider};
use crate::retry::{roll, RetryPolicy};
use crate::usage::{Outcome, UsageRecord};

/// One model at one provider, with its own timeout and breaker.
#[derive(Debug)]
pub struct Target {
    /// Unique within its route; `provider/model` unless configured.
    pub name: String,
    /// The provider's name in the config.
    pub provider_name: String,
    pub provider: Arc<Provider>,
    pub model: String,
    /// For one attempt: connection, answer and body.
    pub timeout: Duration,
    /// Share of first picks under [`Policy::Weighted`].
    pub weight: u32,
    breaker: Breaker,
}

impl Target {
    pub fn new(
        provider_name: &str,
        provider: Arc<Provider>,
        model: &str,
        timeout: Duration,
        breaker: BreakerConfig,
    ) -> Self {
        Self {
            name: format!("{provider_name}/{model}"),
            provider_name: provider_name.to_string(),
            provider,
            model: model.to_string(),
            timeout,
            weight: 1,
            breaker: Breaker::new(breaker),
        }
    }

    pub fn with_name(self, name: impl Into<String>) -> Self {
        Self { name: name.into(), ..self }
    }

    pub fn with_weight(self, weight: u32) -> Self {
        Self { weight, ..self }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

/// Which target a call tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Always the first; the others in order when it fails.
    #[default]
    Fallback,
    /// One drawn by weight; the others in order when it fails.
    Weighted,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub policy: Policy,
    pub targets: Vec<Target>,
    pub retry: RetryPolicy,
}

/// What a call returns: the answer or the error, and a usage record for every attempt made
/// (breaker rejections included), so that failed attempts are accounted too.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub result: Result<ChatResponse, Error>,
    pub usage: Vec<UsageRecord>,
}

impl Call {
    /// The total cost of all attempts, `None` if any attempt that used tokens had no price.
    pub fn cost_usd(&self) -> Option<f64> {
        self.usage.iter().try_fold(0.0, |sum, r| match r.cost_usd {
            Some(c) => Some(sum + c),
            None if r.input_tokens == 0 && r.output_tokens == 0 => Some(sum),
            None => None,
        })
    }
}

impl Route {
    /// The order in which targets are tried; `roll` is uniform in `0..1`.
    pub fn order(&self, roll: f64) -> Vec<usize> {
        let all = 0..self.targets.len();
        let first = match self.policy {
            Policy::Fallback => 0,
            Policy::Weighted => {
                let total: u64 = self.targets.iter().map(|t| u64::from(t.weight)).sum();
                let mut point = (roll.clamp(0.0, 1.0) * total as f64) as u64;
                let mut pick = 0;
                for (i, t) in self.targets.iter().enumerate() {
                    if t.weight > 0 && point < u64::from(t.weight) {
                        pick = i;
                        break;
                    }
                    point = point.saturating_sub(u64::from(t.weight));
                }
                pick
            }
        };
        std::iter::once(first).chain(all.filter(|&i| i != first)).filter(|&i| i < self.targets.len()).collect()
    }

    /// Sends `req` through this route.
    pub async fn call(&self, req: &ChatRequest, prices: &PriceTable, clock: &dyn Clock) -> Call {
        let mut usage = Vec::new();
        let opened = self.first_answer(clock, &mut usage, |t| t.provider.chat(&t.model, req, t.timeout)).await;
        match opened {
            Ok(Answered { target, attempt, started, value: resp }) => {
                target.breaker.on_success();
                let cost = prices.cost(&target.model, resp.usage);
                usage.push(self.record(target, attempt, resp.usage, cost, started.elapsed(), Outcome::Success));
                Call { result: Ok(resp), usage }
            }
            Err(error) => Call { result: Err(error), usage },
        }
    }

    /// Opens a streamed answer through this route. Fallback and retries apply until a target
    /// answers with a 2xx; after that the stream is that target's, and a cut ends it with an error.
    pub async fn stream<'a>(
        &'a self,
        req: &ChatRequest,
        prices: &'a PriceTable,
        clock: &'a dyn Clock,
    ) -> Result<RouteStream<'a>, StreamFailure> {
        let mut usage = Vec::new();
        let opened = self.first_answer(clock, &mut usage, |t| t.provider.chat_stream(&t.model, req, t.timeout)).await;
        match opened {
            Ok(Answered { target, attempt, started, value: inner }) => {
                Ok(RouteStream { route: self, target, prices, clock, inner, attempt, started, usage })
            }
            Err(error) => Err(StreamFailure { error, usage }),
        }
    }

    /// Tries the targets in policy order, each up to its retry budget, until one answers. Every
    /// failed attempt leaves a usage record; the answer's record is the caller's to write.
    async fn first_answer<'a, T, F, Fut>(
        &'a self,
        clock: &dyn Clock,
        usage: &mut Vec<UsageRecord>,
        mut send: F,
    ) -> Result<Answered<'a, T>, Error>
    where
        F: FnMut(&'a Target) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut failures = Vec::new();
        for index in self.order(roll()) {
            let target = &self.targets[index];
            let mut attempt = 0;
            loop {
                attempt += 1;
                if !target.breaker.try_acquire(clock.now()) {
                    tracing::debug!(route = %self.name, target = %target.name, "circuit open; skipping target");
                    usage.push(self.failure(target, attempt, Duration::ZERO, Outcome::CircuitOpen));
                    failures.push((target.name.clone(), UpstreamError::CircuitOpen));
                    break;
                }
                let started = Instant::now();
                let e = match send(target).await {
                    Ok(value) => return Ok(Answered { target, attempt, started, value }),
                    Err(e) => e,
                };
                usage.push(self.failure(target, attempt, started.elapsed(), Outcome::of(&e)));
                if !e.falls_back() {
                    // The upstream is up and answered; the request is what is wrong.
                    target.breaker.on_success();
                    return Err(Error::Rejected { route: self.name.clone(), target: target.name.clone(), source: e });
                }
                target.breaker.on_failure(clock.now());
                tracing::warn!(
                    route = %self.name, target = %target.name, attempt, error = %e,
                    "upstream attempt failed"
                );
                match self.retry.delay(attempt, e.retry_after(), roll()) {
                    Some(wait) if e.retryable() => tokio::time::sleep(wait).await,
                    _ => {
                        failures.push((target.name.clone(), e));
                        break;
                    }
                }
            }
        }
        Err(Error::Exhausted { route: self.name.clone(), failures })
    }

    fn failure(&self, target: &Target, attempt: u32, latency: Duration, outcome: Outcome) -> UsageRecord {
        self.record(target, attempt, Usage::default(), None, latency, outcome)
    }

    fn record(
        &self,
        target: &Target,
        attempt: u32,
        tokens: Usage,
        cost_usd: Option<f64>,
        latency: Duration,
        outcome: Outcome,
    ) -> UsageRecord {
        UsageRecord {
            route: self.name.clone(),
            target: target.name.clone(),
            provider: target.provider_name.clone(),
            model: target.model.clone(),
            attempt,
            input_tokens: tokens.input_tokens,
            output_tokens: tokens.output_tokens,
            cost_usd,
            latency,
            outcome,
            experiment: None,
        }
    }
}

/// The target that answered and the attempt that got the answer.
struct Answered<'a, T> {
    target: &'a Target,
    attempt: u32,
    started: Instant,
    value: T,
}

/// A route's streamed answer. Its last usage record is written when the stream ends, with
/// `Done` (success) or an error (a cut counts as a failure of the target's breaker).
pub struct RouteStream<'a> {
    route: &'a Route,
    target: &'a Target,
    prices: &'a PriceTable,
    clock: &'a dyn Clock,
    inner: ChatStream,
    attempt: u32,
    started: Instant,
    usage: Vec<UsageRecord>,
}

impl RouteStream<'_> {
    /// The next event; `None` after `Done` or after an error.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        let item = self.inner.next().await;
        let (target, attempt, latency) = (self.target, self.attempt, self.started.elapsed());
        match &item {
            Some(Ok(StreamEvent::Done(resp))) => {
                target.breaker.on_success();
                let cost = self.prices.cost(&target.model, resp.usage);
                self.usage.push(self.route.record(target, attempt, resp.usage, cost, latency, Outcome::Success));
            }
            Some(Err(e)) => {
                target.breaker.on_failure(self.clock.now());
                tracing::warn!(route = %self.route.name, target = %target.name, error = %e, "upstream stream failed");
                self.usage.push(self.route.failure(target, attempt, latency, Outcome::of(e)));
            }
            Some(Ok(StreamEvent::Text(_))) | None => {}
        }
        item
    }

    /// The target that is streaming.
    pub fn target(&self) -> &str {
        &self.target.name
    }

    /// A record for every attempt so far; the streaming one is added when the stream ends.
    pub fn usage(&self) -> &[UsageRecord] {
        &self.usage
    }
}

impl std::fmt::Debug for RouteStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteStream")
            .field("route", &self.route.name)
            .field("target", &self.target.name)
            .field("attempt", &self.attempt)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

/// Why a stream could not be opened, with a record of every attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamFailure {
    pub error: Error,
    pub usage: Vec<UsageRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::OpenAi;

    fn route(policy: Policy, weights: &[u32]) -> Route {
        let provider = Arc::new(Provider::OpenAi(OpenAi::new(
            crate::provider::http_client().unwrap_or_else(|e| panic!("{e}")),
            "http://127.0.0.1:9",
            None,
        )));
        let targets = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Target {
                weight: *w,
                ..Target::new("p", provider.clone(), &format!("m{i}"), Duration::from_secs(1), BreakerConfig::default())
            })
            .collect();
        Route { name: "r".into(), policy, targets, retry: RetryPolicy::default() }
    }

    #[test]
    fn fallback_tries_targets_in_order() {
        assert_eq!(route(Policy::Fallback, &[1, 5, 1]).order(0.99), vec![0, 1, 2]);
    }

    #[test]
    fn weighted_picks_the_first_by_weight_then_the_rest_in_order() {
        let r = route(Policy::Weighted, &[1, 0, 3]);
        assert_eq!(r.order(0.0), vec![0, 1, 2]);
        assert_eq!(r.order(0.24), vec![0, 1, 2]);
        assert_eq!(r.order(0.25), vec![2, 0, 1]);
        assert_eq!(r.order(0.999), vec![2, 0, 1]);
        assert_eq!(r.order(1.0), vec![0, 1, 2], "out-of-range rolls fall back to the first target");
    }
}
