//! HTTPS with rustls, mutual TLS included: the certificate, its key and the client CA come from
//! PEM files that are reloaded when they change on disk, and handshakes run beside the accept loop,
//! each under a deadline, so that a slow or hostile client holds up no one else.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::conn::{Gate, Limits};
use crate::peer::{ClientCert, Peer};
use crate::x509;

/// How often the files are checked for changes unless told otherwise.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// How long a client has to finish its handshake unless told otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether clients must present a certificate signed by the client CA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates are asked for.
    #[default]
    None,
    /// A client may present a certificate; one that the CA did not sign fails the handshake, and a
    /// client without one connects without an identity.
    Optional,
    /// A client without a certificate signed by the CA fails the handshake.
    Required,
}

impl FromStr for ClientAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!("unknown client auth mode `{other}`; expected none, optional or required")),
        }
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Required => "required",
        })
    }
}

/// Where the TLS material lives and how it is watched.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates that sign client certificates, PEM; needed unless `client_auth` is
    /// [`ClientAuth::None`].
    pub client_ca: Option<PathBuf>,
    /// Whether clients must present a certificate that the client CA signed.
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes; zero never checks.
    pub reload_interval: Duration,
    /// How long a client has to finish its handshake before the connection is dropped.
    pub handshake_timeout: Duration,
}

impl TlsOptions {
    /// Server-only TLS (no client certificates) with the default intervals.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            client_auth: ClientAuth::None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the {what} file {} is not usable: {reason}", path.display())]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    #[error("the private key {} does not belong to the certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("client auth `{0}` needs a client CA file to check client certificates against")]
    NoClientCa(ClientAuth),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

const CERT: &str = "certificate";
const KEY: &str = "private key";
const CLIENT_CA: &str = "client CA";

/// The TLS state of a server: the configuration new connections get, swapped when the files
/// change. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    options: TlsOptions,
    current: RwLock<Arc<Current>>,
    /// What the files looked like at the last check, to tell a change.
    seen: Mutex<Seen>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    handshake_failures: AtomicU64,
}

/// A configuration and what its leaf certificate says.
struct Current {
    config: Arc<ServerConfig>,
    leaf: x509::Summary,
}

struct Seen {
    stamps: Vec<Option<Stamp>>,
    digest: Vec<u8>,
}

/// What a file's metadata says about its version: modification time, length, and (on Unix) the
/// inode, which a file renamed over the old one changes even within one tick of a coarse clock.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// The bytes of the files, read at one moment.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Tls {
    /// Reads and checks the files; the error names the file and what is wrong with it.
    pub fn load(options: TlsOptions) -> Result<Self, Error> {
        if options.client_auth != ClientAuth::None && options.client_ca.is_none() {
            return Err(Error::NoClientCa(options.client_auth));
        }
        let stamps = stamps(&options);
        let files = read(&options)?;
        let current = build(&options, &files)?;
        let seen = Seen { stamps, digest: files.digest() };
        Ok(Self {
            inner: Arc::new(Inner {
                options,
                current: RwLock::new(Arc::new(current)),
                seen: Mutex::new(seen),
                reloads: AtomicU64::new(0),
                reload_failures: AtomicU64::new(0),
                handshake_failures: AtomicU64::new(0),
            }),
        })
    }

    pub fn options(&self) -> &TlsOptions {
        &self.inner.options
    }

    /// The configuration a connection accepted now gets.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().config.clone()
    }

    /// The served leaf certificate's `notAfter`, as Unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.current().leaf.not_after_unix
    }

    /// SHA-256 of the served leaf certificate, lowercase hex.
    pub fn fingerprint_sha256(&self) -> String {
        self.current().leaf.fingerprint_sha256.clone()
    }

    /// Reloads that took effect since the start.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// Changes to the files that could not be used (the previous configuration stayed).
    pub fn reload_failures(&self) -> u64 {
        self.inner.reload_failures.load(Ordering::Relaxed)
    }

    /// Handshakes that failed or timed out: refused client certificates among them.
    pub fn handshake_failures(&self) -> u64 {
        self.inner.handshake_failures.load(Ordering::Relaxed)
    }

    fn current(&self) -> Arc<Current> {
        self.inner.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Looks at the files and, when their contents changed, builds a new configuration for the
    /// connections accepted from now on. `Ok(false)`: nothing changed. On an error the previous
    /// configuration stays, and the same broken files are not reported again.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let options = &self.inner.options;
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        let stamps = stamps(options);
        if stamps == seen.stamps {
            return Ok(false);
        }
        seen.stamps = stamps;
        let files = match read(options) {
            Ok(files) => files,
            Err(e) => {
                // Looked at again when a file changes (a missing one that comes back does).
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let digest = files.digest();
        if digest == seen.digest {
            return Ok(false);
        }
        seen.digest = digest;
        match build(options, &files) {
            Ok(current) => {
                *self.inner.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(current);
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Checks the files every `reload_interval`, forever.
    async fn watch(&self) -> Infallible {
        let interval = self.inner.options.reload_interval;
        if interval.is_zero() {
            return std::future::pending().await;
        }
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let tls = self.clone();
            // File system calls block; a slow disk must not stall the accept loop beside this.
            match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(
                    fingerprint_sha256 = %self.fingerprint_sha256(),
                    not_after_unix = self.not_after_unix(),
                    "tls certificate reloaded"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "tls files changed but cannot be used; still serving the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "tls reload check failed"),
            }
        }
    }
}

impl Files {
    /// A hash of all the files, to tell a real change from a touched file.
    fn digest(&self) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            match part {
                Some(bytes) => {
                    ctx.update(&(bytes.len() as u64 + 1).to_be_bytes());
                    ctx.update(bytes);
                }
                None => ctx.update(&0u64.to_be_bytes()),
            }
        }
        ctx.finish().as_ref().to_vec()
    }
}

fn paths(options: &TlsOptions) -> impl Iterator<Item = &Path> {
    [Some(options.cert.as_path()), Some(options.key.as_path()), options.client_ca.as_deref()].into_iter().flatten()
}

/// The stamp of each file (`None`: cannot be looked at).
fn stamps(options: &TlsOptions) -> Vec<Option<Stamp>> {
    paths(options)
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some(Stamp { modified: m.modified().ok()?, len: m.len(), inode: inode(&m) })
        })
        .collect()
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

