"""Stopping an instance's background tasks at shutdown, bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("tether")

#: Seconds the shutdown waits for cancelled background tasks to end before it goes on without
#: them (each logged as an error: a task that ignores its cancellation is a bug).
TASK_STOP_TIMEOUT = 5.0


async def stop_tasks(
    tasks: Sequence[asyncio.Task[Any]], grace: float = TASK_STOP_TIMEOUT
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait at most ``grace`` seconds for them to end; return those
    still running then, each logged as an error. Whatever a task does with its cancellation (a
    library that swallows one, a loop that catches it), the shutdown goes on: a process that
    never exits is killed by its supervisor, skipping the rest of the clean-up.

    The caller's own cancellation propagates (the tasks stay cancelled)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    _, running = await asyncio.wait(tasks, timeout=grace)
    left = [task for task in tasks if task in running]
    for task in left:
        log.error(
            "background task %s did not stop within %.1f s of its cancellation",
            task.get_name(),
            grace,
        )
    return left
