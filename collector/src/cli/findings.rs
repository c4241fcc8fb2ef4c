//! `kycd-collector findings …`: evaluate and list findings; the rule flags `serve` shares.

use anyhow::Context as _;
use clap::Subcommand;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};
use crate::fleet::{FindingAction, FindingKind, FindingQuery, FindingState};

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
    /// Acknowledge a finding: seen, being worked on (open → acknowledged). Recorded in the
    /// audit log with --by.
    Acknowledge {
        /// The finding's id.
        id: i64,
        /// Who acts (recorded in the audit log).
        #[arg(long)]
        by: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Record that a finding was reported to the regulator (open or acknowledged → filed),
    /// with the filing's reference. A filed finding is never raised again.
    File {
        /// The finding's id.
        id: i64,
        /// The filing's reference (the regulator's acknowledgement number, a case id, …).
        #[arg(long)]
        reference: String,
        /// Who acts (recorded in the audit log).
        #[arg(long)]
        by: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Record that a finding needs no filing (open or acknowledged → dismissed), and why.
    Dismiss {
        /// The finding's id.
        id: i64,
        /// Why it needs no filing.
        #[arg(long)]
        reason: String,
        /// Who acts (recorded in the audit log).
        #[arg(long)]
        by: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List findings.
    List {
        /// Only this state: open, acknowledged, filed, dismissed or resolved.
        #[arg(long)]
        state: Option<String>,
        /// Only this kind (early_warning, training_threshold_crossed, cluster_capacity_crossed,
        /// host_dark, policy_stale, enforcement_mismatch, report_rejected, shared_gpu,
        /// guest_telemetry_gap, unattributed_training_scale, run_threshold_crossed,
        /// bio_early_warning, report_overdue).
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
        FindingsCommand::Acknowledge { id, by, db } => act(&db, id, &FindingAction::Acknowledge, &by)?,
        FindingsCommand::File { id, reference, by, db } => {
            act(&db, id, &FindingAction::File { reference }, &by)?;
        }
        FindingsCommand::Dismiss { id, reason, by, db } => {
            act(&db, id, &FindingAction::Dismiss { reason }, &by)?
        }
        FindingsCommand::List { state, kind, tenant, json, db } => {
            let state = state
                .map(|s| {
                    FindingState::parse(&s).with_context(|| {
                        format!("unknown state {s:?} (open, acknowledged, filed, dismissed, resolved)")
                    })
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

/// Takes `action` on finding `id` as `by` now, and prints the finding's new state.
fn act(db: &str, id: i64, action: &FindingAction, by: &str) -> anyhow::Result<()> {
    let store = open(db, false)?;
    let finding = store
        .act_on_finding(id, action, by, unix_now())
        .with_context(|| format!("{} finding {id}", action.name()))?;
    println!(
        "{}\t{}\t{}\t{}",
        finding.id,
        finding.state.as_str(),
        finding.finding.kind.as_str(),
        finding.finding.subject
    );
    Ok(())
}
