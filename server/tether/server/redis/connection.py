"""Connecting to Redis (standalone or Cluster) and loading Tether's Lua scripts.

``redis+cluster://host:port`` (or ``rediss+cluster://``) selects Redis Cluster; any other URL is
a standalone server. Commands are retried a bounded number of times on connection errors and
time-outs: every script Tether runs gives the same answer when retried after a lost reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextvars import ContextVar
from importlib import resources
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from tether.server.compat.redis import (
    NodeHookedCluster,
    closed_as_connection_error,
    node_of_command,
)

RedisClient: TypeAlias = "Redis | RedisCluster"

#: Seconds before a Redis command is abandoned (and the request answered ``unavailable``).
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
#: Connections one client keeps to a standalone Redis, and commands (or pipelines) one Cluster
#: client has in flight on one node; callers beyond it wait their turn, up to SOCKET_TIMEOUT.
MAX_CONNECTIONS = 64


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: fit for a message or a log.

    The user information ends at the *last* ``@`` (as redis-py reads it, the host and path
    follow): urlsplit would take a password pasted with an unencoded ``/``, ``#`` or ``?`` for
    the start of the path, find no password, and the URL would be shown whole."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url  # a user name only: no password to hide
    return f"{scheme}://{user}:***@{host}"


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


def dedicated(client: RedisClient) -> RedisClient | None:
    """A client with one connection of its own to ``client``'s standalone server, for a long
    blocking read (a partition's commit watcher) that must not hold a connection of the shared
    pool of :data:`MAX_CONNECTIONS`; ``None`` for a cluster client, whose blocking reads take no
    turn (:func:`without_turns`). Close it with ``aclose()``."""
    if isinstance(client, RedisCluster):
        return None
    pool = client.connection_pool
    own = BlockingConnectionPool(
        connection_class=pool.connection_class,
        max_connections=1,
        timeout=SOCKET_TIMEOUT,
        **pool.connection_kwargs,
    )
    return Redis(connection_pool=own)


#: The cluster nodes (by name) on which the running task holds a turn: the commands a pipeline
#: re-sends one by one after a redirect run inside its turn and must not wait for a second one.
_TURNS_HELD: ContextVar[frozenset[str]] = ContextVar("tether_cluster_turns", default=frozenset())
#: Set while the running task's calls take no turn (see :func:`without_turns`).
_NO_TURNS: ContextVar[bool] = ContextVar("tether_cluster_no_turns", default=False)


@contextlib.contextmanager
def without_turns() -> Iterator[None]:
    """Calls made in this block take no turn on a Cluster node (a no-op elsewhere).

    For the one blocking read of each instance's commit watcher: it must not queue behind a
    burst of commands on the data node (fan-out would wait, and a wait past the timeout would
    make every subscription re-run). One connection per instance above the bound is well within
    redis-py's 100 per node.
    """
    token = _NO_TURNS.set(True)
    try:
        yield
    finally:
        _NO_TURNS.reset(token)


class _RedisCluster(NodeHookedCluster):
    """A cluster client that waits for its turn on a node under a burst, and whose failure to
    learn the cluster's layout is a connection error.

    redis-py's cluster client has no blocking pool: past ``max_connections`` on a node it raises
    ``MaxConnectionsError``, so a burst (a reconnect storm authenticating thousands of sockets)
    was answered as an outage. This client keeps at most :data:`MAX_CONNECTIONS` commands and
    pipelines in flight *per node*; the others wait, as a standalone client waits for its
    ``BlockingConnectionPool``, and fail as an outage only after :data:`SOCKET_TIMEOUT`. Per
    node, so that a node that stalls (a partition, not a refused connection) holds up the
    commands for its own slots and no others.

    redis-py raises ``RedisClusterException`` when no node answers or the slots are not all
    covered (every command of a client that lost its nodes first re-reads the layout). That is
    no ``RedisError``: an outage would reach callers as an unexpected exception (HTTP 500,
    ``internal``) instead of the ``unavailable`` of a standalone server's outage.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def turns(self, nodes: Iterable[str]) -> AsyncIterator[None]:
        """Hold a turn on each of ``nodes`` (names) that this task does not hold one on yet,
        taken in name order; a connection error when they are not all free within
        :data:`SOCKET_TIMEOUT`."""
        if _NO_TURNS.get():
            yield
            return
        held = _TURNS_HELD.get()
        wanted = sorted(set(nodes) - held)
        taken: list[asyncio.Semaphore] = []
        try:
            try:
                async with asyncio.timeout(SOCKET_TIMEOUT):
                    for name in wanted:
                        turns = self._turns.get(name)
                        if turns is None:
                            turns = self._turns[name] = asyncio.Semaphore(MAX_CONNECTIONS)
                        await turns.acquire()
                        taken.append(turns)
            except TimeoutError:
                raise RedisConnectionError("too many Redis commands waiting for a node") from None
            token = _TURNS_HELD.set(held.union(wanted))
            try:
                yield
            finally:
                _TURNS_HELD.reset(token)
        finally:
            for turns in taken:
                turns.release()

    def around_node(self, node_name: str) -> contextlib.AbstractAsyncContextManager[None]:
        # Each attempt of every command reaches its node through here (redirects inside it).
        return self.turns((node_name,))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        super().pipeline(transaction, shard_hint)  # its checks of the arguments
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # typing only

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unreachable: {exc}") from exc


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline that holds a turn on the node of its first command while it runs.

    Most of Tether's pipelines go to one node (a commit stream read, one session's lookup);
    those that span nodes (a sign-in's writes, the re-check's lookups) are bounded on their
    first node only, and their other nodes' parts go unbounded.
    """

    def __init__(self, client: _RedisCluster, transaction: Any | None = None) -> None:
        super().__init__(client, transaction)
        self._owner = client
        self._first: tuple[Any, ...] | None = None

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._first is None:
            self._first = args
        return super().execute_command(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        client, first, self._first = self._owner, self._first, None
        try:
            node = None if first is None else await node_of_command(client, first)
            async with client.turns(() if node is None else (node,)):
                # A pipeline reaches its nodes outside the per-command hook: a connection
                # closed under it (a failover reloading the slot map) must be a ConnectionError
                # here too, not an AttributeError that no caller expects.
                with closed_as_connection_error(node or "a cluster node"):
                    return await super().execute(*args, **kwargs)
        except RedisClusterException as exc:
            # No node serves a slot (mid-failover): an outage, as for single commands.
            raise RedisConnectionError(f"Redis Cluster unavailable: {exc}") from exc


class Script:
    """One of Tether's Lua scripts: called by its SHA1 (``EVALSHA``), and sent in full
    (``EVAL``) to a node that does not have it (a restart, ``SCRIPT FLUSH``, a replica promoted
    by a failover, a node added to a Cluster).

    redis-py's own script object answers ``NOSCRIPT`` with ``SCRIPT LOAD``, which on a Cluster
    goes to every master: while any master was down (until its replica takes over), no script
    missing on its node could run anywhere. ``EVAL`` goes to the node of the script's keys only,
    and caches the script there. Sending it again is safe: the script did not run when
    ``NOSCRIPT`` came back.
    """

    __slots__ = ("client", "script", "sha")

    def __init__(self, client: RedisClient, script: str) -> None:
        self.client = client
        self.script = script
        # The name Redis gives a script (not a security use of SHA-1).
        self.sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.script, len(keys), *keys, *args)


def load_script(client: RedisClient, package: str, name: str) -> Script:
    """``lua/<name>.lua`` beside the modules of ``package`` (the caller's subsystem, which
    keeps its scripts next to the code that calls them) as a :class:`Script` on ``client``."""
    text = resources.files(package).joinpath("lua", f"{name}.lua").read_text()
    return Script(client, text)
