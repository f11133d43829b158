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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

VERSION = "rt1"
#: Longest refresh token looked at; anything longer is refused unparsed.
MAX_REFRESH_TOKEN_BYTES = 256
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class RefreshToken:
    session_id: str
    secret: str
    token: str

    @property
    def secret_hash(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()


class RefreshTokenCodec:
    """Mints, checks and derives refresh tokens with the MAC key ``K``."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, label: str, session_id: str, secret: str) -> str:
        msg = f"{label}:{session_id}.{secret}".encode()
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest())

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
        parts = raw.split(".")
        if len(parts) != 4 or parts[0] != VERSION:
            return None
        _, session_id, secret, tag = parts
        if not (_SEGMENT.match(session_id) and _SEGMENT.match(secret) and _SEGMENT.match(tag)):
            return None
        if not hmac.compare_digest(tag, self._mac("tag", session_id, secret)):
            return None
        return RefreshToken(session_id, secret, raw)


def hash_retry_key(retry_key: str) -> str:
    """Retry keys are stored only as hashes."""
    return hashlib.sha256(("retry:" + retry_key).encode()).hexdigest()
