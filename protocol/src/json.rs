//! Strict JSON parsing for everything that crosses a trust boundary.
//!
//! `serde_json` alone keeps the *last* of two duplicate keys, so `{"exp":1,"exp":9999999999}`
//! means different things to different JSON parsers. A token that two implementations read
//! differently is a token an attacker can aim at the weaker one, so duplicate keys are an error
//! at every level. Nesting is capped at [`MAX_DEPTH`] so hostile input cannot exhaust the stack,
//! and input must be valid UTF-8 with nothing after the value.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays/objects accepted. Real claims nest four levels at most.
pub const MAX_DEPTH: usize = 32;

/// Why a document is not strict JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// The bytes are not UTF-8.
    #[error("not valid UTF-8 at byte {0}")]
    NotUtf8(usize),
    /// The text is not JSON, or breaks one of the strict rules (duplicate key, depth).
    #[error("{0}")]
    Syntax(String),
}

/// Parses `bytes` as one JSON value, rejecting duplicate object keys, nesting deeper than
/// [`MAX_DEPTH`], invalid UTF-8 and trailing data.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let text = std::str::from_utf8(bytes).map_err(|e| StrictJsonError::NotUtf8(e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value =
        StrictSeed { depth: 0 }.deserialize(&mut de).map_err(|e| StrictJsonError::Syntax(e.to_string()))?;
    de.end().map_err(|e| StrictJsonError::Syntax(e.to_string()))?;
    Ok(value)
}

/// What [`scan_object`] learnt about a strictly valid top-level object.
#[derive(Debug, Default)]
pub struct ScannedObject {
    /// Top-level member names, in document order.
    pub keys: Vec<String>,
    /// Top-level members named in `capture`, with their values.
    pub captured: Vec<(String, Value)>,
}

impl ScannedObject {
    /// Whether the object has a top-level member `name`.
    pub fn has(&self, name: &str) -> bool {
        self.keys.iter().any(|k| k == name)
    }

    /// The captured value of top-level member `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.captured.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Applies the same rules as [`parse_strict`] without building a tree: the document must be
/// one JSON object; its top-level member names are returned, and the values of the members
/// named in `capture` (small scalars such as `exp`). This is the hot path of token
/// verification, where the typed claims are then deserialized straight from the bytes.
pub fn scan_object(bytes: &[u8], capture: &[&str]) -> Result<ScannedObject, StrictJsonError> {
    let text = std::str::from_utf8(bytes).map_err(|e| StrictJsonError::NotUtf8(e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let scanned = serde::Deserializer::deserialize_any(&mut de, TopLevelVisitor { capture })
        .map_err(|e| StrictJsonError::Syntax(e.to_string()))?;
    de.end().map_err(|e| StrictJsonError::Syntax(e.to_string()))?;
    Ok(scanned)
}

struct TopLevelVisitor<'c> {
    capture: &'c [&'c str],
}

impl<'de> Visitor<'de> for TopLevelVisitor<'_> {
    type Value = ScannedObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ScannedObject, A::Error> {
        let mut out = ScannedObject::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if out.has(&key) {
                return Err(A::Error::custom(format_args!("duplicate key {key:?}")));
            }
            if self.capture.contains(&key.as_ref()) {
                let value = map.next_value_seed(StrictSeed { depth: 1 })?;
                out.captured.push((key.to_string(), value));
            } else {
                map.next_value_seed(ValidateSeed { depth: 1 })?;
            }
            out.keys.push(key.into_owned());
        }
        Ok(out)
    }
}

/// Deserializes a map key, borrowing from the input when it has no escapes (serde's own
/// `Cow<str>` impl always copies).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeySeed)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Objects up to this many members check duplicates by linear search (no allocation beyond
/// the key list); larger ones switch to a hash set so hostile input stays linear.
const LINEAR_KEY_CHECK: usize = 16;

