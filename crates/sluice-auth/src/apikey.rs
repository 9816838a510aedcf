//! API keys: `slk_<id>_<secret>`, 16 hex characters of public id (how a request names its key,
//! and its tenant) and 64 hex characters (256 bits) of secret. Only the SHA-256 digest of the
//! whole key is stored: a key this random needs no slow hash, and checking one costs a
//! microsecond on every request.

use crate::{hex, random_bytes, AuthError};

pub const PREFIX: &str = "slk_";

/// A new key: its id and the whole key, to be shown once.
pub fn generate() -> Result<(String, String), AuthError> {
    let id = hex(&random_bytes::<8>()?);
    let secret = hex(&random_bytes::<32>()?);
    Ok((id.clone(), format!("{PREFIX}{id}_{secret}")))
}

/// The id of a key that has the right shape; `None` for anything else.
pub fn parse(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexish =
        |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hexish(id, 16) && hexish(secret, 64)).then_some(id)
}

/// The digest stored for a key.
pub fn digest(key: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref())
}

/// Whether `key` has the stored digest, in time that does not depend on where they differ.
pub fn matches(key: &str, stored_digest: &str) -> bool {
    let d = digest(key);
    d.len() == stored_digest.len() && d.bytes().zip(stored_digest.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_parse_and_match_their_digest() {
        let (id, key) = generate().unwrap();
        assert_eq!(parse(&key), Some(id.as_str()));
        assert_eq!(key.len(), 4 + 16 + 1 + 64);
        let d = digest(&key);
        assert!(matches(&key, &d));
        let mut other = key.clone();
        other.pop();
        other.push(if key.ends_with('0') { '1' } else { '0' });
        assert!(!matches(&other, &d));
        assert_ne!(generate().unwrap().1, key);
        for bad in ["", "slk_", "slk_abc_def", "Bearer x", &key.to_uppercase(), &format!("{key}0")] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
