//! Issue 18's fleet test, end to end with the real binaries: one host (`kycd`) running three
//! tenants — a VM holding eight passed-through H100s (a sysfs tree and live XML as on a real
//! host), a VM with a vGPU (the fake NVML's `nvmlDeviceGetActiveVgpus`), and a process in its
//! own cgroup — reporting to a real `kycd-collector` (SQLite).
//!
//! Every tenant's windows reach the collector with their method. The foreign tenant's
//! passthrough VM raises `cluster_capacity_crossed` and `early_warning` from its allocation
//! alone, then `guest_telemetry_gap` (its guest is silent; an audit record at the agent too),
//! and `training_threshold_crossed` only once its guest reports: the real `kycd guest`, on a
//! fake NVML of its own, writes to a socket this test relays to the channel socket named in the
//! domain's live XML (the test plays QEMU's end of the virtio-serial channel).
//!
//! Root only (real cgroups; the agent reads the process's cgroup from /proc).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::agent_bin;
use kycd_test_support::fake_nvml::FakeNvml;
use kycd_test_support::host::{now, Host};
use kycd_test_support::netns::TestCgroup;
use serde_json::{json, Value};

const PT_UUID: &str = "7a0c5e1b-2f4d-4c8a-9e3b-1d2c3b4a5f60";
const VGPU_UUID: &str = "0c8e2d4a-7b1f-4e55-a2c3-9d8e7f6a5b4c";
const BUSES: [&str; 8] = ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"];

