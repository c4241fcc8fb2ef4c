//! ISO 3166-1 alpha-2 country codes, validated against the official list.
//!
//! Attestations and policies name jurisdictions by these codes. A code that is not officially
//! assigned (a typo, a user-assigned code such as `XK`, lower case) is an error: an attestation
//! that names one is rejected, and so is a policy. Failing closed here matters because a
//! misspelt country in a prohibiting measure would otherwise silently match nobody.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::country_table::ISO_3166_1_ALPHA_2;

/// An officially assigned ISO 3166-1 alpha-2 code, upper case (e.g. `US`, `DE`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CountryCode([u8; 2]);

/// Why a string is not a country code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an officially assigned ISO 3166-1 alpha-2 country code")]
pub struct UnknownCountryCode(pub String);

impl CountryCode {
    /// Parses an upper-case alpha-2 code; anything not on the official list is an error.
    pub fn parse(code: &str) -> Result<Self, UnknownCountryCode> {
        match ISO_3166_1_ALPHA_2.binary_search_by(|(c, _)| (*c).cmp(code)) {
            Ok(_) => {
                let b = code.as_bytes();
                Ok(CountryCode([b[0], b[1]]))
            }
            Err(_) => Err(UnknownCountryCode(code.chars().take(16).collect())),
        }
    }

    /// The two-letter code.
    pub fn as_str(&self) -> &str {
        // Only ever built from entries of the ASCII table above.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// The ISO short name, e.g. "Germany".
    pub fn name(&self) -> &'static str {
        ISO_3166_1_ALPHA_2
            .binary_search_by(|(c, _)| (*c).cmp(self.as_str()))
            .map(|i| ISO_3166_1_ALPHA_2[i].1)
            .unwrap_or("")
    }

    /// Every assigned code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = CountryCode> {
        ISO_3166_1_ALPHA_2.iter().map(|(c, _)| {
            let b = c.as_bytes();
            CountryCode([b[0], b[1]])
        })
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountryCode({})", self.as_str())
    }
}

impl std::str::FromStr for CountryCode {
    type Err = UnknownCountryCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for CountryCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CountryCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        CountryCode::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_complete() {
        assert_eq!(ISO_3166_1_ALPHA_2.len(), 249);
        for w in ISO_3166_1_ALPHA_2.windows(2) {
            assert!(w[0].0 < w[1].0, "{} before {}", w[0].0, w[1].0);
        }
        for (c, _) in ISO_3166_1_ALPHA_2 {
            assert_eq!(c.len(), 2);
            assert!(c.bytes().all(|b| b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn known_codes_parse() {
        for c in ["US", "DE", "CN", "RU", "IR", "KP", "CU", "SY", "VE", "GB", "AX", "ZW"] {
            let code = CountryCode::parse(c).unwrap();
            assert_eq!(code.as_str(), c);
            assert!(!code.name().is_empty());
        }
        assert_eq!(CountryCode::parse("DE").unwrap().name(), "Germany");
    }

    #[test]
    fn unassigned_and_malformed_codes_are_rejected() {
        for c in ["XK", "EU", "UK", "ZZ", "us", "U", "USA", "", "U\u{0}", "É"] {
            assert!(CountryCode::parse(c).is_err(), "{c:?} accepted");
        }
    }

    #[test]
    fn serde_round_trip_and_rejection() {
        let c: CountryCode = serde_json::from_str("\"FR\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"FR\"");
        let err = serde_json::from_str::<CountryCode>("\"XX\"").unwrap_err();
        assert!(err.to_string().contains("ISO 3166-1"), "{err}");
    }
}
