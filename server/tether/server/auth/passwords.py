"""Password hashing with argon2id, off the event loop.

Hashing costs ~100 ms of CPU and tens of MiB by design; it runs on a small bounded thread pool
(``TETHER_HASH_WORKERS``) so the event loop keeps serving sockets meanwhile, and at most that many
hashes hold their memory at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tether.server.settings import Settings

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.hash_workers, thread_name_prefix="argon2"
        )
        # Compared against when the e-mail is unknown, so that case costs what a wrong
        # password costs and the two answers cannot be told apart by time.
        self._dummy_hash = self._hasher.hash("tether-dummy-password")

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True if ``password`` matches; with ``stored_hash=None`` burn the same time, False."""

        def work() -> bool:
            try:
                return self._hasher.verify(stored_hash or self._dummy_hash, password) and (
                    stored_hash is not None
                )
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, work)

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
