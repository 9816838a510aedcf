//! The engine's error type. The server maps each variant to an error code and HTTP status.

use sluice_core::DefError;
use sluice_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("invalid workflow definition: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidDefinition(Vec<DefError>),
    #[error("{field}: {message}")]
    InvalidInput { field: String, message: String },
    #[error("execution `{0}` is not running")]
    NotRunning(String),
    #[error("task `{0}` is unknown or already finished")]
    TaskNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the {scope} `{name}` has {running} executions running, its limit is {limit}; retry when one finishes")]
    ConcurrencyLimited { scope: &'static str, name: String, limit: u32, running: u64 },
    /// A value larger than a configured limit (`setting` names it).
    #[error("{what} is {size} bytes, more than the limit of {limit} ({setting})")]
    TooLarge { what: String, size: usize, limit: usize, setting: &'static str },
    #[error(
        "this tenant has {limit} task queues in use on this node, the most allowed: poll a queue in use, or retry \
         once idle queues are freed"
    )]
    TooManyQueues { limit: usize },
    #[error("storage unavailable, retry later: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidInput { field: field.into(), message: message.into() }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::NotFound { what: "record", id: String::new() },
            StoreError::AlreadyRunning(run) => Self::Conflict(format!("already running as run {run}")),
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::Internal(m) => Self::Internal(m),
        }
    }
}
