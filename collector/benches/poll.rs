//! One poll round over 10,000 simulated agents, end to end, against a no-op baseline over
//! the same connections in the same run.
//!
//!     cargo bench -p kycd-collector --bench poll
//!
//! The simulated fleet: one listener per agent on its own loopback address, 127.1.X.Y:9477
//! (X = 1 + i / 250, Y = 1 + i % 250), each with its own Ed25519 host key and its own
//! certificate (IP SAN, ECDSA P-256) from one CA, requiring a client certificate from that
//! CA (mTLS, as an agent configured with `client_ca_file`). `/v1/attestation` answers a
//! statement like the agent's (4 attested workloads with subjects, 8 GPUs) with the nonce
//! echoed, signed per request with the agent's key; `/healthz` answers `ok`.
//!
//! - `poll`: `Poller::round` — fresh nonce, new TLS connection (mTLS), request, body cap,
//!   signature + iss + nonce + skew verification, outcomes recorded in batches into a real
//!   SQLite file (WAL, synchronous=FULL) under the target directory.
//! - `baseline`: the same client (same TLS settings, same concurrency) fetching `/healthz`
//!   from every agent: connection + TLS + HTTP, no signing, verification or storage.
//! - `verify only`: `verify_statement` of 10,000 statements, one core, no I/O.
//!
//! Everything (fleet and collector) shares this process and the machine's cores; the
//! numbers are for the whole system, not the poller alone. `KYCD_POLL_AGENTS` sets the fleet
//! size (default 10,000), `KYCD_POLL_ROUNDS` the rounds of each mode (default 3).
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
}

fn respond(agent: &Agent, req: &hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: Vec<u8>| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r
    };
    match req.uri().path() {
        "/healthz" => reply(200, b"ok\n".to_vec()),
        "/v1/attestation" => {
            let Some(nonce) = req.uri().query().and_then(|q| q.strip_prefix("nonce=")) else {
                return reply(400, b"nonce\n".to_vec());
            };
            let mut claims = (*agent.template).clone();
            let t = now();
            claims.iss.clone_from(&agent.host_id);
            claims.nonce = nonce.to_owned();
            claims.iat = t;
            claims.exp = t + 60;
            reply(200, kycd_protocol::sign(&claims, &agent.key).unwrap().into_bytes())
        }
        _ => reply(404, Vec::new()),
    }
}

