//! `kycctl audit verify` and `audit repair`: the audit log's hash chain, offline.

use std::path::Path;
use std::process::ExitCode;

use super::{fail, EXIT_INVALID, EXIT_USAGE};
use crate::audit::{self, VerifyReport};

pub(super) fn audit_repair(dir: &Path, truncate_after: u64) -> ExitCode {
    let repair = match audit::repair(dir, truncate_after, kycd_protocol::clock::unix_now()) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    println!(
        "cut after seq {truncate_after}: {} bytes removed ({} later segments) and kept in {}",
        repair.removed_bytes,
        repair.removed_segments.len(),
        repair.removed_to.display()
    );
    match repair.after {
        audit::VerifyReport::Intact { records, last_hash, .. } => {
            println!("audit log intact: {records} records, last hash {last_hash}");
            ExitCode::SUCCESS
        }
        broken => {
            println!("audit log still broken: {}", broken.to_json());
            ExitCode::from(EXIT_INVALID)
        }
    }
}

pub(super) fn audit_verify(dir: &Path, json: bool) -> ExitCode {
    let report = match audit::verify_dir(dir) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if json {
        println!("{}", report.to_json());
    } else {
        match &report {
            VerifyReport::Intact { records, files, last_hash, anchored_at_seq, .. } => {
                print!("audit log intact: {records} records in {files} files, last hash {last_hash}");
                match anchored_at_seq {
                    Some(seq) => println!(" (older records pruned; chain anchored at seq {seq})"),
                    None => println!(),
                }
            }
            VerifyReport::Broken { file, line_number, seq, reason } => {
                let seq = seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
                println!("audit log BROKEN at {}:{line_number}{seq}: {reason}", file.display());
            }
        }
    }
    if report.is_intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}
