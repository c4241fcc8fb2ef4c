#!/usr/bin/env python3
"""Generates the bad-input JWS corpus in tests/corpus/jws/ (read by tests/tests/jws_corpus.rs).

Regenerate with (from the repository root; needs Python 3.11+, `cryptography` and `pyjwt`):

    python3 tests/corpus/gen_corpus.py

What it writes, all under tests/corpus/jws/:

- one file per case, ``<name>.jws``: the exact token bytes, with no trailing newline (unless the
  case is about a trailing newline);
- ``issuers.jwks`` (trusted keys ``ed-1``/Ed25519 and ``es-1``/P-256) and a few deliberately
  broken JWKS files (``small-order.jwks``, ...);
- ``keys/*.jwk``: the private keys the tokens are signed with. If they exist they are reused,
  otherwise fresh ones are generated, so regenerating does not churn every token. Ed25519 and
  the ES256 signatures (RFC 6979 deterministic ECDSA) are deterministic, so regenerating with
  the same keys reproduces the corpus byte for byte;
- ``manifest.json``: ``{"now", "skew_s", "cases": [{"name", "file", "typ", "jwks", "expect",
  "why"}]}``. ``expect`` is ``"ok"`` or the kind the verifier must report: a ``VerifyError``
  kind, or a ``KeyError`` kind when the case's JWKS itself must fail to load.

Tokens are assembled by hand (header and payload bytes, signature over the signing input) so
that malformed variants can be built byte by byte; well-formed tokens use the same header
``{"alg","kid","typ"}`` kycd itself writes. Deleting a case here does not delete its old
``.jws`` file: remove stale files by hand (the Rust test fails on unlisted files).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

HERE = Path(__file__).resolve().parent
OUT = HERE / "jws"
KEYS = OUT / "keys"

NOW = 1_800_000_000
SKEW_S = 60
DAY = 86_400
ATT_TYP = "kyc-attestation+jwt"
POL_TYP = "kyc-policy+jwt"
ISSUERS = "issuers.jwks"

# Order of the Ed25519 base point group, and of P-256.
ED25519_L = 2**252 + 27742317777372353535851937790883648493
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# ------------------------------------------------------------------------------------------
# Encoding helpers


def b64(data: bytes) -> bytes:
    """Unpadded base64url, as JWS requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def jdump(value: Any) -> bytes:
    """Compact JSON, keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else jdump(value)


# ------------------------------------------------------------------------------------------
# Keys


class Key:
    """A private signing key with its kid, loaded from or saved to keys/<kid>.jwk."""

    def __init__(self, kid: str, alg: str, private: Any):
        self.kid = kid
        self.alg = alg
        self.private = private

    def public_jwk(self) -> dict[str, Any]:
        impl = OKPAlgorithm if self.alg == "EdDSA" else ECAlgorithm
        fields = impl.to_jwk(self.private.public_key(), as_dict=True)
        jwk = {k: fields[k] for k in ("kty", "crv", "x", "y") if k in fields}
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def private_jwk(self) -> dict[str, Any]:
        impl = OKPAlgorithm if self.alg == "EdDSA" else ECAlgorithm
        jwk = self.public_jwk()
        jwk["d"] = impl.to_jwk(self.private, as_dict=True)["d"]
        return jwk

    def raw_public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, signing_input: bytes) -> bytes:
        """Ed25519 (64 bytes) or ES256 as r||s (64 bytes, RFC 7518 §3.4)."""
        if self.alg == "EdDSA":
            return self.private.sign(signing_input)
        der = self.sign_der(signing_input)
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def sign_der(self, signing_input: bytes) -> bytes:
        assert self.alg == "ES256"
        return self.private.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def load_or_create(kid: str, alg: str) -> Key:
    path = KEYS / f"{kid}.jwk"
    if path.exists():
        jwk = json.loads(path.read_text())
        assert jwk["kid"] == kid and jwk["alg"] == alg, f"{path}: unexpected kid/alg"
        impl = OKPAlgorithm if alg == "EdDSA" else ECAlgorithm
        return Key(kid, alg, impl.from_jwk(jwk))
    private = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    key = Key(kid, alg, private)
    KEYS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key.private_jwk(), indent=2) + "\n")
    return key


# ------------------------------------------------------------------------------------------
# Claims templates


def attestation(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "https://kyc.example-cloud.test",
        "sub": "tenant-0001",
        "jti": "att-0001",
        "iat": NOW - 100,
        "nbf": NOW - 100,
        "exp": NOW + DAY,
        "kyc": {"status": "verified", "verified_at": NOW - 1000, "method": "document+liveness"},
        "subject": {"kind": "organization", "legal_name": "Example Labs GmbH", "countries": ["DE"]},
        "beneficial_owners": [{"name": "A. Owner", "countries": ["DE", "AT"]}],
        "resellers": [{"name": "Reseller BV", "country": "NL"}],
        "payment_source_country": "DE",
        "binding": {"kind": "libvirt_domain", "id": "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10", "host_id": "i-0abc"},
        "foreign_person": True,
    }
    claims.update(changes)
    return claims


def policy(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "policy-authority",
        "iat": NOW - 100,
        "exp": NOW + 30 * DAY,
        "version": 7,
        "measures": [
            {
                "id": "m-kp",
                "match": {"countries": ["KP"]},
                "roles": ["customer", "beneficial_owner", "reseller", "payment_source"],
                "action": "prohibit",
                "effective_from": NOW - 100,
                "citation": "EO 13984 sec. 2",
            },
            {
                "id": "m-cond",
                "match": {"countries": ["CN"]},
                "roles": ["customer"],
                "action": "condition",
                "conditions": {"max_gpus": 8, "report_all_usage": True},
                "citation": "89 FR 5698",
            },
        ],
        "unverified": {"action": "grace", "grace_s": 86400},
        "thresholds": {
            "training_ops": 1e26,
            "bio_training_ops": 1e23,
            "cluster_flops": 1e20,
            "early_warning_fraction": 0.01,
        },
    }
    claims.update(changes)
    return claims


def without(claims: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k not in names}


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


# ------------------------------------------------------------------------------------------
# Token assembly


def header(alg: str = "EdDSA", kid: str = "ed-1", typ: str = ATT_TYP, **extra: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"alg": alg, "kid": kid, "typ": typ}
    h.update(extra)
    return h


def signing_input(hdr: Any, payload: Any) -> bytes:
    return b64(as_bytes(hdr)) + b"." + b64(as_bytes(payload))


def token(hdr: Any, payload: Any, key: Key | None, signature: bytes | None = None) -> bytes:
    """header/payload: a dict (serialised compactly) or exact bytes. The signature is `key`'s
    over the signing input unless given explicitly."""
    si = signing_input(hdr, payload)
    if signature is None:
        assert key is not None
        signature = key.sign(si)
    return si + b"." + b64(signature)


def segments(tok: bytes) -> list[bytes]:
    return tok.split(b".")


def with_signature(tok: bytes, signature: bytes) -> bytes:
    h, p, _ = segments(tok)
    return h + b"." + p + b"." + b64(signature)


def filler(seed: str, n: int) -> bytes:
    """Deterministic pseudo-random bytes (stand-in signatures for refused algorithms)."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


