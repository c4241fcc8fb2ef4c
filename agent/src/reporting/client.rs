//! The agent's outbound HTTPS client (report uploads, policy fetches).

use std::path::Path;
use std::time::Duration;

use super::upload::{UploadError, UploaderOptions};

/// Builds the HTTPS client: rustls (ring), the system trust store plus `ca_file`, no
/// redirects, timeouts.
pub fn build_client(options: &UploaderOptions) -> Result<reqwest::Client, UploadError> {
    https_client(options.ca_file.as_deref(), options.connect_timeout, options.request_timeout)
}

/// The agent's outbound HTTPS client (uploads, policy fetches): rustls (ring), the system
/// trust store plus the PEM certificates in `ca_file`, no redirects, the given timeouts.
pub fn https_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, UploadError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .user_agent(concat!("kycd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let ca_err = |reason: String| UploadError::CaFile { path: path.to_owned(), reason };
        let pem = crate::fsutil::read_regular_file(path, 1 << 20).map_err(|e| ca_err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(UploadError::Client)
}
