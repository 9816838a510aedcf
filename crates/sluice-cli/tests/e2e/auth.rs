//! Authentication, roles, tenants, rate limits and the audit log against a real `sluice serve`:
//! every operation of the OpenAPI document is tried without credentials, with each role, and with
//! another tenant's key.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::{bin, Api, ServerProcess, TempDir};

/// Operations that need no credentials.
const PUBLIC: &[&str] = &[
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/v1/schemas/workflow",
    "/v1/auth/login",
    "/v1/auth/oidc/login",
    "/v1/auth/oidc/callback",
];

/// What each role may do, written out here independently of the server's table.
fn allowed(role: &str, method: &str, path: &str) -> bool {
    let manage =
        path.starts_with("/v1/users") || path.starts_with("/v1/api-keys") || path == "/v1/audit" || path == "/metrics";
    let work = path.starts_with("/v1/tasks/");
    let whoami = path == "/v1/auth/whoami";
    let read = method == "GET" && !manage && !work;
    let operate = path == "/v1/executions"
        || path.ends_with("/cancel")
        || path.contains("/signals/")
        || path.ends_with("/redrive");
    let publish = path == "/v1/workflows" || path.ends_with("/sharing");
    let gateway = path == "/v1/chat/completions";
    match role {
        "owner" | "admin" => true,
        "editor" => whoami || read || operate || publish || gateway,
        "viewer" => whoami || read,
        "worker" => whoami || work,
        _ => false,
    }
}

/// Every `(method, path template)` of the OpenAPI document the server serves.
async fn operations(api: &Api) -> Vec<(String, String)> {
    let (status, doc) = Api::new(&api.base).get("/openapi.json").await;
    assert_eq!(status, 200);
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase(), path.clone()));
        }
    }
    assert!(ops.len() >= 30, "{ops:?}");
    ops
}

fn fill(template: &str, values: &BTreeMap<&str, &str>) -> String {
    let mut path = template.to_string();
    for (k, v) in values {
        path = path.replace(&format!("{{{k}}}"), v);
    }
    assert!(!path.contains('{'), "unfilled parameter in {path}");
    path
}

async fn call(api: &Api, method: &str, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = api.request(m, path);
    if method != "GET" && method != "DELETE" {
        req = req.json(&json!({}));
    }
    // The long poll would wait for work; the matrix is about who may poll, not about waiting.
    if path == "/v1/tasks/poll" {
        req = req.json(&json!({"queue": "matrix", "wait_ms": 0}));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap(), headers)
}

