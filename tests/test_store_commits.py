"""The mutation path's fixed cost and hot keys (issue 14): the outcome check rides on the first
read, and mutations on a hot key take turns on each instance, first attempts too.

Real ``redis-server``; two :class:`Store` objects on one Redis stand for two instances.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from tether.server.data.engine import MAX_CALL_KEY_CHARS, run_mutation
from tether.server.data.functions import App, Context, FunctionSpec
from tether.server.data.store import MutationDB, MutationOutcome, MutationRequest, Store

from tests.clock import ManualClock

app = App("commits-test")
app.table("items", indexes={"by_tag": ["tag"]})


def make_store(client: redis.asyncio.Redis, **options: Any) -> Store:
    return Store(client, schema=app.schema, clock=ManualClock(1_700_000_000.0), **options)


async def create(store: Store, tag: str) -> str:
    db = MutationDB(store)
    doc_id = await db.insert("items", {"tag": tag, "n": 0})
    await store.commit(db, request=None, outcome_value_json=None)
    return doc_id


async def client_commands(
    client: redis.asyncio.Redis, action: Callable[[], Awaitable[Any]]
) -> tuple[Any, list[str]]:
    """``action()``'s value and the commands clients sent Redis meanwhile (from ``MONITOR``;
    the commands scripts run are left out): the round trips it made."""
    marker = "end-of-action"
    async with client.monitor() as monitor:
        value = await action()
        await client.echo(marker)
        commands: list[str] = []
        while True:
            info = await monitor.next_command()
            if info["client_type"] == "lua":
                continue
            if info["command"] == f"ECHO {marker}":
                return value, commands
            name = str(info["command"]).split(" ", 1)[0].upper()
            if name not in ("HELLO", "CLIENT", "SELECT"):  # a pooled connection opening
                commands.append(name)


def counted(runs: list[int]) -> FunctionSpec:
    """``items.bump``: add one to the item tagged ``tag`` (read through the index); each run
    appends the version of the document it read to ``runs``."""

    async def bump(ctx: Context, tag: str) -> int:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        runs.append(int(docs[0]["n"]))
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        return int(docs[0]["n"]) + 1

    return FunctionSpec.from_function("items.bump", "mutation", bump)


async def test_a_known_call_looks_for_its_outcome_in_its_first_read(
    redis_client: redis.asyncio.Redis,
) -> None:
    """The second call of the same function with the same arguments makes two script calls
    (its first read, which also looks for the outcome, and the commit) and no ``GET``; its
    replay runs nothing and commits nothing, and answers the first outcome."""
    store = make_store(redis_client)
    await create(store, "a")
    runs: list[int] = []
    bump = counted(runs)
    first = await run_mutation(store, bump, {"tag": "a"}, None, client_id="c", request_id=1)
    assert first.value_json == "1"

    second, sent = await client_commands(
        redis_client,
        lambda: run_mutation(store, bump, {"tag": "a"}, None, client_id="c", request_id=2),
    )
    assert second.value_json == "2"
    assert sent == ["EVALSHA", "EVALSHA"]  # the read (and outcome check), the commit

    version = await store.version()
    replay, sent = await client_commands(
        redis_client,
        lambda: run_mutation(store, bump, {"tag": "a"}, None, client_id="c", request_id=2),
    )
    assert replay == MutationOutcome("2", None, second.version)
    assert runs == [0, 1]  # the replay ran nothing
    assert sent == ["EVALSHA"]  # the read that found the outcome
    assert await store.version() == version
    stored = await store.get_outcome(MutationRequest("items.bump", "c", 2))
    assert stored == {"version": second.version, "value": 2, "name": "items.bump"}


async def test_first_attempts_on_a_hot_key_take_turns(redis_client: redis.asyncio.Redis) -> None:
    """Once a commit conflicted on a key here, mutations that read it wait for each other:
    twenty concurrent increments all commit on their first attempt (no retry allowed)."""
    store = make_store(redis_client)
    doc_id = await create(store, "hot")
    runs: list[int] = []
    bump = counted(runs)
    reached, proceed = asyncio.Event(), asyncio.Event()

    async def slow(ctx: Context) -> None:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": "hot"}, limit=1)
        reached.set()
        await proceed.wait()
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 100})

    # One conflict makes the key hot: `slow` read, another commit beat it, it ran again.
    task = asyncio.create_task(
        run_mutation(
            store,
            FunctionSpec.from_function("slow", "mutation", slow),
            {},
            None,
            client_id="s",
            request_id=1,
        )
    )
    await reached.wait()
    assert (
        await run_mutation(store, bump, {"tag": "hot"}, None, client_id="b", request_id=1)
    ).error is None
    proceed.set()
    assert (await task).error is None

    store.max_retries = 0
    outcomes = await asyncio.gather(
        *(
            run_mutation(store, bump, {"tag": "hot"}, None, client_id="t", request_id=i)
            for i in range(20)
        )
    )
    assert [o.error for o in outcomes] == [None] * 20
    assert sorted(int(o.value_json or 0) for o in outcomes) == list(range(102, 122))
    assert store._retry_turns == {}
    db = MutationDB(store)
    assert (await db.get("items", doc_id) or {})["n"] == 121


async def test_two_instances_on_one_hot_key_stay_serialisable_and_exactly_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two stores (two instances) increment one counter concurrently: every success is its own
    commit with its own value (no increment lost or doubled); a retry reads the commit that
    beat it (each run of a mutation reads a newer value than the run before); replaying every
    request answers its first outcome and commits nothing."""
    stores = [make_store(redis_client), make_store(redis_client)]
    await create(stores[0], "shared")
    reads: dict[tuple[int, int], list[int]] = {}

    def bump_for(key: tuple[int, int]) -> FunctionSpec:
        return counted(reads.setdefault(key, []))

    async def one(instance: int, i: int, *, on: int | None = None) -> MutationOutcome:
        return await run_mutation(
            stores[instance if on is None else on],
            bump_for((instance, i)),
            {"tag": "shared"},
            None,
            client_id=f"client-{instance}",
            request_id=i,
        )

    pairs = [(instance, i) for i in range(20) for instance in (0, 1)]
    outcomes = await asyncio.gather(*(one(instance, i) for instance, i in pairs))
    values = sorted(int(o.value_json) for o in outcomes if o.value_json is not None)
    failures = [o.error for o in outcomes if o.error is not None]
    assert all(code == "conflict" for code, _ in failures)
    assert values == list(range(1, len(values) + 1))
    assert len(values) >= 30
    versions = [o.version for o in outcomes if o.version is not None]
    assert len(set(versions)) == len(versions)
    for seen in reads.values():
        assert seen == sorted(set(seen))  # a retry never re-reads what conflicted
    assert any(len(seen) > 1 for seen in reads.values())  # there were conflicts

    version = await stores[0].version()
    # Each replay on the other instance (which never ran that call: a plain GET there).
    replays = await asyncio.gather(*(one(instance, i, on=1 - instance) for instance, i in pairs))
    assert [(o.value_json, o.error, o.version) for o in replays] == [
        (o.value_json, o.error, o.version) for o in outcomes
    ]
    assert await stores[0].version() == version
    for store in stores:
        assert store._retry_turns == {}


