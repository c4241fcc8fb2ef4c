//! `kycd-collector export`: per-tenant usage and findings for filings, as CSV or JSON.

use anyhow::Context as _;

use super::database::open;

/// Runs `export`: rows since `since` of `db` in `format`, to `output` or standard output.
pub fn run(
    since: &str,
    format: crate::export::Format,
    output: Option<std::path::PathBuf>,
    db: &str,
) -> anyhow::Result<()> {
    let since = crate::export::parse_date(since)?;
    let rows = crate::export::rows(open(db, false)?.as_ref(), since)?;
    let text = crate::export::render(&rows, format)?;
    match output {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}
