//! Nothing lost, nothing doubled: a real `kycd` agent (GPU windows from a replayed trace,
//! ten a second) reporting to a real `kycd-collector`, each SIGKILLed at random moments and
//! restarted, many times. Afterwards the collector must hold every sequence number the agent
//! ever assigned, exactly once: 1..=N covered by stored records without gap or overlap, and
//! its acknowledged high-water mark equal to the agent's durable cursor.
//!
//! `KYCD_CRASH_KILLS` sets the number of kills of each process (default 50, the CI figure;
//! the soak run uses 1,000 — see BENCHMARKS.md). The random seed is printed, and
//! `KYCD_CRASH_SEED` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::agent_bin;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kycd_collector::ReportStore as _;

/// xorshift64*: a deterministic, seedable random source (no dependency for one test).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
    }
}

struct Procs {
    dir: PathBuf,
    port: u16,
    agent: Option<Child>,
    collector: Option<Child>,
}

impl Procs {
    fn db(&self) -> String {
        format!("sqlite://{}", self.dir.join("collector.db").display())
    }

    fn start_collector(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collector.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port), "--db", &self.db()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.collector = Some(child);
    }

    fn start_agent(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).unwrap();
        let child = Command::new(agent_bin("kycd"))
            .args(["run", "--config"])
            .arg(self.dir.join("kycd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let tail = |s: String| {
            s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "--- agent.log (tail)\n{}\n--- collector.log (tail)\n{}",
            tail(read("agent.log")),
            tail(read("collector.log"))
        )
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        Procs::kill(&mut self.agent);
        Procs::kill(&mut self.collector);
    }
}

fn write_config(dir: &Path, port: u16, gpu: bool) {
    let d = dir.display();
    let config = format!(
        "host_id = \"node-1\"\nstate_dir = \"{d}/state\"\n\
         [log]\nlevel = \"warn\"\n\
         [trust]\nissuers = \"{d}/issuers.jwks\"\npolicy = \"{d}/policy.jwks\"\n\
         [policy]\nfile = \"{d}/policy.jws\"\n\
         [attestations]\nhost_attestation = \"{d}/host.jws\"\n\
         [workloads]\ncgroup_root = \"{d}/cgroup\"\n\
         [api]\nsocket = \"{d}/run/kycd.sock\"\n\
         [gpu]\nenabled = {gpu}\nreplay_trace = \"{d}/trace.jsonl\"\ninterval_ms = 100\nwindow_s = 1\n\
         [reporting]\ncollector_url = \"http://127.0.0.1:{port}\"\nbatch_max_s = 1\ngroup_commit_ms = 10\n\
         backoff_max_s = 1\nconnect_timeout_s = 2\nrequest_timeout_s = 5\n"
    );
    std::fs::write(dir.join("kycd.toml"), config).unwrap();
}

#[test]
fn kill_9_of_agent_and_collector_loses_and_duplicates_nothing() {
    let kills: u64 = std::env::var("KYCD_CRASH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("KYCD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        kycd_protocol::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("kill -9 test: {kills} kills of each process, seed {seed} (KYCD_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("cgroup")).unwrap();
    for name in ["issuers", "policy"] {
        std::fs::write(dir.join(format!("{name}.jwks")), r#"{"keys": []}"#).unwrap();
    }
    // One GPU busy with pid 1's work: one usage window per replayed second, ten a second.
    // The trace starts an hour ago: the collector takes windows that end by the time they
    // arrive and start at most a week before the host's enrollment (just below).
    let t0_ms = (kycd_protocol::clock::unix_now() - 3600) * 1000;
    let trace: Vec<String> = (0..600)
        .map(|i: i64| {
            serde_json::json!({"at_ms": t0_ms + i * 1000, "backend": {"state": "ok"}, "gpus": [{
                "index": 0, "uuid": "GPU-0", "name": "NVIDIA H100 80GB HBM3", "state": {"state": "ok"},
                "utilization_gpu_pct": 90, "processes": [{"pid": 1, "used_memory_bytes": 1024}]}]})
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("trace.jsonl"), trace.join("\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    write_config(&dir, port, true);

    // Enroll the host with the key the agent will use.
    let out = Command::new(agent_bin("kycctl"))
        .args(["host-key", "--public", "--config"])
        .arg(dir.join("kycd.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("host.jwk"), &out.stdout).unwrap();
    let mut procs = Procs { dir: dir.clone(), port, agent: None, collector: None };
    let enrolled = Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
        .args(["hosts", "add", "--host-id", "node-1", "--public-jwk"])
        .arg(dir.join("host.jwk"))
        .args(["--db", &procs.db()])
        .status()
        .unwrap();
    assert!(enrolled.success());

    procs.start_collector();
    procs.start_agent();
    std::thread::sleep(Duration::from_millis(1500));
    let (mut agent_kills, mut collector_kills) = (0, 0);
    while agent_kills < kills || collector_kills < kills {
        std::thread::sleep(Duration::from_millis(50 + rng.next(250)));
        let kill_agent = collector_kills >= kills || (agent_kills < kills && rng.next(2) == 0);
        if kill_agent {
            Procs::kill(&mut procs.agent);
            agent_kills += 1;
            procs.start_agent();
        } else {
            Procs::kill(&mut procs.collector);
            collector_kills += 1;
            procs.start_collector();
        }
    }

    // Drain: the agent stops producing windows and uploads what it has spooled.
    Procs::kill(&mut procs.agent);
    write_config(&dir, port, false);
    procs.start_agent();
    let spool_dir = dir.join("state/spool");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(120);
    let final_cursor = loop {
        let spool = kycd::reporting::spool::inspect(&spool_dir).unwrap();
        let pending: usize = spool.segments.iter().map(|s| s.records.len()).sum();
        if pending == 0 && spool.acked_seq > 0 {
            break spool.acked_seq;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "the spool never drained ({pending} pending):\n{}",
            procs.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    Procs::kill(&mut procs.agent);
    Procs::kill(&mut procs.collector);

    let store = kycd_collector::SqliteStore::open(dir.join("collector.db")).unwrap();
    let ranges = store.stored_ranges("node-1", 1).unwrap();
    let mut expected = 1;
    for (seq, last) in &ranges {
        assert_eq!(*seq, expected, "gap or overlap before seq {seq} (ranges {ranges:?})");
        assert!(last >= seq);
        expected = last + 1;
    }
    let stored_through = expected - 1;
    assert_eq!(
        stored_through, final_cursor,
        "collector holds 1..={stored_through}, the agent settled 1..={final_cursor}"
    );
    assert_eq!(store.acked_seq("node-1", 1).unwrap(), final_cursor);
    let rejected = std::fs::read_dir(dir.join("state/rejected")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(rejected, 0, "no batch may be rejected:\n{}", procs.log());
    println!(
        "{agent_kills} agent and {collector_kills} collector kills: {} records covering seq 1..={final_cursor}, no gap, no duplicate",
        ranges.len()
    );
    assert!(final_cursor >= 20, "too few windows were produced to mean anything: {final_cursor}");
}