/// A child process, killed when dropped (also when the test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn collector(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap();
    assert!(out.status.success(), "kycd-collector {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The open findings of `kind` for `tenant`.
fn findings(db: &str, kind: &str, tenant: &str) -> Vec<Value> {
    collector(&["findings", "list", "--db", db, "--kind", kind, "--tenant", tenant, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eventually(what: &str, host: &Host, collector_log: &Path, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "timed out: {what}\n--- kycd log:\n{}\n--- collector log:\n{}",
            host.log(),
            std::fs::read_to_string(collector_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A signed attestation of `tenant` bound to `binding`.
fn attestation(host: &Host, tenant: &str, binding: Value, country: &str, foreign: bool) -> String {
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": tenant, "jti": format!("att-{tenant}"), "iat": now() - 5, "exp": now() + 3600,
        "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": format!("{tenant} Inc."), "countries": [country]},
        "binding": binding, "foreign_person": foreign
    }))
    .unwrap();
    kycd_protocol::sign(&claims, &host.issuer).unwrap()
}

/// The live XML of a running domain: its id, UUID and, for the passthrough VM, the eight
/// GPUs' host addresses and the telemetry channel's socket.
fn status_xml(name: &str, id: u32, uuid: &str, devices: &str) -> String {
    format!(
        "<domstatus state='running' reason='booted' pid='4242'>\n  <domain type='kvm' id='{id}'>\n    \
         <name>{name}</name>\n    <uuid>{uuid}</uuid>\n    <devices>\n{devices}    </devices>\n  </domain>\n</domstatus>\n"
    )
}

#[test]
fn passthrough_vgpu_and_process_tenants_reach_the_collector_with_their_methods() {
    if !kycd_test_support::host::is_root() {
        kycd_test_support::skip!("vm fleet test: needs root (real cgroups)");
        return;
    }
    let cg = match TestCgroup::new() {
        Ok(cg) => cg,
        Err(why) => {
            kycd_test_support::skip!("vm fleet test: {why}");
            return;
        }
    };
    let (kycd, kycctl) = (agent_bin("kycd"), agent_bin("kycctl"));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // The process tenant: a real process in a cgroup of its own. The VMs: their scopes.
    let root = cg.rel(&cg.path);
    let proc_cg = cg.child("proc-tenant");
    let sleeper = Killed(TestCgroup::spawn_sleep(&proc_cg));
    cg.child("machine-qemu\\x2d1\\x2dpt\\x2dvm.scope");
    cg.child("machine-qemu\\x2d2\\x2dvgpu\\x2dvm.scope");

    // libvirt's view: the passthrough VM holds eight GPUs and has the telemetry channel.
    let libvirt = w.join("libvirt");
    std::fs::create_dir_all(&libvirt).unwrap();
    let channel = w.join("channel/domain-1-pt-vm/org.kycd.telemetry.0");
    std::fs::create_dir_all(channel.parent().unwrap()).unwrap();
    let mut devices: String = BUSES
        .iter()
        .enumerate()
        .map(|(i, bus)| {
            format!(
                "      <hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/>\
                 <source><address domain='0x0000' bus='0x{bus}' slot='0x00' function='0x0'/></source>\
                 <alias name='hostdev{i}'/><address type='pci' domain='0x0000' bus='0x{:02x}' slot='0x00' function='0x0'/></hostdev>\n",
                i + 6
            )
        })
        .collect();
    devices.push_str(&format!(
        "      <channel type='unix'><source mode='bind' path='{}'/>\
         <target type='virtio' name='org.kycd.telemetry.0' state='disconnected'/><alias name='channel0'/></channel>\n",
        channel.display()
    ));
    std::fs::write(libvirt.join("pt-vm.xml"), status_xml("pt-vm", 1, PT_UUID, &devices)).unwrap();
    std::fs::write(libvirt.join("vgpu-vm.xml"), status_xml("vgpu-vm", 2, VGPU_UUID, "")).unwrap();
    let sys = w.join("sys");
    for bus in BUSES {
        kycd_test_support::sysfs::passed_through_gpu(&sys, bus, "0x2330");
    }
    // QEMU's end of the channel: listening, silent until the guest runs.
    let qemu_side = UnixListener::bind(&channel).unwrap();

    // The host's NVML: GPU 0 carries the vGPU VM's vGPU, GPU 1 the process tenant's process.
    let busy = json!([{"util": 90, "gpm": {"HMMA_TENSOR_UTIL": 60.0, "FP32_UTIL": 0.0}}]);
    let host_nvml = FakeNvml::new(json!({"gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-host-0", "ticks": busy,
         "vgpus": [{"uuid": "VGPU-1", "vm_id": VGPU_UUID}]},
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-host-1",
         "ticks": [{"util": 90, "gpm": {"HMMA_TENSOR_UTIL": 60.0, "FP32_UTIL": 0.0},
                    "processes": [{"pid": sleeper.0.id(), "used_mib": 1024, "sm_util": 90}]}]}
    ]}));

    // The collector, with a policy whose thresholds a VM crosses in seconds.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut host = Host::new(&format!(
        "[workloads]\ncgroup_root = \"{mount}\"\nroots = [\"{root}\"]\nrescan_interval_s = 1\n\
         libvirt_status_dir = \"{libvirt}\"\n\
         [gpu]\nnvml_library = \"{nvml}\"\ninterval_ms = 250\nwindow_s = 1\ntraining_min_minutes = 0\n\
         guest_telemetry_timeout_s = 10\nsysfs_root = \"{sys}\"\n\
         [reporting]\ncollector_url = \"http://127.0.0.1:{port}\"\ngroup_commit_ms = 0\nbatch_max_s = 1\n",
        mount = cg.mount.display(),
        libvirt = libvirt.display(),
        nvml = host_nvml.library().display(),
        sys = sys.display(),
    ));
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": 1, "measures": [],
        "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 5e16, "bio_training_ops": 1e20, "cluster_flops": 1e15,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    let token = kycd_protocol::sign(&claims, &host.authority).unwrap();
    kycd_test_support::host::atomic_write(&host.path("etc/policy.jws"), token.as_bytes());
    let db = format!("sqlite://{}", w.join("collector.db").display());
    let trust = host.path("etc/trust/policy.jwks");
    collector(&[
        "policy",
        "publish",
        &host.path("etc/policy.jws").to_string_lossy(),
        "--trust",
        &trust.to_string_lossy(),
        "--db",
        &db,
    ]);
    let collector_log = w.join("collector.log");
    let _collector = Killed(
        Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args([
                "serve",
                "--db",
                &db,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--evaluate-interval-s",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&collector_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let key = Command::new(&kycctl)
        .args(["host-key", "--public", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .output()
        .unwrap();
    assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
    std::fs::write(w.join("host.jwk"), &key.stdout).unwrap();
    collector(&[
        "hosts",
        "add",
        "--host-id",
        "node-1",
        "--public-jwk",
        &w.join("host.jwk").to_string_lossy(),
        "--db",
        &db,
    ]);

    // The three tenants' attestations: only the passthrough VM's tenant is a foreign person.
    host.drop_file(
        "pt.jws",
        attestation(&host, "tenant-pt", json!({"kind": "libvirt_domain", "id": "pt-vm"}), "DE", true)
            .as_bytes(),
    );
    host.drop_file(
        "vgpu.jws",
        attestation(&host, "tenant-vgpu", json!({"kind": "libvirt_domain", "id": "vgpu-vm"}), "US", false)
            .as_bytes(),
    );
    host.drop_file(
        "proc.jws",
        attestation(
            &host,
            "tenant-proc",
            json!({"kind": "cgroup", "id": format!("/{root}/proc-tenant")}),
            "US",
            false,
        )
        .as_bytes(),
    );
    assert!(kycd.exists());
    host.start();

    // From the allocation alone: capacity and early warning, not training.
    eventually("capacity and early warning of tenant-pt", &host, &collector_log, 60, || {
        !findings(&db, "cluster_capacity_crossed", "tenant-pt").is_empty()
            && !findings(&db, "early_warning", "tenant-pt").is_empty()
    });
    assert!(findings(&db, "training_threshold_crossed", "tenant-pt").is_empty(), "no guest figures yet");
    // The guest is silent: after the gap timeout, an audit record here and a finding there.
    eventually("guest_telemetry_gap of tenant-pt", &host, &collector_log, 60, || {
        !findings(&db, "guest_telemetry_gap", "tenant-pt").is_empty()
    });
    // The agent writes its record from the daemon's loop, a moment after the window that
    // carried the gap left for the collector.
    let gap_record = || host.records().into_iter().find(|r| r["event"]["type"] == "guest_telemetry_gap");
    eventually("the agent's guest_telemetry_gap audit record", &host, &collector_log, 15, || {
        gap_record().is_some()
    });
    let gap = gap_record().unwrap();
    assert_eq!(
        (gap["event"]["domain"].as_str(), gap["event"]["gpus"].as_u64()),
        (Some("pt-vm"), Some(8)),
        "{gap}"
    );
    assert_eq!(gap["event"]["reason"], "never_reported", "{gap}");

    // The guest: `kycd guest` on eight H100s of its own (the guest's NVML), writing to a
    // socket this test relays to the channel the agent reads.
    let (mut to_agent, _) = qemu_side.accept().unwrap();
    let guest_port = w.join("guest-port.sock");
    let guest_side = UnixListener::bind(&guest_port).unwrap();
    let guest_gpus: Vec<Value> = (0..8)
        .map(|i| {
            json!({"name": "NVIDIA H100 80GB HBM3", "uuid": format!("GPU-guest-{i}"), "sm_clock_mhz": 1980,
                        "ticks": [{"util": 95, "gpm": {"HMMA_TENSOR_UTIL": 90.0, "FP32_UTIL": 0.0}}]})
        })
        .collect();
    let guest_nvml = FakeNvml::new(json!({"gpus": guest_gpus}));
    let _guest = Killed(
        Command::new(&kycd)
            .args(["guest", "--interval-ms", "250", "--report-every-s", "1", "--port"])
            .arg(&guest_port)
            .arg("--nvml-library")
            .arg(guest_nvml.library())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(w.join("guest.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let (mut from_guest, _) = guest_side.accept().unwrap();
    let relay = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_guest, &mut to_agent);
        let _ = to_agent.flush();
    });
    eventually(
        "training_threshold_crossed of tenant-pt from guest telemetry",
        &host,
        &collector_log,
        90,
        || !findings(&db, "training_threshold_crossed", "tenant-pt").is_empty(),
    );

    // Every tenant's windows at the collector, with their methods.
    let conn = rusqlite::Connection::open(w.join("collector.db")).unwrap();
    let mut methods = conn
        .prepare(
            "SELECT DISTINCT tenant, workload, method FROM records WHERE tenant IS NOT NULL ORDER BY 1, 2, 3",
        )
        .unwrap();
    let rows: Vec<(String, String, String)> = methods
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let proc_workload = format!("cgroup:/{root}/proc-tenant");
    for expected in [
        ("tenant-proc", proc_workload.as_str(), "gpm_pipes"),
        ("tenant-pt", "libvirt_domain:pt-vm", "allocation"),
        ("tenant-pt", "libvirt_domain:pt-vm", "guest_reported"),
        ("tenant-vgpu", "libvirt_domain:vgpu-vm", "gpm_pipes"),
    ] {
        assert!(
            rows.iter().any(|(t, wl, m)| (t.as_str(), wl.as_str(), m.as_str()) == expected),
            "{expected:?} not in {rows:?}"
        );
    }
    // The guest's figures arrive as the guest measured them: its GPUs run HMMA at 90 % at full
    // clock, so every guest-reported window's point estimate is 0.9 × the H100's BF16 peak per
    // GPU-second; the upper bound stays the allocation (FP8, twice BF16).
    let mut windows = conn
        .prepare("SELECT estimated_ops, ops_upper, gpu_seconds FROM records WHERE method = 'guest_reported'")
        .unwrap();
    let figures: Vec<(f64, f64, f64)> = windows
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!figures.is_empty());
    for (point, upper, gpu_seconds) in figures {
        let (point_rate, upper_rate) = (point / gpu_seconds, upper / gpu_seconds);
        assert!((point_rate / (0.9 * 989.4e12) - 1.0).abs() < 1e-6, "{point_rate:e} per GPU-second");
        assert!((upper_rate / 1978.9e12 - 1.0).abs() < 1e-6, "{upper_rate:e} per GPU-second");
    }
    // The agent's status says the guest reports all eight GPUs.
    let status =
        Command::new(&kycctl).args(["status", "--socket"]).arg(host.path("run/kycd.sock")).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("guest telemetry: pt-vm reporting, channel connected, 8/8 GPUs reporting"),
        "{status}"
    );
    host.stop();
    drop(relay);
}
