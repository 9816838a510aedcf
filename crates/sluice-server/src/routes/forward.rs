//! Sending a request on to the node that owns an execution. With several nodes on one database,
//! only the owner of an execution may append to its history; a signal, cancel or redrive that
//! reaches another node is refused by the store's fence and sent on here, once, with the caller's
//! credentials, and the owner's answer is relayed as it is.

use axum::body::Body as AxumBody;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sluice_engine::Error as EngineError;

use crate::error::ApiError;
use crate::AppState;

/// Marks a request another node sent on, so that it is never sent on again.
pub const FORWARDED: &str = "x-sluice-forwarded";

/// The request headers that travel with it.
const KEPT: [&str; 5] = ["authorization", "content-type", "traceparent", "x-trace-id", "idempotency-key"];

/// Whether `e` is the store refusing a change to an execution another node owns.
pub fn is_fenced(e: &EngineError) -> bool {
    matches!(e, EngineError::Conflict(m) if m.contains("fenced"))
}

/// The request as it arrived.
pub struct Request<'a> {
    pub method: Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: bytes::Bytes,
}

/// Sends the request to the owner of `workflow_id` and answers with its answer; `refused` is the
/// answer when there is no owner to send it to (or the request was sent on already).
pub async fn to_owner(
    app: &AppState,
    tenant: &str,
    workflow_id: &str,
    request: Request<'_>,
    refused: EngineError,
) -> Result<Response, ApiError> {
    let Request { method, uri, headers, body } = request;
    let path_and_query = uri.path_and_query().map_or_else(|| uri.path(), |pq| pq.as_str());
    if headers.contains_key(FORWARDED) {
        return Err(refused.into());
    }
    let Some(owner) = app.engine.owner_elsewhere(tenant, workflow_id).await? else {
        return Err(refused.into());
    };
    let mut req = app.forwarder.request(method, format!("{owner}{path_and_query}")).header(FORWARDED, "1");
    for name in KEPT {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.clone());
        }
    }
    let answer = req.body(body).send().await.map_err(|e| {
        tracing::warn!(owner = %owner, error = %e, "the node that owns the execution did not answer");
        ApiError::new(
            "owner_unavailable",
            "the node that owns this execution did not answer; retry (another node takes it over when its lease expires)",
        )
    })?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get("content-type").cloned();
    let retry_after = answer.headers().get("retry-after").cloned();
    let bytes = answer.bytes().await.map_err(|e| {
        tracing::warn!(owner = %owner, error = %e, "the owner's answer was cut");
        ApiError::new("owner_unavailable", "the node that owns this execution did not answer in full; retry")
    })?;
    tracing::debug!(owner = %owner, status = status.as_u16(), "request sent on to the owner");
    let mut resp = (status, AxumBody::from(bytes)).into_response();
    for (name, value) in [("content-type", content_type), ("retry-after", retry_after)] {
        if let Some(v) = value {
            resp.headers_mut().insert(HeaderName::from_static(name), v);
        }
    }
    resp.headers_mut().insert(HeaderName::from_static(FORWARDED), HeaderValue::from_static("1"));
    Ok(resp)
}
