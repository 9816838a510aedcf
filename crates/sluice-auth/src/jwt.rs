//! Session tokens: JWTs signed with Ed25519 (`EdDSA`), each naming its signing key by `kid`.
//! Every tenant has its own signing keys: a key verifies only tokens of its own tenant. A
//! tenant's newest key signs; its older keys still verify, so rotating does not log anyone out.
//! Keys leave the directory once every token they signed has expired. The private half of a key
//! is stored sealed with the server key ([`ServerKey`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::seal::ServerKey;
use crate::{hex, random_bytes, AuthError};

pub const ISSUER: &str = "sluice";
pub const AUDIENCE: &str = "sluice-api";
/// How far ahead of this node's clock another node's `iat` and `nbf` may be.
pub const CLOCK_SKEW_S: i64 = 60;
/// How far past `exp` a token still passes (clock skew too).
const EXP_LEEWAY_S: u64 = 30;

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
    /// Not valid before (Unix seconds); Sluice does not set it, but checks it when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

/// A signing key as stored: the PKCS#8 private key sealed with the server key, and the raw
/// public key, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub created_at_ms: i64,
    /// The sealed private key ([`ServerKey::seal`] under [`StoredKey::sealed_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// The private key in clear, as versions before sealing stored it; sealed and dropped when
    /// the key is first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs8: Option<String>,
    pub public: String,
}

impl StoredKey {
    /// A fresh Ed25519 key pair of `tenant`, sealed with `server_key`.
    pub fn generate(tenant: &str, now_ms: i64, server_key: &ServerKey) -> Result<Self, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| AuthError::Internal("cannot generate a signing key".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| AuthError::Internal("cannot read a generated signing key".into()))?;
        let kid = hex(&random_bytes::<8>()?);
        Ok(Self {
            sealed: Some(server_key.seal(doc.as_ref(), &Self::sealed_name(tenant, &kid))?),
            kid,
            created_at_ms: now_ms,
            pkcs8: None,
            public: STANDARD.encode(pair.public_key().as_ref()),
        })
    }

    /// What the sealed private key of `tenant`'s key `kid` is sealed under.
    pub fn sealed_name(tenant: &str, kid: &str) -> String {
        format!("signing key {tenant}/{kid}")
    }

    /// Seals a private key stored in clear; false when it was sealed already.
    pub fn seal_clear(&mut self, tenant: &str, server_key: &ServerKey) -> Result<bool, AuthError> {
        let Some(clear) = self.pkcs8.take() else { return Ok(false) };
        let pkcs8 = STANDARD.decode(&clear).map_err(|_| self.bad("private key"))?;
        self.sealed = Some(server_key.seal(&pkcs8, &Self::sealed_name(tenant, &self.kid))?);
        Ok(true)
    }

    fn bad(&self, what: &str) -> AuthError {
        AuthError::Internal(format!("signing key {}: invalid {what}", self.kid))
    }

    /// The key that signs `tenant`'s tokens.
    pub fn signer(&self, tenant: &str, server_key: &ServerKey) -> Result<Signer, AuthError> {
        let pkcs8 = match (&self.sealed, &self.pkcs8) {
            (Some(sealed), _) => server_key.open(sealed, &Self::sealed_name(tenant, &self.kid))?,
            (None, Some(clear)) => STANDARD.decode(clear).map_err(|_| self.bad("private key"))?,
            (None, None) => return Err(self.bad("private key")),
        };
        Ok(Signer {
            kid: self.kid.clone(),
            created_at_ms: self.created_at_ms,
            encoding: EncodingKey::from_ed_der(&pkcs8),
        })
    }

    /// The key that verifies `tenant`'s tokens signed with this key.
    pub fn verifier(&self, tenant: &str) -> Result<Verifier, AuthError> {
        let public = STANDARD.decode(&self.public).map_err(|_| self.bad("public key"))?;
        Ok(Verifier { tenant: tenant.to_string(), decoding: DecodingKey::from_ed_der(&public) })
    }
}

/// A tenant's current signing key.
pub struct Signer {
    pub kid: String,
    pub created_at_ms: i64,
    encoding: EncodingKey,
}

impl Signer {
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Internal(format!("cannot sign a token: {e}")))
    }
}

fn invalid(why: &str) -> AuthError {
    AuthError::Unauthenticated(format!("invalid session token: {why}"))
}

/// The key id a token names, once its header is well formed and says `EdDSA`.
pub fn kid_of(token: &str) -> Result<String, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
    if header.alg != Algorithm::EdDSA {
        return Err(invalid("unexpected algorithm"));
    }
    header.kid.ok_or_else(|| invalid("no key id"))
}

/// One public key of one tenant.
pub struct Verifier {
    pub tenant: String,
    decoding: DecodingKey,
}

