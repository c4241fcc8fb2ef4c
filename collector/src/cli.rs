//! The command line of `kycd-collector`, in the library so that man pages and shell
//! completions are generated from the same definitions the binary parses with.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the database lives unless `--db` says otherwise.
pub const DEFAULT_DB: &str = "sqlite:///var/lib/kycd-collector/kycd.db";

#[derive(Debug, Parser)]
#[command(name = "kycd-collector", version, about = "kycd collector: ingest of signed host usage reports")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /v1/reports and GET /healthz.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9478")]
        listen: SocketAddr,
        /// Database URL (sqlite:///path, or a plain path).
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Manage enrolled hosts.
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Enroll a host with its public Ed25519 JWK (as `kycctl host-key --public` prints it).
    Add {
        /// Host id (must equal the JWK's kid).
        #[arg(long)]
        host_id: String,
        /// File with the public JWK.
        #[arg(long)]
        public_jwk: PathBuf,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List enrolled hosts.
    List {
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Remove a host's enrollment (its stored records are kept).
    Remove {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}
