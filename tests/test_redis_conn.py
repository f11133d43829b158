"""The Redis clients Tether makes (``server/tether/server/redis/connection.py``) under a burst: far
more commands in flight at once than the client keeps connections, as in a reconnect storm after a
deploy, when thousands of sockets authenticate together. The burst must wait its turn — not fail as
if Redis were down, and not open a connection per command — on one server and on a Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from tether.server.redis.connection import (
    MAX_CONNECTIONS,
    RedisClient,
    connect,
    redact_url,
    without_turns,
)

from tests.harness import RedisClusterProcess, RedisProcess, lost_cancellations

#: Commands in flight at once: well past MAX_CONNECTIONS and redis-py's own default of 100.
BURST = 400


async def connected_clients(port: int) -> int:
    """Client connections a node holds, not counting the one that asks."""
    async with redis.asyncio.Redis(host="127.0.0.1", port=port) as probe:
        info = await probe.info("clients")
    return int(info["connected_clients"]) - 1


async def pipelined(client: RedisClient, key: str) -> int:
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.get(key)
        value, _ = await pipe.execute()
    return int(value)


async def burst(client: RedisClient, key: str) -> None:
    """BURST single commands at once, then BURST pipelines at once, all on ``key``: each one
    holds a connection until its reply is read, so without a bound all are in flight together."""
    counts = await asyncio.gather(*(client.incr(key) for _ in range(BURST)))
    assert sorted(counts) == list(range(1, BURST + 1))
    counts = await asyncio.gather(*(pipelined(client, key) for _ in range(BURST)))
    assert sorted(counts) == list(range(BURST + 1, 2 * BURST + 1))


async def test_a_burst_on_one_redis_waits_for_pooled_connections(redis_proc: RedisProcess) -> None:
    client = connect(redis_proc.url)
    try:
        await burst(client, "burst")
        assert await connected_clients(redis_proc.port) <= MAX_CONNECTIONS
    finally:
        await client.aclose()


async def test_a_burst_on_a_cluster_waits_its_turn(cluster: RedisClusterProcess) -> None:
    # redis-py's cluster client keeps at most 100 connections per node and raises
    # MaxConnectionsError past them (a ConnectionError: answered "unavailable"). One hash tag
    # puts the whole burst on one node.
    client = connect(cluster.url)
    try:
        # Loaded first, as an instance's client is by its start-up work before any socket comes.
        # (redis-py loading the layout while many first commands are in flight is a race of its
        # own: some fail, some retried INCRs run twice; not what this test is about.)
        assert await client.ping()
        await burst(client, "{burst}:counter")
        for port in cluster.ports:
            assert await connected_clients(port) <= MAX_CONNECTIONS
    finally:
        await client.aclose()


async def keys_on_two_nodes(client: RedisClient) -> tuple[str, str]:
    """Two keys whose slots two different masters serve."""
    assert isinstance(client, redis.asyncio.RedisCluster)
    first = "{stall}:k"
    node = client.get_node_from_key(first)
    for i in range(100):
        other = f"{{free-{i}}}:k"
        if client.get_node_from_key(other) != node:
            return first, other
    raise AssertionError("every key on one node")


async def test_a_stalled_node_holds_up_its_own_commands_only(
    cluster: RedisClusterProcess,
) -> None:
    # The turns are per node: a master that stalls (a partition, a pause) with every turn on it
    # taken must not hold up commands and pipelines for the other masters' slots.
    client = connect(cluster.url)
    try:
        assert await client.ping()
        stalled_key, free_key = await keys_on_two_nodes(client)
        assert isinstance(client, redis.asyncio.RedisCluster)
        stalled = client.get_node_from_key(stalled_key)
        async with redis.asyncio.Redis(host=stalled.host, port=stalled.port) as node:
            await node.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        stuck = [asyncio.create_task(client.incr(stalled_key)) for _ in range(MAX_CONNECTIONS + 20)]
        await asyncio.sleep(0.2)  # every turn on the stalled node is taken, 20 wait
        assert not any(task.done() for task in stuck)
        started = asyncio.get_running_loop().time()
        assert await client.incr(free_key) == 1
        assert await pipelined(client, free_key) == 2
        assert asyncio.get_running_loop().time() - started < 0.5
        # And the stalled node's commands all complete once it answers again.
        assert sorted(await asyncio.gather(*stuck)) == list(range(1, MAX_CONNECTIONS + 21))
    finally:
        await client.aclose()


async def test_calls_without_turns_pass_a_node_whose_turns_are_all_taken(
    cluster: RedisClusterProcess,
) -> None:
    # The commit watcher's blocking read (server/tether/server/data/store.py) goes past a burst on
    # the data node.
    client = connect(cluster.url)
    release = asyncio.Event()
    try:
        assert await client.ping()
        assert isinstance(client, redis.asyncio.RedisCluster)
        name = client.get_node_from_key("{data}:k").name
        taken = asyncio.Event()
        holders = 0

        async def hold() -> None:
            nonlocal holders
            async with client.turns((name,)):  # type: ignore[attr-defined]
                holders += 1
                if holders == MAX_CONNECTIONS:
                    taken.set()
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(MAX_CONNECTIONS)]
        await asyncio.wait_for(taken.wait(), 5)
        with without_turns():
            assert await asyncio.wait_for(pipelined(client, "{data}:k"), 1) == 1
        with pytest.raises(TimeoutError):  # a call with turns waits for one
            await asyncio.wait_for(client.incr("{data}:k"), 0.5)
        release.set()
        await asyncio.gather(*tasks)
        assert await client.incr("{data}:k") == 2
    finally:
        release.set()
        await client.aclose()


async def test_a_connection_closed_while_a_command_is_sent_is_retried_not_an_attribute_error(
    cluster: RedisClusterProcess,
) -> None:
    """Found by the cluster chaos run: during a failover redis-py's cluster client closes a
    node's connections while a command is being sent on one, and the send raised
    AttributeError ('NoneType' object has no attribute 'writelines'): an `internal` error for
    the mutation and a traceback. It is a ConnectionError now, which the client retries."""
    client = connect(cluster.url)
    try:
        assert isinstance(client, redis.asyncio.RedisCluster)
        await client.set("{closed}:k", "v")
        node = client.get_node_from_key("{closed}:k")
        assert node is not None
        lost = await _lose_the_next_connection(node)
        assert await client.get("{closed}:k") == "v"
        assert lost(), "the fault was not injected"
    finally:
        await client.aclose()


async def test_a_connection_closed_while_a_pipeline_is_sent_is_a_connection_error(
    cluster: RedisClusterProcess,
) -> None:
    """The same close, under a pipeline (which redis-py sends without the per-command path).
    Found by the cluster chaos run: the AttributeError is no RedisError, so it ended the commit
    watcher's task, and the instance stopped following other instances' commits. It is a
    ConnectionError now (what callers handle as an outage), and the next pipeline works."""
    client = connect(cluster.url)
    try:
        assert isinstance(client, redis.asyncio.RedisCluster)
        await client.set("{closed}:k", "1")
        node = client.get_node_from_key("{closed}:k")
        assert node is not None
        lost = await _lose_the_next_connection(node)
        with pytest.raises(redis.exceptions.ConnectionError):
            await pipelined(client, "{closed}:k")
        assert lost(), "the fault was not injected"
        assert await pipelined(client, "{closed}:k") == 2
    finally:
        await client.aclose()


#: Loop turns after which the looping task is cancelled: every point of a command's round trip
#: (the write, the wait for the reply, the read) is hit by one of them or another.
CANCEL_POINTS = range(40)


async def _cancelled_at_every_point(command: Callable[[], Any]) -> list[int]:
    """The points of :data:`CANCEL_POINTS` after which a task running ``command`` in a loop did
    *not* end cancelled."""

    async def loop() -> None:
        while True:
            await command()

    return await lost_cancellations(loop, CANCEL_POINTS)


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_a_task_cancelled_during_a_redis_call_ends_cancelled(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """redis-py writes each command inside asyncio.wait_for, which on Python 3.11 returns the
    write's result when the write finishes in the same turn as the caller's cancel(): the
    CancelledError was lost, the task went on. The session sweep, cancelled at shutdown during
    a Redis call, then looped on and the process never exited (a SIGTERM test killed it after
    15 s in CI). Cancelled at any point of a command, a single command or a pipeline, the task
    must end cancelled."""
    fixture = "redis_proc" if topology == "standalone" else "cluster"
    server: RedisProcess | RedisClusterProcess = request.getfixturevalue(fixture)
    client = connect(server.url)
    try:
        await client.set("{cancel}:k", "1")
        assert await _cancelled_at_every_point(lambda: client.get("{cancel}:k")) == []
        pipeline = lambda: pipelined(client, "{cancel}:k")  # noqa: E731
        assert await _cancelled_at_every_point(pipeline) == []
        # Every connection still answers (none went back to the pool mid-reply).
        assert (
            await asyncio.gather(*(client.get("{cancel}:k") for _ in range(50)))
            == [await client.get("{cancel}:k")] * 50
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss+cluster://app:s3cret@h:7000/0", "rediss+cluster://app:***@h:7000/0"),
        ("unix://:s3cret@/var/lib/x/redis.sock?db=0", "unix://:***@/var/lib/x/redis.sock?db=0"),
        # Unencoded reserved characters in the password: urlsplit misreads the URL, and the
        # password must not show for it.
        ("redis://:s3cr/et@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://app:s3cr@et@h:7000/0", "redis://app:***@h:7000/0"),
        ("redis://:s3cr#et@h:7000/0", "redis://:***@h:7000/0"),
        ("redis://:s3cr?et@h:7000/0", "redis://:***@h:7000/0"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def _lose_the_next_connection(node: Any) -> Callable[[], bool]:
    """Disconnect ``node`` (a cluster node) so its connections reconnect on next use, and have
    the first reconnected one lose its writer as a concurrent ``disconnect()`` leaves it, just
    as a command on ``{closed}:k`` is written on it (the connection's own commands after the
    reconnect go through). Returns: whether it happened."""
    await node.disconnect()
    lost = False
    for connection in node._free:
        write = connection._send_packed_command

        async def lose_then_write(
            command: Any, connection: Any = connection, write: Any = write
        ) -> None:
            nonlocal lost
            if not lost and any(b"{closed}:k" in bytes(part) for part in command):
                lost = True
                connection._writer = None
            await write(command)

        connection._send_packed_command = lose_then_write
    return lambda: lost
