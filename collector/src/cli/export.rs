//! `kycd-collector export`: per-tenant usage and findings for filings, as CSV or JSON; with
//! `--unattributed`, the usage without a tenant per (host, workload) instead.

use anyhow::Context as _;

use super::database::open;
use crate::export::{parse_date, ExportFilter, Format};

/// What `export` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Start of the period: YYYY-MM-DD (UTC), RFC 3339, or Unix seconds.
    #[arg(long)]
    pub since: String,
    /// End of the period (exclusive), in the same forms; default: now and on.
    #[arg(long)]
    pub until: Option<String>,
    /// Only tenants that are foreign persons (what a filing reports).
    #[arg(long, conflicts_with = "unattributed")]
    pub foreign_only: bool,
    /// Only this tenant.
    #[arg(long, conflicts_with = "unattributed")]
    pub tenant: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Export instead the usage no tenant is known for (workloads without a valid
    /// attestation), one row per host and workload.
    #[arg(long)]
    pub unattributed: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
    /// Database URL.
    #[arg(long, default_value = super::database::DEFAULT_DB)]
    pub db: String,
}

/// Runs `export`.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let since = parse_date(&args.since)?;
    let until = args.until.as_deref().map(parse_date).transpose()?;
    if until.is_some_and(|until| until <= since) {
        anyhow::bail!("--until must be after --since");
    }
    let filter = ExportFilter { since, until, foreign_only: args.foreign_only, tenant: args.tenant };
    let store = open(&args.db, false)?;
    let text = if args.unattributed {
        crate::export::render_unattributed(
            &crate::export::unattributed_rows_in(store.as_ref(), &filter)?,
            args.format,
        )?
    } else {
        crate::export::render(&crate::export::rows_in(store.as_ref(), &filter)?, args.format)?
    };
    write_output(args.output.as_deref(), &text)
}

/// Writes `text` to `output`, or to standard output.
pub fn write_output(output: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}
