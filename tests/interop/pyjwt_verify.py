#!/usr/bin/env python3
"""Verifies a kycd token with PyJWT, an independent JOSE implementation.

Usage:

    python3 tests/interop/pyjwt_verify.py TOKEN_FILE JWKS_FILE TYP [--now UNIX_SECONDS] [--skew SECONDS]

TYP is ``attestation``, ``policy``, ``host-statement`` or a literal ``typ`` header value.
Prints the verified header and claims as JSON and exits 0, or prints why the token was refused
to stderr and exits 1 (2 for usage errors). Needs Python 3.11+ with ``pyjwt`` and
``cryptography``. Used by tests/tests/interop_pyjwt.rs (opt-in, see there) to check that tokens
kycd signs verify in PyJWT; run it by hand the same way.

What it checks, in this order:

1. the token file is exactly the compact token (ASCII, no trailing newline: kycd refuses one);
2. the header's ``alg`` is EdDSA or ES256 (PyJWT is also given only that one algorithm, so
   ``none``/HS*/RS* are refused by PyJWT too), ``typ`` equals the expected value exactly, and
   ``kid`` names exactly one key in the JWKS (loaded with ``jwt.PyJWKSet``) whose algorithm is
   the header's ``alg``;
3. PyJWT's ``jwt.decode`` verifies the signature and the registered time claims, with
   ``exp``, ``iat`` and ``nbf`` verification ON and ``exp``/``iat`` required. PyJWT has no
   injectable clock, so with ``--now`` (kycd's fixtures use the fixed clock 1800000000) the
   leeway is widened by |real time - NOW| so that PyJWT's window contains NOW; this loosens
   PyJWT's own time check, which is why
4. the script then applies kycd's exact rule at NOW itself: integer ``exp`` required and
   ``NOW - skew < exp``; ``nbf``/``iat``, if present, integers ``<= NOW + skew``.

It does not check claim *contents* (country codes, enums, ...): that is kycd's typed layer,
not JOSE, and what this script is for is the signature/header interoperability.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jwt

TYPES = {
    "attestation": "kyc-attestation+jwt",
    "policy": "kyc-policy+jwt",
    "host-statement": "kyc-host-statement+jwt",
}
ALGORITHMS = ("EdDSA", "ES256")


class Refused(Exception):
    pass


def verify(token: bytes, jwks: dict, expected_typ: str, now: int, skew: int) -> tuple[dict, dict]:
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError as e:
        raise Refused(f"token is not ASCII: {e}") from e
    if text != text.strip():
        raise Refused("token has leading/trailing whitespace")

    try:
        header = jwt.get_unverified_header(text)
    except jwt.PyJWTError as e:
        raise Refused(f"header: {e}") from e
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise Refused(f"alg {alg!r} is not one of {ALGORITHMS}")
    if header.get("typ") != expected_typ:
        raise Refused(f"typ is {header.get('typ')!r}, expected {expected_typ!r}")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise Refused("kid is missing or not a string")
    matching = [k for k in jwks.get("keys", []) if k.get("kid") == kid]
    if len(matching) != 1:
        raise Refused(f"kid {kid!r} names {len(matching)} keys in the JWKS")
    try:
        key = jwt.PyJWKSet.from_dict({"keys": matching})[kid]
    except (jwt.PyJWTError, KeyError) as e:
        raise Refused(f"key {kid!r}: {e}") from e
    if key.algorithm_name != alg:
        raise Refused(f"key {kid!r} is for {key.algorithm_name}, token says {alg}")

    leeway = skew + abs(time.time() - now)
    try:
        claims = jwt.decode(
            text,
            key,
            algorithms=[alg],
            options={
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "require": ["exp", "iat"],
            },
            leeway=leeway,
        )
    except jwt.PyJWTError as e:
        raise Refused(f"PyJWT: {type(e).__name__}: {e}") from e

    exp = claims.get("exp")
    if type(exp) is not int:
        raise Refused(f"exp is not an integer: {exp!r}")
    if now - skew >= exp:
        raise Refused(f"expired: exp {exp}, now {now}, skew {skew}")
    for name in ("nbf", "iat"):
        if name in claims:
            value = claims[name]
            if type(value) is not int:
                raise Refused(f"{name} is not an integer: {value!r}")
            if now + skew < value:
                raise Refused(f"{name} {value} is in the future (now {now}, skew {skew})")
    return header, claims


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("token_file", type=Path)
    parser.add_argument("jwks_file", type=Path)
    parser.add_argument("typ", help="attestation, policy, host-statement or a literal typ value")
    parser.add_argument("--now", type=int, default=None, help="Unix time to verify at (default: the real clock)")
    parser.add_argument("--skew", type=int, default=60, help="allowed clock skew in seconds (default 60)")
    args = parser.parse_args()

    now = args.now if args.now is not None else int(time.time())
    expected_typ = TYPES.get(args.typ, args.typ)
    try:
        jwks = json.loads(args.jwks_file.read_text())
        header, claims = verify(args.token_file.read_bytes(), jwks, expected_typ, now, args.skew)
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    json.dump({"header": header, "claims": claims}, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
