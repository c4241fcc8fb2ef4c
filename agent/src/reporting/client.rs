//! The agent's outbound HTTPS client (report uploads, policy fetches).

use super::upload::{UploadError, UploaderOptions};
use crate::net::client::HttpClientError;

/// Builds the HTTPS client: rustls (ring), the system trust store plus `ca_file`, no
/// redirects, timeouts.
pub fn build_client(options: &UploaderOptions) -> Result<reqwest::Client, UploadError> {
    crate::net::client::https_client(
        options.ca_file.as_deref(),
        options.connect_timeout,
        options.request_timeout,
    )
    .map_err(|e| match e {
        HttpClientError::CaFile { path, reason } => UploadError::CaFile { path, reason },
        HttpClientError::Client(e) => UploadError::Client(e),
    })
}
