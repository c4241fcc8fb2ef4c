//! `kycctl host-id`, `host-key --public` and `spool`: this host's identity and usage
//! spool, read from the agent's configuration and state directory (no agent needed).

use std::path::Path;
use std::process::ExitCode;

use super::{fail, EXIT_USAGE};

/// `kycctl host-id` and `kycctl host-key --public`.
pub(super) fn host_identity(config: &Path, key: bool) -> ExitCode {
    let config = match crate::config::load(config, &crate::config::Overrides::default()) {
        Ok(loaded) => loaded.config,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let host_id = match crate::host::host_id(&config) {
        Ok(id) => id,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if !key {
        println!("{host_id}");
        return ExitCode::SUCCESS;
    }
    match crate::host::load_or_create_host_key(&crate::host::host_key_path(&config.state_dir), &host_id) {
        Ok(k) => {
            println!("{}", k.public_key().to_jwk());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}

/// `kycctl spool`: the usage spool as JSON (read-only, safe while kycd runs).
pub(super) fn spool(config: &Path) -> ExitCode {
    let config = match crate::config::load(config, &crate::config::Overrides::default()) {
        Ok(loaded) => loaded.config,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    match crate::reporting::spool::inspect(&config.state_dir.join("spool")) {
        Ok(i) => {
            println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}
