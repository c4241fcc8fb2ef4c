//! `kycctl keygen`, `sign` and `verify`: signing keys and signed tokens, offline.

use std::path::Path;
use std::process::ExitCode;

use kycd_protocol::{Algorithm, VerifyOptions};

use super::{fail, KeyAlg, TokenTyp, EXIT_INVALID, EXIT_USAGE};
use crate::tokens::{self, SignOutcome};

/// `kycctl keygen`: prints the private JWK's and the JWKS's paths.
pub(super) fn keygen(alg: KeyAlg, kid: &str, out: &Path) -> ExitCode {
    let alg = match alg {
        KeyAlg::Ed25519 => Algorithm::EdDSA,
        KeyAlg::Es256 => Algorithm::ES256,
    };
    match tokens::keygen(alg, kid, out) {
        Ok(files) => {
            println!("{}", files.private_jwk.display());
            println!("{}", files.jwks.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}

/// `kycctl sign`: the token on stdout, or why the claims would not verify.
pub(super) fn sign(key: &Path, typ: TokenTyp, valid_at: Option<i64>, claims: &Path) -> ExitCode {
    let key = match tokens::load_private_key(key) {
        Ok(k) => k,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let now = kycd_protocol::clock::unix_now();
    match tokens::sign_claims(&key, typ.into(), claims, now, valid_at.unwrap_or(now)) {
        Ok(SignOutcome::Token(token)) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Ok(SignOutcome::Refused(e)) => {
            fail(EXIT_INVALID, format_args!("{}: {e} (claims would not verify; nothing signed)", e.kind()))
        }
        Err(e) => fail(EXIT_USAGE, e),
    }
}

/// `kycctl verify`'s arguments.
#[derive(Debug)]
pub(super) struct VerifyArgs<'a> {
    pub(super) jwks: &'a Path,
    pub(super) typ: TokenTyp,
    pub(super) at: Option<i64>,
    pub(super) skew: u64,
    pub(super) max_bytes: usize,
    pub(super) token: &'a Path,
}

/// `kycctl verify`: the claims as JSON on stdout, or the error kind and why.
pub(super) fn verify(args: VerifyArgs<'_>) -> ExitCode {
    let VerifyArgs { jwks, typ, at, skew, max_bytes, token } = args;
    let jwks = match tokens::load_jwks(jwks) {
        Ok(j) => j,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let bytes = match tokens::read_bounded(token, max_bytes.saturating_add(2)) {
        Ok(b) => tokens::strip_one_newline(b),
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let options = VerifyOptions { max_token_bytes: max_bytes, clock_skew_s: skew };
    match tokens::verify_token(
        &bytes,
        &jwks,
        typ.into(),
        &options,
        at.unwrap_or_else(kycd_protocol::clock::unix_now),
    ) {
        Ok(claims) => {
            println!("{}", serde_json::to_string_pretty(&claims).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_INVALID, format_args!("{}: {e}", e.kind())),
    }
}
