//! `kycctl gpus`, `usage` (the agent's GPU view), `gpu record` (an NVML trace) and
//! `gpu estimate` (the estimate over part of a trace).

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
        println!(
            "{:<24} {:<44} {:>12} {:>11} {:>11} {:>11} {:>11}",
            "TENANT", "WORKLOAD", "GPU_SECONDS", "OPS_LOWER", "EST_OPS", "OPS_UPPER", "SHARED_S"
        );
        for u in body["usage"].as_array().unwrap_or(&empty) {
            let ops = |k: &str| u[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<24} {:<44} {:>12.0} {:>11.3e} {:>11.3e} {:>11.3e} {:>11.0}",
                u["tenant"].as_str().unwrap_or("(unattributed)"),
                u["workload"].as_str().unwrap_or("-"),
                ops("gpu_seconds"),
                ops("ops_lower"),
                ops("estimated_ops"),
                ops("ops_upper"),
                ops("shared_gpu_seconds"),
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
        let pci = body["passthrough"].as_array().unwrap_or(&empty);
        if pci.iter().any(|g| g["state"] != "host") {
            println!("\nGPUs the host driver does not see (PCI):");
            println!("{:<14} {:<10} {:<24} {:<12} DOMAIN", "PCI", "ID", "MODEL", "STATE");
            for g in pci.iter().filter(|g| g["state"] != "host") {
                println!(
                    "{:<14} {:<10} {:<24} {:<12} {}",
                    g["pci"].as_str().unwrap_or("-"),
                    g["pci_id"].as_str().unwrap_or("-"),
                    g["model"].as_str().unwrap_or("(unknown model)"),
                    g["state"].as_str().unwrap_or("-"),
                    g["domain"].as_str().unwrap_or("-")
                );
            }
        }
        let guests = body["guests"].as_array().unwrap_or(&empty);
        if !guests.is_empty() {
            println!("\nGuest telemetry (VMs holding passed-through GPUs):");
            println!(
                "{:<24} {:<10} {:<15} {:>8} {:>9} {:>8}",
                "DOMAIN", "STATE", "REASON", "GPUS", "ACCEPTED", "REFUSED"
            );
            for g in guests {
                let count = |k: &str| g[k].as_u64().unwrap_or(0);
                println!(
                    "{:<24} {:<10} {:<15} {:>8} {:>9} {:>8}",
                    g["domain"].as_str().unwrap_or("-"),
                    g["state"].as_str().unwrap_or("-"),
                    g["reason"].as_str().unwrap_or("-"),
                    format!("{}/{}", count("gpus_reporting"), count("gpus_held")),
                    count("accepted"),
                    count("refused")
                );
            }
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

pub(super) fn gpu_estimate(
    trace: &Path,
    (from, to): (Option<f64>, Option<f64>),
    peaks: Option<&Path>,
    json: bool,
) -> ExitCode {
    let replay = match crate::gpu::ReplayBackend::open(trace, false) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let table = match crate::gpu::peaks::PeakTable::with_override(peaks) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let samples = replay.samples();
    let first = samples.first().map_or(0.0, |s| s.at_ms as f64 / 1000.0);
    let last = samples.last().map_or(0.0, |s| s.at_ms as f64 / 1000.0);
    let e =
        crate::gpu::trace_estimate::estimate_span(samples, &table, from.unwrap_or(first), to.unwrap_or(last));
    if json {
        println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("{} intervals, {:.1} s between {:.3} and {:.3}", e.intervals, e.seconds, e.from, e.to);
    println!(
        "{:<44} {:<22} {:<24} {:>11} {:>11} {:>11}",
        "UUID", "NAME", "METHOD", "OPS_LOWER", "EST_OPS", "OPS_UPPER"
    );
    for g in &e.gpus {
        println!(
            "{:<44} {:<22} {:<24} {:>11.3e} {:>11.3e} {:>11.3e}",
            g.uuid,
            g.name,
            g.method.as_str(),
            g.ops_lower,
            g.estimated_ops,
            g.ops_upper
        );
    }
    let t = e.total;
    println!(
        "{:<44} {:<22} {:<24} {:>11.3e} {:>11.3e} {:>11.3e}",
        "total", "", "", t.ops_lower, t.estimated_ops, t.ops_upper
    );
    ExitCode::SUCCESS
}
