"""A test application with a bug: its query starts a background task that ignores every
cancellation. Served with ``server_factory(app="tests.apps.stubborn:app")``: the server must
still exit after SIGTERM."""

from __future__ import annotations

import asyncio

from tether import App, Context

app = App("stubborn")
_held: set[asyncio.Task[None]] = set()


async def _ignores_cancellation() -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # the bug: a task that swallows every cancellation


@app.query("start")
async def start(ctx: Context) -> int:
    """Start one more stubborn task; how many there are."""
    task = asyncio.get_running_loop().create_task(_ignores_cancellation(), name="stubborn")
    _held.add(task)
    return len(_held)
