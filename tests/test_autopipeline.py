"""Auto-pipelining (``server/tether/server/redis/connection.py``, :class:`AutoPipeline`): the
commands concurrent tasks ask for in one event-loop turn travel to a standalone Redis as one
pipeline, and each caller still gets its own reply or its own error.

Real ``redis-server``; which connection carried each command is read from ``MONITOR`` (every
command of one batch comes on the one connection the batch took from the pool).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from tether.server.data.engine import run_mutation
from tether.server.redis.connection import (
    PIPELINE_MAX_COMMANDS,
    AutoPipeline,
    Script,
    auto_pipeline,
    connect,
    load_script,
)

from tests.harness import RedisClusterProcess, RedisProcess
from tests.test_store_commits import counted, create, make_store

#: A script that fails for a negative argument and echoes it otherwise.
CHECKED = """
local n = tonumber(ARGV[1])
if n < 0 then return redis.error_reply('ERR negative ' .. n) end
redis.call('SET', KEYS[1], n)
return n
"""


async def connections_used(
    probe: redis.asyncio.Redis, action: Callable[[], Awaitable[Any]]
) -> tuple[Any, Counter[str]]:
    """``action()``'s value and, per client connection, how many commands it sent to Redis
    meanwhile (from ``MONITOR``; commands run by scripts and a connection's opening left out)."""
    marker = "end-of-action"
    async with probe.monitor() as monitor:
        value = await action()
        await probe.echo(marker)
        used: Counter[str] = Counter()
        while True:
            info = await monitor.next_command()
            if info["client_type"] == "lua":
                continue
            if info["command"] == f"ECHO {marker}":
                return value, used
            name = str(info["command"]).split(" ", 1)[0].upper()
            if name not in ("HELLO", "CLIENT", "SELECT", "PING"):
                used[f"{info['client_address']}:{info['client_port']}"] += 1


async def test_concurrent_callers_share_one_round_trip_and_get_their_own_replies(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis
) -> None:
    client = connect(redis_proc.url)
    try:
        pipeline = auto_pipeline(client)
        assert pipeline is not None
        await client.ping()  # a first connection, opened outside the measurement

        async def action() -> list[Any]:
            return await asyncio.gather(
                *(pipeline.execute("INCRBY", f"counter-{i}", i + 1) for i in range(20))
            )

        replies, used = await connections_used(redis_client, action)
        assert replies == [i + 1 for i in range(20)]
        # Twenty commands in flight at once came on one connection: one batch. Without the
        # auto-pipeline each would have taken a pooled connection of its own.
        assert list(used.values()) == [20]
    finally:
        await client.aclose()


async def test_script_calls_in_one_turn_travel_together(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis
) -> None:
    client = connect(redis_proc.url)
    try:
        script = Script(client, CHECKED)
        await script(keys=["warm"], args=[0])  # loaded, and a connection opened

        async def action() -> list[Any]:
            return await asyncio.gather(*(script(keys=[f"k{i}"], args=[i]) for i in range(10)))

        replies, used = await connections_used(redis_client, action)
        assert replies == list(range(10))
        assert list(used.values()) == [10]
    finally:
        await client.aclose()


async def test_concurrent_mutations_share_their_round_trips(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis
) -> None:
    """Eight mutations on eight documents at once: their eight reads travel as one batch, and
    so do their eight commits, each with its own answer."""
    client = connect(redis_proc.url)
    try:
        store = make_store(client)
        tags = [f"t{i}" for i in range(8)]
        for tag in tags:
            await create(store, tag)
        bump = counted([])
        for tag in tags:  # each call known: its outcome check rides on its first read
            await run_mutation(store, bump, {"tag": tag}, None, client_id=tag, request_id=1)

        async def action() -> list[Any]:
            return await asyncio.gather(
                *(
                    run_mutation(store, bump, {"tag": tag}, None, client_id=tag, request_id=2)
                    for tag in tags
                )
            )

        outcomes, used = await connections_used(redis_client, action)
        assert [outcome.value_json for outcome in outcomes] == ["2"] * 8
        assert len({outcome.version for outcome in outcomes}) == 8
        # A read.lua and a commit.lua each, eight at a time in flight: on at most two
        # connections (one per batch), where calls one by one would have taken eight.
        assert sum(used.values()) >= 8
        assert len(used) <= 2
    finally:
        await client.aclose()


async def test_one_commands_error_stays_its_own(redis_proc: RedisProcess) -> None:
    client = connect(redis_proc.url)
    try:
        pipeline = auto_pipeline(client)
        assert pipeline is not None
        script = Script(client, CHECKED)
        await client.set("text", "not a number")
        results = await asyncio.gather(
            script(keys=["a"], args=[1]),
            script(keys=["b"], args=[-2]),  # the script's own error
            pipeline.execute("INCR", "text"),  # a command's error
            pipeline.execute("INCR", "n"),
            script(keys=["c"], args=[3]),
            return_exceptions=True,
        )
        assert results[0] == 1
        assert isinstance(results[1], ResponseError)
        assert "negative -2" in str(results[1])
        assert isinstance(results[2], ResponseError)
        assert "not an integer" in str(results[2])
        assert results[3] == 1
        assert results[4] == 3
        assert await client.mget("a", "b", "c") == ["1", None, "3"]
    finally:
        await client.aclose()


async def test_noscript_after_script_flush_is_recovered(redis_proc: RedisProcess) -> None:
    client = connect(redis_proc.url)
    try:
        script = Script(client, CHECKED)
        assert await script(keys=["x"], args=[1]) == 1
        await client.script_flush()
        assert await client.script_exists(script.sha) == [False]
        # A whole batch comes back NOSCRIPT: each caller sends its script again, and gets its
        # own reply.
        replies = await asyncio.gather(*(script(keys=[f"y{i}"], args=[i]) for i in range(8)))
        assert replies == list(range(8))
        assert await client.script_exists(script.sha) == [True]
    finally:
        await client.aclose()


def one_connection(redis_proc: RedisProcess) -> Redis:
    """A client whose pool holds one connection: what a batch leaves on it, the next reads."""
    pool = BlockingConnectionPool.from_url(
        redis_proc.url, max_connections=1, timeout=5, decode_responses=True
    )
    return Redis(connection_pool=pool)


async def test_a_caller_cancelled_before_its_batch_is_sent_is_left_out(
    redis_proc: RedisProcess,
) -> None:
    client = one_connection(redis_proc)
    try:
        pipeline = AutoPipeline(client)
        kept = asyncio.create_task(pipeline.execute("INCR", "kept"))
        dropped = asyncio.create_task(pipeline.execute("INCR", "dropped"))
        await asyncio.sleep(0)  # both joined the batch; it is not sent yet
        dropped.cancel()
        assert await kept == 1
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert await client.get("dropped") is None
    finally:
        await client.aclose()


async def test_a_caller_cancelled_in_flight_breaks_no_other_reply(
    redis_proc: RedisProcess,
) -> None:
    client = one_connection(redis_proc)
    try:
        pipeline = AutoPipeline(client)
        await client.rpush("later", "value")
        # The batch's first command blocks the connection for a while, the others wait behind
        # it on the same connection: one of them is cancelled while the batch is in flight.
        tasks = [
            asyncio.create_task(pipeline.execute("BLPOP", "empty", "0.3")),
            *(asyncio.create_task(pipeline.execute("INCR", f"n{i}")) for i in range(5)),
            asyncio.create_task(pipeline.execute("LPOP", "later")),
        ]
        await asyncio.sleep(0.1)
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[2], asyncio.CancelledError)
        assert [results[1], *results[3:6]] == [1, 1, 1, 1]
        assert results[6] == "value"
        # The cancelled caller's reply was read and dropped: the one pooled connection is in
        # step, every later caller gets its own reply.
        replies = await asyncio.gather(*(pipeline.execute("INCR", f"n{i}") for i in range(5)))
        assert replies == [2, 2, 2, 2, 2]
        assert await pipeline.execute("GET", "n1") == "2"
    finally:
        await client.aclose()


