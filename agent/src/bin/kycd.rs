//! `kycd`: the host agent. Parses arguments, loads the configuration, sets up logging and
//! signals, and hands over to `kycd::daemon::run`.

use std::process::ExitCode;

use clap::Parser as _;
use kycd::cli::kycd::{Cli, Command, ConfigArgs, GuestArgs};
use kycd::config::{self, Config, LogFormat, Mode};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter: tracing_subscriber::filter::Targets =
        config.log.level.parse().map_err(|e| anyhow::anyhow!("log.level {:?}: {e}", config.log.level))?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.format {
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init()?
        }
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()?
        }
    }
    Ok(())
}

fn run(config: Config, args: &ConfigArgs) -> anyhow::Result<()> {
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        // SIGHUP re-reads the configuration (every layer) here; the daemon applies it, or
        // keeps the running one when it does not load.
        let config_path = args.config.clone();
        let overrides = args.overrides();
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); stop.cancel(); break }
                    _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); stop.cancel(); break }
                    _ = sighup.recv() => {
                        let loaded = config::load(&config_path, &overrides).map(|l| l.config).map_err(|e| e.to_string());
                        let _ = reload_tx.try_send(loaded);
                    }
                }
            }
        });
        // One NVML thread, shared by the sampler and (in enforce mode) the GPU enforcer; or a
        // replayed trace (each user gets its own copy: replay state is in memory).
        type Gpu = Box<dyn kycd::gpu::GpuBackend>;
        let (sampler_gpu, enforcer_gpu): (Option<Gpu>, Option<Gpu>) = match (&config.gpu.replay_trace, config.gpu.enabled) {
            (_, false) => (None, None),
            (Some(trace), true) => {
                tracing::warn!(trace = %trace.display(), "GPU data is REPLAYED from a trace, not read from NVML");
                let open = || kycd::gpu::ReplayBackend::open(trace, true);
                (Some(Box::new(open()?)), Some(Box::new(open()?)))
            }
            (None, true) => {
                let options = kycd::gpu::nvml::NvmlOptions {
                    library: config.gpu.nvml_library.clone(),
                    ..Default::default()
                };
                let nvml = kycd::gpu::nvml::NvmlBackend::start(options)?;
                (Some(Box::new(nvml.clone())), Some(Box::new(nvml)))
            }
        };
        let enforcer: Box<dyn kycd::reconcile::Enforcer> = match config.mode {
            Mode::Enforce => Box::new(kycd::reconcile::HostEnforcer::from_config(&config, enforcer_gpu)),
            Mode::Audit => Box::new(kycd::reconcile::RecordOnly),
        };
        let gpu = sampler_gpu;
        let clock = std::sync::Arc::new(kycd_protocol::clock::SystemClock);
        kycd::daemon::run(config, enforcer, gpu, reload_rx, clock, shutdown).await?;
        Ok(())
    })
}

/// `kycd guest`: the sampler on the VM's own GPUs, reporting to the host agent.
fn guest(args: &GuestArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .try_init();
    let backend: Box<dyn kycd::gpu::GpuBackend> = match &args.replay_trace {
        Some(trace) => Box::new(kycd::gpu::ReplayBackend::open(trace, true)?),
        None => Box::new(kycd::gpu::nvml::NvmlBackend::start(kycd::gpu::nvml::NvmlOptions {
            library: args.nvml_library.clone(),
            ..Default::default()
        })?),
    };
    let options = kycd::gpu::sampler::SamplerOptions {
        interval: Duration::from_millis(args.interval_ms),
        peak_override: args.peak_flops_file.clone(),
        ..Default::default()
    };
    let sampler = kycd::gpu::sampler::GpuSampler::new(backend, &options)?;
    let sender = kycd::gpu::guest::sender::SenderOptions {
        port: args.port.clone(),
        interval: Duration::from_millis(args.interval_ms),
        report_every: Duration::from_secs(args.report_every_s),
        reports: args.reports,
    };
    kycd::gpu::guest::sender::run(sampler, &sender)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Guest(args) => match guest(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::CheckConfig(args) => match args.load() {
            Ok(config) => {
                print!("{}", config.to_effective_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => {
            let config = match args.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match run(config, &args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    // A corrupt audit log needs an operator: restarting cannot fix it, and
                    // kycd.service's RestartPreventExitStatus names this status.
                    let needs_operator =
                        e.downcast_ref::<kycd::daemon::DaemonError>().is_some_and(|e| e.needs_operator());
                    ExitCode::from(if needs_operator { kycd::daemon::EXIT_NEEDS_OPERATOR } else { 1 })
                }
            }
        }
    }
}
