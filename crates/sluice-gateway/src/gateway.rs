//! The gateway: named routes, their precision tiers, experiments, the price table and the
//! clock, built from a [`Config`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::budget::Budgets;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Error as ConfigError, ProviderKind};
use crate::cost::PriceTable;
use crate::error::Error;
use crate::experiment::{self, Arm, Experiment, ExperimentArm};
use crate::model::{ChatRequest, ChatResponse};
use crate::precision::PrecisionTiers;
use crate::provider::{Anthropic, ApiKey, OpenAi, Provider};
use crate::route::{Call, Route, RouteStream, StreamFailure, Target};
use crate::structured;
use crate::usage::UsageRecord;

pub struct Gateway {
    routes: HashMap<String, Route>,
    precision: PrecisionTiers,
    experiments: HashMap<String, Experiment>,
    prices: PriceTable,
    budgets: Budgets,
    clock: Arc<dyn Clock>,
}

/// How [`Gateway::chat_with`] serves a call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallOptions {
    /// Served by the route's precision tier (the route itself if it names none).
    pub precision: bool,
    /// A JSON Schema the answer must be valid against, with one repair call if it is not.
    pub schema: Option<serde_json::Value>,
}

/// Why a call made with [`Gateway::chat_with`] or [`Gateway::chat_experiment`] failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Route(#[from] Error),
    #[error(transparent)]
    Experiment(#[from] experiment::Error),
    #[error(transparent)]
    Structured(#[from] structured::Error),
}

/// What [`Gateway::chat_with`] returns: the answer or the error, and a usage record for every
/// attempt of every call made (both calls when a repair was tried).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub result: Result<ChatResponse, CallError>,
    /// With a schema: the answer parsed as JSON, valid against it.
    pub json: Option<serde_json::Value>,
    /// With an experiment: its arm that served the call.
    pub arm: Option<ExperimentArm>,
    pub usage: Vec<UsageRecord>,
}

impl From<Call> for Answer {
    fn from(call: Call) -> Self {
        Self { result: call.result.map_err(CallError::from), json: None, arm: None, usage: call.usage }
    }
}

impl Answer {
    fn failed(error: impl Into<CallError>) -> Self {
        Self { result: Err(error.into()), json: None, arm: None, usage: Vec::new() }
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").field("routes", &self.routes).field("prices", &self.prices).finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(routes: Vec<Route>, prices: PriceTable, clock: Arc<dyn Clock>) -> Self {
        Self {
            routes: routes.into_iter().map(|r| (r.name.clone(), r)).collect(),
            precision: PrecisionTiers::default(),
            experiments: HashMap::new(),
            prices,
            budgets: Budgets::default(),
            clock,
        }
    }

    /// Spending limits checked by the callers of the gateway (the engine and the server).
    pub fn with_budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// Callers of `route` asking for precision are served by the route `precision`.
    pub fn with_precision(mut self, route: &str, precision: &str) -> Self {
        self.precision.insert(route, precision);
        self
    }

    pub fn with_experiment(mut self, experiment: Experiment) -> Self {
        self.experiments.insert(experiment.name.clone(), experiment);
        self
    }