/// Validates one value (duplicates, depth) and discards it.
struct ValidateSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValidateSeed {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValidateSeed {
    fn nested<E: serde::de::Error>(&self) -> Result<ValidateSeed, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(ValidateSeed { depth: self.depth + 1 })
    }
}

impl<'de> Visitor<'de> for ValidateSeed {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.nested()?)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys: Vec<Cow<'de, str>> = Vec::new();
        let mut large: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let duplicate = match &mut large {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = keys.contains(&key);
                    keys.push(key.clone());
                    if keys.len() > LINEAR_KEY_CHECK {
                        large = Some(keys.drain(..).collect());
                    }
                    dup
                }
            };
            if duplicate {
                return Err(A::Error::custom(format_args!("duplicate key {key:?}")));
            }
            map.next_value_seed(self.nested()?)?;
        }
        Ok(())
    }
}

struct StrictSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor { depth: self.depth })
    }
}

struct StrictVisitor {
    depth: usize,
}

impl StrictVisitor {
    fn nested<E: serde::de::Error>(&self) -> Result<StrictSeed, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(StrictSeed { depth: self.depth + 1 })
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number is not finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.nested()?)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(self.nested()?)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_json() {
        let v = parse_strict(br#"{"a":[1,2.5,"x",null,true,{"b":{}}],"c":-3}"#).unwrap();
        assert_eq!(v["a"][1], 2.5);
        assert_eq!(v["c"], -3);
    }

    #[test]
    fn rejects_duplicate_keys_at_any_depth() {
        for doc in [r#"{"a":1,"a":2}"#, r#"{"x":{"a":1,"b":2,"a":1}}"#, r#"[{"k":1},{"k":1,"k":1}]"#] {
            let err = parse_strict(doc.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("duplicate key"), "{doc}: {err}");
        }
    }

    #[test]
    fn rejects_deep_nesting_without_overflowing() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        parse_strict(ok.as_bytes()).unwrap();
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse_strict(deep.as_bytes()).unwrap_err().to_string().contains("nesting"));
        let hostile = "[".repeat(1_000_000);
        assert!(parse_strict(hostile.as_bytes()).is_err());
    }

    #[test]
    fn scan_object_applies_the_same_rules_without_a_tree() {
        let doc = br#"{"exp":5,"sub":"t","x":{"a":[1,{"b":2}]},"iat":1}"#;
        let s = scan_object(doc, &["exp", "nbf", "iat"]).unwrap();
        assert_eq!(s.keys, ["exp", "sub", "x", "iat"]);
        assert_eq!(s.get("exp"), Some(&Value::from(5)));
        assert_eq!(s.get("iat"), Some(&Value::from(1)));
        assert!(s.get("nbf").is_none() && s.has("sub") && !s.has("nbf"));
        for bad in [
            &br#"{"a":1,"a":2}"#[..],
            br#"{"x":{"k":1,"k":2}}"#,
            br#"{"x":[{"k":1,"\u006b":2}]}"#,
            br#"[1]"#,
            br#"{"a":1} x"#,
            b"{\"a\":\"\xfe\"}",
        ] {
            assert!(scan_object(bad, &[]).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // Large objects switch to the hash-set check and still find late duplicates.
        let mut big: String = (0..100).map(|i| format!("\"k{i}\":{i},")).collect();
        big.insert(0, '{');
        big.push_str("\"k3\":0}");
        let wrapped = format!("{{\"o\":{big}}}");
        assert!(scan_object(wrapped.as_bytes(), &[]).unwrap_err().to_string().contains("duplicate"));
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(scan_object(deep.as_bytes(), &[]).unwrap_err().to_string().contains("nesting"));
    }

    #[test]
    fn rejects_non_utf8_trailing_data_and_lone_surrogates() {
        assert_eq!(parse_strict(b"{\"a\":\"\xff\"}"), Err(StrictJsonError::NotUtf8(6)));
        assert!(parse_strict(b"{} {}").is_err());
        assert!(parse_strict(br#""\ud800""#).is_err());
        assert!(parse_strict(b"").is_err());
    }
}
