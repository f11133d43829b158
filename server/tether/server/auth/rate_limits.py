"""Rate limits kept in Redis, so every instance of a deployment counts together.

Each limit is a fixed-window counter (``lua/rate_limit.lua``) named by a scope string, e.g.
``signin:acct:alice@example.com``. Limits are settings (:class:`tether.server.settings.Rate`).

Every hit carries a random id (:func:`new_call`): the script keeps the ids of the window's
allowed hits, so a call that redis-py sends again after its reply was lost is not counted twice,
and a refund takes back the one hit it names, once.
"""

from __future__ import annotations

import hashlib
import math
import secrets

from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient, load_script
from tether.server.settings import Rate


def new_call() -> str:
    """A fresh id for one :meth:`RateLimiter.hit` (to pass to its :meth:`RateLimiter.refund`)."""
    return secrets.token_hex(8)


class RateLimiter:
    def __init__(self, redis: RedisClient) -> None:
        self._script = load_script(redis, "tether.server.auth", "rate_limit")

    async def _call(self, scope: str, rate: Rate, mode: str, call: str) -> int | None:
        # Scopes may hold e-mail addresses: hash them so Redis keys carry no personal data.
        digest = hashlib.sha256(scope.encode()).hexdigest()[:32]
        wait_ms = int(
            await self._script(
                keys=[redis_keys.rate_limit(digest), redis_keys.rate_limit_calls(digest)],
                args=[rate.count, rate.seconds * 1000, mode, call],
            )
        )
        return max(1, math.ceil(wait_ms / 1000)) if wait_ms > 0 else None

    async def hit(self, scope: str, rate: Rate, call: str | None = None) -> int | None:
        """Count one event; ``None`` if allowed, else the seconds to wait (``Retry-After``).

        ``call`` (from :func:`new_call`) names the hit for a later :meth:`refund`."""
        return await self._call(scope, rate, "hit", call or new_call())

    async def refund(self, scope: str, rate: Rate, call: str) -> None:
        """Take back the allowed :meth:`hit` ``call`` that turned out not to count (e.g. a
        correct password); nothing if that hit was not counted in the current window."""
        await self._call(scope, rate, "refund", call)
