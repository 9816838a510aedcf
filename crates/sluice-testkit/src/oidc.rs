//! A fake OpenID Connect issuer: a real HTTP server on 127.0.0.1 with a discovery document, a
//! JWKS (an ES256 and an RS256 key), an authorization endpoint that approves one configured user
//! at once (redirecting with a code and the state) and a token endpoint that checks the code,
//! the PKCE S256 verifier, the client's credentials and the redirect URI, and answers with a
//! signed ID token. Tests make it misbehave to see each check of the client fail.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256};
use serde_json::{json, Value};

/// A 2048-bit RSA key made for these tests only (ring verifies RSA but does not make keys).
const RSA_TEST_KEY: &str = include_str!("fixtures/oidc-test-rsa.pem");

/// The user the authorization endpoint signs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub sub: String,
    pub email: String,
    /// `None`: the claim is left out.
    pub email_verified: Option<bool>,
    /// The `groups` claim.
    pub groups: Vec<String>,
}

impl FakeUser {
    pub fn new(email: &str, groups: &[&str]) -> Self {
        Self {
            sub: format!("sub-{email}"),
            email: email.to_string(),
            email_verified: Some(true),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

/// Ways the issuer breaks its ID tokens (or its login), until [`FakeIssuer::behave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// `aud` names another client.
    WrongAudience,
    /// `nonce` is not the one the authorization request sent.
    WrongNonce,
    /// `exp` an hour ago.
    Expired,
    /// Signed by a key that is not published, under a published key's `kid`.
    BadSignature,
    /// Signed by a key whose `kid` the JWKS does not list.
    UnknownKid,
    /// `iss` is another issuer.
    WrongIssuer,
    /// The authorization endpoint answers `error=access_denied`.
    Deny,
}

/// The algorithm of the ID tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Es256,
    Rs256,
}

/// A request as the issuer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The query (GET) or form body (POST).
    pub params: BTreeMap<String, String>,
    /// `basic`, `post` or `none`, for the token endpoint.
    pub client_auth: String,
}

struct Grant {
    redirect_uri: String,
    challenge: String,
    nonce: String,
    user: FakeUser,
}

struct Keys {
    es: EcdsaKeyPair,
    es_kid: String,
    rsa: RsaKeyPair,
    rsa_kid: String,
    /// Never published.
    rogue: EcdsaKeyPair,
}

