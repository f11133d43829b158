"""The *tally* the test applications share: a named integer in table ``tallies`` (index
``by_name``), like the demo's counter. Each application declares the table itself."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tether import Context


async def tally(ctx: Context, name: str) -> dict[str, Any] | None:
    docs = await ctx.db.query("tallies", index="by_name", equals={"name": name}, limit=1)
    return docs[0] if docs else None


async def value(ctx: Context, name: str) -> int:
    doc = await tally(ctx, name)
    return 0 if doc is None else int(doc["value"])


async def bump(ctx: Context, name: str, by: int) -> int:
    doc = await tally(ctx, name)
    if doc is None:
        await ctx.db.insert("tallies", {"name": name, "value": by})
        return by
    new = int(doc["value"]) + by
    await ctx.db.patch("tallies", doc["_id"], {"value": new})
    return new


async def behind_gate(gate: str) -> None:
    """Wait until the file ``gate`` exists (polling; at most 60 s): a query that calls this
    holds its instance's pump for as long as the test keeps the gate shut."""
    for _ in range(6000):
        if os.path.exists(gate):
            return
        await asyncio.sleep(0.01)
