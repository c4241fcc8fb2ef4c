//! `kycd-collector report FINDING_ID`: the filing record of one finding
//! ([`crate::filing`]), as JSON or print-ready HTML.

use anyhow::Context as _;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};
use super::export::write_output;

/// Formats of the filing record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// One JSON object.
    Json,
    /// A self-contained HTML page with print styles (print or save it as PDF).
    Html,
}

/// What `report` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The finding's id (`kycd-collector findings list`).
    pub finding_id: i64,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: ReportFormat,
    /// Write to this file instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
    /// Database URL.
    #[arg(long, default_value = DEFAULT_DB)]
    pub db: String,
}

/// Runs `report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let store = open(&args.db, false)?;
    let record = crate::filing::filing_record(store.as_ref(), args.finding_id, unix_now())
        .with_context(|| format!("filing record of finding {}", args.finding_id))?;
    let text = match args.format {
        ReportFormat::Json => serde_json::to_string_pretty(&record)? + "\n",
        ReportFormat::Html => crate::filing::html::render(&record),
    };
    write_output(args.output.as_deref(), &text)
}
