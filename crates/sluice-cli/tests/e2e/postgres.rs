//! The same engine on PostgreSQL: the server runs with `--database postgres://...` on a database
//! of its own (created here with psql; `scripts/ensure-postgres` makes sure a server answers).

use serde_json::{json, Value};

use super::*;

fn admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database, dropped on drop.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    fn create(label: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("sluice_e2e_{label}_{}_{}", std::process::id(), nanos % 1_000_000_000);
        psql(&format!("CREATE DATABASE {name}"));
        Self { name }
    }

    fn url(&self) -> String {
        let admin = admin_url();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        format!("{base}/{}", self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([&admin_url(), "-q", "-c", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

fn psql(sql: &str) {
    let out = std::process::Command::new("psql")
        .args([&admin_url(), "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("psql is needed for the PostgreSQL tests (scripts/ensure-postgres): {e}"));
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn workflows_run_and_survive_a_restart_on_postgres() {
    let db = PgDatabase::create("restart");
    let dir = TempDir::new("pg");
    let mut server = ServerProcess::start_on(&bin(), dir.path(), &db.url()).await;
    let _worker = WorkerProcess::rust(&bin(), &server.base, &[], None);
    let api = server.api();
    api.publish_file(&repo().join("examples/hello.yaml")).await;
    api.publish_file(&repo().join("examples/fan-out.yaml")).await;
    api.publish(&json!({"name": "patient", "steps": [
        {"id": "nap", "type": "sleep", "duration": "500ms"},
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
    ]}))
    .await;
    let hello = api.start("hello", json!({"name": "Ada"}), None).await;
    assert_eq!(api.wait(&hello, 20).await["output"], json!({"message": "Hello, Ada", "length": 10}));
    let fan = api.start("fan-out", json!({"items": ["a", "b", "c", "d", "e"]}), None).await;
    assert_eq!(api.wait(&fan, 20).await["output"]["count"], 5);

    let id = api.start("patient", Value::Null, Some("pg-patient")).await;
    server.restart().await;
    let api = server.api();
    api.wait_until(&id, 20, |r| r["history_length"].as_u64().unwrap_or(0) >= 4).await;
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/go"), &json!(7)).await.0, 202);
    assert_eq!(api.wait(&id, 20).await["output"], json!({"got": 7}));
    assert!(assert_replays(&api).await >= 3);
}
