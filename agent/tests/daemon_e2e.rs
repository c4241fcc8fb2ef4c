//! End-to-end: the real `kycd run` binary against temporary directories (and, as root, real
//! cgroup v2 directories), observed through its audit log — the record operators rely on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kycd_protocol::{Algorithm, Jwks, PrivateJwk};
use serde_json::json;

use host_support::{admit, atomic_write, http_get, is_root, now, promtool_check, reasons, Host};
use kycd_test_support::host as host_support;

#[test]
fn attestations_policy_changes_and_rollback_show_in_the_audit_log() {
    let mut host = Host::new("");
    host.write_policy(1, &["KP"]);
    host.start();
    host.wait_for("policy v1", |r| r["event"]["type"] == "policy_applied" && r["event"]["version"] == 1);

    // Drop two attestations, plus garbage, a truncated token, an oversized file and a FIFO
    // (which must not block the agent) beside them.
    let fifo = host.path("state/attestations/fifo.jws");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let de = host.attestation("vm-de", "DE", now() + 3600);
    host.drop_file("vm-de.jws", de.as_bytes());
    host.drop_file("vm-kp.jws", host.attestation("vm-kp", "KP", now() + 3600).as_bytes());
    host.drop_file("garbage.jws", b"\x00\xffnot a token at all");
    host.drop_file("truncated.jws", &de.as_bytes()[..de.len() / 2]);
    host.drop_file("huge.jws", &vec![b'A'; 70_000]);
    host.drop_file(".partial.jws", b"ignored: hidden temp file");

    let allowed = host.wait_for_verdict("libvirt_domain:vm-de", "allow");
    assert_eq!(allowed["event"]["decision"]["policy_version"], 1);
    assert_eq!(allowed["event"]["decision"]["tenant"], "tenant-vm-de");
    assert_eq!(reasons(&allowed), ["allowed"]);
    let denied = host.wait_for_verdict("libvirt_domain:vm-kp", "deny");
    let reason = &denied["event"]["decision"]["reasons"][0];
    assert_eq!(
        (reason["code"].as_str(), reason["measure_id"].as_str()),
        (Some("measure_prohibit"), Some("m-kp"))
    );
    assert_eq!(reason["citation"], "EO 13984 sec. 2");
    for (file, kind) in [
        ("garbage.jws", "Malformed"),
        ("truncated.jws", "Malformed"),
        ("huge.jws", "TooLarge"),
        ("fifo.jws", "Io"),
    ] {
        host.wait_for(file, |r| {
            r["event"]["type"] == "attestation_rejected"
                && r["event"]["kind"] == kind
                && r["event"]["source"].as_str().unwrap().ends_with(file)
        });
    }
    assert!(!host.records().iter().any(|r| r.to_string().contains(".partial.jws")), "temp files are ignored");
    assert!(
        !fs::read_to_string(host.path("kycd.log")).unwrap().contains("Secret Legal Name"),
        "names not logged"
    );

    // A new policy version prohibiting DE flips vm-de.
    host.write_policy(2, &["KP", "DE"]);
    let flipped = host.wait_for_verdict("libvirt_domain:vm-de", "deny");
    assert_eq!(flipped["event"]["decision"]["policy_version"], 2);
    assert_eq!(flipped["event"]["decision"]["reasons"][0]["measure_id"], "m-de");

    // Rolling back to version 1 is refused; vm-de stays denied.
    host.write_policy(1, &["KP"]);
    host.wait_for("rollback refused", |r| {
        r["event"]["type"] == "policy_rejected" && r["event"]["kind"] == "Rollback"
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(host.latest_decision("libvirt_domain:vm-de").unwrap()["event"]["decision"]["verdict"], "deny");

    // Withdrawal: deleting the file makes the workload unverified (policy: deny).
    fs::remove_file(host.path("state/attestations/vm-kp.jws")).unwrap();
    host.wait_for("withdrawal", |r| r["event"]["type"] == "attestation_withdrawn");

    // Restart: the anti-rollback mark survives (v1 on disk is refused again), attestations
    // in the state directory need no re-delivery.
    host.stop();
    let before = host.records().len();
    host.start();
    host.wait_for("rollback refused after restart", |r| {
        r["event"]["type"] == "policy_rejected" && r["event"]["kind"] == "Rollback"
    });
    host.wait_for("vm-de decided after restart", |r| {
        r["seq"].as_u64().unwrap() as usize >= before && r["event"]["workload"] == "libvirt_domain:vm-de"
    });
    host.stop();

    // The chain is intact, and a one-byte change anywhere is detected.
    let kycctl = env!("CARGO_BIN_EXE_kycctl");
    let audit_dir = host.path("state/audit");
    let ok = Command::new(kycctl).args(["audit", "verify"]).arg(&audit_dir).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let segment = fs::read_dir(&audit_dir).unwrap().flatten().map(|e| e.path()).min().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    let i = bytes.iter().position(|&b| b == b'a').unwrap();
    bytes[i] = b'b';
    fs::write(&segment, bytes).unwrap();
    let broken = Command::new(kycctl).args(["audit", "verify"]).arg(&audit_dir).output().unwrap();
    assert_eq!(broken.status.code(), Some(1), "{}", String::from_utf8_lossy(&broken.stdout));
}

#[test]
fn real_cgroup_v2_workloads_are_discovered_and_vanish() {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mount) = kycd::discovery::cgroup::find_cgroup2_mount(&mountinfo) else {
        kycd_test_support::skip!(
            "SKIPPED real_cgroup_v2_workloads_are_discovered_and_vanish: no cgroup2 mount"
        );
        return;
    };
    let root_name = format!("kycd-e2e-{}", std::process::id());
    let root = mount.join(&root_name);
    if let Err(e) = fs::create_dir(&root) {
        kycd_test_support::skip!(
            "SKIPPED real_cgroup_v2_workloads_are_discovered_and_vanish: cannot create {}: {e}",
            root.display()
        );
        return;
    }
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Ok(entries) = fs::read_dir(&self.0) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
            let _ = fs::remove_dir(&self.0);
        }
    }
    let _cleanup = Cleanup(root.clone());
    let vm = root.join("machine-qemu\\x2d7\\x2dgpu\\x2dvm.scope");
    fs::create_dir(&vm).unwrap();

    // No cgroup_root: the agent finds the cgroup2 mount in /proc/self/mountinfo itself.
    let mut host = Host::new(&format!("[workloads]\nroots = [\"{root_name}\"]\nrescan_interval_s = 1\n"));
    host.write_policy(1, &[]);
    host.start();
    let d = host.wait_for_verdict("libvirt_domain:gpu-vm", "deny");
    assert_eq!(reasons(&d), ["no_attestation", "unverified_deny"]);
    host.drop_file("gpu-vm.jws", host.attestation("gpu-vm", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:gpu-vm", "allow");
    fs::remove_dir(&vm).unwrap();
    let pod = root.join("pod-a.slice");
    fs::create_dir(&pod).unwrap();
    host.wait_for_verdict(&format!("cgroup:/{root_name}/pod-a.slice"), "deny");
    host.stop();
}

#[test]
fn a_broken_trust_file_on_reload_keeps_the_previous_keys() {
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    // The trust file is replaced by garbage and the agent is told to reload.
    fs::write(host.path("etc/trust/issuers.jwks"), b"{\"keys\": [ not json").unwrap();
    let pid = host.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    while !host.log().contains("keeping the previous set") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "no reload error logged:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    // The previous issuer keys still verify new attestations.
    host.drop_file("vm-b.jws", host.attestation("vm-b", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-b", "allow");
    assert_eq!(host.latest_decision("libvirt_domain:vm-a").unwrap()["event"]["decision"]["verdict"], "allow");
    host.stop();
}

#[test]
fn host_attestation_is_checked_against_cloud_init_instance_id() {
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    fs::write(host.path("etc/instance-data.json"), br#"{"v1": {"instance_id": "i-0abc"}}"#).unwrap();
    let issuer = PrivateJwk::from_json(host.issuer.to_json().as_bytes()).unwrap();
    let host_token = |host_id: &str, jti: &str| {
        let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
            "iss": "kyc", "sub": "tenant-bm", "jti": jti, "iat": now() - 5, "exp": now() + 3600,
            "kyc": {"status": "verified"},
            "subject": {"kind": "individual", "legal_name": "X", "countries": ["US"]},
            "binding": {"kind": "host", "id": "bare-metal", "host_id": host_id},
            "foreign_person": false
        }))
        .unwrap();
        kycd_protocol::sign(&claims, &issuer).unwrap()
    };
    // Delivered for another instance: rejected, the host stays unverified.
    atomic_write(&host.path("etc/host.jws"), host_token("i-other", "h-1").as_bytes());
    host.start();
    host.wait_for("wrong host", |r| {
        r["event"]["type"] == "attestation_rejected" && r["event"]["kind"] == "WrongHost"
    });
    assert_eq!(reasons(&host.wait_for_verdict("host:host", "deny")), ["no_attestation", "unverified_deny"]);
    // cloud-init delivers the right one: the host is verified.
    atomic_write(&host.path("etc/host.jws"), host_token("i-0abc", "h-2").as_bytes());
    let allowed = host.wait_for_verdict("host:host", "allow");
    assert_eq!(allowed["event"]["decision"]["attestation_jti"], "h-2");
    host.stop();
}

#[test]
fn check_config_prints_the_effective_config_and_names_bad_keys() {
    let host = Host::new("");
    let out = Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["check-config", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let effective: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(effective["host_id"].as_str(), Some("node-1"));
    assert!(effective["audit"]["dir"].as_str().unwrap().ends_with("state/audit"), "derived paths are shown");

    fs::create_dir_all(host.path("etc/conf.d")).unwrap();
    fs::write(host.path("etc/conf.d/10-typo.toml"), "[policy]\nfiel = \"/x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["check-config", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10-typo.toml") && err.contains("fiel") && err.contains("line 2"), "{err}");
}

#[test]
fn a_libvirt_domain_bound_by_uuid_maps_to_its_running_scope() {
    let uuid = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";
    let mut host = Host::new("");
    let d = host.dir.path().display().to_string();
    host.extra_config = format!(
        "[workloads]\ncgroup_root = \"{d}/cgroup\"\nrescan_interval_s = 1\nlibvirt_status_dir = \"{d}/libvirt\"\n"
    );
    host.write_config();
    host.write_policy(1, &[]);
    host.start();
    // Admitted before it runs: the attestation names the domain by UUID, nothing runs yet.
    host.drop_file("train.jws", host.attestation(uuid, "DE", now() + 3600).as_bytes());
    host.wait_for_verdict(&format!("libvirt_domain:{uuid}"), "allow");
    // The domain starts as number 9; libvirt shortened its name in the scope name, so the
    // status XML's id='9' is what names the scope.
    fs::create_dir_all(host.path("libvirt")).unwrap();
    fs::write(
        host.path("libvirt/train-42.xml"),
        format!(
            "<domstatus><domain type='kvm' id='9'><name>train-42</name><uuid>{uuid}</uuid></domain></domstatus>"
        ),
    )
    .unwrap();
    fs::create_dir_all(host.path("cgroup/machine.slice/machine-qemu\\x2d9\\x2dtrain\\x2d4.scope")).unwrap();
    // The decision lands on the running domain, and the UUID-named placeholder goes away
    // instead of lingering (and later flipping to deny).
    let allowed = host.wait_for_verdict("libvirt_domain:train-42", "allow");
    assert_eq!(allowed["event"]["decision"]["tenant"], format!("tenant-{uuid}"));
    host.wait_for("placeholder gone", |r| {
        r["event"]["type"] == "workload_vanished"
            && r["event"]["workload"] == format!("libvirt_domain:{uuid}")
    });
    std::thread::sleep(Duration::from_millis(1500)); // a rescan or two later
    let placeholder = host.latest_decision(&format!("libvirt_domain:{uuid}")).unwrap();
    assert_eq!(placeholder["event"]["decision"]["verdict"], "allow", "no later decision for the placeholder");
    host.stop();
}

#[test]
fn removing_the_policy_key_withdraws_the_policy_on_reload() {
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    // The authority's key is revoked: a new, empty-of-it trust set, then SIGHUP.
    let other = PrivateJwk::generate(Algorithm::EdDSA, "authority-2").unwrap();
    let jwks = Jwks::from_keys([other.public_key()]).unwrap().to_json().to_string();
    fs::write(host.path("etc/trust/policy.jwks"), jwks).unwrap();
    let pid = host.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let withdrawn = host.wait_for("policy withdrawn", |r| r["event"]["type"] == "policy_withdrawn");
    assert_eq!(withdrawn["event"]["kind"], "UnknownKey");
    let denied = host.wait_for_verdict("libvirt_domain:vm-a", "deny");
    assert_eq!(reasons(&denied), ["no_policy"]);
    host.stop();
}

#[test]
fn a_failing_audit_log_holds_back_decisions_then_locks_the_host_down() {
    if !is_root() {
        kycd_test_support::skip!("SKIP a_failing_audit_log_holds_back_decisions_then_locks_the_host_down: needs root to mount a tmpfs");
        return;
    }
    let mut host = Host::new("mode = \"enforce\"\n");
    // Enforce mode, so the lockdown path runs, but with no backend: this test must not touch
    // the host's nftables or cgroups.
    let _unmount = audit_on_small_tmpfs(
        &mut host,
        "mode = \"enforce\"\n[enforcement]\nnftables = false\ncgroup = false\n",
    );
    host.write_policy(1, &[]);
    host.start();
    // Fill the audit filesystem, then keep deciding until a record no longer fits (the
    // segment's last page may still hold a few).
    let filler = host.path("audit-fs/filler");
    let _ = fs::write(&filler, vec![0u8; 512 * 1024]);
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    let mut n = 0;
    while !host.log().contains("cannot record decisions") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "audit writes never failed:\n{}", host.log());
        n += 1;
        let vm = format!("vm-{n}");
        host.drop_file(&format!("{vm}.jws"), host.attestation(&vm, "DE", now() + 3600).as_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    while !host.log().contains("audit log unavailable: denying") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "no lockdown logged:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Admission while decisions cannot be recorded: deny, whatever was recorded before.
    let (code, _, err) = admit(&host, &["--workload", "libvirt_domain:vm-1"], None);
    assert_eq!(code, 1, "{err}");
    // Space comes back: the held-back decision is recorded (and enforced) after all.
    fs::remove_file(&filler).unwrap();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    let last = format!("libvirt_domain:vm-{n}");
    loop {
        if host
            .records()
            .iter()
            .any(|r| r["event"]["workload"] == last && r["event"]["decision"]["verdict"] == "allow")
        {
            break;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "decision for {last} never recorded:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.stop();
}

#[test]
fn admission_answers_with_the_recorded_decision_and_fails_closed() {
    if !is_root() {
        kycd_test_support::skip!(
            "SKIP admission_answers_with_the_recorded_decision_and_fails_closed: admission is root only"
        );
        return;
    }
    let mut host = Host::new("");
    host.write_policy(1, &["KP"]);
    host.start();
    host.wait_for("policy", |r| r["event"]["type"] == "policy_applied");
    let de = host.attestation("vm-de", "DE", now() + 3600);
    fs::write(host.path("de.jws"), &de).unwrap();
    let de_file = host.path("de.jws").display().to_string();
    let (code, out, err) =
        admit(&host, &["--workload", "libvirt_domain:vm-de", "--attestation", &de_file], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("libvirt_domain:vm-de: allowed"), "{out}");
    // Recorded before it was answered, and the attestation was kept.
    let decision = host.latest_decision("libvirt_domain:vm-de").unwrap();
    assert_eq!(decision["event"]["decision"]["verdict"], "allow");
    let kept = host.records().into_iter().find(|r| r["event"]["via"] == "admission").unwrap();
    assert!(Path::new(kept["event"]["source"].as_str().unwrap()).exists());

    let kp = host.attestation("vm-kp", "KP", now() + 3600);
    let (code, _, err) =
        admit(&host, &["--workload", "libvirt_domain:vm-kp", "--attestation", "-"], Some(&kp));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("measure_prohibit") && err.contains("m-kp") && err.contains("EO 13984"), "{err}");

    let (code, _, err) = admit(&host, &["--workload", "libvirt_domain:vm-none"], None);
    assert_eq!(code, 1, "no attestation, unverified deny: {err}");
    assert!(err.contains("unverified_deny"), "{err}");
    let (code, _, err) =
        admit(&host, &["--workload", "libvirt_domain:vm-x", "--attestation", "-"], Some("eyJ.bad.x"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("attestation rejected (Malformed)"), "{err}");
    // An attestation for another workload does not admit this one.
    let (code, _, err) =
        admit(&host, &["--workload", "libvirt_domain:vm-other", "--attestation", &de_file], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bound to libvirt_domain:vm-de"), "{err}");
    let (code, _, err) = admit(&host, &["--workload", "pod:x"], None);
    assert_eq!(code, 2, "usage error: {err}");
    // A domain named like another domain's UUID cannot borrow that UUID's attestation.
    let u1 = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";
    let by_uuid = host.attestation(u1, "DE", now() + 3600);
    let impostor = format!("libvirt_domain:{u1}");
    let args = ["--workload", impostor.as_str(), "--libvirt-uuid", "00000000-0000-4000-8000-000000000002"];
    let (code, _, err) = admit(&host, &[&args[..], &["--attestation", "-"]].concat(), Some(&by_uuid));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("named like a UUID"), "{err}");
    // Attestations kept from admissions leave the admitted directory once expired (and are
    // withdrawn); they are archived, not deleted (issue 19).
    let short = host.attestation("vm-short", "DE", now() + 2);
    let (code, _, err) =
        admit(&host, &["--workload", "libvirt_domain:vm-short", "--attestation", "-"], Some(&short));
    assert_eq!(code, 0, "{err}");
    let kept_files = || fs::read_dir(host.path("state/admitted")).unwrap().count();
    let before = kept_files();
    host.wait_for("expired admission withdrawn", |r| {
        r["event"]["type"] == "attestation_withdrawn" && r["event"]["workload"] == "libvirt_domain:vm-short"
    });
    assert_eq!(kept_files(), before - 1, "the expired attestation file is moved out");
    let archived: Vec<_> = fs::read_dir(host.path("state/admitted-expired")).unwrap().collect();
    assert_eq!(archived.len(), 1, "and archived");

    // A restart keeps the admitted attestation: no re-delivery needed.
    host.stop();
    let (code, _, err) = admit(&host, &["--workload", "libvirt_domain:vm-de"], None);
    assert_eq!(code, 3, "agent down means deny: {err}");
    assert!(err.contains("fail closed"), "{err}");
    let (code, _, err) = admit(&host, &["--workload", "libvirt_domain:vm-de", "--fail-open"], None);
    assert_eq!(code, 0, "--fail-open: {err}");
    host.start();
    let (code, out, err) = admit(&host, &["--workload", "libvirt_domain:vm-de"], None);
    assert_eq!(code, 0, "{out}{err}");
    host.stop();
}

#[test]
fn the_libvirt_hook_admits_at_prepare_with_the_attestation_from_the_domain_xml() {
    if !is_root() {
        kycd_test_support::skip!("SKIP the_libvirt_hook_admits_at_prepare_with_the_attestation_from_the_domain_xml: admission is root only");
        return;
    }
    let uuid = "0b8a1d0e-6f3e-4d8c-a1b2-3c4d5e6f7a8b";
    let mut host = Host::new("");
    host.write_policy(1, &["KP"]);
    host.start();
    host.wait_for("policy", |r| r["event"]["type"] == "policy_applied");
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/libvirt/qemu");
    let socket = host.path("run/kycd.sock");
    let run_hook = |name: &str, op: &str, xml: &str| {
        use std::io::Write as _;
        let mut child = Command::new(&hook)
            .args([name, op, "begin", "-"])
            .env("KYCCTL", env!("CARGO_BIN_EXE_kycctl"))
            .env("KYCD_SOCKET", &socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The hook may decide (and exit) before reading the XML, e.g. when the agent is
        // down: a broken pipe here is its answer arriving early, not a failure.
        match child.stdin.take().unwrap().write_all(xml.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.unwrap(),
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let domain_xml = |name: &str, uuid: &str, attestation: &str| {
        format!(
            "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <metadata>\n    \
             <kycd:attestation xmlns:kycd=\"https://kycd.dev/xmlns/attestation/1\">\n{attestation}\n    \
             </kycd:attestation>\n  </metadata>\n  <devices><disk><source file='/x'/></disk></devices>\n</domain>\n"
        )
    };
    // Bound by UUID, as a provisioning system knows the VM before it has a name on a host.
    let allowed = domain_xml("train-1", uuid, &host.attestation(uuid, "DE", now() + 3600));
    let (code, err) = run_hook("train-1", "prepare", &allowed);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        host.latest_decision("libvirt_domain:train-1").unwrap()["event"]["decision"]["verdict"],
        "allow"
    );
    let uuid2 = "1c9b2e1f-7a4f-4e9d-b2c3-4d5e6f7a8b9c";
    let denied = domain_xml("train-2", uuid2, &host.attestation(uuid2, "KP", now() + 3600));
    let (code, err) = run_hook("train-2", "prepare", &denied);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("measure_prohibit"), "{err}");
    let (code, err) = run_hook("train-3", "prepare", "<domain><name>train-3</name></domain>");
    assert_eq!(code, 1, "no attestation in the metadata: {err}");
    // Other operations never consult the agent.
    host.stop();
    assert_eq!(run_hook("train-2", "release", &denied).0, 0);
    let (code, err) = run_hook("train-1", "prepare", &allowed);
    assert_eq!(code, 3, "agent down: the domain does not start: {err}");
}

/// Runs kycctl with `args` (as uid/gid/groups when given, through setpriv); returns (exit
/// code, stdout, stderr).
fn kycctl_as(ids: Option<(u32, u32, &str)>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = match ids {
        Some((uid, gid, groups)) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()]);
            if groups.is_empty() {
                c.arg("--clear-groups");
            } else {
                c.args(["--groups", groups]);
            }
            c.arg(env!("CARGO_BIN_EXE_kycctl"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_kycctl")),
    };
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn operators_read_status_by_group_and_only_root_mutates() {
    if !is_root() {
        kycd_test_support::skip!(
            "SKIP operators_read_status_by_group_and_only_root_mutates: needs root to switch users"
        );
        return;
    }
    let mut host = Host::new("");
    // Group `users` (gid 100 on Debian) stands in for the package's `kycd` group.
    host.extra_api = "socket_group = \"users\"\n".into();
    host.write_config();
    host.write_policy(3, &["KP"]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    // The agent runs from a private temp dir: let the unprivileged callers reach the socket.
    for dir in [host.dir.path().to_path_buf(), host.path("run")] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = host.path("run/kycd.sock").display().to_string();

    let (code, out, err) = kycctl_as(None, &["status", "--socket", &socket]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mode audit") && out.contains("version 3 signed by authority-1"), "{out}");
    assert!(out.contains("1 allow"), "{out}");
    assert!(out.contains("spool:        0 records pending") && out.contains("uploads off"), "{out}");
    let (code, out, _) = kycctl_as(None, &["status", "--json", "--socket", &socket]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["policy"]["version"], 3);
    assert_eq!(status["gpu"], "unavailable", "no NVML on a test machine");
    assert_eq!(status["reporting"]["spool_pending_records"], 0);
    assert_eq!(status["reporting"]["uploading"], false);
    assert!(status["reporting"]["last_upload_at"].is_null());
    let (code, out, _) = kycctl_as(None, &["workloads", "--socket", &socket]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.starts_with("libvirt_domain:vm-a")
            && l.contains("allow")
            && l.contains("tenant-vm-a")),
        "{out}"
    );

    let (code, out, _) = kycctl_as(None, &["tenants", "--socket", &socket]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.starts_with("tenant-vm-a") && l.contains("libvirt_domain:vm-a (allow)")),
        "{out}"
    );
    let (code, out, _) = kycctl_as(None, &["decisions", "--tenant", "tenant-vm-a", "--socket", &socket]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "header + vm-a: {out}");
    let (code, out, _) =
        kycctl_as(None, &["decisions", "--since", "4000000000", "--json", "--socket", &socket]);
    assert_eq!((code, out.trim()), (0, "[]"));
    let (code, out, _) = kycctl_as(None, &["gpus", "--socket", &socket]);
    assert_eq!(code, 0);
    assert!(out.contains("GPU backend unavailable"), "{out}");
    // A member of the socket's group reads, and may not mutate.
    let (code, out, err) = kycctl_as(Some((65534, 65534, "100")), &["status", "--socket", &socket]);
    assert_eq!(code, 0, "group member reads: {err}");
    assert!(out.contains("policy:"), "{out}");
    let (code, _, err) = kycctl_as(Some((65534, 65534, "100")), &["reload", "--socket", &socket]);
    assert_eq!(code, 1, "group member reloads: {err}");
    assert!(err.contains("403") && err.contains("root only"), "{err}");
    let (code, _, err) = kycctl_as(
        Some((65534, 65534, "100")),
        &["admit", "--workload", "libvirt_domain:vm-a", "--socket", &socket],
    );
    assert_eq!(code, 1, "group member admits: {err}");
    host.wait_for("refusal recorded", |r| r["event"]["type"] == "api_refused" && r["event"]["uid"] == 65534);
    // Anyone else cannot even connect.
    let (code, _, err) = kycctl_as(Some((65534, 65534, "")), &["status", "--socket", &socket]);
    assert_eq!(code, 3, "outsider: {err}");
    // Root reloads.
    let (code, out, err) = kycctl_as(None, &["reload", "--socket", &socket]);
    assert_eq!((code, out.trim()), (0, "reloaded"), "{err}");
    host.stop();
    let (code, _, err) = kycctl_as(None, &["status", "--socket", &socket]);
    assert_eq!(code, 3, "agent down: {err}");
    assert!(err.contains("is kycd running"), "{err}");
}

#[test]
fn systemd_is_notified_ready_then_watchdog_then_stopping() {
    use std::os::unix::net::UnixDatagram;
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    let notify = host.path("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let log = fs::File::create(host.path("kycd.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["run", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(log)
        .spawn()
        .unwrap();
    host.child = Some(child);
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    while !messages.iter().any(|m: &String| m.starts_with("WATCHDOG=1")) {
        let len = listener.recv(&mut buf).unwrap_or_else(|e| panic!("{e}; got {messages:?}\n{}", host.log()));
        messages.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    assert!(messages[0].starts_with("READY=1\nSTATUS="), "{messages:?}");
    assert!(host.path("run/kycd.sock").exists(), "ready before the socket answers");
    host.stop();
    let len = listener.recv(&mut buf).unwrap();
    let mut last = String::from_utf8_lossy(&buf[..len]).into_owned();
    while let Ok(len) = listener.recv(&mut buf) {
        last = String::from_utf8_lossy(&buf[..len]).into_owned();
        if last == "STOPPING=1" {
            break;
        }
    }
    assert_eq!(last, "STOPPING=1");
}

#[test]
fn collectors_get_a_host_signed_statement_and_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut host = Host::new("");
    host.extra_config =
        format!("[collector_api]\nenabled = true\nlisten = \"{addr}\"\ninsecure_plaintext = true\n");
    host.write_config();
    host.write_policy(5, &["KP"]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");

    let nonce = "collector-nonce-0001";
    // The statement snapshot is refreshed right after the decision is recorded: poll briefly.
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
    let (status, token) = loop {
        let (status, token) = http_get(&addr, &format!("/v1/attestation?nonce={nonce}"));
        let payload = token.trim().split('.').nth(1).unwrap_or("").to_owned();
        let has_vm = kycd_protocol::b64::decode(payload.as_bytes())
            .is_ok_and(|p| String::from_utf8_lossy(&p).contains("libvirt_domain:vm-a"));
        if status != 200 || has_vm || kycd_protocol::clock::monotonic() > deadline {
            break (status, token);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, 200, "{token}");
    // Verified with the host's public key, as a collector would after enrollment.
    let key = PrivateJwk::from_json(&fs::read(host.path("state/host.key")).unwrap()).unwrap();
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(host.path("state/host.key")).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    let jwks = Jwks::from_keys([key.public_key()]).unwrap();
    let statement = kycd_protocol::verify::<kycd_protocol::HostStatementClaims>(
        token.trim().as_bytes(),
        &jwks,
        &kycd_protocol::VerifyOptions::default(),
        now(),
    )
    .unwrap()
    .claims;
    assert_eq!((statement.iss.as_str(), statement.nonce.as_str()), ("node-1", nonce));
    assert_eq!(statement.policy_version, Some(5));
    // The host's facts, read at start, with the uptime of this request.
    let facts = statement.host.as_ref().expect("host facts in the statement");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(facts.boot_id, boot_id.trim());
    assert!(facts.cpu_threads >= 1 && facts.memory_bytes > 0 && !facts.kernel.is_empty(), "{facts:?}");
    assert!(facts.uptime_s > 0, "{facts:?}");
    let vm = statement.workloads.iter().find(|w| w.workload == "libvirt_domain:vm-a").unwrap();
    assert_eq!(vm.tenant.as_deref(), Some("tenant-vm-a"));
    assert_eq!(vm.verdict, kycd_protocol::Verdict::Allow);
    assert!(vm.attestation_digest.as_ref().is_some_and(|d| d.len() == 64) && vm.attestation_exp.is_some());
    // The identity the collector needs for findings and exports, from the attestation.
    let subject = vm.subject.as_ref().unwrap();
    assert_eq!((subject.legal_name.as_str(), subject.foreign_person), ("Secret Legal Name AG", true));
    assert_eq!(subject.countries, vec!["DE".parse::<kycd_protocol::CountryCode>().unwrap()]);
    assert_eq!(http_get(&addr, "/v1/attestation?nonce=bad").0, 400);
    assert_eq!(http_get(&addr, "/v1/attestation").0, 400);
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&addr, "/readyz").0, 200);

    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("kycd_workloads{verdict=\"allow\"} 1"), "{metrics}");
    assert!(metrics.contains("kycd_policy_version 5"), "{metrics}");
    assert!(metrics.contains("kycd_gpu_backend_available 0"), "{metrics}");
    // Reporting: the spool is empty (no GPU here), nothing uploaded, every failure kind
    // exported at 0, no success yet. No fetcher configured: no policy fetch families.
    for line in [
        "kycd_spool_pending_records 0",
        "kycd_spool_merges_total 0",
        "kycd_spool_append_errors_total 0",
        "kycd_upload_batches_total 0",
        "kycd_upload_records_total 0",
        "kycd_upload_failures_total{kind=\"network\"} 0",
        "kycd_upload_failures_total{kind=\"rejected\"} 0",
        "kycd_upload_last_success_timestamp_seconds 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in:\n{metrics}");
    }
    assert!(metrics.contains("# TYPE kycd_spool_bytes gauge"), "{metrics}");
    assert!(!metrics.contains("kycd_policy_fetches_total"), "{metrics}");
    promtool_check(&metrics);
    host.stop();
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one_and_says_so() {
    if !is_root() {
        kycd_test_support::skip!("SKIP sighup_with_a_broken_config_keeps_the_running_one_and_says_so: status is for root or the socket group");
        return;
    }
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    host.start();
    let socket = host.path("run/kycd.sock").display().to_string();
    let hup = |host: &Host| {
        let pid = host.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    };
    let good = fs::read_to_string(host.path("etc/kycd.toml")).unwrap();
    fs::write(host.path("etc/kycd.toml"), format!("{good}\n[policy]\nfiel = 1\n")).unwrap();
    hup(&host);
    let failed = host.wait_for("reload failed", |r| r["event"]["type"] == "config_reload_failed");
    assert!(failed["event"]["reason"].as_str().unwrap().contains("keeping the running one"), "{failed}");
    let (code, out, err) = kycctl_as(None, &["status", "--socket", &socket]);
    assert_eq!(code, 4, "the agent still answers, and is unhealthy: {err}");
    assert!(out.contains("last reload:  FAILED"), "{out}");
    assert!(err.starts_with("error: unhealthy: last reload failed: ") && err.lines().count() == 1, "{err}");
    // A restart-only change is refused the same way; a live one is applied.
    fs::write(host.path("etc/kycd.toml"), good.replace("host_id = \"node-1\"", "host_id = \"node-2\""))
        .unwrap();
    hup(&host);
    host.wait_for("restart-only refused", |r| {
        r["event"]["type"] == "config_reload_failed"
            && r["event"]["reason"].as_str().unwrap().contains("host_id")
    });
    fs::write(host.path("etc/kycd.toml"), good.replace("clock_skew_s = 0", "clock_skew_s = 5")).unwrap();
    hup(&host);
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    loop {
        let (_, out, _) = kycctl_as(None, &["status", "--json", "--socket", &socket]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        if status["last_reload_error"].is_null() {
            break;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "a good config did not clear the error: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(host.log().contains("configuration reloaded"), "{}", host.log());
    host.stop();
}

#[test]
fn a_fifo_or_directory_in_the_drop_dir_is_recorded_once() {
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    host.start();
    let fifo = host.path("state/attestations/pipe.jws");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    fs::create_dir(host.path("state/attestations/dir.jws")).unwrap();
    let rejected = |name: &str| {
        host.records()
            .iter()
            .filter(|r| {
                r["event"]["type"] == "attestation_rejected"
                    && r["event"]["source"].as_str().is_some_and(|s| s.ends_with(name))
            })
            .count()
    };
    host.wait_for("the FIFO rejected", |_| rejected("pipe.jws") > 0);
    host.wait_for("the directory rejected", |_| rejected("dir.jws") > 0);
    // Several rescans later (rescan_interval_s = 1): still one record each.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!((rejected("pipe.jws"), rejected("dir.jws")), (1, 1), "{}", host.log());
    // A new FIFO renamed over the old one (the name never missing, so nothing clears the
    // rejection) is a new identity: recorded again, once.
    let fresh = host.path("state/attestations/.pipe.new");
    assert!(Command::new("mkfifo").arg(&fresh).status().unwrap().success());
    fs::rename(&fresh, &fifo).unwrap();
    host.wait_for("the new FIFO rejected", |_| rejected("pipe.jws") == 2);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(rejected("pipe.jws"), 2, "{}", host.log());
    host.stop();
}

#[test]
fn status_says_the_audit_log_is_failing_on_a_full_disk() {
    if !is_root() {
        kycd_test_support::skip!(
            "SKIP status_says_the_audit_log_is_failing_on_a_full_disk: needs root to mount a tmpfs"
        );
        return;
    }
    let mut host = Host::new("");
    let _unmount = audit_on_small_tmpfs(&mut host, "");
    host.write_policy(1, &[]);
    host.start();
    let status = |host: &Host| {
        let out = Command::new(env!("CARGO_BIN_EXE_kycctl"))
            .args(["status", "--socket"])
            .arg(host.path("run/kycd.sock"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(status(&host).contains("audit log:    ok\n"), "{}", status(&host));
    // Fill the file system, then deliver bad files: their rejections cannot be recorded, and
    // no decision changes, so only the write outcome can tell.
    let filler = host.path("audit-fs/filler");
    let _ = fs::write(&filler, vec![0u8; 512 * 1024]);
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    let mut n = 0;
    let failing = loop {
        n += 1;
        host.drop_file(&format!("bad-{n}.jws"), format!("not a token {n}").as_bytes());
        std::thread::sleep(Duration::from_millis(300));
        let s = status(&host);
        if s.contains("FAILING") {
            break s;
        }
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "status never said the audit log fails:\n{s}\n{}",
            host.log()
        );
    };
    assert!(failing.contains("No space left on device"), "{failing}");
    assert!(failing.contains("failed writes since start"), "{failing}");
    // Unhealthy: exit 4, the reason on one line (the disk is still full).
    let socket = host.path("run/kycd.sock").display().to_string();
    let (code, _, err) = kycctl_as(None, &["--socket", &socket, "status"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.starts_with("error: unhealthy: audit log failing: the last write failed: "), "{err}");
    assert!(err.contains("No space left on device") && err.lines().count() == 1, "{err}");
    let metrics = {
        let out = Command::new(env!("CARGO_BIN_EXE_kycctl"))
            .args(["status", "--json", "--socket"])
            .arg(host.path("run/kycd.sock"))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert!(metrics["audit_write_failures"].as_u64().unwrap() >= 1, "{metrics}");
    // Space comes back: the next write succeeds and status says so, keeping the count.
    fs::remove_file(&filler).unwrap();
    host.drop_file("bad-after.jws", b"still not a token");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    loop {
        let s = status(&host);
        if s.contains("audit log:    ok (") {
            assert!(s.contains("failed writes since start"), "{s}");
            break;
        }
        assert!(kycd_protocol::clock::monotonic() < deadline, "status never recovered:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    host.stop();
}

#[test]
fn a_corrupt_audit_tail_stops_the_agent_for_good_and_names_the_repair() {
    let mut host = Host::new("");
    host.write_policy(1, &[]);
    host.start();
    host.drop_file("vm-a.jws", host.attestation("vm-a", "DE", now() + 3600).as_bytes());
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    host.stop();
    // Damage the last record (as a bad disk or an editor would).
    let dir = host.path("state/audit");
    let mut segments: Vec<PathBuf> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    segments.sort();
    let newest = segments.last().unwrap().clone();
    let mut bytes = fs::read(&newest).unwrap();
    let last_line_start = bytes[..bytes.len() - 1].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let damaged_tail = bytes[last_line_start..].to_vec();
    bytes[last_line_start + 2] = b'X';
    fs::write(&newest, &bytes).unwrap();
    let last_good: u64 = {
        let kept = std::str::from_utf8(&bytes[..last_line_start]).unwrap();
        let last: serde_json::Value = serde_json::from_str(kept.lines().last().unwrap()).unwrap();
        last["seq"].as_u64().unwrap()
    };
    // The agent refuses, with a status systemd will not restart, and names the exact repair.
    let out = Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["run", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let repair = format!("kycctl audit repair --truncate-after {last_good} {}", dir.display());
    assert!(stderr.contains(&repair), "names `{repair}`: {stderr}");
    let unit = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/kycd.service")).unwrap();
    assert!(unit.lines().any(|l| l == "RestartPreventExitStatus=78"), "the unit does not restart on 78");
    // The repair keeps the removed bytes beside the log; the agent starts again.
    let repaired = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["audit", "repair", "--truncate-after", &last_good.to_string()])
        .arg(&dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&repaired.stdout);
    assert_eq!(repaired.status.code(), Some(0), "{said}{}", String::from_utf8_lossy(&repaired.stderr));
    assert!(said.contains("audit log intact"), "{said}");
    let kept: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "removed"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let mut expected = damaged_tail;
    expected[2] = b'X';
    assert_eq!(fs::read(&kept[0]).unwrap(), expected, "the removed bytes are kept exactly");
    // A seq past the last verified record is refused without touching anything.
    let refused = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(["audit", "repair", "--truncate-after", "999999"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    host.start();
    host.wait_for_verdict("libvirt_domain:vm-a", "allow");
    host.stop();
    let verify =
        Command::new(env!("CARGO_BIN_EXE_kycctl")).args(["audit", "verify"]).arg(&dir).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stdout));
}

/// Unmounts a test file system when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Puts `host`'s audit log on a 256 KiB tmpfs (`audit-fs`, so it can be filled), with
/// `extra` configuration before the `[audit]` table. Needs root.
fn audit_on_small_tmpfs(host: &mut Host, extra: &str) -> Unmount {
    let d = host.dir.path().display().to_string();
    host.extra_config = format!("{extra}[audit]\ndir = \"{d}/audit-fs\"\n");
    host.audit_rel = "audit-fs";
    host.write_config();
    fs::create_dir_all(host.path("audit-fs")).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "kycd-test-audit"])
        .arg(host.path("audit-fs"))
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    Unmount(host.path("audit-fs"))
}

/// A policy prohibiting KP through the customer and beneficial-owner roles, with
/// `applies_to` as given (absent: the default, `foreign_persons`).
fn kp_owner_policy(host: &Host, version: u64, applies_to: Option<&str>) -> String {
    let mut measure = json!({"id": "m-kp", "match": {"countries": ["KP"]},
                             "roles": ["customer", "beneficial_owner"], "action": "prohibit",
                             "citation": "EO 13984 sec. 2"});
    if let Some(a) = applies_to {
        measure["applies_to"] = json!(a);
    }
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": version,
        "measures": [measure], "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.01}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, &host.authority).unwrap()
}

/// An organisation in the U.S. (or not) whose beneficial owner is in KP.
fn owner_in_kp_attestation(host: &Host, vm: &str, foreign: bool) -> String {
    let (status, basis) = if foreign {
        ("foreign_person", "foreign_organized_entity")
    } else {
        ("us_person", "us_organized_entity")
    };
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": format!("tenant-{vm}"), "jti": format!("att-{vm}"),
        "iat": now() - 5, "exp": now() + 3600, "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": "Secret Legal Name AG", "countries": ["US"],
                    "incorporation_country": "US"},
        "beneficial_owners": [{"name": "Secret Owner Name", "countries": ["KP"]}],
        "binding": {"kind": "libvirt_domain", "id": vm, "host_id": "node-1"},
        "foreign_person": foreign,
        "person_status": {"status": status, "basis": basis}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, &host.issuer).unwrap()
}

#[test]
fn a_us_person_with_a_listed_owner_is_allowed_under_foreign_persons_and_denied_under_all() {
    let mut host = Host::new("");
    atomic_write(&host.path("etc/policy.jws"), kp_owner_policy(&host, 1, None).as_bytes());
    host.start();
    host.wait_for("policy v1", |r| r["event"]["type"] == "policy_applied" && r["event"]["version"] == 1);
    host.drop_file("vm-us.jws", owner_in_kp_attestation(&host, "vm-us", false).as_bytes());
    host.drop_file("vm-f.jws", owner_in_kp_attestation(&host, "vm-f", true).as_bytes());

    let us = host.wait_for_verdict("libvirt_domain:vm-us", "allow");
    assert_eq!(reasons(&us), ["measure_not_applicable", "allowed"]);
    assert_eq!(us["event"]["decision"]["reasons"][0]["measure_id"], "m-kp");
    let foreign = host.wait_for_verdict("libvirt_domain:vm-f", "deny");
    assert_eq!(reasons(&foreign), ["measure_prohibit"]);

    // The same measure with `applies_to: all` reaches the U.S. person too.
    atomic_write(&host.path("etc/policy.jws"), kp_owner_policy(&host, 2, Some("all")).as_bytes());
    let us = host.wait_for_verdict("libvirt_domain:vm-us", "deny");
    assert_eq!(us["event"]["decision"]["policy_version"], 2);
    assert_eq!(reasons(&us), ["measure_prohibit"]);
    assert_eq!(host.latest_decision("libvirt_domain:vm-f").unwrap()["event"]["decision"]["verdict"], "deny");

    let log = fs::read_to_string(host.path("kycd.log")).unwrap();
    assert!(!log.contains("Secret Legal Name") && !log.contains("Secret Owner Name"), "names not logged");
}