async fn key(owner: &Api, role: &str) -> String {
    let (status, body) = owner.post("/v1/api-keys", &json!({"name": format!("{role} key"), "role": role})).await;
    assert_eq!(status, 201, "{body}");
    body["key"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_checks_credentials_roles_and_tenants() {
    let dir = TempDir::new("auth-matrix");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = server.api();
    let database = server.database.clone();
    let other_key = sluice_testkit::admin_init(&bin(), dir.path(), &database, "globex");
    let other = Api::with_key(&server.base, Some(&other_key));

    // The default tenant's data, with a marker that must never reach the other tenant.
    let secret = "secret-of-default-7f3a";
    owner
        .publish(&json!({"name": "private-flow", "description": secret, "steps": [
            {"id": "work", "type": "task", "queue": "default-queue", "input": ".input"}
        ]}))
        .await;
    owner.start("private-flow", json!({"marker": secret}), Some("wf-default")).await;

    let ops = operations(&owner).await;
    let missing: BTreeMap<&str, &str> = [
        ("name", "no-such-name"),
        ("version", "no-such-version"),
        ("workflow_id", "no-such-execution"),
        ("email", "nobody@example.com"),
        ("id", "0123456789abcdef"),
    ]
    .into();

    // 1. No credentials, and made-up ones: 401 everywhere but the public operations.
    let anonymous = Api::new(&server.base);
    let forged = Api::with_key(&server.base, Some(&format!("slk_0123456789abcdef_{}", "0".repeat(64))));
    for (method, template) in &ops {
        let path = fill(template, &missing);
        let (status, body, headers) = call(&anonymous, method, &path).await;
        if PUBLIC.contains(&template.as_str()) {
            assert_ne!(status, 401, "{method} {path} is public: {body}");
            continue;
        }
        assert_eq!(status, 401, "{method} {path} without credentials: {body}");
        assert!(body.contains("\"unauthenticated\""), "{body}");
        assert!(headers.get("www-authenticate").is_some(), "{method} {path}");
        let (status, body, _) = call(&forged, method, &path).await;
        assert_eq!(status, 401, "{method} {path} with a made-up key: {body}");
    }

    // 2. Each role: 403 exactly where the role lacks the right, never 401.
    for role in ["admin", "editor", "viewer", "worker"] {
        let api = Api::with_key(&server.base, Some(&key(&owner, role).await));
        for (method, template) in &ops {
            if PUBLIC.contains(&template.as_str()) {
                continue;
            }
            let path = fill(template, &missing);
            let (status, body, _) = call(&api, method, &path).await;
            assert_ne!(status, 401, "{role}: {method} {path}: {body}");
            if allowed(role, method, template) {
                assert_ne!(status, 403, "{role} may {method} {template}: {body}");
            } else {
                assert_eq!(status, 403, "{role} may not {method} {template}: {body}");
                assert!(body.contains("\"forbidden\"") && body.contains(role), "{body}");
            }
        }
    }

    // 3. Another tenant's ids: 404, and no answer carries the default tenant's data.
    let theirs: BTreeMap<&str, &str> = [
        ("name", "private-flow"),
        ("version", "no-such-version"),
        ("workflow_id", "wf-default"),
        ("email", "nobody@example.com"),
        ("id", "0123456789abcdef"),
    ]
    .into();
    for (method, template) in &ops {
        if PUBLIC.contains(&template.as_str()) || template == "/v1/tasks/poll" {
            continue;
        }
        let path = fill(template, &theirs);
        let (status, body, _) = call(&other, method, &path).await;
        assert!(!body.contains(secret), "{method} {path} leaked the other tenant's data: {body}");
        if template.contains("{workflow_id}") || template.contains("{name}") {
            assert_eq!(status, 404, "{method} {path} across tenants: {body}");
        }
    }
    // A task token of the default tenant does not work for the other one.
    let worker = Api::with_key(&server.base, Some(&key(&owner, "worker").await));
    let (status, polled) = worker.post("/v1/tasks/poll", &json!({"queue": "default-queue", "wait_ms": 5000})).await;
    assert_eq!(status, 200, "{polled}");
    let token = polled["tasks"][0]["task_token"].as_str().expect("a task of the default tenant").to_string();
    let (status, body) = other.post("/v1/tasks/complete", &json!({"task_token": token, "output": 1})).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = worker.post("/v1/tasks/complete", &json!({"task_token": token, "output": 1})).await;
    assert_eq!(status, 200, "{body}");
    // Listings are the caller's own.
    let (_, listed) = other.get("/v1/executions").await;
    assert_eq!(listed["executions"].as_array().unwrap().len(), 0, "{listed}");
    let (_, flows) = other.get("/v1/workflows").await;
    assert!(!flows.to_string().contains("private-flow"), "{flows}");
    let (_, mine) = owner.get("/v1/executions").await;
    assert_eq!(mine["executions"].as_array().unwrap().len(), 1);

    // 4. The audit log saw the changes, with who and from where, and only the tenant's own.
    let (status, audit) = owner.get("/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    let started = entries.iter().find(|e| e["action"] == "POST /v1/executions" && e["status"] == 201).unwrap();
    assert!(started["actor"].as_str().unwrap().starts_with("key:"), "{started}");
    assert_eq!(started["source_ip"], "127.0.0.1");
    assert!(entries.iter().any(|e| e["status"] == 403 && e["role"] == "viewer"), "refusals are audited");
    assert!(entries.iter().all(|e| e["tenant"] == "default"));
    let (_, theirs) = other.get("/v1/audit?limit=500").await;
    assert!(theirs["entries"].as_array().unwrap().iter().all(|e| e["tenant"] == "globex"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_log_in_keys_are_revoked_and_quotas_hold() {
    let dir = TempDir::new("auth-limits");
    let db = dir.path().join("sluice.db").display().to_string();
    let server = ServerProcess::start_with_args(
        &bin(),
        dir.path(),
        &db,
        &["--rate-limit-per-user", "100/hour", "--rate-limit-global", "150/hour"],
    )
    .await;
    let owner = server.api();

    // A user logs in with a password; the session token works like a key.
    let (status, body) = owner
        .post("/v1/users", &json!({"email": "ada@example.com", "password": "correct horse battery", "role": "editor"}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.to_string().contains("argon2"), "the hash is never shown: {body}");
    let anonymous = Api::new(&server.base);
    let (status, body) = anonymous
        .post(
            "/v1/auth/login",
            &json!({"tenant": "default", "email": "ada@example.com", "password": "wrong password!"}),
        )
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_credentials")), "{body}");
    let (status, login) = anonymous
        .post(
            "/v1/auth/login",
            &json!({"tenant": "default", "email": "ada@example.com", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let ada = Api::with_key(&server.base, login["token"].as_str());
    let (status, me) = ada.get("/v1/auth/whoami").await;
    assert_eq!(
        (status, me["role"].as_str(), me["actor"]["id"].as_str()),
        (200, Some("editor"), Some("ada@example.com"))
    );

    // 100 requests an hour for the user: the 101st is refused with a Retry-After of 36 s.
    for i in 1..100 {
        let r = ada.request(reqwest::Method::GET, "/v1/workflows").send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "request {}", i + 1);
        if i == 1 {
            assert_eq!(r.headers()["ratelimit-limit"], "100");
            assert_eq!(r.headers()["ratelimit-policy"], "100;w=3600");
        }
    }
    let r = ada.request(reqwest::Method::GET, "/v1/workflows").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((35..=36).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["details"]["scope"].as_str()),
        (Some("rate_limited"), Some("user"))
    );

    // The global limit (150 an hour) holds across callers: the owner's key gets the rest.
    let mut ok = 0;
    let mut refused = None;
    for _ in 0..100 {
        let r = owner.request(reqwest::Method::GET, "/v1/workflows").send().await.unwrap();
        if r.status().as_u16() == 429 {
            refused = Some(r.json::<Value>().await.unwrap());
            break;
        }
        ok += 1;
    }
    // 100 + 1 (whoami) user requests plus the owner's user creation took global quota first.
    assert!((40..=50).contains(&ok), "{ok} owner requests passed before the global limit");
    assert_eq!(refused.unwrap()["error"]["details"]["scope"], "global");

    // A revoked key stops working at once.
    let fresh = ServerProcess::start(&bin(), TempDir::new("auth-revoke").path()).await;
    let root = fresh.api();
    let (_, made) = root.post("/v1/api-keys", &json!({"name": "ci", "role": "viewer"})).await;
    let ci = Api::with_key(&fresh.base, made["key"].as_str());
    assert_eq!(ci.get("/v1/workflows").await.0, 200);
    let id = made["api_key"]["id"].as_str().unwrap();
    let (_, listed) = root.get("/v1/api-keys").await;
    let shown = listed["api_keys"].as_array().unwrap().iter().find(|k| k["id"] == id).unwrap().clone();
    assert!(shown.get("key").is_none() && !listed.to_string().contains(made["key"].as_str().unwrap()));
    let r = root.request(reqwest::Method::DELETE, &format!("/v1/api-keys/{id}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (status, body) = ci.get("/v1/workflows").await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn serve_refuses_to_start_without_credentials_unless_told_to() {
    let dir = TempDir::new("auth-refuse");
    let db = dir.path().join("sluice.db");
    let out = std::process::Command::new(bin())
        .args(["serve", "--port", "0", "--database"])
        .arg(&db)
        .env_remove("SLUICE_INSECURE_NO_AUTH")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sluice admin init") && err.contains("--insecure-no-auth"), "{err}");

    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &db.display().to_string(), &["--insecure-no-auth"]).await;
    let (status, me) = Api::new(&server.base).get("/v1/auth/whoami").await;
    assert_eq!((status, me["role"].as_str(), me["tenant"].as_str()), (200, Some("owner"), Some("default")));
    assert!(server.log_text().contains("AUTHENTICATION IS OFF"), "the insecure mode is logged loudly");
}

async fn login(api: &Api, tenant: &str, email: &str, password: &str) -> (u16, Value) {
    api.post("/v1/auth/login", &json!({"tenant": tenant, "email": email, "password": password})).await
}

/// Issue 13, item 8: the login limiter counted attempts per email alone, so failed logins naming
/// a tenant that does not exist (or another tenant) locked the real user out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_are_counted_per_tenant_and_account() {
    let dir = TempDir::new("auth-login-buckets");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = server.api();
    let other_key = sluice_testkit::admin_init(&bin(), dir.path(), &server.database, "globex");
    let other = Api::with_key(&server.base, Some(&other_key));
    let user = json!({"email": "ada@example.com", "password": "correct horse battery", "role": "editor"});
    assert_eq!(owner.post("/v1/users", &user).await.0, 201);
    assert_eq!(other.post("/v1/users", &user).await.0, 201);
    let anonymous = Api::new(&server.base);

    // Ten wrong guesses against a tenant that does not exist touch no real account.
    for _ in 0..10 {
        let (status, body) = login(&anonymous, "no-such-tenant", "ada@example.com", "guess guess guess").await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, body) = login(&anonymous, "no-such-tenant", "ada@example.com", "guess guess guess").await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    let (status, body) = login(&anonymous, "default", "ada@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "the real user is not locked out: {body}");

    // Ten against ada of globex lock out that account only.
    for _ in 0..10 {
        assert_eq!(login(&anonymous, "globex", "ada@example.com", "guess guess guess").await.0, 401);
    }
    assert_eq!(login(&anonymous, "globex", "ada@example.com", "correct horse battery").await.0, 429);
    let (status, body) = login(&anonymous, "default", "ADA@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "{body}");
}

/// Issue 13, item 11: any anonymous caller could add rows with an actor of their choosing to any
/// tenant's audit log (even one that did not exist yet), and login rows had no address or trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_logins_of_real_accounts_reach_a_tenants_audit_log() {
    let dir = TempDir::new("auth-login-audit");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = server.api();
    let user = json!({"email": "ada@example.com", "password": "correct horse battery", "role": "editor"});
    assert_eq!(owner.post("/v1/users", &user).await.0, 201);
    let anonymous = Api::new(&server.base);
    let attempt = |tenant: &str, email: &str, password: &str, trace: &str| {
        anonymous
            .request(reqwest::Method::POST, "/v1/auth/login")
            .header("x-trace-id", trace)
            .json(&json!({"tenant": tenant, "email": email, "password": password}))
            .send()
    };
    let trace = |n: u8| format!("{n:032x}");
    // A tenant that does not exist (yet), and an email that names no user of a real tenant.
    assert_eq!(attempt("ghost", "user:root@ghost", "whatever it is", &trace(1)).await.unwrap().status(), 401);
    assert_eq!(attempt("default", "forged actor text", "whatever it is", &trace(2)).await.unwrap().status(), 401);
    // The real user: a wrong password, then the right one.
    assert_eq!(attempt("default", "ada@example.com", "wrong password!", &trace(3)).await.unwrap().status(), 401);
    assert_eq!(attempt("default", "ADA@example.com", "correct horse battery", &trace(4)).await.unwrap().status(), 200);

    let (status, audit) = owner.get("/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{audit}");
    let mut logins: Vec<&Value> =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "auth.login").collect();
    logins.sort_by_key(|e| e["id"].as_str().unwrap().to_string());
    assert_eq!(logins.len(), 2, "only the real account's logins: {logins:?}");
    for (row, (status, role, n)) in logins.iter().zip([(401, Value::Null, 3), (200, json!("editor"), 4)]) {
        assert_eq!(row["actor"], "user:ada@example.com", "{row}");
        assert_eq!((row["status"].as_u64(), &row["role"]), (Some(status), &role), "{row}");
        assert_eq!(row["source_ip"], "127.0.0.1", "{row}");
        assert_eq!(row["trace_id"], trace(n), "{row}");
    }
    // The tenant made afterwards starts with an empty log.
    let ghost_key = sluice_testkit::admin_init(&bin(), dir.path(), &server.database, "ghost");
    let (_, audit) = Api::with_key(&server.base, Some(&ghost_key)).get("/v1/audit?limit=500").await;
    assert!(audit["entries"].as_array().unwrap().is_empty(), "{audit}");
    // The others are in the server's log, with the address.
    let log = server.log_lines();
    let warned = |message: &str| log.iter().any(|l| l["message"] == message && l["source_ip"] == "127.0.0.1");
    assert!(warned("failed login: no such tenant"), "{}", server.log_text());
    assert!(warned("failed login: no such user in the tenant"), "{}", server.log_text());
}

/// Issue 13, item 19: the server key that seals the session signing keys is made beside a SQLite
/// database (owner-only), must be given for PostgreSQL, and a wrong one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_key_is_made_beside_the_database_and_must_match() {
    let dir = TempDir::new("auth-server-key");
    let db = dir.path().join("sluice.db");
    let key_file = dir.path().join("sluice.db.key");
    let key = sluice_testkit::admin_init(&bin(), dir.path(), &db.display().to_string(), "default");
    let text = std::fs::read_to_string(&key_file).expect("admin init made the key file beside the database");
    assert_eq!(text.trim().len(), 64, "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // The server finds the same key, and sessions outlive a restart.
    let mut server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = Api::with_key(&server.base, Some(&key));
    let user = json!({"email": "ada@example.com", "password": "correct horse battery", "role": "editor"});
    assert_eq!(owner.post("/v1/users", &user).await.0, 201);
    let (status, login) = login(&Api::new(&server.base), "default", "ada@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "{login}");
    server.restart().await;
    let ada = Api::with_key(&server.base, login["token"].as_str());
    assert_eq!(ada.get("/v1/auth/whoami").await.0, 200);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text, "the key file is kept");
    drop(server);

    let serve = |envs: &[(&str, &str)], database: &str| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["serve", "--port", "0", "--database", database])
            .env_remove("SLUICE_SECRET_KEY")
            .env_remove("SLUICE_SECRET_KEY_FILE")
            .env_remove("SLUICE_INSECURE_NO_AUTH");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // Another key for this database is refused.
    let other = "11".repeat(32);
    let out = serve(&[("SLUICE_SECRET_KEY", &other)], &db.display().to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not the one this database was set up with"), "{err}");
    // PostgreSQL keeps no file beside it: the key must be given.
    let out = serve(&[], "postgres://sluice@127.0.0.1:1/none");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--secret-key-file"), "{err}");
}

/// Issue 13, item 20: look-alike emails and hidden characters, over HTTP: a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_identifiers_are_refused_or_merged() {
    let dir = TempDir::new("auth-look-alikes");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let owner = server.api();
    let user = |email: &str| json!({"email": email, "password": "correct horse battery", "role": "viewer"});
    let (status, made) = owner.post("/v1/users", &user("ＡＤＡ@example.com")).await;
    assert_eq!((status, made["user"]["email"].as_str()), (201, Some("ada@example.com")), "{made}");
    assert_eq!(owner.post("/v1/users", &user("ada@example.com")).await.0, 409, "the same user");
    for (path, body, field) in [
        ("/v1/users", user("moc.elpmaxe@\u{202E}eve"), "email"),
        ("/v1/users", user("eve\u{200F}@example.com"), "email"),
        ("/v1/api-keys", json!({"name": "ci\u{2067}", "role": "viewer"}), "name"),
    ] {
        let (status, body) = owner.post(path, &body).await;
        assert_eq!((status, body["error"]["details"]["field"].as_str()), (400, Some(field)), "{body}");
    }
    let (status, login) =
        login(&Api::new(&server.base), "default", "ａｄａ@ＥＸＡＭＰＬＥ.com", "correct horse battery").await;
    assert_eq!(status, 200, "{login}");
    let r = owner.request(reqwest::Method::DELETE, "/v1/users/%EF%BC%A1DA@example.com").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], "ada@example.com");
}
