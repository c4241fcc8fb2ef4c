//! The uploader's HTTPS client: the agent's one client builder ([`crate::net::client`]) with
//! the uploader's CA file and timeouts.

use super::upload::{UploadError, UploaderOptions};

/// Builds the uploader's client: rustls (ring), the system trust store plus `ca_file`, no
/// redirects, the configured timeouts.
pub fn build_client(options: &UploaderOptions) -> Result<reqwest::Client, UploadError> {
    let client = crate::net::client::https_client(
        options.ca_file.as_deref(),
        options.connect_timeout,
        options.request_timeout,
    )?;
    Ok(client)
}
