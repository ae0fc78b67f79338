//! Request bodies: read whole before anything is done (a request cut off is never acted
//! on), at most `max` bytes, within the request timeout; JSON parsed into typed structs
//! whose errors name the field (`messages[0].content: invalid type…`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// How bodies are read.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// The most bytes of a body.
    pub max: usize,
    /// The longest a whole body may take to arrive.
    pub timeout: Duration,
}

/// The whole body, or the error to answer: 413 past `max`, 408 past the timeout, 400 when
/// the client stopped sending before its `Content-Length`.
pub async fn read(body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes (--max-body)", limits.max),
        )
    };
    // A Content-Length past the limit is refused before a byte of the body is waited for.
    if body.size_hint().lower() > limits.max as u64 {
        return Err(too_large());
    }
    let collect = Limited::new(body, limits.max).collect();
    match tokio::time::timeout(limits.timeout, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {:?} (--request-timeout)", limits.timeout),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad(format!("the body was cut off: {e}"))),
    }
}

/// `bytes` as a `T`; an empty body is `{}`. Wrong types, unknown fields (where `T` denies
/// them) and bad values are a 400 naming the field.
pub fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::bad(format!("the body is not the JSON expected: {inner}"))
        } else {
            ApiError::bad(format!("`{path}`: {inner}"))
        }
    })?;
    // One JSON value and nothing after it.
    de.end().map_err(|e| ApiError::bad(format!("the body has more after its JSON value: {e}")))?;
    Ok(v)
}

/// Reads and parses a JSON body.
pub async fn read_json<T: DeserializeOwned>(body: Body, limits: BodyLimits) -> Result<T, ApiError> {
    json(&read(body, limits).await?)
}
