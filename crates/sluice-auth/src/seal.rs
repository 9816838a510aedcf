//! The server key: 256 bits, given to every node (a file or an environment variable), that
//! seals the secrets the directory keeps in the database (the session signing keys) with
//! ChaCha20-Poly1305, so a copy of the database alone does not let anyone mint sessions.
//!
//! A sealed value is `v1:` and the base64 of a random 96-bit nonce followed by the ciphertext and
//! its tag. The associated data names what was sealed (say the tenant and key id), so a sealed
//! value copied into another document does not open there.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

use crate::{hex, random_bytes, AuthError};

const PREFIX: &str = "v1:";

/// See the module docs. `Debug` shows only the fingerprint.
pub struct ServerKey {
    key: LessSafeKey,
    fingerprint: String,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl ServerKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, AuthError> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| AuthError::Internal("cannot use the server key".into()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &[b"sluice server key\0".as_slice(), &bytes].concat());
        Ok(Self { key: LessSafeKey::new(unbound), fingerprint: hex(&digest.as_ref()[..8]) })
    }

    /// A new random key and its text form (for a key file).
    pub fn generate() -> Result<(Self, String), AuthError> {
        let bytes = random_bytes::<32>()?;
        Ok((Self::from_bytes(bytes)?, hex(&bytes)))
    }

    /// A key from its text form: 64 hex characters, or the base64 of 32 bytes. Whitespace around
    /// it (a file's last newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or(0)).collect::<Vec<u8>>()
        } else {
            STANDARD.decode(text).unwrap_or_default()
        };
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "expected a server key of 32 bytes: 64 hex characters or their base64".to_string())?;
        Self::from_bytes(bytes).map_err(|e| e.to_string())
    }

    /// 16 hex characters that name this key without revealing it (a truncated SHA-256).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals `plain`; `what` names what it is and must be given again to open it.
    pub fn seal(&self, plain: &[u8], what: &str) -> Result<String, AuthError> {
        let nonce_bytes = random_bytes::<NONCE_LEN>()?;
        let mut sealed = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(what.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| AuthError::Internal("cannot seal a secret".into()))?;
        Ok(format!("{PREFIX}{}", STANDARD.encode([nonce_bytes.as_slice(), &sealed].concat())))
    }

    /// Opens what [`Self::seal`] sealed under the same `what`; fails for another key, another
    /// `what`, or a changed byte.
    pub fn open(&self, sealed: &str, what: &str) -> Result<Vec<u8>, AuthError> {
        let fail = || {
            AuthError::Internal(format!(
                "{what}: cannot open it with the server key {} (is this the key the database was set up with?)",
                self.fingerprint
            ))
        };
        let raw = sealed.strip_prefix(PREFIX).and_then(|b| STANDARD.decode(b).ok()).ok_or_else(fail)?;
        if raw.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(what.as_bytes()), &mut body).map_err(|_| fail())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_name() {
        let (key, text) = ServerKey::generate().unwrap();
        let sealed = key.seal(b"private key bytes", "acme/k1").unwrap();
        assert!(sealed.starts_with("v1:") && !sealed.contains("private"));
        assert_eq!(key.open(&sealed, "acme/k1").unwrap(), b"private key bytes");
        assert_ne!(key.seal(b"private key bytes", "acme/k1").unwrap(), sealed, "a fresh nonce each time");

        let again = ServerKey::parse(&format!("{text}\n")).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert_eq!(again.open(&sealed, "acme/k1").unwrap(), b"private key bytes");
        let b64 = STANDARD
            .encode((0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<_>>());
        assert_eq!(ServerKey::parse(&b64).unwrap().fingerprint(), key.fingerprint());

        let (other, _) = ServerKey::generate().unwrap();
        assert_ne!(other.fingerprint(), key.fingerprint());
        assert!(other.open(&sealed, "acme/k1").is_err(), "another key");
        assert!(key.open(&sealed, "globex/k1").is_err(), "another name");
        let mut raw = STANDARD.decode(&sealed[3..]).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        assert!(key.open(&format!("v1:{}", STANDARD.encode(raw)), "acme/k1").is_err(), "a changed byte");
        assert!(key.open("clear text", "acme/k1").is_err());
        for bad in ["", "abc", &"0".repeat(63), &"g".repeat(64)] {
            assert!(ServerKey::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{key:?}").contains(&text), "Debug does not show the key");
    }
}
