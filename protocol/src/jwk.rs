//! JSON Web Keys (RFC 7517) for the two algorithms kycd accepts: OKP/Ed25519 (RFC 8037) for
//! EdDSA and EC/P-256 for ES256 (RFC 7518 §6.2).
//!
//! [`Jwks`] is a trust set of public keys, parsed fail-closed: a key kycd cannot use, a
//! duplicate `kid`, private material in a trust file or a weak Ed25519 point rejects the whole
//! file, so an operator finds the mistake at load time rather than at the first token.
//! [`PrivateJwk`] is a signing key as written by `kycctl keygen`.

use std::fmt;

use ed25519_dalek::Signer as _;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::{b64, json::parse_strict, KeyError};

/// A signature algorithm kycd accepts. Everything else (`none`, `HS*`, `RS*`, `PS*`, `ES384`,
/// …) is refused before a key is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 signatures (RFC 8037), verified with `verify_strict` semantics.
    EdDSA,
    /// ECDSA on P-256 with SHA-256, signature as 64-byte `r‖s` (RFC 7518 §3.4).
    ES256,
}

impl Algorithm {
    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::EdDSA => "EdDSA",
            Algorithm::ES256 => "ES256",
        }
    }

    /// Parses a JOSE `alg` name, exactly (case-sensitive, as RFC 7515 §4.1.1 says).
    pub fn from_jose(alg: &str) -> Option<Self> {
        match alg {
            "EdDSA" => Some(Algorithm::EdDSA),
            "ES256" => Some(Algorithm::ES256),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone)]
pub(crate) enum VerifyingMaterial {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl VerifyingMaterial {
    pub(crate) fn algorithm(&self) -> Algorithm {
        match self {
            VerifyingMaterial::Ed25519(_) => Algorithm::EdDSA,
            VerifyingMaterial::P256(_) => Algorithm::ES256,
        }
    }

    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            VerifyingMaterial::Ed25519(_) => "OKP/Ed25519",
            VerifyingMaterial::P256(_) => "EC/P-256",
        }
    }

    fn to_jwk_fields(&self) -> Value {
        match self {
            VerifyingMaterial::Ed25519(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(k.as_bytes())})
            }
            VerifyingMaterial::P256(k) => {
                let point = k.to_encoded_point(false);
                let x = point.x().map(|x| b64::encode(x)).unwrap_or_default();
                let y = point.y().map(|y| b64::encode(y)).unwrap_or_default();
                json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})
            }
        }
    }
}

/// One trusted public key.
#[derive(Clone)]
pub struct PublicKey {
    kid: String,
    pub(crate) material: VerifyingMaterial,
}

impl PublicKey {
    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.material.algorithm()
    }

    /// The public JWK, with `kid`, `alg` and `use`.
    pub fn to_jwk(&self) -> Value {
        let mut v = self.material.to_jwk_fields();
        if let Value::Object(m) = &mut v {
            m.insert("kid".into(), Value::String(self.kid.clone()));
            m.insert("alg".into(), Value::String(self.algorithm().as_str().into()));
            m.insert("use".into(), Value::String("sig".into()));
        }
        v
    }

    /// Parses one public JWK (private material is refused).
    pub fn from_jwk_json(bytes: &[u8]) -> Result<Self, KeyError> {
        let value = parse_strict(bytes).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let raw = RawJwk::from_value(value, 0)?;
        raw.into_public()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({:?}, {})", self.kid, self.material.type_name())
    }
}

