//! The one error type of authentication and identity management; the server maps each variant to
//! an HTTP status.

use sluice_store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that name nobody (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// A login with a wrong email or password; the same message whatever the reason (401). The
    /// reason is for the server's own records (the audit log, the server log), never the caller.
    #[error("wrong email or password")]
    InvalidCredentials(LoginFailure),
    /// Authenticated, but the role does not allow this (403).
    #[error("{0}")]
    Forbidden(String),
    /// A request field is wrong (400).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The thing exists already (409).
    #[error("{0}")]
    Conflict(String),
    /// No such thing in this tenant (404).
    #[error("{0}")]
    NotFound(String),
    /// The store cannot be reached; retry (503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Why a password login failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// The tenant does not exist (or cannot be a tenant's id).
    UnknownTenant,
    /// The tenant exists; the email names none of its users.
    UnknownUser,
    /// A user of the tenant, a wrong password (or a user who signs in only through OIDC).
    WrongPassword,
}

impl AuthError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::NotFound => Self::NotFound("not found".into()),
            other => Self::Internal(other.to_string()),
        }
    }
}
