//! How every endpoint answers a failure: a JSON body `{"error": "...", "kind": "..."}` with
//! its status, and `Retry-After` on a 503, so agents and operators' tools handle errors of
//! ingest and of the read API alike. Also the one way the read handlers call the blocking
//! store. A leaf module: the handler modules import it, it imports none of them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::error::StoreError;

/// `Retry-After` seconds sent with a 503.
pub const RETRY_AFTER_S: u64 = 5;

/// A JSON error response; a 503 carries `Retry-After: retry_after_s`.
pub(super) fn json_error(status: StatusCode, kind: &str, message: &str, retry_after_s: u64) -> Response {
    let mut r = (status, Json(json!({"error": message, "kind": kind}))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    }
    r
}

/// An API error: its status, a machine-readable kind and a message, served as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// Its status and message (for a page rather than JSON).
    pub(super) fn parts(self) -> (StatusCode, String) {
        (self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_error(self.status, self.kind, &self.message, RETRY_AFTER_S)
    }
}

pub(super) fn api_error(status: StatusCode, kind: &'static str, message: impl std::fmt::Display) -> ApiError {
    ApiError { status, kind, message: message.to_string() }
}

pub(super) fn error(status: StatusCode, kind: &'static str, message: impl std::fmt::Display) -> Response {
    api_error(status, kind, message).into_response()
}

pub(super) fn store_error(e: &StoreError) -> ApiError {
    tracing::warn!(error = %e, "read API: storage failed");
    if e.is_transient() {
        api_error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", e)
    } else {
        api_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", "storage error")
    }
}

/// Runs a blocking storage read off the reactor.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(&e)),
        Err(join) => Err(store_error(&StoreError::Unavailable(format!("read task failed: {join}")))),
    }
}