/// A set of trusted public keys (RFC 7517 §5), each named by a unique `kid`.
#[derive(Clone, Default)]
pub struct Jwks {
    keys: Vec<PublicKey>,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys":[…]}`), fail-closed; see the module doc.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeyError> {
        let value = parse_strict(bytes).map_err(|e| KeyError::Malformed(e.to_string()))?;
        let keys = match value {
            Value::Object(mut m) => match m.remove("keys") {
                Some(Value::Array(keys)) => keys,
                _ => return Err(KeyError::Malformed("\"keys\" must be an array".into())),
            },
            _ => return Err(KeyError::Malformed("a JWKS must be a JSON object".into())),
        };
        let mut set = Jwks::default();
        for (index, key) in keys.into_iter().enumerate() {
            set.push(RawJwk::from_value(key, index)?.into_public()?)?;
        }
        Ok(set)
    }

    /// Builds a set from keys, refusing duplicate `kid`s.
    pub fn from_keys(keys: impl IntoIterator<Item = PublicKey>) -> Result<Self, KeyError> {
        let mut set = Jwks::default();
        for k in keys {
            set.push(k)?;
        }
        Ok(set)
    }

    fn push(&mut self, key: PublicKey) -> Result<(), KeyError> {
        if self.keys.iter().any(|k| k.kid == key.kid) {
            return Err(KeyError::DuplicateKid(key.kid));
        }
        self.keys.push(key);
        Ok(())
    }

    /// The JWKS document.
    pub fn to_json(&self) -> Value {
        json!({"keys": self.keys.iter().map(PublicKey::to_jwk).collect::<Vec<_>>()})
    }

    /// All keys, in file order.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The key ids, in file order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.kids()).finish()
    }
}

enum SigningMaterial {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// A private signing key (both dalek and p256 zeroize their secrets on drop).
pub struct PrivateJwk {
    kid: String,
    material: SigningMaterial,
}

impl PrivateJwk {
    /// Generates a fresh key from the operating system's CSPRNG.
    pub fn generate(alg: Algorithm, kid: &str) -> Result<Self, KeyError> {
        validate_kid(kid, 0)?;
        let mut rng = rand_core::OsRng;
        let material = match alg {
            Algorithm::EdDSA => SigningMaterial::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng)),
            Algorithm::ES256 => SigningMaterial::P256(p256::ecdsa::SigningKey::random(&mut rng)),
        };
        Ok(PrivateJwk { kid: kid.to_owned(), material })
    }

    /// Parses a private JWK; the public part, if present, must match the private scalar.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeyError> {
        let value = parse_strict(bytes).map_err(|e| KeyError::Malformed(e.to_string()))?;
        RawJwk::from_value(value, 0)?.into_private()
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self.material {
            SigningMaterial::Ed25519(_) => Algorithm::EdDSA,
            SigningMaterial::P256(_) => Algorithm::ES256,
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let material = match &self.material {
            SigningMaterial::Ed25519(k) => VerifyingMaterial::Ed25519(k.verifying_key()),
            SigningMaterial::P256(k) => VerifyingMaterial::P256(*k.verifying_key()),
        };
        PublicKey { kid: self.kid.clone(), material }
    }

    /// The private JWK document (secret: write it with mode 0600).
    pub fn to_json(&self) -> Zeroizing<String> {
        let mut v = self.public_key().to_jwk();
        let d = match &self.material {
            SigningMaterial::Ed25519(k) => b64::encode(k.as_bytes()),
            SigningMaterial::P256(k) => b64::encode(&k.to_bytes()),
        };
        if let Value::Object(m) = &mut v {
            m.insert("d".into(), Value::String(d));
        }
        Zeroizing::new(v.to_string())
    }

    /// Signs a JWS signing input: Ed25519 (64 bytes) or ES256 `r‖s` (64 bytes).
    pub(crate) fn sign_raw(&self, signing_input: &[u8]) -> Vec<u8> {
        match &self.material {
            SigningMaterial::Ed25519(k) => k.sign(signing_input).to_bytes().to_vec(),
            SigningMaterial::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(signing_input);
                sig.to_bytes().to_vec()
            }
        }
    }
}

impl fmt::Debug for PrivateJwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateJwk({:?}, {}, <secret>)", self.kid, self.algorithm())
    }
}

/// The members of a JWK that kycd reads; others (`x5t`, vendor extras) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    d: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
}

const MAX_KID_LEN: usize = 128;

fn validate_kid(kid: &str, index: usize) -> Result<(), KeyError> {
    if kid.is_empty() {
        return Err(KeyError::MissingKid(index));
    }
    if kid.len() > MAX_KID_LEN || kid.chars().any(char::is_control) {
        return Err(KeyError::InvalidKey {
            kid: kid.chars().take(MAX_KID_LEN).collect(),
            reason: format!("kid must be 1-{MAX_KID_LEN} bytes without control characters"),
        });
    }
    Ok(())
}

