//! `kycctl audit verify` as operators and scripts use it: the real binary on logs written by
//! the library, exit codes and output format.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kycd::audit::{AuditLog, AuditOptions, RecordInfo};
use serde_json::{json, Value};

fn kycctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kycctl")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `n` records, rotating every ~`max_file_bytes`; returns the infos.
fn write_log(dir: &Path, n: i64, max_file_bytes: u64) -> Vec<RecordInfo> {
    let mut log = AuditLog::open(dir, AuditOptions { max_file_bytes }).unwrap();
    (0..n)
        .map(|i| {
            let event = json!({"type": "decision", "workload": format!("unix_user:{}", 1000 + i),
                "decision": {"verdict": "allow", "policy_version": 7}});
            log.append(1_767_225_600 + i, &event).unwrap()
        })
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn intact_log_exits_0_and_prints_the_last_hash() {
    let dir = tempfile::tempdir().unwrap();
    let infos = write_log(dir.path(), 10, 600);
    let files = segments(dir.path()).len();
    assert!(files > 1);
    let out = kycctl(&["audit", "verify", s(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout(&out),
        format!("audit log intact: 10 records in {files} files, last hash {}\n", infos[9].hash)
    );
    assert!(out.stderr.is_empty());

    let out = kycctl(&["audit", "verify", "--json", s(dir.path())]);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "intact");
    assert_eq!(report["records"], 10);
    assert_eq!(report["last_seq"], 9);
    assert_eq!(report["last_hash"], infos[9].hash.as_str());
    assert_eq!(report["anchored_at_seq"], Value::Null);
}

#[test]
fn tampered_log_exits_1_and_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 4, 64 << 20);
    let file = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    // Flip one byte inside the second record: "allow" -> "alloW".
    let second = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let at = second + bytes[second..].windows(5).position(|w| w == b"allow").unwrap() + 4;
    bytes[at] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();

    let out = kycctl(&["audit", "verify", s(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    // The altered record hashes differently, so the record after it (line 3) no longer links.
    let expected = format!("audit log BROKEN at {}:3 (seq 2): ", file.display());
    assert!(text.starts_with(&expected), "{text}");
    assert!(text.contains("prev does not match"), "{text}");

    let out = kycctl(&["audit", "verify", "--json", s(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "broken");
    assert_eq!(report["file"], s(&file));
    assert_eq!(report["line"], 3);
    assert_eq!(report["seq"], 2);
}

#[test]
fn missing_dir_exits_2_with_an_error_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-audit-dir");
    for args in [&["audit", "verify"][..], &["audit", "verify", "--json"]] {
        let mut args = args.to_vec();
        args.push(s(&missing));
        let out = kycctl(&args);
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains("no-such-audit-dir"), "{err}");
    }
}

#[test]
fn empty_dir_is_intact_with_no_records() {
    let dir = tempfile::tempdir().unwrap();
    let out = kycctl(&["audit", "verify", s(dir.path())]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!("audit log intact: 0 records in 0 files, last hash {}\n", "0".repeat(64))
    );
}

#[test]
fn help_documents_audit_verify_exit_codes() {
    let help = kycctl(&["--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("audit verify: chain broken"));
    let help = kycctl(&["audit", "verify", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("/var/lib/kycd/audit"));
}
