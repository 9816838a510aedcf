//! The store conformance suite, run against SQLite: one test per case, each on a fresh file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_store_sqlite::SqliteStore;

/// A database path no other test uses, under cargo's scratch folder for integration tests (inside
/// the target directory), so nothing is left in the system temp dir.
fn unique_temp_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    let _ = std::fs::create_dir_all(&dir);
    // Old files from earlier runs would pile up: keep only this run's.
    if n == 0 {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let stale = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if stale.is_some_and(|age| age.as_secs() > 3600) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    dir.join(format!("{}-{nanos}-{n}.db", std::process::id()))
}

sluice_store::store_suite!(async { SqliteStore::open(&unique_temp_path()).unwrap() });
