"""Sign and verify cost of the JWS algorithms Tether could sign access tokens with, under PyJWT.

Run from the repository root::

    .venv/bin/python bench/jwt_algorithms.py [--batch-ms 200] [--batches 15]

For each algorithm the script times ``jwt.encode`` (sign) and ``jwt.decode`` (verify, with the
options Tether's :class:`tether.server.auth.tokens.AccessTokens` passes), and the bare signature
primitive of ``cryptography`` ("raw"), which shows how much of each figure is the algorithm and how
much is JOSE (base64url, JSON, claim checks). HS256 is the symmetric reference measured in the same
run; the last rows are Tether's own ``AccessTokens.issue``/``verify`` (ES256 and RS256, each
plus its header and claim checks) when the ``server`` package is importable.

Rounds are interleaved across all rows, so drift on a noisy machine spreads over every figure.
Each figure is the median over ``--batches`` timed batches of the microseconds per operation,
by ``time.perf_counter`` (wall). On a shared machine a batch can lose the CPU part-way, so the
same batches are also timed by ``time.thread_time`` (CPU time of this thread), which descheduling
does not inflate; where the two disagree much, the machine was busy and the CPU figure is the
better estimate of cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cryptography
import jwt
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://tether.example"
AUDIENCE = "tether"
NOW = int(time.time())
#: Shaped like the claims Tether issues, with ids as long as its own.
CLAIMS: dict[str, Any] = {
    "iss": ISSUER,
    "aud": AUDIENCE,
    "sub": secrets.token_urlsafe(16),
    "sid": secrets.token_urlsafe(16),
    "iat": NOW,
    "exp": NOW + 3600,
    "jti": secrets.token_urlsafe(12),
}
DECODE_OPTIONS: dict[str, Any] = {
    "require": ["iss", "aud", "sub", "sid", "iat", "exp", "jti"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "strict_aud": True,
}
#: What the raw primitives sign: about the size of a token's signing input.
MESSAGE = os.urandom(300)
KINDS = ("sign", "verify", "raw sign", "raw verify")


@dataclass
class Row:
    name: str
    token: str
    jobs: dict[str, Callable[[], object]]
    jwk_bytes: int | None = None
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RawPair:
    sign: Callable[[], object]
    verify: Callable[[], object]


def _jwk_bytes(jwk: str) -> int:
    doc = json.loads(jwk) | {"kid": secrets.token_urlsafe(12), "alg": "ES256", "use": "sig"}
    return len(json.dumps(doc, separators=(",", ":")))


def pyjwt_row(name: str, alg: str, private: Any, public: Any, raw: RawPair, jwk: int | None) -> Row:
    headers = {"kid": secrets.token_urlsafe(12), "typ": "at+jwt"}

    def sign() -> str:
        return jwt.encode(CLAIMS, private, algorithm=alg, headers=headers)

    token = sign()

    def verify() -> object:
        return jwt.decode(
            token,
            public,
            algorithms=[alg],
            audience=AUDIENCE,
            issuer=ISSUER,
            options=DECODE_OPTIONS,
        )

    assert verify() == CLAIMS  # the pair round-trips
    jobs = {"sign": sign, "verify": verify, "raw sign": raw.sign, "raw verify": raw.verify}
    return Row(name, token, jobs, jwk)


def rows() -> list[Row]:
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_sig = ed.sign(MESSAGE)
    ed_raw = RawPair(lambda: ed.sign(MESSAGE), lambda: ed.public_key().verify(ed_sig, MESSAGE))

    p256 = ec.generate_private_key(ec.SECP256R1())
    ecdsa = ec.ECDSA(hashes.SHA256())
    p256_sig = p256.sign(MESSAGE, ecdsa)
    p256_raw = RawPair(
        lambda: p256.sign(MESSAGE, ecdsa),
        lambda: p256.public_key().verify(p256_sig, MESSAGE, ecdsa),
    )

    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = padding.PKCS1v15()
    rsa_sig = rsa2048.sign(MESSAGE, pkcs1, hashes.SHA256())
    rsa_raw = RawPair(
        lambda: rsa2048.sign(MESSAGE, pkcs1, hashes.SHA256()),
        lambda: rsa2048.public_key().verify(rsa_sig, MESSAGE, pkcs1, hashes.SHA256()),
    )

    secret = os.urandom(32)

    def hmac_sha256() -> bytes:
        h = hmac.HMAC(secret, hashes.SHA256())
        h.update(MESSAGE)
        return h.finalize()

    mac = hmac_sha256()

    def hmac_verify() -> None:
        h = hmac.HMAC(secret, hashes.SHA256())
        h.update(MESSAGE)
        h.verify(mac)

    table = [
        pyjwt_row(
            "EdDSA (Ed25519)",
            "EdDSA",
            ed,
            ed.public_key(),
            ed_raw,
            _jwk_bytes(OKPAlgorithm.to_jwk(ed.public_key())),
        ),
        pyjwt_row(
            "ES256 (P-256)",
            "ES256",
            p256,
            p256.public_key(),
            p256_raw,
            _jwk_bytes(ECAlgorithm.to_jwk(p256.public_key())),
        ),
        pyjwt_row(
            "RS256 (RSA-2048)",
            "RS256",
            rsa2048,
            rsa2048.public_key(),
            rsa_raw,
            _jwk_bytes(RSAAlgorithm.to_jwk(rsa2048.public_key())),
        ),
        pyjwt_row(
            "HS256 (reference)", "HS256", secret, secret, RawPair(hmac_sha256, hmac_verify), None
        ),
    ]
    return [*table, *tether_rows()]


def tether_rows() -> list[Row]:
    """Tether's own ``AccessTokens``, one row per signing algorithm; none when ``server`` is
    not importable."""
    try:
        from tether.server.auth.signing_keys import ALGORITHMS
    except ImportError:
        return []
    return [tether_row(alg) for alg in ALGORITHMS]


def tether_row(alg: str) -> Row:
    """Tether's own ``AccessTokens`` with a key set whose signing key is ``alg``."""
    from tether.server.auth.signing_keys import KeyRing, KeySet
    from tether.server.auth.tokens import AccessTokens

    tokens = AccessTokens(
        KeyRing(inline=KeySet.generate(alg).to_json()), issuer=ISSUER, audience=AUDIENCE, leeway=5
    )

    def issue() -> str:
        return tokens.issue(
            user_id=CLAIMS["sub"], session_id=CLAIMS["sid"], now=NOW, expires_at=NOW + 3600
        )

    token = issue()
    jobs = {"sign": issue, "verify": lambda: tokens.verify(token, now=NOW)}
    return Row(f"Tether AccessTokens ({alg})", token, jobs)


