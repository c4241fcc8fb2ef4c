//! `kycctl`: the operator's command-line tool for kycd.
//!
//! Exit codes (stable; scripts depend on them):
//!   0  success (for `verify`: the token is valid; for `audit verify`: the chain is intact)
//!   1  a verdict of "no": the token is invalid (`verify`), or the claims would not verify
//!      (`sign`); the reason is printed as `error: <Kind>: <detail>` on stderr. For
//!      `audit verify`: the chain is broken; `audit log BROKEN at <file>:<line> …` on stdout
//!   2  usage error, unreadable file or directory, unusable key or key set
//!   3  commands that talk to the agent (admit, status, workloads, reload): the agent could
//!      not be reached or did not answer (for admit: a deny, unless `--fail-open`)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser as _;
use kycd::audit::{self, VerifyReport};
use kycd::cli::kycctl::{AuditCommand, Cli, Command, GpuCommand, KeyAlg};
use kycd::tokens::{self, SignOutcome};
use kycd_protocol::{Algorithm, VerifyOptions};

const EXIT_INVALID: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

struct AdmitArgs {
    workload: String,
    attestation: Option<PathBuf>,
    libvirt_uuid: Option<String>,
    timeout: std::time::Duration,
    fail_open: bool,
    socket: PathBuf,
}

/// One request to the agent: its JSON answer, or the exit code and message to fail with
/// (3 unreachable, 1 refused).
fn agent_request(socket: &std::path::Path, method: &str, uri: &str) -> Result<serde_json::Value, ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_USAGE, e))?;
    let timeout = std::time::Duration::from_secs(10);
    let exchange = runtime.block_on(async {
        tokio::time::timeout(timeout, kycd::net::operator_api::request(socket, method, uri, None))
            .await
            .unwrap_or(Err(kycd::net::operator_api::ClientError::Timeout(timeout)))
    });
    match exchange {
        Err(e) => Err(fail(EXIT_UNREACHABLE, format_args!("{e} (is kycd running?)"))),
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => {
            let why = body["error"].as_str().unwrap_or("no reason given").to_owned();
            Err(fail(EXIT_INVALID, format_args!("the agent refused (HTTP {status}): {why}")))
        }
    }
}

fn status(socket: &std::path::Path, json: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", "/v1/status") {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let s: kycd::net::operator_api::Status = match serde_json::from_value(body) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")),
    };
    let policy = s.policy.as_ref().map_or("none (every workload denied)".to_owned(), |p| {
        format!("version {} signed by {} from {}", p.version, p.kid, p.source)
    });
    let verdicts: Vec<String> = s.verdicts.iter().map(|(v, n)| format!("{n} {v}")).collect();
    println!("kycd {} on host {} — mode {}, up {} s", s.version, s.host_id, s.mode, s.uptime_s);
    println!("policy:       {policy}");
    println!("trust:        issuers [{}], policy [{}]", s.issuer_kids.join(", "), s.policy_kids.join(", "));
    println!("workloads:    {} ({} attestations in force)", verdicts.join(", "), s.attestations);
    println!("gpu backend:  {}", s.gpu);
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
    ExitCode::SUCCESS
}

