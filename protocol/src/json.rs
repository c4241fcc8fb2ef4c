//! Strict JSON parsing for everything that crosses a trust boundary.
//!
//! `serde_json` alone keeps the *last* of two duplicate keys, so `{"exp":1,"exp":9999999999}`
//! means different things to different JSON parsers. A token that two implementations read
//! differently is a token an attacker can aim at the weaker one, so duplicate keys are an error
//! at every level. Nesting is capped at [`MAX_DEPTH`] so hostile input cannot exhaust the stack,
//! and input must be valid UTF-8 with nothing after the value.

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
    fn rejects_non_utf8_trailing_data_and_lone_surrogates() {
        assert_eq!(parse_strict(b"{\"a\":\"\xff\"}"), Err(StrictJsonError::NotUtf8(6)));
        assert!(parse_strict(b"{} {}").is_err());
        assert!(parse_strict(br#""\ud800""#).is_err());
        assert!(parse_strict(b"").is_err());
    }
}
