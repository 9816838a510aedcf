//! The two storage backends a test's server can run on: a SQLite file in the test's own
//! directory, or a fresh PostgreSQL database (on the server `scripts/ensure-postgres` makes
//! sure answers, or `SLUICE_TEST_POSTGRES`), dropped when the test ends. Tests written with
//! `on_both_backends!` run once on each.

use super::TempDir;

/// Which store a test's server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The URL of the PostgreSQL server's maintenance database, where test databases are made.
pub fn admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs one statement on the maintenance database.
pub fn psql(sql: &str) {
    let out = std::process::Command::new("psql")
        .args([&admin_url(), "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("psql is needed for the PostgreSQL tests (scripts/ensure-postgres): {e}"));
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh PostgreSQL database, dropped on drop.
pub struct PgDatabase {
    name: String,
}

impl PgDatabase {
    pub fn create(label: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let label: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let name = format!("sluice_e2e_{label}_{}_{}", std::process::id(), nanos % 1_000_000_000);
        psql(&format!("CREATE DATABASE {name}"));
        Self { name }
    }

    pub fn url(&self) -> String {
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

/// A test's directory and database on one backend. Drop it after the servers that use it.
pub struct Db {
    dir: TempDir,
    url: String,
    _pg: Option<PgDatabase>,
}

impl Db {
    pub fn new(label: &str, backend: Backend) -> Self {
        let dir = TempDir::new(label);
        match backend {
            Backend::Sqlite => {
                let url = dir.path().join("sluice.db").display().to_string();
                Self { dir, url, _pg: None }
            }
            Backend::Postgres => {
                let pg = PgDatabase::create(label);
                Self { dir, url: pg.url(), _pg: Some(pg) }
            }
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// What `sluice serve --database` takes.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// For each `async fn name(backend: Backend)` named, a module `name` with two tests, `sqlite`
/// and `postgres`, that run it on each backend (a module and a function may share a name).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::backend::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::backend::Backend::Postgres).await
            }
        }
    )*};
}