fn workloads(socket: &std::path::Path, json: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", "/v1/workloads") {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let rows: Vec<kycd::net::operator_api::WorkloadRow> = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")),
    };
    println!("{:<48} {:<9} {:<20} {:<7} REASONS", "WORKLOAD", "VERDICT", "TENANT", "POLICY");
    for r in rows {
        let (verdict, policy, reasons) = match &r.decision {
            Some(d) => (
                format!("{:?}", d.verdict).to_lowercase(),
                d.policy_version.map_or("-".into(), |v| format!("v{v}")),
                d.reasons
                    .iter()
                    .map(|x| match &x.measure_id {
                        Some(m) => format!("{}({m})", x.code.as_str()),
                        None => x.code.as_str().to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            None => ("-".into(), "-".into(), "not yet recorded".into()),
        };
        println!(
            "{:<48} {:<9} {:<20} {:<7} {reasons}",
            r.workload,
            verdict,
            r.tenant.as_deref().unwrap_or("-"),
            policy
        );
    }
    ExitCode::SUCCESS
}

fn rows(socket: &std::path::Path) -> Result<Vec<kycd::net::operator_api::WorkloadRow>, ExitCode> {
    let body = agent_request(socket, "GET", "/v1/workloads")?;
    serde_json::from_value(body)
        .map_err(|e| fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")))
}

fn verdict_name(d: &kycd::decision::Decision) -> String {
    format!("{:?}", d.verdict).to_lowercase()
}

fn tenants(socket: &std::path::Path, json: bool) -> ExitCode {
    let rows = match rows(socket) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut by_tenant: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for r in rows {
        if let (Some(t), Some(d)) = (r.tenant.clone(), &r.decision) {
            by_tenant.entry(t).or_default().push((r.workload.clone(), verdict_name(d)));
        }
    }
    if json {
        let v: serde_json::Value = by_tenant
            .iter()
            .map(|(t, ws)| {
                let ws: Vec<_> =
                    ws.iter().map(|(w, v)| serde_json::json!({"workload": w, "verdict": v})).collect();
                (t.clone(), serde_json::Value::Array(ws))
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("{:<28} WORKLOADS (VERDICT)", "TENANT");
    for (t, ws) in by_tenant {
        let list: Vec<String> = ws.iter().map(|(w, v)| format!("{w} ({v})")).collect();
        println!("{t:<28} {}", list.join(", "));
    }
    ExitCode::SUCCESS
}

fn decisions(socket: &std::path::Path, tenant: Option<&str>, since: Option<i64>, json: bool) -> ExitCode {
    let mut rows = match rows(socket) {
        Ok(r) => r,
        Err(code) => return code,
    };
    rows.retain(|r| {
        r.decision.is_some()
            && tenant.is_none_or(|t| r.tenant.as_deref() == Some(t))
            && since.is_none_or(|s| r.decided_at.is_some_and(|at| at >= s))
    });
    rows.sort_by_key(|r| std::cmp::Reverse(r.decided_at));
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("{:<12} {:<44} {:<9} {:<20} REASONS", "DECIDED_AT", "WORKLOAD", "VERDICT", "TENANT");
    for r in rows {
        let Some(d) = &r.decision else { continue };
        let reasons: Vec<String> = d
            .reasons
            .iter()
            .map(|x| match (&x.measure_id, &x.citation) {
                (Some(m), Some(c)) => format!("{} {m} ({c})", x.code.as_str()),
                _ => x.code.as_str().to_owned(),
            })
            .collect();
        println!(
            "{:<12} {:<44} {:<9} {:<20} {}",
            r.decided_at.map_or("-".into(), |t| t.to_string()),
            r.workload,
            verdict_name(d),
            r.tenant.as_deref().unwrap_or("-"),
            reasons.join("; ")
        );
    }
    ExitCode::SUCCESS
}

fn gpus(socket: &std::path::Path, json: bool, usage: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", "/v1/gpus") {
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

fn admit(args: AdmitArgs) -> ExitCode {
    if let Err(e) = args.workload.parse::<kycd::workload::WorkloadId>() {
        return fail(EXIT_USAGE, e);
    }
    let attestation = match &args.attestation {
        Some(path) => match tokens::read_bounded(path, kycd_protocol::DEFAULT_MAX_TOKEN_BYTES + 2) {
            Ok(b) => Some(String::from_utf8_lossy(&tokens::strip_one_newline(b)).into_owned()),
            Err(e) => return fail(EXIT_USAGE, e),
        },
        None => None,
    };
    let body = kycd::net::operator_api::AdmitBody {
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
            kycd::net::operator_api::request(&args.socket, "POST", "/v1/admit", Some(&body)),
        )
        .await
        .unwrap_or(Err(kycd::net::operator_api::ClientError::Timeout(args.timeout)))
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
    let answer: kycd::net::operator_api::AdmitAnswer = match serde_json::from_value(answer) {
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

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

fn audit_repair(dir: &std::path::Path, truncate_after: u64) -> ExitCode {
    let repair = match audit::repair(dir, truncate_after, kycd::tokens::unix_now()) {
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

fn audit_verify(dir: &std::path::Path, json: bool) -> ExitCode {
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

fn gpu_record(library: &std::path::Path, seconds: u64, interval_ms: u64, out: &std::path::Path) -> ExitCode {
    use std::time::Duration;
    let (duration, interval) = (Duration::from_secs(seconds), Duration::from_millis(interval_ms));
    match kycd::gpu::record::record_nvml(library, duration, interval, out) {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { alg, kid, out } => {
            let alg = match alg {
                KeyAlg::Ed25519 => Algorithm::EdDSA,
                KeyAlg::Es256 => Algorithm::ES256,
            };
            match tokens::keygen(alg, &kid, &out) {
                Ok(files) => {
                    println!("{}", files.private_jwk.display());
                    println!("{}", files.jwks.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
        Command::Sign { key, typ, valid_at, claims } => {
            let key = match tokens::load_private_key(&key) {
                Ok(k) => k,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            let now = tokens::unix_now();
            match tokens::sign_claims(&key, typ.into(), &claims, now, valid_at.unwrap_or(now)) {
                Ok(SignOutcome::Token(token)) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Ok(SignOutcome::Refused(e)) => fail(
                    EXIT_INVALID,
                    format_args!("{}: {e} (claims would not verify; nothing signed)", e.kind()),
                ),
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
        Command::Verify { jwks, typ, at, skew, max_bytes, token } => {
            let jwks = match tokens::load_jwks(&jwks) {
                Ok(j) => j,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            let bytes = match tokens::read_bounded(&token, max_bytes.saturating_add(2)) {
                Ok(b) => tokens::strip_one_newline(b),
                Err(e) => return fail(EXIT_USAGE, e),
            };
            let options = VerifyOptions { max_token_bytes: max_bytes, clock_skew_s: skew };
            match tokens::verify_token(
                &bytes,
                &jwks,
                typ.into(),
                &options,
                at.unwrap_or_else(tokens::unix_now),
            ) {
                Ok(claims) => {
                    println!("{}", serde_json::to_string_pretty(&claims).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_INVALID, format_args!("{}: {e}", e.kind())),
            }
        }
        Command::Admit { workload, attestation, libvirt_uuid, timeout, fail_open, socket } => {
            admit(AdmitArgs { workload, attestation, libvirt_uuid, timeout, fail_open, socket })
        }
        Command::Status { json, socket } => status(&socket, json),
        Command::Workloads { json, socket } => workloads(&socket, json),
        Command::Tenants { json, socket } => tenants(&socket, json),
        Command::Decisions { tenant, since, json, socket } => {
            decisions(&socket, tenant.as_deref(), since, json)
        }
        Command::Gpus { json, socket } => gpus(&socket, json, false),
        Command::Usage { json, socket } => gpus(&socket, json, true),
        Command::Reload { socket } => match agent_request(&socket, "POST", "/v1/reload") {
            Ok(_) => {
                println!("reloaded");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Audit { command: AuditCommand::Verify { json, dir } } => audit_verify(&dir, json),
        Command::Audit { command: AuditCommand::Repair { truncate_after, dir } } => {
            audit_repair(&dir, truncate_after)
        }
        Command::Gpu { command: GpuCommand::Record { seconds, out, nvml_library, interval_ms } } => {
            gpu_record(&nvml_library, seconds, interval_ms, &out)
        }
        Command::HostId { config } => host_identity(&config, false),
        Command::HostKey { public: _, config } => host_identity(&config, true),
        Command::Spool { config } => {
            let config = match kycd::config::load(&config, &kycd::config::Overrides::default()) {
                Ok(loaded) => loaded.config,
                Err(e) => return fail(EXIT_USAGE, e),
            };
            match kycd::spool::inspect(&config.state_dir.join("spool")) {
                Ok(i) => {
                    println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_USAGE, e),
            }
        }
    }
}

/// `kycctl host-id` and `kycctl host-key --public`.
fn host_identity(config: &std::path::Path, key: bool) -> ExitCode {
    let config = match kycd::config::load(config, &kycd::config::Overrides::default()) {
        Ok(loaded) => loaded.config,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let host_id = match kycd::host::host_id(&config) {
        Ok(id) => id,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if !key {
        println!("{host_id}");
        return ExitCode::SUCCESS;
    }
    match kycd::host::load_or_create_host_key(&kycd::host::host_key_path(&config.state_dir), &host_id) {
        Ok(k) => {
            println!("{}", k.public_key().to_jwk());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}
