"""Rate limits kept in Redis, so every instance of a deployment counts together.

Each limit is a fixed-window counter (``lua/rate_limit.lua``) named by a scope string, e.g.
``signin:acct:alice@example.com``. Limits are settings (:class:`tether.server.settings.Rate`).
"""

from __future__ import annotations

import hashlib
import math

from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient, load_script
from tether.server.settings import Rate


class RateLimiter:
    def __init__(self, redis: RedisClient) -> None:
        self._script = load_script(redis, "tether.server.auth", "rate_limit")

    async def _call(self, scope: str, rate: Rate, mode: str) -> int | None:
        # Scopes may hold e-mail addresses: hash them so Redis keys carry no personal data.
        digest = hashlib.sha256(scope.encode()).hexdigest()[:32]
        wait_ms = int(
            await self._script(
                keys=[redis_keys.rate_limit(digest)],
                args=[rate.count, rate.seconds * 1000, mode],
            )
        )
        return max(1, math.ceil(wait_ms / 1000)) if wait_ms > 0 else None

    async def hit(self, scope: str, rate: Rate) -> int | None:
        """Count one event; ``None`` if allowed, else the seconds to wait (``Retry-After``)."""
        return await self._call(scope, rate, "hit")

    async def refund(self, scope: str, rate: Rate) -> None:
        """Take back one :meth:`hit` that turned out not to count (e.g. a correct password)."""
        await self._call(scope, rate, "refund")
