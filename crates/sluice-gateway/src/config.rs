//! The gateway's config file (YAML or JSON): providers, routes of targets, precision tiers,
//! experiments, prices and breaker settings. Unknown fields are errors, and every error names where it is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::breaker::BreakerConfig;
use crate::cost::{Price, PriceTable};
use crate::retry::RetryPolicy;
use crate::route::Policy;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("invalid gateway config: {0}")]
    Parse(String),
    #[error("invalid gateway config at {at}: {message}")]
    Invalid { at: String, message: String },
    #[error("route `{route}` target {index}: unknown provider `{provider}`; declare it under `providers`")]
    UnknownProvider { route: String, index: usize, provider: String },
    #[error("provider `{provider}` takes its key from `{var}`, which is not set; export it or remove `api_key_env`")]
    MissingKey { provider: String, var: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// The whole gateway config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// USD per million tokens by model name.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    /// Defaults for every target's breaker.
    #[serde(default)]
    pub breaker: BreakerSettings,
    /// A/B experiments: arms of routes, assigned by a sticky key.
    #[serde(default)]
    pub experiments: BTreeMap<String, ExperimentConfig>,
    /// Spending limits per tenant or API key.
    #[serde(default)]
    pub budgets: Vec<crate::budget::BudgetConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProviderKind {
    /// OpenAI Chat Completions and compatible APIs (xAI, Ollama, vLLM).
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// E.g. `https://api.openai.com/v1`, `https://api.anthropic.com/v1`, `http://localhost:11434/v1`.
    pub base_url: String,
    /// The environment variable holding the API key; none for local servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyConfig {
    #[default]
    Fallback,
    Weighted,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub policy: PolicyConfig,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub retry: RetrySettings,
    /// The route that serves callers asking for the precision tier of this one.
    #[serde(default)]
    pub precision: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    /// Defaults to `provider/model`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Overrides the top-level `breaker` for this target.
    #[serde(default)]
    pub breaker: Option<BreakerSettings>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The first arm is the control: a paused experiment sends everyone there.
    pub arms: Vec<ArmConfig>,
    /// What the sticky key is hashed with; defaults to the experiment's name. Changing it
    /// reassigns everyone; keeping it across a rename keeps every assignment.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    pub route: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub multiplier: f64,
    pub max_backoff_ms: u64,
    pub jitter: f64,
    pub max_retry_after_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let p = RetryPolicy::default();
        Self {
            max_attempts: p.max_attempts,
            initial_backoff_ms: millis(p.initial_backoff),
            multiplier: p.multiplier,
            max_backoff_ms: millis(p.max_backoff),
            jitter: p.jitter,
            max_retry_after_ms: millis(p.max_retry_after),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub cool_down_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        let b = BreakerConfig::default();
        Self { failure_threshold: b.failure_threshold, cool_down_ms: millis(b.cool_down) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn invalid(at: String, message: &str) -> Error {
    Error::Invalid { at, message: message.to_string() }
}

impl Config {
    /// Parses and validates YAML (which includes JSON).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let config: Self = serde_norway::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates JSON.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let config: Self = serde_json::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types cannot: references, ranges and non-empty lists.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, p) in &self.providers {
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(invalid(format!("providers.{name}.base_url"), "must start with http:// or https://"));
            }
        }
        self.breaker.validate("breaker".to_string())?;
        for (i, b) in self.budgets.iter().enumerate() {
            let at = format!("budgets[{i}]");
            if b.name.is_empty() || self.budgets[..i].iter().any(|o| o.name == b.name) {
                return Err(invalid(format!("{at}.name"), "budget names must be present and unique"));
            }
            for (field, v) in [("soft_usd", b.soft_usd), ("hard_usd", b.hard_usd)] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(invalid(format!("{at}.{field}"), "must be a finite amount of USD, not negative"));
                }
            }
            if b.soft_usd.is_none() && b.hard_usd.is_none() {
                return Err(invalid(at, "a budget needs `soft_usd`, `hard_usd` or both"));
            }
        }
        for (name, price) in &self.prices {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !ok(price.input_per_mtok) || !ok(price.output_per_mtok) {
                return Err(invalid(format!("prices.{name}"), "prices must be finite and not negative"));
            }
        }
        for (name, route) in &self.routes {
            let at = format!("routes.{name}");
            if route.targets.is_empty() {
                return Err(invalid(format!("{at}.targets"), "a route needs at least one target"));
            }
            route.retry.validate(format!("{at}.retry"))?;
            if route.policy == PolicyConfig::Weighted && route.targets.iter().all(|t| t.weight == 0) {
                return Err(invalid(format!("{at}.targets"), "a weighted route needs a target with weight > 0"));
            }
            let mut names = Vec::new();
            for (index, t) in route.targets.iter().enumerate() {
                let at = format!("{at}.targets[{index}]");
                if !self.providers.contains_key(&t.provider) {
                    return Err(Error::UnknownProvider { route: name.clone(), index, provider: t.provider.clone() });
                }
                if t.timeout_ms == 0 {
                    return Err(invalid(format!("{at}.timeout_ms"), "must be greater than 0"));
                }
                if let Some(b) = &t.breaker {
                    b.validate(format!("{at}.breaker"))?;
                }
                let target_name = t.target_name();
                if names.contains(&target_name) {
                    return Err(invalid(at, "two targets of a route have the same name; give one a `name`"));
                }
                names.push(target_name);
            }
            if let Some(precision) = &route.precision {
                if !self.routes.contains_key(precision) {
                    let message = format!("unknown route `{precision}`; name a route declared under `routes`");
                    return Err(invalid(format!("{at}.precision"), &message));
                }
                if precision == name {
                    return Err(invalid(format!("{at}.precision"), "a route cannot be its own precision tier"));
                }
            }
        }
        for (name, experiment) in &self.experiments {
            if self.routes.contains_key(name) {
                return Err(invalid(
                    format!("experiments.{name}"),
                    "an experiment cannot share its name with a route (`model` in a chat request names either)",
                ));
            }
            experiment.validate(format!("experiments.{name}"), &self.routes)?;
        }
        Ok(())
    }

    pub fn price_table(&self) -> PriceTable {
        let mut table = PriceTable::new();
        for (model, p) in &self.prices {
            table.insert(model.clone(), Price { input_per_mtok: p.input_per_mtok, output_per_mtok: p.output_per_mtok });
        }
        table
    }
}

