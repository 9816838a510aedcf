//! OIDC login against a real `sluice serve` and the fake issuer of the test kit, over real
//! sockets: the browser's redirects are followed with reqwest. The full flow gives a session
//! token with the mapped role; each broken step (PKCE verifier, replayed state, nonce, audience,
//! expiry, signature, key id, issuer, a refusal, an unreachable issuer) is refused precisely.

use std::path::Path;

use serde_json::{json, Value};
use sluice_testkit::oidc::{Alg, FakeIssuer, FakeUser, Misbehave};

use crate::{bin, Api, ServerProcess, TempDir};

const CLIENT_ID: &str = "sluice-app";
/// Characters that must be form-encoded in HTTP Basic client authentication.
const SECRET: &str = "s3cret:&=+ %";

/// A server whose `--oidc` config points at `issuer` (`config` adds lines to the file), on a
/// port chosen first so the redirect URL can name it.
async fn oidc_server(dir: &Path, issuer: &str, fake: Option<&FakeIssuer>, config: &str) -> ServerProcess {
    let port = sluice_testkit::free_port();
    let redirect = format!("http://127.0.0.1:{port}/v1/auth/oidc/callback");
    if let Some(f) = fake {
        f.register_redirect(&redirect);
    }
    let file = dir.join("oidc.yaml");
    std::fs::write(
        &file,
        format!(
            "issuer: {issuer}\nclient_id: {CLIENT_ID}\nclient_secret_env: TEST_OIDC_SECRET\nredirect_url: {redirect}\n\
             tenant: default\n{config}"
        ),
    )
    .unwrap();
    let db = dir.join("sluice.db").display().to_string();
    let args = ["--oidc", &file.display().to_string()].map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start_on_port(&bin(), dir, &db, port, &args, &[("TEST_OIDC_SECRET", SECRET)]).await
}

const ROLES: &str =
    "scopes: [email, groups]\nrole_claim: groups\nroles: {sluice-admins: admin, sluice-editors: editor}\n";

/// A browser that does not follow redirects, so each hop can be looked at.
fn browser() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The `Location` of a 302 from `url`.
async fn hop(http: &reqwest::Client, url: &str) -> String {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let location = r.headers().get("location").map(|l| l.to_str().unwrap().to_string());
    assert_eq!(status, 302, "{url}: {}", r.text().await.unwrap_or_default());
    location.unwrap()
}

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

/// The callback URL the issuer sends the browser to, after a login started at `base`.
async fn callback_url(base: &str) -> String {
    let http = browser();
    let authorize = hop(&http, &format!("{base}/v1/auth/oidc/login")).await;
    hop(&http, &authorize).await
}

/// A whole login, hop by hop: the callback's answer.
async fn sign_in(base: &str) -> (u16, Value) {
    let callback = callback_url(base).await;
    get_json(&browser(), &callback).await
}

fn param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url).unwrap().query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Asserts a refusal: status, error code and a piece of the message.
fn refused(answer: &(u16, Value), status: u16, code: &str, says: &str) {
    let (s, body) = answer;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "expected {says:?} in {message:?}");
    assert!(body.get("token").is_none(), "{body}");
}

