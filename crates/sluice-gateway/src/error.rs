//! The gateway's errors: [`UpstreamError`] for one attempt at one target, [`Error`] for a call.

use std::time::Duration;

/// Why one attempt at one upstream failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        /// The upstream's own error message (or the start of its body).
        message: String,
        /// From the `Retry-After` header, seconds or HTTP date.
        retry_after: Option<Duration>,
    },
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach upstream: {0}")]
    Connect(String),
    #[error("upstream answer is malformed: {0}")]
    Malformed(String),
    /// The stream ended before the upstream said it was done: the answer is incomplete.
    #[error("upstream stream was cut before it finished: {0}")]
    StreamCut(String),
    #[error("request to upstream failed: {0}")]
    Request(String),
    #[error("circuit breaker is open; not calling the upstream")]
    CircuitOpen,
}

impl UpstreamError {
    /// Whether another attempt (the same target again, or the next one) may succeed: 5xx, 408,
    /// 429, timeouts, connection errors, malformed answers and open breakers. Other 4xx say the
    /// request itself is wrong, so trying elsewhere would only spend money.
    pub fn falls_back(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            Self::Timeout(_)
            | Self::Connect(_)
            | Self::Malformed(_)
            | Self::StreamCut(_)
            | Self::Request(_)
            | Self::CircuitOpen => true,
        }
    }

    /// Whether the same target is worth another attempt (an open breaker is not).
    pub fn retryable(&self) -> bool {
        self.falls_back() && !matches!(self, Self::CircuitOpen)
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Why a call through a route failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("unknown route `{0}`; routes are named in the gateway config")]
    UnknownRoute(String),
    /// A target refused the request itself (a 4xx other than 408/429): no fallback was tried.
    #[error("target `{target}` of route `{route}` refused the request: {source}")]
    Rejected { route: String, target: String, source: UpstreamError },
    /// Every target failed or was skipped; `failures` holds the last error of each, in order.
    #[error("every target of route `{route}` failed{}", last_failure(.failures))]
    Exhausted { route: String, failures: Vec<(String, UpstreamError)> },
}

fn last_failure(failures: &[(String, UpstreamError)]) -> String {
    match failures.last() {
        Some((target, e)) => format!("; last: `{target}`: {e}"),
        None => String::new(),
    }
}
