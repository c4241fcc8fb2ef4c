//! End-to-end: the real `kycd` binary fetching its policy from an HTTP server in the test
//! that implements the collector's `GET /v1/policy` contract (200 `application/jose` with an
//! `ETag: "<version>-<16 hex>"`, 304 on a matching `If-None-Match`, 404 with a JSON error
//! when nothing is published), counting requests and recording `If-None-Match`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kycd_protocol::{Algorithm, PrivateJwk};
use serde_json::{json, Value};

use host_support::{http_get, now, promtool_check, Host};
use kycd_test_support::host as host_support;

/// What the server publishes and what it saw.
#[derive(Default)]
struct Published {
    /// (version, token as published).
    policy: Option<(u64, String)>,
    requests: u64,
    /// `If-None-Match` of each request, in order.
    if_none_match: Vec<Option<String>>,
}

type Shared = Arc<Mutex<Published>>;

fn etag(version: u64, token: &str) -> String {
    let digest = kycd_protocol::token_digest(token.as_bytes());
    format!("\"{version}-{}\"", &digest[..16])
}

async fn get_policy(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    let inm = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned);
    s.if_none_match.push(inm.clone());
    let Some((version, token)) = s.policy.clone() else {
        let body = axum::Json(json!({"error": "no policy published", "kind": "NotFound"}));
        return (StatusCode::NOT_FOUND, body).into_response();
    };
    let tag = etag(version, &token);
    if inm.as_deref() == Some(tag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/jose".to_owned()), (header::ETAG, tag)], token)
        .into_response()
}

/// The in-test collector: its own runtime; stopping it drops the runtime, which closes the
/// listener and every open connection (the agent then sees connection errors).
struct PolicyServer {
    rt: Option<tokio::runtime::Runtime>,
    state: Shared,
    port: u16,
    scheme: &'static str,
}

impl PolicyServer {
    fn start() -> Self {
        Self::start_with(None)
    }

