//! Request bodies: read within the size limit and parsed with errors that name the field.

use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Raw body bytes within the limit.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Body(b)),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new("payload_too_large", format!("request body is larger than {MAX_BODY_BYTES} bytes")))
            }
            Err(e) => Err(ApiError::new("invalid_request", format!("could not read the request body: {e}"))),
        }
    }
}

/// A JSON body deserialized into `T`; errors say which field and what was expected.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Body(bytes) = Body::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a whole body as one JSON value: anything but white space after it is refused, and so is
/// a NUL character in a string outside the free-form fields (see [`crate::nul`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = parse_payload(bytes)?;
    crate::nul::check_json(bytes)?;
    Ok(value)
}

/// Like [`parse_json`] for a body that is free-form JSON as a whole (a signal's payload).
pub fn parse_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new("invalid_json", format!("request body is not valid JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::new("invalid_request", format!("request body: {inner}"))
        } else {
            ApiError::invalid(&path, inner.to_string())
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new("invalid_json", format!("request body is not valid JSON: {e}: expected nothing after the value"))
    })?;
    Ok(value)
}
