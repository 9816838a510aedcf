//! The AI gateway: one request/response model spoken to OpenAI-compatible and Anthropic
//! upstreams, routes of targets with fallback, retries and a circuit breaker per target, and a
//! [`UsageRecord`] with tokens, cost and latency for every upstream attempt.
//!
//! Start from a [`Config`] (YAML or JSON), build a [`Gateway`] and call [`Gateway::chat`] (or
//! [`Gateway::chat_stream`], whose streams end with `Done` or an explicit error, never silently).
//! [`Gateway::chat_with`] adds the precision tier and structured output ([`CallOptions`]);
//! [`Gateway::chat_experiment`] serves a caller by its sticky arm of an A/B experiment.
//! [`eval`] runs a labelled dataset through a route and scores the answers.

pub mod breaker;
pub mod budget;
pub mod clock;
pub mod config;
pub mod cost;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod gateway;
pub mod model;
pub mod precision;
pub mod provider;
pub mod retry;
pub mod route;
pub mod structured;
pub mod usage;

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use budget::{BudgetConfig, Budgets, Exceeded, Period};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
pub use cost::{Price, PriceTable};
pub use error::{Error, UpstreamError};
pub use experiment::{Arm, Experiment, ExperimentArm};
pub use gateway::{Answer, CallError, CallOptions, Gateway};
pub use model::{ChatRequest, ChatResponse, FinishReason, Message, Role, StreamEvent, Tool, ToolCall, Usage};
pub use precision::PrecisionTiers;
pub use provider::{ApiKey, ChatStream, Provider};
pub use retry::RetryPolicy;
pub use route::{Call, Policy, Route, RouteStream, StreamFailure, Target};
pub use usage::{Outcome, UsageRecord};
