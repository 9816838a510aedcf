//! Maps PostgreSQL and pool errors onto `StoreError`: what a retry may cure (a lost connection,
//! a server shutting down or out of connections) is `Unavailable`, the rest is `Internal`. Every
//! mapped error is logged here, once, with its cause.

use std::error::Error as _;

use deadpool_postgres::PoolError;
use sluice_store::StoreError;
use tokio_postgres::error::SqlState;

/// Maps an unexpected database error (not one the caller turns into a domain error first).
pub(crate) fn db_err(e: tokio_postgres::Error) -> StoreError {
    let retryable = is_retryable(&e);
    let message = describe(&e);
    tracing::error!(error = %message, retryable, "postgres call failed");
    if retryable {
        StoreError::Unavailable(message)
    } else {
        StoreError::Internal(message)
    }
}

/// Maps a failure to get a connection from the pool.
pub(crate) fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => db_err(e),
        other => {
            tracing::error!(error = %other, "postgres connection pool failed");
            StoreError::Unavailable(format!("no postgres connection: {other}"))
        }
    }
}

/// The error text with the server's message and SQLSTATE, which `Display` alone leaves out.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => format!("{} ({})", db.message(), db.code().code()),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    }
}

fn is_retryable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let Some(db) = e.as_db_error() else {
        // Not an answer from the server: the socket failed (connect, read, write) or a value did
        // not convert. Only the first is worth a retry.
        return e.source().is_some_and(|s| s.is::<std::io::Error>());
    };
    let code = db.code().code();
    // 08: connection exceptions; 53: out of connections, memory or disk; 57P0x: the server is
    // shutting down or starting; 25006: a read-only server (a standby after failover).
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
        || is_transient(e)
}

/// PostgreSQL broke a deadlock or a serialization conflict by failing this transaction; nothing
/// of it was applied and running it again may succeed.
pub(crate) fn is_transient(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}
