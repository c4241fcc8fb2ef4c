//! `kycd-collector audit …`: the collector's hash-chained audit log of finding actions
//! (and other record-keeping steps), in the agent's record format
//! ([`kycd_protocol::audit_chain`]).

use anyhow::Context as _;
use clap::Subcommand;

use super::database::{open, DEFAULT_DB};
use crate::findings::audit_rows;
use crate::fleet::lifecycle::verify_audit_log;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the records, one JSON line each (`seq`, `ts`, `prev`, `event`), from --from on.
    List {
        /// First sequence number to print.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Check the whole chain: every record canonical, sequence numbers without gaps, each
    /// record naming the hash of the one before and stored with its own hash. Prints the
    /// record count and the head hash; exits non-zero at the first break.
    Verify {
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Runs an `audit` command.
pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List { from, db } => {
            let store = open(&db, false)?;
            for row in audit_rows(store.as_ref(), from)? {
                println!("{}", row.line);
            }
        }
        AuditCommand::Verify { db } => {
            let store = open(&db, false)?;
            let report =
                verify_audit_log(audit_rows(store.as_ref(), 0)?).context("verifying the audit log")?;
            println!("ok\t{} records\thead {}", report.records, report.head.as_deref().unwrap_or("(empty)"));
        }
    }
    Ok(())
}
