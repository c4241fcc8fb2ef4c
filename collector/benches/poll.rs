//! Poll rounds over 10,000 simulated agents, end to end, against a `/healthz` baseline over
//! the same client in the same run; the collector's CPU measured apart from the fleet's.
//!
//!     cargo bench -p kycd-collector --bench poll
//!
//! The simulated fleet runs in a child process (this binary again, `KYCD_POLL_FLEET_DIR`
//! set): one listener per agent on its own loopback address, 127.1.X.Y:9477 (X = 1 + i / 250,
//! Y = 1 + i % 250), each with its own Ed25519 host key and its own certificate (IP SAN,
//! ECDSA P-256) from one CA, requiring a client certificate from that CA (mTLS), served by
//! `kycd_net::serve` with the agent's `collector_api` limits (caps, header-read, idle and
//! keep-alive timeouts: an answered connection stays open for the next round as at a real
//! agent). `/v1/attestation` answers a statement like the agent's (4 attested workloads with
//! subjects, 8 GPUs) with the nonce echoed, signed per request with the agent's key;
//! `/healthz` answers `ok`. The fleet counts the connections it accepted and the TLS
//! handshakes it resumed; CPU time is read from /proc/PID/stat for each process around each
//! round, so the collector's own CPU per poll is reported apart from the fleet's.
//!
//! Modes (`KYCD_POLL_MODES`, both by default), each with its own client and pool:
//! - `keep-alive` (the poller's default): each agent's connection kept between rounds;
//! - `resume` (`--poll-no-keep-alive`): a new connection per poll, the TLS session resumed.
//!
//! In each, `poll` is `Poller::round` (fresh nonce, request, body cap, signature, iss, nonce
//! and skew verification, outcomes recorded in batches into a real SQLite file, WAL,
//! synchronous=FULL, under the target directory) and `healthz` the same client (same TLS
//! settings, pool and concurrency) fetching `/healthz` from every agent: no signing,
//! verification or storage. Then `verify only`: `verify_statement` of 10,000 statements, one
//! core. `KYCD_POLL_AGENTS` sets the fleet size (default 10,000), `KYCD_POLL_ROUNDS` the
//! rounds (default 4; round 1 opens every connection with a full handshake).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use kycd_collector::poll::{verify_statement, Poller, PollerConfig};
use kycd_collector::{PollTarget, SqliteStore, StatementStore};
use kycd_protocol::{
    Algorithm, GpuInventoryEntry, HostStatementClaims, PrivateJwk, StatementSubject, Verdict,
    WorkloadStatement,
};
use kycd_test_support::bench_stats::{ms, percentile};
use tokio_util::sync::CancellationToken;

const PORT: u16 = 9477;
const CONCURRENCY: usize = 256;

fn addr(i: usize) -> SocketAddr {
    let x = u8::try_from(1 + i / 250).unwrap();
    let y = u8::try_from(1 + i % 250).unwrap();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, x, y)), PORT)
}

fn template() -> HostStatementClaims {
    let workloads = (0..4)
        .map(|w| WorkloadStatement {
            workload: format!("libvirt_domain:vm-{w}"),
            tenant: Some(format!("tenant-{w}")),
            attestation_digest: Some("ab".repeat(32)),
            attestation_exp: Some(2_000_000_000),
            verdict: Verdict::Allow,
            conditions: None,
            subject: Some(StatementSubject {
                legal_name: format!("Tenant {w} Holdings GmbH"),
                countries: vec!["DE".parse().unwrap()],
                beneficial_owner_countries: vec!["DE".parse().unwrap(), "FR".parse().unwrap()],
                reseller_countries: vec![],
                payment_source_country: None,
                foreign_person: w % 2 == 0,
                purposes: vec![],
                person_status: None,
                beneficial_owners: vec![],
                resellers: vec![],
                kyc: None,
            }),
        })
        .collect();
    let gpus = (0..8)
        .map(|g| GpuInventoryEntry {
            uuid: format!("GPU-{g:08x}-0000-0000-0000-000000000000"),
            name: "NVIDIA H100 80GB HBM3".into(),
        })
        .collect();
    HostStatementClaims {
        iss: String::new(),
        iat: 0,
        exp: 0,
        nonce: String::new(),
        agent_version: "0.1.0".into(),
        policy_version: Some(7),
        workloads,
        gpus,
        host: None,
    }
}

