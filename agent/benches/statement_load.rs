//! Load on the collector-facing API: `GET /v1/attestation?nonce=…` (a host statement
//! listing 100 attested workloads, Ed25519-signed per request) from 200 concurrent
//! keep-alive clients, and `GET /healthz` the same way as the baseline, against the real
//! `kycd` binary on loopback (plaintext: the TLS handshake is per connection, not per
//! request, and keep-alive connections amortise it).
//!
//!     cargo bench -p kycd --bench statement_load
//!
//! Prints p50/p99/max latency and requests/s for each endpoint, closed loop (each client
//! sends its next request when the last one is answered) and the statement/`/healthz`
//! throughput ratio; then open loop: requests issued at a fixed rate (500/s and 2,000/s,
//! 10 s each, as several collectors polling one host would never exceed) whether or not
//! earlier ones were answered, each on a pooled keep-alive connection, its latency measured
//! from its scheduled send time (so a stall counts against every request it delays: no
//! coordinated omission), for `/healthz` and `/v1/attestation` at the same rates. Statements
//! are measured in both forms: one-part (`?nonce=…`: the whole statement signed per request)
//! digest-bound (`&v=2`: a small head signed per request, the body serialised and hashed
//! once per change), and digest-bound with the body held (`&have=<body_sha256>`, what a
//! collector sends in the steady state: the body is left out).
// A benchmark is test code: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kycd_protocol::{Algorithm, Jwks, PrivateJwk};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

const CLIENTS: usize = 200;
const WORKLOADS: usize = 100;
const RUN: Duration = Duration::from_secs(10);
/// Open-loop request rates (requests/s), each for `RUN`.
const OPEN_LOOP_RATES: [u32; 2] = [500, 2_000];

