//! TLS and mutual TLS over real sockets: who may connect in each client auth mode, what handlers
//! learn about the peer, certificate files replaced on disk, and handshakes that stall.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Json, Router};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use sluice_server::tls::{self, ClientAuth, Tls, TlsOptions};
use sluice_server::Peer;
use sluice_testkit::pki::{self, Ca, Leaf};
use sluice_testkit::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// Answers with what the server knows about the connection.
async fn whoami(ConnectInfo(peer): ConnectInfo<Peer>) -> Json<Value> {
    let cert = peer.client_cert.as_deref();
    Json(json!({
        "addr": peer.addr.to_string(),
        "cn": cert.and_then(|c| c.subject_cn.clone()),
        "dns_sans": cert.map(|c| c.dns_sans.clone()),
        "fingerprint": cert.map(|c| c.fingerprint_sha256.clone()),
        "not_after": cert.map(|c| c.not_after_unix),
    }))
}

fn app() -> Router {
    Router::new().route("/whoami", get(whoami))
}

/// A CA, a server certificate it signed (valid until 2030) and the files a server reads.
struct Files {
    dir: TempDir,
    ca: Ca,
    server: Leaf,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        let ca = Ca::new("sluice test CA");
        let server = ca.server((2030, 1, 1));
        let (cert, key, client_ca) =
            (dir.path().join("server.pem"), dir.path().join("server.key"), dir.path().join("client-ca.pem"));
        server.install(&cert, &key);
        std::fs::write(&client_ca, ca.pem()).unwrap();
        Self { dir, ca, server, cert, key, client_ca }
    }

    fn options(&self, client_auth: ClientAuth) -> TlsOptions {
        TlsOptions {
            client_ca: Some(self.client_ca.clone()),
            client_auth,
            reload_interval: Duration::from_millis(50),
            ..TlsOptions::new(&self.cert, &self.key)
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A server on a free port of 127.0.0.1, stopped when dropped.
struct Server {
    addr: SocketAddr,
    tls: Tls,
    _stop: oneshot::Sender<()>,
}

async fn start(options: TlsOptions) -> Server {
    let tls = Tls::load(options).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(tls::serve(listener, app(), tls.clone(), async move {
        let _ = stopped.await;
    }));
    Server { addr, tls, _stop: stop }
}

/// A client that trusts `ca` and presents `identity`, if any.
fn client(ca: &Ca, identity: Option<&Leaf>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.der.clone())],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// What one request on a fresh connection saw.
#[derive(Debug)]
struct Answer {
    /// The client's end of the connection.
    local: SocketAddr,
    /// The certificate the server presented.
    served: Vec<u8>,
    status: u16,
    body: Value,
}

/// `GET path` on a new TLS connection, or the error that ended it.
async fn request(addr: SocketAddr, connector: &TlsConnector, path: &str) -> std::io::Result<Answer> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let local = tcp.local_addr()?;
        let mut stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
        let served = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let head = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let (status, body) = parse_http(&raw);
        Ok(Answer { local, served, status, body })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("the exchange hung")
}

fn parse_http(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

/// Waits up to 5 s for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that the server ended the connection with a TLS alert naming `alert`.
fn assert_refused(result: std::io::Result<Answer>, alert: &str) {
    match result {
        Ok(answer) => panic!("expected the handshake to fail with {alert}, got {answer:?}"),
        Err(e) => assert!(e.to_string().contains(&format!("received fatal alert: {alert}")), "{e}"),
    }
}

#[tokio::test]
async fn required_mode_refuses_clients_without_a_certificate_of_the_ca() {
    let files = Files::new("tls-required");
    let server = start(files.options(ClientAuth::Required)).await;
    assert_refused(request(server.addr, &client(&files.ca, None), "/whoami").await, "CertificateRequired");
    let stranger = Ca::new("another CA").client("worker-7");
    assert_refused(request(server.addr, &client(&files.ca, Some(&stranger)), "/whoami").await, "UnknownCA");
    // The client may read the alert before the server's handshake task has counted it.
    eventually("two failed handshakes counted", || server.tls.handshake_failures() == 2).await;
}

#[tokio::test]
async fn required_mode_gives_handlers_the_client_identity() {
    let files = Files::new("tls-identity");
    let server = start(files.options(ClientAuth::Required)).await;
    let worker = files.ca.client("worker-7");
    let answer = request(server.addr, &client(&files.ca, Some(&worker)), "/whoami").await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.served, files.server.der);
    let b = &answer.body;
    assert_eq!(b["addr"], answer.local.to_string());
    assert_eq!(b["cn"], "worker-7");
    assert_eq!(b["dns_sans"], json!(["worker-7.clients.test"]));
    assert_eq!(b["fingerprint"], worker.fingerprint());
    // rcgen's default end of validity: 4096-01-01.
    assert_eq!(b["not_after"], 67_090_118_400i64);
}

