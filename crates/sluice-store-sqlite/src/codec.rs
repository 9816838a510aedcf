//! How row fields that SQLite has no type for are stored: JSON text for values and structs, the
//! serde name for unit enums. Decoding failures surface as rusqlite conversion errors, so that
//! row mapping stays in `rusqlite::Result`.

use rusqlite::types::Type;
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

/// The serde name of a unit enum variant (`TaskKind::Worker` → `worker`).
pub(crate) fn enum_name<T: Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => Ok(name),
        other => Err(StoreError::Internal(format!("cannot encode an enum column: {other:?}"))),
    }
}

pub(crate) fn json_col<T: DeserializeOwned>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

pub(crate) fn opt_json_col<T: DeserializeOwned>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|text| {
        serde_json::from_str(&text).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
    })
    .transpose()
}

pub(crate) fn enum_col<T: DeserializeOwned>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let name: String = row.get(idx)?;
    serde_json::from_value(Value::String(name))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

pub(crate) fn status_col(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<ExecStatus> {
    let name: String = row.get(idx)?;
    ExecStatus::parse(&name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, format!("unknown execution status {name:?}").into())
    })
}
