"""A test application whose results are as large as the client asks: for send-queue limits.

Served with ``server_factory(app="tests.apps.bigresult:app")``. The server runs with the
repository root as its working directory, and ``python -m`` puts that directory on ``sys.path``,
so ``tests.apps`` imports there as it does in the test process.
"""

from __future__ import annotations

from tether import App, Context

app = App("big")
app.table("stamps", indexes={"by_name": ["name"]})


@app.query("big")
async def big(ctx: Context, size: int) -> str:
    """A string of ``size`` characters (ASCII, so also ``size`` bytes); never reads the identity."""
    return "x" * size


@app.query("me")
async def me(ctx: Context) -> dict[str, str] | None:
    """The caller's ``{"userId"}``, or ``None`` when anonymous (like the demo's ``whoami``)."""
    auth = ctx.auth
    return None if auth is None else {"userId": auth.user_id}


async def _stamp_doc(ctx: Context) -> dict[str, object] | None:
    docs = await ctx.db.query("stamps", index="by_name", equals={"name": "s"}, limit=1)
    return docs[0] if docs else None


@app.query("stamped")
async def stamped(ctx: Context, size: int) -> str:
    """``size`` characters that change with every ``stamp``: one commit, a transition of that
    size to each subscriber (a flood of frames whose subscriptions stay within the budget)."""
    doc = await _stamp_doc(ctx)
    head = str(0 if doc is None else doc["n"])
    return head + "x" * (size - len(head))


@app.mutation("stamp")
async def stamp(ctx: Context) -> int:
    """Change what ``stamped`` returns; the new stamp."""
    doc = await _stamp_doc(ctx)
    if doc is None:
        await ctx.db.insert("stamps", {"name": "s", "n": 1})
        return 1
    n = int(str(doc["n"])) + 1
    await ctx.db.patch("stamps", str(doc["_id"]), {"n": n})
    return n