#[tokio::test]
async fn optional_mode_accepts_clients_with_and_without_a_certificate() {
    let files = Files::new("tls-optional");
    let server = start(files.options(ClientAuth::Optional)).await;
    let anonymous = request(server.addr, &client(&files.ca, None), "/whoami").await.unwrap();
    assert_eq!((anonymous.status, &anonymous.body["fingerprint"]), (200, &Value::Null), "{anonymous:?}");
    assert_eq!(anonymous.body["addr"], anonymous.local.to_string());
    let worker = files.ca.client("worker-8");
    let known = request(server.addr, &client(&files.ca, Some(&worker)), "/whoami").await.unwrap();
    assert_eq!((known.status, &known.body["cn"]), (200, &json!("worker-8")), "{known:?}");
    assert_eq!(known.body["fingerprint"], worker.fingerprint());
    // A certificate that is presented must still be one the CA signed.
    let stranger = Ca::new("another CA").client("worker-8");
    assert_refused(request(server.addr, &client(&files.ca, Some(&stranger)), "/whoami").await, "UnknownCA");
}

#[tokio::test]
async fn without_client_auth_certificates_are_not_asked_for() {
    let files = Files::new("tls-none");
    let server = start(TlsOptions::new(&files.cert, &files.key)).await;
    let worker = files.ca.client("worker-9");
    for identity in [None, Some(&worker)] {
        let answer = request(server.addr, &client(&files.ca, identity), "/whoami").await.unwrap();
        assert_eq!((answer.status, &answer.body["cn"]), (200, &Value::Null), "{answer:?}");
    }
}

#[tokio::test]
async fn plain_tcp_gives_handlers_the_same_peer_without_a_certificate() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sluice_server::serve_router(listener, app(), async move {
        let _ = stopped.await;
    }));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(b"GET /whoami HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let (status, body) = parse_http(&raw);
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"addr": local.to_string(), "cn": null, "dns_sans": null, "fingerprint": null, "not_after": null})
    );
}

#[tokio::test]
async fn replaced_files_reach_new_connections_without_a_restart() {
    let files = Files::new("tls-reload");
    let server = start(files.options(ClientAuth::Required)).await;
    let connector = client(&files.ca, Some(&files.ca.client("worker-7")));
    let first = request(server.addr, &connector, "/whoami").await.unwrap();
    assert_eq!(first.served, files.server.der);
    // date -u -d 2030-01-01 +%s
    assert_eq!(server.tls.not_after_unix(), 1_893_456_000);
    assert_eq!(server.tls.reloads(), 0);

    let renewed = files.ca.server((2032, 6, 1));
    renewed.install(&files.cert, &files.key);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = request(server.addr, &connector, "/whoami").await.unwrap();
        assert_eq!(answer.status, 200);
        if answer.served == renewed.der {
            break;
        }
        assert_eq!(answer.served, files.server.der, "served neither certificate");
        assert!(Instant::now() < deadline, "the renewed certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // date -u -d 2032-06-01 +%s
    assert_eq!(server.tls.not_after_unix(), 1_969_660_800);
    assert_eq!(server.tls.fingerprint_sha256(), renewed.fingerprint());
    assert_eq!(server.tls.reloads(), 1);

    // A broken file is reported and changes nothing: the renewed certificate is still served.
    let failures = server.tls.reload_failures();
    pki::replace(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    eventually("the broken file noticed", || server.tls.reload_failures() > failures).await;
    let answer = request(server.addr, &connector, "/whoami").await.unwrap();
    assert_eq!((answer.status, answer.served == renewed.der), (200, true));
    assert_eq!((server.tls.reloads(), server.tls.not_after_unix()), (1, 1_969_660_800));

    // Repaired, the files load again.
    renewed.install(&files.cert, &files.key);
    eventually("the repaired files loaded", || server.tls.reloads() == 2).await;
    // Writing a file again with the same contents is not a reload.
    std::fs::write(&files.key, &renewed.key_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.tls.reloads(), 2);
}

#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_times_out() {
    let files = Files::new("tls-stall");
    let options = TlsOptions { handshake_timeout: Duration::from_secs(2), ..files.options(ClientAuth::Optional) };
    let server = start(options).await;
    // Connects and sends half a ClientHello, then nothing.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let answer = request(server.addr, &client(&files.ca, None), "/whoami").await.unwrap();
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "waited {:?} behind a stalled handshake", started.elapsed());

    // The server drops the stalled connection once its handshake deadline passes.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the stalled connection is still open: {read:?}");
    eventually("the timed out handshake counted", || server.tls.handshake_failures() == 1).await;
}

