"""One timer mechanism for every connection of an instance.

Connections ask to be woken at a wall-clock deadline (an expiry notice, an expiry, a heartbeat
or connect deadline). Instead of a task or timer handle per connection per token, the instance
keeps one heap and one event-loop timer armed at its earliest entry. Moving a deadline *later*
costs nothing (the early entry fires, the target finds nothing due and re-arms); moving it
earlier pushes one entry. Stale entries are skipped when popped.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
from typing import Protocol

from tether.server.clock import Clock, system_clock

log = logging.getLogger("tether.timers")


class DeadlineTarget(Protocol):
    #: The deadline this target is scheduled for (set by the queue), or None.
    scheduled_deadline: float | None

    def on_deadline(self, now: float) -> None:
        """The scheduled deadline has come; the target re-schedules itself if it needs to."""


class DeadlineQueue:
    def __init__(self, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, DeadlineTarget]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, target: DeadlineTarget, when: float | None) -> None:
        """Wake ``target`` at ``when`` (seconds since the epoch); ``None`` cancels."""
        current = target.scheduled_deadline
        if when is None:
            target.scheduled_deadline = None  # its heap entry is now stale
            return
        if current is not None and current <= when:
            return  # the earlier entry fires first; the target re-arms then
        target.scheduled_deadline = when
        heapq.heappush(self._heap, (when, next(self._seq), target))
        if self._armed_for is None or when < self._armed_for:
            self._arm()

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._armed_for = None
        if not self._heap:
            return
        when = self._heap[0][0]
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self._clock())
        self._armed_for = when
        # A context of its own: the callback would otherwise run in that of whichever connection
        # armed it, and its log lines carry that connection's ids (tether.server.logs).
        self._handle = loop.call_at(loop.time() + delay, self._fire, context=contextvars.Context())

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            when, _, target = heapq.heappop(self._heap)
            if target.scheduled_deadline != when:
                continue  # cancelled or superseded by an earlier entry
            target.scheduled_deadline = None
            try:
                target.on_deadline(now)
            except Exception:
                log.exception("deadline handler failed")
        self._arm()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._heap.clear()
