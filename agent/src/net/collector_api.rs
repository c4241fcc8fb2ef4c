//! The collector-facing API (`[collector_api]`, default `[::]:9477`): HTTPS with rustls.
//!
//! - `GET /v1/attestation?nonce=N` → a host statement (`typ: kyc-host-statement+jwt`,
//!   `application/jwt`) signed with the host key: host id, time, the nonce echoed (16–64
//!   URL-safe characters, else 400), agent and policy versions, every workload with its
//!   tenant, attestation digest and expiry, verdict and conditions, and the GPU inventory.
//!   With `&v=2`, the same statement digest-bound (`head~body`,
//!   [`kycd_protocol::HostStatementHead`]): only a small head is signed per request.
//! - `GET /metrics` → Prometheus text.
//! - `GET /healthz` (live) and `GET /readyz` (state loaded and enforcement reconciled: the
//!   server starts only then), unauthenticated.
//!
//! Authentication: mTLS against `client_ca_file`, and/or a bearer token from
//! `bearer_token_file` (compared in constant time). Plaintext only with an explicit
//! `insecure_plaintext = true`, and only on a loopback address. The statement's content is
//! a snapshot the daemon's main loop publishes (a watch channel) whenever it changes, so
//! statements never queue behind the main loop. Each snapshot is serialised once, when it
//! changes ([`PreparedStatement`]); each request splices its nonce, the time and the uptime
//! into that and signs it here. Metrics go through the main loop's bounded request channel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kycd_protocol::wire::agent_api;
use kycd_protocol::{HostStatementClaims, PrivateJwk};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::CollectorApiConfig;
use crate::net::operator_api::ApiRequest;
pub use crate::net::statement::valid_nonce;
use crate::net::statement::PreparedStatement;

/// How long a statement is valid: a point-in-time answer.
const STATEMENT_TTL_S: i64 = 60;
/// How long a request waits for the main loop (the idle timeout, 30 s, exceeds it).
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the collector API cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// A certificate, key or CA file cannot be used.
    #[error("{path}: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS configuration is inconsistent.
    #[error("collector_api: {0}")]
    Config(String),
    /// The listen address cannot be bound.
    #[error("collector_api.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The statement content the main loop publishes (nonce and times are filled per request).
pub type StatementSnapshot = tokio::sync::watch::Receiver<Arc<HostStatementClaims>>;

/// A bound, configured collector API, ready to [`serve`].
pub struct CollectorApi {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    bearer: Option<Vec<u8>>,
    /// Connection cap (and per IP), header-read and idle timeouts.
    limits: kycd_net::Limits,
}

impl std::fmt::Debug for CollectorApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorApi")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("bearer", &self.bearer.is_some())
            .finish()
    }
}

impl CollectorApi {
    /// The bound address (for tests binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

fn tls_err(path: &Path, reason: impl std::fmt::Display) -> HttpsError {
    HttpsError::Tls { path: path.to_owned(), reason: reason.to_string() }
}

fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, HttpsError> {
    use rustls::pki_types::pem::PemObject as _;
    let certs: Result<Vec<_>, _> =
        rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| tls_err(path, e))?.collect();
    let certs = certs.map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Builds the rustls configuration and binds `config.listen`. Refuses plaintext unless
/// `insecure_plaintext` and a loopback address, and refuses to serve without any
/// authentication over TLS.
pub async fn bind(config: &CollectorApiConfig) -> Result<CollectorApi, HttpsError> {
    use rustls::pki_types::pem::PemObject as _;
    let addr: SocketAddr = config
        .listen
        .parse()
        .map_err(|e| HttpsError::Config(format!("listen {:?} is not IP:PORT ({e})", config.listen)))?;
    let bearer = match &config.bearer_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).map_err(|e| tls_err(path, e))?;
            let token = token.trim().as_bytes().to_vec();
            if token.len() < 16 {
                return Err(tls_err(path, "the bearer token must be at least 16 characters"));
            }
            Some(token)
        }
        None => None,
    };
    let tls = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| HttpsError::Config(e.to_string()))?;
            let builder = match &config.client_ca_file {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in read_certs(ca)? {
                        roots.add(c).map_err(|e| tls_err(ca, e))?;
                    }
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .map_err(|e| tls_err(ca, e))?;
                    builder.with_client_cert_verifier(verifier)
                }
                None if bearer.is_some() => builder.with_no_client_auth(),
                None => {
                    return Err(HttpsError::Config(
                        "set client_ca_file (mTLS) or bearer_token_file: statements name tenants".into(),
                    ))
                }
            };
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
            let server = builder.with_single_cert(read_certs(cert)?, key).map_err(|e| tls_err(cert, e))?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
        }
        (None, None) if config.insecure_plaintext => {
            if !addr.ip().is_loopback() {
                return Err(HttpsError::Config(format!(
                    "insecure_plaintext is allowed on a loopback address only, not {addr}"
                )));
            }
            warn!(%addr, "collector API in PLAINTEXT (insecure_plaintext = true)");
            None
        }
        _ => {
            return Err(HttpsError::Config(
                "set both cert_file and key_file (or insecure_plaintext on loopback)".into(),
            ))
        }
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpsError::Bind { addr: config.listen.clone(), source })?;
    Ok(CollectorApi { listener, tls, bearer, limits: config.limits() })
}

