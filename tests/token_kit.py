"""What the access-token tests share: the issuer, audience and clock they verify against, the
claims a good token carries, the JWS encodings, and the verifier under test.

Tokens are built by hand in the tests (any header, claim or signature can be produced);
``tests/test_tokens.py`` holds the rules common to every algorithm and
``tests/test_signing_algorithms.py`` what RS256 and mixed key sets add.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tether.protocol import AuthErrorCode
from tether.server.auth.signing_keys import KeyRing, KeySet
from tether.server.auth.tokens import AccessTokens, TokenError

ISSUER = "https://tether.test"
AUDIENCE = "tether-test"
LEEWAY = 5
NOW = 1_700_000_000
EXP = NOW + 600
INVALID = AuthErrorCode.INVALID_TOKEN


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def good_claims() -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "sid": "sess-1",
        "iat": NOW,
        "exp": EXP,
        "jti": "jti-1",
    }


def es256_signature(private_key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> bytes:
    """A JWS ES256 signature: ``r`` and ``s`` as two 32-byte big-endian integers (RFC 7518 §3.4)."""
    r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def access_tokens(source: KeySet | KeyRing) -> AccessTokens:
    ring = source if isinstance(source, KeyRing) else KeyRing(inline=source.to_json())
    return AccessTokens(ring, issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY)


def refusal(tokens: AccessTokens, token: object, *, now: float = NOW) -> AuthErrorCode:
    """The code ``verify`` refuses ``token`` with; any other exception fails the test."""
    with pytest.raises(TokenError) as caught:
        tokens.verify(token, now=now)
    return caught.value.code
