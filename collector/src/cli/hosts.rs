//! `kycd-collector hosts …`: enroll, list and remove hosts, set the agent URL they are
//! polled at.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use kycd_protocol::clock::unix_now;

use super::database::{open, DEFAULT_DB};
use crate::hosts::parse_host_key;
use crate::store::Storage;

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Enroll a host with its public Ed25519 JWK (as `kycctl host-key --public` prints it).
    /// A key the host id never had starts a new enrollment epoch (a re-imaged host's agent
    /// numbers its reports from 1 again); re-adding a key it had continues that key's epoch.
    Add {
        /// Host id (must equal the JWK's kid).
        #[arg(long)]
        host_id: String,
        /// File with the public JWK.
        #[arg(long)]
        public_jwk: PathBuf,
        /// Base URL of the host's agent collector API (e.g. https://node-1:9477), to poll it.
        #[arg(long)]
        agent_url: Option<String>,
        /// The site the host stands in (with --fabric): its concurrent capacity counts toward
        /// the co-located cluster (site, fabric) besides the fleet-wide figure.
        #[arg(long, requires = "fabric")]
        site: Option<String>,
        /// The network fabric joining it to the site's other hosts (with --site).
        #[arg(long, requires = "site")]
        fabric: Option<String>,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Set or clear the agent URL the collector polls a host at.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["url", "clear"])))]
    SetAgentUrl {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Base URL of the agent's collector API (https://…; http:// only to a loopback IP).
        #[arg(long)]
        url: Option<String>,
        /// Stop polling the host.
        #[arg(long)]
        clear: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Place an enrolled host in a site and network fabric (hosts of one site and fabric
    /// form one co-located cluster), or --unplace it.
    Place {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Site.
        #[arg(long, required_unless_present = "unplace", requires = "fabric")]
        site: Option<String>,
        /// Network fabric within the site.
        #[arg(long, required_unless_present = "unplace", requires = "site")]
        fabric: Option<String>,
        /// Remove the placement (the host then counts with the other unplaced hosts).
        #[arg(long, conflicts_with_all = ["site", "fabric"])]
        unplace: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List enrolled hosts (with placement, agent URL and last poll status).
    List {
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Remove a host's enrollment (its stored records and enrollment history are kept; a later
    /// `hosts add` with a new key starts the next epoch).
    Remove {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

fn set_agent_url(store: &dyn Storage, host_id: &str, url: Option<&str>) -> anyhow::Result<()> {
    if let Some(url) = url {
        // Plaintext to loopback is stored; whether it is polled is serve's
        // --poll-insecure-plaintext.
        crate::poll::check_agent_url(url, true)?;
    }
    if !store.set_agent_url(host_id, url)? {
        bail!("host {host_id:?} is not enrolled");
    }
    Ok(())
}

/// Runs a `hosts` command.
pub fn run(command: HostsCommand) -> anyhow::Result<()> {
    match command {
        HostsCommand::Add { host_id, public_jwk, agent_url, site, fabric, db } => {
            let placement = match (&site, &fabric) {
                (Some(site), Some(fabric)) => Some(crate::hosts::parse_placement(site, fabric)?),
                _ => None,
            };
            let bytes =
                std::fs::read(&public_jwk).with_context(|| format!("reading {}", public_jwk.display()))?;
            let key =
                parse_host_key(&host_id, &bytes).with_context(|| format!("{}", public_jwk.display()))?;
            if let Some(url) = &agent_url {
                crate::poll::check_agent_url(url, true)?;
            }
            let store = open(&db, true)?;
            let epoch = store.enroll_host(&host_id, &key, unix_now())?;
            if let Some(url) = &agent_url {
                set_agent_url(store.as_ref(), &host_id, Some(url))?;
            }
            if let Some(placement) = &placement {
                store.set_host_placement(&host_id, Some(placement), unix_now())?;
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
        HostsCommand::Place { host_id, site, fabric, unplace, db } => {
            let placement = match (site, fabric) {
                (Some(site), Some(fabric)) if !unplace => {
                    Some(crate::hosts::parse_placement(&site, &fabric)?)
                }
                _ => None,
            };
            if !open(&db, false)?.set_host_placement(&host_id, placement.as_ref(), unix_now())? {
                bail!("host {host_id:?} is not enrolled");
            }
            match placement {
                Some(p) => println!("{host_id}: site {} fabric {}", p.site, p.fabric),
                None => println!("{host_id}: unplaced"),
            }
        }
        HostsCommand::List { db } => {
            let store = open(&db, false)?;
            let placements: std::collections::HashMap<String, crate::fleet::Placement> =
                store.host_placements()?.into_iter().collect();
            let urls: std::collections::HashMap<String, String> = store.agent_urls()?.into_iter().collect();
            let status: std::collections::HashMap<String, crate::statements::HostPollStatus> =
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
                let placed = placements
                    .get(&host.host_id)
                    .map_or_else(|| "unplaced".to_owned(), |p| format!("{}/{}", p.site, p.fabric));
                println!(
                    "{}\t{}\tepoch={}\tacked_seq={}\tplacement={placed}\tagent_url={url}\t{poll}\t{}",
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
