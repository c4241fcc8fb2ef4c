#!/usr/bin/env python3
"""Generates tests/corpus/interop/: tokens signed by an independent JOSE implementation, PyJWT,
that kycd must accept (read by tests/tests/interop_pyjwt.rs).

Regenerate with (from the repository root; needs Python 3.11+, `pyjwt` and `cryptography`):

    python3 tests/corpus/gen_interop.py

It writes, under tests/corpus/interop/:

- ``keys/<kid>.jwk``: the private signing keys (reused when present, generated otherwise);
- ``pyjwt.jwks``: their public keys, exported with PyJWT's own ``Algorithm.to_jwk`` plus
  ``kid``, ``alg`` and ``use``;
- ``<name>.jws``: tokens made by ``jwt.encode`` (EdDSA and ES256, attestation and policy) with
  headers ``{"kid": ..., "typ": ...}`` — PyJWT adds ``alg`` itself;
- ``manifest.json``: ``{"now", "skew_s", "cases": [{"name", "file", "typ", "jwks", "alg",
  "kid", "sub" | "version"}]}``.

Claims use the fixed clock 1800000000 (2027-01-15), like the bad-input corpus, so the tests do
not rot. PyJWT's ES256 signatures are randomized: regenerating changes those token bytes (and
that is fine: whatever PyJWT produces must verify).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

sys.dont_write_bytecode = True  # no __pycache__ next to the corpus
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_corpus import ATT_TYP, NOW, POL_TYP, SKEW_S, attestation, policy  # noqa: E402

OUT = Path(__file__).resolve().parent / "interop"
KEYS = OUT / "keys"
JWKS = "pyjwt.jwks"


def impl(alg: str) -> Any:
    return OKPAlgorithm if alg == "EdDSA" else ECAlgorithm


def load_or_create(kid: str, alg: str) -> Any:
    path = KEYS / f"{kid}.jwk"
    if path.exists():
        jwk = json.loads(path.read_text())
        assert jwk["kid"] == kid and jwk["alg"] == alg, f"{path}: unexpected kid/alg"
        return impl(alg).from_jwk(jwk)
    key = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    jwk = impl(alg).to_jwk(key, as_dict=True)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    KEYS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jwk, indent=2) + "\n")
    return key


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    jwk = impl(alg).to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    keys = {
        "EdDSA": ("py-ed-1", load_or_create("py-ed-1", "EdDSA")),
        "ES256": ("py-es-1", load_or_create("py-es-1", "ES256")),
    }
    (OUT / JWKS).write_text(
        json.dumps({"keys": [public_jwk(key, kid, alg) for alg, (kid, key) in keys.items()]}, indent=2) + "\n"
    )

    cases = []
    for alg, (kid, key) in keys.items():
        tag = alg.lower()
        sub = f"tenant-pyjwt-{tag}"
        claims = attestation(sub=sub, jti=f"att-pyjwt-{tag}")
        name = f"pyjwt-{tag}-attestation"
        tok = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": ATT_TYP})
        (OUT / f"{name}.jws").write_bytes(tok.encode("ascii"))
        cases.append({"name": name, "file": f"{name}.jws", "typ": "attestation", "jwks": JWKS, "alg": alg,
                      "kid": kid, "sub": sub})

        version = 8 if alg == "EdDSA" else 9
        name = f"pyjwt-{tag}-policy"
        tok = jwt.encode(policy(version=version), key, algorithm=alg, headers={"kid": kid, "typ": POL_TYP})
        (OUT / f"{name}.jws").write_bytes(tok.encode("ascii"))
        cases.append({"name": name, "file": f"{name}.jws", "typ": "policy", "jwks": JWKS, "alg": alg, "kid": kid,
                      "version": version})

    manifest = {"now": NOW, "skew_s": SKEW_S, "cases": cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(cases)} PyJWT {jwt.__version__} tokens to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
