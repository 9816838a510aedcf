//! `sluice serve` and `sluice dev`: the server on the embedded SQLite store (or PostgreSQL), over
//! HTTP or HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice_engine::{Engine, EngineOptions, TraceId};
use sluice_server::routes::DEFAULT_TENANT;
use sluice_server::sluice_auth::oidc::{Config as OidcConfig, Oidc};
use sluice_server::sluice_auth::{AuthConfig, Directory, NewApiKey, NewUser, Role, ServerKey};
use sluice_server::sluice_gateway::{Config as GatewayConfig, Gateway};
use sluice_server::tls::{ClientAuth, Tls, TlsOptions, DEFAULT_HANDSHAKE_TIMEOUT};
use sluice_server::MetricsAccess;
use sluice_store::{ShardedStore, Store};
use sluice_store_postgres::PostgresStore;
use sluice_store_sqlite::SqliteStore;
use tokio::net::TcpListener;

use crate::{SecretArgs, ServeArgs, TlsArgs};

/// Opens the store named by `database`: a PostgreSQL URL, or else a SQLite file path.
/// Several PostgreSQL URLs separated by commas make a sharded store: each execution lives on the
/// shard of its workflow id.
pub async fn open_store(database: &str) -> Result<Arc<dyn Store>> {
    let parts: Vec<&str> = database.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if parts.len() > 1 {
        let mut shards = Vec::with_capacity(parts.len());
        for p in &parts {
            if !(p.starts_with("postgres://") || p.starts_with("postgresql://")) {
                anyhow::bail!(
                    "only PostgreSQL databases can be sharded; `{}` is not a postgres:// URL",
                    describe_database(p)
                );
            }
            shards.push(Box::pin(open_store(p)).await?);
        }
        return Ok(Arc::new(ShardedStore::new(shards).map_err(|e| anyhow::anyhow!("{e}"))?));
    }
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        let store = PostgresStore::connect(database)
            .await
            .map_err(|e| anyhow::anyhow!("cannot use the PostgreSQL database: {e}"))?;
        return Ok(Arc::new(store));
    }
    let store = SqliteStore::open(Path::new(database))
        .map_err(|e| anyhow::anyhow!("cannot open the database {database}: {e}"))?;
    Ok(Arc::new(store))
}

/// Removes a SQLite database file and its `-wal` and `-shm` files (a bench's scratch database).
pub fn remove_sqlite_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// The database for logs and banners: a URL without its password.
pub fn describe_database(database: &str) -> String {
    if database.contains(',') {
        return database.split(',').map(describe_database).collect::<Vec<_>>().join(",");
    }
    match (database.find("://"), database.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &database[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}{}", &database[..scheme + 3], &database[at..])
        }
        _ => database.to_string(),
    }
}

/// Binds the listener, opens the store and recovers the engine. With `advertise`, the node
/// tells the others its plain-HTTP address, so that they can send it what only it may do.
pub async fn start(
    database: &str,
    bind: &str,
    port: u16,
    mut opts: EngineOptions,
    advertise: bool,
) -> Result<(Engine, TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((bind, port)).await.with_context(|| {
        format!("cannot listen on {bind}:{port}; is another server running? pick another with --port")
    })?;
    let addr = listener.local_addr()?;
    if advertise {
        opts.url = Some(format!("http://{addr}"));
    }
    let store = open_store(database).await?;
    let (engine, _bg) =
        Engine::start(store, opts).await.map_err(|e| anyhow::anyhow!("cannot start the engine: {e}"))?;
    Ok((engine, listener, addr))
}

/// Loads the gateway config (`.json` as JSON, anything else as YAML) and builds the gateway,
/// with API keys from the environment variables the config names.
pub fn load_gateway(path: &Path) -> Result<Arc<Gateway>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the gateway config {}", path.display()))?;
    let config = if path.extension().is_some_and(|e| e == "json") {
        GatewayConfig::from_json(&text)
    } else {
        GatewayConfig::from_yaml(&text)
    }
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let gateway = Gateway::from_config(&config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Arc::new(gateway))
}

fn gateway_of(args: &ServeArgs) -> Result<Option<Arc<Gateway>>> {
    args.gateway.as_deref().map(load_gateway).transpose()
}

