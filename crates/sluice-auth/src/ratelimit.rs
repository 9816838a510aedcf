//! Request rate limits with GCRA (the `governor` crate): per API key, per user, per tenant and
//! global, each an optional quota like `100/hour`. A quota of N per period lets N requests through
//! at once and then one every period/N, so "the 101st request within the hour" waits 36 s.
//!
//! Checks run from the narrowest scope out (key or user, tenant, global), stopping at the first
//! refusal, so a caller refused by their own limit uses none of the shared ones.
//!
//! A key or user bucket is named by its tenant and principal together: the same email in two
//! tenants is two users with two quotas, and requests naming a tenant that does not exist fill
//! buckets of their own, never a real account's.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use serde::{Deserialize, Serialize};

use crate::role::{Actor, Principal};

/// N requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Quota {
    pub requests: u32,
    pub per: Duration,
}

impl Quota {
    /// Parses `N/second`, `N/minute`, `N/hour` or `N/day` (also `s`, `m`, `h`, `d`).
    pub fn parse(s: &str) -> Result<Quota, String> {
        let bad = || format!("invalid quota {s:?}: expected N/second, N/minute, N/hour or N/day with N ≥ 1");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let requests: u32 = n.trim().parse().map_err(|_| bad())?;
        if requests == 0 {
            return Err(bad());
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3_600,
            "d" | "day" => 86_400,
            _ => return Err(bad()),
        };
        Ok(Quota { requests, per: Duration::from_secs(per) })
    }

    fn governor(self) -> Option<governor::Quota> {
        let n = NonZeroU32::new(self.requests)?;
        governor::Quota::with_period(self.per / self.requests).map(|q| q.allow_burst(n))
    }

    /// The `RateLimit-Policy` form: `100;w=3600`.
    pub fn policy(self) -> String {
        format!("{};w={}", self.requests, self.per.as_secs())
    }
}

impl TryFrom<String> for Quota {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Quota::parse(&s)
    }
}

impl From<Quota> for String {
    fn from(q: Quota) -> String {
        let unit = match q.per.as_secs() {
            1 => "second",
            60 => "minute",
            3_600 => "hour",
            _ => "day",
        };
        format!("{}/{unit}", q.requests)
    }
}

/// Which quotas apply; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_key: Option<Quota>,
    pub per_user: Option<Quota>,
    pub per_tenant: Option<Quota>,
    pub global: Option<Quota>,
}

/// A bucket per `(tenant, principal)` (key id or email), or per tenant.
type Keyed<K> = governor::RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;
type Scoped = (String, String);
type Direct = governor::RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// The tightest state among the limits a request passed, for the `RateLimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateState {
    pub quota: Quota,
    pub remaining: u32,
    /// Seconds until the full quota is back.
    pub reset_secs: u64,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `key`, `user`, `tenant` or `global`.
    pub scope: &'static str,
    pub quota: Quota,
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds, rounded up: a client that waits this long is let through.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }
}

pub struct RateLimiter {
    config: RateLimitConfig,
    clock: DefaultClock,
    keys: Option<Keyed<Scoped>>,
    users: Option<Keyed<Scoped>>,
    tenants: Option<Keyed<String>>,
    global: Option<Direct>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        fn keyed<K: Clone + Eq + std::hash::Hash>(q: Option<Quota>) -> Option<Keyed<K>> {
            q.and_then(Quota::governor).map(|q| governor::RateLimiter::keyed(q).with_middleware())
        }
        Self {
            keys: keyed(config.per_key),
            users: keyed(config.per_user),
            tenants: keyed(config.per_tenant),
            global: config.global.and_then(Quota::governor).map(|q| governor::RateLimiter::direct(q).with_middleware()),
            clock: DefaultClock::default(),
            config,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.keys.is_none() && self.users.is_none() && self.tenants.is_none() && self.global.is_none()
    }

    /// Takes one request from every quota that applies to `p`, or says which refused and for how
    /// long.
    pub fn check(&self, p: &Principal) -> Result<Option<RateState>, Limited> {
        let mut tightest: Option<RateState> = None;
        let mut note = |quota: Quota, remaining: u32| {
            let reset_secs = (quota.per.as_secs() * u64::from(quota.requests - remaining.min(quota.requests)))
                .div_ceil(u64::from(quota.requests));
            if tightest.as_ref().is_none_or(|t| remaining < t.remaining) {
                tightest = Some(RateState { quota, remaining, reset_secs });
            }
        };
        let scoped = match &p.actor {
            Actor::ApiKey { id, .. } => self.keys.as_ref().zip(self.config.per_key).map(|(l, q)| ("key", l, q, id)),
            Actor::User { email } => self.users.as_ref().zip(self.config.per_user).map(|(l, q)| ("user", l, q, email)),
            Actor::Anonymous => None,
        };
        if let Some((scope, limiter, quota, who)) = scoped {
            let bucket = (p.tenant.clone(), who.clone());
            let snap = limiter.check_key(&bucket).map_err(|n| self.refused(scope, quota, &n))?;
            note(quota, snap.remaining_burst_capacity());
        }
        if let Some((limiter, quota)) = self.tenants.as_ref().zip(self.config.per_tenant) {
            let snap = limiter.check_key(&p.tenant).map_err(|n| self.refused("tenant", quota, &n))?;
            note(quota, snap.remaining_burst_capacity());
        }
        if let Some((limiter, quota)) = self.global.as_ref().zip(self.config.global) {
            let snap = limiter.check().map_err(|n| self.refused("global", quota, &n))?;
            note(quota, snap.remaining_burst_capacity());
        }
        Ok(tightest)
    }

