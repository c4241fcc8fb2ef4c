//! `kycctl`, the operator's command-line tool for kycd: its clap definitions (here, in the
//! library, so that the man page and shell completions `kycd-gen-docs` renders are generated
//! from exactly what the binary parses), [`run`] dispatching a parsed command line, and one
//! module per command group saying what each command does. `src/bin/kycctl.rs` only parses
//! and calls [`run`].
//!
//! Exit codes (stable; scripts depend on them):
//!   0  success (for `verify`: the token is valid; for `audit verify`: the chain is intact)
//!   1  a verdict of "no": the token is invalid (`verify`), or the claims would not verify
//!      (`sign`); the reason is printed as `error: <Kind>: <detail>` on stderr. For
//!      `audit verify`: the chain is broken; `audit log BROKEN at <file>:<line> …` on stdout
//!   2  usage error, unreadable file or directory, unusable key or key set
//!   3  commands that talk to the agent (admit, status, workloads, reload): the agent could
//!      not be reached or did not answer (for admit: a deny, unless `--fail-open`)
//!   4  `status`: the agent answered and is unhealthy ([`Status::problems`], one line on
//!      stderr)
//!
//! `--socket`, `--config` and `--json` (`-o json`) are global, as in kubectl and systemctl:
//! accepted before or after the subcommand (after it, as before they were global), and
//! ignored by the commands that have no use for them.
//!
//! [`Status::problems`]: crate::net::operator_api::Status::problems

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod admit;
mod agent;
mod audit;
mod gpus;
mod host;
mod status;
mod token;
mod workloads;

use crate::tokens::Typ;

/// Operator CLI for the kycd host agent: admission, keys, signed tokens and the audit log.
#[derive(Debug, Parser)]
#[command(name = "kycctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Options every command accepts, before or after its name.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's socket when `--socket` is not given.
pub const DEFAULT_SOCKET: &str = "/run/kycd/kycd.sock";

/// Global options: before the subcommand (`kycctl --socket X status`) or after it
/// (`kycctl status --socket X`, as they were before they became global).
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The agent's socket (admit, status, workloads, tenants, decisions, gpus, usage, reload).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Agent configuration file; conf.d/ beside it is read too (host-id, host-key, spool).
    #[arg(long, global = true, value_name = "PATH", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Print JSON instead of text, the same as `-o json` (status, workloads, tenants,
    /// decisions, gpus, usage, audit verify, gpu estimate).
    #[arg(long, global = true)]
    pub json: bool,
    /// Output format: `text` (the default) or `json` (as --json).
    #[arg(short = 'o', long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
}

/// `-o`/`--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Summaries and tables for people.
    Text,
    /// JSON for scripts.
    Json,
}

impl GlobalArgs {
    /// Whether to print JSON; `--json -o text` contradicts itself.
    fn json(&self) -> Result<bool, ExitCode> {
        match (self.json, self.output) {
            (true, Some(OutputFormat::Text)) => {
                Err(fail(EXIT_USAGE, "--json and -o text contradict each other"))
            }
            (json, output) => Ok(json || output == Some(OutputFormat::Json)),
        }
    }
}

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success (verify: token valid; audit verify: chain intact)
  1  token invalid (verify) or claims would not verify (sign); reason on stderr as
     'error: <Kind>: <detail>'
     audit verify: chain broken; 'audit log BROKEN at <file>:<line> ...' on stdout
     status, workloads, tenants, decisions, gpus, usage, reload: the agent refused
     (e.g. the caller lacks permission) or answered something unreadable
     gpu record: NVML was unavailable for every sample
  2  usage error, I/O error, unusable key or key set, unusable configuration
  3  status, workloads, tenants, decisions, gpus, usage, reload: the agent could not be
     reached or did not answer (is kycd running?)
  4  status: the agent answered and is unhealthy; the reasons on one line of stderr as
     'error: unhealthy: <reason>; <reason>'. Unhealthy: the audit log is failing, an
     enforcement backend's last reconciliation failed, no policy is in force, or the
     last reload could not load everything
admit:
  0  allow (or allow with conditions, printed on stdout)
  1  deny; the reasons on stderr
  3  the agent is unreachable or did not answer in time: deny, unless --fail-open";

