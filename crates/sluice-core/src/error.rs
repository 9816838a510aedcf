//! Errors of the core: definition errors with the path to the field, and the error payload that
//! failed steps and executions carry in their history.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A problem in a workflow definition: where it is (`steps[2].queue`) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{path}: {message}")]
pub struct DefError {
    pub path: String,
    pub message: String,
}

impl DefError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// The error a step or execution failed with, as recorded in history and shown to users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    /// A stable, machine-readable type such as `timeout.start_to_close` or a worker's own name.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ErrorInfo {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind: kind.into(), message: message.into(), details: None }
    }
}