impl TargetConfig {
    pub fn target_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("{}/{}", self.provider, self.model))
    }
}

impl RouteConfig {
    pub fn policy(&self) -> Policy {
        match self.policy {
            PolicyConfig::Fallback => Policy::Fallback,
            PolicyConfig::Weighted => Policy::Weighted,
        }
    }
}

impl ExperimentConfig {
    fn validate(&self, at: String, routes: &BTreeMap<String, RouteConfig>) -> Result<(), Error> {
        if self.arms.is_empty() {
            return Err(invalid(format!("{at}.arms"), "an experiment needs at least one arm"));
        }
        if self.arms.iter().all(|a| a.weight == 0) {
            return Err(invalid(format!("{at}.arms"), "an experiment needs an arm with weight > 0"));
        }
        for (index, arm) in self.arms.iter().enumerate() {
            let at = format!("{at}.arms[{index}]");
            if arm.name.is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            if self.arms[..index].iter().any(|a| a.name == arm.name) {
                return Err(invalid(format!("{at}.name"), "two arms of an experiment have the same name"));
            }
            if !routes.contains_key(&arm.route) {
                let message = format!("unknown route `{}`; name a route declared under `routes`", arm.route);
                return Err(invalid(format!("{at}.route"), &message));
            }
        }
        Ok(())
    }
}