    fn refused(
        &self,
        scope: &'static str,
        quota: Quota,
        not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> Limited {
        Limited { scope, quota, retry_after: not_until.wait_time_from(self.clock.now()) }
    }

    /// Forgets keys whose quota is back to full, so the maps stay as small as the set of recent
    /// callers.
    pub fn housekeep(&self) {
        for l in [&self.keys, &self.users].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.tenants {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::role::Role;

    fn user(tenant: &str, email: &str) -> Principal {
        Principal { tenant: tenant.into(), actor: Actor::User { email: email.into() }, role: Role::Editor }
    }

    #[test]
    fn quotas_parse() {
        assert_eq!(Quota::parse("100/hour").unwrap(), Quota { requests: 100, per: Duration::from_secs(3600) });
        assert_eq!(Quota::parse(" 5 / s ").unwrap().per, Duration::from_secs(1));
        for bad in ["", "100", "0/hour", "-1/hour", "10/week", "x/hour"] {
            assert!(Quota::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(String::from(Quota::parse("10000/h").unwrap()), "10000/hour");
        assert_eq!(Quota::parse("100/hour").unwrap().policy(), "100;w=3600");
    }

    #[test]
    fn the_101st_request_of_the_hour_waits_36_seconds() {
        let l = RateLimiter::new(RateLimitConfig {
            per_user: Some(Quota::parse("100/hour").unwrap()),
            ..Default::default()
        });
        let ada = user("acme", "ada@example.com");
        for i in 0..100 {
            let state = l.check(&ada).unwrap_or_else(|e| panic!("request {} refused: {e:?}", i + 1)).unwrap();
            assert_eq!(state.remaining, 99 - i);
        }
        let refused = l.check(&ada).unwrap_err();
        assert_eq!(refused.scope, "user");
        assert!((35..=36).contains(&refused.retry_after_secs()), "{refused:?}");
        // Another user has their own quota.
        assert!(l.check(&user("acme", "bob@example.com")).is_ok());
    }

    /// Issue 13, item 8: buckets were named by the email alone, so one tenant's user spent the
    /// quota of the same email in every other tenant.
    #[test]
    fn the_same_email_in_two_tenants_has_two_quotas() {
        let l = RateLimiter::new(RateLimitConfig {
            per_user: Some(Quota::parse("3/hour").unwrap()),
            per_key: Some(Quota::parse("3/hour").unwrap()),
            ..Default::default()
        });
        for _ in 0..3 {
            l.check(&user("acme", "ada@example.com")).unwrap();
        }
        assert_eq!(l.check(&user("acme", "ada@example.com")).unwrap_err().scope, "user");
        assert_eq!(l.check(&user("globex", "ada@example.com")).unwrap().unwrap().remaining, 2);
        // Nor does a tenant that does not exist reach a real account's bucket.
        assert!(l.check(&user("no-such-tenant", "ada@example.com")).is_ok());
        let key = |tenant: &str| Principal {
            tenant: tenant.into(),
            actor: Actor::ApiKey { id: "0123456789abcdef".into(), name: "ci".into() },
            role: Role::Editor,
        };
        for _ in 0..3 {
            l.check(&key("acme")).unwrap();
        }
        assert_eq!(l.check(&key("acme")).unwrap_err().scope, "key");
        assert!(l.check(&key("globex")).is_ok());
    }

    #[test]
    fn the_global_limit_holds_across_users_and_narrow_refusals_spend_nothing_shared() {
        let l = RateLimiter::new(RateLimitConfig {
            per_user: Some(Quota::parse("3/hour").unwrap()),
            global: Some(Quota::parse("5/hour").unwrap()),
            ..Default::default()
        });
        let (a, b) = (user("t1", "a@x.io"), user("t2", "b@x.io"));
        for _ in 0..3 {
            l.check(&a).unwrap();
        }
        // Refused by its own quota: the global one is not touched.
        assert_eq!(l.check(&a).unwrap_err().scope, "user");
        l.check(&b).unwrap();
        l.check(&b).unwrap();
        let refused = l.check(&b).unwrap_err();
        assert_eq!(refused.scope, "global", "5 of 5 global requests used across two users");
        assert!(refused.retry_after_secs() >= 700, "{refused:?}");
        l.housekeep();
    }
}
