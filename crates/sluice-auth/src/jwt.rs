//! Session tokens: JWTs signed with Ed25519 (`EdDSA`), each naming its signing key by `kid`.
//! The newest key signs; every key still in the ring verifies, so rotating the signing key does
//! not log anyone out. Keys leave the ring once every token they signed has expired.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::{hex, random_bytes, AuthError};

pub const ISSUER: &str = "sluice";
pub const AUDIENCE: &str = "sluice-api";

/// What a session token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (UUID v7). Tokens issued before users had ids held the email here.
    pub sub: String,
    /// The user's email, under which the directory finds the user (whose id must be `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The tenant.
    pub tid: String,
    pub role: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

/// A signing key as stored: PKCS#8 private key and raw public key, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub created_at_ms: i64,
    pub pkcs8: String,
    pub public: String,
}

impl StoredKey {
    /// A fresh Ed25519 key pair.
    pub fn generate(now_ms: i64) -> Result<Self, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| AuthError::Internal("cannot generate a signing key".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| AuthError::Internal("cannot read a generated signing key".into()))?;
        Ok(Self {
            kid: hex(&random_bytes::<8>()?),
            created_at_ms: now_ms,
            pkcs8: STANDARD.encode(doc.as_ref()),
            public: STANDARD.encode(pair.public_key().as_ref()),
        })
    }
}

struct Key {
    kid: String,
    created_at_ms: i64,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The signing keys in use, newest first.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(stored: &[StoredKey]) -> Result<Self, AuthError> {
        let mut keys = stored
            .iter()
            .map(|k| {
                let bad = |what: &str| AuthError::Internal(format!("signing key {}: invalid {what}", k.kid));
                let pkcs8 = STANDARD.decode(&k.pkcs8).map_err(|_| bad("private key"))?;
                let public = STANDARD.decode(&k.public).map_err(|_| bad("public key"))?;
                Ok(Key {
                    kid: k.kid.clone(),
                    created_at_ms: k.created_at_ms,
                    encoding: EncodingKey::from_ed_der(&pkcs8),
                    decoding: DecodingKey::from_ed_der(&public),
                })
            })
            .collect::<Result<Vec<_>, AuthError>>()?;
        keys.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.kid.cmp(&b.kid)));
        Ok(Self { keys })
    }

    /// When the newest key was made, if there is one.
    pub fn newest_ms(&self) -> Option<i64> {
        self.keys.first().map(|k| k.created_at_ms)
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    pub fn has(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid == kid)
    }

    /// Signs with the newest key.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let key = self.keys.first().ok_or_else(|| AuthError::Internal("no signing key".into()))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| AuthError::Internal(format!("cannot sign a token: {e}")))
    }

    /// The claims of a token this ring signed that has not expired. `Err(None)` when its `kid` is
    /// not in the ring (the caller may reload the ring and try again).
    pub fn verify(&self, token: &str) -> Result<Claims, Option<AuthError>> {
        let invalid = |why: &str| Some(AuthError::Unauthenticated(format!("invalid session token: {why}")));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(invalid("unexpected algorithm"));
        }
        let kid = header.kid.ok_or_else(|| invalid("no key id"))?;
        let key = self.keys.iter().find(|k| k.kid == kid).ok_or(None)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map(|d| d.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => invalid("expired; log in again"),
                ErrorKind::InvalidSignature => invalid("bad signature"),
                _ => invalid("rejected"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "0190d3c2-0000-7000-8000-000000000000".into(),
            email: Some("ada@example.com".into()),
            tid: "acme".into(),
            role: "editor".into(),
            iat: crate::now_ms() / 1000,
            exp,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: "j1".into(),
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_and_unknown_kids_fail() {
        let now = crate::now_ms() / 1000;
        let old = StoredKey::generate(1_000).unwrap();
        let ring1 = Keyring::new(std::slice::from_ref(&old)).unwrap();
        let t1 = ring1.sign(&claims(now + 3600)).unwrap();
        assert_eq!(ring1.verify(&t1).unwrap().email.as_deref(), Some("ada@example.com"));

        let new = StoredKey::generate(2_000).unwrap();
        let ring2 = Keyring::new(&[old.clone(), new.clone()]).unwrap();
        let t2 = ring2.sign(&claims(now + 3600)).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&t2).unwrap().kid.as_deref(), Some(new.kid.as_str()), "newest signs");
        assert!(ring2.verify(&t1).is_ok(), "a token of the previous key still verifies");
        assert!(matches!(ring1.verify(&t2), Err(None)), "a ring without the new key does not know it");

        // The old key retired: its tokens stop working.
        let ring3 = Keyring::new(std::slice::from_ref(&new)).unwrap();
        assert!(matches!(ring3.verify(&t1), Err(None)));

        // Expired, tampered and foreign tokens fail.
        let expired = ring2.sign(&claims(now - 120)).unwrap();
        assert!(matches!(ring2.verify(&expired), Err(Some(AuthError::Unauthenticated(m))) if m.contains("expired")));
        let mut parts: Vec<String> = t2.split('.').map(str::to_string).collect();
        parts[1] = STANDARD.encode(r#"{"sub":"eve","tid":"acme","role":"owner"}"#).trim_end_matches('=').into();
        assert!(matches!(ring2.verify(&parts.join(".")), Err(Some(_))));
        assert!(matches!(ring2.verify("not.a.token"), Err(Some(_))));
        let foreign =
            Keyring::new(&[StoredKey { kid: new.kid.clone(), ..StoredKey::generate(3_000).unwrap() }]).unwrap();
        assert!(matches!(foreign.verify(&t2), Err(Some(_))), "same kid, other key: bad signature");
    }
}
