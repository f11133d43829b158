"""Stopping an instance's background tasks at shutdown, bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

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
    cancellation as a warning (something swallowed its cancellation: a bug to find).

    Whatever a task does with its cancellations, this returns: the rest of the shutdown goes
    on. A task that ignores *every* cancellation still holds up the process's exit, because
    ``asyncio.run`` cancels what is left at the very end and waits for it without a bound.

    The caller's own cancellation propagates (the tasks stay cancelled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    running = set(tasks)
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
        elif rounds and task.cancelling() > 1:
            # Lost a cancellation, most likely (or took over RECANCEL_INTERVAL to clean up).
            log.warning(
                "background task %s stopped only after %d cancellations",
                task.get_name(),
                task.cancelling(),
            )
    return [task for task in tasks if task in running]
