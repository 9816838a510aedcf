//! The NUL character (`%00` in a URL, `\u0000` in JSON) is refused in every path and query
//! parameter and in the strings of JSON bodies, with a 400 that names the parameter or field:
//! PostgreSQL cannot store it in a text column, and no name, id or key needs it. Free-form JSON
//! (an execution's input, a task's output, a signal's payload, error details, chat messages)
//! may hold it: it is stored as JSON text, where it stays escaped.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde_json::Value;

use crate::error::ApiError;

/// Fields of a JSON body whose values are free-form JSON, stored as such: a NUL character may be
/// anywhere under them.
const FREE_FORM: &[&str] = &["input", "output", "details", "messages"];

const MESSAGE: &str = "must not contain the NUL character (%00, \\u0000)";

/// The middleware: refuses a request whose decoded path or query holds a NUL character.
pub async fn refuse_in_url(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    if let Some(field) = nul_in_path(req.uri().path(), route.as_deref()) {
        return ApiError::invalid(&field, MESSAGE).into_response();
    }
    if let Some(field) = req.uri().query().and_then(nul_in_query) {
        return ApiError::invalid(&field, MESSAGE).into_response();
    }
    next.run(req).await
}

fn has_nul(raw: &str) -> bool {
    raw.contains("%00")
}

/// The path parameter (named as in the route, `{workflow_id}` → `workflow_id`) whose decoded
/// value holds a NUL character; `path` when the segment is not a parameter.
fn nul_in_path(path: &str, route: Option<&str>) -> Option<String> {
    if !has_nul(path) {
        return None;
    }
    let index = path.split('/').position(has_nul)?;
    let name = route
        .and_then(|r| r.split('/').nth(index))
        .and_then(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.trim_start_matches('*').to_string());
    Some(name.unwrap_or_else(|| "path".into()))
}

/// The query parameter whose decoded name or value holds a NUL character.
fn nul_in_query(query: &str) -> Option<String> {
    if !has_nul(query) {
        return None;
    }
    query.split('&').find(|pair| has_nul(pair)).map(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let name = percent_decode_str(&key.replace('+', " ")).decode_utf8_lossy().into_owned();
        if name.contains('\0') || name.is_empty() {
            "query".to_string()
        } else {
            name
        }
    })
}

/// Refuses a NUL character in the strings and keys of a JSON body, outside its free-form
/// fields; the error names the field (`items[2].token`).
pub fn check_json(bytes: &[u8]) -> Result<(), ApiError> {
    // JSON has one way to write NUL in a string: the escape `\u0000` (any case of hex digits).
    if !bytes.windows(6).any(|w| w[0] == b'\\' && w[1] == b'u' && w[2..].iter().all(|b| *b == b'0')) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else { return Ok(()) };
    match find(&value, &mut String::new()) {
        Some(path) => Err(ApiError::invalid(if path.is_empty() { "body" } else { &path }, MESSAGE)),
        None => Ok(()),
    }
}

fn find(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.clone()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = find(v, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k.replace('\0', "\\u0000"));
            let found = if k.contains('\0') {
                Some(path.clone())
            } else if FREE_FORM.contains(&k.as_str()) {
                None
            } else {
                find(v, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn path_parameters_are_named_after_the_route() {
        let route = Some("/v1/executions/{workflow_id}/signals/{name}");
        assert_eq!(nul_in_path("/v1/executions/a%00b/signals/go", route).as_deref(), Some("workflow_id"));
        assert_eq!(nul_in_path("/v1/executions/ab/signals/g%00", route).as_deref(), Some("name"));
        assert_eq!(nul_in_path("/v1/executions/ab/signals/go", route), None);
        assert_eq!(nul_in_path("/v1/x%00", None).as_deref(), Some("path"));
    }

    #[test]
    fn query_parameters_are_named() {
        assert_eq!(nul_in_query("limit=5&workflow=a%00").as_deref(), Some("workflow"));
        assert_eq!(nul_in_query("run%00=1").as_deref(), Some("query"));
        assert_eq!(nul_in_query("workflow=a%2500"), None, "the text `%00`, written %2500, is no NUL");
        assert_eq!(nul_in_query("workflow=a"), None);
    }

    #[test]
    fn json_strings_are_checked_outside_free_form_fields() {
        assert!(check_json(br#"{"workflow": "a", "input": {"s": "\u0000"}}"#).is_ok());
        let e = check_json(br#"{"workflow_id": "a\u0000"}"#).unwrap_err();
        assert_eq!(e.details["field"], "workflow_id");
        let e = check_json(br#"{"items": [{"token": "t", "output": "\u0000"}, {"token": "\u0000"}]}"#).unwrap_err();
        assert_eq!(e.details["field"], "items[1].token");
        let e = check_json(br#""\u0000""#).unwrap_err();
        assert_eq!(e.details["field"], "body");
        assert!(check_json(br#"{"a": "\\u0000"}"#).is_ok(), "an escaped backslash is not a NUL");
    }
}
