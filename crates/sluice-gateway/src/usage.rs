//! The usage record of one upstream attempt: tokens, cost, latency, outcome, route and target.
//! Every call returns them; storing them in the ledger comes later.

use std::time::Duration;

use crate::error::UpstreamError;
use crate::experiment::ExperimentArm;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The upstream answered with this non-2xx status.
    HttpError(u16),
    Timeout,
    Connect,
    Malformed,
    StreamCut,
    RequestFailed,
    /// The target's circuit breaker was open: the upstream was not called.
    CircuitOpen,
}

impl Outcome {
    pub fn of(e: &UpstreamError) -> Self {
        match e {
            UpstreamError::Status { status, .. } => Self::HttpError(*status),
            UpstreamError::Timeout(_) => Self::Timeout,
            UpstreamError::Connect(_) => Self::Connect,
            UpstreamError::Malformed(_) => Self::Malformed,
            UpstreamError::StreamCut(_) => Self::StreamCut,
            UpstreamError::Request(_) => Self::RequestFailed,
            UpstreamError::CircuitOpen => Self::CircuitOpen,
        }
    }
}

/// One attempt at one target.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub route: String,
    /// The target's name within its route (`provider/model` unless configured).
    pub target: String,
    /// The provider's name in the config.
    pub provider: String,
    pub model: String,
    /// 1-based attempt number at this target.
    pub attempt: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// USD; `None` when the price table has no price for the model.
    pub cost_usd: Option<f64>,
    pub latency: Duration,
    pub outcome: Outcome,
    /// The experiment and arm the call was made for, if any.
    pub experiment: Option<ExperimentArm>,
}
