"""Access tokens: issue and verify short-lived ES256 or RS256 JWTs.

Verification is strict and does the cheap checks first: size and shape before any parsing,
the header (``alg``, ``typ``, ``kid``, no ``crit``) before the signature, the signature before
the claims. Time checks use the injected clock, so tests can move time.

Each token is signed with the algorithm of the key that signs it (``signing_keys``), and the
``alg`` of its header must be exactly the algorithm of the key its ``kid`` names: the header
only names the algorithm, the key set decides it (no ``none``, no HMAC keyed with a public key,
no ES256 header over an RSA key).

Tokens are signed with PyJWT but verified here, on ``cryptography`` directly: one base64 decode
and one JSON parse per segment, and the ECDSA or RSA check on the key object the key set already
holds.
PyJWT's ``decode`` did the same checks at about twice the CPU, four times leaving the ECDSA
check aside (it parses the header twice and checks every base64 character in Python), on the
path every ``authenticate`` takes (docs/benchmarks.md, "/sync: connect + authenticate rate").
"""

from __future__ import annotations

import binascii
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tether.protocol import AuthErrorCode
from tether.server.auth.signing_keys import ALGORITHMS, KeyRing

TOKEN_TYPE = "at+jwt"
#: Longest access token accepted; ours are about 400 bytes (ES256) or 650 (RS256, 2048-bit
#: key; about 1,000 with a 4096-bit one). Checked before any parsing.
MAX_TOKEN_BYTES = 4096
REQUIRED_CLAIMS = ("iss", "aud", "sub", "sid", "iat", "exp", "jti")
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: Bits of the last character of a segment that encode nothing, by ``len(segment) % 4``.
_UNUSED_BITS = {2: 0x0F, 3: 0x03}


def _segment(segment: str) -> bytes:
    """Decode one base64url segment (the caller has checked its alphabet). Only the canonical
    encoding is accepted: a last character whose unused bits are set decodes to the same bytes,
    so without this check one token would have several spellings that all verify."""
    unused = _UNUSED_BITS.get(len(segment) % 4, 0)
    if unused and _B64URL.index(segment[-1]) & unused:
        raise binascii.Error("non-canonical base64url")
    return binascii.a2b_base64(
        (segment + "=" * (-len(segment) % 4)).replace("-", "+").replace("_", "/"), strict_mode=True
    )


