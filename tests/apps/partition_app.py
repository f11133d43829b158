"""A test application with data partitions (``docs/scaling.md``).

Served with ``server_factory(app="tests.apps.partition_app:app")``.

* ``tenant.get`` query ``{"tenant", "name"}`` → the tenant's tally, 0 if never bumped
* ``tenant.bump`` mutation ``{"tenant", "name", "by"?}`` → the new value
* ``tenant.where`` query ``{"tenant"}`` → ``ctx.partition``
* ``tenant.mine`` query ``{"tenant", "name"}`` → ``{"user", "value"}``: reads the identity
* ``tally.get`` / ``tally.bump``: the same in the default partition (no tenant)
* ``tenant.slow`` query ``{"tenant", "name", "ms"}`` → ``tenant.get`` after ``ms`` milliseconds
* ``tenant.behind_gate`` query ``{"tenant", "name", "gate"}`` → ``tenant.get``, once the file
  ``gate`` exists (``tests/apps/tallies.py``: ``behind_gate``)
"""

from __future__ import annotations

import asyncio
from typing import Any

from tether import App, Context

from tests.apps.tallies import behind_gate
from tests.apps.tallies import bump as _bump
from tests.apps.tallies import tally as _tally

app = App("partition-test")
app.table("tallies", indexes={"by_name": ["name"]})


@app.query("tenant.get", partition="tenant")
async def tenant_get(ctx: Context, tenant: str, name: str) -> int:
    doc = await _tally(ctx, name)
    return 0 if doc is None else int(doc["value"])


@app.mutation("tenant.bump", partition="tenant")
async def tenant_bump(ctx: Context, tenant: str, name: str, by: int = 1) -> int:
    return await _bump(ctx, name, by)


@app.query("tenant.where", partition="tenant")
async def tenant_where(ctx: Context, tenant: str) -> str | None:
    return ctx.partition


@app.query("tally.get")
async def tally_get(ctx: Context, name: str) -> int:
    doc = await _tally(ctx, name)
    return 0 if doc is None else int(doc["value"])


@app.mutation("tally.bump")
async def tally_bump(ctx: Context, name: str, by: int = 1) -> int:
    return await _bump(ctx, name, by)


@app.query("tenant.mine", partition="tenant")
async def tenant_mine(ctx: Context, tenant: str, name: str) -> dict[str, Any]:
    auth = ctx.auth
    doc = await _tally(ctx, name)
    return {
        "user": None if auth is None else auth.user_id,
        "value": 0 if doc is None else int(doc["value"]),
    }


@app.query("tenant.slow", partition="tenant")
async def tenant_slow(ctx: Context, tenant: str, name: str, ms: int) -> int:
    """``tenant.get`` after ``ms`` milliseconds: keeps the partition's live queries busy."""
    await asyncio.sleep(ms / 1000)
    return await tenant_get(ctx, tenant, name)


@app.query("tenant.behind_gate", partition="tenant")
async def tenant_behind_gate(ctx: Context, tenant: str, name: str, gate: str) -> int:
    value = await tenant_get(ctx, tenant, name)
    await behind_gate(gate)
    return value
