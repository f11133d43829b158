"""A test application whose results are as large as the client asks: for send-queue limits.

Served with ``server_factory(app="tests.apps.bigresult:app")``. The server runs with the
repository root as its working directory, and ``python -m`` puts that directory on ``sys.path``,
so ``tests.apps`` imports there as it does in the test process.
"""

from __future__ import annotations

from tether import App, Context

app = App("big")


@app.query("big")
async def big(ctx: Context, size: int) -> str:
    """A string of ``size`` characters (ASCII, so also ``size`` bytes); never reads the identity."""
    return "x" * size


@app.query("me")
async def me(ctx: Context) -> dict[str, str] | None:
    """The caller's ``{"userId"}``, or ``None`` when anonymous (like the demo's ``whoami``)."""
    auth = ctx.auth
    return None if auth is None else {"userId": auth.user_id}
