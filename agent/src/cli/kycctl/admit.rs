//! `kycctl admit`: ask the agent whether a workload may start, failing closed.

use std::path::PathBuf;
use std::process::ExitCode;

use kycd_protocol::wire::operator;

use super::{fail, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_USAGE};
use crate::tokens;

/// `kycctl admit`'s arguments.
#[derive(Debug)]
pub(super) struct AdmitArgs {
    pub(super) workload: String,
    pub(super) attestation: Option<PathBuf>,
    pub(super) libvirt_uuid: Option<String>,
    pub(super) timeout: std::time::Duration,
    pub(super) fail_open: bool,
    pub(super) socket: PathBuf,
}

pub(super) fn admit(args: AdmitArgs) -> ExitCode {
    if let Err(e) = args.workload.parse::<crate::discovery::workload::WorkloadId>() {
        return fail(EXIT_USAGE, e);
    }
    let attestation = match &args.attestation {
        Some(path) => match tokens::read_bounded(path, kycd_protocol::DEFAULT_MAX_TOKEN_BYTES + 2) {
            Ok(b) => Some(String::from_utf8_lossy(&tokens::strip_one_newline(b)).into_owned()),
            Err(e) => return fail(EXIT_USAGE, e),
        },
        None => None,
    };
    let body = crate::net::operator_api::AdmitBody {
        workload: args.workload.clone(),
        attestation,
        libvirt_uuid: args.libvirt_uuid,
    };
    let body = serde_json::to_value(&body).unwrap_or_default();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let exchange = runtime.block_on(async {
        tokio::time::timeout(
            args.timeout,
            crate::net::operator_api::request(&args.socket, "POST", operator::ADMIT, Some(&body)),
        )
        .await
        .unwrap_or(Err(crate::net::operator_api::ClientError::Timeout(args.timeout)))
    });
    let unreachable = |why: &dyn std::fmt::Display| {
        if args.fail_open {
            eprintln!("warning: {why}; allowing {} (--fail-open)", args.workload);
            ExitCode::SUCCESS
        } else {
            eprintln!("error: {why}; denying {} (fail closed)", args.workload);
            ExitCode::from(EXIT_UNREACHABLE)
        }
    };
    let (status, answer) = match exchange {
        Ok(r) => r,
        Err(e) => return unreachable(&e),
    };
    if status != 200 {
        let why = answer["error"].as_str().unwrap_or("no reason given").to_owned();
        return match status {
            503 => unreachable(&format_args!("the agent cannot answer now: {why}")),
            _ => fail(EXIT_INVALID, format_args!("admission refused by the agent (HTTP {status}): {why}")),
        };
    }
    let answer: crate::net::operator_api::AdmitAnswer = match serde_json::from_value(answer) {
        Ok(a) => a,
        Err(e) => return fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")),
    };
    let reasons: Vec<String> = answer
        .decision
        .iter()
        .flat_map(|d| &d.reasons)
        .map(|r| match (&r.measure_id, &r.citation) {
            (Some(m), Some(c)) => format!("{}: {} (measure {m}, {c})", r.code.as_str(), r.detail),
            _ => format!("{}: {}", r.code.as_str(), r.detail),
        })
        .chain(answer.error.clone())
        .collect();
    match answer.verdict {
        // Only a recorded decision admits.
        _ if answer.decision.is_none() => {
            eprintln!("denied: {} (no recorded decision)", answer.workload);
            for r in &reasons {
                eprintln!("  {r}");
            }
            ExitCode::from(EXIT_INVALID)
        }
        kycd_protocol::Verdict::Deny => {
            eprintln!("denied: {}", answer.workload);
            for r in &reasons {
                eprintln!("  {r}");
            }
            ExitCode::from(EXIT_INVALID)
        }
        verdict => {
            let conditions = answer.decision.as_ref().and_then(|d| d.conditions.as_ref());
            match conditions {
                Some(c) => println!(
                    "{}: {:?} with conditions {}",
                    answer.workload,
                    verdict,
                    serde_json::to_string(c).unwrap_or_default()
                ),
                None => println!("{}: allowed", answer.workload),
            }
            ExitCode::SUCCESS
        }
    }
}