    /// Serves over TLS with `tls` when given (the agent then fetches `https://localhost`).
    fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Shared::default();
        let app = axum::Router::new().route("/v1/policy", get(get_policy)).with_state(Arc::clone(&state));
        let scheme = match tls {
            None => {
                rt.spawn(async move { axum::serve(listener, app).await });
                "http"
            }
            Some(acceptor) => {
                rt.spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            // A client that does not trust the certificate fails here.
                            let Ok(stream) = acceptor.accept(tcp).await else { return };
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
                "https"
            }
        };
        PolicyServer { rt: Some(rt), state, port, scheme }
    }

    fn url(&self) -> String {
        let host = if self.scheme == "https" { "localhost" } else { "127.0.0.1" };
        format!("{}://{host}:{}/v1/policy", self.scheme, self.port)
    }

    fn publish(&self, version: u64, token: &str) {
        self.state.lock().unwrap().policy = Some((version, token.to_owned()));
    }

    fn unpublish(&self) {
        self.state.lock().unwrap().policy = None;
    }

    fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    fn if_none_match(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().if_none_match.clone()
    }

    /// Waits until the server has answered `n` more requests than `from`.
    fn wait_requests(&self, from: u64, n: u64, host: &Host) {
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(20);
        while self.requests() < from + n {
            assert!(
                kycd_protocol::clock::monotonic() < deadline,
                "only {} requests; log:\n{}",
                self.requests(),
                host.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A host whose agent fetches from `url` every second; `extra` goes to its main config.
fn fetching_host(url: &str, extra: &str) -> Host {
    let host = Host::new(extra);
    set_fetch(&host, url, "");
    host
}

/// The fetch settings (a conf.d layer), plus `more` lines in `[policy]`.
fn set_fetch(host: &Host, url: &str, more: &str) {
    fs::create_dir_all(host.path("etc/conf.d")).unwrap();
    fs::write(
        host.path("etc/conf.d/50-fetch.toml"),
        format!("[policy]\nfetch_url = \"{url}\"\nfetch_interval_s = 1\nfetch_timeout_s = 5\n{more}"),
    )
    .unwrap();
}

/// A CA (its PEM written to `dir/ca.crt`) and a TLS acceptor for `localhost` it signed.
fn tls_acceptor(dir: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// `kycctl status --json` against the host's agent.
fn status(host: &Host) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["status", "--json", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "kycctl status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_status(host: &Host, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(20);
    loop {
        let s = status(host);
        if pred(&s) {
            return s;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "timed out waiting for {what}: {s:#}\nlog:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn policy(host: &Host, version: u64, prohibited: &[&str]) -> String {
    host.policy_token(version, prohibited, json!({"action": "deny"}), None, &host.authority)
}

#[test]
fn a_fetched_policy_is_enforced_kept_and_survives_the_collector_going_away() {
    let mut server = PolicyServer::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = format!("127.0.0.1:{port}");
    let mut host = fetching_host(
        &server.url(),
        &format!("[collector_api]\nenabled = true\nlisten = \"{api}\"\ninsecure_plaintext = true\n"),
    );
    host.write_policy(1, &["KP"]);
    let v2 = policy(&host, 2, &["KP", "DE"]);
    server.publish(2, &v2);
    host.start();
    host.drop_file("vm-de.jws", host.attestation("vm-de", "DE", now() + 3600).as_bytes());

    // The newer fetched policy is applied, recorded with its source, and enforced.
    let applied = host.wait_for("fetched v2 applied", |r| {
        r["event"]["type"] == "policy_applied" && r["event"]["version"] == 2
    });
    assert_eq!(applied["event"]["source"], server.url());
    let denied = host.wait_for_verdict("libvirt_domain:vm-de", "deny");
    assert_eq!(denied["event"]["decision"]["policy_version"], 2);
    assert_eq!(denied["event"]["decision"]["reasons"][0]["measure_id"], "m-de");
    // Kept in the state directory, exactly as served.
    assert_eq!(fs::read_to_string(host.path("state/fetched-policy.jws")).unwrap(), v2);

    // Later fetches send the ETag and get 304: nothing changes.
    let tag = etag(2, &v2);
    let s = wait_status(&host, "a 304", |s| s["policy_fetch"]["outcome"] == "not_modified");
    assert_eq!(s["policy"]["version"], 2);
    assert!(s["policy"]["source"].as_str().unwrap().starts_with(&server.url()), "{s}");
    assert_eq!(s["policy_fetch"]["etag"], tag.as_str());
    assert_eq!(s["policy_fetch"]["url"], server.url());
    let inm = server.if_none_match();
    assert_eq!(inm[0], None, "the first fetch has no ETag to send");
    assert!(inm[1..].iter().all(|t| t.as_deref() == Some(tag.as_str())), "{inm:?}");
    let applications = host.records().iter().filter(|r| r["event"]["type"] == "policy_applied").count();
    assert_eq!(applications, 2, "v1 from the file, v2 fetched; 304s apply nothing");
    assert!(host.log().contains("policy fetcher started"));
    let human = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["status", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains(&format!("policy fetch: {}", server.url())), "{human}");
    assert!(human.contains("not_modified") && human.contains(&tag), "{human}");

    // The fetch counters on the collector API's /metrics, valid for promtool.
    let (code, metrics) = http_get(&api, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.lines().any(|l| l == "kycd_policy_fetches_total{outcome=\"applied\"} 1"), "{metrics}");
    assert!(metrics.contains("kycd_policy_fetches_total{outcome=\"not_modified\"} "), "{metrics}");
    assert!(metrics.contains("kycd_policy_version 2\n"), "{metrics}");
    let last_success = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kycd_policy_fetch_last_success_timestamp_seconds "))
        .unwrap();
    assert!(last_success.parse::<i64>().unwrap() >= now() - 30, "{metrics}");
    promtool_check(&metrics);

    // The collector goes away: the agent warns, keeps running and keeps enforcing v2.
    server.stop();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(20);
    while !host.log().contains("policy fetch failed") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "no fetch failure logged:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = wait_status(&host, "failure in status", |s| {
        s["policy_fetch"]["outcome"].as_str().unwrap_or("").starts_with("network_error")
    });
    assert_eq!(s["policy"]["version"], 2);
    assert!(host.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the agent keeps running");
    assert_eq!(host.latest_decision("libvirt_domain:vm-de").unwrap()["event"]["decision"]["verdict"], "deny");

    // Restart without the collector: the kept copy is enforced; the older file is
    // superseded, not refused as a rollback.
    host.stop();
    let before = host.records().len();
    host.start();
    let s = status(&host);
    assert_eq!(s["policy"]["version"], 2, "{s}");
    let after: Vec<Value> = host.records().into_iter().skip(before).collect();
    assert!(
        after.iter().any(|r| r["event"]["type"] == "policy_superseded" && r["event"]["version"] == 1),
        "the file's v1 is recorded as superseded"
    );
    assert!(!after.iter().any(|r| r["event"]["type"] == "policy_rejected"), "nothing refused: {after:?}");
    let d = host.wait_for("decided after restart", |r| {
        r["seq"].as_u64().unwrap() as usize >= before && r["event"]["workload"] == "libvirt_domain:vm-de"
    });
    assert_eq!(d["event"]["decision"]["verdict"], "deny");
    assert_eq!(d["event"]["decision"]["policy_version"], 2);

    // A newer file still wins over the kept copy.
    host.write_policy(3, &["KP"]);
    let allowed = host.wait_for_verdict("libvirt_domain:vm-de", "allow");
    assert_eq!(allowed["event"]["decision"]["policy_version"], 3);
    host.stop();
}

#[test]
fn older_forged_expired_and_garbage_fetched_policies_are_refused() {
    let server = PolicyServer::start();
    let mut host = fetching_host(&server.url(), "");
    host.write_policy(5, &["KP"]);
    host.start();
    wait_status(&host, "v5 from the file", |s| s["policy"]["version"] == 5);

    // Nothing published yet: a 404, nothing changes.
    let s = wait_status(&host, "404", |s| {
        s["policy_fetch"]["outcome"].as_str().unwrap_or("").starts_with("not_published")
    });
    assert_eq!(s["policy"]["version"], 5);

    let rogue = PrivateJwk::generate(Algorithm::ES256, "rogue-1").unwrap();
    let expired = {
        let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
            "iss": "authority", "iat": now() - 7200, "exp": now() - 3600, "version": 11,
            "measures": [], "unverified": {"action": "allow"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01}
        }))
        .unwrap();
        kycd_protocol::sign(&claims, &host.authority).unwrap()
    };
    let cases: Vec<(&str, u64, String)> = vec![
        ("Rollback", 3, policy(&host, 3, &[])),
        ("UnknownKey", 9, host.policy_token(9, &[], json!({"action": "allow"}), None, &rogue)),
        ("Expired", 11, expired),
        ("Malformed", 12, "this is not a policy".to_owned()),
    ];
    for (kind, version, token) in &cases {
        let seen = host.records().len();
        server.publish(*version, token);
        let rejected = host.wait_for(&format!("{kind} refused"), |r| {
            r["seq"].as_u64().unwrap() as usize >= seen
                && r["event"]["type"] == "policy_rejected"
                && r["event"]["source"] == server.url()
        });
        assert_eq!(rejected["event"]["kind"], *kind, "{rejected}");
        // Fetched again (a refused answer's ETag is not kept), refused again, recorded once.
        let from = server.requests();
        server.wait_requests(from, 2, &host);
        let s = status(&host);
        assert_eq!(s["policy"]["version"], 5, "the current policy stays: {s}");
        assert_eq!(s["policy_fetch"]["outcome"], format!("rejected: {kind}"));
        assert!(s["policy_fetch"]["etag"].is_null(), "{s}");
        let recorded =
            host.records().iter().skip(seen).filter(|r| r["event"]["type"] == "policy_rejected").count();
        assert_eq!(recorded, 1, "{kind}: an unchanged refused token is recorded once");
        assert!(!host.path("state/fetched-policy.jws").exists(), "{kind}: nothing refused is kept");
        let inm = server.if_none_match();
        assert!(inm.iter().all(Option::is_none), "nothing accepted, no ETag sent: {inm:?}");
    }
    assert!(host.log().contains("fetched policy rejected"), "a warning per refusal");

    // The fetcher is still at it: a valid newer version is applied.
    let v6 = policy(&host, 6, &["KP"]);
    server.publish(6, &v6);
    wait_status(&host, "v6 fetched", |s| s["policy"]["version"] == 6);
    assert_eq!(fs::read_to_string(host.path("state/fetched-policy.jws")).unwrap(), v6);
    server.unpublish();
    let s = wait_status(&host, "404 after unpublishing", |s| {
        s["policy_fetch"]["outcome"].as_str().unwrap_or("").starts_with("not_published")
    });
    assert_eq!(s["policy"]["version"], 6, "a 404 withdraws nothing");
    host.stop();
}

#[test]
fn fetches_over_https_trusting_only_the_configured_ca() {
    let ca_dir = tempfile::tempdir().unwrap();
    let server = PolicyServer::start_with(Some(tls_acceptor(ca_dir.path())));
    assert!(server.url().starts_with("https://localhost:"));
    // Without fetch_ca_file only the system roots are trusted: the handshake fails, nothing
    // is applied, the agent runs on with the file's policy.
    let mut host = fetching_host(&server.url(), "");
    host.write_policy(1, &[]);
    let v2 = policy(&host, 2, &[]);
    server.publish(2, &v2);
    host.start();
    let s = wait_status(&host, "TLS failure", |s| {
        s["policy_fetch"]["outcome"].as_str().unwrap_or("").starts_with("network_error")
    });
    assert_eq!(s["policy"]["version"], 1, "{s}");
    assert_eq!(server.requests(), 0, "no request got through the handshake");
    host.stop();

    // With the CA configured the policy is fetched and applied.
    let ca = ca_dir.path().join("ca.crt");
    set_fetch(&host, &server.url(), &format!("fetch_ca_file = \"{}\"\n", ca.display()));
    host.start();
    let s = wait_status(&host, "v2 over https", |s| s["policy"]["version"] == 2);
    assert!(s["policy"]["source"].as_str().unwrap().starts_with("https://localhost:"), "{s}");
    assert!(server.requests() >= 1);
    host.stop();
}
