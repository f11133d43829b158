"""The live-query manager in process, on a real Redis: what keeps it following commits."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio
from tether.server import demo
from tether.server.data.engine import QueryEngine
from tether.server.data.live import (
    CommitBatch,
    Evaluation,
    Registration,
    SharedDeliveries,
    SubscriptionManager,
)
from tether.server.data.store import Store
from tether.server.realtime.live_sockets import LiveSockets
from tether.server.realtime.session_hub import SessionHub
from tether.server.redis import keys as redis_keys

from tests.clock import ManualClock
from tests.harness import ServerProcess


class Watched:
    """A subscriber that keeps the values delivered to it."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.versions: list[int] = []  # the version of each value's delivery
        self.changed = asyncio.Event()

    def deliver(
        self,
        version: int,
        updates: list[tuple[Registration, Evaluation]],
        shared: SharedDeliveries | None = None,
    ) -> None:
        for _, evaluation in updates:
            text = evaluation.value_json
            self.values.append(None if text is None else int(text))
            self.versions.append(version)
        self.changed.set()

    def identity_ended(self) -> None:
        pass

    def current_identity(self) -> None:
        return None

    def current_generation(self) -> int:
        return 0

    async def wait_for(self, value: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while value not in self.values:
                self.changed.clear()
                await self.changed.wait()


class FailingOnce(QueryEngine):
    """The demo's engine, whose first blocking read of the commit stream raises what a bug or
    an unforeseen client library error would: no RedisError."""

    def __init__(self, store: Store) -> None:
        super().__init__(demo.app, store)
        self.failed = False

    async def read_commits(self, after: int, *, block_ms: int | None, count: int) -> CommitBatch:
        if block_ms is not None and not self.failed:
            self.failed = True
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await super().read_commits(after, block_ms=block_ms, count=count)


async def test_the_commit_watch_outlives_an_unexpected_error(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Found by the cluster chaos run: an exception other than a RedisError ended the commit
    watcher's task without a word, and the instance no longer heard of commits made by other
    instances (its own still reached its sockets, so nothing else showed)."""
    clock = ManualClock()
    engine = FailingOnce(Store(redis_client, schema=demo.app.schema, clock=clock))
    other = QueryEngine(demo.app, Store(redis_client, schema=demo.app.schema, clock=clock))
    manager = SubscriptionManager(engine, clock=clock, identity_usable=lambda _: True)
    watched = Watched()
    args = engine.resolve("query", "counter.get", {"name": "c"})
    manager.attach([Registration(watched, 1, 1, 0, "counter.get", args, None)])
    pump = asyncio.create_task(manager.run())
    try:
        await watched.wait_for(0, timeout=10)
        assert engine.failed, "the fault was not injected"
        # A commit made elsewhere (another instance): only the watcher can tell this one.
        kwargs = other.resolve("mutation", "counter.increment", {"name": "c"})
        result = await other.run_mutation(
            "counter.increment", kwargs, None, client_id="elsewhere", request_id=1
        )
        assert result.error is None, result
        await watched.wait_for(1, timeout=10)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


class StalledWatch(QueryEngine):
    """The demo's engine, whose commit watcher's blocking reads wait until ``release`` is set:
    a watcher that has not read the stream yet (a loaded instance)."""

    def __init__(self, store: Store) -> None:
        super().__init__(demo.app, store)
        self.release = asyncio.Event()
        self.stalled = 0

    async def read_commits(self, after: int, *, block_ms: int | None, count: int) -> CommitBatch:
        if block_ms is not None and not self.release.is_set():
            self.stalled += 1
            await self.release.wait()
        return await super().read_commits(after, block_ms=block_ms, count=count)


async def test_a_subscription_after_an_answered_commit_starts_at_its_version(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A writer with no subscription is answered at the commit, before this instance's pump
    has processed it (endpoint.run_mutation). Its next subscription must still start at or
    after the commit's version: ``notify_commit`` raises the pump's target, so the pump reads
    the stream up to the commit before it delivers. With the commit watcher stalled, nothing
    else tells the pump of the commit or of another instance's commit just before it (stripping
    the raise fails this test). Another connection's subscription to the same query is live
    already: the writer's joins its entry, which must not hand out the result from before the
    commits."""
    clock = ManualClock()
    engine = StalledWatch(Store(redis_client, schema=demo.app.schema, clock=clock))
    manager = SubscriptionManager(engine, clock=clock, identity_usable=lambda _: True)
    args = engine.resolve("query", "counter.get", {"name": "w"})
    other = Watched()
    manager.attach([Registration(other, 1, 1, 0, "counter.get", args, None)])
    pump = asyncio.create_task(manager.run())
    try:
        await other.wait_for(0, timeout=10)
        async with asyncio.timeout(10):
            while not engine.stalled:
                await asyncio.sleep(0.01)
        kwargs = engine.resolve("mutation", "counter.increment", {"name": "w"})
        # Another instance's commit first: only the (stalled) watcher could tell this one of
        # it, so the writer's commit is not the next one the pump would apply.
        elsewhere = QueryEngine(demo.app, Store(redis_client, schema=demo.app.schema, clock=clock))
        before = await elsewhere.run_mutation(
            "counter.increment", kwargs, None, client_id="elsewhere", request_id=1
        )
        assert before.error is None, before
        result = await engine.run_mutation(
            "counter.increment", kwargs, None, client_id="writer", request_id=1
        )
        assert result.error is None and result.version is not None, result
        manager.notify_commit(result.version, result.written_keys, result.written_values)
        # The writer subscribes at once, as a client that reads its own write would.
        watched = Watched()
        manager.attach([Registration(watched, 2, 1, 0, "counter.get", args, None)])
        async with asyncio.timeout(10):
            while not watched.values:
                watched.changed.clear()
                await watched.changed.wait()
        assert watched.values[0] == 2 and watched.versions[0] >= result.version, (
            watched.values,
            watched.versions,
            result.version,
        )
        assert engine.stalled and not engine.release.is_set(), "the watcher was not stalled"
    finally:
        engine.release.set()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


def test_sigusr1_logs_where_every_task_of_an_instance_waits(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """How a stuck instance is diagnosed (docs/redis.md): ``kill -USR1`` logs each task's stack,
    the commit watcher and the live-query pump among them, and the instance runs on."""
    server = server_factory()
    assert server.process is not None
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "(SIGUSR1)" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the whole record
    log = server.log_path.read_text()
    assert "tasks (SIGUSR1):" in log, log[-2000:]
    assert re.search(r"commit-watch: _watch \(live\.py:\d+\)", log), log[-2000:]
    assert re.search(r"subscriptions: run \(live\.py:\d+\)", log), log[-2000:]
    assert server.returncode is None
    with urllib.request.urlopen(f"{server.base_url}/healthz", timeout=5) as response:
        assert response.status == 200


class _FlakyHub:
    """What LiveSockets reads of a SessionHub: per-session counts; the first read fails the
    way a bug would (no RedisError)."""

    def __init__(self) -> None:
        self.on_change: Callable[[str], None] | None = None
        self.reads = 0

    def counts(self) -> dict[str, int]:
        self.reads += 1
        if self.reads == 1:
            raise KeyError("a bug")
        return {"s1": 2}


async def test_the_live_socket_report_outlives_an_unexpected_error(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Found in review, the same class of fault as the commit watcher's: an error other than a
    Redis or OS error ended the reporter's task, and the instance's sockets went uncounted."""
    hub = _FlakyHub()
    reporter = LiveSockets(redis_client, cast(SessionHub, hub), interval=0.2, instance_id="i1")
    task = asyncio.create_task(reporter.run())
    try:
        async with asyncio.timeout(10):
            while await redis_client.hget(redis_keys.live_sockets("i1"), "s1") != "2":
                assert not task.done(), task
                await asyncio.sleep(0.05)
        assert hub.reads >= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
