//! `kycctl`: the operator's command-line tool for kycd. Its commands, and the exit codes
//! scripts depend on, live in [`kycd::cli::kycctl`].

use std::process::ExitCode;

use clap::Parser as _;
use kycd::cli::kycctl::Cli;

fn main() -> ExitCode {
    kycd::cli::kycctl::run(Cli::parse())
}
