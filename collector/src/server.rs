//! The collector's HTTP server (axum, HTTP/1.1).
//!
//! - `POST /v1/reports`: a signed, gzip-compressed [`kycd_protocol::ReportBatch`] (see
//!   [`crate::ingest`]) → 200 [`kycd_protocol::ReportAck`]. Errors are JSON
//!   `{"error": "...", "kind": "..."}`: 400 (`Malformed`, `InvalidRecord`, `HostMismatch`),
//!   401 (`BadSignature`, `UnknownHost`), 409 (`SeqConflict`, permanent), 413 (`TooLarge`),
//!   415 (`UnsupportedEncoding`), 503 + `Retry-After` (`Unavailable`: the database is busy or
//!   unavailable; `ClockAhead`: a window ends in the future by the collector's clock, by less
//!   than a day; retry), 500 (`Internal`).
//! - `GET /healthz` → `ok`.
//!
//! The listener and the shutdown token are parameters ([`run`]), so tests bind
//! `127.0.0.1:0` and stop the server deterministically.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ingest::{claimed_kid, IngestError, Ingestor};

/// The signature header of `POST /v1/reports`.
pub const SIGNATURE_HEADER: &str = "x-kycd-signature";
/// `Retry-After` seconds sent with a 503.
pub const RETRY_AFTER_S: u64 = 5;

/// The server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Serving failed.
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

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

fn error_response(error: &IngestError, host: Option<&str>) -> Response {
    let status = status_of(error);
    let kind = error.kind();
    let host = host.unwrap_or("-");
    if status.is_server_error() {
        warn!(host, kind, error = %error, "report not stored");
    } else {
        warn!(host, kind, error = %error, "report rejected");
    }
    let body = Json(serde_json::json!({"error": error.to_string(), "kind": kind}));
    let mut response = (status, body).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let after = error.retry_after_s().unwrap_or(RETRY_AFTER_S);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(after));
    }
    response
}

/// Now, Unix seconds.
pub fn unix_now() -> i64 {
    now()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn post_reports(
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
        return error_response(&IngestError::UnsupportedEncoding, host);
    }
    let body = match body {
        Ok(body) => body,
        Err(BytesRejection::FailedToBufferBody(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = ingestor.limits().max_body_bytes;
            return error_response(&IngestError::TooLarge { what: "body", limit }, host);
        }
        Err(e) => return error_response(&IngestError::Malformed(format!("reading the body: {e}")), host),
    };
    let Some(signature) = signature else {
        return error_response(&IngestError::BadSignature(format!("no {SIGNATURE_HEADER} header")), host);
    };
    let pipeline = Arc::clone(&ingestor);
    let result = tokio::task::spawn_blocking(move || pipeline.ingest(&signature, &body, now())).await;
    match result {
        Ok(Ok(ingested)) => {
            debug!(
                host,
                epoch = ingested.epoch,
                records = ingested.records,
                acked_seq = ingested.ack.acked_seq,
                "report stored"
            );
            Json(ingested.ack).into_response()
        }
        Ok(Err(e)) => error_response(&e, host),
        Err(join) => {
            let e = IngestError::Store(crate::store::StoreError::Unavailable(format!(
                "ingest task failed: {join}"
            )));
            error_response(&e, host)
        }
    }
}

/// The collector's routes over `ingestor`.
pub fn router(ingestor: Arc<Ingestor>) -> Router {
    let limit = ingestor.limits().max_body_bytes;
    Router::new()
        .route("/v1/reports", post(post_reports).layer(DefaultBodyLimit::max(limit)))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(ingestor)
}

/// Serves report ingest alone on `listener` until `shutdown` is cancelled (see [`serve`]).
pub async fn run(
    listener: TcpListener,
    ingestor: Arc<Ingestor>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve(listener, router(ingestor), shutdown).await
}

/// The whole collector: report ingest plus the read API and policy endpoint
/// ([`crate::api::router`]).
pub fn app(ingestor: Arc<Ingestor>, api: crate::api::ApiState) -> Router {
    router(ingestor).merge(crate::api::router(api))
}

/// The bounds of the collector's listener (see [`kycd_net`]): what `serve --max-connections`,
/// `--max-connections-per-ip`, `--header-read-timeout-s` and `--idle-timeout-s` default to.
pub const DEFAULT_LIMITS: kycd_net::Limits = kycd_net::Limits {
    // ~12,500 agents uploading once a minute plus polls and exports need a few dozen at once;
    // 1024 leaves room and stays far below LimitNOFILE=65536.
    max_connections: 1024,
    // One agent uploads on one connection at a time; behind a load balancer (one IP for all)
    // set --max-connections-per-ip 0.
    max_per_peer: 64,
    header_read_timeout: std::time::Duration::from_secs(10),
    // Longer than a report's ingest (bounded by the database's busy timeout) and an
    // export's computation, during which no byte moves.
    idle_timeout: std::time::Duration::from_secs(60),
};

/// Serves `app` on `listener` within [`DEFAULT_LIMITS`] until `shutdown` is cancelled (see
/// [`serve_bounded`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve_bounded(listener, app, DEFAULT_LIMITS, Arc::default(), shutdown).await
}

/// Serves `app` on `listener` until `shutdown` is cancelled, within `limits`: connections
/// past the cap (or past the per-IP cap) are refused, a request head must arrive within the
/// header-read timeout and a connection idle past the idle timeout is closed, so clients
/// that never finish cannot starve `/healthz` or ingest. On shutdown it stops accepting and
/// waits for in-flight requests to finish (the caller bounds that with a grace timeout).
/// Handlers see the peer address (`ConnectInfo`), which the read API's loopback rule needs.
pub async fn serve_bounded(
    listener: TcpListener,
    app: Router,
    limits: kycd_net::Limits,
    stats: Arc<kycd_net::ConnStats>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    kycd_net::serve(listener, app, limits, stats, shutdown, kycd_net::peer_ip, kycd_net::plain).await;
    Ok(())
}
