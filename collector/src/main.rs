//! `kycd-collector`: serve report ingest, or manage enrolled hosts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser as _;
use kycd_collector::cli::{Cli, Command, HostsCommand};
use kycd_collector::hosts::parse_host_key;
use kycd_collector::{open_store, Ingestor, Limits, ReportStore};
use tokio_util::sync::CancellationToken;

/// How long in-flight requests may run after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn open(db: &str, create_dir: bool) -> anyhow::Result<Arc<dyn ReportStore>> {
    if create_dir && !kycd_collector::postgres::is_postgres_url(db) {
        let path = kycd_collector::store::sqlite_path(db)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let shown = kycd_collector::postgres::redact_url(db);
    open_store(db).with_context(|| format!("opening database {shown}"))
}

async fn serve(listen: SocketAddr, db: &str) -> anyhow::Result<()> {
    // Off the reactor: the PostgreSQL client blocks on a runtime of its own.
    let owned = db.to_owned();
    let store =
        tokio::task::spawn_blocking(move || open(&owned, true)).await.context("opening the database")??;
    let ingestor = Arc::new(Ingestor::new(store, Limits::default()));
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, db = %kycd_collector::postgres::redact_url(db), "collector serving");
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });
    let server = tokio::spawn(kycd_collector::server::run(listener, ingestor, shutdown.clone()));
    shutdown.cancelled().await;
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined.context("server task")??,
        Err(_) => tracing::warn!("in-flight requests still running after the grace period; exiting"),
    }
    Ok(())
}

fn hosts(command: HostsCommand) -> anyhow::Result<()> {
    match command {
        HostsCommand::Add { host_id, public_jwk, db } => {
            let bytes =
                std::fs::read(&public_jwk).with_context(|| format!("reading {}", public_jwk.display()))?;
            let key =
                parse_host_key(&host_id, &bytes).with_context(|| format!("{}", public_jwk.display()))?;
            open(&db, true)?.enroll_host(&host_id, &key, now())?;
            println!("enrolled {host_id}");
        }
        HostsCommand::List { db } => {
            for host in open(&db, false)?.list_hosts()? {
                println!(
                    "{}\t{}\tacked_seq={}\t{}",
                    host.host_id,
                    host.enrolled_at,
                    host.acked_seq,
                    host.public_key.to_jwk()
                );
            }
        }
        HostsCommand::Remove { host_id, db } => {
            if !open(&db, false)?.remove_host(&host_id)? {
                bail!("host {host_id:?} is not enrolled");
            }
            println!("removed {host_id}");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
    match cli.command {
        Command::Serve { listen, db } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(listen, &db))
        }
        Command::Hosts { command } => hosts(command),
    }
}
