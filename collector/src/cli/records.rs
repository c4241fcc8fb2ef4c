//! `kycd-collector records …`: the regulatory record's history (identities, statements) and
//! its pruning under the retention minimum ([`crate::records`]); the retention flag `serve`
//! shares.

use clap::Subcommand;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};
use crate::records::{PruneCounts, RetentionError, DEFAULT_RETENTION_MIN_S};

/// The collector's record retention setting.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// Seconds every record (usage, identity and statement history) is kept at least: a prune
    /// younger than now minus this is refused. A published policy's `retention.min_s` may
    /// raise it (the larger applies), never lower it. Default: 5 years.
    #[arg(long = "retention-min-s", value_name = "SECONDS", env = "KYCD_COLLECTOR_RETENTION_MIN_S",
          default_value_t = DEFAULT_RETENTION_MIN_S,
          value_parser = clap::value_parser!(u64).range(1..=kycd_protocol::MAX_RETENTION_S))]
    pub min_s: u64,
}

#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// List the identity history: every distinct identity (legal name, countries, owners'
    /// countries, foreign flag…) a verified statement named for a tenant, with the attestation
    /// digest and when it was first and last seen.
    Identities {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List the statement history: every distinct verified host statement (without the
    /// token unless --json), first and last seen.
    Statements {
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// JSON lines (with the signed token) instead of a table.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Delete usage records that ended by DATE and history rows last seen before it. Refused
    /// as a whole (exit 1) when DATE is inside the retention period; rows tied to a finding
    /// not yet filed (about their tenant, host or host/workload) are kept and counted.
    Prune {
        /// The cut-off: YYYY-MM-DD (UTC), RFC 3339, or Unix seconds.
        #[arg(long)]
        before: String,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        /// The time to judge retention at, instead of the clock (tests).
        #[arg(long, hide = true)]
        now: Option<String>,
    },
}

/// The summary line of a prune.
pub fn summary(counts: &PruneCounts, dry_run: bool) -> String {
    format!(
        "{verb}: records {}, identities {}, statements {}; kept (tied to findings not yet filed): \
         records {}, identities {}, statements {}",
        counts.records,
        counts.identities,
        counts.statements,
        counts.refused_records,
        counts.refused_identities,
        counts.refused_statements,
        verb = if dry_run { "would delete" } else { "deleted" },
    )
}

/// Runs a `records` command.
pub fn run(command: RecordsCommand) -> anyhow::Result<()> {
    match command {
        RecordsCommand::Identities { tenant, json, db } => {
            let store = open(&db, false)?;
            for r in store.identity_history(tenant.as_deref())? {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        r.tenant,
                        crate::export::rfc3339(r.first_seen),
                        crate::export::rfc3339(r.last_seen),
                        if r.attestation_digest.is_empty() { "-" } else { &r.attestation_digest },
                        r.identity
                    );
                }
            }
        }
        RecordsCommand::Statements { host, json, db } => {
            let store = open(&db, false)?;
            for r in store.statement_history(host.as_deref())? {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{}\t{}\t{}\t{}",
                        r.host_id,
                        crate::export::rfc3339(r.first_seen),
                        crate::export::rfc3339(r.last_seen),
                        r.content_digest
                    );
                }
            }
        }
        RecordsCommand::Prune { before, dry_run, retention, db, now } => {
            let before = crate::export::parse_date(&before)?;
            let now = now.map(|n| crate::export::parse_date(&n)).transpose()?.unwrap_or_else(unix_now);
            let store = open(&db, false)?;
            match crate::records::prune(store.as_ref(), before, now, retention.min_s, dry_run) {
                Ok(counts) => {
                    println!("{}", summary(&counts, dry_run));
                    if counts.refused() > 0 {
                        eprintln!(
                            "note: {} rows older than the cut-off were kept: findings not yet filed are \
                             about their tenant or host (file or dismiss them, then prune again)",
                            counts.refused()
                        );
                    }
                }
                Err(e @ RetentionError::InsideRetention { .. }) => return Err(e.into()),
                Err(e) => return Err(anyhow::Error::new(e).context("pruning records")),
            }
        }
    }
    Ok(())
}