/// `kycctl status`'s exit codes (its man page's EXIT STATUS).
pub const STATUS_EXIT_CODES: &str = "\
Exit codes:
  0  the agent answered and is healthy
  1  the agent refused (e.g. the caller lacks permission) or answered something unreadable
  2  usage error
  3  the agent could not be reached or did not answer (is kycd running?)
  4  the agent answered and is unhealthy; every reason on one line of stderr:
     'error: unhealthy: <reason>; <reason>'";

#[derive(Debug, Subcommand)]
pub enum Command {
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
    },
    /// Show what the running agent is doing: mode, policy, trust, verdict counts, GPU backend,
    /// enforcement errors and drift (root or the socket's group).
    ///
    /// Exits 4 when the agent answers but is unhealthy, with the reasons on one line of
    /// stderr (`error: unhealthy: …; …`), after printing the summary (or the JSON) as usual.
    /// Unhealthy means something is wrong now, not a count since start: the audit log is
    /// failing (its last write failed, or decisions went unrecorded); an enforcement
    /// backend's last reconciliation failed (enforce mode); no policy is in force (every
    /// workload denied); or the last reload (or the start) could not load everything.
    #[command(after_help = STATUS_EXIT_CODES)]
    Status,
    /// List every workload with its verdict, tenant, reasons and when it was decided.
    Workloads,
    /// List tenants (from attestations in force) with their workloads and verdicts.
    Tenants,
    /// List recorded decisions, newest first, optionally for one tenant or since a time.
    Decisions {
        /// Only this tenant's.
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// Only decisions recorded at or after this Unix time.
        #[arg(long, value_name = "UNIX_TIME")]
        since: Option<i64>,
    },
    /// List the GPUs the agent samples, with utilization.
    Gpus,
    /// GPU usage per tenant and workload since the agent started (GPU-seconds, estimated operations).
    Usage,
    /// Reload trust anchors, the policy and attestations (as SIGHUP does; root only).
    Reload,
    /// Audit log tools.
    Audit {
        /// Audit log command.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// GPU tools.
    Gpu {
        /// GPU command.
        #[command(subcommand)]
        command: GpuCommand,
    },
    /// Print this host's id (`host_id` from the configuration, else /etc/machine-id).
    HostId,
    /// Print the host's report-signing key as a public JWK (for `kycd-collector hosts add`).
    ///
    /// The key is `<state_dir>/host.key`; it is created (mode 0600) when missing, exactly as
    /// kycd does on first start, so a host can be enrolled before the agent runs.
    HostKey {
        /// Print the public half (required: the private key is never printed).
        #[arg(long, required = true)]
        public: bool,
    },
    /// Print the usage spool as JSON (read-only, safe while kycd runs): the acknowledged
    /// cursor, the seq highwater, and each segment's records as [seq, last_seq].
    Spool,
}

