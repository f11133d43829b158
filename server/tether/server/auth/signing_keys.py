"""Signing keys: a key set where the newest key signs and every key verifies.

The key set is shared by every instance of a deployment, through a JSON file
(``TETHER_KEYS_FILE``, default ``DATA_DIR/keys.json``, created once with mode 0600) or the
``TETHER_KEYS`` variable holding the same JSON. It also holds the refresh-token MAC secret, which
must never be stored in Redis: with it kept here, a dump of Redis can neither use nor mint a
refresh token.

Algorithm: each key has its own, ES256 (ECDSA P-256, the default) or RS256 (RSA of at least
2048 bits, PKCS#1 v1.5 with SHA-256), fixed by its key material; ``TETHER_SIGNING_ALGORITHM``
chooses the algorithm of the keys a new set and a rotation generate. A set may mix the two while
it moves from one to the other. See ``docs/keys.md`` for when to pick which.
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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

log = logging.getLogger("tether.keys")

#: The signing algorithms a key may have (its JWS ``alg``).
ALGORITHMS = ("ES256", "RS256")
DEFAULT_ALGORITHM = "ES256"
#: Size of the RSA keys generated for RS256, and the smallest accepted (RFC 7518 §3.3).
RSA_KEY_BITS = 2048
#: The smallest RSA public exponent a key may have (FIPS 186-5; every generated key uses it).
RSA_MIN_EXPONENT = 65537
#: Keys kept in a set after rotation: the signer plus older ones that still verify.
MAX_KEYS = 3
#: Seconds between checks of the key file for a rotation made by another process.
RELOAD_INTERVAL = 5.0


class KeySetError(ValueError):
    """The key set is missing, unreadable or malformed."""


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _b64_uint(value: int) -> str:
    """A JWK unsigned integer (RFC 7518 §2): big-endian, fewest bytes, base64url unpadded."""
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _algorithm_of(private_key: object) -> str | None:
    """The algorithm a private key can sign with here, or None if it fits neither."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return "ES256"
    if (
        isinstance(private_key, rsa.RSAPrivateKey)
        and private_key.key_size >= RSA_KEY_BITS
        and _sound_exponent(private_key.public_key().public_numbers().e)
    ):
        return "RS256"
    return None


def _sound_exponent(e: int) -> bool:
    """An RSA public exponent as FIPS 186-5 requires one: odd, 65537 <= e < 2**256. A small
    exponent (3) is what PKCS#1 v1.5 signature forgeries against lax verifiers exploit."""
    return e % 2 == 1 and RSA_MIN_EXPONENT <= e < 2**256


