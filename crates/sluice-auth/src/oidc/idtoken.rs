//! ID tokens: the issuer's signing keys (its JWKS) and the checks of OpenID Connect Core
//! §3.1.3.7 (signature, `iss`, `aud`/`azp`, `exp`, `iat`, `nonce`). Pure: time is passed in.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Signature algorithms an ID token may use. `none` and the HMAC ones (keyed with the client
/// secret) are refused.
const ACCEPTED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Why an ID token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the ID token is malformed: {0}")]
    Malformed(String),
    #[error("the ID token is signed with {0}; accepted are RS256, RS384, RS512, PS256, PS384, PS512, ES256 and ES384")]
    Algorithm(String),
    /// No key of the issuer's JWKS fits the token (the caller may fetch the JWKS again).
    #[error("the ID token names a signing key ({0}) that the issuer does not publish")]
    UnknownKey(String),
    #[error("the ID token's signature does not verify")]
    BadSignature,
    #[error("the ID token was issued by {found:?}, not by the configured issuer {expected:?}")]
    Issuer { found: String, expected: String },
    #[error("the ID token is meant for {found}, not for this client ({expected})")]
    Audience { found: String, expected: String },
    #[error("the ID token expired {0} s ago; sign in again")]
    Expired(i64),
    #[error("the ID token is not valid yet (issued or valid from {0} s in the future); check the clocks")]
    NotYetValid(i64),
    #[error("the ID token's nonce does not match this login")]
    Nonce,
    #[error("the ID token has no {0} claim")]
    Missing(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
}

fn family(alg: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        ES256 | ES384 => Some(Family::Ec),
        _ => None,
    }
}

struct Jwk {
    kid: Option<String>,
    /// The one algorithm the key is for, when the JWKS says.
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

/// The signing keys an issuer publishes at its `jwks_uri`.
#[derive(Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| &k.kid)).finish()
    }
}

impl Jwks {
    /// Reads a JWK Set. Keys that are not for signatures, or of a type or curve this server does
    /// not verify with, are skipped rather than failing the set.
    pub fn parse(doc: &Value) -> Result<Self, String> {
        let keys = doc["keys"].as_array().ok_or("no `keys` array")?;
        let mut out = Vec::new();
        for k in keys {
            if k["use"].as_str().is_some_and(|u| u != "sig") {
                continue;
            }
            let alg = match k["alg"].as_str() {
                Some(a) => match a.parse::<Algorithm>().ok().filter(|a| ACCEPTED.contains(a)) {
                    Some(a) => Some(a),
                    None => continue,
                },
                None => None,
            };
            let s = |name: &str| k[name].as_str();
            let (family, key) = match (s("kty"), s("crv")) {
                (Some("RSA"), _) => match (s("n"), s("e")) {
                    (Some(n), Some(e)) => (Family::Rsa, DecodingKey::from_rsa_components(n, e)),
                    _ => continue,
                },
                (Some("EC"), Some("P-256" | "P-384")) => match (s("x"), s("y")) {
                    (Some(x), Some(y)) => (Family::Ec, DecodingKey::from_ec_components(x, y)),
                    _ => continue,
                },
                _ => continue,
            };
            let Ok(key) = key else { continue };
            out.push(Jwk { kid: s("kid").map(str::to_string), alg, family, key });
        }
        Ok(Self { keys: out })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What the token must say.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub nonce: &'a str,
    /// Seconds since the Unix epoch.
    pub now_s: i64,
    /// Clock skew allowed on `exp`, `iat` and `nbf`, in seconds.
    pub leeway_s: i64,
}

/// A verified ID token.
#[derive(Debug, Clone, PartialEq)]
pub struct IdToken {
    pub sub: String,
    pub email: Option<String>,
    /// `None` when the issuer does not say.
    pub email_verified: Option<bool>,
    /// Every claim, for the role mapping.
    pub claims: Value,
}

/// Checks `token` against the issuer's keys and `expected`.
pub fn verify(token: &str, jwks: &Jwks, expected: &Expected<'_>) -> Result<IdToken, TokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::Json(_) => {
            TokenError::Algorithm(unknown_alg(token).unwrap_or_else(|| "an unknown algorithm".into()))
        }
        _ => TokenError::Malformed(e.to_string()),
    })?;
    let alg = header.alg;
    let fam =
        family(alg).filter(|_| ACCEPTED.contains(&alg)).ok_or_else(|| TokenError::Algorithm(format!("{alg:?}")))?;
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| k.family == fam && k.alg.is_none_or(|a| a == alg))
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .collect();
    if candidates.is_empty() {
        return Err(TokenError::UnknownKey(
            header.kid.map_or_else(|| format!("none given, alg {alg:?}"), |k| format!("kid {k:?}")),
        ));
    }
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let mut claims = None;
    for k in candidates {
        match jsonwebtoken::decode::<Value>(token, &k.key, &validation) {
            Ok(d) => {
                claims = Some(d.claims);
                break;
            }
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_) => continue,
                _ => return Err(TokenError::Malformed(e.to_string())),
            },
        }
    }
    let claims = claims.ok_or(TokenError::BadSignature)?;
    check_claims(claims, expected)
}

