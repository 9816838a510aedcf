//! Retry policies and timeouts, and the backoff schedule they produce.
//!
//! Jitter is derived from a hash of the run, the step and the attempt rather than drawn at random,
//! so `decide` stays a pure function and replay reproduces the same delays.

use schemars::JsonSchema;
use serde::Serialize;

use crate::duration::Duration;

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Total attempts including the first (default 3). 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt (default 1s).
    pub initial_interval: Duration,
    /// Each delay is the previous one times this (default 2.0).
    pub backoff_coefficient: f64,
    /// Upper bound of a delay (default 60s).
    pub max_interval: Duration,
    /// Fraction of the delay added or removed at random-looking but deterministic amounts
    /// (default 0.2).
    pub jitter: f64,
    /// Error types that fail the step at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_retryable: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(60),
            jitter: 0.2,
            non_retryable: Vec::new(),
        }
    }
}

/// Time limits of a task attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Timeouts {
    /// From scheduling until a worker picks the task up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start: Option<Duration>,
    /// From pick-up until completion (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close: Option<Duration>,
    /// Longest gap between heartbeats of a running task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<Duration>,
}

pub const DEFAULT_START_TO_CLOSE: Duration = Duration::from_secs(300);

impl RetryPolicy {
    /// Whether an error of `kind` after attempt `attempt` (counted from 1 since the last redrive)
    /// should be retried.
    pub fn should_retry(&self, attempt: u32, kind: &str, retryable: bool) -> bool {
        retryable && attempt < self.max_attempts && !self.non_retryable.iter().any(|k| k == kind)
    }

    /// Delay before attempt `attempt + 1`, in milliseconds.
    pub fn delay_ms(&self, attempt: u32, seed: &str) -> u64 {
        let base = self.initial_interval.as_millis() as f64
            * self.backoff_coefficient.powi(attempt.saturating_sub(1).min(1000) as i32);
        let capped = base.min(self.max_interval.as_millis() as f64);
        // A value in [-1, 1) from the seed: the same run, step and attempt always get the same.
        let unit = (fnv1a(seed.as_bytes()) % 2_000_000) as f64 / 1_000_000.0 - 1.0;
        let jittered = capped * (1.0 + self.jitter * unit);
        jittered.clamp(0.0, self.max_interval.as_millis() as f64 * (1.0 + self.jitter)) as u64
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let delays: Vec<u64> = (1..=8).map(|a| p.delay_ms(a, "x")).collect();
        assert_eq!(delays, vec![1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
    }

    #[test]
    fn jitter_stays_in_band_and_is_deterministic() {
        let p = RetryPolicy::default();
        for a in 1..6 {
            let seed = format!("run/step/{a}");
            let d = p.delay_ms(a, &seed);
            assert_eq!(d, p.delay_ms(a, &seed));
            let base = 1000.0 * 2f64.powi(a as i32 - 1);
            assert!((d as f64) >= base * 0.8 - 1.0 && (d as f64) <= base * 1.2 + 1.0, "{a}: {d}");
        }
    }

    #[test]
    fn retry_decision() {
        let p = RetryPolicy { non_retryable: vec!["bad_input".into()], ..RetryPolicy::default() };
        assert!(p.should_retry(1, "io", true));
        assert!(p.should_retry(2, "io", true));
        assert!(!p.should_retry(3, "io", true));
        assert!(!p.should_retry(1, "bad_input", true));
        assert!(!p.should_retry(1, "io", false));
    }
}
