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
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tether.server.compat.redis import (
    NodeHookedCluster,
    cancel_safe,
    cancel_safe_cluster,
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
#: Commands one auto-pipelined batch carries at most (:class:`AutoPipeline`), by default
#: (``TETHER_REDIS_PIPELINE_MAX_COMMANDS``, given to :func:`connect`); a fuller turn
#: sends several batches, side by side on their own connections. The bound keeps one batch's
#: write and replies (each script call carries a commit's documents) to a few hundred kB, and
#: keeps its first caller from waiting on the replies of thousands of others; past a few dozen
#: commands a batch saves no more round trips worth having.
PIPELINE_MAX_COMMANDS = 64


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


def connect(url: str, *, pipeline_max_commands: int = PIPELINE_MAX_COMMANDS) -> RedisClient:
    """A client for ``url`` with bounded retries; it connects lazily on first use. A standalone
    client's :class:`AutoPipeline` carries at most ``pipeline_max_commands`` commands a batch
    (``TETHER_REDIS_PIPELINE_MAX_COMMANDS``)."""
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
    # Writes that never swallow a cancellation (see tether.server.compat.redis.cancel_safe);
    # the pool builds its connections from this class, on first use.
    pool.connection_class = cancel_safe(pool.connection_class)
    client = Redis(connection_pool=pool)
    setattr(client, _AUTO_PIPELINE_ATTR, AutoPipeline(client, pipeline_max_commands))
    return client


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
        cancel_safe_cluster(self)

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


class _Batch:
    """The commands asked for in one turn of ``loop``: each one's arguments and its caller's
    future."""

    __slots__ = ("calls", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []


class AutoPipeline:
    """Sends the commands that concurrent tasks ask for in one turn of the event loop to a
    standalone Redis as one pipeline: one connection checkout, one write, one read of the
    replies, instead of a round trip each.

    Each caller gets its own reply, or its own error: a command's error (a script's, a
    ``NOSCRIPT``) is that caller's alone. Each caller is answered as its reply is read;
    after a connection error or time-out only the commands not answered yet are sent again
    (the client's bounded retries, as for a single command), and an error that outlasts them
    reaches every caller not answered yet. A caller that is cancelled does not
    cancel the batch: its reply is read and dropped, so no connection goes back to the pool with
    replies unread; one cancelled before its batch was sent is left out of it. A batch carries
    at most ``max_commands`` commands (:data:`PIPELINE_MAX_COMMANDS` unless :func:`connect` was
    told otherwise).

    Not for blocking commands (``XREAD BLOCK``, ``BLPOP``): one would hold up every reply
    behind it in its batch.
    """

    __slots__ = ("_batch", "_sending", "client", "max_commands")

    def __init__(self, client: Redis, max_commands: int = PIPELINE_MAX_COMMANDS) -> None:
        if max_commands < 1:
            raise ValueError("max_commands must be positive")
        self.client = client
        self.max_commands = max_commands
        self._batch: _Batch | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """Command ``args`` (``"EVALSHA", sha, numkeys, ...``) in the next batch: its reply."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or batch.loop is not loop:
            batch = self._batch = _Batch(loop)
            # The task's first step runs after every callback already queued in this turn:
            # the commands they ask for join the batch before it is sent.
            task = loop.create_task(self._send(batch))
            # Held until done: the loop keeps only weak references to tasks.
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        waiter: asyncio.Future[Any] = loop.create_future()
        batch.calls.append((args, waiter))
        if len(batch.calls) >= self.max_commands:
            self._batch = None  # full: the next command starts a batch of its own
        return await waiter

    async def _send(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        calls = [(args, waiter) for args, waiter in batch.calls if not waiter.done()]
        try:
            if len(calls) == 1:
                # One command, without a pipeline's overhead.
                args, waiter = calls[0]
                try:
                    reply = await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
                except Exception as exc:
                    _answer(waiter, exc)
                else:
                    _answer(waiter, reply)
                return
            if not calls:
                return
            try:
                await self._pipeline(calls)
            except Exception as exc:
                for _, waiter in calls:
                    _answer(waiter, exc)  # those not answered before the error
        finally:
            # Only when this task itself was cancelled (the loop shutting down) or failed
            # unexpectedly: no caller waits forever.
            for _, waiter in calls:
                if not waiter.done():
                    waiter.cancel()

    async def _pipeline(self, calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """Send ``calls`` on one connection and answer each caller as its reply is read. After a
        connection error (with the client's bounded retries) only the commands not answered yet
        are sent again: a command whose reply was read must not run twice (a rate-limit hit
        would count twice). redis-py's pipeline re-sends all of them, so it is not used."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        pending = calls

        async def attempt() -> None:
            nonlocal pending
            await conn.send_packed_command(conn.pack_commands([args for args, _ in pending]))
            while pending:
                args, waiter = pending[0]
                try:
                    reply = await self.client.parse_response(conn, args[0])
                except ResponseError as exc:  # this command's error, in its place
                    reply = exc
                pending = pending[1:]
                _answer(waiter, reply)

        try:
            await conn.retry.call_with_retry(attempt, lambda _: conn.disconnect())
        finally:
            if pending:  # replies left unread: the connection must not serve anyone else
                await conn.disconnect()
            await pool.release(conn)


def _answer(waiter: asyncio.Future[Any], reply: Any) -> None:
    if waiter.done():  # its caller was cancelled (its socket went, its time ran out)
        return
    if isinstance(reply, BaseException):
        waiter.set_exception(reply)
    else:
        waiter.set_result(reply)


#: The attribute of a standalone client that holds its auto-pipeline (on the client itself,
#: so that the two go together: a map from client to pipeline would keep every client alive).
_AUTO_PIPELINE_ATTR = "_tether_auto_pipeline"


def auto_pipeline(client: RedisClient) -> AutoPipeline | None:
    """``client``'s :class:`AutoPipeline` (one per client, shared by every caller), or ``None``
    for a Cluster client, whose commands go one by one to their own nodes, and for a client
    built with ``single_connection_client`` (its commands take its one connection, which it
    holds for good: a batch would wait for another)."""
    if isinstance(client, RedisCluster) or client.single_connection_client:
        return None
    pipeline: AutoPipeline | None = getattr(client, _AUTO_PIPELINE_ATTR, None)
    if pipeline is None:
        pipeline = AutoPipeline(client)
        setattr(client, _AUTO_PIPELINE_ATTR, pipeline)
    return pipeline


class Script:
    """One of Tether's Lua scripts: called by its SHA1 (``EVALSHA``), and sent in full
    (``EVAL``) to a node that does not have it (a restart, ``SCRIPT FLUSH``, a replica promoted
    by a failover, a node added to a Cluster).

    redis-py's own script object answers ``NOSCRIPT`` with ``SCRIPT LOAD``, which on a Cluster
    goes to every master: while any master was down (until its replica takes over), no script
    missing on its node could run anywhere. ``EVAL`` goes to the node of the script's keys only,
    and caches the script there. Sending it again is safe: the script did not run when
    ``NOSCRIPT`` came back.

    On a standalone server the calls go through the client's :class:`AutoPipeline`: the scripts
    that concurrent mutations run in one turn of the event loop travel as one pipeline.
    """

    __slots__ = ("_pipeline", "client", "script", "sha")

    def __init__(self, client: RedisClient, script: str) -> None:
        self.client = client
        self.script = script
        # The name Redis gives a script (not a security use of SHA-1).
        self.sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._pipeline = auto_pipeline(client)

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        pipeline = self._pipeline
        if pipeline is None:
            try:
                return await self.client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self.client.eval(self.script, len(keys), *keys, *args)
        try:
            return await pipeline.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await pipeline.execute("EVAL", self.script, len(keys), *keys, *args)


def load_script(client: RedisClient, package: str, name: str) -> Script:
    """``lua/<name>.lua`` beside the modules of ``package`` (the caller's subsystem, which
    keeps its scripts next to the code that calls them) as a :class:`Script` on ``client``."""
    text = resources.files(package).joinpath("lua", f"{name}.lua").read_text()
    return Script(client, text)