/// The `alg` of a header that jsonwebtoken does not know (such as `none`).
fn unknown_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["alg"].as_str().map(str::to_string)
}

fn check_claims(claims: Value, x: &Expected<'_>) -> Result<IdToken, TokenError> {
    let iss = claims["iss"].as_str().ok_or(TokenError::Missing("iss"))?;
    if iss != x.issuer {
        return Err(TokenError::Issuer { found: iss.into(), expected: x.issuer.into() });
    }
    let aud: Vec<&str> = match &claims["aud"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => return Err(TokenError::Missing("aud")),
    };
    let audience_error = || TokenError::Audience { found: format!("{aud:?}"), expected: x.client_id.into() };
    if !aud.contains(&x.client_id) {
        return Err(audience_error());
    }
    // With other audiences beside this client, the token must say it was issued to this one.
    match claims["azp"].as_str() {
        Some(azp) if azp != x.client_id => return Err(audience_error()),
        None if aud.len() > 1 => return Err(TokenError::Missing("azp")),
        _ => {}
    }
    let exp = claims["exp"].as_i64().ok_or(TokenError::Missing("exp"))?;
    if exp + x.leeway_s <= x.now_s {
        return Err(TokenError::Expired(x.now_s - exp));
    }
    let iat = claims["iat"].as_i64().ok_or(TokenError::Missing("iat"))?;
    if iat - x.leeway_s > x.now_s {
        return Err(TokenError::NotYetValid(iat - x.now_s));
    }
    if let Some(nbf) = claims["nbf"].as_i64() {
        if nbf - x.leeway_s > x.now_s {
            return Err(TokenError::NotYetValid(nbf - x.now_s));
        }
    }
    let nonce = claims["nonce"].as_str().ok_or(TokenError::Missing("nonce"))?;
    if !constant_time_eq(nonce.as_bytes(), x.nonce.as_bytes()) {
        return Err(TokenError::Nonce);
    }
    let sub = claims["sub"].as_str().filter(|s| !s.is_empty()).ok_or(TokenError::Missing("sub"))?.to_string();
    let email = claims["email"].as_str().map(str::to_string);
    let email_verified = match &claims["email_verified"] {
        Value::Bool(b) => Some(*b),
        // Some issuers send it as a string.
        Value::String(s) => Some(s == "true"),
        _ => None,
    };
    Ok(IdToken { sub, email, email_verified, claims })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://idp.example.com";

    struct Signer {
        pair: EcdsaKeyPair,
        kid: String,
    }

    impl Signer {
        fn new(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
            Self { pair, kid: kid.into() }
        }

        fn jwk(&self) -> Value {
            let p = self.pair.public_key().as_ref();
            json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                   "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])})
        }

        fn sign_with(&self, header: &Value, claims: &Value) -> String {
            let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
            let sig = self.pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", B64.encode(sig.as_ref()))
        }

        fn sign(&self, claims: &Value) -> String {
            self.sign_with(&json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}), claims)
        }
    }

    fn claims() -> Value {
        json!({"iss": ISS, "sub": "u-1", "aud": "sluice", "exp": NOW + 300, "iat": NOW - 5, "nonce": "n-1",
               "email": "ada@example.com", "email_verified": true, "groups": ["devs"]})
    }

    fn expected() -> Expected<'static> {
        Expected { issuer: ISS, client_id: "sluice", nonce: "n-1", now_s: NOW, leeway_s: 60 }
    }

    fn check(token: &str, jwks: &Jwks) -> Result<IdToken, TokenError> {
        verify(token, jwks, &expected())
    }

    /// Each case changes the claims of a good token; `None` means it must pass.
    #[test]
    fn claims_are_checked_one_by_one() {
        let signer = Signer::new("k1");
        let jwks = Jwks::parse(&json!({"keys": [signer.jwk()]})).unwrap();
        let good = check(&signer.sign(&claims()), &jwks).unwrap();
        assert_eq!(good.sub, "u-1");
        assert_eq!(good.email.as_deref(), Some("ada@example.com"));
        assert_eq!(good.email_verified, Some(true));
        assert_eq!(good.claims["groups"], json!(["devs"]));

        let cases: Vec<(&str, Value, Option<TokenError>)> = vec![
            (
                "wrong issuer",
                json!({"iss": "https://evil.example.com"}),
                Some(TokenError::Issuer { found: "https://evil.example.com".into(), expected: ISS.into() }),
            ),
            (
                "wrong audience",
                json!({"aud": "other"}),
                Some(TokenError::Audience { found: "[\"other\"]".into(), expected: "sluice".into() }),
            ),
            ("audience among others, with azp", json!({"aud": ["other", "sluice"], "azp": "sluice"}), None),
            ("audience among others, no azp", json!({"aud": ["other", "sluice"]}), Some(TokenError::Missing("azp"))),
            (
                "azp of another client",
                json!({"azp": "other"}),
                Some(TokenError::Audience { found: "[\"sluice\"]".into(), expected: "sluice".into() }),
            ),
            ("expired", json!({"exp": NOW - 120}), Some(TokenError::Expired(120))),
            ("expired within the leeway", json!({"exp": NOW - 30}), None),
            ("issued in the future", json!({"iat": NOW + 600}), Some(TokenError::NotYetValid(600))),
            ("not before the future", json!({"nbf": NOW + 600}), Some(TokenError::NotYetValid(600))),
            ("wrong nonce", json!({"nonce": "n-2"}), Some(TokenError::Nonce)),
            ("no nonce", json!({"nonce": null}), Some(TokenError::Missing("nonce"))),
            ("no exp", json!({"exp": null}), Some(TokenError::Missing("exp"))),
            ("no iat", json!({"iat": null}), Some(TokenError::Missing("iat"))),
            ("no sub", json!({"sub": ""}), Some(TokenError::Missing("sub"))),
            ("no aud", json!({"aud": null}), Some(TokenError::Missing("aud"))),
        ];
        for (name, change, want) in cases {
            let mut c = claims();
            for (k, v) in change.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            let got = check(&signer.sign(&c), &jwks);
            match want {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(e) => assert_eq!(got, Err(e), "{name}"),
            }
        }
    }

    #[test]
    fn signatures_and_keys_are_checked() {
        let signer = Signer::new("k1");
        let jwks = Jwks::parse(&json!({"keys": [signer.jwk()]})).unwrap();
        // Same kid, another key: the signature fails.
        let impostor = Signer::new("k1");
        assert_eq!(check(&impostor.sign(&claims()), &jwks), Err(TokenError::BadSignature));
        // A kid the issuer does not publish.
        let stranger = Signer::new("k9");
        assert!(matches!(check(&stranger.sign(&claims()), &jwks), Err(TokenError::UnknownKey(k)) if k.contains("k9")));
        // No kid: every key of the right type is tried.
        let no_kid = signer.sign_with(&json!({"alg": "ES256"}), &claims());
        assert!(check(&no_kid, &jwks).is_ok());
        // A tampered payload.
        let token = signer.sign(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut evil = claims();
        evil["sub"] = json!("admin");
        let forged = format!("{}.{}.{}", parts[0], B64.encode(evil.to_string()), parts[2]);
        assert_eq!(check(&forged, &jwks), Err(TokenError::BadSignature));
        // `none` and HMAC are refused whatever the token says.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode(claims().to_string()));
        assert_eq!(check(&none, &jwks), Err(TokenError::Algorithm("none".into())));
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(b"client-secret"),
        )
        .unwrap();
        assert_eq!(check(&hs, &jwks), Err(TokenError::Algorithm("HS256".into())));
        // An RS256 header against an EC-only key set: no key fits.
        let rs = signer.sign_with(&json!({"alg": "RS256", "kid": "k1"}), &claims());
        assert!(matches!(check(&rs, &jwks), Err(TokenError::UnknownKey(_))));
        assert!(matches!(check("a.b", &jwks), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn rsa_keys_verify_from_their_components() {
        // RFC 7515 appendix A.2: an RS256 JWS and the RSA key that signed it.
        let jwk = json!({"kty": "RSA", "kid": "rfc",
            "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
            "e": "AQAB"});
        let jwks = Jwks::parse(&json!({"keys": [jwk, {"kty": "oct", "k": "c2VjcmV0"}, {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]})).unwrap();
        assert_eq!(jwks.len(), 1, "symmetric and encryption keys are skipped: {jwks:?}");
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
        let x = Expected { issuer: "joe", client_id: "sluice", nonce: "n", now_s: 1_300_819_000, leeway_s: 0 };
        // The signature verifies; the example has no audience, which is what fails.
        assert_eq!(verify(token, &jwks, &x), Err(TokenError::Missing("aud")));
        let mut bad = token.to_string();
        bad.replace_range(bad.len() - 4.., "AAAA");
        assert_eq!(verify(&bad, &jwks, &x), Err(TokenError::BadSignature));
    }
}
