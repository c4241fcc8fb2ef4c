//! Re-imaging a host, end to end with the real processes (issue 15 item 3): a `kycd` agent
//! reports to a `kycd-collector`; the host is then re-imaged (its state directory, with the
//! host key and the spool, is gone), the new agent starts with a new key and numbers its
//! records from 1 again, and the operator re-enrolls the host id with the documented
//! `hosts remove` / `hosts add`. Every record of both agents must be stored exactly once,
//! each agent's ack must cover everything it spooled, and nothing may be rejected. Before
//! enrollment epochs every batch of the new agent was a 409 SeqConflict (the old agent's
//! seqs were taken) and its usage never arrived.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::agent_bin;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kycd_collector::fleet::FleetStore as _;
use kycd_collector::ReportStore as _;

/// A child process killed (SIGKILL) and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Host {
    dir: PathBuf,
    port: u16,
}

impl Host {
    fn db(&self) -> String {
        format!("sqlite://{}", self.dir.join("collector.db").display())
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(name)).unwrap()
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let tail = |s: String| {
            s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "--- agent.log (tail)\n{}\n--- collector.log (tail)\n{}",
            tail(read("agent.log")),
            tail(read("collector.log"))
        )
    }

    /// The agent's configuration: GPU windows from `trace` (ten replayed seconds a second,
    /// one window each) when `gpu`, else none (it only uploads what it spooled).
    fn configure(&self, gpu: bool, trace: &str) {
        let d = self.dir.display();
        let port = self.port;
        let config = format!(
            "host_id = \"node-1\"\nstate_dir = \"{d}/state\"\n\
             [log]\nlevel = \"warn\"\n\
             [trust]\nissuers = \"{d}/issuers.jwks\"\npolicy = \"{d}/policy.jwks\"\n\
             [policy]\nfile = \"{d}/policy.jws\"\n\
             [attestations]\nhost_attestation = \"{d}/host.jws\"\n\
             [workloads]\ncgroup_root = \"{d}/cgroup\"\n\
             [api]\nsocket = \"{d}/run/kycd.sock\"\n\
             [gpu]\nenabled = {gpu}\nreplay_trace = \"{d}/{trace}\"\ninterval_ms = 100\nwindow_s = 1\n\
             [reporting]\ncollector_url = \"http://127.0.0.1:{port}\"\nbatch_max_s = 1\ngroup_commit_ms = 10\n\
             backoff_max_s = 1\nconnect_timeout_s = 2\nrequest_timeout_s = 5\n"
        );
        std::fs::write(self.dir.join("kycd.toml"), config).unwrap();
    }

    /// A trace of `seconds` samples starting `ago` seconds ago: one GPU busy with pid 1.
    fn trace(&self, name: &str, ago: i64, seconds: i64) {
        let t0_ms = (kycd_protocol::clock::unix_now() - ago) * 1000;
        let lines: Vec<String> = (0..seconds)
            .map(|i| {
                serde_json::json!({"at_ms": t0_ms + i * 1000, "backend": {"state": "ok"}, "gpus": [{
                    "index": 0, "uuid": "GPU-0", "name": "NVIDIA H100 80GB HBM3", "state": {"state": "ok"},
                    "utilization_gpu_pct": 90, "processes": [{"pid": 1, "used_memory_bytes": 1024}]}]})
                .to_string()
            })
            .collect();
        std::fs::write(self.dir.join(name), lines.join("\n")).unwrap();
    }

    fn agent(&self) -> Running {
        let child = Command::new(agent_bin("kycd"))
            .args(["run", "--config"])
            .arg(self.dir.join("kycd.toml"))
            .stdout(Stdio::null())
            .stderr(self.log("agent.log"))
            .spawn()
            .unwrap();
        Running(child)
    }

    fn collector_cli(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(args)
            .args(["--db", &self.db()])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "kycd-collector {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// `kycctl host-key --public` (creates the host key if the state has none) into `file`.
    fn public_key(&self, file: &str) -> PathBuf {
        let out = Command::new(agent_bin("kycctl"))
            .args(["host-key", "--public", "--config"])
            .arg(self.dir.join("kycd.toml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = self.dir.join(file);
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    fn spool(&self) -> kycd::reporting::spool::Inspection {
        kycd::reporting::spool::inspect(&self.dir.join("state/spool")).unwrap()
    }

    /// Waits until the agent's durable cursor reaches `at_least` and nothing is pending,
    /// or (with `drain` false) only until the cursor reaches `at_least`; returns the cursor.
    fn wait_acked(&self, at_least: u64, drain: bool) -> u64 {
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(120);
        loop {
            let spool = self.spool();
            let pending: usize = spool.segments.iter().map(|s| s.records.len()).sum();
            if spool.acked_seq >= at_least && (!drain || pending == 0) {
                return spool.acked_seq;
            }
            assert!(
                kycd_protocol::clock::monotonic() < deadline,
                "acked {} (want {at_least}), {pending} pending:\n{}",
                spool.acked_seq,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the agent with GPU windows until `windows` are acked, then without until its
    /// spool is drained; returns the final cursor.
    fn report(&self, trace: &str, windows: u64) -> u64 {
        self.configure(true, trace);
        let agent = self.agent();
        self.wait_acked(windows, false);
        drop(agent);
        self.configure(false, trace);
        let agent = self.agent();
        let cursor = self.wait_acked(windows, true);
        drop(agent);
        cursor
    }

    fn rejected(&self) -> usize {
        std::fs::read_dir(self.dir.join("state/rejected")).map(|d| d.count()).unwrap_or(0)
    }
}

/// 1..=`cursor` covered by `ranges` without gap or overlap.
fn assert_contiguous(ranges: &[(u64, u64)], cursor: u64, what: &str) {
    let mut expected = 1;
    for (seq, last) in ranges {
        assert_eq!(*seq, expected, "{what}: gap or overlap before seq {seq} ({ranges:?})");
        assert!(last >= seq);
        expected = last + 1;
    }
    assert_eq!(expected - 1, cursor, "{what}: stored 1..={}, the agent settled 1..={cursor}", expected - 1);
}

#[test]
fn a_reimaged_host_reenrolled_with_a_new_key_keeps_reporting() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let host = Host { dir: tmp.path().to_path_buf(), port };
    std::fs::create_dir_all(host.dir.join("cgroup")).unwrap();
    for name in ["issuers", "policy"] {
        std::fs::write(host.dir.join(format!("{name}.jwks")), r#"{"keys": []}"#).unwrap();
    }
    // Traces in the past (the collector takes no window that ends after it arrives), the
    // re-imaged host's after the original's.
    host.trace("before.jsonl", 7200, 300);
    host.trace("after.jsonl", 3600, 300);
    host.configure(true, "before.jsonl");

    // The original host: enrolled, reports.
    let key1 = host.public_key("host1.jwk");
    let out =
        host.collector_cli(&["hosts", "add", "--host-id", "node-1", "--public-jwk", key1.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "enrolled node-1 (enrollment epoch 1)\n");
    let collector = Running(
        Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db", &host.db()])
            .args(["--evaluate-interval-s", "0", "--poll-interval-s", "0"])
            .stdout(Stdio::null())
            .stderr(host.log("collector.log"))
            .spawn()
            .unwrap(),
    );
    let cursor1 = host.report("before.jsonl", 10);
    assert_eq!(host.rejected(), 0, "{}", host.logs());

    // Re-imaged: a fresh state directory, so a new host key and a spool from seq 1. The new
    // agent starts before the operator re-enrolls it: its uploads are refused (401) and
    // retried, its windows spooled meanwhile are taken once it is enrolled.
    std::fs::remove_dir_all(host.dir.join("state")).unwrap();
    host.configure(true, "after.jsonl");
    let key2 = host.public_key("host2.jwk");
    assert_ne!(std::fs::read(&key1).unwrap(), std::fs::read(&key2).unwrap(), "a new key");
    let early = host.agent();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(60);
    while host.spool().segments.iter().map(|s| s.records.len()).sum::<usize>() < 5 {
        assert!(kycd_protocol::clock::monotonic() < deadline, "no windows spooled:\n{}", host.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(host.spool().acked_seq, 0, "not enrolled yet: nothing acked");
    host.collector_cli(&["hosts", "remove", "--host-id", "node-1"]);
    let out =
        host.collector_cli(&["hosts", "add", "--host-id", "node-1", "--public-jwk", key2.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "enrolled node-1 (enrollment epoch 2)\n");
    host.wait_acked(5, false);
    drop(early);
    let cursor2 = host.report("after.jsonl", 10);
    assert_eq!(host.rejected(), 0, "no batch of the new agent may be rejected:\n{}", host.logs());
    let listed = String::from_utf8(host.collector_cli(&["hosts", "list"]).stdout).unwrap();
    assert!(listed.contains(&format!("\tepoch=2\tacked_seq={cursor2}\t")), "{listed}");
    drop(collector);

    // Every record of both agents, once each; both acks right; nothing recorded as refused.
    let store = kycd_collector::SqliteStore::open(host.dir.join("collector.db")).unwrap();
    assert_contiguous(&store.stored_ranges("node-1", 1).unwrap(), cursor1, "epoch 1");
    assert_contiguous(&store.stored_ranges("node-1", 2).unwrap(), cursor2, "epoch 2");
    assert_eq!(store.acked_seq("node-1", 1).unwrap(), cursor1);
    assert_eq!(store.acked_seq("node-1", 2).unwrap(), cursor2);
    assert!(store.rejections("node-1", 10).unwrap().is_empty());
    println!("re-imaged host: epoch 1 holds seq 1..={cursor1}, epoch 2 holds seq 1..={cursor2}");
}
