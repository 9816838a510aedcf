//! The gateway: named routes, the price table and the clock, built from a [`Config`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Error as ConfigError, ProviderKind};
use crate::cost::PriceTable;
use crate::error::Error;
use crate::model::ChatRequest;
use crate::provider::{Anthropic, ApiKey, OpenAi, Provider};
use crate::route::{Call, Route, RouteStream, StreamFailure, Target};

pub struct Gateway {
    routes: HashMap<String, Route>,
    prices: PriceTable,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").field("routes", &self.routes).field("prices", &self.prices).finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(routes: Vec<Route>, prices: PriceTable, clock: Arc<dyn Clock>) -> Self {
        Self { routes: routes.into_iter().map(|r| (r.name.clone(), r)).collect(), prices, clock }
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
        let client = reqwest::Client::builder().build().map_err(|e| ConfigError::Client(e.to_string()))?;
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
        Ok(Self::new(routes, config.price_table(), clock))
    }

    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.get(name)
    }

    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// Sends `req` through the route `route`; the result comes with a usage record per attempt.
    pub async fn chat(&self, route: &str, req: &ChatRequest) -> Call {
        match self.routes.get(route) {
            Some(r) => r.call(req, &self.prices, self.clock.as_ref()).await,
            None => Call { result: Err(Error::UnknownRoute(route.to_string())), usage: Vec::new() },
        }
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
