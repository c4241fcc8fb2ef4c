//! The database every command opens: the default URL and how a command opens it (creating
//! the SQLite file's directory for commands that write). A leaf: the command modules import
//! it, it imports none of them.

use std::sync::Arc;

use anyhow::Context as _;

use crate::store::{open_store, Storage};

/// Where the database lives unless `--db` says otherwise.
pub const DEFAULT_DB: &str = "sqlite:///var/lib/kycd-collector/kycd.db";

/// Opens the database at `db`; `create_dir`: create a SQLite file's directory first.
pub fn open(db: &str, create_dir: bool) -> anyhow::Result<Arc<dyn Storage>> {
    if create_dir && !crate::store::postgres::is_postgres_url(db) {
        let path = crate::store::sqlite_path(db)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let shown = crate::store::postgres::redact_url(db);
    open_store(db).with_context(|| format!("opening database {shown}"))
}
