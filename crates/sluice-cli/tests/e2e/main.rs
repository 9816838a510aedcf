//! End-to-end tests: a real `sluice serve` process, real worker processes (the Rust demo worker
//! and the Python module), real HTTP. Every test ends by replaying the histories it produced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bench;
mod chat;
mod durability;
mod errors;
mod eval;
mod examples;
mod postgres;
mod steps;

use std::path::{Path, PathBuf};

pub use sluice_testkit::{assert_replays, Api, ServerProcess, TempDir, WorkerProcess};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A server on a fresh database with the Rust demo worker attached.
pub async fn server_with_worker(label: &str) -> (TempDir, ServerProcess, WorkerProcess) {
    let dir = TempDir::new(label);
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let worker = WorkerProcess::rust(&bin(), &server.base, &[], None);
    (dir, server, worker)
}

/// Events of a history with the given type.
pub fn of_type<'a>(events: &'a [serde_json::Value], ty: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}