async def test_redis_lost_mid_batch_fails_every_caller_and_the_next_batch_works(
    redis_proc: RedisProcess,
) -> None:
    client = connect(redis_proc.url)
    try:
        pipeline = auto_pipeline(client)
        assert pipeline is not None
        await client.ping()
        pid = redis_proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the batch is written, its replies never come
        try:
            tasks = [asyncio.create_task(pipeline.execute("INCR", f"k{i}")) for i in range(6)]
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in tasks)
        finally:
            redis_proc.kill()  # SIGKILL: the connection drops mid-batch
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        redis_proc.restart(kill=True)
        replies = await asyncio.gather(*(pipeline.execute("INCRBY", f"j{i}", i) for i in range(6)))
        assert replies == list(range(6))
    finally:
        await client.aclose()


async def test_a_batch_carries_at_most_its_bound(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis
) -> None:
    assert PIPELINE_MAX_COMMANDS >= 2
    client = connect(redis_proc.url)
    try:
        pipeline = AutoPipeline(client, max_commands=4)

        async def action() -> list[Any]:
            return await asyncio.gather(*(pipeline.execute("INCR", f"b{i}") for i in range(10)))

        replies, used = await connections_used(redis_client, action)
        assert replies == [1] * 10
        # Three batches (4 + 4 + 2), side by side, each on a connection of its own.
        assert sorted(used.values()) == [2, 4, 4]
    finally:
        await client.aclose()


