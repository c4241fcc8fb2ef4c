//! Key and token tooling behind `kycctl keygen`, `kycctl sign` and `kycctl verify`.
//!
//! Operators and test scripts drive these commands, so their file formats and failure modes
//! are part of the interface: private keys are written 0600 atomically and never overwritten,
//! and `sign` refuses to emit a token that kycd itself would not accept.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kycd_protocol::{
    sign_payload, verify, AttestationClaims, HostStatementClaims, Jwks, KeyError, PolicyClaims, PrivateJwk,
    TokenClaims, TokenType, VerifyError, VerifyOptions,
};
use serde_json::Value;

/// Failures of the key/token tooling that are not a verdict on a token.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key or key set could not be used.
    #[error("{path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// The claims file is not a JSON object.
    #[error("{path}: claims must be a JSON object: {reason}")]
    Claims {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file that keygen would write exists already.
    #[error("{0}: already exists; refusing to overwrite a key (remove it first)")]
    Exists(PathBuf),
    /// The key id cannot be used as a file name.
    #[error("kid {0:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'")]
    BadKid(String),
}

/// Which token type a command works on; the CLI's `--typ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typ {
    /// `kyc-attestation+jwt`.
    Attestation,
    /// `kyc-policy+jwt`.
    Policy,
    /// `kyc-host-statement+jwt`.
    HostStatement,
}

impl Typ {
    fn token_type(self) -> TokenType {
        match self {
            Typ::Attestation => TokenType::Attestation,
            Typ::Policy => TokenType::Policy,
            Typ::HostStatement => TokenType::HostStatement,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ToolError + '_ {
    move |source| ToolError::Io { path: path.to_owned(), source }
}

/// Reads at most `limit` bytes plus one from `path` (`-` = stdin), so an oversized input is
/// seen as oversized without being read whole.
pub fn read_bounded(path: &Path, limit: usize) -> Result<Vec<u8>, ToolError> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut buf = Vec::new();
    if path == Path::new("-") {
        io::stdin().lock().take(cap).read_to_end(&mut buf).map_err(io_err(path))?;
    } else {
        File::open(path).map_err(io_err(path))?.take(cap).read_to_end(&mut buf).map_err(io_err(path))?;
    }
    Ok(buf)
}

/// A token file may end with one newline (editors and `echo` add it); the token itself may
/// not contain whitespace, so exactly one trailing `\n` or `\r\n` is removed here and
/// nothing else.
pub fn strip_one_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    bytes
}

/// Loads a JWKS trust file.
pub fn load_jwks(path: &Path) -> Result<Jwks, ToolError> {
    let bytes = read_bounded(path, 1 << 20)?;
    Jwks::from_json(&bytes).map_err(|source| ToolError::Key { path: path.to_owned(), source })
}

/// Loads a private JWK.
pub fn load_private_key(path: &Path) -> Result<PrivateJwk, ToolError> {
    let bytes = zeroize::Zeroizing::new(read_bounded(path, 64 * 1024)?);
    PrivateJwk::from_json(&bytes).map_err(|source| ToolError::Key { path: path.to_owned(), source })
}

/// The files `keygen` wrote.
#[derive(Debug)]
pub struct GeneratedKey {
    /// `DIR/KID.private.jwk`, mode 0600.
    pub private_jwk: PathBuf,
    /// `DIR/KID.jwks`, the public key set.
    pub jwks: PathBuf,
}

fn check_kid_as_file_name(kid: &str) -> Result<(), ToolError> {
    let ok = !kid.is_empty()
        && kid.len() <= 64
        && !kid.starts_with('.')
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ToolError::BadKid(kid.to_owned()))
    }
}

/// Writes a new file durably, never replacing an existing one (see [`crate::fsutil`]).
fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), ToolError> {
    crate::fsutil::write_durably(path, contents, crate::fsutil::Existing::Keep).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            ToolError::Exists(path.to_owned())
        } else {
            ToolError::Io { path: path.to_owned(), source: e }
        }
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ToolError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// `kycctl keygen`: a new key pair as `DIR/KID.private.jwk` (0600) and `DIR/KID.jwks`.
pub fn keygen(alg: kycd_protocol::Algorithm, kid: &str, dir: &Path) -> Result<GeneratedKey, ToolError> {
    check_kid_as_file_name(kid)?;
    let key =
        PrivateJwk::generate(alg, kid).map_err(|source| ToolError::Key { path: dir.to_owned(), source })?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let private_jwk = dir.join(format!("{kid}.private.jwk"));
    let jwks = dir.join(format!("{kid}.jwks"));
    for p in [&private_jwk, &jwks] {
        if p.exists() {
            return Err(ToolError::Exists(p.clone()));
        }
    }
    let mut secret = key.to_json();
    secret.push('\n');
    write_new_file(&private_jwk, secret.as_bytes())?;
    let public = Jwks::from_keys([key.public_key()])
        .map_err(|source| ToolError::Key { path: jwks.clone(), source })?;
    let mut doc = serde_json::to_string_pretty(&public.to_json()).unwrap_or_default();
    doc.push('\n');
    write_new_file(&jwks, doc.as_bytes())?;
    set_mode(&jwks, 0o644)?;
    Ok(GeneratedKey { private_jwk, jwks })
}