fn now() -> i64 {
    kycd_protocol::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

type Conn = tokio::io::BufReader<tokio::net::TcpStream>;

async fn connect(addr: &str) -> Conn {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    tokio::io::BufReader::new(stream)
}

/// One request and its whole response on a keep-alive connection; panics unless 200.
async fn exchange(stream: &mut Conn, request: &[u8], line: &mut String) {
    stream.get_mut().write_all(request).await.unwrap();
    let mut length = 0usize;
    let mut status = 0u16;
    loop {
        line.clear();
        stream.read_line(line).await.unwrap();
        if status == 0 {
            status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

fn request_for(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: kycd\r\n\r\n").into_bytes()
}

/// One keep-alive client: requests `path` until `until`; returns latencies in ms.
async fn client(addr: String, path: String, until: Instant) -> Vec<f64> {
    let mut stream = connect(&addr).await;
    let request = request_for(&path);
    let mut out = Vec::new();
    let mut line = String::new();
    while kycd_protocol::clock::monotonic() < until {
        let start = kycd_protocol::clock::monotonic();
        exchange(&mut stream, &request, &mut line).await;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// Open loop: `rate` requests/s for `RUN`, each spawned at its scheduled time whatever the
/// earlier ones are doing, on an idle pooled connection (a new one when none is idle). The
/// latency runs from the scheduled time. Returns the sorted latencies and the rate achieved
/// (completions over the time from the first scheduled send to the last completion).
async fn open_loop(addr: &str, path: &str, rate: u32) -> (Vec<f64>, f64) {
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let request: Arc<[u8]> = request_for(path).into();
    let count = rate as usize * RUN.as_secs() as usize;
    let interval = Duration::from_secs(1) / rate;
    let started = kycd_protocol::clock::monotonic();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let at = started + interval * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let (pool, request, addr) = (Arc::clone(&pool), Arc::clone(&request), addr.to_owned());
        tasks.push(tokio::spawn(async move {
            let idle = pool.lock().unwrap().pop();
            let mut conn = match idle {
                Some(conn) => conn,
                None => connect(&addr).await,
            };
            exchange(&mut conn, &request, &mut String::new()).await;
            let ms = at.elapsed().as_secs_f64() * 1e3;
            pool.lock().unwrap().push(conn);
            ms
        }));
    }
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let rps = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    (all, rps)
}

async fn load(addr: &str, path: &str) -> (Vec<f64>, f64) {
    let until = kycd_protocol::clock::monotonic() + RUN;
    let started = kycd_protocol::clock::monotonic();
    let tasks: Vec<_> =
        (0..CLIENTS).map(|_| tokio::spawn(client(addr.to_owned(), path.to_owned(), until))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    let rps = all.len() as f64 / secs;
    all.sort_by(|a, b| a.total_cmp(b));
    (all, rps)
}

fn report(name: &str, (ms, rps): &(Vec<f64>, f64)) {
    let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<48} n={:<7} p50={:>7.3} ms  p99={:>7.3} ms  max={:>8.3} ms  {rps:>9.0} req/s",
        ms.len(),
        p(0.50),
        p(0.99),
        ms[ms.len() - 1]
    );
}

fn setup(d: &Path, port: u16) -> std::process::Child {
    for sub in ["etc/trust", "cgroup", "state/attestations"] {
        fs::create_dir_all(d.join(sub)).unwrap();
    }
    let issuer = PrivateJwk::generate(Algorithm::EdDSA, "kyc-1").unwrap();
    let authority = PrivateJwk::generate(Algorithm::EdDSA, "authority-1").unwrap();
    for (name, key) in [("issuers", &issuer), ("policy", &authority)] {
        fs::write(
            d.join(format!("etc/trust/{name}.jwks")),
            Jwks::from_keys([key.public_key()]).unwrap().to_json().to_string(),
        )
        .unwrap();
    }
    let policy: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": 1, "measures": [],
        "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20, "early_warning_fraction": 0.01}
    }))
    .unwrap();
    fs::write(d.join("etc/policy.jws"), kycd_protocol::sign(&policy, &authority).unwrap()).unwrap();
    for i in 0..WORKLOADS {
        let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
            "iss": "kyc", "sub": format!("tenant-{i}"), "jti": format!("att-{i}"), "iat": now() - 5, "exp": now() + 3600,
            "kyc": {"status": "verified"},
            "subject": {"kind": "organization", "legal_name": format!("Org {i}"), "countries": ["DE"]},
            "binding": {"kind": "libvirt_domain", "id": format!("vm-{i}")}, "foreign_person": true
        }))
        .unwrap();
        fs::write(
            d.join(format!("state/attestations/vm-{i}.jws")),
            kycd_protocol::sign(&claims, &issuer).unwrap(),
        )
        .unwrap();
    }
    let dd = d.display();
    fs::write(
        d.join("etc/kycd.toml"),
        format!(
            "host_id = \"bench\"\nstate_dir = \"{dd}/state\"\n[log]\nlevel = \"warn\"\n\
             [trust]\nissuers = \"{dd}/etc/trust/issuers.jwks\"\npolicy = \"{dd}/etc/trust/policy.jwks\"\n\
             [policy]\nfile = \"{dd}/etc/policy.jws\"\n[attestations]\nhost_attestation = \"{dd}/etc/host.jws\"\n\
             [workloads]\ncgroup_root = \"{dd}/cgroup\"\n[api]\nsocket = \"{dd}/run/kycd.sock\"\n\
             [gpu]\nenabled = false\n\
             [collector_api]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\ninsecure_plaintext = true\nmax_connections_per_ip = 512\n"
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["run", "--config"])
        .arg(d.join("etc/kycd.toml"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut agent = setup(tmp.path(), port);
    let addr = format!("127.0.0.1:{port}");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(kycd_protocol::clock::monotonic() < deadline, "kycd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // The statement must list every workload before measuring.
    let statement = rt.block_on(async {
        loop {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"GET /v1/attestation?nonce=warmup-nonce-0000 HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            let token = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            let payload = token.split('.').nth(1).unwrap_or("");
            let claims: serde_json::Value =
                serde_json::from_slice(&kycd_protocol::b64::decode(payload.as_bytes()).unwrap_or_default()).unwrap_or_default();
            if claims["workloads"].as_array().is_some_and(|w| w.len() > WORKLOADS) {
                break token.len();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!("{CLIENTS} keep-alive clients, {WORKLOADS} attested workloads, {RUN:?} per endpoint; statement {statement} bytes");
    let statement_path = "/v1/attestation?nonce=bench-nonce-0123456789";
    let healthz = rt.block_on(load(&addr, "/healthz"));
    report("closed loop: GET /healthz (baseline)", &healthz);
    // What collectors ask for: the digest-bound form (a small head signed per request), and
    // in the steady state with the digest of the body they hold (then left out).
    let digest_bound_path = "/v1/attestation?nonce=bench-nonce-0123456789&v=2";
    let digest = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!("GET {digest_bound_path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let token = text.split("\r\n\r\n").nth(1).unwrap().trim().to_owned();
        let body = kycd_protocol::statement_body_part(token.as_bytes()).unwrap();
        kycd_protocol::statement_body_digest(&kycd_protocol::b64::decode(body).unwrap())
    });
    let held_path = format!("{digest_bound_path}&have={digest}");
    let attestation = rt.block_on(load(&addr, statement_path));
    report("closed loop: GET /v1/attestation (one-part)", &attestation);
    println!("closed loop: one-part statement throughput {:.3}x /healthz's", attestation.1 / healthz.1);
    let digest_bound = rt.block_on(load(&addr, digest_bound_path));
    report("closed loop: GET /v1/attestation&v=2 (digest-bound)", &digest_bound);
    println!("closed loop: digest-bound statement throughput {:.3}x /healthz's", digest_bound.1 / healthz.1);
    let held = rt.block_on(load(&addr, &held_path));
    report("closed loop: GET /v1/attestation&v=2&have= (body held)", &held);
    println!(
        "closed loop: digest-bound statement, body held, throughput {:.3}x /healthz's",
        held.1 / healthz.1
    );
    for rate in OPEN_LOOP_RATES {
        let healthz = rt.block_on(open_loop(&addr, "/healthz", rate));
        report(&format!("open loop {rate}/s: GET /healthz (baseline)"), &healthz);
        let attestation = rt.block_on(open_loop(&addr, statement_path, rate));
        report(&format!("open loop {rate}/s: GET /v1/attestation (one-part)"), &attestation);
        let digest_bound = rt.block_on(open_loop(&addr, digest_bound_path, rate));
        report(&format!("open loop {rate}/s: GET /v1/attestation&v=2 (digest-bound)"), &digest_bound);
        let held = rt.block_on(open_loop(&addr, &held_path, rate));
        report(&format!("open loop {rate}/s: GET /v1/attestation&v=2&have= (body held)"), &held);
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
