//! `kycd-collector`: serve ingest, the policy and the read API; manage hosts and the policy;
//! evaluate findings; export for filings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser as _;
use kycd_collector::cli::{Cli, Command, FindingsCommand, HostsCommand, PolicyCommand, PollArgs, RuleArgs};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::hosts::parse_host_key;
use kycd_collector::{open_store, Ingestor, Limits};
use tokio_util::sync::CancellationToken;

/// How long in-flight requests may run after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn open(db: &str, create_dir: bool) -> anyhow::Result<Arc<dyn kycd_collector::Storage>> {
    if create_dir && !kycd_collector::postgres::is_postgres_url(db) {
        let path = kycd_collector::store::sqlite_path(db)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let shown = kycd_collector::postgres::redact_url(db);
    open_store(db).with_context(|| format!("opening database {shown}"))
}

/// What `serve` runs besides ingest.
struct ServeOptions {
    limits: kycd_net::Limits,
    read_token_file: Option<std::path::PathBuf>,
    evaluate_interval_s: u64,
    rules: RuleArgs,
    poll: PollArgs,
}

async fn serve(listen: SocketAddr, db: &str, options: ServeOptions) -> anyhow::Result<()> {
    // Off the reactor: the PostgreSQL client blocks on a runtime of its own.
    let owned = db.to_owned();
    let store =
        tokio::task::spawn_blocking(move || open(&owned, true)).await.context("opening the database")??;
    let access = match &options.read_token_file {
        Some(path) => {
            let token =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            if token.trim().len() < 16 {
                bail!("the read token in {} must be at least 16 characters", path.display());
            }
            kycd_collector::api::ReadAccess::token(&token)
        }
        None => kycd_collector::api::ReadAccess::loopback_only(),
    };
    let api = kycd_collector::api::ApiState { store: Arc::clone(&store), access };
    let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
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
    if options.evaluate_interval_s > 0 {
        tokio::spawn(kycd_collector::findings::run_evaluator(
            Arc::clone(&store),
            options.rules.settings(),
            Duration::from_secs(options.evaluate_interval_s),
            shutdown.clone(),
        ));
    }
    let _poller = spawn_poller(store.clone(), &options.poll, &shutdown)?;
    let app = kycd_collector::server::app(ingestor, api);
    let stats = Arc::new(kycd_net::ConnStats::default());
    let server = tokio::spawn(kycd_collector::server::serve_bounded(
        listener,
        app,
        options.limits,
        stats,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined.context("server task")??,
        Err(_) => tracing::warn!("in-flight requests still running after the grace period; exiting"),
    }
    Ok(())
}

/// Starts the agent poller unless `--poll-interval-s 0`.
fn spawn_poller(
    store: Arc<dyn kycd_collector::Storage>,
    args: &PollArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(config) = args.to_config() else {
        tracing::info!("agent polling off (--poll-interval-s 0)");
        return Ok(None);
    };
    tracing::info!(
        interval_s = config.interval.as_secs(),
        concurrency = config.concurrency,
        "agent polling on"
    );
    Ok(Some(
        kycd_collector::poll::spawn(store, config, shutdown.clone()).context("starting the agent poller")?,
    ))
}

fn set_agent_url(
    store: &dyn kycd_collector::Storage,
    host_id: &str,
    url: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(url) = url {
        // Plaintext to loopback is stored; whether it is polled is serve's
        // --poll-insecure-plaintext.
        kycd_collector::poll::check_agent_url(url, true)?;
    }
    if !store.set_agent_url(host_id, url)? {
        bail!("host {host_id:?} is not enrolled");
    }
    Ok(())
}

fn hosts(command: HostsCommand) -> anyhow::Result<()> {
    match command {
        HostsCommand::Add { host_id, public_jwk, agent_url, db } => {
            let bytes =
                std::fs::read(&public_jwk).with_context(|| format!("reading {}", public_jwk.display()))?;
            let key =
                parse_host_key(&host_id, &bytes).with_context(|| format!("{}", public_jwk.display()))?;
            if let Some(url) = &agent_url {
                kycd_collector::poll::check_agent_url(url, true)?;
            }
            let store = open(&db, true)?;
            let epoch = store.enroll_host(&host_id, &key, now())?;
            if let Some(url) = &agent_url {
                set_agent_url(store.as_ref(), &host_id, Some(url))?;
            }
            println!("enrolled {host_id} (enrollment epoch {epoch})");
        }
        HostsCommand::SetAgentUrl { host_id, url, clear, db } => {
            let url = if clear { None } else { url };
            set_agent_url(open(&db, false)?.as_ref(), &host_id, url.as_deref())?;
            match url {
                Some(url) => println!("{host_id}: agent URL {url}"),
                None => println!("{host_id}: agent URL cleared"),
            }
        }
        HostsCommand::List { db } => {
            let store = open(&db, false)?;
            let urls: std::collections::HashMap<String, String> = store.agent_urls()?.into_iter().collect();
            let status: std::collections::HashMap<String, kycd_collector::HostPollStatus> =
                store.host_poll_status()?.into_iter().map(|s| (s.host_id.clone(), s)).collect();
            for host in store.list_hosts()? {
                let url = urls.get(&host.host_id).map_or("-", String::as_str);
                let poll = match status.get(&host.host_id) {
                    Some(s) if s.last_attempt_at.is_some() => format!(
                        "last_poll={} last_ok={} failures={}{}",
                        s.last_attempt_at.unwrap_or_default(),
                        s.last_ok_at.map_or_else(|| "never".to_owned(), |t| t.to_string()),
                        s.consecutive_failures,
                        s.last_error.as_ref().map(|e| format!(" error={e:?}")).unwrap_or_default()
                    ),
                    _ => "never_polled".to_owned(),
                };
                println!(
                    "{}\t{}\tepoch={}\tacked_seq={}\tagent_url={url}\t{poll}\t{}",
                    host.host_id,
                    host.enrolled_at,
                    host.epoch,
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

fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Publish { file, trust, db } => {
            let token =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let jwks = std::fs::read(&trust).with_context(|| format!("reading {}", trust.display()))?;
            let jwks =
                kycd_protocol::Jwks::from_json(&jwks).with_context(|| format!("{}", trust.display()))?;
            let store = open(&db, true)?;
            let published = kycd_collector::policy::publish(store.as_ref(), &token, &jwks, now())
                .with_context(|| format!("{}", file.display()))?;
            println!("published policy version {} (ETag {})", published.version, published.etag());
        }
        PolicyCommand::Show { token, db } => {
            let Some(policy) = open(&db, false)?.current_policy()? else {
                bail!("no policy has been published");
            };
            if token {
                println!("{}", policy.token);
            } else {
                println!("version {}", policy.version);
                println!("published_at {}", kycd_collector::export::rfc3339(policy.published_at));
                println!("etag {}", policy.etag());
                println!("{}", serde_json::to_string_pretty(&policy.claims)?);
            }
        }
    }
    Ok(())
}

fn findings(command: FindingsCommand) -> anyhow::Result<()> {
    match command {
        FindingsCommand::Evaluate { rules, db } => {
            let store = open(&db, false)?;
            let report = kycd_collector::findings::evaluate_store(store.as_ref(), rules.settings(), now())?;
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
        FindingsCommand::List { state, kind, tenant, json, db } => {
            let state = state
                .map(|s| {
                    FindingState::parse(&s).with_context(|| format!("unknown state {s:?} (open, resolved)"))
                })
                .transpose()?;
            let kind = kind
                .map(|k| FindingKind::parse(&k).with_context(|| format!("unknown finding kind {k:?}")))
                .transpose()?;
            let store = open(&db, false)?;
            let mut after_id = 0;
            loop {
                let page = store.list_findings(&FindingQuery {
                    state,
                    kind,
                    tenant: tenant.clone(),
                    after_id,
                    limit: 1000,
                    ..FindingQuery::default()
                })?;
                let Some(last) = page.last() else { break };
                after_id = last.id;
                for f in page {
                    if json {
                        println!("{}", serde_json::to_string(&f)?);
                    } else {
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            f.id,
                            f.state.as_str(),
                            f.finding.kind.as_str(),
                            kycd_collector::export::rfc3339(f.raised_at),
                            f.finding.subject,
                            f.finding.summary
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn export(
    since: &str,
    format: kycd_collector::export::Format,
    output: Option<std::path::PathBuf>,
    db: &str,
) -> anyhow::Result<()> {
    let since = kycd_collector::export::parse_date(since)?;
    let rows = kycd_collector::export::rows(open(db, false)?.as_ref(), since)?;
    let text = kycd_collector::export::render(&rows, format)?;
    match output {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
    match cli.command {
        Command::Serve { listen, db, read_token_file, evaluate_interval_s, rules, poll, connections } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(
                listen,
                &db,
                ServeOptions {
                    read_token_file,
                    evaluate_interval_s,
                    rules,
                    poll,
                    limits: connections.limits(),
                },
            ))
        }
        Command::Hosts { command } => hosts(command),
        Command::Policy { command } => policy(command),
        Command::Findings { command } => findings(command),
        Command::Export { since, format, output, db } => export(&since, format, output, &db),
    }
}
