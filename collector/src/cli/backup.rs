//! `kycd-collector database backup|restore`: a consistent copy of the whole database, and the
//! way back.
//!
//! - SQLite: SQLite's online backup API ([`SqliteStore::backup_to`]): a copy of one committed
//!   state while `serve` keeps writing; restore copies a backup back over the database
//!   ([`SqliteStore::restore_from`], stop the collectors first) and migrates it.
//! - PostgreSQL: `pg_dump --format=custom` and `pg_restore --clean --if-exists --no-owner
//!   --single-transaction`, found on `PATH` or in `/usr/lib/postgresql/<newest>/bin` (use a
//!   `pg_dump` of the server's major version or newer); the restored database is then opened,
//!   which migrates a backup from an older collector.
//!
//! Restore refuses a database that already holds hosts or usage unless forced: it replaces
//! everything, and an operator who meant another database must not lose this one by a typo.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Subcommand;

use super::database::DEFAULT_DB;
use crate::store::postgres::{is_postgres_url, redact_url};
use crate::store::sqlite::SqliteStore;
use crate::store::StoreError;

#[derive(Debug, Subcommand)]
pub enum DatabaseCommand {
    /// Write a consistent copy of the whole database to FILE (SQLite: online backup into a
    /// new SQLite file; PostgreSQL: pg_dump --format=custom).
    Backup {
        /// The backup file to create (must not exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Replace the whole database by the backup in FILE (stop the collectors first), then
    /// migrate it to this collector's schema.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Restore even over a database that holds hosts or usage (they are replaced).
        #[arg(long)]
        force: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database failed.
    #[error("database")]
    Store(#[from] StoreError),
    /// The PostgreSQL client tool is not installed.
    #[error("{0} not found on PATH or in /usr/lib/postgresql/*/bin (Debian: postgresql-client)")]
    ToolMissing(&'static str),
    /// The tool could not be run.
    #[error("running {tool}")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The tool.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// The backup file is missing, or the target of a backup exists.
    #[error("{0}")]
    File(String),
    /// The target database holds data and `--force` was not given.
    #[error("database {0} already holds hosts or usage: restoring replaces them (--force to do so)")]
    NotEmpty(String),
}

/// A PostgreSQL client tool: on `PATH`, else the newest `/usr/lib/postgresql/*/bin`.
fn pg_tool(name: &'static str) -> Result<PathBuf, BackupError> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
        .unwrap_or_default();
    if let Some(found) = on_path {
        return Ok(found);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin").join(name))))
        .filter(|(_, tool)| tool.is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, tool)| tool).ok_or(BackupError::ToolMissing(name))
}

fn run_tool(tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<(), BackupError> {
    let out = Command::new(pg_tool(tool)?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| BackupError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackupError::ToolFailed {
        tool,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
    })
}

/// Backs the database `db` up into the new file `to`.
pub fn backup(db: &str, to: &Path) -> Result<(), BackupError> {
    if to.exists() {
        return Err(BackupError::File(format!("{} exists: back up into a new file", to.display())));
    }
    if is_postgres_url(db) {
        let dbname = format!("--dbname={db}");
        return run_tool(
            "pg_dump",
            &["--format=custom".as_ref(), "--file".as_ref(), to.as_os_str(), dbname.as_ref()],
        );
    }
    let store = SqliteStore::open(crate::store::sqlite_path(db)?)?;
    Ok(store.backup_to(to)?)
}

/// Whether the database holds hosts or usage.
fn holds_data(store: &dyn crate::store::Storage) -> Result<bool, StoreError> {
    if !store.list_hosts()?.is_empty() {
        return Ok(true);
    }
    let usage = store.fleet_usage(None)?;
    Ok(!usage.tenants.is_empty() || !usage.unattributed.is_empty())
}

/// Restores the backup `from` into the database `db` (see the module docs).
pub fn restore(db: &str, from: &Path, force: bool) -> Result<(), BackupError> {
    if !from.is_file() {
        return Err(BackupError::File(format!("backup {} is not a file", from.display())));
    }
    if !force {
        let store = crate::store::open_store(db)?;
        if holds_data(store.as_ref())? {
            return Err(BackupError::NotEmpty(redact_url(db)));
        }
    }
    if is_postgres_url(db) {
        let dbname = format!("--dbname={db}");
        run_tool(
            "pg_restore",
            &[
                "--clean".as_ref(),
                "--if-exists".as_ref(),
                "--no-owner".as_ref(),
                "--single-transaction".as_ref(),
                dbname.as_ref(),
                from.as_os_str(),
            ],
        )?;
        // Opening migrates a backup of an older collector.
        crate::store::postgres::PgStore::open(db)?;
        return Ok(());
    }
    let path = crate::store::sqlite_path(db)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| BackupError::File(format!("{}: {e}", parent.display())))?;
    }
    let store = SqliteStore::open(path)?;
    Ok(store.restore_from(from)?)
}

/// Runs a `database` command.
pub fn run(command: DatabaseCommand) -> anyhow::Result<()> {
    match command {
        DatabaseCommand::Backup { to, db } => {
            backup(&db, &to)?;
            println!("backed up {} to {}", redact_url(&db), to.display());
        }
        DatabaseCommand::Restore { from, force, db } => {
            restore(&db, &from, force)?;
            println!("restored {} from {}", redact_url(&db), from.display());
        }
    }
    Ok(())
}
