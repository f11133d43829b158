"""Signing keys: a key set where the newest key signs and every key verifies.

The key set is shared by every instance of a deployment, through a JSON file
(``TETHER_KEYS_FILE``, default ``DATA_DIR/keys.json``, created once with mode 0600) or the
``TETHER_KEYS`` variable holding the same JSON. It also holds the refresh-token MAC secret, which
must never be stored in Redis: with it kept here, a dump of Redis can neither use nor mint a
refresh token.

Algorithm: ES256 (ECDSA P-256). See ``docs/keys.md`` for the measurements behind the choice.
``tether keys rotate`` adds a new signing key in front and keeps the previous ones (at most
:data:`MAX_KEYS`) so tokens they signed still verify; running instances pick the new file up by
themselves (:class:`KeyRing`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

log = logging.getLogger("tether.keys")

ALGORITHM = "ES256"
#: Keys kept in a set after rotation: the signer plus older ones that still verify.
MAX_KEYS = 3
#: Seconds between checks of the key file for a rotation made by another process.
RELOAD_INTERVAL = 5.0


class KeySetError(ValueError):
    """The key set is missing, unreadable or malformed."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    created_ms: int
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(
            kid=secrets.token_urlsafe(12),
            created_ms=int(time.time() * 1000),
            private_key=ec.generate_private_key(ec.SECP256R1()),
        )

    @cached_property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        # Derived once: every token verification looks it up.
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.kid, "alg": ALGORITHM, "use": "sig"})
        return jwk


@dataclass(frozen=True)
class KeySet:
    """Signing keys, newest first, and the refresh-token MAC secret."""

    keys: tuple[SigningKey, ...]
    refresh_secret: bytes

    @property
    def signing_key(self) -> SigningKey:
        return self.keys[0]

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        for key in self.keys:
            if key.kid == kid:
                return key.public_key
        return None

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    @classmethod
    def generate(cls) -> KeySet:
        return cls(keys=(SigningKey.generate(),), refresh_secret=secrets.token_bytes(32))

    def rotated(self) -> KeySet:
        """A new set with a fresh signing key in front, keeping at most :data:`MAX_KEYS`."""
        keys = (SigningKey.generate(), *self.keys)[:MAX_KEYS]
        return KeySet(keys=keys, refresh_secret=self.refresh_secret)

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> str:
        doc = {
            "version": 1,
            "refreshSecret": base64.urlsafe_b64encode(self.refresh_secret).decode(),
            "keys": [
                {
                    "kid": k.kid,
                    "alg": ALGORITHM,
                    "created": k.created_ms,
                    "privateKey": k.private_key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                }
                for k in self.keys
            ],
        }
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> KeySet:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise KeySetError(f"the key set is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise KeySetError('the key set must be a JSON object {"refreshSecret", "keys": [...]}')
        try:
            secret = base64.urlsafe_b64decode(doc["refreshSecret"])
            keys = []
            for entry in doc["keys"]:
                if entry.get("alg") != ALGORITHM:
                    kid, alg = entry.get("kid"), entry.get("alg")
                    raise KeySetError(f"key {kid!r}: unsupported alg {alg!r}")
                private = serialization.load_pem_private_key(
                    entry["privateKey"].encode(), password=None
                )
                if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
                    private.curve, ec.SECP256R1
                ):
                    raise KeySetError(f"key {entry['kid']!r} is not a P-256 key")
                kid = entry["kid"]
                if not isinstance(kid, str) or not kid:
                    raise KeySetError("every key needs a non-empty string kid")
                keys.append(SigningKey(kid, int(entry["created"]), private))
        except KeySetError:
            raise
        except KeyError as exc:
            raise KeySetError(f"malformed key set: the field {exc} is missing") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise KeySetError(f"malformed key set: {exc.__class__.__name__}: {exc}") from None
        if not keys:
            raise KeySetError("the key set holds no key")
        if len(secret) < 32:
            raise KeySetError("refreshSecret must be at least 32 bytes")
        return cls(keys=tuple(keys), refresh_secret=secret)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _FileLock:
    """An exclusive ``flock`` on ``<path>.lock``: serialises creators and rotators of a key file
    across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def load_or_create_key_file(path: Path) -> KeySet:
    """Read the key set at ``path``, generating it (once, under a lock) if it does not exist."""
    with _FileLock(path):
        if not path.exists():
            _write_atomically(path, KeySet.generate().to_json())
        return KeySet.from_json(path.read_text())


def rotate_key_file(path: Path) -> str:
    """Put a new signing key in front of the key set at ``path``; return its ``kid``."""
    with _FileLock(path):
        current = KeySet.from_json(path.read_text()) if path.exists() else KeySet.generate()
        rotated = current.rotated()
        _write_atomically(path, rotated.to_json())
    return rotated.signing_key.kid


class KeyRing:
    """The key set one instance uses, reloaded when another process rotates the file.

    Reloads are cheap ``stat`` calls at most every :data:`RELOAD_INTERVAL` seconds, and also on
    a ``kid`` this instance does not know (a rotation elsewhere that it has not seen yet).
    """

    def __init__(self, *, path: Path | None = None, inline: str | None = None) -> None:
        if inline is not None:
            self._path: Path | None = None
            self._set = KeySet.from_json(inline)
        elif path is not None:
            self._path = path
            self._set = load_or_create_key_file(path)
        else:
            raise KeySetError("a key file or inline key set is required")
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self._warned = float("-inf")

    def _stat(self) -> tuple[int, int, int]:
        # A rotation writes a new file (new inode): comparing the mtime alone would miss one
        # made within the file system's timestamp granularity.
        if self._path is None:
            return (0, 0, 0)
        st = self._path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def current(self) -> KeySet:
        self._maybe_reload(force=False)
        return self._set

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        key = self.current.public_key(kid)
        if key is None and self._maybe_reload(force=True):
            key = self._set.public_key(kid)
        return key

    def _maybe_reload(self, *, force: bool) -> bool:
        if self._path is None:
            return False
        now = time.monotonic()
        # Even a forced reload (unknown kid) is limited to one stat per second, so a stream of
        # tokens with invented kids cannot turn into a stream of file reads.
        if now - self._checked < (1.0 if force else RELOAD_INTERVAL):
            return False
        self._checked = now
        try:
            mtime = self._stat()
            if mtime == self._mtime:
                return False
            self._set = KeySet.from_json(self._path.read_text())
            self._mtime = mtime
            return True
        except (OSError, KeySetError) as exc:
            # Keep serving with the keys we have; a broken file must not stop verification.
            # Say so (the class only: the file holds private keys), at most once a minute.
            if now - self._warned >= 60.0:
                self._warned = now
                log.warning("key file %s not reloaded: %s", self._path, exc.__class__.__name__)
            return False
