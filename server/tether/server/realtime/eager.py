"""Start a coroutine now, and give it a task only if it has to wait.

A fan-out writes one frame to each of thousands of sockets. Nearly every write completes without
waiting (the socket is writable), so a task per socket per frame — created, scheduled, run on a
later loop iteration, then collected — costs more than the write itself, and delays the first
byte until every frame has been queued. :func:`start_eagerly` runs the coroutine synchronously up
to its first real suspension, as Python 3.12's ``asyncio.eager_task_factory`` does; only a
coroutine that suspends gets a task, which resumes it where it stopped.

It only works for coroutines that await asyncio futures (or ``asyncio.sleep(0)``), which is all
asyncio code. The coroutine runs in the caller's context, not a copy of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` until it finishes or suspends; return the task that finishes it, or None.

    An exception raised before the first suspension propagates to the caller, as a synchronous
    call's would.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_resume(coro, waiting))


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive ``coro``, suspended on ``waiting`` (a future, or None for a bare yield), to its end.

    Each future ``coro`` yields is awaited here, so the task waits on it exactly as it would
    have waited inside ``coro``; its outcome is then passed on. Cancelling the task cancels the
    awaited future, and the CancelledError is thrown into ``coro`` where it waits.
    """
    try:
        while True:
            try:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    # What a task does with a future its coroutine yields: take the wait over.
                    # (An awaited future refuses a second ``await`` while this flag is set.)
                    waiting._asyncio_future_blocking = False
                    await waiting
            except BaseException as exc:  # handed to the coroutine that waited on it
                waiting = coro.throw(exc)
            else:
                waiting = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()
