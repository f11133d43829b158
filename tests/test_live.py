"""The live-query manager in process, on a real Redis: what keeps it following commits."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

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

from tests.clock import ManualClock
from tests.harness import ServerProcess


class Watched:
    """A subscriber that keeps the values delivered to it."""

    def __init__(self) -> None:
        self.values: list[Any] = []
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
