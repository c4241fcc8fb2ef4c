//! One poll's statement: the nonce sent, the agent URL asked, the checks of what comes back
//! ([`verify_statement`]) and the kinds of failure recorded ([`PollErrorKind`]).

use std::net::IpAddr;

use kycd_protocol::{wire, HostStatementClaims, Jwks, VerifyError, VerifyOptions};

use crate::statements::{PollOutcome, PollTarget};

/// Length of the nonce sent with each poll (the agent accepts 16–64).
pub const NONCE_LEN: usize = 32;
/// The URL-safe alphabet of nonces: 64 symbols, so `byte & 63` is unbiased.
const NONCE_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Why an agent URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentUrlError {
    /// Not a URL.
    #[error("{0:?} is not a URL")]
    Invalid(String),
    /// Neither https nor http.
    #[error("agent URLs are https:// (got scheme {0:?})")]
    Scheme(String),
    /// Plaintext where it is not allowed.
    #[error("http:// only for a loopback IP and with insecure plaintext allowed: {0}")]
    Plaintext(String),
    /// User info, a query or a fragment: an agent URL is a base (`https://host:9477`).
    #[error("an agent URL is scheme://host[:port][/path], without credentials, query or fragment: {0}")]
    NotABase(String),
}

/// Checks an agent base URL: `https://…`, or `http://` to a loopback IP when
/// `allow_plaintext` (as the agent allows plaintext only with `insecure_plaintext` on
/// loopback). Returns the parsed URL.
pub fn check_agent_url(url: &str, allow_plaintext: bool) -> Result<reqwest::Url, AgentUrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| AgentUrlError::Invalid(url.to_owned()))?;
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
        || parsed.host().is_none()
    {
        return Err(AgentUrlError::NotABase(url.to_owned()));
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
            if loopback && allow_plaintext {
                Ok(parsed)
            } else {
                Err(AgentUrlError::Plaintext(url.to_owned()))
            }
        }
        other => Err(AgentUrlError::Scheme(other.to_owned())),
    }
}

/// The attestation URL of an agent base URL with `nonce`, and `have` the digest of the body
/// the collector holds from this host's last statement, if any.
pub(super) fn attestation_url(base: &reqwest::Url, nonce: &str, have: Option<&str>) -> reqwest::Url {
    let mut url = base.clone();
    let path = format!("{}{}", base.path().trim_end_matches('/'), wire::agent_api::ATTESTATION);
    url.set_path(&path);
    // The digest-bound form when the agent has it (an older one ignores the parameters and
    // answers the one-part form; [`verify_statement`] takes either).
    let mut query = format!("nonce={nonce}&{}", wire::agent_api::STATEMENT_V2_PARAM);
    if let Some(digest) = have {
        query.push_str(&format!("&{}={digest}", wire::agent_api::STATEMENT_HAVE_PARAM));
    }
    url.set_query(Some(&query));
    url
}

/// A fresh random nonce: [`NONCE_LEN`] characters of `[A-Za-z0-9_-]` from the OS RNG.
pub fn generate_nonce() -> Result<String, rand_core::Error> {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; NONCE_LEN];
    rand_core::OsRng.try_fill_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| char::from(NONCE_ALPHABET[usize::from(b & 63)])).collect())
}

/// What went wrong with a poll, as recorded (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PollErrorKind {
    /// Connection refused, no route, DNS, TLS handshake (untrusted certificate, client
    /// certificate refused).
    Unreachable,
    /// The per-host timeout elapsed.
    Timeout,
    /// An HTTP status other than 200.
    HttpStatus,
    /// The signature does not verify with the enrolled key (or names another key).
    BadSignature,
    /// The statement does not echo the nonce sent.
    NonceMismatch,
    /// The statement's `iss` is not the polled host.
    HostMismatch,
    /// `iat` (or `exp`) too far from the collector's clock.
    ClockSkew,
    /// Not a well-formed statement.
    Malformed,
    /// The body exceeds the cap.
    TooLarge,
    /// The stored agent URL is refused by [`check_agent_url`].
    BadUrl,
    /// A local failure (no randomness for the nonce).
    Internal,
}

impl PollErrorKind {
    /// The recorded name.
    pub fn as_str(self) -> &'static str {
        match self {
            PollErrorKind::Unreachable => "unreachable",
            PollErrorKind::Timeout => "timeout",
            PollErrorKind::HttpStatus => "http_status",
            PollErrorKind::BadSignature => "bad_signature",
            PollErrorKind::NonceMismatch => "nonce_mismatch",
            PollErrorKind::HostMismatch => "host_mismatch",
            PollErrorKind::ClockSkew => "clock_skew",
            PollErrorKind::Malformed => "malformed",
            PollErrorKind::TooLarge => "too_large",
            PollErrorKind::BadUrl => "bad_url",
            PollErrorKind::Internal => "internal",
        }
    }
}

pub(super) fn failed(kind: PollErrorKind, detail: impl Into<String>) -> PollOutcome {
    PollOutcome::Failed { kind: kind.as_str().to_owned(), detail: detail.into() }
}

