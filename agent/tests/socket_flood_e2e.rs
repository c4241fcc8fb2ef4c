//! An unprivileged member of the socket's group floods the operator socket with idle
//! connections while the agent rescans (issue: one such caller could exhaust the agent's
//! descriptors, make the rescan fail to read every attestation, withdraw them all and deny
//! every workload). The real `kycd` binary, a real Unix socket, a real unprivileged process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use host_support::{is_root, now, Host};
use kycd_test_support::host as host_support;

/// The system's Python (a user's pyenv shim under /root is not for uid 65534).
const PYTHON: &str = "/usr/bin/python3";

/// The agent's descriptor limit in these tests; the flood holds twice as many connections.
const AGENT_NOFILE: usize = 128;

/// Opens and holds up to `n` connections to the socket for `secs` seconds, reopening those
/// the agent closes; prints "<held at the end> <connects that failed>".
const FLOODER: &str = r#"
import socket, sys, time
path, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, failed, end = [], 0, time.time() + secs
while time.time() < end:
    while len(held) < n:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError:
            failed += 1
            s.close()
            break
        held.append(s)
    alive = []
    for s in held:
        try:
            if s.recv(1, socket.MSG_PEEK) == b"":
                s.close()
                continue
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        alive.append(s)
    held = alive
    time.sleep(0.05)
print(len(held), failed)
"#;

fn usable() -> bool {
    let python = Command::new(PYTHON).arg("-c").arg("pass").status().is_ok_and(|s| s.success());
    let tools = ["setpriv", "prlimit"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success()));
    if !is_root() || !python || !tools {
        kycd_test_support::skip!("SKIP socket flood test: needs root, python3, setpriv and prlimit");
        return false;
    }
    true
}

/// The running libvirt domain of the tests: its attestation names it by UUID, which only
/// libvirt's status file maps to its name.
const UUID: &str = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";

