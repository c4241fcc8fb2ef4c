//! The command line of `kycd`: its clap definitions, and how the arguments become
//! configuration overrides. In the library so that the man page and shell completions
//! (`kycd-gen-docs`) come from exactly what the binary parses; the binary
//! (`src/bin/kycd.rs`) owns running the agent.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Config, LogFormat, Mode, Overrides};

/// kycd host agent: checks tenants' verified-identity attestations against a signed jurisdiction
/// policy on a GPU host, and records every decision in a hash-chained audit log.
#[derive(Debug, Parser)]
#[command(
    name = "kycd",
    version,
    after_help = "Exit codes: 0 clean stop or valid configuration; 1 runtime failure; 2 invalid configuration or usage."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (foreground; systemd runs it as a service). SIGTERM/SIGINT stop it,
    /// SIGHUP reloads trust anchors, the policy and attestations.
    Run(ConfigArgs),
    /// Validate the configuration and print the effective result (all layers applied).
    CheckConfig(ConfigArgs),
    /// Run inside a VM whose GPUs are passed through: sample them with the guest's NVML and
    /// report to the host agent over the virtio-serial channel `org.kycd.telemetry.0`
    /// (libvirt: `<channel type='unix'><target type='virtio' name='org.kycd.telemetry.0'/>
    /// </channel>`). Needs no configuration file, keys or state.
    Guest(GuestArgs),
}

#[derive(Debug, Args)]
pub struct GuestArgs {
    /// The virtio-serial port to write to; a Unix socket path is connected to instead.
    #[arg(long, value_name = "PATH", default_value = crate::gpu::guest::sender::DEFAULT_PORT)]
    pub port: PathBuf,
    /// `libnvidia-ml.so`: a bare name (searched like dlopen does) or a path.
    #[arg(long, value_name = "PATH", default_value = crate::gpu::nvml::DEFAULT_LIBRARY)]
    pub nvml_library: PathBuf,
    /// Replay a recorded trace (`kycctl gpu record`) instead of reading NVML (demos, tests).
    #[arg(long, value_name = "PATH")]
    pub replay_trace: Option<PathBuf>,
    /// A peak-FLOP/s CSV laid over the built-in table (as `gpu.peak_flops_file`).
    #[arg(long, value_name = "PATH")]
    pub peak_flops_file: Option<PathBuf>,
    /// Milliseconds between samples.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Seconds between reports to the host (the host treats a report as current for twice
    /// this, and raises a gap after its `gpu.guest_telemetry_timeout_s`).
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub report_every_s: u64,
    /// Stop after this many reports (default: run until stopped).
    #[arg(long, value_name = "N")]
    pub reports: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Main configuration file; conf.d/*.toml beside it is applied on top.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Override `mode`.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Override `state_dir`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Override `log.format`.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// Lift every block kycd imposed when it stops (`enforcement.release_on_exit`). Without
    /// it, blocks stay in place while the agent is down: fail closed.
    #[arg(long)]
    pub release_on_exit: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Decide and record, enforce nothing.
    Audit,
    /// Decide, record and enforce.
    Enforce,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable.
    Text,
    /// JSON lines.
    Json,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config, config::ConfigError> {
        Ok(config::load(&self.config, &self.overrides())?.config)
    }

    pub fn overrides(&self) -> Overrides {
        Overrides {
            mode: self.mode.map(|m| match m {
                ModeArg::Audit => Mode::Audit,
                ModeArg::Enforce => Mode::Enforce,
            }),
            state_dir: self.state_dir.clone(),
            log_format: self.log_format.map(|f| match f {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            }),
            release_on_exit: self.release_on_exit,
        }
    }
}