    /// Builds the gateway with keys read from the process environment and the system clock.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Self::from_config_with(config, |var| std::env::var(var).ok(), Arc::new(SystemClock))
    }

    /// Builds the gateway with keys looked up by `env` (given the variable's name).
    pub fn from_config_with(
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let client = crate::provider::http_client().map_err(ConfigError::Client)?;
        let mut providers = HashMap::new();
        for (name, p) in &config.providers {
            let key = match &p.api_key_env {
                Some(var) => Some(ApiKey::new(
                    env(var).ok_or_else(|| ConfigError::MissingKey { provider: name.clone(), var: var.clone() })?,
                )),
                None => None,
            };
            let provider = match p.kind {
                ProviderKind::OpenAi => Provider::OpenAi(OpenAi::new(client.clone(), &p.base_url, key)),
                ProviderKind::Anthropic => Provider::Anthropic(Anthropic::new(client.clone(), &p.base_url, key)),
            };
            providers.insert(name.clone(), Arc::new(provider));
        }
        let mut routes = Vec::new();
        for (name, r) in &config.routes {
            let mut targets = Vec::new();
            for (index, t) in r.targets.iter().enumerate() {
                let provider = providers.get(&t.provider).cloned().ok_or_else(|| ConfigError::UnknownProvider {
                    route: name.clone(),
                    index,
                    provider: t.provider.clone(),
                })?;
                let breaker = t.breaker.unwrap_or(config.breaker).config();
                let timeout = Duration::from_millis(t.timeout_ms);
                let target = Target::new(&t.provider, provider, &t.model, timeout, breaker);
                targets.push(target.with_name(t.target_name()).with_weight(t.weight));
            }
            routes.push(Route { name: name.clone(), policy: r.policy(), targets, retry: r.retry.policy() });
        }
        let mut gateway = Self::new(routes, config.price_table(), clock);
        for (name, r) in &config.routes {
            if let Some(precision) = &r.precision {
                gateway = gateway.with_precision(name, precision);
            }
        }
        for (name, e) in &config.experiments {
            let arms = e.arms.iter().map(|a| Arm { name: a.name.clone(), route: a.route.clone(), weight: a.weight });
            gateway = gateway.with_experiment(Experiment::new(name, e.key.clone(), arms.collect()));
        }
        gateway.budgets = Budgets::new(config.budgets.clone());
        Ok(gateway)
    }

    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.get(name)
    }

    /// The names of every route, in no order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The state of every target's circuit breaker: `(route, target, state)`, sorted.
    pub fn breaker_states(&self) -> Vec<(String, String, crate::breaker::BreakerState)> {
        let now = self.clock.now();
        let mut out: Vec<_> = self
            .routes
            .values()
            .flat_map(|r| r.targets.iter().map(move |t| (r.name.clone(), t.name.clone(), t.breaker().state(now))))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The spending limits of the config.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// An upper estimate in USD of one call through `route` (or its precision tier): the input at
    /// about four characters a token plus `max_tokens` of output, at the dearest price among the
    /// route's targets, twice with a schema (one repair call). Unpriced models count as free, and
    /// without `max_tokens` the output is not estimated.
    pub fn estimate_cost(&self, route: &str, req: &ChatRequest, options: &CallOptions) -> f64 {
        let route = self.precision.resolve(route, options.precision);
        let Some(r) = self.routes.get(route) else { return 0.0 };
        let chars: usize = req.messages.iter().map(|m| m.content.chars().count()).sum();
        let usage = crate::model::Usage {
            input_tokens: chars.div_ceil(4) as u64,
            output_tokens: u64::from(req.max_tokens.unwrap_or(0)),
        };
        let one = r.targets.iter().filter_map(|t| self.prices.cost(&t.model, usage)).fold(0.0, f64::max);
        if options.schema.is_some() {
            2.0 * one
        } else {
            one
        }
    }

    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    pub fn precision_tiers(&self) -> &PrecisionTiers {
        &self.precision
    }

    pub fn experiment(&self, name: &str) -> Option<&Experiment> {
        self.experiments.get(name)
    }

    /// Sends every caller of the experiment `name` to its control (first) arm until resumed.
    /// The pause lives in this process only.
    pub fn pause_experiment(&self, name: &str) -> Result<(), experiment::Error> {
        self.experiment_named(name)?.pause();
        Ok(())
    }

    pub fn resume_experiment(&self, name: &str) -> Result<(), experiment::Error> {
        self.experiment_named(name)?.resume();
        Ok(())
    }

    fn experiment_named(&self, name: &str) -> Result<&Experiment, experiment::Error> {
        self.experiments.get(name).ok_or_else(|| experiment::Error::UnknownExperiment(name.to_string()))
    }

    /// Sends `req` through the route `route`; the result comes with a usage record per attempt.
    pub async fn chat(&self, route: &str, req: &ChatRequest) -> Call {
        match self.routes.get(route) {
            Some(r) => r.call(req, &self.prices, self.clock.as_ref()).await,
            None => Call { result: Err(Error::UnknownRoute(route.to_string())), usage: Vec::new() },
        }
    }

    /// Sends `req` through the route `route`, or its precision tier, and checks the answer
    /// against a schema when `options` gives one.
    pub async fn chat_with(&self, route: &str, req: &ChatRequest, options: &CallOptions) -> Answer {
        let route = self.precision.resolve(route, options.precision);
        let Some(schema) = &options.schema else {
            return self.chat(route, req).await.into();
        };
        let outcome = structured::call(schema, req, |req| async move { self.chat(route, &req).await }).await;
        let (result, json) = match outcome.result {
            Ok((resp, json)) => (Ok(resp), Some(json)),
            Err(e) => (Err(e), None),
        };
        Answer { result, json, arm: None, usage: outcome.usage }
    }

    /// Sends `req` through the route of the arm of experiment `name` that `sticky_key` is
    /// assigned to (see [`Experiment::assign`]); every usage record carries the arm.
    pub async fn chat_experiment(&self, name: &str, sticky_key: &str, req: &ChatRequest) -> Answer {
        self.chat_experiment_with(name, sticky_key, req, &CallOptions::default()).await
    }

    /// [`Gateway::chat_experiment`] with the options of [`Gateway::chat_with`].
    pub async fn chat_experiment_with(
        &self,
        name: &str,
        sticky_key: &str,
        req: &ChatRequest,
        options: &CallOptions,
    ) -> Answer {
        let arm = match self.experiment_named(name).map(|e| e.assign(sticky_key)) {
            Ok(Some(arm)) => arm,
            Ok(None) => return Answer::failed(experiment::Error::NoArms(name.to_string())),
            Err(e) => return Answer::failed(e),
        };
        let tag = ExperimentArm { experiment: name.to_string(), arm: arm.name.clone() };
        let mut answer = self.chat_with(&arm.route, req, options).await;
        for record in &mut answer.usage {
            record.experiment = Some(tag.clone());
        }
        answer.arm = Some(tag);
        answer
    }

    /// Opens a streamed answer through the route `route` (see [`Route::stream`]).
    pub async fn chat_stream(&self, route: &str, req: &ChatRequest) -> Result<RouteStream<'_>, StreamFailure> {
        match self.routes.get(route) {
            Some(r) => r.stream(req, &self.prices, self.clock.as_ref()).await,
            None => Err(StreamFailure { error: Error::UnknownRoute(route.to_string()), usage: Vec::new() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "
providers:
  o: {kind: openai, base_url: 'http://127.0.0.1:9/v1', api_key_env: SECRET_VAR}
routes:
  r: {targets: [{provider: o, model: m, name: main, weight: 2}]}
";

    #[test]
    fn a_missing_key_names_its_variable_and_keys_never_show_in_debug() {
        let config = Config::from_yaml(CONFIG).unwrap_or_else(|e| panic!("{e}"));
        let err = Gateway::from_config_with(&config, |_| None, Arc::new(SystemClock)).err();
        assert_eq!(err, Some(ConfigError::MissingKey { provider: "o".into(), var: "SECRET_VAR".into() }));
        let gw = Gateway::from_config_with(&config, |_| Some("sk-very-secret".into()), Arc::new(SystemClock))
            .unwrap_or_else(|e| panic!("{e}"));
        let debug = format!("{gw:?}");
        assert!(!debug.contains("sk-very-secret") && debug.contains("<redacted>"), "{debug}");
        let target = &gw.route("r").map(|r| &r.targets[0]).unwrap_or_else(|| panic!("no route"));
        assert_eq!((target.name.as_str(), target.weight), ("main", 2));
    }
}
