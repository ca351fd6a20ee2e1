#!/usr/bin/env python3
"""Cross-check onramp-gateway's CDP JWTs against Coinbase's official Python SDK.

Input (stdin): JSON, one case object or a list of them:
    {"name": "es256-sec1", "key_id": "...", "secret": "...", "jwt": "<token from our Rust code>"}
The JWT must be for POST https://api.developer.coinbase.com/onramp/v1/token.

For each case the script asks the SDK (cdp-sdk, `cdp.auth.utils.jwt.generate_jwt`) for its own
JWT for the same key and request, then compares ours with it field by field, and verifies OUR
signature with PyJWT against the public key derived independently (with `cryptography`) from the
secret. Exit status 0 when every case matches; 1 with one line per mismatch otherwise; 2 on
bad input or a missing package.

Accepted, documented differences between our JWT and the Python SDK's:
  * header `nonce`: ours is 32 lowercase hex chars (16 CSPRNG bytes, like the TS and Go SDKs);
    the Python SDK's is 16 decimal digits from `random.choices`. Both are opaque to the server.
  * claim `aud`: the Python SDK writes `"aud": null` when no audience is given; we omit it (as
    the TS, Go and Rust SDKs do). Accepted only while the SDK's value is null.
  * claim `iat`: we send `iat` = `nbf` (as the TS and Go SDKs do); the Python SDK omits it.
    Accepted only when equal to our `nbf`.
Everything else must match: header field names, `alg`, `kid`, `typ`; claim names, `sub`, `iss`,
`uris`; and `exp - nbf == 120` in both.
"""

import base64
import json
import re
import sys
import time

# Taken before the imports: importing cdp-sdk alone takes over 10 s on a busy machine, and our
# token was minted just before this process started.
STARTED = int(time.time())

try:
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cdp.auth.utils.jwt import JwtOptions, generate_jwt
except ImportError as e:  # pragma: no cover - environment problem, not a mismatch
    print(
        f"jwt_crosscheck.py: missing Python package ({e}); "
        "install tests/requirements-crosscheck.txt",
        file=sys.stderr,
    )
    sys.exit(2)

# Defaults; a case may name its own "method", "host" and "path" (v2 platform calls, GETs).
METHOD = "POST"
HOST = "api.developer.coinbase.com"
PATH = "/onramp/v1/token"
LIFETIME = 120
LEEWAY = 5

# Differences we accept on purpose (see module docstring).
OUR_EXTRA_CLAIMS = {"iat"}
SDK_EXTRA_CLAIMS = {"aud"}


