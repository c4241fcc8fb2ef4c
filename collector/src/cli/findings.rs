//! `kycd-collector findings …`: evaluate and list findings; the rule flags `serve` shares.

use anyhow::Context as _;
use clap::Subcommand;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};
use crate::fleet::{FindingKind, FindingQuery, FindingState};

/// Tunables of the findings rules.
#[derive(Debug, Clone, clap::Args)]
pub struct RuleArgs {
    /// A host with neither a stored report nor a verified poll answer for this many seconds is
    /// dark (raise `host_dark`); three poll intervals is the rule of thumb.
    #[arg(long, default_value_t = 180)]
    pub dark_after_s: i64,
    /// Seconds after a policy is published during which hosts may still show the previous
    /// version without a `policy_stale` finding (agents fetch on an interval).
    #[arg(long, default_value_t = 600)]
    pub policy_grace_s: i64,
    /// A host with a report batch refused for good (409 SeqConflict, 400 InvalidRecord,
    /// HostMismatch or Malformed after its signature verified) within this many seconds has a
    /// `report_rejected` finding open.
    #[arg(long, default_value_t = 86_400)]
    pub rejected_window_s: i64,
}

impl RuleArgs {
    /// As evaluation settings.
    pub fn settings(&self) -> crate::findings::EvaluationSettings {
        crate::findings::EvaluationSettings {
            dark_after_s: self.dark_after_s,
            policy_grace_s: self.policy_grace_s,
            rejected_window_s: self.rejected_window_s,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum FindingsCommand {
    /// Run one evaluation now (what `serve` does every --evaluate-interval-s) and print what
    /// was raised and resolved.
    Evaluate {
        #[command(flatten)]
        rules: RuleArgs,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List findings.
    List {
        /// Only `open` or `resolved`.
        #[arg(long)]
        state: Option<String>,
        /// Only this kind (early_warning, training_threshold_crossed, cluster_capacity_crossed,
        /// host_dark, policy_stale, enforcement_mismatch, report_rejected, shared_gpu,
        /// guest_telemetry_gap, unattributed_training_scale).
        #[arg(long)]
        kind: Option<String>,
        /// Only about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Runs a `findings` command.
pub fn run(command: FindingsCommand) -> anyhow::Result<()> {
    match command {
        FindingsCommand::Evaluate { rules, db } => {
            let store = open(&db, false)?;
            let report = crate::findings::evaluate_store(store.as_ref(), rules.settings(), unix_now())?;
            if report.policy_version.is_none() {
                eprintln!("warning: no policy published: threshold findings were not evaluated");
            }
            for (id, kind, subject) in &report.raised {
                println!("raised\t{id}\t{}\t{subject}", kind.as_str());
            }
            for (id, kind, subject) in &report.resolved {
                println!("resolved\t{id}\t{}\t{subject}", kind.as_str());
            }
            println!("open\t{}", report.open);
        }
        FindingsCommand::List { state, kind, tenant, json, db } => {
            let state = state
                .map(|s| {
                    FindingState::parse(&s).with_context(|| format!("unknown state {s:?} (open, resolved)"))
                })
                .transpose()?;
            let kind = kind
                .map(|k| FindingKind::parse(&k).with_context(|| format!("unknown finding kind {k:?}")))
                .transpose()?;
            let store = open(&db, false)?;
            let query = FindingQuery { state, kind, tenant, limit: 1000, ..FindingQuery::default() };
            crate::findings::for_each_finding(store.as_ref(), query, |f| {
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        f.id,
                        f.state.as_str(),
                        f.finding.kind.as_str(),
                        crate::export::rfc3339(f.raised_at),
                        f.finding.subject,
                        f.finding.summary
                    );
                }
                Ok::<_, anyhow::Error>(())
            })?;
        }
    }
    Ok(())
}
