//! The agent poller against real agents: the real `kycd` binary serving its collector API
//! over mTLS (certificates generated here with rcgen), polled by the real `kycd-collector
//! serve`; and an in-test HTTP agent that signs its own statements with the enrolled keys to
//! misbehave in each way the poller must catch (wrong nonce, skewed clock, another host's
//! id, oversized or garbage bodies, errors, slowness), with backoff of the failing hosts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::agent_bin;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kycd_collector::poll::{next_attempt_at, Poller, PollerConfig};
use kycd_collector::{PollOutcome, PollTarget, ReportStore as _, SqliteStore, StatementStore};
use kycd_protocol::clock::unix_now;
use kycd_protocol::{Algorithm, HostStatementClaims, PrivateJwk};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA and certificates it issues, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Issues a certificate for `san` (an IP or DNS name) to `<name>.crt` / `<name>.key`.
    fn issue(&self, name: &str, san: &str) -> (PathBuf, PathBuf) {
        let params = rcgen::CertificateParams::new(vec![san.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Starts a real `kycd` serving its collector API over mTLS on `port`.
fn start_agent(dir: &Path, port: u16, pki: &Pki) -> Proc {
    let (cert, key) = pki.issue("agent", "127.0.0.1");
    let d = dir.display();
    std::fs::create_dir_all(dir.join("cgroup")).unwrap();
    for name in ["issuers", "policy"] {
        std::fs::write(dir.join(format!("{name}.jwks")), r#"{"keys": []}"#).unwrap();
    }
    let config = format!(
        "host_id = \"node-1\"\nstate_dir = \"{d}/state\"\n\
         [log]\nlevel = \"warn\"\n\
         [trust]\nissuers = \"{d}/issuers.jwks\"\npolicy = \"{d}/policy.jwks\"\n\
         [policy]\nfile = \"{d}/policy.jws\"\n\
         [attestations]\nhost_attestation = \"{d}/host.jws\"\n\
         [workloads]\ncgroup_root = \"{d}/cgroup\"\n\
         [api]\nsocket = \"{d}/run/kycd.sock\"\n\
         [collector_api]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         client_ca_file = \"{}\"\n",
        cert.display(),
        key.display(),
        pki.ca_file().display()
    );
    std::fs::write(dir.join("kycd.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(agent_bin("kycd"))
        .args(["run", "--config"])
        .arg(dir.join("kycd.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(Some(child))
}

fn collector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap()
}

fn poller(store: &Arc<SqliteStore>, config: PollerConfig) -> Poller {
    Poller::new(store.clone() as Arc<dyn StatementStore>, config).unwrap()
}

fn failure_kind(outcome: &PollOutcome) -> (&str, &str) {
    match outcome {
        PollOutcome::Failed { kind, detail } => (kind, detail),
        PollOutcome::Ok { .. } => ("ok", ""),
    }
}

#[test]
fn a_real_agent_is_polled_over_mtls_and_its_statement_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir, "fleet");
    let (client_cert, client_key) = pki.issue("collector", "collector.example");
    let agent_port = free_port();
    let _agent = start_agent(dir, agent_port, &pki);

    // Enroll with the key the agent signs with, and its URL.
    let out = Command::new(agent_bin("kycctl"))
        .args(["host-key", "--public", "--config"])
        .arg(dir.join("kycd.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("host.jwk"), &out.stdout).unwrap();
    let db_path = dir.join("collector.db");
    let db = format!("sqlite://{}", db_path.display());
    let url = format!("https://127.0.0.1:{agent_port}");
    let jwk = dir.join("host.jwk");
    let out = collector(&[
        "hosts",
        "add",
        "--host-id",
        "node-1",
        "--public-jwk",
        jwk.to_str().unwrap(),
        "--agent-url",
        &url,
        "--db",
        &db,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Plaintext to a non-loopback address is refused at the CLI already.
    let out = collector(&[
        "hosts",
        "set-agent-url",
        "--host-id",
        "node-1",
        "--url",
        "http://10.1.2.3:9477",
        "--db",
        &db,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The real collector polls it every second over mTLS.
    let log = std::fs::File::create(dir.join("collector.log")).unwrap();
    let collector_proc = Proc(Some(
        Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--db", &db])
            .args(["--poll-interval-s", "1", "--poll-timeout-s", "5"])
            .arg("--poll-ca-file")
            .arg(pki.ca_file())
            .arg("--poll-client-cert")
            .arg(&client_cert)
            .arg("--poll-client-key")
            .arg(&client_key)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    let store = Arc::new(SqliteStore::open(&db_path).unwrap());
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(60);
    let statement = loop {
        if let Some(s) = store.latest_statements().unwrap().into_iter().next() {
            break s;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "no statement stored\n--- agent\n{}\n--- collector\n{}\n{:?}",
            tail(&dir.join("agent.log")),
            tail(&dir.join("collector.log")),
            store.host_poll_status().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(statement.host_id, "node-1");
    assert_eq!(statement.claims.iss, "node-1");
    assert_eq!(statement.claims.nonce.len(), 32, "a fresh 32-character nonce");
    assert!((statement.polled_at - unix_now()).abs() < 30);
    assert!((statement.claims.iat - statement.polled_at).abs() <= 60);
    // The stored token is the evidence: it re-verifies with the enrolled key. The agent
    // answered the digest-bound form the collector asks for.
    let token = store.latest_token("node-1").unwrap().unwrap();
    let key = store.host_key("node-1").unwrap().unwrap();
    let jwks = kycd_protocol::Jwks::from_keys([key.clone()]).unwrap();
    assert!(kycd_protocol::is_split_statement(token.as_bytes()), "{token}");
    let reverified = kycd_protocol::verify_split_statement(
        token.as_bytes(),
        &jwks,
        &kycd_protocol::VerifyOptions::default(),
        unix_now(),
    )
    .unwrap();
    assert_eq!(reverified.claims, statement.claims);
    // Polls keep coming, each with its own nonce.
    std::thread::sleep(Duration::from_millis(2500));
    let history = store.poll_history("node-1", 10).unwrap();
    assert!(history.len() >= 2, "{history:?}");
    assert!(history.iter().all(|(_, r)| r.is_ok()), "{history:?}");
    let status = &store.host_poll_status().unwrap()[0];
    assert_eq!((status.consecutive_failures, status.last_error.as_ref()), (0, None));
    assert!(status.last_ok_at.is_some());
    let listed = collector(&["hosts", "list", "--db", &db]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&format!("agent_url={url}")) && listed.contains("failures=0"), "{listed}");
    drop(collector_proc);

    // The same agent through pollers that must fail.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let target = PollTarget { host_id: "node-1".into(), agent_url: url.clone(), public_key: key.clone() };
        let base = PollerConfig {
            timeout: Duration::from_secs(5),
            ca_file: Some(pki.ca_file()),
            client_cert: Some(client_cert.clone()),
            client_key: Some(client_key.clone()),
            ..PollerConfig::default()
        };
        assert_eq!(failure_kind(&poller(&store, base.clone()).poll_host(&target).await).0, "ok");

        // An agent certificate from another CA: the TLS handshake fails.
        let other = Pki::new(dir, "other");
        let outcome = poller(&store, PollerConfig { ca_file: Some(other.ca_file()), ..base.clone() })
            .poll_host(&target)
            .await;
        let (kind, detail) = failure_kind(&outcome);
        assert_eq!(kind, "unreachable", "{detail}");
        assert!(detail.to_lowercase().contains("certificate"), "{detail}");

        // No client certificate: the agent refuses the collector.
        let outcome = poller(&store, PollerConfig { client_cert: None, client_key: None, ..base.clone() })
            .poll_host(&target)
            .await;
        assert_eq!(failure_kind(&outcome).0, "unreachable", "{outcome:?}");

        // A client certificate from another CA: refused too.
        let (c, k) = other.issue("collector", "collector.example");
        let outcome =
            poller(&store, PollerConfig { client_cert: Some(c), client_key: Some(k), ..base.clone() })
                .poll_host(&target)
                .await;
        assert_eq!(failure_kind(&outcome).0, "unreachable", "{outcome:?}");

        // The host enrolled with another key (same kid): the signature does not verify.
        let impostor = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let wrong_key = PollTarget { public_key: impostor.public_key(), ..target.clone() };
        let outcome = poller(&store, base.clone()).poll_host(&wrong_key).await;
        assert_eq!(failure_kind(&outcome).0, "bad_signature", "{outcome:?}");
    });
}

/// How the in-test agent misbehaves: the first path segment of its URL.
const MODES: &[&str] = &[
    "good",
    "wrong-nonce",
    "old-iat",
    "future-iat",
    "other-iss",
    "huge",
    "status-500",
    "garbage",
    "slow",
    "unsigned-by-host",
    "one-part",
    "tampered-body",
];

#[derive(Clone)]
struct FakeAgents {
    keys: Arc<std::collections::HashMap<String, PrivateJwk>>,
}

async fn fake_statement(
    axum::extract::State(agents): axum::extract::State<FakeAgents>,
    axum::extract::Path(mode): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let params = || query.as_deref().unwrap_or_default().split('&');
    let nonce = params().find_map(|kv| kv.strip_prefix("nonce=")).unwrap_or_default().to_owned();
    // The collector asks for the digest-bound form, as the agent answers it.
    let digest_bound = params().any(|kv| kv == "v=2");
    let have = params().find_map(|kv| kv.strip_prefix("have=")).map(str::to_owned);
    let now = unix_now();
    let host = format!("host-{mode}");
    let mut claims = HostStatementClaims {
        iss: host.clone(),
        iat: now,
        exp: now + 60,
        nonce,
        agent_version: "test".into(),
        policy_version: Some(1),
        workloads: Vec::new(),
        gpus: Vec::new(),
        host: None,
    };
    let impostor;
    let mut key = &agents.keys[&host];
    match mode.as_str() {
        "wrong-nonce" => claims.nonce = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        "old-iat" => claims.iat = now - 600,
        "future-iat" => {
            claims.iat = now + 600;
            claims.exp = now + 660;
        }
        "other-iss" => claims.iss = "host-good".into(),
        "huge" => return vec![b'a'; 2 << 20].into_response(),
        "status-500" => return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "garbage" => return "not.a.jws".into_response(),
        "slow" => tokio::time::sleep(Duration::from_secs(4)).await,
        "unsigned-by-host" => {
            impostor = PrivateJwk::generate(Algorithm::EdDSA, &host).unwrap();
            key = &impostor;
        }
        _ => {}
    }
    if !digest_bound || mode == "one-part" {
        // An agent that predates the digest-bound form answers the one-part one.
        return kycd_protocol::sign(&claims, key).unwrap().into_response();
    }
    let token = kycd_protocol::sign_split_statement(&claims, key).unwrap();
    if mode == "tampered-body" {
        // A body other than the one the head's digest names.
        claims.policy_version = Some(2);
        let other = kycd_protocol::sign_split_statement(&claims, key).unwrap();
        let head = token.split('~').next().unwrap();
        return format!("{head}~{}", other.split('~').nth(1).unwrap()).into_response();
    }
    // As the agent does: a body the collector holds is left out.
    let body = kycd_protocol::statement_body_part(token.as_bytes()).unwrap();
    let digest = kycd_protocol::statement_body_digest(&kycd_protocol::b64::decode(body).unwrap());
    if have.as_deref() == Some(digest.as_str()) {
        BODIES_LEFT_OUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return format!("{}~", token.split('~').next().unwrap()).into_response();
    }
    token.into_response()
}

/// Answers of the in-test agents that left the body out (the collector said it holds it).
static BODIES_LEFT_OUT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn start_fake_agents(keys: std::collections::HashMap<String, PrivateJwk>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/{mode}/v1/attestation", axum::routing::get(fake_statement))
        .with_state(FakeAgents { keys: Arc::new(keys) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_agents_are_recorded_by_kind_and_backed_off() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(tmp.path().join("c.db")).unwrap());
    let mut keys = std::collections::HashMap::new();
    for mode in MODES {
        let host = format!("host-{mode}");
        let key = PrivateJwk::generate(Algorithm::EdDSA, &host).unwrap();
        store.enroll_host(&host, &key.public_key(), 0).unwrap();
        keys.insert(host, key);
    }
    let addr = start_fake_agents(keys).await;
    for mode in MODES {
        assert!(store
            .set_agent_url(&format!("host-{mode}"), Some(&format!("http://{addr}/{mode}")))
            .unwrap());
    }
    // Nothing listens there.
    let dead = PrivateJwk::generate(Algorithm::EdDSA, "host-dead").unwrap();
    store.enroll_host("host-dead", &dead.public_key(), 0).unwrap();
    store.set_agent_url("host-dead", Some(&format!("http://127.0.0.1:{}", free_port()))).unwrap();
    // Enrolled but without an agent URL: never polled.
    store.enroll_host("host-quiet", &dead.public_key(), 0).unwrap();

    // The backoff base; rounds here are run by hand, back to back.
    let interval = Duration::from_secs(4);
    let config = PollerConfig {
        interval,
        timeout: Duration::from_secs(1),
        insecure_plaintext: true,
        ..PollerConfig::default()
    };
    let poller = poller(&store, config.clone());
    let shutdown = CancellationToken::new();
    let report = poller.round(&shutdown).await.unwrap();
    assert_eq!(report.polled, MODES.len() + 1);
    assert_eq!((report.ok, report.latencies.len(), report.unrecorded), (2, MODES.len() + 1, 0));

    let expected = [
        ("host-dead", "unreachable"),
        ("host-future-iat", "clock_skew"),
        ("host-garbage", "malformed"),
        ("host-huge", "too_large"),
        ("host-old-iat", "clock_skew"),
        ("host-other-iss", "host_mismatch"),
        ("host-slow", "timeout"),
        ("host-status-500", "http_status"),
        ("host-tampered-body", "malformed"),
        ("host-unsigned-by-host", "bad_signature"),
        ("host-wrong-nonce", "nonce_mismatch"),
    ];
    let status: std::collections::HashMap<String, _> =
        store.host_poll_status().unwrap().into_iter().map(|s| (s.host_id.clone(), s)).collect();
    for (host, kind) in expected {
        let s = &status[host];
        assert_eq!(s.consecutive_failures, 1, "{host}: {s:?}");
        assert!(s.last_error.as_deref().unwrap().starts_with(&format!("{kind}: ")), "{host}: {s:?}");
        assert!(report.failed.get(kind).copied().unwrap_or(0) > 0, "{kind}: {:?}", report.failed);
    }
    assert_eq!(status["host-good"].consecutive_failures, 0);
    assert_eq!(status["host-one-part"].consecutive_failures, 0, "the one-part form is still taken");
    assert_eq!(status["host-quiet"].last_attempt_at, None, "no URL, not polled");
    let latest = store.latest_statements().unwrap();
    assert_eq!(latest.iter().map(|s| s.host_id.as_str()).collect::<Vec<_>>(), ["host-good", "host-one-part"]);
    // The evidence kept is the digest-bound pair as received.
    assert!(store.latest_token("host-good").unwrap().unwrap().contains('~'));
    assert!(!store.latest_token("host-one-part").unwrap().unwrap().contains('~'));

    // At once again: the failing hosts back off, the good ones are polled. The digest-bound
    // agent leaves out the body the collector now holds; what is kept is still whole.
    let left_out = BODIES_LEFT_OUT.load(std::sync::atomic::Ordering::Relaxed);
    let report = poller.round(&shutdown).await.unwrap();
    assert_eq!((report.polled, report.ok, report.backing_off), (2, 2, expected.len()));
    assert_eq!(BODIES_LEFT_OUT.load(std::sync::atomic::Ordering::Relaxed), left_out + 1);
    let token = store.latest_token("host-good").unwrap().unwrap();
    let key = store.host_key("host-good").unwrap().unwrap();
    let jwks = kycd_protocol::Jwks::from_keys([key]).unwrap();
    let options = kycd_protocol::VerifyOptions::default();
    assert!(kycd_protocol::verify_split_statement(token.as_bytes(), &jwks, &options, unix_now()).is_ok());
    let s = store.host_poll_status().unwrap().into_iter().find(|s| s.host_id == "host-status-500").unwrap();
    assert_eq!(s.consecutive_failures, 1, "not polled while backing off");
    let next =
        next_attempt_at(&s.host_id, s.last_attempt_at, s.consecutive_failures, interval, config.backoff_max);
    assert!(next.unwrap() > s.last_attempt_at.unwrap());

    // Once due, polled again: the failure count grows and the next delay with it.
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    while unix_now() < next.unwrap() {
        assert!(kycd_protocol::clock::monotonic() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    poller.round(&shutdown).await.unwrap();
    let s2 = store.host_poll_status().unwrap().into_iter().find(|s| s.host_id == "host-status-500").unwrap();
    assert_eq!(s2.consecutive_failures, 2);
    let gap = |s: &kycd_collector::HostPollStatus| {
        next_attempt_at(&s.host_id, s.last_attempt_at, s.consecutive_failures, interval, config.backoff_max)
            .unwrap()
            - s.last_attempt_at.unwrap()
    };
    assert!(gap(&s2) >= gap(&s), "{} then {}", gap(&s), gap(&s2));
    let history = store.poll_history("host-status-500", 10).unwrap();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|(_, r)| r.as_ref().is_err_and(|e| e.starts_with("http_status"))));
    // A success clears the failures and the backoff.
    assert_eq!(
        store
            .host_poll_status()
            .unwrap()
            .iter()
            .find(|s| s.host_id == "host-good")
            .unwrap()
            .consecutive_failures,
        0
    );

    // Plaintext is refused unless the poller allows it.
    let strict = kycd_collector::poll::Poller::new(
        store.clone() as Arc<dyn StatementStore>,
        PollerConfig { insecure_plaintext: false, ..config },
    )
    .unwrap();
    let target = store.poll_targets().unwrap().into_iter().find(|t| t.host_id == "host-good").unwrap();
    assert_eq!(failure_kind(&strict.poll_host(&target).await).0, "bad_url");
}

#[tokio::test]
async fn the_poller_stops_on_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(tmp.path().join("c.db")).unwrap());
    let shutdown = CancellationToken::new();
    let task = kycd_collector::poll::spawn(
        store as Arc<dyn StatementStore>,
        PollerConfig { interval: Duration::from_millis(50), ..PollerConfig::default() },
        shutdown.clone(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

#[test]
fn bad_poller_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(tmp.path().join("c.db")).unwrap()) as Arc<dyn StatementStore>;
    let missing = tmp.path().join("missing.pem");
    let err = Poller::new(store.clone(), PollerConfig { ca_file: Some(missing), ..PollerConfig::default() })
        .unwrap_err();
    assert!(matches!(err, kycd_collector::poll::PollSetupError::File { .. }), "{err}");
    std::fs::write(tmp.path().join("empty.pem"), "").unwrap();
    let err = Poller::new(
        store.clone(),
        PollerConfig { ca_file: Some(tmp.path().join("empty.pem")), ..PollerConfig::default() },
    )
    .unwrap_err();
    assert!(matches!(err, kycd_collector::poll::PollSetupError::File { .. }), "{err}");
    let err = Poller::new(
        store.clone(),
        PollerConfig { client_cert: Some(tmp.path().join("empty.pem")), ..PollerConfig::default() },
    )
    .unwrap_err();
    assert!(matches!(err, kycd_collector::poll::PollSetupError::Config(_)), "{err}");
    std::fs::write(tmp.path().join("token"), "has space\n").unwrap();
    let err = Poller::new(
        store,
        PollerConfig { bearer_token_file: Some(tmp.path().join("token")), ..PollerConfig::default() },
    )
    .unwrap_err();
    assert!(matches!(err, kycd_collector::poll::PollSetupError::File { .. }), "{err}");
}

/// With a private CA the poller's client keeps TLS sessions (`tls_session_cache`): the second
/// poll of an agent resumes the session of the first instead of a full handshake (no key
/// exchange or certificate signatures), while the agent still required the client
/// certificate; with rustls' default cache of 256 and more agents than that per round, every
/// poll was a full handshake (BENCHMARKS.md, polling).
#[tokio::test]
async fn a_second_poll_resumes_the_tls_session() {
    use rustls::pki_types::pem::PemObject as _;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let (agent_cert, agent_key) = pki.issue("agent", "127.0.0.1");
    let (client_cert, client_key) = pki.issue("collector", "collector.example");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca_file()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_file_iter(&agent_cert)
                .unwrap()
                .map(Result::unwrap)
                .collect(),
            rustls::pki_types::PrivateKeyDer::from_pem_file(&agent_key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = kinds.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
            let (_, conn) = tls.get_ref();
            seen.lock().unwrap().push((conn.handshake_kind(), conn.peer_certificates().map(<[_]>::len)));
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut buf = [0u8; 4096];
            let _ = tls.read(&mut buf).await;
            let _ =
                tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            let _ = tls.shutdown().await;
        }
    });
    let config = PollerConfig {
        timeout: Duration::from_secs(5),
        ca_file: Some(pki.ca_file()),
        client_cert: Some(client_cert),
        client_key: Some(client_key),
        ..PollerConfig::default()
    };
    let client = kycd_collector::poll::build_client(&config).unwrap();
    for _ in 0..2 {
        let reply = client.get(format!("https://{addr}/healthz")).send().await.unwrap();
        assert_eq!(reply.text().await.unwrap(), "ok");
    }
    let kinds = kinds.lock().unwrap().clone();
    assert_eq!(
        kinds,
        [(Some(rustls::HandshakeKind::Full), Some(1)), (Some(rustls::HandshakeKind::Resumed), Some(1))],
        "the second connection resumes, with the client certificate of the first"
    );
}

/// The real agent's collector API (`kycd::net::collector_api`: kycd-net's limits, mTLS)
/// serving `host`'s statements in this process, with its connection counters.
struct InProcessAgent {
    addr: SocketAddr,
    stats: Arc<kycd_net::ConnStats>,
    shutdown: CancellationToken,
    _main_loop: tokio::sync::mpsc::Receiver<kycd::net::operator_api::ApiRequest>,
    _snapshot: tokio::sync::watch::Sender<Arc<HostStatementClaims>>,
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn statement_content(host: &str) -> HostStatementClaims {
    HostStatementClaims {
        iss: host.to_owned(),
        iat: 0,
        exp: 0,
        nonce: String::new(),
        agent_version: "test".into(),
        policy_version: Some(1),
        workloads: Vec::new(),
        gpus: Vec::new(),
        host: None,
    }
}

async fn start_in_process_agent(
    pki: &Pki,
    host: &str,
    key: Arc<PrivateJwk>,
    keep_alive_s: u64,
) -> InProcessAgent {
    let (cert, cert_key) = pki.issue(&format!("agent-{host}"), "127.0.0.1");
    let config = kycd::config::CollectorApiConfig {
        enabled: true,
        listen: "127.0.0.1:0".into(),
        cert_file: Some(cert),
        key_file: Some(cert_key),
        client_ca_file: Some(pki.ca_file()),
        keep_alive_s,
        ..kycd::config::CollectorApiConfig::default()
    };
    let api = kycd::net::collector_api::bind(&config).await.unwrap();
    let addr = api.local_addr().unwrap();
    let (requests, main_loop) = tokio::sync::mpsc::channel(4);
    let (snapshot_tx, snapshot) = tokio::sync::watch::channel(Arc::new(statement_content(host)));
    let stats = Arc::new(kycd_net::ConnStats::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(kycd::net::collector_api::serve(
        api,
        requests,
        snapshot,
        key,
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    InProcessAgent { addr, stats, shutdown, _main_loop: main_loop, _snapshot: snapshot_tx }
}

/// A store with `host` enrolled with `key` and polled at `url`, and a poller with the
/// fleet's client certificate.
fn enrolled(
    dir: &Path,
    pki: &Pki,
    (host, key): (&str, &PrivateJwk),
    url: &str,
    keep_alive: bool,
) -> (Arc<SqliteStore>, Poller) {
    let store = Arc::new(SqliteStore::open(dir.join(format!("{host}-{keep_alive}.db"))).unwrap());
    let (client_cert, client_key) = pki.issue("collector", "collector.example");
    let config = PollerConfig {
        timeout: Duration::from_secs(5),
        ca_file: Some(pki.ca_file()),
        client_cert: Some(client_cert),
        client_key: Some(client_key),
        keep_alive,
        ..PollerConfig::default()
    };
    let poller = poller(&store, config);
    enroll(&store, host, key, url);
    (store, poller)
}

/// Enrolls `host` with `key` at `url`.
fn enroll(store: &SqliteStore, host: &str, key: &PrivateJwk, url: &str) {
    store.enroll_host(host, &key.public_key(), 0).unwrap();
    assert!(store.set_agent_url(host, Some(url)).unwrap());
}

/// Runs `n` rounds; each must verify the one host's statement.
async fn rounds_ok(poller: &Poller, n: usize) {
    let shutdown = CancellationToken::new();
    for round in 1..=n {
        let report = poller.round(&shutdown).await.unwrap();
        assert_eq!((report.polled, report.ok), (1, 1), "round {round}: {:?}", report.failed);
    }
}

/// The agent keeps an answered connection for `collector_api.keep_alive_s` (90 s by
/// default), longer than the collector's interval + margin, so the poller's rounds reuse
/// one connection: the agent accepts one TCP connection for three rounds. Without
/// keep-alive each round is a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_reused_across_rounds() {
    let keep_alive_s = kycd::config::CollectorApiConfig::default().keep_alive_s;
    let poll = PollerConfig::default();
    assert!(
        Duration::from_secs(keep_alive_s) > poll.interval + kycd_collector::poll::config::KEEP_ALIVE_MARGIN,
        "the agent keeps a connection longer than the collector does"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let key = Arc::new(PrivateJwk::generate(Algorithm::EdDSA, "host-ka").unwrap());
    let agent = start_in_process_agent(&pki, "host-ka", Arc::clone(&key), keep_alive_s).await;
    let url = format!("https://{}", agent.addr);

    let (_store, kept) = enrolled(dir.path(), &pki, ("host-ka", &key), &url, true);
    rounds_ok(&kept, 3).await;
    let snap = agent.stats.snapshot();
    assert_eq!((snap.accepted, snap.open, snap.idle_closed), (1, 1, 0), "{snap:?}");

    let (_store, fresh) = enrolled(dir.path(), &pki, ("host-ka", &key), &url, false);
    rounds_ok(&fresh, 2).await;
    assert_eq!(agent.stats.snapshot().accepted, 3, "{:?}", agent.stats.snapshot());
}

/// An agent that closes its idle connections at once (keep-alive 0): the poller's kept
/// connection is gone by the next round, which still succeeds on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_agent_closed_is_replaced_without_a_failed_poll() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let key = Arc::new(PrivateJwk::generate(Algorithm::EdDSA, "host-closer").unwrap());
    let agent = start_in_process_agent(&pki, "host-closer", Arc::clone(&key), 0).await;
    let url = format!("https://{}", agent.addr);
    let (_store, poller) = enrolled(dir.path(), &pki, ("host-closer", &key), &url, true);
    rounds_ok(&poller, 3).await;
    let snap = agent.stats.snapshot();
    assert_eq!(snap.accepted, 3, "a connection per round: {snap:?}");
    assert!(snap.idle_closed >= 2, "the agent closed them: {snap:?}");
}

/// The race a kept connection can meet: the agent closes it just as the next round's request
/// goes out (here: it reads the request and closes without an answer). The poll is retried
/// once on a new connection and succeeds; nothing is recorded as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_closed_under_it_is_retried_on_a_new_one() {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let (agent_cert, agent_key) = pki.issue("agent", "127.0.0.1");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            rustls::pki_types::CertificateDer::pem_file_iter(&agent_cert)
                .unwrap()
                .map(Result::unwrap)
                .collect(),
            rustls::pki_types::PrivateKeyDer::from_pem_file(&agent_key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = Arc::new(PrivateJwk::generate(Algorithm::EdDSA, "host-racy").unwrap());
    let signer = Arc::clone(&key);
    let counts = Arc::new(std::sync::Mutex::new((0usize, 0usize))); // (accepted, dropped unanswered)
    let seen = Arc::clone(&counts);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            seen.lock().unwrap().0 += 1;
            let (acceptor, signer, seen) = (acceptor.clone(), Arc::clone(&signer), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                for request in 1.. {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    if request == 2 {
                        // The second request on a connection: closed without an answer.
                        seen.lock().unwrap().1 += 1;
                        return;
                    }
                    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                    let nonce = line
                        .split("nonce=")
                        .nth(1)
                        .and_then(|r| r.split([' ', '&']).next())
                        .unwrap_or_default();
                    let now = unix_now();
                    let claims = HostStatementClaims {
                        iat: now,
                        exp: now + 60,
                        nonce: nonce.to_owned(),
                        ..statement_content("host-racy")
                    };
                    let token = kycd_protocol::sign(&claims, &signer).unwrap();
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{token}", token.len());
                    if tls.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let url = format!("https://{addr}");
    let (store, poller) = enrolled(dir.path(), &pki, ("host-racy", &key), &url, true);
    rounds_ok(&poller, 2).await;
    assert_eq!(*counts.lock().unwrap(), (2, 1), "round 2 met the closed connection, then a new one");
    let status = store.host_poll_status().unwrap();
    assert_eq!(status[0].consecutive_failures, 0);
}