def calibrate(fn: Callable[[], object], batch_ms: float) -> int:
    """Operations per batch so that one batch lasts about ``batch_ms``."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed > 0.02:
            return max(1, int(n * batch_ms / 1000 / elapsed))
        n *= 2


def timed_batch(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Microseconds per operation over ``n`` calls: (wall, CPU of this thread)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - wall) / n * 1e6, (time.thread_time() - cpu) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-ms", type=float, default=200.0, help="length of a batch [200]")
    parser.add_argument("--batches", type=int, default=15, help="timed batches per figure [15]")
    args = parser.parse_args()

    table = rows()
    jobs = [(row, kind, fn) for row in table for kind, fn in row.jobs.items()]
    sizes = {(row.name, kind): calibrate(fn, args.batch_ms) for row, kind, fn in jobs}
    for _ in range(args.batches):
        for row, kind, fn in jobs:
            wall, cpu = timed_batch(fn, sizes[(row.name, kind)])
            row.wall.setdefault(kind, []).append(wall)
            row.cpu.setdefault(kind, []).append(cpu)

    def median(samples: dict[str, list[float]], kind: str) -> str:
        return f"{statistics.median(samples[kind]):.1f}" if kind in samples else ""

    hs256 = next(row for row in table if row.name.startswith("HS256"))
    reference = statistics.median(hs256.cpu["verify"])
    print(
        f"PyJWT {jwt.__version__}, cryptography {cryptography.__version__} "
        f"({backend.openssl_version_text()}), Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; median of {args.batches} batches of ~{args.batch_ms:.0f} ms"
    )
    print()
    columns = [
        "algorithm",
        *(f"{kind} µs" for kind in KINDS),
        "sign CPU µs",
        "verify CPU µs",
        "verify CPU ÷ HS256",
        "token bytes",
        "signature bytes",
        "public JWK bytes",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in table:
        cells = [
            row.name,
            *(median(row.wall, kind) for kind in KINDS),
            median(row.cpu, "sign"),
            median(row.cpu, "verify"),
            f"{statistics.median(row.cpu['verify']) / reference:.2f}",
            str(len(row.token)),
            str(len(row.token.rpartition(".")[2])),
            str(row.jwk_bytes) if row.jwk_bytes else "",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        "µs per operation. sign/verify: PyJWT encode/decode; raw: the cryptography primitive "
        "alone on 300 bytes. Wall columns use time.perf_counter, CPU columns time.thread_time. "
        "Sizes: the compact token, its base64url signature segment, the public JWK as compact "
        "JSON with kid, alg and use."
    )


if __name__ == "__main__":
    main()
