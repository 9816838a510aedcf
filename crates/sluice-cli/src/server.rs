//! `sluice serve` and `sluice dev`: the server on the embedded SQLite store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice_engine::{Engine, EngineOptions};
use sluice_store::Store;
use sluice_store_postgres::PostgresStore;
use sluice_store_sqlite::SqliteStore;
use tokio::net::TcpListener;

use crate::ServeArgs;

/// Opens the store named by `database`: a PostgreSQL URL, or else a SQLite file path.
pub async fn open_store(database: &str) -> Result<Arc<dyn Store>> {
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
pub async fn start(database: &str, bind: &str, port: u16) -> Result<(Engine, TcpListener, SocketAddr)> {
    let store = open_store(database).await?;
    let (engine, _bg) = Engine::start(store, EngineOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the engine: {e}"))?;
    let listener = TcpListener::bind((bind, port)).await.with_context(|| {
        format!("cannot listen on {bind}:{port}; is another server running? pick another with --port")
    })?;
    let addr = listener.local_addr()?;
    Ok((engine, listener, addr))
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

pub async fn serve(args: ServeArgs) -> Result<()> {
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port).await?;
    tracing::info!(%addr, database = %describe_database(&args.database), "sluice serving");
    sluice_server::serve(listener, engine, shutdown_signal()).await?;
    Ok(())
}

pub async fn dev(args: ServeArgs, examples: PathBuf, worker: bool) -> Result<()> {
    let (engine, listener, addr) = start(&args.database, &args.bind, args.port).await?;
    let url = format!("http://{addr}");
    let published = publish_examples(&engine, &examples).await;
    let server = tokio::spawn(sluice_server::serve(listener, engine, shutdown_signal()));
    if worker {
        let url = url.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::demo::run_worker(&url, Vec::new(), 64, None, std::future::pending()).await {
                tracing::error!(error = %e, "demo worker stopped");
            }
        });
    }
    eprintln!();
    eprintln!("  Sluice is running at {url}");
    eprintln!("  database   {}", describe_database(&args.database));
    eprintln!(
        "  workflows  {}",
        if published.is_empty() { "none (no examples folder)".to_string() } else { published.join(", ") }
    );
    eprintln!("  try        sluice run examples/hello.yaml --input '{{\"name\": \"Ada\"}}'");
    eprintln!("  API        {url}/openapi.json   metrics {url}/metrics");
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
