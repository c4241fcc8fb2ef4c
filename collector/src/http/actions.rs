//! The finding actions of the API: `POST /v1/findings/{id}/acknowledge`, `…/file` (body
//! `{"reference": "…"}`) and `…/dismiss` (body `{"reason": "…"}`), answering the updated
//! finding.
//!
//! Writes need a bearer token of `serve --write-token-file` (lines `NAME TOKEN`); the
//! token's NAME is the actor the audit log records. Without that file every action is refused
//! (403), loopback clients included: an action must name who took it. Refusals are 401/403
//! JSON errors and a log line; a finding that does not exist is 404, an action its state
//! does not allow 409 (filing a dismissed finding, acknowledging a filed one), a body that is
//! not the action's JSON object 400.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kycd_protocol::clock::{Clock as _, SystemClock};
use serde::Deserialize;

use super::read_api::constant_time_eq;
use super::response::{error, store_error};
use super::ApiState;
use crate::fleet::FindingAction;
use crate::store::StoreError;

/// Largest action body, bytes.
pub const MAX_ACTION_BODY: usize = 4096;

/// Who may act on findings: named bearer tokens.
#[derive(Clone, Default)]
pub struct WriteAccess {
    tokens: Arc<Vec<(String, String)>>,
}

impl std::fmt::Debug for WriteAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("WriteAccess").field("names", &names).finish()
    }
}

/// Why a write token file is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// A line is not `NAME TOKEN`.
    #[error("line {line}: expected `NAME TOKEN` (a name without spaces, then the token)")]
    Malformed {
        /// 1-based line number.
        line: usize,
    },
    /// A token is too short to resist guessing.
    #[error("line {line}: the token of {name:?} must be at least 16 characters")]
    WeakToken {
        /// 1-based line number.
        line: usize,
        /// Its name.
        name: String,
    },
    /// Two lines share a name or a token.
    #[error("line {line}: name or token of {name:?} used twice")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// Its name.
        name: String,
    },
    /// No token at all.
    #[error("no `NAME TOKEN` line")]
    Empty,
}

impl WriteAccess {
    /// No writers: every action is refused.
    pub fn none() -> Self {
        WriteAccess::default()
    }

    /// Parses a token file: one `NAME TOKEN` per line; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut tokens: Vec<(String, String)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            let mut parts = raw.split_whitespace();
            let (Some(name), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(TokenFileError::Malformed { line });
            };
            if name.len() > 128 || name.chars().any(char::is_control) {
                return Err(TokenFileError::Malformed { line });
            }
            if token.len() < 16 {
                return Err(TokenFileError::WeakToken { line, name: name.to_owned() });
            }
            if tokens.iter().any(|(n, t)| n == name || t == token) {
                return Err(TokenFileError::Duplicate { line, name: name.to_owned() });
            }
            tokens.push((name.to_owned(), token.to_owned()));
        }
        if tokens.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(WriteAccess { tokens: Arc::new(tokens) })
    }

    /// The name of the writer presenting `presented`, comparing every token in constant time.
    pub(super) fn writer(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for (name, token) in self.tokens.iter() {
            if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    reference: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DismissBody {
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

fn parse_action(action: &str, body: &[u8]) -> Result<FindingAction, String> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    let json = |e: serde_json::Error| format!("body is not the {action} action's JSON object: {e}");
    match action {
        "acknowledge" => {
            serde_json::from_slice::<EmptyBody>(body).map(|_| FindingAction::Acknowledge).map_err(json)
        }
        "file" => serde_json::from_slice::<FileBody>(body)
            .map(|b| FindingAction::File { reference: b.reference })
            .map_err(json),
        "dismiss" => serde_json::from_slice::<DismissBody>(body)
            .map(|b| FindingAction::Dismiss { reason: b.reason })
            .map_err(json),
        other => Err(format!("unknown action {other:?} (acknowledge, file, dismiss)")),
    }
}

pub(super) async fn act(
    State(state): State<ApiState>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if state.writers.tokens.is_empty() {
        tracing::warn!(id, action, "finding action refused: no --write-token-file configured");
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "finding actions need a write token (serve --write-token-file)",
        );
    }
    let Some(actor) = presented.and_then(|p| state.writers.writer(p)).map(str::to_owned) else {
        tracing::warn!(id, action, "finding action refused: missing or wrong write token");
        let mut r = error(StatusCode::UNAUTHORIZED, "Unauthorized", "a valid write token is required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    if body.len() > MAX_ACTION_BODY {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "TooLarge",
            format!("body over {MAX_ACTION_BODY} bytes"),
        );
    }
    let action = match parse_action(&action, &body) {
        Ok(action) => action,
        Err(message) => {
            tracing::warn!(id, %actor, error = %message, "finding action refused");
            return error(StatusCode::BAD_REQUEST, "BadRequest", message);
        }
    };
    let store = Arc::clone(&state.store);
    let taken = action.clone();
    let who = actor.clone();
    let result =
        tokio::task::spawn_blocking(move || store.act_on_finding(id, &taken, &who, SystemClock.unix_now()))
            .await;
    match result {
        Ok(Ok(finding)) => {
            tracing::info!(id, action = action.name(), %actor, state = finding.state.as_str(), "finding action taken");
            Json(finding).into_response()
        }
        Ok(Err(e @ StoreError::FindingNotFound(_))) => error(StatusCode::NOT_FOUND, "NotFound", e),
        Ok(Err(e @ StoreError::InvalidTransition { .. })) => error(StatusCode::CONFLICT, "Conflict", e),
        Ok(Err(e @ StoreError::InvalidAction(_))) => error(StatusCode::BAD_REQUEST, "BadRequest", e),
        Ok(Err(e)) => store_error(&e).into_response(),
        Err(join) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", format!("action task failed: {join}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_and_bodies() {
        let w = WriteAccess::parse("# filers\nalice 0123456789abcdef\n\nbob   fedcba9876543210\n").unwrap();
        assert_eq!(
            (w.writer("0123456789abcdef"), w.writer("fedcba9876543210")),
            (Some("alice"), Some("bob"))
        );
        assert_eq!(w.writer("0123456789abcdeX"), None);
        assert!(matches!(WriteAccess::parse("alice short"), Err(TokenFileError::WeakToken { line: 1, .. })));
        assert!(matches!(WriteAccess::parse("alice"), Err(TokenFileError::Malformed { line: 1 })));
        assert!(matches!(
            WriteAccess::parse("a 0123456789abcdef\na 1123456789abcdef"),
            Err(TokenFileError::Duplicate { line: 2, .. })
        ));
        assert!(matches!(WriteAccess::parse("# none\n"), Err(TokenFileError::Empty)));
        assert_eq!(parse_action("acknowledge", b"").unwrap(), FindingAction::Acknowledge);
        assert_eq!(
            parse_action("file", br#"{"reference": "BIS-7"}"#).unwrap(),
            FindingAction::File { reference: "BIS-7".into() }
        );
        assert!(parse_action("file", b"{}").is_err());
        assert!(parse_action("dismiss", br#"{"reason": "x", "by": "mallory"}"#).is_err());
        assert!(parse_action("delete", b"").is_err());
    }
}