#[derive(Clone)]
struct AppState {
    requests: mpsc::Sender<ApiRequest>,
    /// The current snapshot, serialised (`None` when it cannot be: statements are refused).
    prepared: tokio::sync::watch::Receiver<Option<Arc<PreparedStatement>>>,
    key: Arc<PrivateJwk>,
    bearer: Option<Arc<Vec<u8>>>,
}

fn prepare(claims: &HostStatementClaims) -> Option<Arc<PreparedStatement>> {
    match PreparedStatement::new(claims) {
        Ok(prepared) => Some(Arc::new(prepared)),
        Err(e) => {
            warn!(error = %e, "cannot serialise the host statement");
            None
        }
    }
}

/// Re-serialises the statement whenever the main loop publishes a new snapshot, until
/// `shutdown` (or until the main loop is gone).
async fn keep_prepared(
    mut snapshot: StatementSnapshot,
    prepared: tokio::sync::watch::Sender<Option<Arc<PreparedStatement>>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = snapshot.changed() => {
                if changed.is_err() {
                    return;
                }
                let claims = Arc::clone(&snapshot.borrow_and_update());
                prepared.send_replace(prepare(&claims));
            }
        }
    }
}

/// Serves until `shutdown`. `key` signs statements (the host key); `snapshot` is their
/// content.
pub async fn serve(
    api: CollectorApi,
    requests: mpsc::Sender<ApiRequest>,
    snapshot: StatementSnapshot,
    key: Arc<PrivateJwk>,
    stats: Arc<kycd_net::ConnStats>,
    shutdown: CancellationToken,
) {
    let mut snapshot = snapshot;
    let first = Arc::clone(&snapshot.borrow_and_update());
    let (prepared_tx, prepared) = tokio::sync::watch::channel(prepare(&first));
    let state = AppState { requests, prepared, key, bearer: api.bearer.map(Arc::new) };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route(agent_api::METRICS, get(metrics))
        .route(agent_api::ATTESTATION, get(attestation))
        .with_state(state);
    let limits = api.limits;
    let tls = api.tls;
    // The TLS handshake runs in the connection's task, bounded by the header-read timeout.
    let handshake = move |tcp: tokio::net::TcpStream, peer: SocketAddr| {
        let tls = tls.clone();
        async move {
            match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => Some((Either::Left(stream), peer)),
                    Err(e) => {
                        debug!(%peer, error = %e, "collector API: TLS handshake refused");
                        None
                    }
                },
                None => Some((Either::Right(tcp), peer)),
            }
        }
    };
    tokio::join!(
        kycd_net::serve(api.listener, app, limits, stats, shutdown.clone(), kycd_net::peer_ip, handshake),
        keep_prepared(snapshot, prepared_tx, shutdown),
    );
    info!("collector API stopped");
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({"error": message}))).into_response()
}

