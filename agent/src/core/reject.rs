//! Why an input was refused, as one enum: the kinds that go into the audit log, the
//! metrics' `kind` label and the policy fetcher's verdict, and the two questions the agent
//! asks of them (may it go away by itself? does it mean the key is not trusted?).

use kycd_protocol::VerifyError;

use crate::policy::PolicyError;

/// The kind of a refused attestation or policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectKind {
    /// Larger than allowed.
    TooLarge,
    /// Not a well-formed token.
    Malformed,
    /// An algorithm kycd does not accept.
    UnsupportedAlgorithm,
    /// A header kycd refuses.
    ForbiddenHeader,
    /// A required header is missing.
    MissingHeader,
    /// Signed by a key not in the trust set.
    UnknownKey,
    /// The key id names several keys.
    AmbiguousKey,
    /// The key's algorithm is not the token's.
    KeyAlgorithmMismatch,
    /// The signature does not verify.
    BadSignature,
    /// Another kind of token.
    WrongType,
    /// Past its `exp`.
    Expired,
    /// Before its `nbf`.
    NotYetValid,
    /// `iat` in the future.
    IssuedInFuture,
    /// A required claim is missing.
    MissingClaim,
    /// A claim is invalid.
    InvalidClaim,
    /// The input (or one it needs, like cloud-init's instance data) could not be read.
    Io,
    /// Bound to another host.
    WrongHost,
    /// The host attestation file does not carry a host binding.
    NotHostBinding,
    /// An admission brought an attestation bound to another workload.
    BindingMismatch,
    /// A policy version lower than the one applied.
    Rollback,
    /// A policy version already applied with other claims.
    VersionReused,
    /// The anti-rollback state is unusable.
    CorruptState,
    /// Not refused: the same policy is in force from the other source (remembered so the
    /// file is not re-offered on every rescan).
    Equivalent,
    /// Not refused: older than the policy in force from the other source (remembered
    /// likewise).
    Superseded,
}

impl RejectKind {
    /// The name in the audit log, the metrics and the fetcher's verdict.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectKind::TooLarge => "TooLarge",
            RejectKind::Malformed => "Malformed",
            RejectKind::UnsupportedAlgorithm => "UnsupportedAlgorithm",
            RejectKind::ForbiddenHeader => "ForbiddenHeader",
            RejectKind::MissingHeader => "MissingHeader",
            RejectKind::UnknownKey => "UnknownKey",
            RejectKind::AmbiguousKey => "AmbiguousKey",
            RejectKind::KeyAlgorithmMismatch => "KeyAlgorithmMismatch",
            RejectKind::BadSignature => "BadSignature",
            RejectKind::WrongType => "WrongType",
            RejectKind::Expired => "Expired",
            RejectKind::NotYetValid => "NotYetValid",
            RejectKind::IssuedInFuture => "IssuedInFuture",
            RejectKind::MissingClaim => "MissingClaim",
            RejectKind::InvalidClaim => "InvalidClaim",
            RejectKind::Io => "Io",
            RejectKind::WrongHost => "WrongHost",
            RejectKind::NotHostBinding => "NotHostBinding",
            RejectKind::BindingMismatch => "BindingMismatch",
            RejectKind::Rollback => "Rollback",
            RejectKind::VersionReused => "VersionReused",
            RejectKind::CorruptState => "CorruptState",
            RejectKind::Equivalent => "Equivalent",
            RejectKind::Superseded => "Superseded",
        }
    }

    /// Whether it may go away without the input changing (retried on every tick).
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            RejectKind::NotYetValid | RejectKind::IssuedInFuture | RejectKind::Io | RejectKind::CorruptState
        )
    }

    /// Whether it means the signing key is not (or no longer) trusted.
    pub const fn is_untrusted(self) -> bool {
        matches!(
            self,
            RejectKind::UnknownKey
                | RejectKind::AmbiguousKey
                | RejectKind::KeyAlgorithmMismatch
                | RejectKind::BadSignature
        )
    }
}

impl From<&VerifyError> for RejectKind {
    fn from(e: &VerifyError) -> Self {
        match e {
            VerifyError::TooLarge { .. } => RejectKind::TooLarge,
            VerifyError::Malformed(_) => RejectKind::Malformed,
            VerifyError::UnsupportedAlgorithm(_) => RejectKind::UnsupportedAlgorithm,
            VerifyError::ForbiddenHeader(_) => RejectKind::ForbiddenHeader,
            VerifyError::MissingHeader(_) => RejectKind::MissingHeader,
            VerifyError::UnknownKey(_) => RejectKind::UnknownKey,
            VerifyError::AmbiguousKey(_) => RejectKind::AmbiguousKey,
            VerifyError::KeyAlgorithmMismatch { .. } => RejectKind::KeyAlgorithmMismatch,
            VerifyError::BadSignature(_) => RejectKind::BadSignature,
            VerifyError::WrongType { .. } => RejectKind::WrongType,
            VerifyError::Expired { .. } => RejectKind::Expired,
            VerifyError::NotYetValid { .. } => RejectKind::NotYetValid,
            VerifyError::IssuedInFuture { .. } => RejectKind::IssuedInFuture,
            VerifyError::MissingClaim(_) => RejectKind::MissingClaim,
            VerifyError::InvalidClaim { .. } => RejectKind::InvalidClaim,
        }
    }
}

impl From<&PolicyError> for RejectKind {
    fn from(e: &PolicyError) -> Self {
        match e {
            PolicyError::Invalid(e) => e.into(),
            PolicyError::Rollback { .. } => RejectKind::Rollback,
            PolicyError::VersionReused { .. } => RejectKind::VersionReused,
            PolicyError::Io { .. } => RejectKind::Io,
            PolicyError::CorruptState { .. } => RejectKind::CorruptState,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_untrusted_kinds() {
        for k in [RejectKind::NotYetValid, RejectKind::Io, RejectKind::IssuedInFuture] {
            assert!(k.is_transient(), "{k:?}");
        }
        for k in [RejectKind::BadSignature, RejectKind::Expired, RejectKind::Malformed] {
            assert!(!k.is_transient(), "{k:?}");
        }
        assert!(RejectKind::UnknownKey.is_untrusted() && RejectKind::BadSignature.is_untrusted());
        assert!(!RejectKind::Expired.is_untrusted());
    }

    #[test]
    fn names_are_the_protocol_error_kinds() {
        let e = VerifyError::Malformed("x".into());
        assert_eq!(RejectKind::from(&e).as_str(), e.kind());
        let e = VerifyError::UnknownKey("k".into());
        assert_eq!(RejectKind::from(&e).as_str(), e.kind());
    }
}
