"""Stopping an instance's background tasks at shutdown, bounded, and running a server's event
loop so that its end is bounded too (:func:`run`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("tether")

#: Seconds the shutdown waits in all for cancelled background tasks to end before it goes on
#: without them (each logged as an error: a task that ignores its cancellation is a bug).
TASK_STOP_TIMEOUT = 5.0
#: Seconds between cancellations of a task that is still running: one that lost a
#: cancellation (a library swallowed it) ends at the next.
RECANCEL_INTERVAL = 0.5


async def stop_tasks(
    tasks: Sequence[asyncio.Task[Any]], grace: float = TASK_STOP_TIMEOUT
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait at most ``grace`` seconds in all for them to end, cancelling
    those still running again every :data:`RECANCEL_INTERVAL`; return those still running
    then. A task that did not stop is logged as an error, one that needed more than one
    cancellation as a warning (something swallowed its cancellation: a bug to find), and one
    that ended with an exception instead (its clean-up raised) goes to the event loop's
    exception handler, as ``asyncio.run`` reports such a task.

    Whatever a task does with its cancellations, this returns: the rest of the shutdown goes
    on. (``asyncio.run`` cancels what is left at the very end and waits for it without a bound:
    a server runs under :func:`run`, which does not.)

    The caller's own cancellation propagates (the tasks stay cancelled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    running = {task for task in tasks if not task.done()}
    stopping = set(running)
    for task in tasks:
        task.cancel()
    rounds = 0
    while running:
        left = deadline - loop.time()
        if left <= 0:
            break
        _, running = await asyncio.wait(running, timeout=min(left, RECANCEL_INTERVAL))
        if running and loop.time() < deadline:
            rounds += 1
            for task in running:
                task.cancel()
    for task in tasks:
        if task in running:
            log.error(
                "background task %s did not stop within %.1f s of its cancellation",
                task.get_name(),
                grace,
            )
        elif task in stopping and not task.cancelled() and task.exception() is not None:
            # Ended by an error instead (its clean-up raised): nobody else will read it.
            loop.call_exception_handler(
                {
                    "message": f"background task {task.get_name()} raised while it stopped",
                    "exception": task.exception(),
                    "task": task,
                }
            )
        elif rounds and task.cancelling() > 1:
            # Lost a cancellation, most likely (or took over RECANCEL_INTERVAL to clean up).
            log.warning(
                "background task %s stopped only after %d cancellations",
                task.get_name(),
                task.cancelling(),
            )
    return [task for task in tasks if task in running]


def run(main: Coroutine[Any, Any, T], grace: float = TASK_STOP_TIMEOUT) -> T:
    """``asyncio.run(main)`` whose end is bounded: once ``main`` has returned (or raised),
    the tasks still running (an application's, a library's) are stopped with
    :func:`stop_tasks`, and those that ignore every cancellation are left behind (logged as
    errors) instead of holding up the exit forever, as ``asyncio.run`` would.

    Otherwise like ``asyncio.run``: a new event loop set as the current one, asynchronous
    generators closed, the default executor shut down (its threads are joined: a function
    blocking in one still holds up the exit, as it would the interpreter's), the loop closed.
    Unlike it, it installs no SIGINT handler of its own (the caller handles its signals), has
    no ``debug`` argument (the environment's ``PYTHONASYNCIODEBUG`` still applies) and does
    not check that no loop runs already."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            if left:
                loop.run_until_complete(stop_tasks(left, grace))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
