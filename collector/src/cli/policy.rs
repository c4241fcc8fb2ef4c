//! `kycd-collector policy …`: publish and show the signed policy agents fetch.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Verify a signed policy (compact JWS) against trust anchors and make it the published
    /// policy; refused unless its version is higher than the published one.
    Publish {
        /// The policy token file.
        file: PathBuf,
        /// JWKS file with the policy signer's public keys.
        #[arg(long, value_name = "JWKS")]
        trust: PathBuf,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Print the published policy's version, publication time, ETag and claims.
    Show {
        /// Print the token itself instead.
        #[arg(long)]
        token: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Runs a `policy` command.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Publish { file, trust, db } => {
            let token =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let jwks = std::fs::read(&trust).with_context(|| format!("reading {}", trust.display()))?;
            let jwks =
                kycd_protocol::Jwks::from_json(&jwks).with_context(|| format!("{}", trust.display()))?;
            let store = open(&db, true)?;
            let published = crate::policy::publish(store.as_ref(), &token, &jwks, unix_now())
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
                println!("published_at {}", crate::export::rfc3339(policy.published_at));
                println!("etag {}", policy.etag());
                println!("{}", serde_json::to_string_pretty(&policy.claims)?);
            }
        }
    }
    Ok(())
}