async def test_connect_sizes_its_clients_batches(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis
) -> None:
    """``connect``'s ``pipeline_max_commands`` (``TETHER_REDIS_PIPELINE_MAX_COMMANDS``) is the
    bound of the client's own auto-pipeline, which every script call on it uses."""
    client = connect(redis_proc.url, pipeline_max_commands=3)
    try:
        script = Script(client, CHECKED)
        await script(keys=["warm"], args=[0])  # loaded, and a connection opened

        async def action() -> list[Any]:
            return await asyncio.gather(*(script(keys=[f"n{i}"], args=[i]) for i in range(7)))

        replies, used = await connections_used(redis_client, action)
        assert replies == list(range(7))
        assert sorted(used.values()) == [1, 3, 3]
    finally:
        await client.aclose()


async def test_a_cluster_client_has_no_auto_pipeline(cluster: RedisClusterProcess) -> None:
    client = connect(cluster.url)
    try:
        assert auto_pipeline(client) is None
        # The layout loaded first (redis-py loading it under many first commands at once is a
        # race of its own, see test_redis_conn.py).
        assert await client.ping()
        script = Script(client, CHECKED)
        # Keys on different nodes: each call goes to its own node, as before.
        replies = await asyncio.gather(*(script(keys=[f"c{i}"], args=[i]) for i in range(12)))
        assert replies == list(range(12))
    finally:
        await client.aclose()


def test_one_auto_pipeline_per_client_which_does_not_outlive_it() -> None:
    client = connect("redis://127.0.0.1:1/0")  # never connects
    pipeline = auto_pipeline(client)
    assert pipeline is not None
    assert auto_pipeline(client) is pipeline
    assert Script(client, CHECKED)._pipeline is pipeline
    gone = weakref.ref(client)
    del client, pipeline
    gc.collect()
    assert gone() is None