fn now() -> i64 {
    kycd_protocol::clock::unix_now()
}

struct Agent {
    host_id: String,
    key: PrivateJwk,
    template: Arc<HostStatementClaims>,
    /// The template's `body_sha256` (the same for every agent: the body holds no host id).
    body_sha256: Arc<str>,
}

fn respond(agent: &Agent, req: &axum::extract::Request) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: Vec<u8>| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r
    };
    match req.uri().path() {
        "/healthz" => reply(200, b"ok\n".to_vec()),
        "/v1/attestation" => {
            let query = req.uri().query().unwrap_or_default();
            let Some(nonce) = query.split('&').find_map(|kv| kv.strip_prefix("nonce=")) else {
                return reply(400, b"nonce\n".to_vec());
            };
            let mut claims = (*agent.template).clone();
            let t = now();
            claims.iss.clone_from(&agent.host_id);
            claims.nonce = nonce.to_owned();
            claims.iat = t;
            claims.exp = t + 60;
            // As the agent answers the collector's `v=2`: the digest-bound form, without the
            // body when the collector holds it (`have`).
            if !query.split('&').any(|kv| kv == "v=2") {
                return reply(200, kycd_protocol::sign(&claims, &agent.key).unwrap().into_bytes());
            }
            let token = kycd_protocol::sign_split_statement(&claims, &agent.key).unwrap();
            let have = query.split('&').find_map(|kv| kv.strip_prefix("have="));
            let head = token.split('~').next().unwrap();
            if have == Some(&*agent.body_sha256) {
                return reply(200, format!("{head}~").into_bytes());
            }
            reply(200, token.into_bytes())
        }
        _ => reply(404, Vec::new()),
    }
}

/// The simulated fleet's connection counters: one [`kycd_net::ConnStats`] per agent (each
/// listener has its own caps, as each agent does), and the TLS handshakes resumed.
struct FleetStats {
    agents: Vec<Arc<kycd_net::ConnStats>>,
    resumed: Arc<std::sync::atomic::AtomicU64>,
}

impl FleetStats {
    /// `accepted resumed open idle_closed refused`, summed over the fleet.
    fn line(&self) -> String {
        let mut sum = kycd_net::ConnSnapshot::default();
        for s in &self.agents {
            let s = s.snapshot();
            sum.accepted += s.accepted;
            sum.open += s.open;
            sum.idle_closed += s.idle_closed;
            sum.refused += s.refused;
        }
        let resumed = self.resumed.load(std::sync::atomic::Ordering::Relaxed);
        format!("{} {resumed} {} {} {}", sum.accepted, sum.open, sum.idle_closed, sum.refused)
    }
}

/// One simulated agent: `kycd_net::serve` with the real agent's collector-API limits
/// (`collector_api` defaults: caps, header-read, idle and keep-alive timeouts), mTLS in the
/// connection's task as the agent does it, `respond` as its handler.
async fn serve_agent(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agent: Arc<Agent>,
    stats: Arc<kycd_net::ConnStats>,
    resumed: Arc<std::sync::atomic::AtomicU64>,
) {
    let limits = kycd::config::CollectorApiConfig::default().limits();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let agent = agent.clone();
        async move {
            let r = respond(&agent, &req);
            let (parts, body) = r.into_parts();
            axum::response::Response::from_parts(parts, axum::body::Body::new(body))
        }
    });
    let handshake = move |tcp: tokio::net::TcpStream, peer: SocketAddr| {
        let tls = tls.clone();
        let resumed = resumed.clone();
        async move {
            let stream = tls.accept(tcp).await.ok()?;
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Some((stream, peer))
        }
    };
    kycd_net::serve(listener, app, limits, stats, CancellationToken::new(), kycd_net::peer_ip, handshake)
        .await;
}

/// CPU time (utime + stime, all threads) process `pid` has used, from /proc/PID/stat (clock
/// ticks of 1/100 s): with other jobs on the machine, wall time measures the load, CPU time
/// the work.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat(5); after the comm field, indices 11 and 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Resident memory of process `pid`, MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()))
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Open descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Summary {
    total: Duration,

    p50: Duration,
    p99: Duration,
    ok: usize,
}