struct Shared {
    issuer: String,
    client_id: String,
    client_secret: String,
    redirect_uri: Mutex<Option<String>>,
    user: Mutex<FakeUser>,
    alg: Mutex<Alg>,
    misbehave: Mutex<Option<Misbehave>>,
    codes: Mutex<HashMap<String, Grant>>,
    received: Mutex<Vec<Received>>,
    keys: Keys,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running fake issuer; the server stops when this is dropped.
pub struct FakeIssuer {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeIssuer {
    /// Starts the issuer on a free port for one client. It signs in `user@example.com` (no
    /// groups) with ES256 until told otherwise; the redirect URI must be registered with
    /// [`FakeIssuer::register_redirect`] before a login.
    pub async fn start(client_id: &str, client_secret: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("fake issuer cannot bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("fake issuer has no address: {e}"));
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            redirect_uri: Mutex::new(None),
            user: Mutex::new(FakeUser::new("user@example.com", &[])),
            alg: Mutex::new(Alg::Es256),
            misbehave: Mutex::new(None),
            codes: Mutex::default(),
            received: Mutex::default(),
            keys: keys(),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { shared, server }
    }

    /// The issuer identifier (`http://127.0.0.1:PORT`), also the base of its endpoints.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// The one redirect URI the client may use.
    pub fn register_redirect(&self, uri: &str) {
        *lock(&self.shared.redirect_uri) = Some(uri.to_string());
    }

    /// Who the next authorizations sign in.
    pub fn set_user(&self, user: FakeUser) {
        *lock(&self.shared.user) = user;
    }

    pub fn set_alg(&self, alg: Alg) {
        *lock(&self.shared.alg) = alg;
    }

    /// Break every ID token (or login) this way until [`FakeIssuer::behave`].
    pub fn misbehave(&self, m: Misbehave) {
        *lock(&self.shared.misbehave) = Some(m);
    }

    pub fn behave(&self) {
        *lock(&self.shared.misbehave) = None;
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// How many requests reached `path`.
    pub fn hits(&self, path: &str) -> usize {
        lock(&self.shared.received).iter().filter(|r| r.path == path).count()
    }
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn keys() -> Keys {
    let rng = SystemRandom::new();
    let ec = || {
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap_or_else(|e| panic!("cannot make an EC key: {e}"));
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
            .unwrap_or_else(|e| panic!("cannot read an EC key: {e}"))
    };
    let pem: String = RSA_TEST_KEY.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(pem).unwrap_or_else(|e| panic!("the RSA test key is not base64: {e}"));
    let rsa = RsaKeyPair::from_pkcs8(&der).unwrap_or_else(|e| panic!("the RSA test key does not load: {e}"));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Keys { es: ec(), es_kid: format!("es-{nanos}"), rsa, rsa_kid: format!("rsa-{nanos}"), rogue: ec() }
}

/// The modulus and exponent of a DER `RSAPublicKey` (SEQUENCE of two INTEGERs).
fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn item(input: &[u8], tag: u8) -> (&[u8], &[u8]) {
        assert_eq!(input[0], tag, "unexpected DER tag");
        let (len, skip) = match input[1] {
            n if n < 0x80 => (n as usize, 2),
            n => {
                let k = (n & 0x7f) as usize;
                (input[2..2 + k].iter().fold(0usize, |acc, b| acc << 8 | *b as usize), 2 + k)
            }
        };
        (&input[skip..skip + len], &input[skip + len..])
    }
    let (seq, _) = item(der, 0x30);
    let (n, rest) = item(seq, 0x02);
    let (e, _) = item(rest, 0x02);
    let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect::<Vec<u8>>();
    (strip(n), strip(e))
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn random() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut b);
    B64.encode(b)
}

fn record(shared: &Shared, method: &str, path: &str, params: &BTreeMap<String, String>, client_auth: &str) {
    lock(&shared.received).push(Received {
        method: method.into(),
        path: path.into(),
        params: params.clone(),
        client_auth: client_auth.into(),
    });
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Json<Value> {
    record(&shared, "GET", "/.well-known/openid-configuration", &BTreeMap::new(), "none");
    let iss = &shared.issuer;
    Json(json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/authorize"),
        "token_endpoint": format!("{iss}/token"),
        "jwks_uri": format!("{iss}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "email", "profile", "groups"],
    }))
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    record(&shared, "GET", "/jwks", &BTreeMap::new(), "none");
    let k = &shared.keys;
    let p = k.es.public_key().as_ref();
    let (n, e) = rsa_components(k.rsa.public().as_ref());
    Json(json!({"keys": [
        {"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": k.es_kid,
         "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])},
        {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": k.rsa_kid, "n": B64.encode(n), "e": B64.encode(e)},
    ]}))
}

fn redirect(to: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let q: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    format!("{uri}{}{q}", if uri.contains('?') { '&' } else { '?' })
}

async fn authorize(State(shared): State<Arc<Shared>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    record(&shared, "GET", "/authorize", &q, "none");
    let p = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    // A bad client or redirect URI is shown to the user, never redirected to (RFC 6749 §4.1.2.1).
    if p("client_id") != shared.client_id {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    let registered = lock(&shared.redirect_uri).clone();
    if registered.as_deref() != Some(p("redirect_uri")) {
        return (StatusCode::BAD_REQUEST, "redirect_uri is not registered").into_response();
    }
    let back = p("redirect_uri");
    let state = p("state");
    let error = |e: &str| redirect(&with_query(back, &[("error", e), ("state", state)]));
    if p("response_type") != "code" {
        return error("unsupported_response_type");
    }
    if !p("scope").split(' ').any(|s| s == "openid") {
        return error("invalid_scope");
    }
    if p("code_challenge").is_empty() || p("code_challenge_method") != "S256" {
        return error("invalid_request");
    }
    if *lock(&shared.misbehave) == Some(Misbehave::Deny) {
        return redirect(&with_query(
            back,
            &[("error", "access_denied"), ("error_description", "the user said no"), ("state", state)],
        ));
    }
    let code = random();
    let grant = Grant {
        redirect_uri: back.to_string(),
        challenge: p("code_challenge").to_string(),
        nonce: p("nonce").to_string(),
        user: lock(&shared.user).clone(),
    };
    lock(&shared.codes).insert(code.clone(), grant);
    redirect(&with_query(back, &[("code", &code), ("state", state)]))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let decode = |s: &str| form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    let (auth, id, secret) = match (&basic, form.get("client_secret")) {
        (Some(pair), _) => {
            let (id, secret) = pair.split_once(':').unwrap_or((pair, ""));
            ("basic", decode(id), decode(secret))
        }
        (None, Some(secret)) => ("post", form.get("client_id").cloned(), Some(secret.clone())),
        (None, None) => ("none", None, None),
    };
    record(&shared, "POST", "/token", &form, auth);
    if id.as_deref() != Some(shared.client_id.as_str()) || secret.as_deref() != Some(shared.client_secret.as_str()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication failed");
    }
    let f = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if f("grant_type") != "authorization_code" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only authorization_code");
    }
    let Some(grant) = lock(&shared.codes).remove(f("code")) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown or used code");
    };
    if f("redirect_uri") != grant.redirect_uri {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri differs from the authorization's");
    }
    let challenge = B64.encode(ring::digest::digest(&ring::digest::SHA256, f("code_verifier").as_bytes()));
    if challenge != grant.challenge {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "PKCE verification failed");
    }
    let misbehave = *lock(&shared.misbehave);
    let now = now_s();
    let user = &grant.user;
    let mut claims = json!({
        "iss": shared.issuer,
        "sub": user.sub,
        "aud": shared.client_id,
        "exp": now + 300,
        "iat": now,
        "auth_time": now,
        "nonce": grant.nonce,
        "email": user.email,
        "groups": user.groups,
    });
    if let Some(v) = user.email_verified {
        claims["email_verified"] = json!(v);
    }
    match misbehave {
        Some(Misbehave::WrongAudience) => claims["aud"] = json!("another-client"),
        Some(Misbehave::WrongNonce) => claims["nonce"] = json!("not-the-nonce"),
        Some(Misbehave::Expired) => {
            claims["iat"] = json!(now - 7200);
            claims["exp"] = json!(now - 3600);
        }
        Some(Misbehave::WrongIssuer) => claims["iss"] = json!("https://impostor.example.com"),
        _ => {}
    }
    let id_token = sign(&shared.keys, *lock(&shared.alg), misbehave, &claims);
    let mut resp = Json(json!({
        "access_token": random(),
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": id_token,
        "scope": "openid email",
    }))
    .into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp
}

fn sign(keys: &Keys, alg: Alg, misbehave: Option<Misbehave>, claims: &Value) -> String {
    let rng = SystemRandom::new();
    let (name, kid) = match (alg, misbehave) {
        (_, Some(Misbehave::UnknownKid)) => ("ES256", "never-published".to_string()),
        (Alg::Es256, _) => ("ES256", keys.es_kid.clone()),
        (Alg::Rs256, _) => ("RS256", keys.rsa_kid.clone()),
    };
    let header = json!({"alg": name, "typ": "JWT", "kid": kid});
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let rogue = matches!(misbehave, Some(Misbehave::BadSignature | Misbehave::UnknownKid));
    let sig = match name {
        "RS256" if !rogue => {
            let mut sig = vec![0u8; keys.rsa.public().modulus_len()];
            keys.rsa
                .sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                .unwrap_or_else(|e| panic!("cannot sign with RSA: {e}"));
            sig
        }
        _ => {
            let pair = if rogue { &keys.rogue } else { &keys.es };
            let header_alg_is_rsa = name == "RS256";
            if header_alg_is_rsa {
                // A bad RSA signature: right length, wrong bytes.
                vec![7u8; keys.rsa.public().modulus_len()]
            } else {
                pair.sign(&rng, input.as_bytes()).unwrap_or_else(|e| panic!("cannot sign: {e}")).as_ref().to_vec()
            }
        }
    };
    format!("{input}.{}", B64.encode(sig))
}