/// TLS handshakes the simulated agents resumed (a session of an earlier round).
static RESUMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn serve_agent(listener: tokio::net::TcpListener, tls: tokio_rustls::TlsAcceptor, agent: Arc<Agent>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let tls = tls.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else { return };
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                RESUMED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let service = hyper::service::service_fn(move |req| {
                let r = respond(&agent, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// CPU time this process (fleet and collector together) has used, from /proc/self/stat
/// (utime + stime, in clock ticks of 1/100 s): with other jobs on the machine, wall time
/// measures the load, CPU time measures the work.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat(5); after the comm field, indices 11 and 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
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
    cpu: Duration,
    p50: Duration,
    p99: Duration,
    ok: usize,
}

fn summarize(total: Duration, mut latencies: Vec<Duration>, ok: usize) -> Summary {
    latencies.sort();
    Summary {
        total,
        cpu: Duration::ZERO,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        ok,
    }
}

async fn baseline(client: &reqwest::Client, n: usize) -> Summary {
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
    summarize(started.elapsed(), latencies, ok)
}

/// Raises this process's open-file limit (10,000 listeners plus connections) with
/// util-linux `prlimit`: the workspace forbids `unsafe`, so no `setrlimit` here.
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
        Ok(s) if s.success() => println!("RLIMIT_NOFILE {current} -> {want}"),
        other => println!(
            "RLIMIT_NOFILE stays {current} (prlimit: {other:?}); a round needs about one per agent \
             (listeners) plus 2 per poll in flight"
        ),
    }
}

fn main() {
    let agents_n: usize =
        std::env::var("KYCD_POLL_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rounds: usize = std::env::var("KYCD_POLL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    assert!(agents_n <= 250 * 250, "at most 62,500 addresses in 127.1.0.0/16 as laid out");
    raise_nofile((agents_n as u64) * 2 + 4096);
    let _ = rustls::crypto::ring::default_provider().install_default();

    // --- the fleet's keys and certificates (not timed)
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
    let template = Arc::new(template());
    let mut fleet = Vec::with_capacity(agents_n);
    for i in 0..agents_n {
        let host_id = format!("agent-{i:05}");
        let key = PrivateJwk::generate(Algorithm::EdDSA, &host_id).unwrap();
        let cert_key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![addr(i).ip().to_string()])
            .unwrap()
            .signed_by(&cert_key, &ca, &ca_key)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(client_verifier.clone())
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert_key.serialize_der().into()),
            )
            .unwrap();
        fleet.push((Arc::new(Agent { host_id, key, template: template.clone() }), Arc::new(server)));
    }
    println!("{agents_n} agents: keys and certificates in {:.1} s", setup.elapsed().as_secs_f64());

    // --- the collector's database: hosts enrolled with their URLs (one transaction: setup,
    // not measured).
    let db = dir.path().join("collector.db");
    let store = Arc::new(SqliteStore::open(&db).unwrap());
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let tx = conn.transaction().unwrap();
        for (i, (agent, _)) in fleet.iter().enumerate() {
            tx.execute(
                "INSERT INTO hosts (host_id, public_jwk, enrolled_at) VALUES (?1, ?2, 0)",
                (&agent.host_id, agent.key.public_key().to_jwk().to_string()),
            )
            .unwrap();
            tx.execute(
                "INSERT INTO host_agents (host_id, agent_url) VALUES (?1, ?2)",
                (&agent.host_id, format!("https://{}", addr(i))),
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        for (i, (agent, server)) in fleet.iter().enumerate() {
            let listener = tokio::net::TcpListener::bind(addr(i))
                .await
                .unwrap_or_else(|e| panic!("binding {}: {e} (is port {PORT} taken?)", addr(i)));
            tokio::spawn(serve_agent(
                listener,
                tokio_rustls::TlsAcceptor::from(server.clone()),
                agent.clone(),
            ));
        }
        let config = PollerConfig {
            concurrency: CONCURRENCY,
            timeout: Duration::from_secs(10),
            ca_file: Some(dir.path().join("ca.crt")),
            client_cert: Some(dir.path().join("client.crt")),
            client_key: Some(dir.path().join("client.key")),
            // KYCD_BENCH_TLS_SESSION_CACHE=256 reproduces rustls' default cache (no resumption
            // across a round of 10,000 agents), for a before/after in one session.
            tls_session_cache: std::env::var("KYCD_BENCH_TLS_SESSION_CACHE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(kycd_collector::poll::DEFAULT_TLS_SESSION_CACHE),
            ..PollerConfig::default()
        };
        println!("TLS session cache: {} sessions", config.tls_session_cache);
        let poller = Poller::new(store.clone() as Arc<dyn StatementStore>, config.clone()).unwrap();
        let client = kycd_collector::poll::build_client(&config).unwrap();
        let shutdown = CancellationToken::new();
        println!(
            "one round = {agents_n} polls, concurrency {CONCURRENCY}, mTLS, db {} (WAL, synchronous=FULL)",
            db.display()
        );
        println!("load average before: {}", load_average());
        println!(
            "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "mode", "round", "total s", "CPU s", "p50 ms", "p99 ms", "ok"
        );
        let mut polls = Vec::new();
        let mut bases = Vec::new();
        for round in 1..=rounds {
            let cpu0 = cpu_time();
            let mut b = baseline(&client, agents_n).await;
            b.cpu = cpu_time().saturating_sub(cpu0);
            println!(
                "{:<10} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                "baseline",
                round,
                b.total.as_secs_f64(),
                b.cpu.as_secs_f64(),
                ms(b.p50),
                ms(b.p99),
                b.ok
            );
            let cpu0 = cpu_time();
            let r = poller.round(&shutdown).await.unwrap();
            let cpu = cpu_time().saturating_sub(cpu0);
            assert_eq!(r.unrecorded, 0);
            let mut p = summarize(r.elapsed, r.latencies, r.ok);
            p.cpu = cpu;
            println!(
                "{:<10} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}   failed: {:?}",
                "poll",
                round,
                p.total.as_secs_f64(),
                p.cpu.as_secs_f64(),
                ms(p.p50),
                ms(p.p99),
                p.ok,
                r.failed
            );
            polls.push(p);
            bases.push(b);
        }
        let latest = store.latest_statements().unwrap();
        assert_eq!(latest.len(), agents_n, "every agent's statement stored");
        println!(
            "TLS handshakes resumed: {} of {} (the first round's are full)",
            RESUMED.load(std::sync::atomic::Ordering::Relaxed),
            2 * rounds * agents_n
        );
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut pt: Vec<f64> = polls.iter().map(|p| p.total.as_secs_f64()).collect();
        let mut bt: Vec<f64> = bases.iter().map(|b| b.total.as_secs_f64()).collect();
        let mut p50: Vec<f64> = polls.iter().map(|p| ms(p.p50)).collect();
        let mut p99: Vec<f64> = polls.iter().map(|p| ms(p.p99)).collect();
        let mut b50: Vec<f64> = bases.iter().map(|p| ms(p.p50)).collect();
        let mut b99: Vec<f64> = bases.iter().map(|p| ms(p.p99)).collect();
        let mut pc: Vec<f64> = polls.iter().map(|p| p.cpu.as_secs_f64()).collect();
        let mut bc: Vec<f64> = bases.iter().map(|b| b.cpu.as_secs_f64()).collect();
        let (pt, bt) = (median(&mut pt), median(&mut bt));
        let (pc, bc) = (median(&mut pc), median(&mut bc));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "median of {rounds}: poll round {pt:.2} s (p50 {:.2} ms, p99 {:.2} ms) vs baseline {bt:.2} s \
             (p50 {:.2} ms, p99 {:.2} ms): {:.2}x baseline time; target < 10 s: {}",
            median(&mut p50),
            median(&mut p99),
            median(&mut b50),
            median(&mut b99),
            pt / bt,
            if pt < 10.0 { "met" } else { "NOT met" }
        );
        println!(
            "CPU per round (fleet + collector, this process): poll {pc:.2} s vs baseline {bc:.2} s ({:.2}x); \
             CPU / {cores} cores = {:.2} s, the round time on an otherwise idle machine at full use; \
             load average after: {}",
            pc / bc,
            pc / cores,
            load_average()
        );

        // Verification alone, for scale: the statements just stored, re-verified.
        let targets: HashMap<String, PollTarget> =
            store.poll_targets().unwrap().into_iter().map(|t| (t.host_id.clone(), t)).collect();
        let tokens: Vec<(String, String, String)> = latest
            .iter()
            .map(|s| {
                (s.host_id.clone(), store.latest_token(&s.host_id).unwrap().unwrap(), s.claims.nonce.clone())
            })
            .collect();
        let t0 = kycd_protocol::clock::monotonic();
        let t = now();
        for (host, token, nonce) in &tokens {
            verify_statement(&targets[host], token.as_bytes(), nonce, t, 60).unwrap();
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
}