/// A host whose agent runs with `AGENT_NOFILE` descriptors and `api` lines, three tenants
/// decided (vm-a and the running domain `train-42`, bound by UUID, allowed; vm-b denied),
/// and a socket an unprivileged group member can reach.
fn host_under_limit(api: &str) -> Host {
    let mut host = Host::new("");
    let d = host.dir.path().display().to_string();
    host.extra_config = format!(
        "[workloads]\ncgroup_root = \"{d}/cgroup\"\nrescan_interval_s = 1\nlibvirt_status_dir = \"{d}/libvirt\"\n"
    );
    fs::create_dir_all(host.path("libvirt")).unwrap();
    fs::write(
        host.path("libvirt/train-42.xml"),
        format!(
            "<domstatus><domain type='kvm' id='9'><name>train-42</name><uuid>{UUID}</uuid>\
             <devices><interface type='ethernet'><target dev='vnet7'/></interface></devices></domain></domstatus>"
        ),
    )
    .unwrap();
    fs::create_dir_all(host.path("cgroup/machine.slice/machine-qemu\\x2d9\\x2dtrain\\x2d4.scope")).unwrap();
    // Group `users` (gid 100 on Debian) stands in for the package's `kycd` group.
    host.extra_api = format!("socket_group = \"users\"\n{api}");
    host.launcher = vec!["prlimit".into(), format!("--nofile={AGENT_NOFILE}:{AGENT_NOFILE}"), "--".into()];
    host.write_config();
    host.write_policy(3, &["KP"]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.drop_file("vm-b.jws", host.attestation("vm-b", "KP", now() + 3600).as_bytes());
    host.drop_file("train.jws", host.attestation(UUID, "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    host.wait_for_verdict("libvirt_domain:vm-b", "deny");
    host.wait_for_verdict("libvirt_domain:train-42", "allow");
    for dir in [host.dir.path().to_path_buf(), host.path("run")] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    host
}

/// Floods the socket as uid 65534 in group `users` for `secs` seconds with `n` connections,
/// rewriting the attestations (same content, new files) meanwhile so every rescan re-reads
/// them. Returns the flooder's output.
fn flood(host: &Host, n: usize, secs: u32, during: impl Fn()) -> String {
    let socket = host.path("run/kycd.sock");
    let flooder = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--groups", "100", PYTHON, "-c", FLOODER])
        .arg(&socket)
        .arg(n.to_string())
        .arg(secs.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = fs::read(host.path("state/attestations/vm-a.jws")).unwrap();
    let b = fs::read(host.path("state/attestations/vm-b.jws")).unwrap();
    for i in 0..(secs * 4) {
        std::thread::sleep(Duration::from_millis(250));
        host.drop_file("vm-a.jws", &a);
        host.drop_file("vm-b.jws", &b);
        if i == secs * 2 {
            during();
        }
    }
    let out = flooder.wait_with_output().unwrap();
    assert!(out.status.success(), "flooder failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn status(host: &Host) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["status", "--json", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "kycctl status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Decision and withdrawal records so far.
fn decisions_and_withdrawals(host: &Host) -> (usize, usize) {
    let records = host.records();
    let count = |t: &str| records.iter().filter(|r| r["event"]["type"] == t).count();
    (count("decision"), count("attestation_withdrawn"))
}

#[test]
fn a_connection_flood_is_refused_at_the_cap_and_changes_no_decision() {
    if !usable() {
        return;
    }
    let mut host =
        host_under_limit("max_connections = 32\nmax_connections_per_user = 8\nheader_read_timeout_s = 10\n");
    let before = decisions_and_withdrawals(&host);
    // Mid-flood, root still gets in: the flooding user holds at most its 8 places.
    let flooded = flood(&host, 2 * AGENT_NOFILE, 4, || {
        let during = status(&host);
        assert!(during["connections"]["socket"]["refused"].as_u64().unwrap() > 0, "{during}");
    });
    let status = status(&host);
    let socket = &status["connections"]["socket"];
    assert!(socket["refused"].as_u64().unwrap() > 0, "refusals counted: {status}");
    assert_eq!(decisions_and_withdrawals(&host), before, "no decision changed; flooder: {flooded}");
    assert_eq!(status["attestations"], 3, "{status}");
    assert_eq!(status["verdicts"]["allow"], 2, "{status}");
    // vm-b (KP) and the host itself (no host attestation, policy `unverified: deny`).
    assert_eq!(status["verdicts"]["deny"], 2, "{status}");
    let text = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["status", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.lines().any(|l| l.starts_with("connections:") && l.contains("refused")), "{text}");
    host.stop();
}

#[test]
fn exhausted_descriptors_keep_every_verified_attestation() {
    if !usable() {
        return;
    }
    // A cap above the descriptor limit (a misconfiguration): the flood does exhaust the
    // agent's descriptors, and the rescans that fail to read must keep what was verified.
    let mut host = host_under_limit(
        "max_connections = 4096\nmax_connections_per_user = 4096\nheader_read_timeout_s = 10\n",
    );
    let before = decisions_and_withdrawals(&host);
    let flooded = flood(&host, 2 * AGENT_NOFILE, 5, || {});
    // The flooder is gone; the agent answers again once the idle connections time out.
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(20);
    let status = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_kycctl"))
            .args(["status", "--json", "--socket"])
            .arg(host.path("run/kycd.sock"))
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(kycd_protocol::clock::monotonic() < deadline, "agent never answered again: {}", host.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status["input_read_errors"].as_u64().unwrap() > 0,
        "read errors counted: {status}\n{}",
        host.log()
    );
    assert_eq!(
        decisions_and_withdrawals(&host),
        before,
        "no decision changed; flooder: {flooded}\n{}",
        host.log()
    );
    assert_eq!(status["attestations"], 3, "{status}");
    assert_eq!(status["verdicts"]["allow"], 2, "{status}");
    // vm-b (KP) and the host itself (no host attestation, policy `unverified: deny`).
    assert_eq!(status["verdicts"]["deny"], 2, "{status}");
    host.wait_for("read failure recorded", |r| r["event"]["type"] == "input_read_failed");
    host.stop();
}
