//! The error taxonomy of token verification and key handling.
//!
//! [`VerifyError`] is what every consumer of a signed token sees. Its [`VerifyError::kind`] is
//! a stable machine name (logged, counted, printed by `kycctl verify` as
//! `error: <kind>: <detail>`, and named by the bad-input corpus); its `Display` says exactly
//! what was wrong, without echoing attacker-controlled bytes at length.

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Larger than the configured cap; checked before any decoding.
    #[error("{part} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// `token` or `header`.
        part: &'static str,
        /// Size seen.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// Not a compact JWS of three strict-base64url segments carrying strict JSON.
    #[error("{0}")]
    Malformed(String),
    /// `alg` is anything but `EdDSA` or `ES256` (`none`, `HS256`, `RS256`, …).
    #[error("algorithm {0:?} is not accepted (only EdDSA and ES256 are)")]
    UnsupportedAlgorithm(String),
    /// A header parameter kycd refuses: `crit`, `b64`, or one that embeds or points at a key
    /// (`jwk`, `jku`, `x5u`, `x5c`). Keys come from the local trust store only.
    #[error("header parameter {0:?} is not accepted")]
    ForbiddenHeader(String),
    /// A required header parameter (`alg`, `kid`, `typ`) is absent.
    #[error("header parameter {0:?} is required")]
    MissingHeader(&'static str),
    /// `kid` names no key in the trusted set.
    #[error("no trusted key has kid {0:?}")]
    UnknownKey(String),
    /// `kid` names more than one key; a trust set must name each key once.
    #[error("kid {0:?} names more than one trusted key")]
    AmbiguousKey(String),
    /// `alg` does not fit the named key's type/curve (or the key's own `alg`).
    #[error("token alg {alg} cannot be used with key {kid:?} ({key})")]
    KeyAlgorithmMismatch {
        /// Key id.
        kid: String,
        /// The key's type, e.g. `OKP/Ed25519`.
        key: &'static str,
        /// The token's `alg`.
        alg: String,
    },
    /// The signature is not valid for this key and signing input.
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
    /// `typ` is not the type this verifier expects.
    #[error("typ is {found:?}, expected {expected:?}")]
    WrongType {
        /// Expected `typ`.
        expected: &'static str,
        /// `typ` found.
        found: String,
    },
    /// `exp` is in the past beyond the allowed skew.
    #[error("expired at {exp} (now {now}, allowed skew {skew_s} s)")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's clock.
        now: i64,
        /// Skew allowed.
        skew_s: u64,
    },
    /// `nbf` is in the future beyond the allowed skew.
    #[error("not valid before {nbf} (now {now}, allowed skew {skew_s} s)")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's clock.
        now: i64,
        /// Skew allowed.
        skew_s: u64,
    },
    /// `iat` is in the future beyond the allowed skew.
    #[error("issued at {iat}, in the future (now {now}, allowed skew {skew_s} s)")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The verifier's clock.
        now: i64,
        /// Skew allowed.
        skew_s: u64,
    },
    /// A claim the token type requires is absent.
    #[error("required claim {0:?} is missing")]
    MissingClaim(String),
    /// A claim is present but has the wrong type or an unacceptable value.
    #[error("claim {claim}: {reason}")]
    InvalidClaim {
        /// Path of the claim, e.g. `subject.countries[1]`.
        claim: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl VerifyError {
    /// Stable machine name of the error kind (the variant name).
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "TooLarge",
            VerifyError::Malformed(_) => "Malformed",
            VerifyError::UnsupportedAlgorithm(_) => "UnsupportedAlgorithm",
            VerifyError::ForbiddenHeader(_) => "ForbiddenHeader",
            VerifyError::MissingHeader(_) => "MissingHeader",
            VerifyError::UnknownKey(_) => "UnknownKey",
            VerifyError::AmbiguousKey(_) => "AmbiguousKey",
            VerifyError::KeyAlgorithmMismatch { .. } => "KeyAlgorithmMismatch",
            VerifyError::BadSignature(_) => "BadSignature",
            VerifyError::WrongType { .. } => "WrongType",
            VerifyError::Expired { .. } => "Expired",
            VerifyError::NotYetValid { .. } => "NotYetValid",
            VerifyError::IssuedInFuture { .. } => "IssuedInFuture",
            VerifyError::MissingClaim(_) => "MissingClaim",
            VerifyError::InvalidClaim { .. } => "InvalidClaim",
        }
    }

    pub(crate) fn invalid(claim: impl Into<String>, reason: impl Into<String>) -> Self {
        VerifyError::InvalidClaim { claim: claim.into(), reason: reason.into() }
    }
}

/// Why a JWK or JWKS (trust file, private key file) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not strict JSON, or not the JWK/JWKS shape.
    #[error("not a valid JWK/JWKS document: {0}")]
    Malformed(String),
    /// A key lacks `kid`; kycd resolves keys by `kid` only.
    #[error("key #{0} has no \"kid\"")]
    MissingKid(usize),
    /// Two keys share a `kid`.
    #[error("kid {0:?} appears more than once")]
    DuplicateKid(String),
    /// Key type/curve other than OKP/Ed25519 and EC/P-256.
    #[error("key {kid:?}: unsupported key type {kty}/{crv} (only OKP/Ed25519 and EC/P-256)")]
    Unsupported {
        /// Key id.
        kid: String,
        /// `kty` found.
        kty: String,
        /// `crv` found (empty if none).
        crv: String,
    },
    /// Key material is not a valid point/scalar, or the parts are inconsistent.
    #[error("key {kid:?}: {reason}")]
    InvalidKey {
        /// Key id.
        kid: String,
        /// What is wrong.
        reason: String,
    },
    /// An Ed25519 public key of small order, which would accept forged signatures.
    #[error("key {0:?} is a small-order (weak) Ed25519 point")]
    WeakKey(String),
    /// Private material (`d`) in what must be a public key set.
    #[error("key {0:?} carries private key material (\"d\"); trust files hold public keys only")]
    PrivateMaterial(String),
    /// A private key was expected but `d` is absent.
    #[error("key {0:?} has no private part (\"d\")")]
    NotPrivate(String),
    /// `use` / `key_ops` / `alg` on the key forbid verification with it.
    #[error("key {kid:?}: {reason}")]
    Restricted {
        /// Key id.
        kid: String,
        /// What restricts it.
        reason: String,
    },
}

impl KeyError {
    /// Stable machine name of the error kind (the variant name).
    pub fn kind(&self) -> &'static str {
        match self {
            KeyError::Malformed(_) => "Malformed",
            KeyError::MissingKid(_) => "MissingKid",
            KeyError::DuplicateKid(_) => "DuplicateKid",
            KeyError::Unsupported { .. } => "UnsupportedKey",
            KeyError::InvalidKey { .. } => "InvalidKey",
            KeyError::WeakKey(_) => "WeakKey",
            KeyError::PrivateMaterial(_) => "PrivateMaterial",
            KeyError::NotPrivate(_) => "NotPrivate",
            KeyError::Restricted { .. } => "RestrictedKey",
        }
    }
}
