"""tether.server.realtime.eager.start_eagerly: run inline until the first suspension, then as a
task."""

from __future__ import annotations

import asyncio

import pytest
from tether.server.realtime.eager import start_eagerly


async def test_a_coroutine_that_never_waits_runs_to_the_end_inline() -> None:
    done: list[str] = []
    event = asyncio.Event()
    event.set()

    async def work() -> None:
        await event.wait()  # set: returns without suspending
        done.append("a")
        await event.wait()
        done.append("b")

    assert start_eagerly(work()) is None
    assert done == ["a", "b"]  # before the caller yields to the loop even once


async def test_a_coroutine_that_waits_runs_inline_up_to_the_wait_then_as_a_task() -> None:
    steps: list[str] = []
    gate = asyncio.Event()

    async def work() -> None:
        steps.append("before")
        await gate.wait()
        steps.append("after gate")
        await asyncio.sleep(0)  # a bare yield, too
        steps.append("end")

    task = start_eagerly(work())
    assert task is not None
    assert steps == ["before"]
    await asyncio.sleep(0.01)
    assert steps == ["before"] and not task.done()  # still waiting for the gate
    gate.set()
    await asyncio.wait_for(task, 1)
    assert steps == ["before", "after gate", "end"]


async def test_the_result_and_the_exception_of_an_awaited_future_reach_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    ok: asyncio.Future[int] = loop.create_future()
    bad: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def work() -> None:
        seen.append(await ok)
        try:
            await bad
        except KeyError as exc:
            seen.append(exc.args[0])

    task = start_eagerly(work())
    assert task is not None
    loop.call_soon(ok.set_result, 41)
    loop.call_later(0.01, bad.set_exception, KeyError("gone"))
    await asyncio.wait_for(task, 1)
    assert seen == [41, "gone"]


async def test_an_exception_before_the_first_wait_is_raised_to_the_caller() -> None:
    async def work() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        start_eagerly(work())


async def test_an_exception_after_a_wait_fails_the_task() -> None:
    async def work() -> None:
        await asyncio.sleep(0.001)
        raise ValueError("later")

    task = start_eagerly(work())
    assert task is not None
    with pytest.raises(ValueError, match="later"):
        await asyncio.wait_for(task, 1)


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []
    gate = asyncio.Event()

    async def work() -> None:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cleaned.append("cancelled at the wait")
            raise
        cleaned.append("not reached")

    task = start_eagerly(work())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert cleaned == ["cancelled at the wait"]
    assert not gate._waiters  # Event.wait removed its waiter: nothing left behind
