//! Who may do what in Sluice: tenants, users (argon2id passwords), API keys (shown once, stored
//! as a SHA-256 digest, revocable, with a last-used time), roles and their permissions, signed
//! session tokens (Ed25519 JWTs naming their user's id, signed with keys of their own tenant that
//! rotate, named by `kid`, and stored sealed with the server key), OIDC login against an
//! external issuer, sharing of workflows with users, keys and roles, GCRA rate limits, and the
//! audit log writer.
//!
//! Everything is kept in the store's directory documents, so every node of a cluster sees the
//! same identities; each node caches what it reads for a few seconds. The HTTP layer
//! (`sluice-server`) turns a request's credentials into a [`Principal`] here and checks its
//! [`Perm`]s; every store call after that is made with the principal's tenant.

pub mod apikey;
pub mod audit;
pub mod directory;
pub mod error;
pub mod jwt;
pub mod oidc;
pub mod password;
pub mod ratelimit;
pub mod role;
pub mod seal;
pub mod sharing;
pub mod text;

pub use audit::Auditor;
pub use directory::{ApiKeyView, AuthConfig, Directory, NewApiKey, NewUser, Session, UserView};
pub use error::{AuthError, LoginFailure};
pub use ratelimit::{Limited, Quota, RateLimitConfig, RateLimiter, RateState};
pub use role::{Actor, Perm, Principal, Role};
pub use seal::ServerKey;
pub use sharing::{Access, Grant, Shares, Sharing, Visibility};
pub use text::check_email;

/// The tenant scope of deployment-wide documents (tenants themselves, signing keys). Tenant ids
/// cannot take this name.
pub const SYSTEM_SCOPE: &str = "_system";

/// Whether `id` may name a tenant: 1 to 63 of `a-z`, `0-9` and `-`, starting with a letter or
/// digit. The reason when it may not.
pub fn check_tenant_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && id.bytes().next().is_some_and(|b| b != b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tenant id {id:?}: expected 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'"))
    }
}

/// Milliseconds since the Unix epoch.
pub use sluice_store::now_ms;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `n` random bytes from the operating system.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| AuthError::Internal("the operating system gave no random bytes".into()))?;
    Ok(out)
}
