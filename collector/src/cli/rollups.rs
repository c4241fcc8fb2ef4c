//! `kycd-collector rollups check|rebuild`: the usage roll-ups ([`crate::fleet::rollup`])
//! against the raw windows they summarise.
//!
//! `check` recomputes every roll-up table from the stored windows and compares it with the
//! stored one, row by row (sums within a relative 1e-9); it prints one line per table and
//! exits with status 1 when any differs. Run it after a restore, or when a figure looks wrong.
//! It holds the recomputed tables in memory (about the size of the roll-ups, not of the
//! windows). A host placed elsewhere since its windows were stored shows up as a difference in
//! `rollup_hosts`, `rollup_capacity` and `rollup_peaks` (ingest files a window under the
//! cluster of its host then; the check under the cluster now); `rebuild` files history under
//! today's placement.
//!
//! After `records prune` deleted windows, the roll-ups still count them (a tenant's totals do
//! not drop because detail aged out): `check` then compares what lies after the cut-off (the
//! day tables and capacity buckets) and says which tables it could not compare.
//!
//! `rebuild` recomputes every roll-up from the windows in one transaction (ingest waits
//! meanwhile); after a prune that *forgets* the pruned windows' usage, so it is what to run
//! only when the roll-ups should count the windows kept and nothing else.

use anyhow::Context as _;
use clap::Subcommand;

use super::database::{open, DEFAULT_DB};

#[derive(Debug, Subcommand)]
pub enum RollupsCommand {
    /// Recompute the roll-ups from the raw windows and compare them with the stored ones
    /// (exit status 1 when any table differs).
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Recompute the stored roll-ups from the raw windows, in one transaction.
    Rebuild {
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Runs a `rollups` command; a check that finds differences fails (exit status 1).
pub fn run(command: RollupsCommand) -> anyhow::Result<()> {
    match command {
        RollupsCommand::Check { json, db } => {
            let store = open(&db, false)?;
            let checks = store.rollup_check().context("checking the roll-ups")?;
            let differences: usize = checks.iter().map(|c| c.differences).sum();
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    if let Some(why) = &c.not_compared {
                        println!("{:<22} not compared: {why}", c.table);
                        continue;
                    }
                    let verdict = if c.differences == 0 {
                        "ok".to_owned()
                    } else {
                        format!("{} differ", c.differences)
                    };
                    println!(
                        "{:<22} {:>10} rows from windows {:>10} stored  {verdict}",
                        c.table, c.expected_rows, c.stored_rows
                    );
                    for example in &c.examples {
                        println!("    {example}");
                    }
                }
            }
            if differences > 0 {
                anyhow::bail!(
                    "{differences} roll-up rows differ from the windows (`rollups rebuild` recomputes them)"
                );
            }
            if !json {
                println!("roll-ups match the windows");
            }
            Ok(())
        }
        RollupsCommand::Rebuild { db } => {
            let store = open(&db, false)?;
            let windows =
                store.rollup_rebuild(kycd_protocol::clock::unix_now()).context("rebuilding the roll-ups")?;
            println!("roll-ups recomputed from {windows} windows");
            Ok(())
        }
    }
}
