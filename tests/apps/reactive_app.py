"""A test application for the reactive layer's error paths and shared evaluations.

Served with ``server_factory(app="tests.apps.reactive_app:app")``: the server runs with the
repository root as its working directory and ``python -m`` puts that directory on ``sys.path``,
so ``tests.apps`` imports there as it does in the test process.

Most queries read a *tally* (a named integer, like the demo's counter) so that a ``tally.bump``
re-runs them: the error cases are then reached by a re-evaluation after a commit, not only by
the first run of a subscription.

Functions (args → result):

* ``tally.get`` query ``{"name"}`` → the tally's value, 0 if never bumped
* ``tally.bump`` mutation ``{"name", "by"?}`` → the new value
* ``tally.flaky`` query ``{"name"}`` → the value; raises ``RuntimeError`` while it is odd
* ``tally.sized`` query ``{"name", "unit"}`` → a string of ``value * unit`` characters
* ``tally.evaluations`` query ``{"name"}`` → ``{"value", "evaluation"}`` (see below)
* ``tally.mine`` query ``{"name"}`` → the same plus ``"user"``: it reads the identity
* ``tally.bump_then_raise`` mutation ``{"name"}`` → bumps, then raises ``RuntimeError``
* ``tally.bump_big`` mutation ``{"name", "size"}`` → bumps, then returns ``size`` characters
* ``boom`` query ``{}`` → always raises ``RuntimeError``
* ``big`` query ``{"size"}`` → a string of ``size`` characters
* ``tally.bump_slowly`` mutation ``{"name", "seconds"}`` → waits ``seconds``, then bumps
* ``tally.behind_gate`` query ``{"name", "gate"}`` → the value, once the file ``gate`` (a path)
  exists: until then it waits (polling, at most 60 s), and so does the pump that runs it
* ``tally.gated`` query ``{"name"}`` → ``{"value"}``, plus ``"user"`` once the value is positive:
  it reads the identity only then

``evaluation`` is a per-process count of the runs of these two functions: two subscribers that
share one evaluation receive the same number, two that are evaluated separately cannot.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from tether import App, Context

from tests.apps.tallies import behind_gate
from tests.apps.tallies import bump as _bump
from tests.apps.tallies import value as _value

app = App("reactive-test")
app.table("tallies", indexes={"by_name": ["name"]})

#: Runs of ``tally.evaluations`` and ``tally.mine`` in this server process.
_RUNS = itertools.count(1)


@app.query("tally.get")
async def tally_get(ctx: Context, name: str) -> int:
    return await _value(ctx, name)


@app.mutation("tally.bump")
async def tally_bump(ctx: Context, name: str, by: int = 1) -> int:
    return await _bump(ctx, name, by)


@app.query("tally.flaky")
async def tally_flaky(ctx: Context, name: str) -> int:
    value = await _value(ctx, name)
    if value % 2:
        raise RuntimeError(f"odd tally {value}")
    return value


@app.query("tally.sized")
async def tally_sized(ctx: Context, name: str, unit: int) -> str:
    return "x" * (await _value(ctx, name) * unit)


@app.query("tally.evaluations")
async def tally_evaluations(ctx: Context, name: str) -> dict[str, int]:
    value = await _value(ctx, name)
    return {"value": value, "evaluation": next(_RUNS)}


@app.query("tally.mine")
async def tally_mine(ctx: Context, name: str) -> dict[str, Any]:
    auth = ctx.auth
    value = await _value(ctx, name)
    user = None if auth is None else auth.user_id
    return {"user": user, "value": value, "evaluation": next(_RUNS)}


@app.mutation("tally.bump_slowly")
async def tally_bump_slowly(ctx: Context, name: str, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return await _bump(ctx, name, 1)


@app.mutation("tally.bump_then_raise")
async def tally_bump_then_raise(ctx: Context, name: str) -> int:
    await _bump(ctx, name, 1)
    raise RuntimeError("failed after writing")


@app.mutation("tally.bump_big")
async def tally_bump_big(ctx: Context, name: str, size: int) -> str:
    await _bump(ctx, name, 1)
    return "x" * size


@app.query("boom")
async def boom(ctx: Context) -> None:
    raise RuntimeError("this query always fails")


@app.query("big")
async def big(ctx: Context, size: int) -> str:
    """A string of ``size`` characters (ASCII, so also ``size`` bytes)."""
    return "x" * size


@app.query("tally.behind_gate")
async def tally_behind_gate(ctx: Context, name: str, gate: str) -> int:
    value = await _value(ctx, name)
    await behind_gate(gate)
    return value


@app.query("tally.gated")
async def tally_gated(ctx: Context, name: str) -> dict[str, Any]:
    """``{"value"}``, plus ``"user"`` once the tally is positive: it reads the identity only
    then, as a query that checks access only for some documents would."""
    value = await _value(ctx, name)
    if value <= 0:
        return {"value": value}
    auth = ctx.auth
    return {"value": value, "user": None if auth is None else auth.user_id}
