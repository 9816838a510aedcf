//! A circuit breaker per target: closed until N consecutive failures, then open (rejecting
//! without calling) until a cool-down passes, then half-open with one trial call.
//! It takes the time as an argument so tests can move it by hand.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects before it lets one trial through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, cool_down: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The cool-down has passed: the next call is a trial.
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    consecutive_failures: u32,
    /// Set while open (and half-open): when the breaker last opened.
    opened_at: Option<Instant>,
    /// Set while a half-open trial is under way: when it started.
    trial_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, inner: Mutex::new(Inner { consecutive_failures: 0, opened_at: None, trial_since: None }) }
    }

    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        let inner = self.lock();
        match inner.opened_at {
            None => BreakerState::Closed,
            Some(at) if now.saturating_duration_since(at) >= self.config.cool_down => BreakerState::HalfOpen,
            Some(_) => BreakerState::Open,
        }
    }

    /// Whether a call may go to the upstream now. In half-open, only one trial at a time is let
    /// through; a trial that never reports (its caller was cancelled) is replaced after another
    /// cool-down.
    pub fn try_acquire(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        let Some(opened_at) = inner.opened_at else {
            return true;
        };
        if now.saturating_duration_since(opened_at) < self.config.cool_down {
            return false;
        }
        match inner.trial_since {
            Some(since) if now.saturating_duration_since(since) < self.config.cool_down => false,
            _ => {
                inner.trial_since = Some(now);
                true
            }
        }
    }

    pub fn on_success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        inner.opened_at = None;
        inner.trial_since = None;
    }

    pub fn on_failure(&self, now: Instant) {
        let mut inner = self.lock();
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let trial_failed = inner.trial_since.is_some();
        // A call that started before the breaker opened and fails late does not extend the cool-down.
        let already_open = inner.opened_at.is_some() && !trial_failed;
        if trial_failed || (!already_open && inner.consecutive_failures >= self.config.failure_threshold.max(1)) {
            inner.opened_at = Some(now);
            inner.trial_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    fn breaker() -> (Breaker, Instant) {
        (Breaker::new(BreakerConfig { failure_threshold: 3, cool_down: COOL }), Instant::now())
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let (b, t) = breaker();
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert!(b.try_acquire(t));
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.try_acquire(t + COOL - Duration::from_millis(1)));
    }

    #[test]
    fn half_open_lets_one_trial_and_success_closes() {
        let (b, t) = breaker();
        (0..3).for_each(|_| b.on_failure(t));
        let later = t + COOL;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.try_acquire(later));
        assert!(!b.try_acquire(later), "a second caller waits for the trial");
        b.on_success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.try_acquire(later));
    }

    #[test]
    fn failed_trial_reopens_for_a_full_cool_down() {
        let (b, t) = breaker();
        (0..3).for_each(|_| b.on_failure(t));
        let trial = t + COOL;
        assert!(b.try_acquire(trial));
        b.on_failure(trial);
        assert_eq!(b.state(trial), BreakerState::Open);
        assert!(!b.try_acquire(trial + COOL / 2));
        assert!(b.try_acquire(trial + COOL));
    }

    #[test]
    fn late_failures_do_not_extend_the_cool_down() {
        let (b, t) = breaker();
        (0..3).for_each(|_| b.on_failure(t));
        b.on_failure(t + COOL / 2);
        assert_eq!(b.state(t + COOL), BreakerState::HalfOpen);
    }

    #[test]
    fn an_abandoned_trial_is_replaced_after_a_cool_down() {
        let (b, t) = breaker();
        (0..3).for_each(|_| b.on_failure(t));
        assert!(b.try_acquire(t + COOL));
        assert!(!b.try_acquire(t + COOL + COOL / 2));
        assert!(b.try_acquire(t + COOL * 2));
    }
}
