//! Packaging checks: the systemd units' sandboxing, scored by
//! `systemd-analyze security --offline=true` (works without systemd as PID 1; targets: agent
//! ≤ 5.0, collector ≤ 2.0), and the cloud-config example against `cloud-init schema`. Each
//! skips loudly when its tool is not installed (`tests/run` installs both as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn exposure(unit: &str) -> Option<f64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(unit);
    let out = match Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&path).output() {
        Ok(out) => out,
        Err(e) => {
            kycd_test_support::skip!(
                "SKIP systemd unit exposure for {unit}: systemd-analyze not available ({e})"
            );
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| {
        panic!("no exposure line for {unit}:\n{text}{}", String::from_utf8_lossy(&out.stderr))
    });
    let score = line.split(':').nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    Some(score.parse().unwrap())
}

#[test]
fn the_agent_unit_is_sandboxed_to_exposure_5_or_less() {
    if let Some(score) = exposure("kycd.service") {
        assert!(score <= 5.0, "kycd.service exposure {score} > 5.0");
    }
}

#[test]
fn the_collector_unit_is_sandboxed_to_exposure_2_or_less() {
    if let Some(score) = exposure("kycd-collector.service") {
        assert!(score <= 2.0, "kycd-collector.service exposure {score} > 2.0");
    }
}

/// The example cloud-config validates against cloud-init's schema.
#[test]
fn the_cloud_config_example_passes_cloud_init_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/cloud-init/kycd.yaml");
    let out = match Command::new("cloud-init").args(["schema", "--config-file"]).arg(&path).output() {
        Ok(out) => out,
        Err(e) => {
            kycd_test_support::skip!("SKIP cloud-config schema check: cloud-init not available ({e})");
            return;
        }
    };
    assert!(
        out.status.success(),
        "cloud-init schema rejected {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