/// Constant-time comparison of the presented bearer token with the configured one.
fn bearer_ok(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.bearer else { return true };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    if presented.len() != expected.len() {
        return false;
    }
    presented.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn attestation(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if !bearer_ok(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    // The nonce alphabet needs no percent-decoding: anything encoded is invalid anyway.
    let params = || query.as_deref().unwrap_or("").split('&');
    let nonce = params().find_map(|kv| kv.strip_prefix("nonce="));
    let digest_bound = params().any(|kv| kv == agent_api::STATEMENT_V2_PARAM);
    let have = params().find_map(|kv| kv.strip_prefix(agent_api::STATEMENT_HAVE_PARAM)?.strip_prefix('='));
    let Some(nonce) = nonce.filter(|n| valid_nonce(n)) else {
        return error(StatusCode::BAD_REQUEST, "nonce must be 16-64 URL-safe characters (A-Z a-z 0-9 - _)");
    };
    let Some(prepared) = state.prepared.borrow().clone() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign the statement");
    };
    let iat = kycd_protocol::clock::unix_now();
    let (exp, uptime_s) = (iat + STATEMENT_TTL_S, crate::host::uptime_s());
    let signed = if digest_bound {
        // The body only when the collector does not hold the current one.
        let with_body = have != Some(prepared.body_sha256());
        prepared
            .sign_split(&state.key, nonce, iat, exp, uptime_s, with_body)
            .map(|t| (agent_api::STATEMENT_V2_CONTENT_TYPE, t))
    } else {
        prepared.sign(&state.key, nonce, iat, exp, uptime_s).map(|t| ("application/jwt", t))
    };
    match signed {
        Ok((content_type, token)) => ([(header::CONTENT_TYPE, content_type)], token).into_response(),
        Err(e) => {
            warn!(error = %e, "cannot sign a host statement");
            error(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign the statement")
        }
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !bearer_ok(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let (reply, answer) = oneshot::channel();
    if state.requests.try_send(ApiRequest::Metrics(reply)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is busy; retry");
    }
    match tokio::time::timeout(AGENT_TIMEOUT, answer).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "the agent did not answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_16_to_64_url_safe_characters() {
        assert!(valid_nonce("abcdefghijklmnop") && valid_nonce(&"A-_9".repeat(16)));
        for bad in ["short", &"a".repeat(65), "abcdefghijklmno=", "abcdefghijklmno/", "abcdefghijklmno ", ""]
        {
            assert!(!valid_nonce(bad), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Pki {
        dir: tempfile::TempDir,
        ca: rcgen::CertifiedKey,
    }

    impl Pki {
        fn new() -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
            Pki { dir, ca: rcgen::CertifiedKey { cert, key_pair: key } }
        }

        /// A certificate for `name` signed by the CA: (cert PEM, key PEM).
        fn issue(&self, name: &str) -> (String, String) {
            let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca.cert, &self.ca.key_pair).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn server_config(&self, mtls: bool, bearer: Option<&str>) -> CollectorApiConfig {
            let (cert, key) = self.issue("localhost");
            std::fs::write(self.path("server.crt"), cert).unwrap();
            std::fs::write(self.path("server.key"), key).unwrap();
            if let Some(token) = bearer {
                std::fs::write(self.path("token"), token).unwrap();
            }
            CollectorApiConfig {
                enabled: true,
                listen: "127.0.0.1:0".into(),
                cert_file: Some(self.path("server.crt")),
                key_file: Some(self.path("server.key")),
                client_ca_file: mtls.then(|| self.path("ca.crt")),
                bearer_token_file: bearer.map(|_| self.path("token")),
                insecure_plaintext: false,
                ..CollectorApiConfig::default()
            }
        }

        fn client(&self, with_cert: bool) -> tokio_rustls::TlsConnector {
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.cert.der().clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
            let config = if with_cert {
                let (cert, key) = self.issue("collector");
                let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            } else {
                builder.with_no_client_auth()
            };
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
    }

    /// A fake main loop answering statements and metrics.
    fn fake_agent() -> mpsc::Sender<ApiRequest> {
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if let ApiRequest::Metrics(reply) = request {
                    let _ = reply.send("kycd_policy_version 7\n".into());
                }
            }
        });
        tx
    }

    fn snapshot() -> StatementSnapshot {
        let claims = HostStatementClaims {
            iss: "node-1".into(),
            iat: 0,
            exp: 0,
            nonce: String::new(),
            agent_version: "0.1.0".into(),
            policy_version: Some(7),
            workloads: vec![],
            gpus: vec![],
            host: None,
        };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(claims));
        std::mem::forget(tx); // the snapshot never changes in these tests
        rx
    }

    /// One HTTPS request; `None` when the TLS handshake or the exchange fails.
    async fn get(
        addr: SocketAddr,
        tls: &tokio_rustls::TlsConnector,
        path: &str,
        token: Option<&str>,
    ) -> Option<(u16, String)> {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
        let mut stream = tls.connect(name, tcp).await.ok()?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    }

    #[tokio::test]
    async fn mtls_accepts_client_certificates_from_the_ca_only() {
        let pki = Pki::new();
        let api = bind(&pki.server_config(true, None)).await.unwrap();
        let addr = api.local_addr().unwrap();
        let key = Arc::new(PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "node-1").unwrap());
        let jwks = kycd_protocol::Jwks::from_keys([key.public_key()]).unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(api, fake_agent(), snapshot(), key, Arc::default(), stop.clone()));
        let nonce = "n0nce-0123456789_abc";
        let (status, token) =
            get(addr, &pki.client(true), &format!("/v1/attestation?nonce={nonce}"), None).await.unwrap();
        assert_eq!(status, 200, "{token}");
        let options = kycd_protocol::VerifyOptions::default();
        let now = kycd_protocol::clock::unix_now();
        let verified =
            kycd_protocol::verify::<HostStatementClaims>(token.trim().as_bytes(), &jwks, &options, now)
                .unwrap();
        assert_eq!(verified.claims.nonce, nonce);
        assert_eq!(verified.claims.policy_version, Some(7));
        assert_eq!(verified.claims.exp, verified.claims.iat + STATEMENT_TTL_S);
        assert!((verified.claims.iat - now).abs() <= 2);
        // `v=2`: the digest-bound form of the same statement.
        let (status, full) =
            get(addr, &pki.client(true), &format!("/v1/attestation?v=2&nonce={nonce}"), None).await.unwrap();
        assert_eq!(status, 200, "{full}");
        let split =
            kycd_protocol::verify_split_statement(full.trim().as_bytes(), &jwks, &options, now).unwrap();
        assert_eq!((split.claims.nonce.as_str(), split.claims.policy_version), (nonce, Some(7)));
        assert_eq!(split.claims.workloads, verified.claims.workloads);
        // A collector that holds the current body gets the head alone.
        let body = kycd_protocol::statement_body_part(full.trim().as_bytes()).unwrap().to_vec();
        let digest = kycd_protocol::statement_body_digest(&kycd_protocol::b64::decode(&body).unwrap());
        let path = format!("/v1/attestation?v=2&nonce={nonce}&have={digest}");
        let (status, head) = get(addr, &pki.client(true), &path, None).await.unwrap();
        assert!(status == 200 && head.trim().ends_with('~'), "{head}");
        let joined = [head.trim().as_bytes(), &body].concat();
        assert!(kycd_protocol::verify_split_statement(&joined, &jwks, &options, now).is_ok());
        // One it holds but is no longer (or never was) the current one: the body comes.
        let path = format!("/v1/attestation?v=2&nonce={nonce}&have={}", "A".repeat(43));
        let (_, stale) = get(addr, &pki.client(true), &path, None).await.unwrap();
        assert_eq!(kycd_protocol::statement_body_part(stale.trim().as_bytes()), Some(&body[..]));
        let (status, body) = get(addr, &pki.client(true), "/v1/attestation?nonce=short", None).await.unwrap();
        assert_eq!(status, 400, "{body}");
        let (status, body) = get(addr, &pki.client(true), "/metrics", None).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "kycd_policy_version 7\n"));
        assert!(
            get(addr, &pki.client(false), "/healthz", None).await.is_none(),
            "no client certificate, no TLS session"
        );
        let stranger = Pki::new();
        assert!(
            get(addr, &stranger.client(true), "/healthz", None).await.is_none(),
            "a certificate from another CA"
        );
        stop.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn bearer_tokens_are_required_when_configured_and_plaintext_only_on_loopback() {
        let pki = Pki::new();
        let api = bind(&pki.server_config(false, Some("s3cret-token-0123456789"))).await.unwrap();
        let addr = api.local_addr().unwrap();
        let key = Arc::new(PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "node-1").unwrap());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(api, fake_agent(), snapshot(), key, Arc::default(), stop.clone()));
        let client = pki.client(false);
        let path = "/v1/attestation?nonce=0123456789abcdef";
        assert_eq!(get(addr, &client, path, None).await.unwrap().0, 401);
        assert_eq!(get(addr, &client, path, Some("wrong-token-0123456789")).await.unwrap().0, 401);
        assert_eq!(get(addr, &client, path, Some("s3cret-token-0123456789")).await.unwrap().0, 200);
        assert_eq!(get(addr, &client, "/healthz", None).await.unwrap().0, 200, "liveness is open");
        stop.cancel();
        server.await.unwrap();

        // No authentication at all over TLS: refused at start.
        let err = bind(&pki.server_config(false, None)).await.unwrap_err();
        assert!(err.to_string().contains("client_ca_file"), "{err}");
        // Plaintext: loopback only.
        let plain = |listen: &str| CollectorApiConfig {
            enabled: true,
            listen: listen.into(),
            insecure_plaintext: true,
            ..CollectorApiConfig::default()
        };
        let err = bind(&plain("0.0.0.0:0")).await.unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(bind(&plain("127.0.0.1:0")).await.is_ok());
    }
}