class ReplyCutter:
    """A TCP relay to Redis that, once, closes a client connection right after Redis's first
    reply to a write carrying two or more ``EVALSHA``: the replies after it are lost, as when a
    connection drops mid-batch (a real network fault; Redis itself runs every command)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = True
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:  # every relay's reads end: its handler returns
            writer.close()
        await asyncio.sleep(0.05)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers += [client_w, redis_w]
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and data.count(b"EVALSHA") >= 2:
                    self.armed = False
                    cut.set()
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if cut.is_set():
                    # Only the first reply line reaches the client, then the connection drops.
                    client_w.write(data[: data.index(b"\r\n") + 2])
                    await client_w.drain()
                    return
                client_w.write(data)
                await client_w.drain()

        up = asyncio.create_task(upstream())
        try:
            await downstream()
        finally:
            up.cancel()
            client_w.close()
            redis_w.close()


async def test_a_batch_retried_after_a_lost_reply_does_not_rerun_the_commands_answered(
    redis_proc: RedisProcess,
) -> None:
    """A rate-limit hit whose reply was read before the connection dropped must not be counted
    again when the rest of its batch is re-sent: its caller would be refused for a hit it never
    made (and any script with an effect would run twice). The hit whose reply was lost is sent
    again, and the script recognises it by its id: it too counts once."""
    cutter = ReplyCutter(redis_proc.port)
    await cutter.start()
    client = connect(f"redis://127.0.0.1:{cutter.port}")
    probe = Redis.from_url(redis_proc.url, decode_responses=True)

    def hit(bucket: str, call: str) -> Awaitable[Any]:
        return limit(keys=[bucket, f"{bucket}:calls"], args=[1, 60000, "hit", call])

    try:
        limit = load_script(client, "tether.server.auth", "rate_limit")
        await hit("warm", "w")  # the script loaded, a connection open
        first, second = await asyncio.gather(hit("bucket:a", "a1"), hit("bucket:b", "b1"))
        assert not cutter.armed  # the connection was cut mid-batch
        assert await probe.get("bucket:a") == "1"
        assert first == 0
        # The command whose reply was lost was sent again (redis-py's retry): one count, and
        # the answer of the hit it repeats.
        assert await probe.get("bucket:b") == "1"
        assert second == 0
        assert await probe.smembers("bucket:b:calls") == {"b1"}
        assert 0 < await probe.pttl("bucket:b:calls") <= 60000  # bounded by the window
        # Another hit is a new one: over the limit of 1, refused, and its id is not kept.
        assert await hit("bucket:b", "b2") > 0
        assert await probe.smembers("bucket:b:calls") == {"b1"}
    finally:
        await client.aclose()
        await probe.aclose()
        await cutter.aclose()


async def test_a_rate_limit_refund_takes_back_its_own_hit_once(redis_client: Redis) -> None:
    """A refund names the allowed hit it takes back: sent twice (a retry after a lost reply),
    it takes it back once; naming a hit that was refused or never made takes nothing back."""
    limit = load_script(redis_client, "tether.server.auth", "rate_limit")

    async def call(mode: str, call_id: str) -> int:
        return int(await limit(keys=["rl", "rl:calls"], args=[2, 60000, mode, call_id]))

    assert [await call("hit", "h1"), await call("hit", "h2")] == [0, 0]
    assert await call("hit", "h3") > 0  # refused, and not counted: the count stays 2
    assert await redis_client.get("rl") == "2"
    for _ in range(2):
        await call("refund", "h1")
    await call("refund", "h3")  # refused: nothing to take back
    await call("refund", "unknown")
    assert await redis_client.get("rl") == "1"
    assert await redis_client.smembers("rl:calls") == {"h2"}


async def test_a_refused_hit_sent_again_after_a_lost_reply_counts_nothing(
    redis_client: Redis,
) -> None:
    """A refused hit re-sent (redis-py's retry after a lost reply) must not count: once
    refunds free places, a count inflated by it would refuse a caller within the limit."""
    limit = load_script(redis_client, "tether.server.auth", "rate_limit")

    async def call(mode: str, call_id: str) -> int:
        return int(await limit(keys=["rl:{x}", "rl:{x}:calls"], args=[2, 60000, mode, call_id]))

    assert [await call("hit", "a"), await call("hit", "b")] == [0, 0]
    assert 0 < await call("hit", "c") <= 60000  # refused: when the window resets
    assert 0 < await call("hit", "c") <= 60000  # ... its reply lost, sent again
    await call("refund", "a")
    await call("refund", "b")
    assert await redis_client.get("rl:{x}") == "0"
    assert await call("hit", "d") == 0
    assert await call("hit", "c") == 0  # c, sent once more, now fits: counted once
    assert await redis_client.get("rl:{x}") == "2"
    assert await call("hit", "e") > 0
    # A limit of 0 refuses every hit with a whole window, and keeps nothing.
    assert await limit(keys=["rl0", "rl0:calls"], args=[0, 5000, "hit", "z"]) == 5000
    assert await redis_client.exists("rl0", "rl0:calls") == 0


async def test_a_single_connection_client_sends_its_scripts_on_its_one_connection(
    redis_proc: RedisProcess,
) -> None:
    """A client built with ``single_connection_client`` holds one connection for good: a batch
    that took another from a pool of one would wait for it until the pool's time-out."""
    pool = BlockingConnectionPool.from_url(
        redis_proc.url, max_connections=1, timeout=1, decode_responses=True
    )
    client = Redis(connection_pool=pool, single_connection_client=True)
    try:
        script = Script(client, CHECKED)
        await client.ping()  # the client takes its connection
        replies = await asyncio.gather(*(script(keys=[f"s{i}"], args=[i]) for i in range(4)))
        assert replies == [0, 1, 2, 3]
    finally:
        await client.aclose()