/// A change to the options of a test case.
type Edit<'a> = Box<dyn FnOnce(&mut TlsOptions) + 'a>;

/// Loads options built by `edit` and returns the error message.
fn load_error(files: &Files, edit: impl FnOnce(&mut TlsOptions)) -> String {
    let mut options = files.options(ClientAuth::Required);
    edit(&mut options);
    match Tls::load(options) {
        Ok(_) => "loaded".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unusable_files_are_named_with_what_is_wrong() {
    let files = Files::new("tls-errors");
    let write = |name: &str, text: &str| -> PathBuf {
        let p = files.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let d = |p: &Path| p.display().to_string();
    let missing = files.path("missing.pem");
    let garbage = write("garbage.pem", "hello\n");
    let bad_base64 = write("bad.pem", "-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n");
    let other = files.ca.server((2030, 1, 1));
    let other_key = write("other.key", &other.key_pem);
    let cases: Vec<(String, Edit<'_>)> = vec![
        (format!("cannot read the certificate file {}: ", d(&missing)), Box::new(|o| o.cert = missing.clone())),
        (
            format!("the certificate file {} is not usable: no certificate in it", d(&garbage)),
            Box::new(|o| o.cert = garbage.clone()),
        ),
        (
            format!("the certificate file {} is not usable: bad PEM", d(&bad_base64)),
            Box::new(|o| o.cert = bad_base64.clone()),
        ),
        (format!("cannot read the private key file {}: ", d(&missing)), Box::new(|o| o.key = missing.clone())),
        (
            format!("the private key file {} is not usable: no private key in it", d(&files.cert)),
            Box::new(|o| o.key = files.cert.clone()),
        ),
        (
            format!("the private key {} does not belong to the certificate {}", d(&other_key), d(&files.cert)),
            Box::new(|o| o.key = other_key.clone()),
        ),
        (
            format!("the client CA file {} is not usable: no certificate in it", d(&garbage)),
            Box::new(|o| o.client_ca = Some(garbage.clone())),
        ),
        ("client auth `required` needs a client CA file".to_string(), Box::new(|o| o.client_ca = None)),
        (
            "client auth `optional` needs a client CA file".to_string(),
            Box::new(|o| {
                o.client_ca = None;
                o.client_auth = ClientAuth::Optional;
            }),
        ),
        ("loaded".to_string(), Box::new(|_| {})),
    ];
    for (expect, edit) in cases {
        let got = load_error(&files, edit);
        assert!(got.starts_with(&expect), "expected: {expect}\n     got: {got}");
    }
}

#[test]
fn client_auth_modes_parse_from_their_names() {
    for (text, mode) in
        [("none", ClientAuth::None), ("optional", ClientAuth::Optional), ("required", ClientAuth::Required)]
    {
        assert_eq!(text.parse::<ClientAuth>(), Ok(mode));
        assert_eq!(mode.to_string(), text);
    }
    assert_eq!(
        "yes".parse::<ClientAuth>(),
        Err("unknown client auth mode `yes`; expected none, optional or required".to_string())
    );
}
