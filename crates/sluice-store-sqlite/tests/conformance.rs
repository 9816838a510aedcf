//! The store conformance suite, run against SQLite: one test per case, each on a fresh file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_store_sqlite::SqliteStore;

/// A database path no other test uses. The `.db` file stays in the temp dir after the test; the
/// WAL files go when the store closes it.
fn unique_temp_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("sluice-conformance-{}-{nanos}-{n}.db", std::process::id()))
}

sluice_store::store_suite!(async { SqliteStore::open(&unique_temp_path()).unwrap() });