def public_key_from_secret(secret: str):
    """Derive the public key from the secret without using the SDK's parser."""
    secret = secret.replace("\\n", "\n").strip()
    if "-----BEGIN" in secret:
        key = serialization.load_pem_private_key(secret.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("PEM secret is not an EC key")
        if key.curve.name != "secp256r1":
            raise ValueError(f"EC key on {key.curve.name}, not P-256")
        return key.public_key(), "ES256"
    raw = base64.b64decode(secret, validate=True)
    if len(raw) != 64:
        raise ValueError(f"base64 secret decodes to {len(raw)} bytes, not 64")
    priv = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    pub = priv.public_key()
    pub_raw = pub.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if pub_raw != raw[32:]:
        raise ValueError("Ed25519 secret: public half does not match the seed")
    return pub, "EdDSA"


def check_case(case: dict) -> list:
    name = case.get("name", "?")
    key_id, secret, ours = case["key_id"], case["secret"], case["jwt"]
    method = case.get("method", METHOD)
    host = case.get("host", HOST)
    path = case.get("path", PATH)
    expected_uris = [f"{method} {host}{path}"]
    errors = []

    def fail(msg):
        errors.append(f"[{name}] {msg}")

    sdk = generate_jwt(
        JwtOptions(
            api_key_id=key_id,
            api_key_secret=secret,
            request_method=method,
            request_host=host,
            request_path=path,
        )
    )

    our_h = pyjwt.get_unverified_header(ours)
    sdk_h = pyjwt.get_unverified_header(sdk)
    our_c = pyjwt.decode(ours, options={"verify_signature": False})
    sdk_c = pyjwt.decode(sdk, options={"verify_signature": False})

    # --- header ---
    if set(our_h) != set(sdk_h):
        fail(f"header fields differ: ours {sorted(our_h)} vs SDK {sorted(sdk_h)}")
    for field in ("alg", "kid", "typ"):
        if our_h.get(field) != sdk_h.get(field):
            fail(f"header {field}: ours {our_h.get(field)!r} vs SDK {sdk_h.get(field)!r}")
    if our_h.get("kid") != key_id:
        fail(f"header kid {our_h.get('kid')!r} is not the key id {key_id!r}")
    if not re.fullmatch(r"[0-9a-f]{32}", str(our_h.get("nonce", ""))):
        fail(f"our nonce {our_h.get('nonce')!r} is not 32 lowercase hex chars")
    if not re.fullmatch(r"[0-9]{16}", str(sdk_h.get("nonce", ""))):
        # Not our bug, but the documented difference would be out of date.
        fail(f"SDK nonce {sdk_h.get('nonce')!r} is no longer 16 digits: update the notes")

    # --- claims ---
    ours_names = set(our_c) - OUR_EXTRA_CLAIMS
    sdk_names = set(sdk_c) - SDK_EXTRA_CLAIMS
    if ours_names != sdk_names:
        fail(f"claim names differ: ours {sorted(our_c)} vs SDK {sorted(sdk_c)}")
    if "aud" in sdk_c and sdk_c["aud"] is not None:
        fail(f"SDK aud is {sdk_c['aud']!r}, not null: omitting it is no longer equivalent")
    if "aud" in our_c:
        fail(f"we send aud {our_c['aud']!r}; nobody asked for an audience")
    if "iat" in our_c and our_c["iat"] != our_c.get("nbf"):
        fail(f"our iat {our_c['iat']} != nbf {our_c.get('nbf')}")
    for field in ("sub", "iss", "uris"):
        if our_c.get(field) != sdk_c.get(field):
            fail(f"claim {field}: ours {our_c.get(field)!r} vs SDK {sdk_c.get(field)!r}")
    if our_c.get("sub") != key_id:
        fail(f"claim sub {our_c.get('sub')!r} is not the key id")
    if our_c.get("uris") != expected_uris:
        fail(f"claim uris {our_c.get('uris')!r}, expected {expected_uris!r}")
    if our_c.get("uris") != sdk_c.get("uris"):
        fail(f"claim uris {our_c.get('uris')!r} vs SDK {sdk_c.get('uris')!r}")
    for label, c in (("ours", our_c), ("SDK", sdk_c)):
        if not isinstance(c.get("nbf"), int) or not isinstance(c.get("exp"), int):
            fail(f"{label}: nbf/exp are not integers")
        elif c["exp"] - c["nbf"] != LIFETIME:
            fail(f"{label}: exp - nbf = {c['exp'] - c['nbf']}, expected {LIFETIME}")
    if isinstance(our_c.get("nbf"), int) and abs(our_c["nbf"] - STARTED) > LEEWAY:
        fail(f"our nbf {our_c['nbf']} is more than {LEEWAY}s from this script's start {STARTED}")

    # --- signatures, verified independently of both generators ---
    try:
        pub, alg = public_key_from_secret(secret)
    except Exception as e:  # noqa: BLE001 - report, don't crash
        fail(f"cannot derive the public key from the secret: {e}")
        return errors
    if our_h.get("alg") != alg:
        fail(f"our alg {our_h.get('alg')!r} does not fit the key type ({alg})")
    for label, token in (("our", ours), ("SDK", sdk)):
        try:
            pyjwt.decode(
                token,
                pub,
                algorithms=[alg],
                issuer="cdp",
                leeway=LEEWAY,
                options={"require": ["exp", "nbf", "sub", "iss"], "verify_aud": False},
            )
        except Exception as e:  # noqa: BLE001
            fail(f"{label} signature/claims do not verify with PyJWT: {type(e).__name__}: {e}")
    sig = ours.rsplit(".", 1)[1]
    sig_len = len(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    if sig_len != 64:
        fail(f"our signature is {sig_len} bytes, expected 64 (raw r||s / Ed25519)")
    return errors


def main() -> int:
    try:
        data = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        print(f"jwt_crosscheck.py: stdin is not JSON: {e}", file=sys.stderr)
        return 2
    cases = data if isinstance(data, list) else [data]
    if not cases:
        print("jwt_crosscheck.py: no cases given", file=sys.stderr)
        return 2
    all_errors = []
    for case in cases:
        try:
            errs = check_case(case)
        except KeyError as e:
            print(f"jwt_crosscheck.py: case is missing field {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - e.g. the SDK refused the key
            errs = [f"[{case.get('name', '?')}] {type(e).__name__}: {e}"]
        if errs:
            all_errors.extend(errs)
        else:
            print(f"ok   {case.get('name', '?')}: matches cdp-sdk, signature verified by PyJWT")
    import cdp  # for the version line only

    print(
        f"cdp-sdk {getattr(cdp, '__version__', '?')}, PyJWT {pyjwt.__version__}; "
        "accepted differences: nonce hex vs SDK decimal, no aud (SDK: null), iat (SDK: absent)"
    )
    if all_errors:
        for e in all_errors:
            print(f"MISMATCH {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