async def test_a_retry_reads_again_after_its_early_read_conflicted(
    redis_client: redis.asyncio.Redis,
) -> None:
    """The read made with the outcome check serves the first attempt only: when that attempt
    conflicts, the retry reads the commit that beat it and commits (one retry allowed)."""
    store = make_store(redis_client, max_retries=1)
    doc_id = await create(store, "p")
    reached, proceed = asyncio.Event(), asyncio.Event()
    pause = False

    async def bump(ctx: Context, tag: str) -> int:
        nonlocal pause
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        if pause:
            pause = False
            reached.set()
            await proceed.wait()
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        return int(docs[0]["n"]) + 1

    fn = FunctionSpec.from_function("items.bump", "mutation", bump)
    assert (await run_mutation(store, fn, {"tag": "p"}, None, client_id="c", request_id=1)) == (
        MutationOutcome("1", None, 2)
    )
    pause = True
    task = asyncio.create_task(
        run_mutation(store, fn, {"tag": "p"}, None, client_id="c", request_id=2)
    )
    await reached.wait()
    other = make_store(redis_client)  # another instance commits in between
    db = MutationDB(other)
    await db.patch("items", doc_id, {"n": 10})
    await other.commit(db, request=None, outcome_value_json=None)
    proceed.set()
    outcome = await task
    assert (outcome.value_json, outcome.error) == ("11", None)
    assert (await MutationDB(store).get("items", doc_id) or {})["n"] == 11