async fn audit(server: &ServerProcess) -> Vec<Value> {
    let (status, body) = server.api().get("/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{body}");
    body["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "auth.oidc").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_login_gives_a_session_with_the_mapped_role() {
    let dir = TempDir::new("oidc-flow");
    let issuer = FakeIssuer::start(CLIENT_ID, SECRET).await;
    let server = oidc_server(dir.path(), &issuer.issuer(), Some(&issuer), ROLES).await;
    issuer.set_user(FakeUser::new("Alice@Example.com", &["staff", "sluice-editors"]));

    // A browser following every redirect: login → issuer → callback → a session token.
    let answer = reqwest::get(format!("{}/v1/auth/oidc/login", server.base)).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    let login: Value = answer.json().await.unwrap();
    assert_eq!(login["token_type"], "Bearer", "{login}");
    assert_eq!((login["tenant"].as_str(), login["email"].as_str()), (Some("default"), Some("alice@example.com")));
    assert_eq!((login["role"].as_str(), login["created"].as_bool()), (Some("editor"), Some(true)));
    let alice = Api::with_key(&server.base, login["token"].as_str());
    let (status, me) = alice.get("/v1/auth/whoami").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        me,
        json!({"tenant": "default", "actor": {"kind": "user", "id": "alice@example.com"}, "role": "editor"})
    );
    // The role works as an editor's: reading yes, managing users no.
    assert_eq!(alice.get("/v1/workflows").await.0, 200);
    assert_eq!(alice.get("/v1/users").await.0, 403);

    // What the issuer saw: S256 PKCE, the scopes, a nonce, and Basic client authentication
    // with a verifier that hashes to the challenge (the issuer checked it).
    let seen = issuer.received();
    let authorize = seen.iter().find(|r| r.path == "/authorize").unwrap();
    assert_eq!(authorize.params["code_challenge_method"], "S256");
    assert_eq!(authorize.params["scope"], "openid email groups");
    assert_eq!(authorize.params["nonce"].len(), 43);
    assert_eq!(authorize.params["code_challenge"].len(), 43);
    let token = seen.iter().find(|r| r.path == "/token").unwrap();
    assert_eq!(token.client_auth, "basic");
    assert_eq!(token.params["code_verifier"].len(), 43);
    assert!(!token.params.contains_key("client_secret"));

    // RS256 tokens work as well; a user without mapped groups gets the default role (viewer).
    issuer.set_alg(Alg::Rs256);
    issuer.set_user(FakeUser::new("bob@example.com", &["staff"]));
    let (status, bob) = sign_in(&server.base).await;
    assert_eq!(status, 200, "{bob}");
    assert_eq!(bob["role"], "viewer");
    let (_, me) = Api::with_key(&server.base, bob["token"].as_str()).get("/v1/auth/whoami").await;
    assert_eq!(me["role"], "viewer", "{me}");

    // Alice's groups change at the issuer: her role follows at the next login, and her earlier
    // session has the new role too (on this node at once, on others within the cache time).
    issuer.set_user(FakeUser::new("alice@example.com", &["sluice-admins"]));
    let (status, again) = sign_in(&server.base).await;
    assert_eq!((status, again["role"].as_str(), again["created"].as_bool()), (200, Some("admin"), Some(false)));
    assert_eq!(alice.get("/v1/auth/whoami").await.1["role"], "admin");

    // A user whom the owner made in Sluice keeps that role whatever the issuer's groups say.
    let (status, body) = server.api().post("/v1/users", &json!({"email": "carol@example.com", "role": "owner"})).await;
    assert_eq!(status, 201, "{body}");
    issuer.set_user(FakeUser::new("carol@example.com", &[]));
    let (status, carol) = sign_in(&server.base).await;
    assert_eq!((status, carol["role"].as_str(), carol["created"].as_bool()), (200, Some("owner"), Some(false)));

    // An unverified email is refused.
    let mut unverified = FakeUser::new("dave@example.com", &["sluice-admins"]);
    unverified.email_verified = Some(false);
    issuer.set_user(unverified);
    refused(&sign_in(&server.base).await, 403, "forbidden", "not verified the email dave@example.com");

    // Logins are audited with who, the role and where from.
    let rows = audit(&server).await;
    let alice: Vec<&Value> = rows.iter().filter(|e| e["actor"] == "user:alice@example.com").collect();
    let roles: Vec<&str> = alice.iter().map(|e| e["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["admin", "editor"], "newest first: {alice:?}");
    let ok = alice[0];
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(ok["source_ip"], "127.0.0.1");
    assert_eq!(ok["target"], "/v1/auth/oidc/callback");
    assert!(rows.iter().any(|e| e["actor"] == "user:dave@example.com" && e["status"] == 403), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_refuses_every_broken_step() {
    let dir = TempDir::new("oidc-refusals");
    let issuer = FakeIssuer::start(CLIENT_ID, SECRET).await;
    let server = oidc_server(dir.path(), &issuer.issuer(), Some(&issuer), ROLES).await;
    issuer.set_user(FakeUser::new("mallory@example.com", &["sluice-admins"]));
    let base = server.base.clone();
    let http = browser();

    // A replayed state: the callback works once.
    let callback = callback_url(&base).await;
    assert_eq!(get_json(&http, &callback).await.0, 200);
    refused(&get_json(&http, &callback).await, 400, "oidc_invalid_state", "unknown or already used");
    // A made-up state, and none at all.
    let code = param(&callback, "code").unwrap();
    refused(
        &get_json(&http, &format!("{base}/v1/auth/oidc/callback?code={code}&state=made-up")).await,
        400,
        "oidc_invalid_state",
        "unknown or already used",
    );
    refused(
        &get_json(&http, &format!("{base}/v1/auth/oidc/callback?code={code}")).await,
        400,
        "oidc_invalid_state",
        "no `state`",
    );

    // A wrong PKCE verifier: the authorization request carries someone else's challenge, so
    // the code cannot be redeemed with this login's verifier.
    let authorize = hop(&http, &format!("{base}/v1/auth/oidc/login")).await;
    let mut url = reqwest::Url::parse(&authorize).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "code_challenge" {
                "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let callback = hop(&http, url.as_str()).await;
    refused(&get_json(&http, &callback).await, 401, "oidc_refused", "invalid_grant (PKCE verification failed)");

    // Broken ID tokens, each refused with what is wrong. A key id the issuer does not publish
    // makes the server fetch the issuer's keys again (once) before refusing.
    let jwks_before = issuer.hits("/jwks");
    let cases: &[(Misbehave, u16, &str, &str)] = &[
        (
            Misbehave::UnknownKid,
            401,
            "invalid_id_token",
            "signing key (kid \"never-published\") that the issuer does not publish",
        ),
        (Misbehave::WrongNonce, 401, "invalid_id_token", "nonce does not match"),
        (
            Misbehave::WrongAudience,
            401,
            "invalid_id_token",
            "meant for [\"another-client\"], not for this client (sluice-app)",
        ),
        (Misbehave::Expired, 401, "invalid_id_token", "expired 3600 s ago"),
        (Misbehave::BadSignature, 401, "invalid_id_token", "signature does not verify"),
        (Misbehave::WrongIssuer, 401, "invalid_id_token", "issued by \"https://impostor.example.com\""),
        (Misbehave::Deny, 401, "oidc_refused", "refused the login: access_denied (the user said no)"),
    ];
    for (m, status, code, says) in cases {
        issuer.misbehave(*m);
        let answer = sign_in(&base).await;
        assert_eq!(answer.0, *status, "{m:?}: {}", answer.1);
        refused(&answer, *status, code, says);
    }
    assert_eq!(issuer.hits("/jwks"), jwks_before + 1, "one more fetch of the keys for the unknown kid");
    // The same with RS256 for the signature.
    issuer.set_alg(Alg::Rs256);
    issuer.misbehave(Misbehave::BadSignature);
    refused(&sign_in(&base).await, 401, "invalid_id_token", "signature does not verify");

    // Behaving again, the issuer's user signs in.
    issuer.behave();
    let (status, ok) = sign_in(&base).await;
    assert_eq!((status, ok["role"].as_str()), (200, Some("admin")), "{ok}");

    // Every refusal is in the audit log; those past the token check name the user.
    let rows = audit(&server).await;
    let count = |status: u16| rows.iter().filter(|e| e["status"] == status).count();
    assert_eq!(count(400), 3, "{rows:?}");
    assert_eq!(count(401), cases.len() + 2, "{rows:?}");
    assert!(rows.iter().all(|e| e["tenant"] == "default" && e["target"] == "/v1/auth/oidc/callback"));
    assert!(rows.iter().filter(|e| e["status"] == 401).all(|e| e["actor"] == "oidc"), "{rows:?}");
    assert!(rows.iter().any(|e| e["status"] == 200 && e["actor"] == "user:mallory@example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_posts_the_secret_provisions_nobody_and_reports_an_unreachable_issuer() {
    // client_secret_post, and only users made in Sluice may sign in.
    let dir = TempDir::new("oidc-existing");
    let issuer = FakeIssuer::start(CLIENT_ID, SECRET).await;
    let config = format!("{ROLES}client_auth: client_secret_post\nprovision: existing\ndefault_role: none\n");
    let server = oidc_server(dir.path(), &issuer.issuer(), Some(&issuer), &config).await;
    issuer.set_user(FakeUser::new("erin@example.com", &["sluice-editors"]));
    refused(&sign_in(&server.base).await, 403, "forbidden", "erin@example.com is not a user of this tenant");
    let (status, body) = server.api().post("/v1/users", &json!({"email": "erin@example.com", "role": "viewer"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, erin) = sign_in(&server.base).await;
    assert_eq!((status, erin["role"].as_str(), erin["created"].as_bool()), (200, Some("viewer"), Some(false)));
    let token = issuer.received().into_iter().rfind(|r| r.path == "/token").unwrap();
    assert_eq!(token.client_auth, "post");
    assert_eq!(token.params["client_secret"], SECRET);

    // An issuer that nobody answers at: the server starts, and a login is a 502 that names no
    // internals.
    let dir = TempDir::new("oidc-unreachable");
    let nobody = format!("http://127.0.0.1:{}", sluice_testkit::free_port());
    let server = oidc_server(dir.path(), &nobody, None, "").await;
    let (status, body) = get_json(&browser(), &format!("{}/v1/auth/oidc/login", server.base)).await;
    refused(&(status, body.clone()), 502, "identity_provider_failed", "could not be reached");
    assert!(!body.to_string().contains("127.0.0.1"), "{body}");
    assert!(server.log_text().contains("cannot be reached"), "the cause is logged");

    // Without --oidc both routes say so.
    let dir = TempDir::new("oidc-off");
    let plain = ServerProcess::start(&bin(), dir.path()).await;
    for path in ["/v1/auth/oidc/login", "/v1/auth/oidc/callback?code=x&state=y"] {
        refused(
            &get_json(&browser(), &format!("{}{path}", plain.base)).await,
            404,
            "oidc_not_configured",
            "--oidc FILE",
        );
    }
}