fn summarize(total: Duration, mut latencies: Vec<Duration>, ok: usize) -> Summary {
    latencies.sort();
    Summary { total, p50: percentile(&latencies, 0.5), p99: percentile(&latencies, 0.99), ok }
}

async fn baseline(client: &reqwest::Client, n: usize) -> (Duration, Vec<Duration>, usize) {
    let started = kycd_protocol::clock::monotonic();
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let t0 = kycd_protocol::clock::monotonic();
            let url = format!("https://{}/healthz", addr(i));
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status() == 200 && r.bytes().await.is_ok_and(|b| &b[..] == b"ok\n"),
                Err(_) => false,
            };
            (t0.elapsed(), ok)
        });
    }
    let mut latencies = Vec::with_capacity(n);
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (latency, good) = r.unwrap();
        latencies.push(latency);
        ok += usize::from(good);
    }
    (started.elapsed(), latencies, ok)
}

/// Raises this process's open-file limit (listeners plus connections) with util-linux
/// `prlimit`: the workspace forbids `unsafe`, so no `setrlimit` here.
fn raise_nofile(want: u64) {
    let current = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0);
    if current >= want {
        return;
    }
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={want}:{want}")])
        .status();
    match status {
        Ok(s) if s.success() => eprintln!("RLIMIT_NOFILE {current} -> {want} (pid {})", std::process::id()),
        other => eprintln!(
            "RLIMIT_NOFILE stays {current} (prlimit: {other:?}); the fleet needs one per agent (listeners) \
             plus one per open connection, the collector one per kept connection"
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The simulated fleet, run as a child process (`KYCD_POLL_FLEET_DIR` set): makes the CA, the
/// collector's client certificate and each agent's keys and certificate in that directory
/// (`fleet.tsv`: host id and public JWK per line), serves every agent, prints `ready`, then
/// answers each `stats` line on stdin with [`FleetStats::line`] until stdin closes.
fn run_fleet(dir: &std::path::Path, range: std::ops::Range<usize>) {
    use std::io::{BufRead as _, Write as _};
    raise_nofile((range.len() as u64) * 2 + 1024);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(dir.join("ca.crt")).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
    let template = Arc::new(template());
    let material = std::fs::read_to_string(dir.join("fleet.tsv")).unwrap();
    let mut fleet = Vec::with_capacity(range.len());
    let signer = PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "template").unwrap();
    let signed = kycd_protocol::sign_split_statement(&template, &signer).unwrap();
    let body = kycd_protocol::b64::decode(signed.split('~').nth(1).unwrap().as_bytes()).unwrap();
    let body_sha256: Arc<str> = kycd_protocol::statement_body_digest(&body).into();
    for line in material.lines().skip(range.start).take(range.len()) {
        let f: Vec<&str> = line.split('\t').collect();
        let key = PrivateJwk::from_json(f[1].as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(client_verifier.clone())
            .with_single_cert(
                vec![unhex(f[2]).into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(unhex(f[3]).into()),
            )
            .unwrap();
        fleet.push((
            Arc::new(Agent {
                host_id: f[0].to_owned(),
                key,
                template: template.clone(),
                body_sha256: body_sha256.clone(),
            }),
            Arc::new(server),
        ));
    }
    let agents_n = fleet.len();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let stats = FleetStats {
        agents: (0..agents_n).map(|_| Arc::new(kycd_net::ConnStats::default())).collect(),
        resumed: Arc::default(),
    };
    runtime.block_on(async {
        for (j, (agent, server)) in fleet.iter().enumerate() {
            let i = range.start + j;
            let listener = tokio::net::TcpListener::bind(addr(i))
                .await
                .unwrap_or_else(|e| panic!("binding {}: {e} (is port {PORT} taken?)", addr(i)));
            tokio::spawn(serve_agent(
                listener,
                tokio_rustls::TlsAcceptor::from(server.clone()),
                agent.clone(),
                stats.agents[j].clone(),
                stats.resumed.clone(),
            ));
        }
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "stats" {
            writeln!(out, "{}", stats.line()).unwrap();
            out.flush().unwrap();
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// One fleet child, seen from the collector's side.
struct FleetChild {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

/// The fleet: child processes of at most `per_child` agents each, so each fits its
/// open-file limit (a listener and a kept connection per agent).
struct Fleet {
    children: Vec<FleetChild>,
}

/// Fleet counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct FleetCounts {
    accepted: u64,
    resumed: u64,
    open: u64,
    idle_closed: u64,
    refused: u64,
}

impl Fleet {
    fn start(dir: &std::path::Path, agents_n: usize, per_child: usize) -> Fleet {
        use std::io::BufRead as _;
        let mut children = Vec::new();
        for start in (0..agents_n).step_by(per_child) {
            let end = (start + per_child).min(agents_n);
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .env("KYCD_POLL_FLEET_DIR", dir)
                .env("KYCD_POLL_FLEET_RANGE", format!("{start}..{end}"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            children.push(FleetChild {
                stdin: child.stdin.take().unwrap(),
                stdout: std::io::BufReader::new(child.stdout.take().unwrap()),
                child,
            });
        }
        for c in &mut children {
            let mut line = String::new();
            c.stdout.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a fleet child did not start");
        }
        Fleet { children }
    }

    fn counts(&mut self) -> FleetCounts {
        use std::io::{BufRead as _, Write as _};
        let mut sum = FleetCounts::default();
        for c in &mut self.children {
            writeln!(c.stdin, "stats").unwrap();
            c.stdin.flush().unwrap();
            let mut line = String::new();
            c.stdout.read_line(&mut line).unwrap();
            let v: Vec<u64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
            sum.accepted += v[0];
            sum.resumed += v[1];
            sum.open += v[2];
            sum.idle_closed += v[3];
            sum.refused += v[4];
        }
        sum
    }

    fn cpu(&self) -> Duration {
        self.children.iter().map(|c| cpu_time(c.child.id())).sum()
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.child.id()).collect()
    }
}

/// One mode's round, measured on both sides.
struct Row {
    mode: &'static str,
    round: usize,
    wall: Duration,
    collector_cpu: Duration,
    fleet_cpu: Duration,
    p50: Duration,
    p99: Duration,
    ok: usize,
    polls: u64,
    /// New TCP connections the fleet accepted during the round.
    accepted: u64,
    resumed: u64,
}

impl Row {
    fn reused(&self) -> u64 {
        self.polls.saturating_sub(self.accepted)
    }

    fn print(&self, fleet_open: u64, collector_rss: f64, fds: usize) {
        println!(
            "{:<16} {:>5} {:>8.2} {:>9.2} {:>9.2} {:>8.1} {:>8.1} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9.0} {:>6}",
            self.mode,
            self.round,
            self.wall.as_secs_f64(),
            self.collector_cpu.as_secs_f64(),
            self.fleet_cpu.as_secs_f64(),
            ms(self.p50),
            ms(self.p99),
            self.ok,
            self.accepted,
            self.resumed,
            self.reused(),
            fleet_open,
            collector_rss,
            fds,
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// This process's soft open-file limit.
fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(1024)
}

fn main() {
    let agents_n: usize =
        std::env::var("KYCD_POLL_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    assert!(agents_n <= 250 * 250, "at most 62,500 addresses in 127.1.0.0/16 as laid out");
    if let (Ok(dir), Ok(range)) =
        (std::env::var("KYCD_POLL_FLEET_DIR"), std::env::var("KYCD_POLL_FLEET_RANGE"))
    {
        let (start, end) = range.split_once("..").unwrap();
        run_fleet(std::path::Path::new(&dir), start.parse().unwrap()..end.parse().unwrap());
        return;
    }
    let rounds: usize = std::env::var("KYCD_POLL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    raise_nofile((agents_n as u64) + 4096);
    let _ = rustls::crypto::ring::default_provider().install_default();

    // --- keys and certificates (not timed): the CA, the collector's client certificate, and
    // per agent its host key and its certificate, in fleet.tsv for the fleet children.
    let setup = kycd_protocol::clock::monotonic();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = rcgen::CertificateParams::new(vec!["collector".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.path().join("client.crt"), client_cert.pem()).unwrap();
    std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
    let mut tsv = String::new();
    let mut hosts = Vec::with_capacity(agents_n);
    for i in 0..agents_n {
        let host_id = format!("agent-{i:05}");
        let key = PrivateJwk::generate(Algorithm::EdDSA, &host_id).unwrap();
        let cert_key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![addr(i).ip().to_string()])
            .unwrap()
            .signed_by(&cert_key, &ca, &ca_key)
            .unwrap();
        let private = key.to_json().replace('\n', "");
        tsv.push_str(&format!(
            "{host_id}\t{private}\t{}\t{}\n",
            hex(cert.der()),
            hex(&cert_key.serialize_der())
        ));
        hosts.push((host_id, key.public_key().to_jwk().to_string()));
    }
    std::fs::write(dir.path().join("fleet.tsv"), tsv).unwrap();
    println!("{agents_n} agents: keys and certificates in {:.1} s", setup.elapsed().as_secs_f64());

    // --- the simulated fleet in child processes (this binary again), so its CPU is its own;
    // as many as the open-file limit needs (a listener and a kept connection per agent).
    let per_child =
        usize::try_from(nofile_limit().saturating_sub(1024) / 2).unwrap().clamp(1, agents_n.max(1));
    let mut fleet = Fleet::start(dir.path(), agents_n, per_child);

    // --- the collector's database: hosts enrolled with their URLs (one transaction: setup,
    // not measured).
    let db = dir.path().join("collector.db");
    let store = Arc::new(SqliteStore::open(&db).unwrap());
    assert_eq!(hosts.len(), agents_n);
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let tx = conn.transaction().unwrap();
        for (i, (host, jwk)) in hosts.iter().enumerate() {
            tx.execute(
                "INSERT INTO hosts (host_id, public_jwk, enrolled_at) VALUES (?1, ?2, 0)",
                (host, jwk),
            )
            .unwrap();
            tx.execute(
                "INSERT INTO host_agents (host_id, agent_url) VALUES (?1, ?2)",
                (host, format!("https://{}", addr(i))),
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let config = |keep_alive: bool| PollerConfig {
            concurrency: CONCURRENCY,
            timeout: Duration::from_secs(10),
            ca_file: Some(dir.path().join("ca.crt")),
            client_cert: Some(dir.path().join("client.crt")),
            client_key: Some(dir.path().join("client.key")),
            keep_alive,
            ..PollerConfig::default()
        };
        // KYCD_POLL_MODES: which of `keep-alive` and `resume` (a new connection per poll, the
        // TLS session resumed) to run; both by default.
        let modes = std::env::var("KYCD_POLL_MODES").unwrap_or_else(|_| "keep-alive,resume".into());
        let mut sides = Vec::new();
        for (name, keep_alive) in [("keep-alive", true), ("resume", false)] {
            if modes.split(',').any(|m| m.trim() == name) {
                let poller = Poller::new(store.clone() as Arc<dyn StatementStore>, config(keep_alive)).unwrap();
                // The baseline goes through the poller's own client: the same pool, so the
                // same kept connections.
                let client = poller.client().clone();
                sides.push((name, poller, client));
            }
        }
        let shutdown = CancellationToken::new();
        let me = std::process::id();
        println!(
            "one round = {agents_n} polls, concurrency {CONCURRENCY}, mTLS, db {} (WAL, synchronous=FULL); \
             fleet in pids {:?} (kycd-net with the agent's collector_api limits, keep-alive {} s), collector pid {me}",
            db.display(),
            fleet.pids(),
            kycd::config::CollectorApiConfig::default().keep_alive_s,
        );
        println!("load average before: {}; collector RSS {:.0} MiB", load_average(), rss_mib(me));
        println!(
            "{:<16} {:>5} {:>8} {:>9} {:>9} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6}",
            "mode", "round", "wall s", "coll. CPU", "fleet CPU", "p50 ms", "p99 ms", "ok", "new conn", "resumed",
            "reused", "fleet open", "coll. MiB", "fds"
        );
        let mut rows: Vec<Row> = Vec::new();
        for round in 1..=rounds {
            for (name, poller, client) in &sides {
                for healthz in [true, false] {
                    let before = fleet.counts();
                    let (c0, f0) = (cpu_time(me), fleet.cpu());
                    let (wall, latencies, ok) = if healthz {
                        baseline(client, agents_n).await
                    } else {
                        let r = poller.round(&shutdown).await.unwrap();
                        assert_eq!(r.unrecorded, 0);
                        if !r.failed.is_empty() {
                            println!("  failed: {:?}", r.failed);
                        }
                        (r.elapsed, r.latencies, r.ok)
                    };
                    let (collector_cpu, fleet_cpu) = (cpu_time(me).saturating_sub(c0), fleet.cpu().saturating_sub(f0));
                    let after = fleet.counts();
                    let s = summarize(wall, latencies, ok);
                    let mode: &'static str = match (*name, healthz) {
                        ("keep-alive", true) => "healthz kept",
                        ("keep-alive", false) => "poll kept",
                        (_, true) => "healthz resumed",
                        _ => "poll resumed",
                    };
                    let row = Row {
                        mode,
                        round,
                        wall: s.total,
                        collector_cpu,
                        fleet_cpu,
                        p50: s.p50,
                        p99: s.p99,
                        ok: s.ok,
                        polls: agents_n as u64,
                        accepted: after.accepted - before.accepted,
                        resumed: after.resumed - before.resumed,
                    };
                    row.print(after.open, rss_mib(me), open_fds());
                    if after.refused > 0 || after.idle_closed > before.idle_closed {
                        println!(
                            "  fleet: {} refused in all, {} closed idle this round",
                            after.refused,
                            after.idle_closed - before.idle_closed
                        );
                    }
                    rows.push(row);
                }
            }
        }
        let latest = store.latest_statements().unwrap();
        assert_eq!(latest.len(), agents_n, "every agent's statement stored");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "steady state (median of rounds 2..={rounds}; round 1 opens every connection with a full handshake), \
             {cores} cores, load average after: {}",
            load_average()
        );
        for (name, _, _) in &sides {
            let pick = |healthz: bool, f: &dyn Fn(&Row) -> f64| {
                median(
                    rows.iter()
                        .filter(|r| r.round >= 2.min(rounds) && r.mode.starts_with(if healthz { "healthz" } else { "poll" }))
                        .filter(|r| r.mode.ends_with(if *name == "keep-alive" { "kept" } else { "resumed" }))
                        .map(f)
                        .collect(),
                )
            };
            let wall = |r: &Row| r.wall.as_secs_f64();
            let ccpu = |r: &Row| r.collector_cpu.as_secs_f64();
            let fcpu = |r: &Row| r.fleet_cpu.as_secs_f64();
            let (pw, bw) = (pick(false, &wall), pick(true, &wall));
            let (pc, bc) = (pick(false, &ccpu), pick(true, &ccpu));
            let (pf, bf) = (pick(false, &fcpu), pick(true, &fcpu));
            println!(
                "{name}: poll {pw:.2} s wall (collector {pc:.2} CPU-s = {:.0} µs per poll, fleet {pf:.2} CPU-s) vs /healthz \
                 {bw:.2} s (collector {bc:.2}, fleet {bf:.2}): {:.2}x wall, {:.2}x collector CPU; target < 4 s and ≤ 1.2x: {}",
                pc * 1e6 / agents_n as f64,
                pw / bw,
                pc / bc,
                if pw < 4.0 && pw / bw <= 1.2 { "met" } else { "NOT met" }
            );
        }

        // Verification alone, for scale: the statements just stored, re-verified.
        let targets: HashMap<String, PollTarget> =
            store.poll_targets().unwrap().into_iter().map(|t| (t.host_id.clone(), t)).collect();
        let tokens: Vec<(String, String, String, i64)> = latest
            .iter()
            .map(|s| {
                (s.host_id.clone(), store.latest_token(&s.host_id).unwrap().unwrap(), s.claims.nonce.clone(), s.claims.iat)
            })
            .collect();
        let t0 = kycd_protocol::clock::monotonic();
        // At each statement's own time: the rounds before took minutes.
        for (host, token, nonce, iat) in &tokens {
            verify_statement(&targets[host], token.as_bytes(), nonce, *iat, 60).unwrap();
        }
        let verify = t0.elapsed();
        println!(
            "verify only: {} statements ({} bytes each) in {:.2} s on one core ({:.1} µs each)",
            tokens.len(),
            tokens.first().map_or(0, |t| t.1.len()),
            verify.as_secs_f64(),
            verify.as_secs_f64() * 1e6 / tokens.len().max(1) as f64
        );
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    for c in fleet.children {
        drop(c.stdin);
        let mut child = c.child;
        let _ = child.wait();
    }
}