/// Outcome of `kycctl sign`.
#[derive(Debug)]
pub enum SignOutcome {
    /// The compact token.
    Token(String),
    /// The claims would not verify; nothing was emitted.
    Refused(VerifyError),
}

/// `kycctl sign`: signs a claims object as a token of `typ`, filling `iat` with `now` if
/// absent, and refuses (without emitting anything) if kycd would not accept the result when
/// verified at `valid_at` with the same key.
pub fn sign_claims(
    key: &PrivateJwk,
    typ: Typ,
    claims_path: &Path,
    now: i64,
    valid_at: i64,
) -> Result<SignOutcome, ToolError> {
    let bytes = read_bounded(claims_path, kycd_protocol::DEFAULT_MAX_TOKEN_BYTES)?;
    let claims_err = |reason: String| ToolError::Claims { path: claims_path.to_owned(), reason };
    let mut claims = kycd_protocol::json::parse_strict(&bytes).map_err(|e| claims_err(e.to_string()))?;
    let Value::Object(fields) = &mut claims else {
        return Err(claims_err("found another JSON type".into()));
    };
    fields.entry("iat").or_insert_with(|| Value::from(now));
    let payload = claims.to_string();
    let token = sign_payload(payload.as_bytes(), typ.token_type().typ(), key);
    let jwks = Jwks::from_keys([key.public_key()])
        .map_err(|source| ToolError::Key { path: claims_path.to_owned(), source })?;
    match verify_token(token.as_bytes(), &jwks, typ, &VerifyOptions::default(), valid_at) {
        Ok(_) => Ok(SignOutcome::Token(token)),
        Err(e) => Ok(SignOutcome::Refused(e)),
    }
}

fn verified_json<C: TokenClaims + serde::Serialize>(
    token: &[u8],
    jwks: &Jwks,
    options: &VerifyOptions,
    now: i64,
) -> Result<Value, VerifyError> {
    let verified = verify::<C>(token, jwks, options, now)?;
    serde_json::to_value(&verified.claims)
        .map_err(|e| VerifyError::Malformed(format!("verified claims do not serialize: {e}")))
}

/// Verifies `token` as `typ` and returns its typed claims re-serialized as JSON (so what is
/// printed is what kycd understood, not the raw payload).
pub fn verify_token(
    token: &[u8],
    jwks: &Jwks,
    typ: Typ,
    options: &VerifyOptions,
    now: i64,
) -> Result<Value, VerifyError> {
    match typ {
        Typ::Attestation => verified_json::<AttestationClaims>(token, jwks, options, now),
        Typ::Policy => verified_json::<PolicyClaims>(token, jwks, options, now),
        Typ::HostStatement => verified_json::<HostStatementClaims>(token, jwks, options, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn keygen_writes_0600_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = keygen(kycd_protocol::Algorithm::ES256, "issuer-1", dir.path()).unwrap();
        let mode = fs::metadata(&out.private_jwk).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = load_private_key(&out.private_jwk).unwrap();
        let jwks = load_jwks(&out.jwks).unwrap();
        assert_eq!(jwks.keys()[0].to_jwk(), key.public_key().to_jwk());
        let again = keygen(kycd_protocol::Algorithm::ES256, "issuer-1", dir.path()).unwrap_err();
        assert!(matches!(again, ToolError::Exists(_)), "{again}");
        // The original key is untouched.
        assert_eq!(
            load_private_key(&out.private_jwk).unwrap().public_key().to_jwk(),
            key.public_key().to_jwk()
        );
    }

    #[test]
    fn kids_that_are_not_safe_file_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for kid in ["", "../x", "a/b", ".hidden", "sp ace", &"k".repeat(65)] {
            let err = keygen(kycd_protocol::Algorithm::EdDSA, kid, dir.path()).unwrap_err();
            assert!(matches!(err, ToolError::BadKid(_)), "{kid:?}: {err}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn strip_one_newline_only() {
        assert_eq!(strip_one_newline(b"a.b.c\n".to_vec()), b"a.b.c");
        assert_eq!(strip_one_newline(b"a.b.c\r\n".to_vec()), b"a.b.c");
        assert_eq!(strip_one_newline(b"a.b.c\n\n".to_vec()), b"a.b.c\n");
        assert_eq!(strip_one_newline(b"a.b.c ".to_vec()), b"a.b.c ");
    }
}
