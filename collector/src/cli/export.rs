//! `kycd-collector export`: per-tenant usage and findings for filings, as CSV or JSON; with
//! `--unattributed`, the usage without a tenant per (host, workload) instead.

use anyhow::Context as _;

use super::database::open;

/// Runs `export`: rows since `since` of `db` in `format` (the tenants', or with
/// `unattributed` the usage without a tenant), to `output` or standard output.
pub fn run(
    since: &str,
    format: crate::export::Format,
    unattributed: bool,
    output: Option<std::path::PathBuf>,
    db: &str,
) -> anyhow::Result<()> {
    let since = crate::export::parse_date(since)?;
    let store = open(db, false)?;
    let text = if unattributed {
        crate::export::render_unattributed(&crate::export::unattributed_rows(store.as_ref(), since)?, format)?
    } else {
        crate::export::render(&crate::export::rows(store.as_ref(), since)?, format)?
    };
    match output {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}
