//! `kycd`: the host agent. Its daemon (`kycd run`) arrives with the agent-core work; for now
//! the binary carries the version and help so packaging and scripts can rely on its name.

use clap::Parser;

/// kycd host agent: enforces verified-identity attestations against a signed jurisdiction
/// policy on a GPU host, and reports training-scale usage.
#[derive(Debug, Parser)]
#[command(name = "kycd", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("kycd: the daemon is not built yet; see `kycctl --help` for key and token tooling");
    std::process::exit(2);
}
