//! Strict base64url (RFC 4648 §5) without padding, as JWS requires (RFC 7515 §2).
//!
//! Padding, whitespace, the standard alphabet's `+`/`/`, and non-zero trailing bits are all
//! rejected: every byte string has exactly one accepted encoding, so a token cannot be
//! altered in its text while decoding to the same bytes.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// Encodes without padding.
pub fn encode(bytes: &[u8]) -> String {
    ENGINE.encode(bytes)
}

/// Decodes canonical unpadded base64url; the error says what was wrong.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, String> {
    ENGINE.decode(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        assert_eq!(encode(b"\xfb\xff"), "-_8");
        assert_eq!(decode(b"-_8").unwrap(), b"\xfb\xff");
        for bad in ["-_8=", "+/8", "-_ 8", "-_8\n", "-_9", "a", "YQ==", "YR"] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        assert_eq!(decode(b"").unwrap(), b"");
    }
}
