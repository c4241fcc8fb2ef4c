//! The command line of `kycd-collector`, in the library so that man pages and shell
//! completions are generated from the same definitions the binary parses with; and what each
//! command does, a file per command (group): [`serve`], [`hosts`], [`policy`], [`findings`],
//! [`export`], [`report`] (the filing record of one finding), [`audit`] (the collector's
//! audit log), [`records`] (history and pruning), [`backup`] (`database backup|restore`),
//! all opening the database through [`database`]. `main` parses and calls [`run`].
//!
//! The commands report errors with `anyhow` (context chains printed by `main`): this module
//! is the top of the binary, kept in the library only so that it can be tested and documented.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod audit;
pub mod backup;
pub mod database;
pub mod export;
pub mod findings;
pub mod hosts;
pub mod policy;
pub mod records;
pub mod report;
pub mod rollups;
pub mod serve;

pub use backup::DatabaseCommand;
pub use database::DEFAULT_DB;
pub use findings::{FindingsCommand, RuleArgs};
pub use hosts::HostsCommand;
pub use policy::PolicyCommand;
pub use records::{RecordsCommand, RetentionArgs};
pub use serve::{ConnectionArgs, PollArgs};

#[derive(Debug, Parser)]
#[command(
    name = "kycd-collector",
    version,
    about = "kycd collector: ingests signed host usage reports, aggregates tenants' compute across \
             hosts, raises findings, distributes the signed policy, exports for filings"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve report ingest (POST /v1/reports), the policy (GET /v1/policy), the read API
    /// (/v1/tenants, /v1/findings, /v1/hosts, the HTML overview at /) and /healthz, and
    /// evaluate findings periodically.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9478")]
        listen: SocketAddr,
        /// Database URL (sqlite:///path, a plain path, or postgres://user@host/db).
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        /// File holding the bearer token the read API (/, /v1/tenants, /v1/findings,
        /// /v1/hosts) requires. Without it the read API answers loopback clients only.
        #[arg(long, value_name = "FILE")]
        read_token_file: Option<PathBuf>,
        /// File of named write tokens, one `NAME TOKEN` per line (tokens of at least 16
        /// characters; `#` comments), for POST /v1/findings/ID/{acknowledge,file,dismiss}:
        /// the NAME is the actor the audit log records. Without it those actions are refused.
        #[arg(long, value_name = "FILE")]
        write_token_file: Option<PathBuf>,
        /// Seconds between findings evaluations (0: never, e.g. on ingest-only replicas).
        #[arg(long, default_value_t = 60)]
        evaluate_interval_s: u64,
        #[command(flatten)]
        rules: RuleArgs,
        /// Polling of the agents' signed host statements.
        #[command(flatten)]
        poll: PollArgs,
        /// Bounds of the HTTP listener.
        #[command(flatten)]
        connections: ConnectionArgs,
        /// Record retention (logged at start; `records prune` enforces it).
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Publish and show the signed jurisdiction policy agents fetch from GET /v1/policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Evaluate and list findings.
    Findings {
        #[command(subcommand)]
        command: FindingsCommand,
    },
    /// Export per-tenant usage and findings for regulatory filings.
    Export(export::ExportArgs),
    /// The filing record of one finding: the customer, the KYC link, the run (or the usage),
    /// operations with their bounds and methods, GPU-hours, peak capacity, hosts, the policy
    /// and threshold crossed, the evidence windows and the audit records; JSON, or a
    /// self-contained print-ready HTML page to save as PDF.
    Report(report::ReportArgs),
    /// The collector's hash-chained audit log of finding actions: list or verify it.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Manage enrolled hosts.
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
    /// The regulatory record: identity and statement history, and pruning under the
    /// retention minimum.
    Records {
        #[command(subcommand)]
        command: RecordsCommand,
    },
    /// The usage roll-ups: check them against the raw windows, or recompute them.
    Rollups {
        #[command(subcommand)]
        command: rollups::RollupsCommand,
    },
    /// Back the database up, or restore it from a backup.
    Database {
        #[command(subcommand)]
        command: DatabaseCommand,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            db,
            read_token_file,
            write_token_file,
            evaluate_interval_s,
            rules,
            poll,
            connections,
            retention,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve::run(
                listen,
                &db,
                serve::ServeOptions {
                    read_token_file,
                    write_token_file,
                    evaluate_interval_s,
                    rules,
                    poll,
                    limits: connections.limits(),
                    retention,
                },
            ))
        }
        Command::Hosts { command } => hosts::run(command),
        Command::Audit { command } => audit::run(command),
        Command::Policy { command } => policy::run(command),
        Command::Findings { command } => findings::run(command),
        Command::Export(args) => export::run(args),
        Command::Report(args) => report::run(args),
        Command::Records { command } => records::run(command),
        Command::Database { command } => backup::run(command),
        Command::Rollups { command } => rollups::run(command),
    }
}
