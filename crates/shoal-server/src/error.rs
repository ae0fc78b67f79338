//! The daemon's errors as HTTP answers, in one place: every handler returns [`ApiError`],
//! and [`ApiError::from`] maps the registry's, the store's and the actors' errors to their
//! status. The body is the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`,
//! `code` always a string (the error's own, such as `context_length_exceeded`, or what its
//! status means).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shoal_actor::{ActorError, RegistryError, SnapshotError};

/// Client-given or file-derived text as an error may show it: its first `most` characters,
/// control and non-ASCII characters escaped (one rule for every message of the daemon).
pub fn shown(s: &str, most: usize) -> String {
    s.chars().take(most).flat_map(char::escape_default).collect()
}

/// An error answer: a status, a message, and for the OpenAI endpoint its `code` and `param`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, and what to do about it.
    pub message: String,
    /// OpenAI's `code` (`context_length_exceeded`, `model_not_found`…), when there is one.
    pub code: Option<&'static str>,
    /// OpenAI's `param`: the request field at fault.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code: None, param: None }
    }

    /// A 400: the request is wrong.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// With OpenAI's `code`.
    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// With OpenAI's `param`.
    pub fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param,
                         "code": self.code.unwrap_or_else(|| status_code(self.status))}})
    }
}

/// OpenAI's `code` (a string) for an error that names none: what its status means.
fn status_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 => "invalid_api_key",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "request_too_large",
        422 => "unprocessable",
        429 => "rate_limit_exceeded",
        431 => "headers_too_large",
        503 => "overloaded",
        _ => "server_error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// The status of a snapshot store's error.
fn snapshot_status(e: &SnapshotError) -> StatusCode {
    match e {
        SnapshotError::BadKey { .. } => StatusCode::BAD_REQUEST,
        SnapshotError::NotFound { .. } => StatusCode::NOT_FOUND,
        SnapshotError::NotASnapshotDir { .. } => StatusCode::CONFLICT,
        SnapshotError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        // The snapshot's fault (a crafted or damaged file, another module, a model this
        // daemon lacks, a state past the limits), not the daemon's.
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// The message of a store's error for a client: without the daemon's own paths.
fn snapshot_message(e: &SnapshotError) -> String {
    match e {
        SnapshotError::NotFound { .. } => "no snapshot under that key (see GET /v1/snapshots)".into(),
        SnapshotError::NotASnapshotDir { .. } => {
            "that key's directory in the store holds files shoal did not write; nothing was written or deleted".into()
        }
        e => e.to_string(),
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        if let RegistryError::Actor(ActorError::Snapshot(s)) = &e {
            return ApiError::new(snapshot_status(s), snapshot_message(s));
        }
        let status = match &e {
            RegistryError::NoSuchActor(_) | RegistryError::NoSuchName(_) => StatusCode::NOT_FOUND,
            RegistryError::BadName(_) => StatusCode::BAD_REQUEST,
            RegistryError::NameTaken(_) => StatusCode::CONFLICT,
            RegistryError::WrongState { .. } => StatusCode::CONFLICT,
            RegistryError::TooManyActors { .. } | RegistryError::Actor(ActorError::MailboxFull(_)) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            RegistryError::UnknownModule(_) | RegistryError::NoBackend(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::Actor(ActorError::Snapshot(s)) => snapshot_status(s),
            // The module's fault, not the daemon's.
            RegistryError::Actor(ActorError::InitDeadline(_) | ActorError::Host(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> ApiError {
        ApiError::new(snapshot_status(&e), snapshot_message(&e))
    }
}