/// Loads the OIDC config, with the client secret from the environment variable or file it names.
pub fn load_oidc(path: &Path) -> Result<Arc<Oidc>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the OIDC config {}", path.display()))?;
    let config = OidcConfig::from_yaml(&text, |var| std::env::var(var).ok(), |p| std::fs::read_to_string(p))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Oidc::new(config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn oidc_of(args: &ServeArgs) -> Result<Option<Arc<Oidc>>> {
    let oidc = args.oidc.as_deref().map(load_oidc).transpose()?;
    if oidc.is_some() && args.insecure_no_auth {
        anyhow::bail!("--oidc signs users in, which --insecure-no-auth switches off: drop one of them");
    }
    Ok(oidc)
}

/// Checks that the OIDC tenant exists, then fetches the issuer's discovery document and keys in
/// the background: a wrong issuer is logged at start, and logins still work once it is reachable.
async fn start_oidc(oidc: &Arc<Oidc>, dir: &Directory) -> Result<()> {
    let tenant = &oidc.config().tenant;
    if !dir.tenant_exists(tenant).await? {
        anyhow::bail!(
            "the OIDC config's tenant `{tenant}` does not exist; create it with `sluice admin init --tenant {tenant}` \
             or fix `tenant`"
        );
    }
    let oidc = Arc::clone(oidc);
    tokio::spawn(async move {
        let issuer = oidc.config().issuer.clone();
        match oidc.warm_up().await {
            Ok(keys) => tracing::info!(%issuer, keys, "OIDC issuer discovered"),
            Err(e) => tracing::warn!(%issuer, error = %e, "OIDC issuer not reachable yet; logins fail until it is"),
        }
    });
    Ok(())
}

/// What the `--tls-*` flags ask for: `None` for plain HTTP. The error says which flags do not go
/// together (a usage error).
pub fn tls_options(args: &TlsArgs) -> Result<Option<TlsOptions>, String> {
    let Some(cert) = &args.tls_cert else {
        if args.tls_key.is_some() {
            return Err("--tls-key needs --tls-cert, the certificate chain (PEM) that goes with the key".into());
        }
        if args.tls_client_ca.is_some() {
            return Err("--tls-client-ca needs --tls-cert and --tls-key: client certificates need HTTPS".into());
        }
        return match args.tls_client_auth {
            Some(mode) if mode != ClientAuth::None => {
                Err(format!("--tls-client-auth {mode} needs --tls-cert, --tls-key and --tls-client-ca"))
            }
            _ => Ok(None),
        };
    };
    let Some(key) = &args.tls_key else {
        return Err("--tls-cert needs --tls-key, the private key (PEM) of the certificate".into());
    };
    let client_auth = match (args.tls_client_auth, &args.tls_client_ca) {
        (None, Some(_)) => ClientAuth::Required,
        (None, None) => ClientAuth::None,
        (Some(ClientAuth::None), Some(_)) => {
            return Err("--tls-client-ca is given with --tls-client-auth none: drop one of them".into())
        }
        (Some(mode @ (ClientAuth::Optional | ClientAuth::Required)), None) => {
            return Err(format!(
            "--tls-client-auth {mode} needs --tls-client-ca, the CA certificates (PEM) that sign client certificates"
        ))
        }
        (Some(mode), _) => mode,
    };
    Ok(Some(TlsOptions {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
        client_auth,
        reload_interval: args.tls_reload_interval,
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
    }))
}

/// Reads the TLS files the flags name, before anything else starts: a bad file stops the start.
fn tls_of(args: &ServeArgs) -> Result<Option<Tls>> {
    let options = tls_options(&args.tls).map_err(anyhow::Error::msg)?;
    Ok(options.map(Tls::load).transpose()?)
}

/// Binds `--metrics-addr`, when given.
async fn metrics_listener(args: &ServeArgs) -> Result<Option<TcpListener>> {
    let Some(addr) = &args.metrics_addr else { return Ok(None) };
    let listener = TcpListener::bind(addr.as_str())
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}; pick another address or port"))?;
    Ok(Some(listener))
}

