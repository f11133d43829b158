"""Connecting to Redis (standalone or Cluster) and loading Tether's Lua scripts.

``redis+cluster://host:port`` (or ``rediss+cluster://``) selects Redis Cluster; any other URL is
a standalone server. Commands are retried a bounded number of times on connection errors and
time-outs: every script Tether runs gives the same answer when retried after a lost reply.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

RedisClient: TypeAlias = "Redis | RedisCluster"

#: Seconds before a Redis command is abandoned (and the request answered ``unavailable``).
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
#: Connections one client keeps to a standalone Redis; callers beyond it wait their turn.
MAX_CONNECTIONS = 64


def connect(url: str) -> RedisClient:
    """A client for ``url`` with bounded retries; it connects lazily on first use."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": retry,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            plain = url.replace("+cluster", "", 1)
            return _RedisCluster.from_url(plain, **common)
    # A burst (thousands of sockets authenticating at once) waits for a pooled connection
    # instead of failing as if Redis were down.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT,
        health_check_interval=15,
        **common,
    )
    return Redis(connection_pool=pool)


class _RedisCluster(RedisCluster):
    """A cluster client whose failure to learn the cluster's layout is a connection error.

    redis-py raises ``RedisClusterException`` when no node answers or the slots are not all
    covered (every command of a client that lost its nodes first re-reads the layout). That is
    no ``RedisError``: an outage would reach callers as an unexpected exception (HTTP 500,
    ``internal``) instead of the ``unavailable`` of a standalone server's outage.
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unreachable: {exc}") from exc


def load_script(client: RedisClient, name: str) -> AsyncScript:
    """Register ``server/lua/<name>.lua``: called by SHA, re-sent in full after SCRIPT FLUSH."""
    text = resources.files("server").joinpath("lua", f"{name}.lua").read_text()
    return client.register_script(text)
