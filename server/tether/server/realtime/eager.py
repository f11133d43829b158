"""Start a coroutine now, and give it a task only if it has to wait.

A fan-out writes one frame to each of thousands of sockets. Nearly every write completes without
waiting (the socket is writable), so a task per socket per frame — created, scheduled, run on a
later loop iteration, then collected — costs more than the write itself, and delays the first
byte until every frame has been queued. :func:`start_eagerly` runs the coroutine synchronously up
to its first real suspension; only a coroutine that suspends gets a pending task, which resumes it
where it stopped.

On Python 3.12 and later these are the standard library's eager tasks; on 3.11 the coroutine is
driven by hand. Both live in :mod:`tether.server.compat.asyncio` (the 3.11 driver touches an
asyncio internal).
"""

from __future__ import annotations

from tether.server.compat.asyncio import start_eagerly

__all__ = ["start_eagerly"]