/// Serves the API over HTTPS when `tls` is given, else over HTTP.
fn url_of(addr: SocketAddr, tls: Option<&Tls>) -> String {
    format!("{}://{addr}", if tls.is_some() { "https" } else { "http" })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

/// The identity directory on `store`, whose secrets `key` seals.
pub async fn open_directory(store: &Arc<dyn Store>, key: ServerKey) -> Result<Arc<Directory>> {
    Directory::open(Arc::clone(store), AuthConfig::default(), key)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the identity directory: {e}"))
}

/// The server key of `database`: `SLUICE_SECRET_KEY` (the key itself), else the file
/// `--secret-key-file`, else for SQLite the file beside the database (`<database>.key`). A file
/// that does not exist is made, with a new key, readable by its owner only.
pub fn server_key(database: &str, secret: &SecretArgs) -> Result<ServerKey> {
    let from_env = std::env::var("SLUICE_SECRET_KEY").ok().filter(|v| !v.trim().is_empty());
    if let Some(text) = from_env {
        if secret.secret_key_file.is_some() {
            anyhow::bail!("both SLUICE_SECRET_KEY and --secret-key-file are set: give the server key one way");
        }
        return ServerKey::parse(&text).map_err(|e| anyhow::anyhow!("SLUICE_SECRET_KEY: {e}"));
    }
    let is_postgres = database.starts_with("postgres://") || database.starts_with("postgresql://");
    let path = match (&secret.secret_key_file, is_postgres) {
        (Some(p), _) => p.clone(),
        (None, false) => PathBuf::from(format!("{database}.key")),
        (None, true) => anyhow::bail!(
            "a PostgreSQL database needs the server key that seals its secrets: pass --secret-key-file FILE (made \
             if absent; give every node the same file) or set SLUICE_SECRET_KEY (64 hex characters, e.g. from \
             `openssl rand -hex 32`)"
        ),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_readable_by_others(&path);
            ServerKey::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, text) = ServerKey::generate()?;
            write_secret(&path, &format!("{text}\n"), true)?;
            tracing::info!(path = %path.display(), fingerprint = key.fingerprint(),
                "made a new server key; keep it with the database's backups, which are useless without it");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the server key {}", path.display())),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the server key file can be read by others than its owner: chmod 600 it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn warn_insecure() {
    tracing::warn!(
        "AUTHENTICATION IS OFF (--insecure-no-auth): anyone who can reach this port is the owner of the \
         tenant `default`; never run a server like this where others can reach it"
    );
}

/// Serves until SIGINT or SIGTERM. `process_trace` is the trace id of the lines that belong to
/// no request or execution; the startup line names it.
pub async fn serve(args: ServeArgs, process_trace: TraceId) -> Result<()> {
    let tls = tls_of(&args)?;
    let gateway = gateway_of(&args)?;
    let oidc = oidc_of(&args)?;
    let key = if args.insecure_no_auth { None } else { Some(server_key(&args.database, &args.secret)?) };
    let opts = args.engine_options(gateway.clone(), false)?;
    let egress = opts.egress.summary();
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port, opts, tls.is_none()).await?;
    let directory = if let Some(key) = key {
        let dir = open_directory(engine.store(), key).await?;
        if let Some(oidc) = &oidc {
            start_oidc(oidc, &dir).await?;
        }
        // With OIDC, users of the issuer can sign in even when nobody else can.
        if oidc.is_none() && !dir.has_credentials().await? {
            anyhow::bail!(
                "no tenant has a user or an API key yet, so nobody could call this server. Create one with \
                 `sluice admin init --database {}` (it prints an owner API key), or pass --insecure-no-auth \
                 for a throwaway server without authentication",
                describe_database(&args.database)
            );
        }
        Some(dir)
    } else {
        warn_insecure();
        None
    };
    let gateway_file = args.gateway.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let client_auth = tls.as_ref().map(|t| t.options().client_auth.to_string()).unwrap_or_default();
    tracing::info!(%addr, url = %url_of(addr, tls.as_ref()), database = %describe_database(&args.database),
        gateway = %gateway_file, tls_client_auth = %client_auth, auth = directory.is_some(), egress = %egress,
        oidc = %oidc.as_ref().map(|o| o.config().issuer.clone()).unwrap_or_default(), trace_id = %process_trace, "sluice serving");
    let metrics = metrics_listener(&args).await?;
    if let Some(m) = &metrics {
        tracing::info!(addr = %m.local_addr()?, "metrics served on their own listener, without authentication");
    }
    let opts = sluice_server::Options {
        gateway,
        directory,
        oidc,
        limits: args.limits(),
        tls,
        connections: args.connections(),
        metrics_access: MetricsAccess::Admin,
    };
    let watched = engine.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = watched.lease_lost() => {}
        }
    };
    sluice_server::serve_with_metrics(listener, metrics, engine.clone(), opts, stop).await?;
    if engine.has_lost_lease() {
        anyhow::bail!(
            "this node's lease ran out and another node took its executions over (was the database unreachable, \
             or is another node running under the same --node-id?); start it again"
        );
    }
    Ok(())
}

/// What `sluice admin init` makes.
pub struct AdminInit<'a> {
    pub tenant: &'a str,
    pub key_name: &'a str,
    pub email: Option<&'a str>,
    pub key_file: Option<&'a Path>,
}