async def test_calls_with_long_arguments_are_not_remembered(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A call's first read is remembered under its arguments only when they are short (the
    store keeps thousands of calls): with long ones, the outcome check stays a ``GET``."""
    store = make_store(redis_client)
    await create(store, "b")
    runs: list[int] = []

    async def bump(ctx: Context, tag: str, note: str) -> int:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        runs.append(int(docs[0]["n"]))
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        return int(docs[0]["n"]) + 1

    fn = FunctionSpec.from_function("items.bump", "mutation", bump)
    args = {"tag": "b", "note": "x" * (MAX_CALL_KEY_CHARS + 1)}
    await run_mutation(store, fn, args, None, client_id="c", request_id=1)
    outcome, sent = await client_commands(
        redis_client, lambda: run_mutation(store, fn, args, None, client_id="c", request_id=2)
    )
    assert outcome.value_json == "2"
    assert sent == ["GET", "EVALSHA", "EVALSHA"]
    assert store._first_reads == {}


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def hold_turn(
    store: Store, doc_id: str, name: str
) -> tuple[asyncio.Task[MutationOutcome], asyncio.Event]:
    """A mutation on ``store`` that conflicted on the document (another instance committed
    between its read and its commit), so holds the key's turn there, paused in its second run
    until the event returned is set."""
    other = make_store(store.redis)
    runs = 0
    first_read, go_on, holding, release = (asyncio.Event() for _ in range(4))

    async def holder(ctx: Context) -> None:
        nonlocal runs
        runs += 1
        doc = await ctx.db.get("items", doc_id)
        assert doc is not None
        if runs == 1:
            first_read.set()
            await go_on.wait()
        else:
            holding.set()
            await release.wait()
        await ctx.db.patch("items", doc_id, {"n": doc["n"] + 1})

    spec = FunctionSpec.from_function(name, "mutation", holder)
    task = asyncio.create_task(run_mutation(store, spec, {}, None, client_id=name, request_id=1))
    await first_read.wait()
    db = MutationDB(other)
    await db.patch("items", doc_id, {"n": 1000})
    await other.commit(db, request=None, outcome_value_json=None)
    go_on.set()
    await holding.wait()
    assert store._retry_turns[store.keys.doc("items", doc_id)].users == 1
    return task, release


#: Far longer than any of these mutations takes: past it, they wait on each other for ever.
DEADLOCKED = 30.0


async def test_a_mutation_reading_a_hot_key_twice_at_once_does_not_wait_on_itself(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A mutation whose function reads a hot key twice at once (``asyncio.gather`` over
    ``ctx.db``) while another mutation holds the key's turn: it finishes once the holder has.
    (Both reads queued for the turn: the first got it and the second waited behind its own
    mutation for ever, holding the key's turn from every later mutation of the instance.)"""
    store = make_store(redis_client)
    doc_id = await create(store, "g")
    key = store.keys.doc("items", doc_id)
    holder, release = await hold_turn(store, doc_id, "holder")

    async def twice(ctx: Context) -> int:
        one, two = await asyncio.gather(ctx.db.get("items", doc_id), ctx.db.get("items", doc_id))
        assert one is not None and one == two
        await ctx.db.patch("items", doc_id, {"n": one["n"] + 1})
        return int(one["n"]) + 1

    spec = FunctionSpec.from_function("twice", "mutation", twice)
    task = asyncio.create_task(run_mutation(store, spec, {}, None, client_id="t", request_id=1))
    await until(lambda: store._retry_turns[key].users >= 2)
    for _ in range(3):
        await asyncio.sleep(0)  # both reads have asked for the turn (one loop step)
    release.set()
    assert (await holder).error is None
    outcome = await asyncio.wait_for(task, DEADLOCKED)
    assert (outcome.value_json, outcome.error) == ("1002", None)
    assert store._retry_turns == {}


async def test_two_mutations_reading_two_hot_keys_at_once_do_not_deadlock(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two mutations each read two hot keys at once, in opposite orders, while other
    mutations hold both keys' turns: both finish. (Each waited for its second key's turn while
    waiting for its first: given the first, each held what the other waited for.)"""
    store = make_store(redis_client)
    a, b = await create(store, "a"), await create(store, "b")
    key_a, key_b = store.keys.doc("items", a), store.keys.doc("items", b)
    holder_a, release_a = await hold_turn(store, a, "holder.a")
    holder_b, release_b = await hold_turn(store, b, "holder.b")
    second = {"one": asyncio.Event(), "two": asyncio.Event()}

    def both(name: str, first: str, then: str) -> FunctionSpec:
        async def read_both(ctx: Context) -> None:
            async def later() -> Any:
                await second[name].wait()
                return await ctx.db.get("items", then)

            await asyncio.gather(ctx.db.get("items", first), later())

        return FunctionSpec.from_function(name, "mutation", read_both)

    one = asyncio.create_task(
        run_mutation(store, both("one", a, b), {}, None, client_id="one", request_id=1)
    )
    await until(lambda: store._retry_turns[key_a].users == 2)  # holder.a, one
    two = asyncio.create_task(
        run_mutation(store, both("two", b, a), {}, None, client_id="two", request_id=1)
    )
    await until(lambda: store._retry_turns[key_b].users == 2)  # holder.b, two
    second["one"].set()  # one asks for b's turn too, behind two
    second["two"].set()  # two asks for a's turn too, behind one
    for _ in range(3):
        await asyncio.sleep(0)
    release_a.set()
    release_b.set()
    assert (await holder_a).error is None
    assert (await holder_b).error is None
    outcomes = await asyncio.wait_for(asyncio.gather(one, two), DEADLOCKED)
    assert all(outcome.error is None or outcome.error[0] == "conflict" for outcome in outcomes)
    assert store._retry_turns == {}