@dataclass(frozen=True)
class SigningKey:
    """One key of the set. Its algorithm follows from its key material (:attr:`alg`), so the
    two can never disagree."""

    kid: str
    created_ms: int
    private_key: PrivateKey

    def __post_init__(self) -> None:
        if _algorithm_of(self.private_key) is None:
            raise KeySetError(
                f"key {self.kid!r} is neither a P-256 key (ES256) "
                f"nor an RSA key of at least {RSA_KEY_BITS} bits with a public exponent of "
                f"at least {RSA_MIN_EXPONENT} (RS256)"
            )

    @classmethod
    def generate(cls, alg: str = DEFAULT_ALGORITHM) -> SigningKey:
        private_key: PrivateKey
        if alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "RS256":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        else:
            raise KeySetError(f"unsupported alg {alg!r}: choose {' or '.join(ALGORITHMS)}")
        return cls(
            kid=secrets.token_urlsafe(12),
            created_ms=int(time.time() * 1000),
            private_key=private_key,
        )

    @cached_property
    def alg(self) -> str:
        """``ES256`` or ``RS256``: written into the header of every token this key signs, and
        the only ``alg`` a token naming this key's ``kid`` may have."""
        alg = _algorithm_of(self.private_key)
        assert alg is not None  # __post_init__ refused any other key
        return alg

    @cached_property
    def public_key(self) -> PublicKey:
        # Derived once: every token verification looks it up.
        return self.private_key.public_key()

    @cached_property
    def signature_bytes(self) -> int:
        """The length of this key's JWS signatures: 64 for ES256 (``r‖s``, RFC 7518 §3.4), the
        modulus length for RS256 (256 for RSA-2048)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return (self.private_key.key_size + 7) // 8
        return 64

    def public_jwk(self) -> dict[str, Any]:
        public = self.public_key
        jwk: dict[str, Any]
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            jwk = {"kty": "RSA", "n": _b64_uint(numbers.n), "e": _b64_uint(numbers.e)}
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


@dataclass(frozen=True)
class KeySet:
    """Signing keys, newest first, and the refresh-token MAC secret."""

    keys: tuple[SigningKey, ...]
    refresh_secret: bytes

    @property
    def signing_key(self) -> SigningKey:
        return self.keys[0]

    def key(self, kid: str) -> SigningKey | None:
        """The key named ``kid``, or None."""
        for key in self.keys:
            if key.kid == kid:
                return key
        return None

    def public_key(self, kid: str) -> PublicKey | None:
        key = self.key(kid)
        return None if key is None else key.public_key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    @classmethod
    def generate(cls, alg: str = DEFAULT_ALGORITHM) -> KeySet:
        return cls(keys=(SigningKey.generate(alg),), refresh_secret=secrets.token_bytes(32))

    def rotated(self, alg: str = DEFAULT_ALGORITHM) -> KeySet:
        """A new set with a fresh ``alg`` signing key in front, keeping at most
        :data:`MAX_KEYS`; the older keys keep their own algorithms."""
        keys = (SigningKey.generate(alg), *self.keys)[:MAX_KEYS]
        return KeySet(keys=keys, refresh_secret=self.refresh_secret)

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> str:
        doc = {
            "version": 1,
            "refreshSecret": base64.urlsafe_b64encode(self.refresh_secret).decode(),
            "keys": [
                {
                    "kid": k.kid,
                    "alg": k.alg,
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
                alg = entry.get("alg")
                if alg not in ALGORITHMS:
                    raise KeySetError(f"key {entry.get('kid')!r}: unsupported alg {alg!r}")
                private = serialization.load_pem_private_key(
                    entry["privateKey"].encode(), password=None
                )
                # The declared alg must be the key's: an RSA key listed as ES256 (or the
                # reverse) is a damaged file, not a choice.
                if _algorithm_of(private) != alg:
                    raise KeySetError(
                        f"key {entry['kid']!r} is not an "
                        + (
                            f"RSA key of at least {RSA_KEY_BITS} bits with a public exponent "
                            f"of at least {RSA_MIN_EXPONENT}"
                            if alg == "RS256"
                            else "P-256 key"
                        )
                        + f" as its alg {alg} requires"
                    )
                assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
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


def load_or_create_key_file(path: Path, alg: str = DEFAULT_ALGORITHM) -> KeySet:
    """Read the key set at ``path``, generating it (once, under a lock, with an ``alg`` key) if
    it does not exist. An existing set is read as it is, whatever ``alg`` says."""
    with _FileLock(path):
        if not path.exists():
            _write_atomically(path, KeySet.generate(alg).to_json())
        return KeySet.from_json(path.read_text())


def rotate_key_file(path: Path, alg: str = DEFAULT_ALGORITHM) -> str:
    """Put a new ``alg`` signing key in front of the key set at ``path``; return its ``kid``."""
    with _FileLock(path):
        current = KeySet.from_json(path.read_text()) if path.exists() else KeySet.generate(alg)
        rotated = current.rotated(alg)
        _write_atomically(path, rotated.to_json())
    return rotated.signing_key.kid


class KeyRing:
    """The key set one instance uses, reloaded when another process rotates the file.

    Reloads are cheap ``stat`` calls at most every :data:`RELOAD_INTERVAL` seconds, and also on
    a ``kid`` this instance does not know (a rotation elsewhere that it has not seen yet).
    """

    def __init__(
        self,
        *,
        path: Path | None = None,
        inline: str | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
    ) -> None:
        """``algorithm`` is that of the key a missing file is created with."""
        if inline is not None:
            self._path: Path | None = None
            self._set = KeySet.from_json(inline)
        elif path is not None:
            self._path = path
            self._set = load_or_create_key_file(path, algorithm)
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

    def key(self, kid: str) -> SigningKey | None:
        """The key named ``kid`` (looking at the file again, at most once a second, for a
        ``kid`` not in the set), or None."""
        key = self.current.key(kid)
        if key is None and self._maybe_reload(force=True):
            key = self._set.key(kid)
        return key

    def public_key(self, kid: str) -> PublicKey | None:
        key = self.key(kid)
        return None if key is None else key.public_key

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
