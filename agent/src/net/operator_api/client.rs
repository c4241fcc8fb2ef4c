//! The operator socket's client: one HTTP/1.1 request over the Unix socket (`kycctl`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (agent down, wrong path, no permission).
    #[error("cannot reach the agent at {path}: {source}")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the agent: {0}")]
    Http(String),
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends one request to the agent's socket and returns the status and the JSON body (or
/// `null` when the body is not JSON).
pub async fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    use http_body_util::{BodyExt as _, Full};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Unreachable { path: socket.to_owned(), source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "kycd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes =
        response.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?.to_bytes();
    driver.abort();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
}
