//! Logins between the redirect to the issuer and the callback: each has a `state` (the key),
//! a `nonce` and a PKCE (S256) verifier, is used at most once and expires. Kept in this node's
//! memory, bounded, so the callback must reach the node that started the login.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::{random_bytes, AuthError};

/// 256 random bits, base64url: a state, a nonce or a PKCE verifier (43 characters, within
/// RFC 7636's 43 to 128).
pub fn random_token() -> Result<String, AuthError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

/// The PKCE S256 challenge of a verifier: base64url(SHA-256(verifier)).
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()))
}

/// One login in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub nonce: String,
    pub verifier: String,
}

/// Why a callback's state is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Never issued here, or used already.
    Unknown,
    Expired,
    /// Too many logins in flight.
    Full,
}

/// See the module docs.
pub struct PendingLogins {
    ttl: Duration,
    capacity: usize,
    map: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl PendingLogins {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, map: Mutex::default() }
    }

    /// Remembers a login under `state`, at `now`.
    pub fn insert(&self, state: String, pending: Pending, now: Instant) -> Result<(), StateError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < self.ttl);
            if map.len() >= self.capacity {
                return Err(StateError::Full);
            }
        }
        map.insert(state, (pending, now));
        Ok(())
    }

    /// Takes the login of `state` out: a second call with the same state finds nothing.
    pub fn take(&self, state: &str, now: Instant) -> Result<Pending, StateError> {
        let found = self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(state);
        match found {
            None => Err(StateError::Unknown),
            Some((_, at)) if now.saturating_duration_since(at) >= self.ttl => Err(StateError::Expired),
            Some((p, _)) => Ok(p),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pending(n: &str) -> Pending {
        Pending { nonce: n.into(), verifier: format!("v-{n}") }
    }

    #[test]
    fn states_are_single_use_expire_and_are_bounded() {
        let t0 = Instant::now();
        let logins = PendingLogins::new(Duration::from_secs(600), 2);
        logins.insert("a".into(), pending("a"), t0).unwrap();
        logins.insert("b".into(), pending("b"), t0).unwrap();
        assert_eq!(logins.insert("c".into(), pending("c"), t0), Err(StateError::Full));
        assert_eq!(logins.take("a", t0 + Duration::from_secs(1)), Ok(pending("a")));
        assert_eq!(logins.take("a", t0 + Duration::from_secs(1)), Err(StateError::Unknown), "replayed");
        assert_eq!(logins.take("nope", t0), Err(StateError::Unknown));
        assert_eq!(logins.take("b", t0 + Duration::from_secs(600)), Err(StateError::Expired));
        // Expired entries make room.
        logins.insert("c".into(), pending("c"), t0).unwrap();
        logins.insert("d".into(), pending("d"), t0).unwrap();
        logins.insert("e".into(), pending("e"), t0 + Duration::from_secs(601)).unwrap();
        assert_eq!(logins.take("e", t0 + Duration::from_secs(602)), Ok(pending("e")));
    }

    #[test]
    fn pkce_challenge_matches_rfc_7636() {
        // RFC 7636 appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let v = random_token().unwrap();
        assert_eq!(v.len(), 43);
        assert_ne!(v, random_token().unwrap());
    }
}
