//! End-to-end tests: a real `sluice serve` process, real worker processes (the Rust demo worker
//! and the Python module), real HTTP. Every test ends by replaying the histories it produced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod backend;
mod attack;
mod auth;
mod bench;
mod chains;
mod chat;
mod durability;
mod errors;
mod eval;
mod examples;
mod hostile;
mod http_steps;
mod limits;
mod llm;
mod oidc;
mod ownership;
mod postgres;
mod quarantine;
mod run_limits;
mod sharing;
mod steps;
mod tls;
mod trace;
mod versions;

use std::path::{Path, PathBuf};

// Replays in these tests evaluate expressions as the server does: with a memory account.
#[global_allocator]
static ALLOC: sluice_core::expr::CountingAlloc<std::alloc::System> =
    sluice_core::expr::CountingAlloc(std::alloc::System);

pub use backend::{Backend, Db};
pub use sluice_testkit::{assert_replays, Api, ServerProcess, TempDir, WorkerProcess};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A server on `db` with the Rust demo worker attached.
pub async fn server_with_worker_on(db: &Db) -> (ServerProcess, WorkerProcess) {
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let worker = WorkerProcess::rust(&bin(), &server, &[], None);
    (server, worker)
}

/// What a worker's `--record` file says: how often each step's completion was acknowledged (by
/// `run/step`), and the tasks handed out again after their step's completion was acknowledged.
pub struct WorkerRecord {
    pub completed: std::collections::HashMap<String, usize>,
    pub received_after_ack: Vec<String>,
}

impl WorkerRecord {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut record = Self { completed: Default::default(), received_after_ack: Vec::new() };
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["idempotency_key"].as_str().unwrap().to_string();
            // run/step/attempt → run/step
            let step_key = key.rsplit_once('/').map(|(a, _)| a.to_string()).unwrap();
            match v["event"].as_str() {
                Some("completed") => *record.completed.entry(step_key).or_default() += 1,
                Some("received") if record.completed.contains_key(&step_key) => record.received_after_ack.push(key),
                _ => {}
            }
        }
        record
    }

    /// Fails the test if a step's completion was acknowledged twice or a task was handed out
    /// again after its completion was acknowledged.
    pub fn assert_once(&self) {
        let twice: Vec<_> = self.completed.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "steps completed twice: {twice:?}");
        assert!(
            self.received_after_ack.is_empty(),
            "tasks handed out after their completion was acknowledged: {:?}",
            self.received_after_ack
        );
    }
}

/// Events of a history with the given type.
pub fn of_type<'a>(events: &'a [serde_json::Value], ty: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

/// A virtualenv under the target's temp dir with a package from PyPI, made once and reused;
/// returns its python. `module` is what `import` checks for.
pub async fn python_venv(name: &str, package: &str, module: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    let has = |python: PathBuf| async move {
        tokio::process::Command::new(python)
            .args(["-c", &format!("import {module}")])
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    };
    if has(python.clone()).await {
        return python;
    }
    let out = tokio::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).output().await;
    let out = out.unwrap_or_else(|e| panic!("cannot run python3 -m venv (is python3 installed?): {e}"));
    assert!(out.status.success(), "python3 -m venv failed: {}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::process::Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", package])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "pip install {package} failed; this test needs PyPI (or a venv with it at {}): {}",
        venv.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    python
}
