//! Talking to the running agent over its socket: one request, and the exit code and
//! message a refusal or an unreachable agent fails with.

use std::path::Path;
use std::process::ExitCode;

use super::{fail, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_USAGE};

/// One request to the agent: its JSON answer, or the exit code and message to fail with
/// (3 unreachable, 1 refused).
pub(super) fn agent_request(socket: &Path, method: &str, uri: &str) -> Result<serde_json::Value, ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_USAGE, e))?;
    let timeout = std::time::Duration::from_secs(10);
    let exchange = runtime.block_on(async {
        tokio::time::timeout(timeout, crate::net::operator_api::request(socket, method, uri, None))
            .await
            .unwrap_or(Err(crate::net::operator_api::ClientError::Timeout(timeout)))
    });
    match exchange {
        Err(e) => Err(fail(EXIT_UNREACHABLE, format_args!("{e} (is kycd running?)"))),
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => {
            let why = body["error"].as_str().unwrap_or("no reason given").to_owned();
            Err(fail(EXIT_INVALID, format_args!("the agent refused (HTTP {status}): {why}")))
        }
    }
}
