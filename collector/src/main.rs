//! `kycd-collector`: serve ingest, the policy and the read API; manage hosts and the policy;
//! evaluate findings; export for filings. The commands live in [`kycd_collector::cli`].

use clap::Parser as _;
use kycd_collector::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
    kycd_collector::cli::run(cli)
}
