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
