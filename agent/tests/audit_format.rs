//! The audit log's format across releases: a log written by the 0.1.0 agent
//! (`tests/data/audit-0.1.0`, real records of a policy applied, superseded and refused,
//! attestations accepted, rejected and withdrawn, and decisions) still verifies, every one of
//! its events reads as a typed [`AuditEvent`] that encodes back to the very same bytes, and
//! today's agent continues its chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kycd::audit::{verify_dir, AuditLog, AuditOptions, VerifyReport};
use kycd::core::AuditEvent;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/audit-0.1.0")
}

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn records(dir: &Path) -> u64 {
    match verify_dir(dir).unwrap() {
        VerifyReport::Intact { records, .. } => records,
        other => panic!("not intact: {other:?}"),
    }
}

/// The raw bytes of a record's event: everything after `"event":` but the closing brace.
fn event_bytes(line: &str) -> &str {
    let start = line.find(",\"event\":").unwrap() + ",\"event\":".len();
    &line[start..line.len() - 1]
}

#[test]
fn a_log_written_by_the_0_1_0_agent_still_verifies() {
    let dir = copy_fixture();
    assert_eq!(records(dir.path()), 16);
}

#[test]
fn every_0_1_0_event_reads_as_a_typed_event_and_encodes_to_the_same_bytes() {
    let mut kinds = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let raw = event_bytes(line);
            let event: AuditEvent = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
            assert_eq!(event.to_record().to_string(), raw, "re-encoded differently");
            kinds.insert(event.kind());
        }
    }
    for kind in [
        "agent_started",
        "policy_applied",
        "policy_rejected",
        "attestation_accepted",
        "attestation_rejected",
        "attestation_withdrawn",
        "decision",
        "agent_stopped",
    ] {
        assert!(kinds.contains(kind), "the fixture has no {kind} record: {kinds:?}");
    }
}

#[test]
fn todays_agent_continues_the_0_1_0_chain() {
    let dir = copy_fixture();
    let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    let event = AuditEvent::ConfigReloadFailed { reason: "test".into() };
    let info = log.append(1_796_414_800, &event.to_record()).unwrap();
    assert_eq!(info.seq, 16);
    drop(log);
    assert_eq!(records(dir.path()), 17);
}
