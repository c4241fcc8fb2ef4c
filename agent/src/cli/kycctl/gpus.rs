//! `kycctl gpus`, `usage` (the agent's GPU view) and `gpu record` (an NVML trace).

use std::path::Path;
use std::process::ExitCode;

use kycd_protocol::wire::operator;

use super::agent::agent_request;
use super::{fail, EXIT_INVALID, EXIT_USAGE};

pub(super) fn gpus(socket: &Path, json: bool, usage: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", operator::GPUS) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        let part = if usage { &body["usage"] } else { &body["gpus"] };
        println!("{}", serde_json::to_string_pretty(part).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    if !body["backend_available"].as_bool().unwrap_or(false) {
        println!("GPU backend unavailable (no NVML, or GPU sampling disabled)");
    }
    let empty = Vec::new();
    if usage {
        println!("{:<24} {:<44} {:>12} {:>14}", "TENANT", "WORKLOAD", "GPU_SECONDS", "EST_OPS");
        for u in body["usage"].as_array().unwrap_or(&empty) {
            println!(
                "{:<24} {:<44} {:>12.0} {:>14.3e}",
                u["tenant"].as_str().unwrap_or("(unattributed)"),
                u["workload"].as_str().unwrap_or("-"),
                u["gpu_seconds"].as_f64().unwrap_or(0.0),
                u["estimated_ops"].as_f64().unwrap_or(0.0)
            );
        }
    } else {
        println!("{:<44} {:<28} {:>6}", "UUID", "NAME", "UTIL");
        for g in body["gpus"].as_array().unwrap_or(&empty) {
            let util = g["utilization"].as_f64().map_or("-".to_owned(), |u| format!("{:.0}%", u * 100.0));
            println!(
                "{:<44} {:<28} {:>6}",
                g["uuid"].as_str().unwrap_or("-"),
                g["name"].as_str().unwrap_or("-"),
                util
            );
        }
    }
    ExitCode::SUCCESS
}

pub(super) fn gpu_record(library: &Path, seconds: u64, interval_ms: u64, out: &Path) -> ExitCode {
    use std::time::Duration;
    let (duration, interval) = (Duration::from_secs(seconds), Duration::from_millis(interval_ms));
    match crate::gpu::record::record_nvml(library, duration, interval, out) {
        Ok(s) if s.samples > s.unavailable => {
            eprintln!("recorded {} samples ({} unavailable) to {}", s.samples, s.unavailable, out.display());
            ExitCode::SUCCESS
        }
        Ok(s) => fail(
            EXIT_INVALID,
            format_args!("NVML unavailable for all {} samples (see {})", s.samples, out.display()),
        ),
        Err(e) => fail(EXIT_USAGE, e),
    }
}