def sized_token(key: Key, size: int) -> bytes:
    """A validly signed attestation of exactly `size` bytes (padded via an ignored claim and,
    since unpadded base64url cannot produce every length, an ignored header parameter)."""
    for hpad in range(4):
        hdr = header(**({"cty": "x" * hpad} if hpad else {}))
        fixed = len(token(hdr, attestation(pad=""), key))
        for extra in range(max(0, (size - fixed) * 3 // 4 - 4), (size - fixed) * 3 // 4 + 4):
            tok = token(hdr, attestation(pad="A" * extra), key)
            if len(tok) == size:
                return tok
    raise AssertionError(f"cannot build a token of {size} bytes")


# ------------------------------------------------------------------------------------------
# Cases


class Corpus:
    def __init__(self) -> None:
        self.cases: list[dict[str, str]] = []
        self.files: dict[str, bytes] = {}

    def add(self, name: str, data: bytes, typ: str, expect: str, why: str, jwks: str = ISSUERS) -> None:
        assert typ in ("attestation", "policy"), typ
        assert all(c.isalnum() or c in "-_" for c in name), name
        assert name not in {c["name"] for c in self.cases}, f"duplicate case {name}"
        assert "\n" not in why
        file = f"{name}.jws"
        self.files[file] = data
        self.cases.append({"name": name, "file": file, "typ": typ, "jwks": jwks, "expect": expect, "why": why})


def build(ed: Key, es: Key, other: Key) -> tuple[Corpus, dict[str, Any]]:
    c = Corpus()
    att, pol = attestation(), policy()
    att_json = jdump(att)

    # --- well-formed tokens -----------------------------------------------------------------
    valid_ed = token(header(), att, ed)
    valid_es = token(header("ES256", "es-1"), att, es)
    valid_pol = token(header(typ=POL_TYP), pol, ed)
    c.add("valid-eddsa-attestation", valid_ed, "attestation", "ok", "well-formed EdDSA attestation signed by ed-1")
    c.add("valid-es256-attestation", valid_es, "attestation", "ok", "well-formed ES256 attestation signed by es-1")
    c.add("valid-eddsa-policy", valid_pol, "policy", "ok", "well-formed EdDSA policy signed by ed-1")
    c.add("valid-es256-policy", token(header("ES256", "es-1", POL_TYP), pol, es), "policy", "ok",
          "well-formed ES256 policy signed by es-1")
    c.add("valid-cty-header-ignored", token(header(cty="JWT"), att, ed), "attestation", "ok",
          "unknown-to-kycd but harmless header parameter cty is ignored (RFC 7515 §4)")
    c.add("valid-unknown-attestation-field", token(header(), attestation(x_extension={"k": 1}), ed), "attestation",
          "ok", "attestations ignore unknown top-level fields")
    c.add("valid-unknown-policy-field", token(header(typ=POL_TYP), policy(comment="metadata"), ed), "policy", "ok",
          "the policy's top level ignores unknown fields")
    c.add("valid-cgroup-binding",
          token(header(), attestation(binding={"kind": "cgroup", "id": "/machine.slice/vm-1.scope"}), ed),
          "attestation", "ok", "normalised absolute cgroup path binding")
    # A header that decodes to exactly MAX_HEADER_BYTES (4096) is still accepted.
    base = jdump(header(pad=""))
    big_hdr = jdump(header(pad="A" * (4096 - len(base))))
    assert len(big_hdr) == 4096
    c.add("valid-header-exactly-4096-bytes", token(big_hdr, att, ed), "attestation", "ok",
          "protected header of exactly 4096 decoded bytes is at the limit, not over it")
    over_hdr = jdump(header(pad="A" * (4097 - len(base))))
    assert len(over_hdr) == 4097
    c.add("header-4097-bytes", token(over_hdr, att, ed), "attestation", "TooLarge",
          "protected header one byte over the 4096-byte limit")

    # --- algorithms ---------------------------------------------------------------------------
    c.add("alg-none", token(header("none"), att, None, b""), "attestation", "UnsupportedAlgorithm",
          "alg none with an empty signature")
    hs_si = signing_input(header("HS256"), att)
    c.add("alg-hs256-key-confusion", hs_si + b"." + b64(hmac.new(ed.raw_public(), hs_si, hashlib.sha256).digest()),
          "attestation", "UnsupportedAlgorithm", "HS256 MACed with ed-1's public key bytes as the HMAC secret")
    c.add("alg-rs256", token(header("RS256"), att, None, filler("rs256", 256)), "attestation",
          "UnsupportedAlgorithm", "RS256 is refused before any key lookup")
    c.add("alg-ps256", token(header("PS256"), att, None, filler("ps256", 256)), "attestation",
          "UnsupportedAlgorithm", "PS256 is refused before any key lookup")
    c.add("alg-es384", token(header("ES384", "es-1"), att, None, filler("es384", 96)), "attestation",
          "UnsupportedAlgorithm", "ES384 is not ES256")
    c.add("alg-eddsa-lowercase", token(header("eddsa"), att, ed), "attestation", "UnsupportedAlgorithm",
          "alg names are case-sensitive; valid Ed25519 signature under alg eddsa")
    c.add("alg-ed25519-fully-specified", token(header("Ed25519"), att, ed), "attestation", "UnsupportedAlgorithm",
          "RFC 9864 fully-specified name Ed25519 is not (yet) accepted; only EdDSA")
    c.add("alg-not-a-string", token({"alg": 1, "kid": "ed-1", "typ": ATT_TYP}, att, ed), "attestation", "Malformed",
          "alg is a number")

    # --- header parameters / key resolution ---------------------------------------------------
    c.add("kid-unknown", token(header(kid="ed-2"), att, ed), "attestation", "UnknownKey",
          "kid names no trusted key (signature is ed-1's)")
    c.add("kid-empty", token(header(kid=""), att, ed), "attestation", "UnknownKey", "empty kid names no key")
    c.add("kid-not-a-string", token({"alg": "EdDSA", "kid": ["ed-1"], "typ": ATT_TYP}, att, ed), "attestation",
          "Malformed", "kid is an array")
    c.add("kid-null", token({"alg": "EdDSA", "kid": None, "typ": ATT_TYP}, att, ed), "attestation", "Malformed",
          "kid is null")
    c.add("kid-missing", token({"alg": "EdDSA", "typ": ATT_TYP}, att, ed), "attestation", "MissingHeader",
          "no kid: keys are resolved by kid only")
    c.add("alg-missing", token({"kid": "ed-1", "typ": ATT_TYP}, att, ed), "attestation", "MissingHeader", "no alg")
    c.add("typ-missing", token({"alg": "EdDSA", "kid": "ed-1"}, att, ed), "attestation", "MissingHeader", "no typ")
    c.add("header-empty-object", token({}, att, ed), "attestation", "MissingHeader", "header is {}")
    c.add("kid-eddsa-names-p256-key", token(header("EdDSA", "es-1"), att, ed), "attestation",
          "KeyAlgorithmMismatch", "alg EdDSA with kid es-1, a P-256 key")
    c.add("kid-es256-names-ed25519-key", token(header("ES256", "ed-1"), att, es), "attestation",
          "KeyAlgorithmMismatch", "alg ES256 with kid ed-1, an Ed25519 key")

    # --- forbidden header parameters ----------------------------------------------------------
    c.add("header-crit", token(header(crit=["exp"]), att, ed), "attestation", "ForbiddenHeader",
          "crit is refused (no extensions are understood)")
    c.add("header-b64-false", token(header(b64=False), att, ed), "attestation", "ForbiddenHeader",
          "b64:false (RFC 7797 unencoded payload) is refused")
    c.add("header-embedded-jwk", token(header(kid="ed-1", jwk=other.public_jwk()), att, other), "attestation",
          "ForbiddenHeader", "embedded jwk naming the attacker's key, signed with that key")
    c.add("header-jku", token(header(jku="https://attacker.example/jwks.json"), att, ed), "attestation",
          "ForbiddenHeader", "jku (remote key set) is refused")
    c.add("header-x5u", token(header(x5u="https://attacker.example/cert.pem"), att, ed), "attestation",
          "ForbiddenHeader", "x5u (remote certificate) is refused")
    c.add("header-x5c", token(header(x5c=[base64.b64encode(b"not really a certificate").decode()]), att, ed),
          "attestation", "ForbiddenHeader", "x5c (embedded certificate chain) is refused")

    # --- token type ---------------------------------------------------------------------------
    c.add("typ-jwt", token(header(typ="JWT"), att, ed), "attestation", "WrongType", "typ JWT, not kyc-attestation+jwt")
    c.add("typ-policy-as-attestation", valid_pol, "attestation", "WrongType",
          "the valid policy token presented as an attestation")
    c.add("typ-attestation-as-policy", valid_ed, "policy", "WrongType",
          "the valid attestation token presented as a policy")
    c.add("typ-case-differs", token(header(typ="KYC-Attestation+JWT"), att, ed), "attestation", "WrongType",
          "typ is compared exactly, not case-insensitively")

    # --- signatures ---------------------------------------------------------------------------
    sig = segments(valid_ed)[2]
    raw_sig = unb64(sig)
    c.add("sig-wrong-key", token(header(), att, other), "attestation", "BadSignature",
          "signed by ed-other (not trusted) under kid ed-1")
    c.add("sig-truncated", with_signature(valid_ed, raw_sig[:-1]), "attestation", "BadSignature",
          "Ed25519 signature one byte short")
    c.add("sig-extended", with_signature(valid_ed, raw_sig + b"\x00"), "attestation", "BadSignature",
          "valid Ed25519 signature with one extra byte appended")
    flipped = bytearray(raw_sig)
    flipped[10] ^= 0x01
    c.add("sig-bit-flipped", with_signature(valid_ed, bytes(flipped)), "attestation", "BadSignature",
          "one bit of a valid Ed25519 signature flipped")
    c.add("sig-empty", with_signature(valid_ed, b""), "attestation", "BadSignature",
          "EdDSA token with an empty signature segment")
    raw_es = unb64(segments(valid_es)[2])
    flipped_es = bytearray(raw_es)
    flipped_es[40] ^= 0x80
    c.add("sig-es256-bit-flipped", with_signature(valid_es, bytes(flipped_es)), "attestation", "BadSignature",
          "one bit of a valid ES256 signature flipped")
    c.add("sig-es256-zero", with_signature(valid_es, bytes(64)), "attestation", "BadSignature",
          "ES256 signature r = s = 0")
    other_att = token(header(), attestation(sub="tenant-0002", jti="att-0002"), ed)
    h_a, _, s_a = segments(valid_ed)
    _, p_b, _ = segments(other_att)
    c.add("sig-payload-swapped", h_a + b"." + p_b + b"." + s_a, "attestation", "BadSignature",
          "payload of another valid token (tenant-0002) under this token's signature")
    r_es, s_es = raw_es[:32], int.from_bytes(raw_es[32:], "big")
    c.add("sig-es256-high-s", with_signature(valid_es, r_es + (P256_N - s_es).to_bytes(32, "big")), "attestation",
          "ok", "valid ES256 signature with s replaced by n-s: RFC 7518 does not require low-S (malleable)")
    es_si = signing_input(header("ES256", "es-1"), att)
    c.add("sig-es256-der", es_si + b"." + b64(es.sign_der(es_si)), "attestation", "BadSignature",
          "ES256 signature DER-encoded instead of 64-byte r||s")
    s_int = int.from_bytes(raw_sig[32:], "little")
    assert s_int < ED25519_L and s_int + ED25519_L < 2**256
    non_canonical = raw_sig[:32] + (s_int + ED25519_L).to_bytes(32, "little")
    c.add("sig-ed25519-non-canonical-s", with_signature(valid_ed, non_canonical), "attestation", "BadSignature",
          "valid Ed25519 signature with S replaced by S+L (malleated, non-canonical)")

    # --- time claims --------------------------------------------------------------------------
    c.add("exp-expired", token(header(), attestation(iat=NOW - 10 * DAY, nbf=NOW - 10 * DAY, exp=NOW - 3600), ed),
          "attestation", "Expired", "exp an hour ago, beyond the 60 s skew")
    c.add("exp-at-skew-boundary", token(header(), attestation(exp=NOW - SKEW_S), ed), "attestation", "Expired",
          "exp == now - skew: expired (now - skew >= exp)")
    c.add("exp-within-skew", token(header(), attestation(exp=NOW - 30), ed), "attestation", "ok",
          "exp 30 s ago, within the 60 s skew")
    c.add("nbf-future", token(header(), attestation(nbf=NOW + 3600), ed), "attestation", "NotYetValid",
          "nbf an hour ahead, beyond skew")
    c.add("nbf-within-skew", token(header(), attestation(nbf=NOW + SKEW_S), ed), "attestation", "ok",
          "nbf == now + skew is accepted")
    c.add("iat-future", token(header(), attestation(iat=NOW + 3600, nbf=NOW - 100), ed), "attestation",
          "IssuedInFuture", "iat an hour ahead, beyond skew")
    c.add("iat-within-skew", token(header(), without(attestation(iat=NOW + SKEW_S), "nbf"), ed), "attestation",
          "ok", "iat == now + skew is accepted")
    c.add("exp-missing", token(header(), without(att, "exp"), ed), "attestation", "MissingClaim", "no exp")
    c.add("exp-string", token(header(), attestation(exp=str(NOW + DAY)), ed), "attestation", "InvalidClaim",
          "exp is a string")
    c.add("exp-float", token(header(), attestation(exp=float(NOW + DAY)), ed), "attestation", "InvalidClaim",
          "exp is a float (1800086400.0), not an integer")
    c.add("exp-exponent-notation", token(header(), att_json.replace(b'"exp":1800086400', b'"exp":1.8000864e9'), ed),
          "attestation", "InvalidClaim", "exp written as 1.8000864e9 (integer-valued, but a float)")
    c.add("nbf-null", token(header(), attestation(nbf=None), ed), "attestation", "InvalidClaim", "nbf is null")
    c.add("exp-beyond-i64", token(header(), attestation(exp=10**30), ed), "attestation", "InvalidClaim",
          "exp does not fit in i64")
    c.add("iat-not-before-exp", token(header(), without(attestation(iat=NOW + 30, exp=NOW + 20), "nbf"), ed),
          "attestation", "InvalidClaim", "iat after exp (both within the time window)")
    c.add("policy-expired", token(header(typ=POL_TYP), policy(iat=NOW - 40 * DAY, exp=NOW - DAY), ed), "policy",
          "Expired", "policy expired a day ago")

    # --- required claims ----------------------------------------------------------------------
    c.add("sub-missing", token(header(), without(att, "sub"), ed), "attestation", "MissingClaim", "no sub")
    c.add("binding-missing", token(header(), without(att, "binding"), ed), "attestation", "MissingClaim",
          "no binding")
    c.add("policy-measures-missing", token(header(typ=POL_TYP), without(pol, "measures"), ed), "policy",
          "MissingClaim", "policy without measures")

    # --- base64url / compact serialization ----------------------------------------------------
    h, p, s = segments(valid_ed)
    assert len(s) % 4 == 2
    c.add("b64-padding", h + b"." + p + b"." + s + b"==", "attestation", "Malformed",
          "signature segment with its '==' padding (JWS forbids padding)")
    # The header {"alg":"EdDSA","kid":"ed-1","typ":"kyc-attestation+jwt"} is 56 bytes: its
    # base64url form needs one '=' of padding in standard base64.
    assert len(h) % 4 == 3
    c.add("b64-padding-header", h + b"=." + p + b"." + s, "attestation", "Malformed",
          "header segment with its standard '=' padding")
    c.add("b64-whitespace", h + b"." + p[:20] + b" " + p[20:] + b"." + s, "attestation", "Malformed",
          "a space inside the payload segment")
    c.add("b64-line-break", h + b"." + p[:64] + b"\r\n" + p[64:] + b"." + s, "attestation", "Malformed",
          "CRLF line break inside the payload segment")
    c.add("b64-trailing-newline", valid_ed + b"\n", "attestation", "Malformed", "valid token followed by a newline")
    # Standard-alphabet variants of the same bytes: every '-' -> '+', '_' -> '/'.
    plus = next(i for i, seg in enumerate((h, p, s)) if b"-" in seg)
    slash = next(i for i, seg in enumerate((h, p, s)) if b"_" in seg)
    parts = [h, p, s]
    parts[plus] = parts[plus].replace(b"-", b"+")
    c.add("b64-plus", b".".join(parts), "attestation", "Malformed", "'+' (standard alphabet) instead of '-'")
    parts = [h, p, s]
    parts[slash] = parts[slash].replace(b"_", b"/")
    c.add("b64-slash", b".".join(parts), "attestation", "Malformed", "'/' (standard alphabet) instead of '_'")
    c.add("b64-invalid-char", h + b"." + p[:10] + b"*" + p[11:] + b"." + s, "attestation", "Malformed",
          "'*' in the payload segment")
    c.add("b64-non-ascii", h + b"." + p + b"." + s[:5] + "é".encode() + s[5:], "attestation", "Malformed",
          "UTF-8 'é' inside the signature segment")
    # The last character of an 86-char segment carries 2 data bits and 4 zero bits; set them.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1:])
    assert last & 0x0F == 0
    c.add("b64-nonzero-trailing-bits", h + b"." + p + b"." + s[:-1] + alphabet[last | 0x01: (last | 0x01) + 1],
          "attestation", "Malformed", "signature segment whose unused trailing bits are not zero")
    c.add("segments-2", h + b"." + p, "attestation", "Malformed", "header.payload, no signature segment")
    c.add("segments-4", valid_ed + b"." + s, "attestation", "Malformed", "four segments")
    c.add("segments-5-jwe-shape", h + b"." + b"." + p + b"." + b64(b"iv") + b"." + s, "attestation", "Malformed",
          "five segments (JWE compact shape)")
    c.add("empty-file", b"", "attestation", "Malformed", "zero bytes")
    c.add("dots-only", b"..", "attestation", "Malformed", "three empty segments")
    c.add("not-a-token", b"hello world", "attestation", "Malformed", "text with no dots")

    # --- JSON ---------------------------------------------------------------------------------
    dup_hdr = b'{"alg":"none","alg":"EdDSA","kid":"ed-1","typ":"' + ATT_TYP.encode() + b'"}'
    c.add("header-duplicate-key", token(dup_hdr, att, ed), "attestation", "Malformed",
          "alg twice (none, then EdDSA) in a validly signed header")
    dup_payload = att_json[:-1] + b',"exp":' + str(NOW + 3650 * DAY).encode() + b"}"
    c.add("payload-duplicate-key", token(header(), dup_payload, ed), "attestation", "Malformed",
          "exp twice in a validly signed payload (last-wins parsers see a ten-year exp)")
    nested_dup = jdump(attestation(kyc={"status": "rejected"}))
    nested_dup = nested_dup.replace(b'"status":"rejected"', b'"status":"rejected","status":"verified"')
    c.add("payload-duplicate-nested-key", token(header(), nested_dup, ed), "attestation", "Malformed",
          "kyc.status twice (rejected, then verified) in a validly signed payload")
    esc_hdr = jdump(header())[:-1] + b',"\\u0061lg":"EdDSA"}'
    c.add("header-duplicate-key-escaped", token(esc_hdr, att, ed), "attestation", "Malformed",
          "alg twice, once spelt with a \\u escape, in a validly signed header")
    c.add("payload-duplicate-key-escaped", token(header(), att_json[:-1] + b',"\\u0065xp":' +
                                                str(NOW + 3650 * DAY).encode() + b"}", ed),
          "attestation", "Malformed", "exp twice, once spelt with a \\u escape, in a validly signed payload")
    dup_owner = att_json.replace(b'{"name":"A. Owner"', b'{"name":"Someone Else","name":"A. Owner"')
    assert dup_owner != att_json
    c.add("payload-duplicate-key-in-array", token(header(), dup_owner, ed), "attestation", "Malformed",
          "beneficial_owners[0].name twice in a validly signed payload")
    c.add("valid-pretty-printed", token(json.dumps(header(), indent=2).encode(), json.dumps(att, indent=2).encode(),
                                        ed), "attestation", "ok", "whitespace in header and payload JSON is fine")
    c.add("payload-number-out-of-range", token(header(), att_json[:-1] + b',"x":1e400}', ed), "attestation",
          "Malformed", "validly signed payload with a number that overflows f64")
    c.add("header-not-object", token(b'["EdDSA","ed-1"]', att, ed), "attestation", "Malformed",
          "header is a JSON array")
    c.add("header-not-json", token(b"alg=EdDSA", att, ed), "attestation", "Malformed", "header is not JSON")
    c.add("payload-not-object", token(header(), b"[1,2,3]", ed), "attestation", "Malformed",
          "validly signed payload that is a JSON array")
    c.add("payload-string", token(header(), b'"attestation"', ed), "attestation", "Malformed",
          "validly signed payload that is a JSON string")
    c.add("payload-trailing-data", token(header(), att_json + b" {}", ed), "attestation", "Malformed",
          "validly signed payload with a second JSON value after the first")
    c.add("payload-bom", token(header(), b"\xef\xbb\xbf" + att_json, ed), "attestation", "Malformed",
          "validly signed payload starting with a UTF-8 byte order mark")
    lone = att_json.replace(b'"Example Labs GmbH"', b'"Example Labs \\ud800GmbH"')
    assert lone != att_json
    c.add("payload-lone-surrogate", token(header(), lone, ed), "attestation", "Malformed",
          "validly signed payload with a lone UTF-16 surrogate escape")
    c.add("header-deeply-nested", token(header(ext=nested(100)), att, ed), "attestation", "Malformed",
          "header nests 100 levels deep")
    c.add("payload-deeply-nested", token(header(), attestation(ext=nested(100)), ed), "attestation", "Malformed",
          "validly signed payload nesting 100 levels deep")
    c.add("header-non-utf8", token(jdump(header(note="X"))[:-2] + b'\xff"}', att, ed), "attestation",
          "Malformed", "header contains byte 0xff")
    bad_utf8 = att_json.replace(b"Example Labs GmbH", b"Example Labs \xc3\x28GmbH")
    c.add("payload-non-utf8", token(header(), bad_utf8, ed), "attestation", "Malformed",
          "validly signed payload with an invalid UTF-8 sequence")

    # --- size limits --------------------------------------------------------------------------
    c.add("header-too-large", token(header(pad="A" * 5000), att, ed), "attestation", "TooLarge",
          "header decodes to over 4096 bytes (token well under 64 KiB)")
    exact = sized_token(ed, 64 * 1024)
    c.add("token-exactly-64kib", exact, "attestation", "ok", "validly signed token of exactly 65536 bytes (the limit)")
    c.add("token-64kib-plus-one", sized_token(ed, 64 * 1024 + 1), "attestation", "TooLarge",
          "validly signed token of 65537 bytes, one over the limit")
    too_large = token(header(), attestation(pad="A" * 50_000), ed)
    assert 64 * 1024 < len(too_large) < 80 * 1024
    c.add("token-too-large", too_large, "attestation", "TooLarge", "validly signed token over 64 KiB")

    # --- attestation claim values -------------------------------------------------------------
    def att_subject(**changes: Any) -> dict[str, Any]:
        subject = copy.deepcopy(att["subject"])
        subject.update(changes)
        return attestation(subject=subject)

    c.add("country-xk", token(header(), att_subject(countries=["DE", "XK"]), ed), "attestation", "InvalidClaim",
          "XK (Kosovo, user-assigned) is not an official ISO 3166-1 code")
    c.add("country-zz", token(header(), att_subject(countries=["ZZ"]), ed), "attestation", "InvalidClaim",
          "ZZ is not an ISO 3166-1 code")
    c.add("country-lowercase", token(header(), att_subject(countries=["de"]), ed), "attestation", "InvalidClaim",
          "country codes are upper case")
    c.add("country-reseller-eu", token(header(), attestation(resellers=[{"name": "R", "country": "EU"}]), ed),
          "attestation", "InvalidClaim", "EU is not a country code (reseller country)")
    c.add("subject-countries-empty", token(header(), att_subject(countries=[]), ed), "attestation", "InvalidClaim",
          "subject must name at least one country")
    c.add("subject-kind-unknown", token(header(), att_subject(kind="trust"), ed), "attestation", "InvalidClaim",
          "unknown subject kind")
    c.add("kyc-status-unknown", token(header(), attestation(kyc={"status": "maybe"}), ed), "attestation",
          "InvalidClaim", "unknown KYC status must not be read as verified")
    c.add("binding-kind-unknown", token(header(), attestation(binding={"kind": "docker_container", "id": "abc"}), ed),
          "attestation", "InvalidClaim", "unknown binding kind")
    c.add("binding-cgroup-dotdot",
          token(header(), attestation(binding={"kind": "cgroup", "id": "/machine.slice/../system.slice"}), ed),
          "attestation", "InvalidClaim", "cgroup binding escaping with '..'")
    c.add("binding-unix-user-not-numeric", token(header(), attestation(binding={"kind": "unix_user", "id": "root"}),
                                                 ed), "attestation", "InvalidClaim", "unix_user binding needs a uid")
    c.add("sub-empty", token(header(), attestation(sub=""), ed), "attestation", "InvalidClaim", "empty sub")
    c.add("sub-control-character", token(header(), attestation(sub="tenant-\u0007"), ed), "attestation",
          "InvalidClaim", "sub contains a control character")
    c.add("foreign-person-string", token(header(), attestation(foreign_person="yes"), ed), "attestation",
          "InvalidClaim", "foreign_person must be a boolean")

    # --- policy claim values ------------------------------------------------------------------
    def pol_measure(index: int, **changes: Any) -> dict[str, Any]:
        measures = copy.deepcopy(pol["measures"])
        measures[index].update(changes)
        return policy(measures=measures)

    def ptok(claims: dict[str, Any]) -> bytes:
        return token(header(typ=POL_TYP), claims, ed)

    c.add("policy-role-unknown", ptok(pol_measure(0, roles=["customer", "guarantor"])), "policy", "InvalidClaim",
          "unknown role in a measure")
    c.add("policy-action-unknown", ptok(pol_measure(0, action="quarantine")), "policy", "InvalidClaim",
          "unknown measure action")
    c.add("policy-country-unknown", ptok(pol_measure(0, match={"countries": ["KP", "XK"]})), "policy",
          "InvalidClaim", "unknown country in a measure's match")
    c.add("policy-measure-unknown-field", ptok(pol_measure(0, severity="high")), "policy", "InvalidClaim",
          "unknown field inside a measure")
    c.add("policy-match-unknown-field", ptok(pol_measure(0, match={"countries": ["KP"], "regions": ["x"]})),
          "policy", "InvalidClaim", "unknown matcher inside a measure's match")
    c.add("policy-condition-unknown-field",
          ptok(pol_measure(1, conditions={"max_gpus": 8, "max_tflops": 10})), "policy", "InvalidClaim",
          "unknown condition")
    c.add("policy-unverified-unknown-field", ptok(policy(unverified={"action": "deny", "notify": True})), "policy",
          "InvalidClaim", "unknown field in the unverified rule")
    c.add("policy-version-zero", ptok(policy(version=0)), "policy", "InvalidClaim", "version must be at least 1")
    c.add("policy-version-float", ptok(policy(version=7.0)), "policy", "InvalidClaim", "version 7.0 is not an integer")
    c.add("policy-version-negative", ptok(policy(version=-1)), "policy", "InvalidClaim", "version is unsigned")
    c.add("policy-duplicate-measure-id", ptok(pol_measure(1, id="m-kp")), "policy", "InvalidClaim",
          "two measures share an id")
    c.add("policy-prohibit-with-conditions", ptok(pol_measure(0, conditions={"no_gpu": True})), "policy",
          "InvalidClaim", "a prohibit measure takes no conditions")

    # --- trust sets (the JWKS, not the token, is what is refused) ----------------------------
    jwks_files: dict[str, Any] = {}
    small_order = {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64(b"\x01" + bytes(31)).decode(),  # the identity point: order 1
        "kid": "ed-weak",
        "alg": "EdDSA",
        "use": "sig",
    }
    jwks_files["small-order.jwks"] = {"keys": [small_order]}
    c.add("key-small-order", token(header(kid="ed-weak"), att, ed), "attestation", "WeakKey",
          "trust set holds a small-order Ed25519 point (identity), refused at load", jwks="small-order.jwks")
    jwks_files["private-material.jwks"] = {"keys": [ed.public_jwk(), other.private_jwk()]}
    c.add("key-private-material", valid_ed, "attestation", "PrivateMaterial",
          "trust set carries a private key (d)", jwks="private-material.jwks")
    jwks_files["duplicate-kid.jwks"] = {"keys": [ed.public_jwk(), {**other.public_jwk(), "kid": "ed-1"}]}
    c.add("key-duplicate-kid", valid_ed, "attestation", "DuplicateKid", "two trusted keys share kid ed-1",
          jwks="duplicate-kid.jwks")

    jwks_files["restricted-use.jwks"] = {"keys": [{**ed.public_jwk(), "use": "enc"}, es.public_jwk()]}
    c.add("key-restricted-use", valid_ed, "attestation", "RestrictedKey",
          "the trusted ed-1 key is marked use:enc, so it may not verify signatures", jwks="restricted-use.jwks")
    jwks_files["unsupported-kty.jwks"] = {
        "keys": [ed.public_jwk(), {"kty": "RSA", "kid": "rsa-1", "n": b64(filler("rsa-n", 256)).decode(), "e": "AQAB"}]
    }
    c.add("key-unsupported-rsa", valid_ed, "attestation", "UnsupportedKey",
          "trust set holds an RSA key, which kycd cannot use", jwks="unsupported-kty.jwks")
    jwks_files["invalid-point.jwks"] = {"keys": [{**es.public_jwk(), "y": es.public_jwk()["x"]}]}
    c.add("key-invalid-point", valid_es, "attestation", "InvalidKey",
          "trusted es-1 key with y replaced by x: not a point on P-256", jwks="invalid-point.jwks")

    jwks_files[ISSUERS] = {"keys": [ed.public_jwk(), es.public_jwk()]}
    return c, jwks_files


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    ed = load_or_create("ed-1", "EdDSA")
    es = load_or_create("es-1", "ES256")
    other = load_or_create("ed-other", "EdDSA")
    corpus, jwks_files = build(ed, es, other)

    for name, doc in jwks_files.items():
        (OUT / name).write_text(json.dumps(doc, indent=2) + "\n")
    for file, data in corpus.files.items():
        (OUT / file).write_bytes(data)
    manifest = {"now": NOW, "skew_s": SKEW_S, "cases": corpus.cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    listed = set(corpus.files)
    stale = sorted(p.name for p in OUT.glob("*.jws") if p.name not in listed)
    failures = sum(1 for case in corpus.cases if case["expect"] != "ok")
    print(f"wrote {len(corpus.cases)} cases ({failures} failure cases) to {OUT}")
    if stale:
        print(f"stale token files not in the manifest (delete them): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
