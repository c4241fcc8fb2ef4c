//! The agent's one outbound HTTPS client builder (report uploads, policy fetches): every
//! request the agent makes goes out with the same TLS stack, trust store, redirect policy and
//! user agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The CA file cannot be read or parsed.
    #[error("{path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client cannot be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// The agent's outbound HTTPS client: rustls (ring), the system trust store plus the PEM
/// certificates in `ca_file`, no redirects (a redirect could carry a signed body or the
/// policy request elsewhere), the given timeouts.
pub fn https_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, HttpClientError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .user_agent(concat!("kycd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let ca_err = |reason: String| HttpClientError::CaFile { path: path.to_owned(), reason };
        let pem = crate::fsutil::read_regular_file(path, 1 << 20).map_err(|e| ca_err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(HttpClientError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(1);
        assert!(https_client(None, t, t).is_ok());
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = https_client(Some(&empty), t, t).unwrap_err();
        assert!(matches!(err, HttpClientError::CaFile { .. }), "{err}");
        let err = https_client(Some(&dir.path().join("missing.pem")), t, t).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
