//! `kycctl host-id` and `kycctl host-key --public`: the real binary, as an operator enrolling
//! a host with the collector runs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};

fn kycctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kycctl")).args(args).output().unwrap()
}

#[test]
fn prints_host_id_and_public_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("kycd.toml");
    std::fs::write(&config, format!("host_id = \"node-3\"\nstate_dir = {:?}\n", state.display().to_string()))
        .unwrap();
    let config = config.to_str().unwrap();

    let out = kycctl(&["host-id", "--config", config]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "node-3\n");

    assert!(!kycctl(&["host-key", "--config", config]).status.success(), "--public is required");
    let out = kycctl(&["host-key", "--public", "--config", config]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jwk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwk["kid"], "node-3");
    assert_eq!(jwk["kty"], "OKP");
    assert!(jwk.get("d").is_none(), "never the private part");
    let key = state.join("host.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let again = kycctl(&["host-key", "--public", "--config", config]);
    assert_eq!(again.stdout, out.stdout, "the same key, not a new one");
    kycd_protocol::PublicKey::from_jwk_json(&again.stdout).unwrap();

    let out = kycctl(&["spool", "--config", config]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spool: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spool["acked_seq"], 0);
    assert_eq!(spool["segments"], serde_json::json!([]));
    let mut s = kycd::reporting::spool::Spool::open(
        &state.join("spool"),
        kycd::reporting::spool::SpoolOptions::default(),
    )
    .unwrap();
    s.append_batch(&[window(), window()]).unwrap();
    drop(s);
    let spool: serde_json::Value =
        serde_json::from_slice(&kycctl(&["spool", "--config", config]).stdout).unwrap();
    assert_eq!(spool["segments"][0]["records"], serde_json::json!([[1, 1], [2, 2]]));

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let unsafe_key = kycctl(&["host-key", "--public", "--config", config]);
    assert_eq!(unsafe_key.status.code(), Some(2));
    let err = String::from_utf8_lossy(&unsafe_key.stderr);
    assert!(err.contains(key.to_str().unwrap()) && err.contains("0644"), "{err}");
}

fn window() -> kycd_protocol::UsageWindow {
    serde_json::from_value(serde_json::json!({
        "tenant": "t", "workload": "host:host", "start": 0, "end": 60, "gpu_seconds": 60.0,
        "gpus": 1, "estimated_ops": 1.0, "peak_flops": 1.0, "method": "gpm_tensor"
    }))
    .unwrap()
}