impl RawJwk {
    fn from_value(value: Value, index: usize) -> Result<Self, KeyError> {
        let raw: RawJwk =
            serde_json::from_value(value).map_err(|e| KeyError::Malformed(format!("key #{index}: {e}")))?;
        let kid = raw.kid.as_deref().unwrap_or("");
        validate_kid(kid, index)?;
        Ok(raw)
    }

    fn kid(&self) -> String {
        self.kid.clone().unwrap_or_default()
    }

    fn invalid(&self, reason: impl Into<String>) -> KeyError {
        KeyError::InvalidKey { kid: self.kid(), reason: reason.into() }
    }

    fn coordinate(&self, name: &str, value: Option<&String>) -> Result<[u8; 32], KeyError> {
        let text = value.ok_or_else(|| self.invalid(format!("missing \"{name}\"")))?;
        let bytes = b64::decode(text.as_bytes())
            .map_err(|e| self.invalid(format!("\"{name}\" is not base64url: {e}")))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| self.invalid(format!("\"{name}\" must be 32 bytes, got {}", bytes.len())))
    }

    /// `alg`, `use` and `key_ops` may narrow what a key is for; they may never widen it.
    fn check_restrictions(&self, alg: Algorithm, op: &str) -> Result<(), KeyError> {
        let restricted = |reason: String| KeyError::Restricted { kid: self.kid(), reason };
        if let Some(a) = &self.alg {
            if a != alg.as_str() {
                return Err(restricted(format!("\"alg\" is {a:?} but the key is for {alg}")));
            }
        }
        if let Some(u) = &self.key_use {
            if u != "sig" {
                return Err(restricted(format!("\"use\" is {u:?}, not \"sig\"")));
            }
        }
        if let Some(ops) = &self.key_ops {
            if !ops.iter().any(|o| o == op) {
                return Err(restricted(format!("\"key_ops\" does not include {op:?}")));
            }
        }
        Ok(())
    }

    fn public_material(&self) -> Result<VerifyingMaterial, KeyError> {
        match (self.kty.as_str(), self.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => {
                let x = self.coordinate("x", self.x.as_ref())?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map_err(|_| self.invalid("\"x\" is not a valid Ed25519 point"))?;
                if key.is_weak() {
                    return Err(KeyError::WeakKey(self.kid()));
                }
                Ok(VerifyingMaterial::Ed25519(key))
            }
            ("EC", Some("P-256")) => {
                let x = self.coordinate("x", self.x.as_ref())?;
                let y = self.coordinate("y", self.y.as_ref())?;
                let point = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
                let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| self.invalid("(x, y) is not a point on P-256"))?;
                Ok(VerifyingMaterial::P256(key))
            }
            (kty, crv) => Err(KeyError::Unsupported {
                kid: self.kid(),
                kty: kty.chars().take(16).collect(),
                crv: crv.unwrap_or("").chars().take(16).collect(),
            }),
        }
    }

    fn into_public(self) -> Result<PublicKey, KeyError> {
        if self.d.is_some() {
            return Err(KeyError::PrivateMaterial(self.kid()));
        }
        let material = self.public_material()?;
        self.check_restrictions(material.algorithm(), "verify")?;
        Ok(PublicKey { kid: self.kid(), material })
    }

    fn into_private(self) -> Result<PrivateJwk, KeyError> {
        let d = match &self.d {
            Some(_) => Zeroizing::new(self.coordinate("d", self.d.as_ref())?),
            None => return Err(KeyError::NotPrivate(self.kid())),
        };
        let material = match (self.kty.as_str(), self.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => SigningMaterial::Ed25519(ed25519_dalek::SigningKey::from_bytes(&d)),
            ("EC", Some("P-256")) => SigningMaterial::P256(
                p256::ecdsa::SigningKey::from_bytes(&(*d).into())
                    .map_err(|_| self.invalid("\"d\" is not a valid P-256 scalar"))?,
            ),
            _ => {
                // Reuse the public-key path for the precise "unsupported" error.
                self.public_material()?;
                return Err(self.invalid("unsupported private key"));
            }
        };
        let key = PrivateJwk { kid: self.kid(), material };
        // A private JWK that carries a public part must carry *its* public part; a mismatch
        // means the file was assembled wrongly and signatures would not verify.
        if self.x.is_some() {
            let stated = self.public_material()?;
            let derived = key.public_key().material;
            let same = match (&stated, &derived) {
                (VerifyingMaterial::Ed25519(a), VerifyingMaterial::Ed25519(b)) => a == b,
                (VerifyingMaterial::P256(a), VerifyingMaterial::P256(b)) => a == b,
                _ => false,
            };
            if !same {
                return Err(self.invalid("public part does not match \"d\""));
            }
        }
        self.check_restrictions(key.algorithm(), "sign")?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_json() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let key = PrivateJwk::generate(alg, "k1").unwrap();
            let again = PrivateJwk::from_json(key.to_json().as_bytes()).unwrap();
            assert_eq!(again.algorithm(), alg);
            assert_eq!(again.public_key().to_jwk(), key.public_key().to_jwk());
            let jwks = Jwks::from_keys([key.public_key()]).unwrap();
            let parsed = Jwks::from_json(jwks.to_json().to_string().as_bytes()).unwrap();
            assert_eq!(parsed.kids().collect::<Vec<_>>(), ["k1"]);
            assert_eq!(parsed.keys()[0].algorithm(), alg);
        }
    }

    fn jwks_err(doc: &str) -> KeyError {
        Jwks::from_json(doc.as_bytes()).unwrap_err()
    }

    #[test]
    fn trust_sets_fail_closed() {
        let ed = PrivateJwk::generate(Algorithm::EdDSA, "a").unwrap().public_key().to_jwk();
        let k = |extra: Value| {
            let mut v = ed.clone();
            for (name, val) in extra.as_object().unwrap() {
                v[name] = val.clone();
            }
            v
        };
        let doc = |keys: Vec<Value>| json!({ "keys": keys }).to_string();
        assert_eq!(jwks_err(&doc(vec![ed.clone(), ed.clone()])).kind(), "DuplicateKid");
        assert_eq!(jwks_err(&doc(vec![k(json!({"kid": ""}))])).kind(), "MissingKid");
        assert_eq!(jwks_err(&doc(vec![k(json!({"d": "AAAA"}))])).kind(), "PrivateMaterial");
        assert_eq!(jwks_err(&doc(vec![k(json!({"kty": "RSA"}))])).kind(), "UnsupportedKey");
        assert_eq!(jwks_err(&doc(vec![k(json!({"crv": "X25519"}))])).kind(), "UnsupportedKey");
        assert_eq!(jwks_err(&doc(vec![k(json!({"alg": "ES256"}))])).kind(), "RestrictedKey");
        assert_eq!(jwks_err(&doc(vec![k(json!({"use": "enc"}))])).kind(), "RestrictedKey");
        assert_eq!(jwks_err(&doc(vec![k(json!({"key_ops": ["sign"]}))])).kind(), "RestrictedKey");
        assert_eq!(jwks_err(&doc(vec![k(json!({"x": "AAAA"}))])).kind(), "InvalidKey");
        assert_eq!(jwks_err(r#"{"keys":[],"keys":[]}"#).kind(), "Malformed");
        assert_eq!(jwks_err(r#"[]"#).kind(), "Malformed");
        // The identity point (small order) is a valid encoding but a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = k(json!({"x": b64::encode(&identity)}));
        assert_eq!(jwks_err(&doc(vec![weak])).kind(), "WeakKey");
        // A P-256 point off the curve.
        let es = PrivateJwk::generate(Algorithm::ES256, "e").unwrap().public_key().to_jwk();
        let mut off = es.clone();
        off["y"] = Value::String(es["x"].as_str().unwrap().to_owned());
        assert_eq!(jwks_err(&doc(vec![off])).kind(), "InvalidKey");
    }

    #[test]
    fn private_key_with_mismatched_public_part_is_refused() {
        let a = PrivateJwk::generate(Algorithm::ES256, "a").unwrap();
        let b = PrivateJwk::generate(Algorithm::ES256, "a").unwrap();
        let mut doc: Value = serde_json::from_str(&a.to_json()).unwrap();
        doc["x"] = b.public_key().to_jwk()["x"].clone();
        doc["y"] = b.public_key().to_jwk()["y"].clone();
        let err = PrivateJwk::from_json(doc.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.kind(), "InvalidKey", "{err}");
        let public_only = a.public_key().to_jwk().to_string();
        assert_eq!(PrivateJwk::from_json(public_only.as_bytes()).unwrap_err().kind(), "NotPrivate");
    }
}