fn read(options: &TlsOptions) -> Result<Files, Error> {
    let read_one =
        |what, path: &Path| std::fs::read(path).map_err(|source| Error::Read { what, path: path.into(), source });
    Ok(Files {
        cert: read_one(CERT, &options.cert)?,
        key: read_one(KEY, &options.key)?,
        client_ca: options.client_ca.as_deref().map(|p| read_one(CLIENT_CA, p)).transpose()?,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid { what, path: path.into(), reason: reason.into() }
}

/// Certificates of a PEM file, in order; an error if there is none.
fn certificates(what: &'static str, path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no certificate in it (a `-----BEGIN CERTIFICATE-----` block)"));
    }
    Ok(certs)
}

fn build(options: &TlsOptions, files: &Files) -> Result<Current, Error> {
    let chain = certificates(CERT, &options.cert, &files.cert)?;
    let leaf = x509::Summary::parse(&chain[0])
        .map_err(|e| invalid(CERT, &options.cert, format!("the first certificate does not parse: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            invalid(KEY, &options.key, "no private key in it (a `-----BEGIN PRIVATE KEY-----` block, or RSA or EC)")
        }
        e => invalid(KEY, &options.key, format!("bad PEM: {e}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?;
    let builder = match (options.client_auth, options.client_ca.as_deref(), files.client_ca.as_deref()) {
        (ClientAuth::None, _, _) => builder.with_no_client_auth(),
        (mode, Some(path), Some(bytes)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(CLIENT_CA, path, bytes)? {
                roots.add(cert).map_err(|e| invalid(CLIENT_CA, path, format!("a certificate does not parse: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match mode {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier.build().map_err(|e| invalid(CLIENT_CA, path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        (mode, _, _) => return Err(Error::NoClientCa(mode)),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            Error::KeyMismatch { cert: options.cert.clone(), key: options.key.clone() }
        }
        e => invalid(KEY, &options.key, e.to_string()),
    })?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Current { config: Arc::new(config), leaf })
}

impl Tls {
    /// Runs the TLS handshake of an accepted connection under the handshake timeout; `None`
    /// when it failed or timed out (counted, logged at debug level).
    pub(crate) async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Option<(TlsStream<TcpStream>, Peer)> {
        let acceptor = TlsAcceptor::from(self.server_config());
        match tokio::time::timeout(self.inner.options.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let peer = peer_of(&stream, addr);
                Some((stream, peer))
            }
            Ok(Err(e)) => {
                self.inner.handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, error = %e, "tls handshake failed");
                None
            }
            Err(_) => {
                self.inner.handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "tls handshake timed out");
                None
            }
        }
    }
}

/// The peer of a TLS connection: its address and the client certificate it proved it holds.
fn peer_of(stream: &TlsStream<TcpStream>, addr: SocketAddr) -> Peer {
    let leaf = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
    let client_cert = leaf.and_then(|der| match ClientCert::from_der(der) {
        Ok(cert) => Some(Arc::new(cert)),
        Err(e) => {
            // The verifier accepted it, so this should not happen; the connection goes on
            // without an identity, which grants nothing.
            tracing::warn!(%addr, error = %e, "cannot read the client certificate");
            None
        }
    });
    Peer { addr, client_cert }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, with the default connection
/// limits, checking the files for changes meanwhile. Handlers see each connection's [`Peer`] as
/// `ConnectInfo<Peer>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Tls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, tls, Arc::new(Gate::new(Limits::default())), shutdown).await
}

/// Like [`serve`], under the connection limits of `gate`. Handshakes run beside the accept loop,
/// each in its connection's task, under the handshake timeout and the connection caps.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    tls: Tls,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let server = crate::conn::serve(listener, app, Some(tls.clone()), gate, shutdown);
    tokio::select! {
        done = server => done,
        never = tls.watch() => match never {},
    }
}
