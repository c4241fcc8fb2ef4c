//! Load on the collector-facing API: `GET /v1/attestation?nonce=…` (a host statement
//! listing 100 attested workloads, Ed25519-signed per request) from 200 concurrent
//! keep-alive clients, and `GET /healthz` the same way as the baseline, against the real
//! `kycd` binary on loopback (plaintext: the TLS handshake is per connection, not per
//! request, and keep-alive connections amortise it).
//!
//!     cargo bench -p kycd --bench statement_load
//!
//! Prints p50/p99/max latency and requests/s for each endpoint.
// A benchmark is test code: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kycd_protocol::{Algorithm, Jwks, PrivateJwk};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

const CLIENTS: usize = 200;
const WORKLOADS: usize = 100;
const RUN: Duration = Duration::from_secs(10);

fn now() -> i64 {
    kycd_protocol::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// One keep-alive client: requests `path` until `until`; returns latencies in ms.
async fn client(addr: String, path: String, until: Instant) -> Vec<f64> {
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: kycd\r\n\r\n");
    let mut out = Vec::new();
    let mut line = String::new();
    while kycd_protocol::clock::monotonic() < until {
        let start = kycd_protocol::clock::monotonic();
        stream.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut length = 0usize;
        let mut status = 0u16;
        loop {
            line.clear();
            stream.read_line(&mut line).await.unwrap();
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
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    out
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
        "{name:<40} n={:<7} p50={:>7.3} ms  p99={:>7.3} ms  max={:>8.3} ms  {rps:>9.0} req/s",
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
    let healthz = rt.block_on(load(&addr, "/healthz"));
    report("baseline: GET /healthz", &healthz);
    let attestation = rt.block_on(load(&addr, "/v1/attestation?nonce=bench-nonce-0123456789"));
    report("GET /v1/attestation (signed statement)", &attestation);
    let _ = agent.kill();
    let _ = agent.wait();
}
