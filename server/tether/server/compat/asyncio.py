"""asyncio: start a coroutine eagerly (run it now, up to its first real suspension).

Python 3.12 has this as eager tasks (``asyncio.eager_task_factory``); it is used there. On
Python 3.11 the coroutine is driven by hand, which relies on the flag asyncio sets on a future
that a coroutine yields to its task (``Future._asyncio_future_blocking``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

if sys.version_info >= (3, 12):

    def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coro`` until it finishes or suspends; return the task that finishes it, or
        None when it finished. An exception raised before the first suspension propagates to
        the caller, as a synchronous call's would. The coroutine runs in a copy of the
        caller's context (as every task does)."""
        task = asyncio.eager_task_factory(asyncio.get_running_loop(), coro)
        if task.done():
            task.result()  # what ``coro`` raised, raised here (and so marked as retrieved)
            return None
        return task

else:

    def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coro`` until it finishes or suspends; return the task that finishes it, or
        None when it finished. An exception raised before the first suspension propagates to
        the caller, as a synchronous call's would. The coroutine runs in the caller's context
        up to its first suspension, then in the task's.

        Only for coroutines that await asyncio futures (or ``asyncio.sleep(0)``), which is all
        asyncio code.
        """
        try:
            waiting = coro.send(None)
        except StopIteration:
            return None
        return asyncio.ensure_future(_resume(coro, waiting))

    async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        """Drive ``coro``, suspended on ``waiting`` (a future, or None for a bare yield), to its
        end.

        Each future ``coro`` yields is awaited here, so the task waits on it exactly as it
        would have waited inside ``coro``; its outcome is then passed on. Cancelling the task
        cancels the awaited future, and the CancelledError is thrown into ``coro`` where it
        waits.
        """
        try:
            while True:
                try:
                    if waiting is None:
                        await asyncio.sleep(0)
                    else:
                        # What a task does with a future its coroutine yields: take the wait
                        # over. (An awaited future refuses a second ``await`` while this flag
                        # is set.)
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
