//! `sluice serve` and `sluice dev`: the server on the embedded SQLite store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice_engine::{Engine, EngineOptions, TraceId};
use sluice_server::sluice_gateway::{Config as GatewayConfig, Gateway};
use sluice_store::{ShardedStore, Store};
use sluice_store_postgres::PostgresStore;
use sluice_store_sqlite::SqliteStore;
use tokio::net::TcpListener;

use crate::ServeArgs;

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

/// Opens the store, recovers the engine and binds the listener.
pub async fn start(
    database: &str,
    bind: &str,
    port: u16,
    gateway: Option<Arc<Gateway>>,
) -> Result<(Engine, TcpListener, SocketAddr)> {
    let store = open_store(database).await?;
    let (engine, _bg) = Engine::start(store, EngineOptions { gateway, ..EngineOptions::default() })
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the engine: {e}"))?;
    let listener = TcpListener::bind((bind, port)).await.with_context(|| {
        format!("cannot listen on {bind}:{port}; is another server running? pick another with --port")
    })?;
    let addr = listener.local_addr()?;
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

/// Serves until SIGINT or SIGTERM. `process_trace` is the trace id of the lines that belong to
/// no request or execution; the startup line names it.
pub async fn serve(args: ServeArgs, process_trace: TraceId) -> Result<()> {
    let gateway = gateway_of(&args)?;
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port, gateway.clone()).await?;
    let gateway_file = args.gateway.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    tracing::info!(%addr, database = %describe_database(&args.database), gateway = %gateway_file, trace_id = %process_trace, "sluice serving");
    sluice_server::serve_with(listener, engine, gateway, shutdown_signal()).await?;
    Ok(())
}

pub async fn dev(args: ServeArgs, examples: PathBuf, worker: bool, process_trace: TraceId) -> Result<()> {
    let gateway = gateway_of(&args)?;
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port, gateway.clone()).await?;
    let url = format!("http://{addr}");
    let published = publish_examples(&engine, &examples).await;
    let server = tokio::spawn(sluice_server::serve_with(listener, engine, gateway, shutdown_signal()));
    if worker {
        let url = url.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::demo::run_worker(&url, Vec::new(), 64, None, std::future::pending()).await {
                tracing::error!(error = %e, "demo worker stopped");
            }
        });
    }
    if crate::logs::is_json() {
        // Every line of a JSON log is a JSON object: the banner is one log line.
        tracing::info!(%url, database = %describe_database(&args.database), workflows = %published.join(","),
            gateway = %args.gateway.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            trace_id = %process_trace, "sluice serving");
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
    eprintln!("  try        sluice run examples/hello.yaml --input '{{\"name\": \"Ada\"}}'");
    eprintln!("  API        {url}/openapi.json   metrics {url}/metrics");
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
            Ok(def) => match engine.publish(sluice_server::routes::DEFAULT_TENANT, def).await {
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
