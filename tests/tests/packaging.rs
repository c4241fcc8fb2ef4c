//! Packaging checks: the systemd units' sandboxing, scored by
//! `systemd-analyze security --offline=true` (works without systemd as PID 1; targets: agent
//! ≤ 5.0, collector ≤ 2.0), and the cloud-config example against `cloud-init schema` (cloud-init
//! itself applies it in agent/tests/cloud_init.rs). Each skips loudly when its tool is not
//! installed (`tests/run` installs both as root).
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

/// Runs the collector package's postrm with `action` against the root `root` (`DPKG_ROOT`),
/// with `KYCD_COLLECTOR_PURGE_DATABASE` set to `confirm` or absent.
fn collector_postrm(root: &Path, action: &str, confirm: Option<&str>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/deb/kycd-collector/postrm");
    let mut cmd = Command::new("sh");
    cmd.arg(&script).arg(action).env("DPKG_ROOT", root).env_remove("KYCD_COLLECTOR_PURGE_DATABASE");
    if let Some(confirm) = confirm {
        cmd.env("KYCD_COLLECTOR_PURGE_DATABASE", confirm);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "postrm {action}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `apt purge kycd-collector` keeps the database (the regulatory record) and says where and how
/// to delete it; only `KYCD_COLLECTOR_PURGE_DATABASE=yes` deletes it. The layout is the
/// service's (`DynamicUser` + `StateDirectory`): the files under /var/lib/private, a symlink at
/// /var/lib/kycd-collector.
#[test]
fn purging_the_collector_package_keeps_its_database_unless_confirmed() {
    let root = tempfile::tempdir().unwrap();
    let private = root.path().join("var/lib/private/kycd-collector");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("kycd.db"), b"records").unwrap();
    std::os::unix::fs::symlink("private/kycd-collector", root.path().join("var/lib/kycd-collector")).unwrap();
    let db = root.path().join("var/lib/kycd-collector/kycd.db");

    collector_postrm(root.path(), "remove", None);
    assert_eq!(std::fs::read(&db).unwrap(), b"records");
    let said = collector_postrm(root.path(), "purge", None);
    assert_eq!(std::fs::read(&db).unwrap(), b"records", "purge without confirmation keeps it");
    assert!(
        said.contains("kept the collector database") && said.contains("KYCD_COLLECTOR_PURGE_DATABASE=yes"),
        "{said}"
    );
    collector_postrm(root.path(), "purge", Some("1"));
    assert!(db.exists(), "only the exact confirmation deletes");

    let said = collector_postrm(root.path(), "purge", Some("yes"));
    assert!(said.contains("deleted the collector database"), "{said}");
    assert!(
        !private.exists() && std::fs::symlink_metadata(root.path().join("var/lib/kycd-collector")).is_err()
    );
}