#[derive(Debug, Subcommand)]
pub enum GpuCommand {
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
        #[arg(long, value_name = "PATH", default_value = crate::gpu::nvml::DEFAULT_LIBRARY)]
        nvml_library: PathBuf,
        /// Sampling interval, milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Estimate the operations a recorded trace shows between two times, per GPU.
    ///
    /// The agent's own estimate (every GPM pipe × its per-precision peak × SM clock ÷ max
    /// SM clock; docs/estimates.md) over the sampling intervals that lie inside [FROM, TO]:
    /// a lower bound (each pipe at its slowest precision), the point estimate (BF16 on the
    /// HMMA pipe) and an upper bound (fastest precision). For calibration
    /// (bench/gpu_calibration) and for checking a figure by hand. Exit 2 when the trace
    /// cannot be read.
    Estimate {
        /// Trace written by `kycctl gpu record` (any format version).
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// Start, Unix seconds (fractions allowed); default: the trace's first sample.
        #[arg(long, value_name = "T")]
        from: Option<f64>,
        /// End, Unix seconds (fractions allowed); default: the trace's last sample.
        #[arg(long, value_name = "T")]
        to: Option<f64>,
        /// Peak table laid over the built-in one (the agent's gpu.peak_flops_file format).
        #[arg(long, value_name = "FILE")]
        peak_flops_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain and print the first broken record.
    ///
    /// Checks every record in every segment: strict JSON in canonical form, seq up by one
    /// across files, each prev the SHA-256 of the record before, no torn lines. Exit 0 if
    /// intact, 1 if broken (where and why on stdout), 2 if the log cannot be read. The last
    /// hash printed is what to keep off the host: the chain alone cannot show that records
    /// were cut from its end.
    Verify {
        /// Audit log directory.
        #[arg(value_name = "DIR", default_value = crate::audit::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Cut a log whose end is corrupt back to a record that verifies, keeping the removed bytes.
    ///
    /// kycd refuses to start on a log whose last record is corrupt (it would fork the chain)
    /// and logs this command with the right seq. Everything after the record with seq SEQ —
    /// the rest of its segment and every later segment — is copied, byte for byte, into
    /// DIR/repair-<time>-after-<SEQ>.removed (fsync'd first), then cut from the log. The
    /// records up to SEQ must verify and the log must be broken, or nothing changes. Run it
    /// with the agent stopped.
    /// Exit 0 when the cut log verifies, 1 when it still does not, 2 on a usage or I/O error.
    Repair {
        /// The seq of the last record to keep.
        #[arg(long, value_name = "SEQ")]
        truncate_after: u64,
        /// Audit log directory.
        #[arg(value_name = "DIR", default_value = crate::audit::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyAlg {
    /// EdDSA with Ed25519 (RFC 8037).
    Ed25519,
    /// ECDSA P-256 with SHA-256 (RFC 7518).
    Es256,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenTyp {
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

/// `2s`, `500ms`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected e.g. 2s, 500ms or 1m"))?;
    match unit {
        "" | "s" => Ok(std::time::Duration::from_secs(n)),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "m" => Ok(std::time::Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// A verdict of "no" (see the exit codes above).
const EXIT_INVALID: u8 = 1;
/// Usage, I/O, key or configuration error.
const EXIT_USAGE: u8 = 2;
/// The agent could not be reached or did not answer.
const EXIT_UNREACHABLE: u8 = 3;
/// `status`: the agent answered and is unhealthy.
const EXIT_UNHEALTHY: u8 = 4;

/// Prints `error: MESSAGE` on stderr and returns exit code `code`.
fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// Runs a parsed `kycctl` command line.
pub fn run(cli: Cli) -> ExitCode {
    let json = match cli.global.json() {
        Ok(json) => json,
        Err(code) => return code,
    };
    let GlobalArgs { socket, config, .. } = cli.global;
    match cli.command {
        Command::Keygen { alg, kid, out } => token::keygen(alg, &kid, &out),
        Command::Sign { key, typ, valid_at, claims } => token::sign(&key, typ, valid_at, &claims),
        Command::Verify { jwks, typ, at, skew, max_bytes, token } => {
            token::verify(token::VerifyArgs { jwks: &jwks, typ, at, skew, max_bytes, token: &token })
        }
        Command::Admit { workload, attestation, libvirt_uuid, timeout, fail_open } => {
            admit::admit(admit::AdmitArgs { workload, attestation, libvirt_uuid, timeout, fail_open, socket })
        }
        Command::Status => status::status(&socket, json),
        Command::Workloads => workloads::workloads(&socket, json),
        Command::Tenants => workloads::tenants(&socket, json),
        Command::Decisions { tenant, since } => workloads::decisions(&socket, tenant.as_deref(), since, json),
        Command::Gpus => gpus::gpus(&socket, json, false),
        Command::Usage => gpus::gpus(&socket, json, true),
        Command::Reload => status::reload(&socket),
        Command::Audit { command: AuditCommand::Verify { dir } } => audit::audit_verify(&dir, json),
        Command::Audit { command: AuditCommand::Repair { truncate_after, dir } } => {
            audit::audit_repair(&dir, truncate_after)
        }
        Command::Gpu { command: GpuCommand::Record { seconds, out, nvml_library, interval_ms } } => {
            gpus::gpu_record(&nvml_library, seconds, interval_ms, &out)
        }
        Command::Gpu { command: GpuCommand::Estimate { trace, from, to, peak_flops_file } } => {
            gpus::gpu_estimate(&trace, (from, to), peak_flops_file.as_deref(), json)
        }
        Command::HostId => host::host_identity(&config, false),
        Command::HostKey { public: _ } => host::host_identity(&config, true),
        Command::Spool => host::spool(&config),
    }
}