def _json_object(segment: str) -> dict[str, Any]:
    """The JSON object a segment holds; ``ValueError`` if it holds anything else."""
    value = json.loads(_segment(segment).decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class TokenError(Exception):
    """A token was refused. ``code`` is ``invalid_token`` or ``token_expired``."""

    def __init__(self, code: AuthErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AccessClaims:
    """The verified identity an access token carries."""

    user_id: str
    session_id: str
    issued_at: int
    expires_at: int  # seconds since the epoch: the JWT ``exp``
    token_id: str


class AccessTokens:
    """Mints and verifies access tokens with the instance's :class:`KeyRing`."""

    def __init__(self, keyring: KeyRing, *, issuer: str, audience: str, leeway: int) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def issue(self, *, user_id: str, session_id: str, now: float, expires_at: int) -> str:
        """Sign a token for ``user_id``/``session_id`` valid until ``expires_at`` (seconds)."""
        key = self.keyring.current.signing_key
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "sid": session_id,
            "iat": int(now),
            "exp": int(expires_at),
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(
            claims,
            key.private_key,
            algorithm=key.alg,
            headers={"kid": key.kid, "typ": TOKEN_TYPE},
        )

    def verify(self, token: object, *, now: float) -> AccessClaims:
        """Return the claims of a valid token or raise :class:`TokenError`.

        ``token_expired`` means a well-formed, correctly signed token whose ``exp`` plus the
        leeway has passed; every other refusal is ``invalid_token``.
        """
        invalid = AuthErrorCode.INVALID_TOKEN
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise TokenError(invalid, "the token is not a string of acceptable size")
        if not _COMPACT_JWS.fullmatch(token):
            raise TokenError(invalid, "the token is not a compact JWS")
        header_segment, payload_segment, signature_segment = token.split(".")
        try:
            header = _json_object(header_segment)
        except (ValueError, RecursionError):  # binascii.Error and UnicodeError are ValueErrors
            raise TokenError(invalid, "the token header is malformed") from None
        alg = header.get("alg")
        # type() first: an unhashable or non-string alg (a list, an object) is simply refused.
        if type(alg) is not str or alg not in ALGORITHMS:
            raise TokenError(invalid, "the token's algorithm is not accepted")
        if header.get("typ") != TOKEN_TYPE:
            raise TokenError(invalid, "the token is not an access token")
        if "crit" in header or "b64" in header:
            # b64 (RFC 7797, an unencoded payload) is one such extension; we never issue it.
            raise TokenError(invalid, "the token has critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError(invalid, "the token names no key")
        key = self.keyring.key(kid)
        if key is None:
            raise TokenError(invalid, "the token's key is unknown")
        if alg != key.alg:
            # The key decides the algorithm (RFC 8725 §3.1): an RS256 header on an ES256 key,
            # or the reverse, is refused before any signature check.
            raise TokenError(invalid, "the token's algorithm is not its key's")
        try:
            signature = _segment(signature_segment)
        except ValueError:
            raise TokenError(invalid, "the token failed verification") from None
        if len(signature) != key.signature_bytes:
            raise TokenError(invalid, "the token failed verification")
        signing_input = token[: len(header_segment) + 1 + len(payload_segment)].encode("ascii")
        public = key.public_key
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, signing_input, _PKCS1V15, _SHA256)
            else:
                # JWS form (RFC 7518 §3.4): r and s as two 32-byte big-endian integers.
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                public.verify(der, signing_input, _ECDSA_SHA256)
        except InvalidSignature:
            raise TokenError(invalid, "the token failed verification") from None
        try:
            claims = _json_object(payload_segment)
        except (ValueError, RecursionError):
            raise TokenError(invalid, "the token failed verification") from None
        if claims.get("iss") != self.issuer:
            raise TokenError(invalid, "the token's issuer is not accepted")
        aud = claims.get("aud")
        # One audience, as a string, exactly ours: a token minted for several audiences is not
        # an access token for this one (RFC 8725 §3.9).
        if not isinstance(aud, str) or aud != self.audience:
            raise TokenError(invalid, "the token's audience is not accepted")
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise TokenError(invalid, "the token lacks a required claim")
        return self._check_claims(claims, now)

    def _check_claims(self, claims: dict[str, object], now: float) -> AccessClaims:
        invalid = AuthErrorCode.INVALID_TOKEN
        sub, sid, jti = claims.get("sub"), claims.get("sid"), claims.get("jti")
        iat, exp, nbf = claims.get("iat"), claims.get("exp"), claims.get("nbf")
        for value in (sub, sid, jti):
            if not isinstance(value, str) or not value:
                raise TokenError(invalid, "the token's identity claims are malformed")
        for value in (iat, exp):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TokenError(invalid, "the token's time claims are malformed")
        assert isinstance(iat, int) and isinstance(exp, int)
        assert isinstance(sub, str) and isinstance(sid, str) and isinstance(jti, str)
        if iat > now + self.leeway:
            raise TokenError(invalid, "the token was issued in the future")
        if nbf is not None:
            # PyJWT's JSON parser accepts NaN and Infinity, which every comparison lets through.
            if not isinstance(nbf, int | float) or isinstance(nbf, bool) or not math.isfinite(nbf):
                raise TokenError(invalid, "the token's nbf claim is malformed")
            if nbf > now + self.leeway:
                raise TokenError(invalid, "the token is not valid yet")
        if now >= exp + self.leeway:
            raise TokenError(AuthErrorCode.TOKEN_EXPIRED, "the token has expired")
        return AccessClaims(
            user_id=sub, session_id=sid, issued_at=iat, expires_at=exp, token_id=jti
        )