/// The error and its sources, one line (reqwest's Display alone hides the TLS reason).
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn classify_verify(e: &VerifyError) -> PollErrorKind {
    match e {
        VerifyError::BadSignature(_)
        | VerifyError::UnknownKey(_)
        | VerifyError::AmbiguousKey(_)
        | VerifyError::KeyAlgorithmMismatch { .. } => PollErrorKind::BadSignature,
        VerifyError::Expired { .. }
        | VerifyError::NotYetValid { .. }
        | VerifyError::IssuedInFuture { .. } => PollErrorKind::ClockSkew,
        VerifyError::TooLarge { .. } => PollErrorKind::TooLarge,
        _ => PollErrorKind::Malformed,
    }
}

/// Checks a received statement against what was asked (host, nonce, time `now`).
pub fn verify_statement(
    target: &PollTarget,
    body: &[u8],
    nonce: &str,
    now: i64,
    max_skew_s: u64,
) -> Result<HostStatementClaims, (PollErrorKind, String)> {
    let jwks = Jwks::from_keys([target.public_key.clone()])
        .map_err(|e| (PollErrorKind::Internal, format!("enrolled key unusable: {e}")))?;
    let token = body.trim_ascii();
    let options = VerifyOptions { max_token_bytes: body.len().max(1), clock_skew_s: max_skew_s };
    let verified = if kycd_protocol::is_split_statement(token) {
        kycd_protocol::verify_split_statement(token, &jwks, &options, now)
    } else {
        kycd_protocol::verify::<HostStatementClaims>(token, &jwks, &options, now)
    };
    let claims = verified.map_err(|e| (classify_verify(&e), e.to_string()))?.claims;
    if claims.iss != target.host_id {
        return Err((
            PollErrorKind::HostMismatch,
            format!("statement is from {:?}, polled {:?}", claims.iss, target.host_id),
        ));
    }
    if claims.nonce != nonce {
        return Err((PollErrorKind::NonceMismatch, format!("sent nonce {nonce:?}, got {:?}", claims.nonce)));
    }
    let skew = claims.iat.saturating_sub(now).unsigned_abs();
    if skew > max_skew_s {
        return Err((
            PollErrorKind::ClockSkew,
            format!("iat {} is {skew} s from the collector's clock {now} (max {max_skew_s} s)", claims.iat),
        ));
    }
    Ok(claims)
}

/// The static name of a recorded failure kind (for counting).
pub(super) fn failure_kind_name(kind: &str) -> &'static str {
    [
        PollErrorKind::Unreachable,
        PollErrorKind::Timeout,
        PollErrorKind::HttpStatus,
        PollErrorKind::BadSignature,
        PollErrorKind::NonceMismatch,
        PollErrorKind::HostMismatch,
        PollErrorKind::ClockSkew,
        PollErrorKind::Malformed,
        PollErrorKind::TooLarge,
        PollErrorKind::BadUrl,
    ]
    .into_iter()
    .map(PollErrorKind::as_str)
    .find(|k| *k == kind)
    .unwrap_or("internal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_fresh_url_safe_and_the_right_length() {
        let a = generate_nonce().unwrap();
        let b = generate_nonce().unwrap();
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert_eq!(n.len(), NONCE_LEN);
            assert!(n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'), "{n}");
        }
        // Every symbol of the alphabet shows up: the mapping is not stuck on a subset.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.extend(generate_nonce().unwrap().bytes());
        }
        assert_eq!(seen.len(), 64);
    }

    #[test]
    fn agent_url_rules() {
        assert!(check_agent_url("https://node-1.example:9477", false).is_ok());
        assert!(check_agent_url("https://10.0.0.1:9477/", false).is_ok());
        assert!(check_agent_url("http://127.0.0.1:9477", true).is_ok());
        assert!(check_agent_url("http://[::1]:9477", true).is_ok());
        assert!(check_agent_url("http://127.3.2.1:9477", true).is_ok());
        let plaintext =
            |u: &str, allow| matches!(check_agent_url(u, allow), Err(AgentUrlError::Plaintext(_)));
        assert!(plaintext("http://127.0.0.1:9477", false));
        assert!(plaintext("http://10.0.0.1:9477", true));
        assert!(plaintext("http://localhost:9477", true), "names may resolve anywhere");
        assert!(matches!(check_agent_url("ftp://h", true), Err(AgentUrlError::Scheme(_))));
        assert!(matches!(check_agent_url("not a url", true), Err(AgentUrlError::Invalid(_))));
        for bad in ["https://u:p@h:9477", "https://h:9477/?x=1", "https://h:9477/#f"] {
            assert!(matches!(check_agent_url(bad, false), Err(AgentUrlError::NotABase(_))), "{bad}");
        }
    }

    #[test]
    fn attestation_urls_keep_the_base_path() {
        let base = check_agent_url("https://h:9477", false).unwrap();
        assert_eq!(
            attestation_url(&base, "abc", None).as_str(),
            "https://h:9477/v1/attestation?nonce=abc&v=2"
        );
        assert_eq!(
            attestation_url(&base, "abc", Some("d")).as_str(),
            "https://h:9477/v1/attestation?nonce=abc&v=2&have=d"
        );
        let base = check_agent_url("https://h:9477/agent/", false).unwrap();
        assert_eq!(
            attestation_url(&base, "abc", None).as_str(),
            "https://h:9477/agent/v1/attestation?nonce=abc&v=2"
        );
    }
}