/// `sluice admin init`: a tenant and a new owner key (and user), straight on the database.
pub async fn admin_init(database: &str, secret: &SecretArgs, init: AdminInit<'_>) -> Result<()> {
    let AdminInit { tenant, key_name, email, key_file } = init;
    let store = open_store(database).await?;
    let dir = open_directory(&store, server_key(database, secret)?).await?;
    if dir.create_tenant(tenant, tenant).await? {
        eprintln!("created tenant {tenant}");
    }
    if let Some(email) = email {
        let password = std::env::var("SLUICE_ADMIN_PASSWORD").context(
            "set SLUICE_ADMIN_PASSWORD to the new user's password (it is never taken from the command line)",
        )?;
        dir.create_user(tenant, None, NewUser { email: email.into(), password: Some(password), role: Role::Owner })
            .await?;
        eprintln!("created owner user {email}");
    }
    let (view, key) = dir
        .create_api_key(
            tenant,
            None,
            NewApiKey {
                name: key_name.into(),
                role: Role::Owner,
                expires_in: None,
                client_cert_sha256: None,
                presented_cert_sha256: None,
            },
        )
        .await?;
    match key_file {
        Some(path) => {
            write_secret(path, &key, false)?;
            eprintln!("owner API key {} of tenant {tenant} written to {}", view.id, path.display());
        }
        None => {
            eprintln!("owner API key {} of tenant {tenant} (shown once; store it):", view.id);
            crate::out(&key);
        }
    }
    Ok(())
}

/// What `sluice admin key` makes.
pub struct AdminKey<'a> {
    pub tenant: &'a str,
    pub name: &'a str,
    pub role: &'a str,
    pub client_cert_sha256: Option<String>,
    pub key_file: Option<&'a Path>,
}

/// `sluice admin key`: a key of an existing tenant, straight on the database; the operator may
/// bind it to any client certificate.
pub async fn admin_key(database: &str, secret: &SecretArgs, new: AdminKey<'_>) -> Result<()> {
    let role = Role::parse(new.role)
        .with_context(|| format!("unknown role {:?}; expected owner, admin, editor, viewer or worker", new.role))?;
    let store = open_store(database).await?;
    let dir = open_directory(&store, server_key(database, secret)?).await?;
    if !dir.tenant_exists(new.tenant).await? {
        anyhow::bail!("no tenant {}: make it with `sluice admin init --tenant {}`", new.tenant, new.tenant);
    }
    let made = NewApiKey {
        name: new.name.into(),
        role,
        expires_in: None,
        client_cert_sha256: new.client_cert_sha256,
        presented_cert_sha256: None,
    };
    let (view, key) = dir.create_api_key(new.tenant, None, made).await?;
    let bound =
        view.client_cert_sha256.as_deref().map(|fp| format!(", bound to the certificate {fp}")).unwrap_or_default();
    match new.key_file {
        Some(path) => {
            write_secret(path, &key, false)?;
            eprintln!("{role} API key {} of tenant {}{bound} written to {}", view.id, new.tenant, path.display());
        }
        None => {
            eprintln!("{role} API key {} of tenant {}{bound} (shown once; store it):", view.id, new.tenant);
            crate::out(&key);
        }
    }
    Ok(())
}

