//! `sluice serve` over HTTPS with mutual TLS: readiness over TLS, who gets in, a renewed
//! certificate served without a restart with its expiry in `/metrics`, and the flags' errors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::pki::{Ca, Leaf};

use crate::{bin, ServerProcess, TempDir};

/// A client that trusts only `ca`, presents `identity` if any, and keeps no idle connections (so
/// each request makes a new handshake).
fn https_client(ca: &Ca, identity: Option<&Leaf>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    if let Some(leaf) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(leaf.identity_pem().as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// The certificate the server presented on a new connection, with the answer's status.
async fn served(client: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    let resp = client.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    let cert = resp.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).unwrap().to_vec();
    (resp.status().as_u16(), cert)
}

/// The value of an unlabelled series in Prometheus text.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics`, read with the owner key (the metrics need an owner or admin).
async fn metrics(server: &ServerProcess) -> String {
    server.api().metrics().await
}

#[tokio::test]
async fn serve_with_mutual_tls_admits_only_clients_of_the_ca_and_reloads_its_certificate() {
    let dir = TempDir::new("e2e-tls");
    let ca = Ca::new("sluice e2e CA");
    let first = ca.server((2030, 1, 1));
    let (cert, key, client_ca) =
        (dir.path().join("server.pem"), dir.path().join("server.key"), dir.path().join("clients-ca.pem"));
    first.install(&cert, &key);
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let worker = https_client(&ca, Some(&ca.client("worker-1")));
    let db = dir.path().join("sluice.db").display().to_string();
    let paths = [&cert, &key, &client_ca].map(|p| p.display().to_string());
    let args = [
        "--tls-cert",
        &paths[0],
        "--tls-key",
        &paths[1],
        "--tls-client-ca",
        &paths[2],
        "--tls-client-auth",
        "required",
        "--tls-reload-interval",
        "100ms",
    ];
    let server = ServerProcess::start_https(&bin(), dir.path(), &db, &args, worker.clone()).await;
    assert!(server.base.starts_with("https://"));
    let url = format!("\"url\":\"https://127.0.0.1:{}\"", server.port);
    assert!(server.log_text().contains(&url), "the log does not say {url}: {}", server.log_text());

    let (status, body) = server.api().get("/readyz").await;
    assert_eq!((status, &body["status"]), (200, &serde_json::json!("ready")), "{body}");
    let readyz = format!("{}/readyz", server.base);
    assert_eq!(served(&worker, &readyz).await, (200, first.der.clone()));

    // Without a client certificate, or with one from another CA, there is no answer at all.
    let stranger = Ca::new("another CA").client("worker-1");
    for (who, client) in
        [("no certificate", https_client(&ca, None)), ("another CA", https_client(&ca, Some(&stranger)))]
    {
        let result = client.get(&readyz).send().await;
        assert!(result.is_err(), "a client with {who} got {:?}", result.map(|r| r.status()));
    }
    // Nor over plain HTTP.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{}/readyz", server.port)).send().await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|r| r.status() != 200), "{plain:?}");

    let text = metrics(&server).await;
    assert_eq!(series(&text, "sluice_tls_certificate_expiry_timestamp_seconds"), Some(1_893_456_000.0), "{text}");
    assert_eq!(series(&text, "sluice_tls_certificate_reloads_total"), Some(0.0), "{text}");
    assert!(series(&text, "sluice_tls_handshake_failures_total").is_some_and(|n| n >= 2.0), "{text}");

    // A renewed certificate replaces the files: new connections get it, the process stays.
    let renewed = ca.server((2032, 6, 1));
    renewed.install(&cert, &key);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, cert) = served(&worker, &readyz).await;
        assert_eq!(status, 200);
        if cert == renewed.der {
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate was not served within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics(&server).await;
    assert_eq!(series(&text, "sluice_tls_certificate_expiry_timestamp_seconds"), Some(1_969_660_800.0), "{text}");
    assert_eq!(series(&text, "sluice_tls_certificate_reloads_total"), Some(1.0), "{text}");
    assert!(server.log_text().contains("tls certificate reloaded"), "{}", server.log_text());
}

/// Runs `sluice serve` with `args`, which must make it stop by itself, and returns its exit code
/// and stderr.
fn serve_fails(dir: &Path, args: &[&str]) -> (i32, String) {
    let db = dir.join("sluice.db").display().to_string();
    let log = dir.join("stderr.txt");
    let mut child = Command::new(bin())
        .args(["serve", "--port", "0", "--database", &db])
        .args(args)
        .env_remove("SLUICE_TLS_CERT")
        .env_remove("SLUICE_TLS_KEY")
        .env_remove("SLUICE_TLS_CLIENT_CA")
        .env_remove("SLUICE_TLS_CLIENT_AUTH")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice serve {args:?} is still running: {}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), std::fs::read_to_string(&log).unwrap())
}

