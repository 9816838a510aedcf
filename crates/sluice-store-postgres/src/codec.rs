//! How row fields are stored: JSON text for values and structs (text keeps every byte of what the
//! engine wrote, which `jsonb` would not), the serde name for unit enums, `BIGINT` for numbers.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sluice_core::ExecStatus;
use sluice_store::StoreError;

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("cannot encode a column as json: {e}")))
}

pub(crate) fn opt_json<T: Serialize>(value: Option<&T>) -> Result<Option<String>, StoreError> {
    value.map(to_json).transpose()
}

pub(crate) fn from_json<T: DeserializeOwned>(text: &str, column: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Internal(format!("cannot decode column {column}: {e}")))
}

pub(crate) fn opt_from_json<T: DeserializeOwned>(text: Option<&str>, column: &str) -> Result<Option<T>, StoreError> {
    text.map(|t| from_json(t, column)).transpose()
}

/// The serde name of a unit enum variant (`TaskKind::Worker` → `worker`).
pub(crate) fn enum_name<T: Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => Ok(name),
        other => Err(StoreError::Internal(format!("cannot encode an enum column: {other:?}"))),
    }
}

pub(crate) fn enum_from<T: DeserializeOwned>(name: &str, column: &str) -> Result<T, StoreError> {
    serde_json::from_value(Value::String(name.to_owned()))
        .map_err(|e| StoreError::Internal(format!("cannot decode column {column}: {e}")))
}

pub(crate) fn status_from(name: &str) -> Result<ExecStatus, StoreError> {
    ExecStatus::parse(name).ok_or_else(|| StoreError::Internal(format!("unknown execution status {name:?}")))
}

/// An unsigned number as `BIGINT`; values past `i64::MAX` cannot be stored.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Internal(format!("{what} {value} does not fit in a bigint")))
}

pub(crate) fn opt_to_i64(value: Option<u64>, what: &str) -> Result<Option<i64>, StoreError> {
    value.map(|v| to_i64(v, what)).transpose()
}

/// A `BIGINT` column read back into an unsigned field.
pub(crate) fn from_i64<T: TryFrom<i64>>(value: i64, column: &str) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::Internal(format!("column {column} holds {value}, out of range")))
}
