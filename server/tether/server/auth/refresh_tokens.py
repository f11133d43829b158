"""Refresh-token format: opaque to clients, verifiable without Redis, useless from a dump.

A token is ``rt1.<sessionId>.<secret>.<tag>``:

* ``secret`` is 32 random bytes at sign-in; each rotation derives the next secret as
  ``HMAC(K, "next:" + sid + "." + secret)``. Deriving instead of drawing lets the server
  re-create the *same* successor token when the previous token is presented again (rule 2 of
  the contract) while Redis stores only hashes.
* ``tag`` is ``HMAC(K, "tag:" + sid + "." + secret)``: a token the server did not mint is
  refused before any Redis state is read or changed, so a forged token naming a victim's session
  cannot revoke it.
* Redis holds ``SHA-256(secret)`` only. ``K`` (the key set's ``refreshSecret``) never enters
  Redis: a dump of Redis can neither use nor mint a token.

Every refresh computes three HMACs (the presented token's tag, the next secret, its tag), so the
codec keeps HMAC-SHA-256's two keyed states (RFC 2104: the hash after ``K ^ ipad`` and after
``K ^ opad``) and copies them per MAC: about 1 µs a MAC instead of the 2-4 µs of
``hmac.digest``, which sets the key up again on every call.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
from typing import NamedTuple

VERSION = "rt1"
#: Longest refresh token looked at; anything longer is refused unparsed.
MAX_REFRESH_TOKEN_BYTES = 256
#: ``rt1.<sid>.<secret>.<tag>``, each segment 16-64 characters of unpadded base64url.
_TOKEN = re.compile(re.escape(VERSION) + r"\.([A-Za-z0-9_-]{16,64})" * 3)
_BLOCK = 64  # SHA-256's block size, for the HMAC key schedule
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5) of ``data``."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RefreshToken(NamedTuple):
    session_id: str
    secret: str
    token: str

    @property
    def secret_hash(self) -> str:
        """What Redis stores for this token: the hex SHA-256 of its secret."""
        return _sha256_hex(self.secret)


class RefreshTokenCodec:
    """Mints, checks and derives refresh tokens with the MAC key ``K``."""

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def _mac(self, label: str, session_id: str, secret: str) -> str:
        """``HMAC-SHA-256(K, label + ":" + session_id + "." + secret)``, unpadded base64url."""
        inner = self._inner.copy()
        inner.update(f"{label}:{session_id}.{secret}".encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _b64(outer.digest())

    def _make(self, session_id: str, secret: str) -> RefreshToken:
        tag = self._mac("tag", session_id, secret)
        return RefreshToken(session_id, secret, f"{VERSION}.{session_id}.{secret}.{tag}")

    def mint(self, session_id: str) -> RefreshToken:
        """The first token of a new session."""
        return self._make(session_id, _b64(secrets.token_bytes(32)))

    def successor(self, token: RefreshToken) -> RefreshToken:
        """The token that rotating ``token`` yields (deterministic)."""
        return self._make(token.session_id, self._mac("next", token.session_id, token.secret))

    def parse(self, raw: object) -> RefreshToken | None:
        """The token if it is well-formed and minted with ``K``; else ``None``. No I/O."""
        if not isinstance(raw, str) or len(raw) > MAX_REFRESH_TOKEN_BYTES:
            return None
        match = _TOKEN.fullmatch(raw)
        if match is None:
            return None
        session_id, secret, tag = match.groups()
        if not hmac.compare_digest(tag, self._mac("tag", session_id, secret)):
            return None
        return RefreshToken(session_id, secret, raw)


def hash_retry_key(retry_key: str) -> str:
    """Retry keys are stored only as hashes."""
    return _sha256_hex("retry:" + retry_key)
