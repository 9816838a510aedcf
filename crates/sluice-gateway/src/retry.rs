//! Retries at one target: exponential backoff with jitter, and `Retry-After` honoured.

use std::time::{Duration, SystemTime};

/// How often and how patiently one target is tried before the route falls back.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per target, the first included (1 = no retry).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
    /// Fraction of each backoff drawn at random, `0.0..=1.0` (0.2: wait 80 %..100 %).
    pub jitter: f64,
    /// A `Retry-After` longer than this makes the route fall back instead of waiting.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(5),
            jitter: 0.2,
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` after attempt `attempt` (1-based) failed, or `None`
    /// when this target should not be tried again. `roll` is a uniform random number in `0..1`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, roll: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = self.multiplier.max(1.0).powi(attempt.saturating_sub(1).min(63) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let base = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let backoff = Duration::from_secs_f64(base * (1.0 - jitter * roll.clamp(0.0, 1.0)));
        match retry_after {
            Some(ra) if ra > self.max_retry_after => None,
            Some(ra) => Some(ra.max(backoff)),
            None => Some(backoff),
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (a date in the past means now).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A uniform random number in `0..1`, good enough for jitter and weighted picks.
pub(crate) fn roll() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(300),
            jitter: 0.5,
            max_retry_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_grows_caps_and_stops_after_max_attempts() {
        let p = policy();
        assert_eq!(p.delay(1, None, 0.0), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(2, None, 0.0), Some(Duration::from_millis(200)));
        assert_eq!(p.delay(3, None, 0.0), Some(Duration::from_millis(300)));
        assert_eq!(p.delay(4, None, 0.0), None);
    }

    #[test]
    fn jitter_shortens_the_wait_by_at_most_its_fraction() {
        let p = policy();
        assert_eq!(p.delay(1, None, 1.0), Some(Duration::from_millis(50)));
        let d = p.delay(2, None, 0.5).unwrap_or_default();
        assert_eq!(d, Duration::from_millis(150));
    }

    #[test]
    fn retry_after_is_a_floor_and_too_long_gives_up() {
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::from_secs(2)), 0.0), Some(Duration::from_secs(2)));
        assert_eq!(p.delay(1, Some(Duration::from_millis(1)), 0.0), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(1, Some(Duration::from_secs(11)), 0.0), None);
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap_or(SystemTime::UNIX_EPOCH);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:40 GMT", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn roll_is_in_the_unit_interval() {
        for _ in 0..100 {
            let r = roll();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }
}
