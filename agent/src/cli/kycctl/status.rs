//! `kycctl status` (the agent's state at a glance, and exit 4 when it is unhealthy) and
//! `kycctl reload`.

use std::path::Path;
use std::process::ExitCode;

use kycd_protocol::wire::operator;

use super::agent::agent_request;
use super::{fail, EXIT_INVALID, EXIT_UNHEALTHY};

pub(super) fn status(socket: &Path, json: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", operator::STATUS) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
    }
    let s: crate::net::operator_api::Status = match serde_json::from_value(body) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")),
    };
    if !json {
        summary(&s);
    }
    // After the output, so that whoever reads it sees everything, and scripts (or
    // monitoring) get the verdict from the exit status either way.
    match s.problems() {
        problems if problems.is_empty() => ExitCode::SUCCESS,
        problems => fail(EXIT_UNHEALTHY, format_args!("unhealthy: {}", problems.join("; "))),
    }
}

/// The human summary of a status answer.
fn summary(s: &crate::net::operator_api::Status) {
    let policy = s.policy.as_ref().map_or("none (every workload denied)".to_owned(), |p| {
        format!("version {} signed by {} from {}", p.version, p.kid, p.source)
    });
    let verdicts: Vec<String> = s.verdicts.iter().map(|(v, n)| format!("{n} {v}")).collect();
    println!("kycd {} on host {} — mode {}, up {} s", s.version, s.host_id, s.mode, s.uptime_s);
    println!("policy:       {policy}");
    println!("trust:        issuers [{}], policy [{}]", s.issuer_kids.join(", "), s.policy_kids.join(", "));
    println!("workloads:    {} ({} attestations in force)", verdicts.join(", "), s.attestations);
    println!("gpu backend:  {}", s.gpu);
    for g in &s.guest_telemetry {
        let why = g.reason.as_deref().map_or(String::new(), |r| format!(" ({r})"));
        let channel = if g.connected { "channel connected" } else { "channel not connected" };
        println!(
            "guest telemetry: {} {}{why}, {channel}, {}/{} GPUs reporting, {} reports accepted, {} refused",
            g.domain, g.state, g.gpus_reporting, g.gpus_held, g.accepted, g.refused
        );
    }
    let failed_writes = match s.audit_write_failures {
        0 => String::new(),
        n => format!(" ({n} failed writes since start)"),
    };
    let audit = match (&s.audit_last_error, s.audit_failures) {
        (Some(e), _) => format!("FAILING: the last write failed: {e}{failed_writes}"),
        (None, 0) => format!("ok{failed_writes}"),
        (None, n) => format!("FAILING ({n} evaluations not recorded){failed_writes}"),
    };
    println!("audit log:    {audit}");
    if s.input_read_errors > 0 {
        let last =
            s.last_read_error.as_ref().map_or(String::new(), |(at, what)| format!("; last at {at}: {what}"));
        println!(
            "intake:       {} read errors (resources or disk; what the inputs said before is kept){last}",
            s.input_read_errors
        );
    }
    if !s.connections.is_empty() {
        let listeners: Vec<String> = s
            .connections
            .iter()
            .map(|(name, c)| {
                format!(
                    "{name} {} open, {} refused, {} header timeouts, {} idle closed",
                    c.open, c.refused, c.header_timeouts, c.idle_closed
                )
            })
            .collect();
        println!("connections:  {}", listeners.join("; "));
    }
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    println!(
        "enforcement:  errors {}; drift repaired {}",
        counts(&s.enforcement_errors),
        counts(&s.drift_repaired)
    );
    for (backend, error) in &s.enforcement_failing {
        println!("              FAILING now: {backend}: {error}");
    }
    if let Some(r) = &s.reporting {
        let last = match (r.uploading, r.last_upload_at) {
            (false, _) => "uploads off (no reporting.collector_url)".to_owned(),
            (true, Some(t)) => format!("last upload at {t}"),
            (true, None) => "no upload since start".to_owned(),
        };
        println!(
            "spool:        {} records pending, {} bytes; {last}",
            r.spool_pending_records, r.spool_bytes
        );
        let d = &r.spool_damage;
        let mut damage = match d.regions {
            0 => "none".to_owned(),
            n => format!("DAMAGED: {n} regions ({} bytes) quarantined", d.bytes),
        };
        if d.torn_tails > 0 {
            damage.push_str(&format!(
                "; {} torn tails ({} bytes) quarantined",
                d.torn_tails, d.torn_tail_bytes
            ));
        }
        if d.quarantine_failures > 0 {
            damage.push_str(&format!("; {} quarantine FAILURES", d.quarantine_failures));
        }
        if let Some(t) = d.last_at {
            damage.push_str(&format!(", last at {t}"));
        }
        println!("spool damage: {damage}");
        let j = &r.rejected;
        let mut rejected = match &j.last {
            None => "none since start".to_owned(),
            Some(l) => format!(
                "{} batches ({} records) since start, last at {}: {} {}",
                j.batches, j.records, l.at, l.status, l.kind
            ),
        };
        if j.kept > 0 {
            rejected.push_str(&format!("; {} batch files kept in rejected/", j.kept));
        }
        println!("rejected:     {rejected}");
    }
    if let Some(f) = &s.policy_fetch {
        let at = f.last_at.map_or("never".to_owned(), |t| format!("at {t}"));
        let outcome = f.outcome.as_deref().unwrap_or("-");
        let etag = f.etag.as_deref().unwrap_or("-");
        println!("policy fetch: {} — last {at}: {outcome} (etag {etag})", f.url);
    }
    if let Some(e) = &s.last_reload_error {
        println!("last reload:  FAILED: {e}");
    }
}

/// `kycctl reload`: as SIGHUP does.
pub(super) fn reload(socket: &Path) -> ExitCode {
    match agent_request(socket, "POST", operator::RELOAD) {
        Ok(_) => {
            println!("reloaded");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