impl RetrySettings {
    fn validate(&self, at: String) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(invalid(format!("{at}.max_attempts"), "must be at least 1 (1 means no retry)"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(invalid(format!("{at}.multiplier"), "must be at least 1.0"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(invalid(format!("{at}.jitter"), "must be between 0.0 and 1.0"));
        }
        Ok(())
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            multiplier: self.multiplier,
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            jitter: self.jitter,
            max_retry_after: Duration::from_millis(self.max_retry_after_ms),
        }
    }
}

impl BreakerSettings {
    fn validate(&self, at: String) -> Result<(), Error> {
        if self.failure_threshold == 0 {
            return Err(invalid(format!("{at}.failure_threshold"), "must be at least 1"));
        }
        Ok(())
    }

    pub fn config(&self) -> BreakerConfig {
        BreakerConfig { failure_threshold: self.failure_threshold, cool_down: Duration::from_millis(self.cool_down_ms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
providers:
  openai: {kind: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
  ollama: {kind: openai, base_url: "http://localhost:11434/v1"}
  claude: {kind: anthropic, base_url: "https://api.anthropic.com/v1", api_key_env: ANTHROPIC_API_KEY}
routes:
  chat:
    retry: {max_attempts: 3, initial_backoff_ms: 50}
    targets:
      - {provider: openai, model: gpt-4o, timeout_ms: 5000}
      - {provider: claude, model: claude-sonnet-4, breaker: {failure_threshold: 2, cool_down_ms: 1000}}
  cheap:
    policy: weighted
    targets:
      - {provider: ollama, model: llama3, weight: 3}
      - {provider: openai, model: gpt-4o-mini}
prices:
  gpt-4o: {input_per_mtok: 2.5, output_per_mtok: 10}
breaker: {failure_threshold: 4}
"#;

    /// Parses `text` as YAML and returns the error message, or "ok".
    fn check(text: &str) -> String {
        match Config::from_yaml(text) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_full_config_parses_with_defaults_filled_in() {
        let c = Config::from_yaml(FULL).unwrap_or_else(|e| panic!("{e}"));
        let chat = &c.routes["chat"];
        assert_eq!(chat.retry.max_attempts, 3);
        assert_eq!(chat.retry.max_backoff_ms, RetrySettings::default().max_backoff_ms);
        assert_eq!(chat.targets[1].timeout_ms, 30_000);
        assert_eq!(chat.targets[1].target_name(), "claude/claude-sonnet-4");
        assert_eq!(c.routes["cheap"].policy(), Policy::Weighted);
        assert_eq!(c.breaker, BreakerSettings { failure_threshold: 4, cool_down_ms: 30_000 });
        assert_eq!(c.price_table().get("gpt-4o"), Some(Price { input_per_mtok: 2.5, output_per_mtok: 10.0 }));
    }

    #[test]
    fn json_parses_the_same() {
        let json = r#"{"providers": {"o": {"kind": "openai", "base_url": "http://h/v1"}},
            "routes": {"r": {"targets": [{"provider": "o", "model": "m"}]}}}"#;
        let c = Config::from_json(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.routes["r"].targets[0].model, "m");
        assert_eq!(Config::from_yaml(json), Ok(c));
        let err = Config::from_json(r#"{"route": {}}"#).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown field `route`") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn errors_say_where_and_what() {
        let p = "providers: {o: {kind: openai, base_url: 'http://h'}}\n";
        let cases: &[(&str, &str)] = &[
            (
                "providers: {o: {kind: openai, base_url: 'http://h', key: x}}",
                "providers.o: unknown field `key`, expected one of `kind`, `base_url`, `api_key_env`",
            ),
            ("providers: {o: {kind: gemini, base_url: 'http://h'}}", "unknown variant `gemini`"),
            ("providers: {o: {kind: openai, base_url: 'h'}}", "at providers.o.base_url: must start with http://"),
            (
                "routes: {r: {targets: [{provider: nope, model: m}]}}",
                "route `r` target 0: unknown provider `nope`; declare it under `providers`",
            ),
            ("routes: {r: {targets: []}}", "at routes.r.targets: a route needs at least one target"),
            (
                "routes: {r: {targets: [{provider: o, model: m, timout_ms: 5}]}}",
                "routes.r.targets[0]: unknown field `timout_ms`",
            ),
            ("routes: {r: {targets: [{provider: o, model: m, timeout_ms: 0}]}}", "at routes.r.targets[0].timeout_ms"),
            ("routes: {r: {targets: [{provider: o, model: m}, {provider: o, model: m}]}}", "same name"),
            (
                "routes: {r: {retry: {max_attempts: 0}, targets: [{provider: o, model: m}]}}",
                "max_attempts: must be at least 1",
            ),
            ("routes: {r: {retry: {jitter: 2}, targets: [{provider: o, model: m}]}}", "routes.r.retry.jitter"),
            ("routes: {r: {policy: weighted, targets: [{provider: o, model: m, weight: 0}]}}", "weight > 0"),
            ("breaker: {failure_threshold: 0}", "at breaker.failure_threshold: must be at least 1"),
            ("prices: {m: {input_per_mtok: -1, output_per_mtok: 1}}", "at prices.m: prices must be finite"),
            ("prices: {m: {input_per_mtok: 1}}", "missing field `output_per_mtok`"),
            (
                "routes: {r: {precision: nope, targets: [{provider: o, model: m}]}}",
                "at routes.r.precision: unknown route `nope`",
            ),
            ("routes: {r: {precision: r, targets: [{provider: o, model: m}]}}", "its own precision tier"),
            ("experiments: {e: {arms: []}}", "at experiments.e.arms: an experiment needs at least one arm"),
            ("experiments: {e: {arms: [{name: a, route: nope}]}}", "at experiments.e.arms[0].route: unknown route `nope`"),
            ("routes: {r: {targets: [{provider: o, model: m}]}}\nexperiments: {e: {arms: [{name: a, route: r, weight: 0}]}}", "experiments.e.arms: an experiment needs an arm"),
            ("routes: {r: {targets: [{provider: o, model: m}]}}\nexperiments: {e: {arms: [{name: a, route: r}, {name: a, route: r}]}}", "experiments.e.arms[1].name"),
            ("routes: {r: {targets: [{provider: o, model: m}]}}\nexperiments: {e: {arms: [{name: a, route: r, wieght: 1}]}}", "unknown field `wieght`"),
            ("routes: {r: {targets: [{provider: o, model: m}]}}\nexperiments: {r: {arms: [{name: a, route: r}]}}", "at experiments.r: an experiment cannot share its name with a route"),
        ];
        for (text, expect) in cases {
            let full = if text.starts_with("providers") { text.to_string() } else { format!("{p}{text}") };
            let got = check(&full);
            assert!(got.contains(expect), "{text}\n  expected: {expect}\n  got: {got}");
        }
        assert_eq!(check(p), "ok");
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::from_yaml(include_str!("../../../examples/gateway.yaml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.routes["chat"].precision.as_deref(), Some("precise"));
        assert_eq!(c.experiments["small-model"].arms[0].name, "control");
    }

    #[test]
    fn precision_tiers_and_experiments_parse() {
        let text = "
providers: {o: {kind: openai, base_url: 'http://h'}}
routes:
  fast: {precision: precise, targets: [{provider: o, model: small}]}
  precise: {targets: [{provider: o, model: large}]}
experiments:
  tone: {key: tone-v2, arms: [{name: control, route: fast, weight: 3}, {name: precise, route: precise}]}
";
        let c = Config::from_yaml(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.routes["fast"].precision.as_deref(), Some("precise"));
        assert_eq!(c.routes["precise"].precision, None);
        let tone = &c.experiments["tone"];
        assert_eq!(tone.key.as_deref(), Some("tone-v2"));
        assert_eq!((tone.arms[0].weight, tone.arms[1].weight), (3, 1));
    }
}