#[test]
fn tls_flags_that_cannot_work_are_refused_with_the_reason() {
    let dir = TempDir::new("e2e-tls-flags");
    let ca = Ca::new("sluice e2e CA");
    let leaf = ca.server((2030, 1, 1));
    let (cert, key, garbage) = (dir.path().join("s.pem"), dir.path().join("s.key"), dir.path().join("garbage.pem"));
    leaf.install(&cert, &key);
    std::fs::write(&garbage, "not PEM\n").unwrap();
    let [cert, key, garbage] = [&cert, &key, &garbage].map(|p| p.display().to_string());
    let missing = dir.path().join("missing.pem").display().to_string();
    let cases: &[(&[&str], i32, String)] = &[
        (&["--tls-key", &key], 2, "--tls-key needs --tls-cert".into()),
        (&["--tls-cert", &cert], 2, "--tls-cert needs --tls-key".into()),
        (&["--tls-client-ca", &cert], 2, "--tls-client-ca needs --tls-cert".into()),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-auth", "required"],
            2,
            "--tls-client-auth required needs --tls-client-ca".into(),
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &cert, "--tls-client-auth", "none"],
            2,
            "--tls-client-ca is given with --tls-client-auth none".into(),
        ),
        (&["--tls-client-auth", "sometimes"], 2, "unknown client auth mode `sometimes`".into()),
        (
            &["--tls-cert", &missing, "--tls-key", &key],
            1,
            format!("error: cannot read the certificate file {missing}: "),
        ),
        (
            &["--tls-cert", &garbage, "--tls-key", &key],
            1,
            format!("error: the certificate file {garbage} is not usable: no certificate in it"),
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &cert],
            1,
            format!("error: the private key file {cert} is not usable: no private key in it"),
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &garbage],
            1,
            format!("error: the client CA file {garbage} is not usable: no certificate in it"),
        ),
    ];
    for (args, code, expect) in cases {
        let (got_code, stderr) = serve_fails(dir.path(), args);
        assert!(stderr.contains(expect.as_str()), "{args:?}\n  expected: {expect}\n  got: {stderr}");
        assert_eq!(got_code, *code, "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_client_certificate_bound_to_a_key_authenticates_as_that_key() {
    let dir = TempDir::new("e2e-tls-identity");
    let ca = Ca::new("sluice identity CA");
    let (cert, key, client_ca) =
        (dir.path().join("server.pem"), dir.path().join("server.key"), dir.path().join("clients-ca.pem"));
    ca.server((2030, 1, 1)).install(&cert, &key);
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let paths = [&cert, &key, &client_ca].map(|p| p.display().to_string());
    let args = ["--tls-cert", &paths[0], "--tls-key", &paths[1], "--tls-client-ca", &paths[2]];
    let db = dir.path().join("sluice.db").display().to_string();
    let ops = https_client(&ca, Some(&ca.client("ops")));
    let server = ServerProcess::start_https(&bin(), dir.path(), &db, &args, ops).await;
    let owner = server.api();

    let (bound, other) = (ca.client("worker-1"), ca.client("worker-2"));
    let owner_key = server.key.clone().unwrap();
    let bind = |client: reqwest::Client, bearer: String, fingerprint: String| {
        let url = format!("{}/v1/api-keys", server.base);
        async move {
            let body = serde_json::json!({"name": "worker-1", "role": "worker", "client_cert_sha256": fingerprint});
            let r = client.post(url).bearer_auth(bearer).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // Issue 13, item 9: a binding proves possession. The owner's connection presents another
    // certificate (`ops`): refused, and so is another tenant binding a certificate it does not hold.
    let (status, body) = owner
        .post(
            "/v1/api-keys",
            &serde_json::json!({"name": "worker-1", "role": "worker", "client_cert_sha256": bound.fingerprint()}),
        )
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let globex = sluice_testkit::admin_init(&bin(), dir.path(), &db, "globex");
    let (status, body) = bind(https_client(&ca, Some(&other)), globex.clone(), bound.fingerprint()).await;
    assert_eq!(status, 403, "{body}");
    // Over a connection that presents it, the owner binds it.
    let (status, made) = bind(https_client(&ca, Some(&bound)), owner_key.clone(), bound.fingerprint()).await;
    assert_eq!(status, 201, "{made}");
    let (id, secret) = (made["api_key"]["id"].as_str().unwrap(), made["key"].as_str().unwrap());
    assert_eq!(made["api_key"]["client_cert_sha256"], bound.fingerprint().as_str());

    let whoami = |client: reqwest::Client, bearer: Option<&str>| {
        let (url, bearer) = (format!("{}/v1/auth/whoami", server.base), bearer.map(str::to_string));
        async move {
            let mut req = client.get(url);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // The bound certificate alone is the key's identity, with the key's role.
    let (status, me) = whoami(https_client(&ca, Some(&bound)), None).await;
    assert_eq!((status, me["role"].as_str(), me["actor"]["id"].as_str()), (200, Some("worker"), Some(id)), "{me}");
    let r = https_client(&ca, Some(&bound)).get(format!("{}/v1/workflows", server.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "a worker's certificate cannot read workflows");
    // Another certificate of the same CA is no one, and cannot use the bound key either.
    let (status, body) = whoami(https_client(&ca, Some(&other)), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = whoami(https_client(&ca, Some(&other)), Some(secret)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("bound to a client certificate"), "{body}");
    assert_eq!(whoami(https_client(&ca, Some(&bound)), Some(secret)).await.0, 200);
    // Revoking the key ends the certificate's access too, and frees it to be bound again.
    let r = owner.request(reqwest::Method::DELETE, &format!("/v1/api-keys/{id}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(whoami(https_client(&ca, Some(&bound)), None).await.0, 401);
    let (status, made) = bind(https_client(&ca, Some(&bound)), owner_key, bound.fingerprint()).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(whoami(https_client(&ca, Some(&bound)), None).await.1["actor"]["id"], made["api_key"]["id"]);

    // An operator binds on the database, without the certificate.
    let out = std::process::Command::new(bin())
        .args(["admin", "key", "--database", &db, "--tenant", "globex", "--name", "w2", "--client-cert-sha256"])
        .arg(other.fingerprint())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, me) = whoami(https_client(&ca, Some(&other)), None).await;
    assert_eq!((status, me["tenant"].as_str(), me["role"].as_str()), (200, Some("globex"), Some("worker")), "{me}");
}
