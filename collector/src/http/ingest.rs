//! `POST /v1/reports`: a signed, gzip-compressed [`kycd_protocol::ReportBatch`] (see
//! [`crate::ingest`]) → 200 [`kycd_protocol::ReportAck`]. Errors are JSON
//! `{"error": "...", "kind": "..."}`: 400 (`Malformed`, `InvalidRecord`, `HostMismatch`),
//! 401 (`BadSignature`, `UnknownHost`), 409 (`SeqConflict`, permanent), 413 (`TooLarge`),
//! 415 (`UnsupportedEncoding`), 503 + `Retry-After` (`Unavailable`: the database is busy or
//! unavailable; `ClockAhead`: a window ends in the future by the collector's clock, by less
//! than a day; retry), 500 (`Internal`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use kycd_protocol::clock::unix_now;
use kycd_protocol::wire::SIGNATURE_HEADER;
use tracing::{debug, warn};

use super::response::{json_error, RETRY_AFTER_S};
use crate::ingest::{claimed_kid, IngestError, Ingestor};
use crate::store::error::StoreError;

/// HTTP status of an ingest error.
pub fn status_of(error: &IngestError) -> StatusCode {
    match error.kind() {
        "BadSignature" | "UnknownHost" => StatusCode::UNAUTHORIZED,
        "UnsupportedEncoding" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "TooLarge" => StatusCode::PAYLOAD_TOO_LARGE,
        "Malformed" | "HostMismatch" | "InvalidRecord" => StatusCode::BAD_REQUEST,
        "SeqConflict" => StatusCode::CONFLICT,
        "Unavailable" | "ClockAhead" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(ingestor: &Ingestor, error: &IngestError, host: Option<&str>) -> Response {
    ingestor.counters().refused(error.kind());
    let status = status_of(error);
    let kind = error.kind();
    let host = host.unwrap_or("-");
    if status.is_server_error() {
        warn!(host, kind, error = %error, "report not stored");
    } else {
        warn!(host, kind, error = %error, "report rejected");
    }
    json_error(status, kind, &error.to_string(), error.retry_after_s().unwrap_or(RETRY_AFTER_S))
}

pub(super) async fn post_reports(
    State(ingestor): State<Arc<Ingestor>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes().to_vec());
    let host = signature.as_deref().and_then(claimed_kid);
    let host = host.as_deref();
    let gzip =
        headers.get(header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if !gzip {
        return error_response(&ingestor, &IngestError::UnsupportedEncoding, host);
    }
    let body = match body {
        Ok(body) => body,
        Err(BytesRejection::FailedToBufferBody(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = ingestor.limits().max_body_bytes;
            return error_response(&ingestor, &IngestError::TooLarge { what: "body", limit }, host);
        }
        Err(e) => {
            return error_response(&ingestor, &IngestError::Malformed(format!("reading the body: {e}")), host)
        }
    };
    let Some(signature) = signature else {
        return error_response(
            &ingestor,
            &IngestError::BadSignature(format!("no {SIGNATURE_HEADER} header")),
            host,
        );
    };
    let pipeline = Arc::clone(&ingestor);
    let result = tokio::task::spawn_blocking(move || pipeline.ingest(&signature, &body, unix_now())).await;
    match result {
        Ok(Ok(ingested)) => {
            ingestor.counters().stored(ingested.records);
            debug!(
                host,
                epoch = ingested.epoch,
                records = ingested.records,
                acked_seq = ingested.ack.acked_seq,
                "report stored"
            );
            Json(ingested.ack).into_response()
        }
        Ok(Err(e)) => error_response(&ingestor, &e, host),
        Err(join) => {
            let e = IngestError::Store(StoreError::Unavailable(format!("ingest task failed: {join}")));
            error_response(&ingestor, &e, host)
        }
    }
}
