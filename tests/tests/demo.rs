//! The README's first command, `scripts/demo`, run the way CI runs it (`--no-wait`, stdin not a
//! terminal): it must show the prohibited tenant denied and its cgroup frozen, the foreign
//! tenant's training-scale finding at the collector, the host enrolled and polled, and
//! `kycctl status`, exit 0, and leave nothing behind — no temp dir, no cgroup, no process, the
//! same nftables ruleset.
//!
//! Root only (the demo enforces on real cgroups as root; the test skips loudly otherwise).
//! The demo runs the binaries `cargo test --workspace` already built next to this test
//! (`KYCD_DEMO_BIN_DIR`): building them again from the script would unify features differently
//! and rebuild half the dependency tree.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Whether this process can make cgroups: the cgroup2 mount from mountinfo (fstype after " - "),
/// probed with a directory made and removed at once. Root in a container often cannot.
fn can_make_cgroups() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = mountinfo.lines().find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(dash + 1) == Some(&"cgroup2")).then(|| fields[4].to_owned())
    });
    let Some(mount) = mount else { return false };
    let probe = Path::new(&mount).join(format!("kycd-demo-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).is_ok() && std::fs::remove_dir(&probe).is_ok()
}

/// target/debug: this test runs as target/debug/deps/demo-HASH.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// `nft list ruleset`, or None where nft is not installed.
fn nft_ruleset() -> Option<String> {
    let out = Command::new("nft").args(["list", "ruleset"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The word after `prefix` in `text`.
fn word_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    let start = text.find(prefix).unwrap_or_else(|| panic!("no {prefix:?} in the demo's output:\n{text}"));
    text[start + prefix.len()..].split_whitespace().next().unwrap()
}

#[test]
fn the_demo_denies_freezes_reports_a_finding_and_cleans_up() {
    if !is_root() {
        kycd_test_support::skip!(
            "SKIP scripts/demo test: needs root (real cgroups are created, frozen and removed)"
        );
        return;
    }
    if !can_make_cgroups() {
        kycd_test_support::skip!(
            "SKIP scripts/demo test: root, but the cgroup v2 tree is not writable here (a container?)"
        );
        return;
    }
    let bins = bin_dir();
    for bin in ["kycd", "kycctl", "kycd-collector"] {
        assert!(
            bins.join(bin).is_file(),
            "{} missing: build it first (cargo test --workspace does; or cargo build --bin {bin})",
            bins.join(bin).display()
        );
    }
    let nft_before = nft_ruleset();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo");
    let started = kycd_protocol::clock::monotonic();
    let mut child = Command::new(&script)
        .arg("--no-wait")
        .env("KYCD_DEMO_BIN_DIR", &bins)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes on threads so a full pipe never blocks the script.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = started + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if kycd_protocol::clock::monotonic() > deadline {
            // SIGTERM: the script's trap still cleans up.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let status = child.wait().unwrap();
            panic!(
                "scripts/demo ran over 90 s ({status}):\n{}\n{}",
                out_reader.join().unwrap(),
                err_reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    let elapsed = started.elapsed();
    eprintln!("scripts/demo --no-wait: {status} after {elapsed:.1?}");
    assert!(status.success(), "scripts/demo failed ({status}):\n{out}\n{err}");

    assert!(out.contains("(mode: enforce)"), "as root the demo enforces:\n{out}");
    assert!(out.contains("DENIED tenant-prohibited:"), "{out}");
    assert!(out.contains("cgroup.events says 'frozen 1'"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("/prohibited")
            && l.contains(" deny ")
            && l.contains("measure_prohibit(demo-cn)")),
        "kycctl workloads shows the deny and the measure:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("training_threshold_crossed") && l.contains("foreign tenant tenant-foreign")),
        "the collector lists the foreign tenant's training finding:\n{out}"
    );
    assert!(out.contains("FINDING training_threshold_crossed for tenant-foreign"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("demo-node-1") && l.contains("agent_url=http://127.0.0.1:")),
        "the collector lists the host it polls:\n{out}"
    );
    assert!(out.contains("on host demo-node-1 — mode enforce"), "kycctl status is shown:\n{out}");
    // kycctl usage: the foreign tenant's three figures, in order, from the format-2 trace.
    assert!(
        out.lines().any(|l| l.contains("OPS_LOWER") && l.contains("EST_OPS") && l.contains("OPS_UPPER")),
        "{out}"
    );
    let usage = out
        .lines()
        .find(|l| l.trim_start().starts_with("tenant-foreign") && l.contains("cgroup:"))
        .unwrap_or_else(|| panic!("{out}"));
    let figures: Vec<f64> = usage.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [_gpu_seconds, lower, point, upper, _shared] = figures[..] else { panic!("{usage}") };
    assert!(0.0 < lower && lower < point && point < upper, "{usage}");
    // And at the collector, from the reported windows.
    let collected = out
        .lines()
        .find(|l| l.trim_start().starts_with("tenant-foreign") && l.contains("ops_upper"))
        .unwrap_or_else(|| panic!("the collector's figures:\n{out}"));
    let figures: Vec<f64> = collected.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [lower, point, upper, _shared_hours] = figures[..] else { panic!("{collected}") };
    assert!(0.0 < lower && lower < point && point < upper, "{collected}");
    assert!(out.contains("real deployments: training_ops = 1e26, cluster_flops = 1e20"), "{out}");
    assert!(out.contains("collector HTML overview   http://127.0.0.1:"), "{out}");

    // Nothing left behind.
    let work = word_after(&out, "== kycd demo in ");
    assert!(!Path::new(work).exists(), "temp dir {work} left behind");
    let frozen_events = word_after(&out, "DENIED tenant-prohibited: ");
    let slice = Path::new(frozen_events).parent().and_then(Path::parent).unwrap();
    assert!(slice.to_string_lossy().contains("kycd-demo-"), "{}", slice.display());
    assert!(!slice.exists(), "cgroup {} left behind", slice.display());
    for tenant in ["domestic", "foreign", "prohibited"] {
        let pid = word_after(&out, &format!("  {tenant}: pid "));
        assert!(!Path::new("/proc").join(pid).exists(), "{tenant}'s process {pid} still runs");
    }
    assert!(out.contains("cleaned up:"), "{out}");
    assert_eq!(nft_ruleset(), nft_before, "the demo changed the nftables ruleset");
    assert!(elapsed < Duration::from_secs(90), "{elapsed:?}");
}