/// Writes a secret to a file that only its owner can read; with `new`, only if there is none.
fn write_secret(path: &Path, secret: &str, new: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    if new {
        opts.write(true).create_new(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(secret.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub async fn tenants(database: &str) -> Result<Vec<String>> {
    let store = open_store(database).await?;
    Ok(sluice_server::sluice_auth::directory::tenant_ids(&*store).await?)
}

pub async fn dev(args: ServeArgs, examples: PathBuf, worker: bool, process_trace: TraceId) -> Result<()> {
    let tls = tls_of(&args)?;
    let gateway = gateway_of(&args)?;
    let oidc = oidc_of(&args)?;
    let key = if args.insecure_no_auth { None } else { Some(server_key(&args.database, &args.secret)?) };
    let opts = args.engine_options(gateway.clone(), true)?;
    let egress = opts.egress.summary();
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port, opts, tls.is_none()).await?;
    let url = url_of(addr, tls.as_ref());
    let published = publish_examples(&engine, &examples).await;
    // A local tenant, a key for you (printed once) and one for the demo worker.
    let (directory, owner_key, worker_key) = if let Some(key) = key {
        let dir = open_directory(engine.store(), key).await?;
        dir.create_tenant(DEFAULT_TENANT, "Local development").await?;
        let key = |name: &str, role| NewApiKey {
            name: name.into(),
            role,
            expires_in: None,
            client_cert_sha256: None,
            presented_cert_sha256: None,
        };
        let (_, owner) = dir.create_api_key(DEFAULT_TENANT, None, key("dev", Role::Owner)).await?;
        let (_, worker) = dir.create_api_key(DEFAULT_TENANT, None, key("dev-worker", Role::Worker)).await?;
        if let Some(oidc) = &oidc {
            start_oidc(oidc, &dir).await?;
        }
        (Some(dir), Some(owner), Some(worker))
    } else {
        warn_insecure();
        (None, None, None)
    };
    let tls_line = tls.as_ref().map(|t| {
        let o = t.options();
        format!("certificate {}   client certificates {}", o.cert.display(), o.client_auth)
    });
    // The demo worker is a plain HTTP client: it neither trusts a private CA nor has a certificate.
    let worker = worker && tls.is_none();
    let metrics = metrics_listener(&args).await?;
    let metrics_url = match &metrics {
        Some(m) => format!("http://{}/metrics", m.local_addr()?),
        None => format!("{url}/metrics"),
    };
    // On this machine only, the metrics need no credential (they name the one tenant's queues).
    let metrics_access = if addr.ip().is_loopback() { MetricsAccess::Public } else { MetricsAccess::Admin };
    let opts = sluice_server::Options {
        gateway,
        directory,
        oidc,
        limits: args.limits(),
        tls,
        connections: args.connections(),
        metrics_access,
    };
    let server = tokio::spawn(sluice_server::serve_with_metrics(listener, metrics, engine, opts, shutdown_signal()));
    if worker {
        let url = url.clone();
        tokio::spawn(async move {
            let run =
                crate::demo::run_worker(&url, worker_key.as_deref(), Vec::new(), 64, None, std::future::pending());
            if let Err(e) = run.await {
                tracing::error!(error = %e, "demo worker stopped");
            }
        });
    }
    if crate::logs::is_json() {
        // Every line of a JSON log is a JSON object: the banner is one log line.
        tracing::info!(%url, database = %describe_database(&args.database), workflows = %published.join(","),
            gateway = %args.gateway.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            egress = %egress, trace_id = %process_trace, "sluice serving");
        server.await??;
        return Ok(());
    }
    tracing::debug!(trace_id = %process_trace, "process trace id");
    eprintln!();
    eprintln!("  Sluice is running at {url}");
    eprintln!("  database   {}", describe_database(&args.database));
    eprintln!(
        "  workflows  {}",
        if published.is_empty() { "none (no examples folder)".to_string() } else { published.join(", ") }
    );
    match &owner_key {
        Some(key) => {
            eprintln!("  API key    {key}");
            eprintln!("             (owner of tenant `default`; shown once: export SLUICE_API_KEY=<it>)");
        }
        None => eprintln!("  auth       OFF (--insecure-no-auth)"),
    }
    match &tls_line {
        None => eprintln!("  try        sluice run examples/hello.yaml --input '{{\"name\": \"Ada\"}}'"),
        Some(line) => {
            eprintln!("  tls        {line}");
            eprintln!("  worker     off (the demo worker speaks plain HTTP)");
        }
    }
    eprintln!("  API        {url}/openapi.json   metrics {metrics_url}");
    // Loopback is allowed so that the examples can call local services; `serve` denies it.
    eprintln!("  egress     http steps may reach {egress}: loopback for sluice dev only (docs/security.md)");
    match &args.gateway {
        Some(file) => {
            eprintln!("  gateway    {url}/v1/chat/completions   config {}", file.display())
        }
        None => eprintln!("  gateway    off (start with --gateway FILE; see examples/gateway.yaml)"),
    }
    eprintln!();
    server.await??;
    Ok(())
}

async fn publish_examples(engine: &Engine, dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return names };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
        // `gateway.yaml` there is the AI gateway's example config, not a workflow.
        .filter(|p| p.file_stem().is_none_or(|s| s != "gateway"))
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        match sluice_core::parse_definition(&text, sluice_core::Format::Auto) {
            Ok(def) => match engine.publish(DEFAULT_TENANT, def).await {
                Ok(p) => names.push(p.name),
                Err(e) => tracing::warn!(file = %file.display(), error = %e, "example not published"),
            },
            Err(errors) => {
                for e in errors {
                    tracing::warn!(file = %file.display(), path = %e.path, "example is invalid: {}", e.message);
                }
            }
        }
    }
    names
}
