//! The usage rows of chat calls are queued in memory: a server that shuts down writes them first.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Engine, EngineOptions, Ledger};
use sluice_store::{UsageFilter, UsageRow};
use sluice_store_sqlite::SqliteStore;
use sluice_testkit::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn row(n: usize) -> UsageRow {
    UsageRow {
        id: format!("{n:036}"),
        tenant: "default".into(),
        at_ms: 1_700_000_000_000,
        api_key: None,
        source: "chat".into(),
        route: "r".into(),
        target: "p/m".into(),
        provider: "p".into(),
        model: "m".into(),
        attempt: 1,
        input_tokens: 1,
        output_tokens: 1,
        cost_usd: Some(0.5),
        latency_us: 10,
        outcome: "success".into(),
        experiment: None,
        arm: None,
        run_id: None,
        workflow_id: None,
        step: None,
    }
}

#[tokio::test]
async fn queued_usage_rows_are_written_before_the_server_stops() {
    let dir = TempDir::new("usage-shutdown");
    let store = Arc::new(SqliteStore::open(&dir.path().join("sluice.db")).unwrap());
    // A writer that would not tick during the test: only the shutdown can write the rows.
    let opts = EngineOptions { usage_every: Duration::from_secs(3600), ..EngineOptions::default() };
    let (engine, _bg) = Engine::start(store.clone(), opts).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(sluice_server::serve(listener, engine.clone(), async {
        let _ = stopped.await;
    }));

    engine.queue_usage(Ledger { usage: (0..3).map(row).collect(), alerts: Vec::new() });
    let filter = UsageFilter { limit: 100, ..UsageFilter::default() };
    let listed = sluice_store::Store::list_usage(&*store, "default", filter.clone()).await.unwrap();
    assert!(listed.items.is_empty(), "the rows wait in the queue until the shutdown");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let listed = sluice_store::Store::list_usage(&*store, "default", filter).await.unwrap();
    assert_eq!(listed.items.len(), 3, "a stopping server writes the queued rows");
}
