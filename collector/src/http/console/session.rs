//! How a browser authenticates to the console: a login form takes a token (the read token,
//! or a named write token), and the collector answers with a session cookie.
//!
//! - The cookie (`kycd_session`) is `HttpOnly` (no script reads it), `SameSite=Strict` (no
//!   other site's page sends it) and `Path=/`; it is `Secure` when the request came over
//!   TLS, i.e. through a TLS-terminating proxy that says so (`X-Forwarded-Proto: https`; the
//!   collector itself speaks plain HTTP). It holds 32 random bytes; the collector keeps only
//!   their SHA-256, in memory: a restart logs everyone out, and nothing on disk can be
//!   replayed.
//! - Each session has its own CSRF token, put in every form as a hidden field and checked
//!   (in constant time) on every POST, beside an `Origin` that must name this host when the
//!   browser sends one.
//! - A session made with a write token acts on findings under that token's NAME (the actor
//!   the audit log records), exactly like the API's bearer token; a session made with the
//!   read token only reads.
//! - Sessions last [`SESSION_TTL_S`]; at most [`MAX_SESSIONS`] are kept (the oldest goes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap, HeaderValue};
use kycd_protocol::clock::{Clock as _, SystemClock};
use sha2::{Digest as _, Sha256};

use crate::http::read_api::constant_time_eq;

/// The session cookie's name.
pub const COOKIE: &str = "kycd_session";
/// How long a session lasts, seconds (a working day).
pub const SESSION_TTL_S: i64 = 12 * 3600;
/// Sessions kept at most; past it the one expiring first is dropped.
pub const MAX_SESSIONS: usize = 1024;

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The CSRF token of its forms.
    pub csrf: String,
    /// The write token's name, when it logged in with one; none: read only.
    pub writer: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// The console's sessions, by SHA-256 of the cookie value.
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<[u8; 32], Session>>>,
}

/// Why a session could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no randomness for a session: {0}")]
pub struct SessionError(String);

fn random_hex() -> Result<String, SessionError> {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.try_fill_bytes(&mut bytes).map_err(|e| SessionError(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn key(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    /// Opens a session (read only unless `writer`); returns the cookie value and the session.
    pub fn open(&self, writer: Option<String>) -> Result<(String, Session), SessionError> {
        let now = SystemClock.unix_now();
        let cookie = random_hex()?;
        let session = Session { csrf: random_hex()?, writer, expires_at: now + SESSION_TTL_S };
        let mut map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, s| s.expires_at > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires_at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(key(&cookie), session.clone());
        Ok((cookie, session))
    }

    /// The live session the request's cookie names.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let cookie = cookie_value(headers)?;
        let now = SystemClock.unix_now();
        let map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&key(&cookie)).filter(|s| s.expires_at > now).cloned()
    }

    /// Ends the request's session, if any.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(cookie) = cookie_value(headers) {
            self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key(&cookie));
        }
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Whether the request reached the collector over TLS (through a proxy that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` of a new session (`value`), or of its removal (none).
pub fn set_cookie(headers: &HeaderMap, value: Option<&str>) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    let text = match value {
        Some(v) => {
            format!("{COOKIE}={v}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL_S}{secure}")
        }
        None => format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"),
    };
    // Only hex digits and fixed text: always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("kycd_session=; Max-Age=0"))
}

/// Whether a form's CSRF token is the session's.
pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), session.csrf.as_bytes()))
}

/// Whether the request's `Origin`, when the browser sent one, is this host: a form posted
/// from another site is refused even before its CSRF token is looked at.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    !host.is_empty() && origin_host == host
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("a=b; {COOKIE}={value}")).unwrap());
        h
    }

    #[test]
    fn sessions_open_find_and_close() {
        let sessions = Sessions::default();
        let (cookie, session) = sessions.open(Some("alice".into())).unwrap();
        assert_eq!(cookie.len(), 64);
        let found = sessions.find(&with_cookie(&cookie)).unwrap();
        assert_eq!((found.writer.as_deref(), found.csrf.as_str()), (Some("alice"), session.csrf.as_str()));
        assert!(sessions.find(&with_cookie("0".repeat(64).as_str())).is_none());
        assert!(
            csrf_ok(&found, Some(&session.csrf)) && !csrf_ok(&found, None) && !csrf_ok(&found, Some("x"))
        );
        sessions.close(&with_cookie(&cookie));
        assert!(sessions.find(&with_cookie(&cookie)).is_none());
        for _ in 0..MAX_SESSIONS + 5 {
            sessions.open(None).unwrap();
        }
        assert_eq!(sessions.inner.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies_and_origins() {
        let mut h = HeaderMap::new();
        let plain = set_cookie(&h, Some("ab")).to_str().unwrap().to_owned();
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict") && !plain.contains("Secure"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(set_cookie(&h, Some("ab")).to_str().unwrap().ends_with("; Secure"));
        h.insert(header::HOST, HeaderValue::from_static("collector:8443"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://collector:8443"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!same_origin(&h));
    }
}
