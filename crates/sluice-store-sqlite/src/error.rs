//! Maps SQLite errors onto `StoreError`: what a retry may cure is `Unavailable`, the rest is
//! `Internal`. Every mapped error is logged here, once, with its cause.

use rusqlite::ErrorCode;
use sluice_store::StoreError;

/// Maps an unexpected database error (not one the caller turns into a domain error first).
pub(crate) fn db_err(e: rusqlite::Error) -> StoreError {
    let retryable = matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::OutOfMemory
                | ErrorCode::ReadOnly
                | ErrorCode::PermissionDenied
        )
    );
    tracing::error!(error = %e, retryable, "sqlite call failed");
    if retryable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

pub(crate) fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

/// The writer thread is gone: nothing can be written until the store is opened again.
pub(crate) fn writer_gone() -> StoreError {
    tracing::error!("sqlite writer thread stopped");
    StoreError::Unavailable("the sqlite writer stopped; reopen the store".into())
}