impl Verifier {
    /// The claims of a token this key signed, for this key's tenant, within its times: `exp` not
    /// past, `iat` and `nbf` not ahead of `now_s` (beyond [`CLOCK_SKEW_S`]), and a lifetime
    /// (`exp - iat`) of at most `max_lifetime_s`, so that a token signed with a stolen or
    /// misused key cannot last for years.
    pub fn verify(&self, token: &str, now_s: i64, max_lifetime_s: i64) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = EXP_LEEWAY_S;
        // `nbf` is checked below, with the same skew as `iat`.
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map(|d| d.claims).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => invalid("expired; log in again"),
                    ErrorKind::InvalidSignature => invalid("bad signature"),
                    _ => invalid("rejected"),
                }
            })?;
        if claims.tid != self.tenant {
            return Err(invalid("signed with another tenant's key"));
        }
        if claims.iat > now_s + CLOCK_SKEW_S {
            return Err(invalid("issued in the future"));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now_s + CLOCK_SKEW_S) {
            return Err(invalid("not valid yet"));
        }
        if claims.exp.saturating_sub(claims.iat) > max_lifetime_s {
            return Err(invalid("valid for longer than this server issues sessions"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR: i64 = 3600;

    fn claims(tid: &str, iat: i64, exp: i64) -> Claims {
        Claims {
            sub: "0190d3c2-0000-7000-8000-000000000000".into(),
            email: Some("ada@example.com".into()),
            tid: tid.into(),
            role: "editor".into(),
            iat,
            nbf: None,
            exp,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: "j1".into(),
        }
    }

    #[test]
    fn keys_sign_and_verify_their_own_tenants_tokens() {
        let (server_key, _) = ServerKey::generate().unwrap();
        let now = crate::now_ms() / 1000;
        let key = StoredKey::generate("acme", 1_000, &server_key).unwrap();
        assert!(key.pkcs8.is_none() && key.sealed.is_some(), "the private key is stored sealed only");
        let signer = key.signer("acme", &server_key).unwrap();
        let token = signer.sign(&claims("acme", now, now + HOUR)).unwrap();
        assert_eq!(kid_of(&token).unwrap(), key.kid);
        let verifier = key.verifier("acme").unwrap();
        assert_eq!(verifier.verify(&token, now, HOUR).unwrap().email.as_deref(), Some("ada@example.com"));

        // The private key opens only for its tenant and with the server key.
        assert!(key.signer("globex", &server_key).is_err());
        assert!(key.signer("acme", &ServerKey::generate().unwrap().0).is_err());

        // Tampered and foreign tokens fail.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = STANDARD.encode(r#"{"sub":"eve","tid":"acme","role":"owner"}"#).trim_end_matches('=').into();
        assert!(verifier.verify(&parts.join("."), now, HOUR).is_err());
        assert!(kid_of("not.a.token").is_err());
        let other = StoredKey { kid: key.kid.clone(), ..StoredKey::generate("acme", 3_000, &server_key).unwrap() };
        let msg = |r: Result<Claims, AuthError>| r.unwrap_err().to_string();
        assert!(msg(other.verifier("acme").unwrap().verify(&token, now, HOUR)).contains("bad signature"));
    }

    /// Issue 13, item 19: tokens signed with a valid key were accepted whatever their times and
    /// tenant said.
    #[test]
    fn times_lifetime_and_tenant_are_checked() {
        let (server_key, _) = ServerKey::generate().unwrap();
        let now = crate::now_ms() / 1000;
        let key = StoredKey::generate("acme", 1_000, &server_key).unwrap();
        let signer = key.signer("acme", &server_key).unwrap();
        let verifier = key.verifier("acme").unwrap();
        let check = |c: Claims| verifier.verify(&signer.sign(&c).unwrap(), now, HOUR).map_err(|e| e.to_string());
        assert!(check(claims("acme", now, now + HOUR)).is_ok());
        assert!(check(claims("acme", now + 30, now + 30 + HOUR)).is_ok(), "a little clock skew is fine");
        for (c, why) in [
            (claims("acme", now - 2 * HOUR, now - 120), "expired"),
            (claims("acme", now + 600, now + 600 + HOUR), "issued in the future"),
            (Claims { nbf: Some(now + 600), ..claims("acme", now, now + HOUR) }, "not valid yet"),
            (claims("acme", now, now + 10 * 365 * 24 * HOUR), "longer than"),
            (claims("acme", now - 10 * 365 * 24 * HOUR, now + HOUR), "longer than"),
            (claims("globex", now, now + HOUR), "another tenant's key"),
        ] {
            let err = check(c.clone()).unwrap_err();
            assert!(err.contains(why), "{c:?}: {err}");
        }
        assert!(check(Claims { nbf: Some(now - 10), ..claims("acme", now, now + HOUR) }).is_ok());
    }

    #[test]
    fn keys_stored_in_clear_still_sign_and_are_sealed_on_request() {
        let (server_key, _) = ServerKey::generate().unwrap();
        let sealed = StoredKey::generate("acme", 1_000, &server_key).unwrap();
        let pkcs8 =
            server_key.open(sealed.sealed.as_deref().unwrap(), &StoredKey::sealed_name("acme", &sealed.kid)).unwrap();
        let mut clear = StoredKey { sealed: None, pkcs8: Some(STANDARD.encode(&pkcs8)), ..sealed };
        assert!(clear.signer("acme", &server_key).is_ok());
        assert!(clear.seal_clear("acme", &server_key).unwrap());
        assert!(clear.pkcs8.is_none() && clear.sealed.is_some());
        assert!(!clear.seal_clear("acme", &server_key).unwrap(), "sealed once");
        assert!(clear.signer("acme", &server_key).is_ok());
    }
}
