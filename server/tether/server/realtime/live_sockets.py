"""Each instance's live sockets per session, reported to Redis for ``tether sessions list``.

Layout (``docs/redis.md``): every instance writes one hash, ``tether:live:{INSTANCE}`` (session
id → how many of the instance's connections are authenticated with that session, as the
instance's :class:`~tether.server.realtime.session_hub.SessionHub` binds them), and keeps its id
in the sorted set ``tether:instances``. The hash has a TTL of :data:`TTL_HEARTBEATS` heartbeats
(``TETHER_LIVE_SOCKETS_INTERVAL`` each) that the instance renews every heartbeat: the report of an
instance that crashed disappears within that TTL of its last heartbeat, by Redis's own clock,
while every other instance's report stays. A reader (:func:`read_live_sockets`) asks each
registered instance's hash for the sessions it wants and sums; on Redis Cluster each hash is one
key on one node (its own hash tag), and the reader's pipeline is split by node.

The hot path stays cheap: a bind, an unbind or an ended session costs the hub one set insertion
(:meth:`LiveSockets.changed`). The writer waits :data:`FLUSH_DELAY` after the first change, so that
a burst (thousands of sockets authenticating after a deploy) becomes one write, then writes the
current count of every changed session in one pipeline (``HSET`` of the non-zero counts, ``HDEL``
of the zeros) with the TTL. Nothing is written per message, and nothing for anonymous sockets.

A lost report is rewritten whole: when the writer finds its hash gone while it holds sessions
(the hash expired during a Redis outage longer than its TTL, or Redis restarted without its
data), and after any failed write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from tether.server.realtime.session_hub import SessionHub
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient

log = logging.getLogger("tether.live_sockets")

#: Seconds the writer waits after a change before it writes, gathering the changes meanwhile.
FLUSH_DELAY = 0.5
#: An instance's report expires this many heartbeat intervals after it was last renewed.
TTL_HEARTBEATS = 3
#: An instance whose report expired this long ago (ms, by a live instance's clock) is dropped
#: from ``tether:instances`` (until then a reader asks for its hash, finds none, and moves on).
#: Generous, so that clock skew between instances never drops a live one.
PRUNE_AFTER_MS = 3_600_000


def new_instance_id() -> str:
    """``HOST-PID-RANDOM``: readable in ``tether sessions list --json``, unique per process, and
    free of ``{`` and ``}`` (it goes inside a key's hash tag)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:48] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class LiveSockets:
    """Reports ``hub``'s bound connections per session to Redis until closed.

    Start :meth:`run` as one task; when the instance stops, cancel it and call :meth:`close`,
    which withdraws the report. ``interval``: seconds between heartbeats
    (``TETHER_LIVE_SOCKETS_INTERVAL``). ``wall_clock``: seconds since the epoch (the registry's
    scores).
    """

    def __init__(
        self,
        redis: RedisClient,
        hub: SessionHub,
        interval: float,
        *,
        instance_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.instance_id = instance_id if instance_id is not None else new_instance_id()
        self._redis = redis
        self._hub = hub
        self._interval = interval
        self._ttl_ms = max(1, round(interval * TTL_HEARTBEATS * 1000))
        self._wall_clock = wall_clock
        self._key = redis_keys.live_sockets(self.instance_id)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        # Write the whole report next: at start, after a failed write, after the hash was lost.
        self._whole = True
        hub.on_change = self.changed

    def changed(self, session_id: str) -> None:
        """The number of connections bound to ``session_id`` may have changed (hub's hook)."""
        self._dirty.add(session_id)
        self._wake.set()

    async def run(self) -> None:
        """Write changes and heartbeats until cancelled. Redis errors are logged (the first of
        an outage as a warning) and retried at the next heartbeat or change."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time()  # the first pass registers the instance at once
        failing = False
        while True:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                        await self._wake.wait()
            if self._wake.is_set():
                await asyncio.sleep(FLUSH_DELAY)
                self._wake.clear()
            beat = loop.time() >= next_beat
            try:
                await self._write(beat)
            except Exception as exc:
                # Whatever failed, the reporter goes on: ended, it would leave the instance's
                # sockets uncounted once the report expires, with nothing to show for it.
                self._whole = True
                if isinstance(exc, (RedisError, OSError)):
                    level = logging.DEBUG if failing else logging.WARNING
                    log.log(level, "live-socket report not written: %s", type(exc).__name__)
                elif not failing:
                    log.exception("live-socket report failed")
                failing = True
                next_beat = loop.time() + self._interval
                continue
            if failing:
                log.info("live-socket report written again")
                failing = False
            if beat:
                next_beat = loop.time() + self._interval

    async def _write(self, beat: bool) -> None:
        now_ms = round(self._wall_clock() * 1000)
        if self._whole:
            # Cleared before the read: a change from here on is written by the next pass.
            self._dirty.clear()
            counts: dict[Any, int] = dict(self._hub.counts())
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._key)
                if counts:
                    pipe.hset(self._key, mapping=counts)
                    pipe.pexpire(self._key, self._ttl_ms)
                self._register(pipe, now_ms)
                await pipe.execute()
            self._whole = False
            return
        dirty, self._dirty = self._dirty, set()
        if not dirty and not beat:
            return
        counts = {sid: self._hub.count(sid) for sid in dirty}
        live: dict[Any, int] = {sid: n for sid, n in counts.items() if n > 0}
        gone = [sid for sid, n in counts.items() if n == 0]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.pexpire(self._key, self._ttl_ms)  # 0: the hash is missing
                if live:
                    pipe.hset(self._key, mapping=live)
                if gone:
                    pipe.hdel(self._key, *gone)
                pipe.pexpire(self._key, self._ttl_ms)
                if beat:
                    self._register(pipe, now_ms)
                replies = await pipe.execute()
        except BaseException:
            self._dirty |= dirty
            raise
        if not replies[0] and any(sid not in dirty for sid in self._hub.counts()):
            # The hash expired or Redis lost it, and it held sessions this write did not touch.
            self._whole = True
            self._wake.set()

    def _register(self, pipe: Any, now_ms: int) -> None:
        pipe.zadd(redis_keys.INSTANCES, {self.instance_id: now_ms + self._ttl_ms})
        pipe.zremrangebyscore(redis_keys.INSTANCES, "-inf", now_ms - PRUNE_AFTER_MS)

    async def close(self) -> None:
        """Withdraw this instance's report (best effort: else it expires with its TTL)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._key)
                pipe.zrem(redis_keys.INSTANCES, self.instance_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("live-socket report not withdrawn: %s", type(exc).__name__)


async def read_live_sockets(
    redis: RedisClient, session_ids: list[str]
) -> dict[str, dict[str, int]]:
    """For each of ``session_ids``: instance id → its live sockets of that session (instances
    with none are left out). Reads every registered instance's report in one pipeline; the
    report of an instance that stopped heartbeating has expired and counts nothing."""
    result: dict[str, dict[str, int]] = {sid: {} for sid in session_ids}
    if not session_ids:
        return result
    instances = [str(i) for i in await redis.zrange(redis_keys.INSTANCES, 0, -1)]
    if not instances:
        return result
    async with redis.pipeline(transaction=False) as pipe:
        for instance in instances:
            pipe.hmget(redis_keys.live_sockets(instance), session_ids)
        rows = await pipe.execute()
    for instance, row in zip(instances, rows, strict=True):
        for sid, value in zip(session_ids, row, strict=True):
            if value is not None and int(value) > 0:
                result[sid][instance] = int(value)
    return result
