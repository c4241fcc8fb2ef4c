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

use clap::{Parser, Subcommand, ValueEnum};
use kycd::audit::{self, VerifyReport};
use kycd::tokens::{self, SignOutcome, Typ};
use kycd_protocol::{Algorithm, VerifyOptions};

/// Operator CLI for the kycd host agent: admission, keys, signed tokens and the audit log.
#[derive(Debug, Parser)]
#[command(name = "kycctl", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success (verify: token valid; audit verify: chain intact)
  1  token invalid (verify) or claims would not verify (sign); reason on stderr as
     'error: <Kind>: <detail>'
     audit verify: chain broken; 'audit log BROKEN at <file>:<line> ...' on stdout
  2  usage error, I/O error, unusable key or key set
admit:
  0  allow (or allow with conditions, printed on stdout)
  1  deny; the reasons on stderr
  3  the agent is unreachable or did not answer in time: deny, unless --fail-open";

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a signing key pair: DIR/KID.private.jwk (mode 0600) and DIR/KID.jwks.
    ///
    /// The private JWK is what `kycctl sign --key` takes; the JWKS is what agents trust
    /// (append its key to /etc/kycd/trust/issuers.jwks or policy.jwks). Existing files are
    /// never overwritten.
    Keygen {
        /// Signature algorithm.
        #[arg(long, value_enum)]
        alg: KeyAlg,
        /// Key id; also the file name stem ([A-Za-z0-9._-], at most 64 characters).
        #[arg(long)]
        kid: String,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a claims JSON object as a compact JWS, printed on stdout.
    ///
    /// Fills `iat` with the current time if absent. The token is verified with the same key
    /// before it is printed; claims that kycd would reject (missing `exp`, unknown country
    /// code, unknown enum value, expired, …) are refused with exit code 1 and nothing on
    /// stdout.
    Sign {
        /// Private JWK (from `kycctl keygen`).
        #[arg(long, value_name = "PRIVATE_JWK")]
        key: PathBuf,
        /// Token type: sets the `typ` header and the claim rules checked.
        #[arg(long, value_enum)]
        typ: TokenTyp,
        /// Check validity as of this Unix time instead of now (e.g. for a future `nbf`).
        #[arg(long, value_name = "UNIX_TIME")]
        valid_at: Option<i64>,
        /// Claims JSON file (`-` for stdin).
        #[arg(value_name = "CLAIMS.json")]
        claims: PathBuf,
    },
    /// Verify a compact JWS against a JWKS and print its claims as JSON.
    ///
    /// Applies every rule the agent applies: algorithm allow-list, kid resolution, typ,
    /// forbidden headers, size cap, strict base64url and JSON, signature, time claims and the
    /// claim schema. One trailing newline in the file is ignored.
    Verify {
        /// Trusted public keys.
        #[arg(long, value_name = "JWKS")]
        jwks: PathBuf,
        /// Expected token type.
        #[arg(long, value_enum)]
        typ: TokenTyp,
        /// Verify as of this Unix time instead of now (forensics: "was it valid then?").
        #[arg(long, value_name = "UNIX_TIME")]
        at: Option<i64>,
        /// Clock skew tolerated for exp/nbf/iat, seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = kycd_protocol::DEFAULT_CLOCK_SKEW_S)]
        skew: u64,
        /// Largest token accepted, bytes.
        #[arg(long, value_name = "BYTES", default_value_t = kycd_protocol::DEFAULT_MAX_TOKEN_BYTES)]
        max_bytes: usize,
        /// Token file (`-` for stdin).
        #[arg(value_name = "TOKEN_FILE")]
        token: PathBuf,
    },
    /// Ask the running agent whether a workload may start (libvirt qemu hook, Slurm prolog).
    ///
    /// Sends the workload (and the attestation it brings, verified exactly like a delivered
    /// one and then kept by the agent) over the agent's socket, and exits with the verdict:
    /// 0 allow or condition, 1 deny (reasons on stderr), 3 agent unreachable. An unreachable
    /// agent means deny (fail closed) unless --fail-open. Root only.
    Admit {
        /// The workload, KIND:ID (e.g. libvirt_domain:gpu-vm-7, unix_user:1001, cgroup:/slurm/job_42).
        #[arg(long, value_name = "KIND:ID")]
        workload: String,
        /// The workload's attestation (compact JWS file; `-` for stdin).
        #[arg(long, value_name = "FILE")]
        attestation: Option<PathBuf>,
        /// For a libvirt domain: its UUID, so an attestation bound by UUID applies before it runs.
        #[arg(long, value_name = "UUID")]
        libvirt_uuid: Option<String>,
        /// How long to wait for the agent (e.g. 2s, 500ms).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Allow the workload when the agent cannot be reached (exit 0 with a warning).
        #[arg(long)]
        fail_open: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// Show what the running agent is doing: mode, policy, trust, verdict counts, GPU backend,
    /// enforcement errors and drift (root or the socket's group).
    Status {
        /// Print the agent's JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// List every workload with its verdict, tenant, reasons and when it was decided.
    Workloads {
        /// Print the agent's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// List tenants (from attestations in force) with their workloads and verdicts.
    Tenants {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// List recorded decisions, newest first, optionally for one tenant or since a time.
    Decisions {
        /// Only this tenant's.
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// Only decisions recorded at or after this Unix time.
        #[arg(long, value_name = "UNIX_TIME")]
        since: Option<i64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// List the GPUs the agent samples, with utilization.
    Gpus {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// GPU usage per tenant and workload since the agent started (GPU-seconds, estimated operations).
    Usage {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// Reload trust anchors, the policy and attestations (as SIGHUP does; root only).
    Reload {
        /// The agent's socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kycd/kycd.sock")]
        socket: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// GPU tools.
    Gpu {
        #[command(subcommand)]
        command: GpuCommand,
    },
    /// Print this host's id (`host_id` from the configuration, else /etc/machine-id).
    HostId {
        /// Agent configuration file (conf.d/ beside it is read too).
        #[arg(long, value_name = "PATH", default_value = kycd::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the host's report-signing key as a public JWK (for `kycd-collector hosts add`).
    ///
    /// The key is `<state_dir>/host.key`; it is created (mode 0600) when missing, exactly as
    /// kycd does on first start, so a host can be enrolled before the agent runs.
    HostKey {
        /// Print the public half (required: the private key is never printed).
        #[arg(long, required = true)]
        public: bool,
        /// Agent configuration file (conf.d/ beside it is read too).
        #[arg(long, value_name = "PATH", default_value = kycd::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the usage spool as JSON (read-only, safe while kycd runs): the acknowledged
    /// cursor, the seq highwater, and each segment's records as [seq, last_seq].
    Spool {
        /// Agent configuration file (conf.d/ beside it is read too).
        #[arg(long, value_name = "PATH", default_value = kycd::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// Record a GPU trace (JSON lines, one sample per line) from NVML, for replay.
    ///
    /// Exit 0 when at least one sample reached the driver, 1 when NVML was unavailable
    /// throughout (the trace then records why), 2 when the trace cannot be written.
    Record {
        /// How long to record, seconds.
        #[arg(long, value_name = "N")]
        seconds: u64,
        /// Trace file to write (replaced).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// NVML library to load.
        #[arg(long, value_name = "PATH", default_value = kycd::gpu::nvml::DEFAULT_LIBRARY)]
        nvml_library: PathBuf,
        /// Sampling interval, milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        interval_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain and print the first broken record.
    ///
    /// Checks every record in every segment: strict JSON in canonical form, seq up by one
    /// across files, each prev the SHA-256 of the record before, no torn lines. Exit 0 if
    /// intact, 1 if broken (where and why on stdout), 2 if the log cannot be read. The last
    /// hash printed is what to keep off the host: the chain alone cannot show that records
    /// were cut from its end.
    Verify {
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
        /// Audit log directory.
        #[arg(value_name = "DIR", default_value = audit::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyAlg {
    /// EdDSA with Ed25519 (RFC 8037).
    Ed25519,
    /// ECDSA P-256 with SHA-256 (RFC 7518).
    Es256,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TokenTyp {
    /// Tenant identity attestation (kyc-attestation+jwt).
    Attestation,
    /// Jurisdiction policy (kyc-policy+jwt).
    Policy,
    /// Host statement (kyc-host-statement+jwt).
    HostStatement,
}

impl From<TokenTyp> for Typ {
    fn from(t: TokenTyp) -> Self {
        match t {
            TokenTyp::Attestation => Typ::Attestation,
            TokenTyp::Policy => Typ::Policy,
            TokenTyp::HostStatement => Typ::HostStatement,
        }
    }
}

const EXIT_INVALID: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

/// `2s`, `500ms`, `1m`, or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected e.g. 2s, 500ms or 1m"))?;
    match unit {
        "" | "s" => Ok(std::time::Duration::from_secs(n)),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "m" => Ok(std::time::Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

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
        tokio::time::timeout(timeout, kycd::api::request(socket, method, uri, None))
            .await
            .unwrap_or(Err(kycd::api::ClientError::Timeout(timeout)))
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
    let s: kycd::api::Status = match serde_json::from_value(body) {
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
    let audit = if s.audit_failures == 0 {
        "ok".to_owned()
    } else {
        format!("FAILING ({} evaluations)", s.audit_failures)
    };
    println!("audit log:    {audit}");
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
    let rows: Vec<kycd::api::WorkloadRow> = match serde_json::from_value(body) {
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

fn rows(socket: &std::path::Path) -> Result<Vec<kycd::api::WorkloadRow>, ExitCode> {
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
    let body = kycd::api::AdmitBody {
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
        tokio::time::timeout(args.timeout, kycd::api::request(&args.socket, "POST", "/v1/admit", Some(&body)))
            .await
            .unwrap_or(Err(kycd::api::ClientError::Timeout(args.timeout)))
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
    let answer: kycd::api::AdmitAnswer = match serde_json::from_value(answer) {
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
