"""Where the read cache meets hot-key batches (issue 14): a batch's commit takes versions
V .. V+n-1, but every document it wrote carries version V in Redis with the batch's final
state. A cache that has applied entry V and not yet the later ones (a manager part-way through
a batch: the watcher's XREAD cut between its entries, or this instance's members handed over
one by one) is valid at V; no query may answer "at V" with a state only a later member made.

Real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from tether.server.data.engine import QueryEngine
from tether.server.data.functions import App, Context
from tether.server.data.live import Registration, SubscriptionManager
from tether.server.data.read_cache import ReadCache
from tether.server.data.store import MutationDB, QueryDB, Store

from tests.clock import ManualClock
from tests.test_hot_batches import bumper, call, create, heat, make_store
from tests.test_live import Watched


def both(first: str, second: str) -> Callable[[QueryDB], Awaitable[str]]:
    """Read the document ``first``, then ``second`` (one snapshot)."""

    async def run(db: QueryDB) -> str:
        a = await db.get("items", first)
        b = await db.get("items", second)
        return json.dumps([a and a["n"], b and b["n"]])

    return run


async def test_a_cache_part_way_through_a_batch_never_answers_a_later_members_state(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A query whose first read hits the cache at V (the batch's first entry applied) and whose
    next read, of a document the batch wrote, goes to Redis: Redis has the batch's final state,
    with version V (not newer than the snapshot). The answer must not be that state at V,
    where the counter is the first member's (its mutation_result at V said so)."""
    store = make_store(redis_client, max_retries=0)
    other = await create(store, "o")
    counter = await create(store, "h")
    bump = bumper([])
    await heat(store, "h", bump)
    cache = ReadCache(None)
    cache.reset(await store.version())
    run = both(other, counter)
    await store.run_query(run, cache)  # fills both documents at the cache's version
    before = await store.version()

    outcomes = await asyncio.gather(*(call(store, bump, "h", i) for i in range(1, 4)))
    assert sorted(o.version for o in outcomes) == [before + 1, before + 2, before + 3]
    at_first = {o.version: int(o.value_json or 0) for o in outcomes}[before + 1]

    # The manager applies the batch's first entry only (the others are still to come).
    [first] = (await store.read_commits(before, count=1)).commits
    assert first.version == before + 1 and first.written_keys
    cache.apply(first.version, first.written_keys, first.values)

    answer = await store.run_query(run, cache)
    n = json.loads(answer.value_json or "null")[1]
    assert answer.version > before + 1 or n == at_first, (answer.version, n, at_first)


async def test_a_cache_hit_then_a_document_written_since_answers_not_conflict(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A query whose first read hits the cache at C and whose next read, of a document not in
    the cache, meets it written after C (a commit the manager has not applied yet): the query
    must still answer (every run must not conflict with the cache's older snapshot)."""
    store = make_store(redis_client, max_retries=0)
    other = await create(store, "o")
    counter = await create(store, "h")
    cache = ReadCache(None)
    cache.reset(await store.version())
    await store.run_query(both(other, other), cache)  # only `other` is cached
    bump = bumper([])
    await call(store, bump, "h", 1)  # writes `counter` after the cache's version

    answer = await store.run_query(both(other, counter), cache)
    assert answer.error is None, answer
    assert json.loads(answer.value_json or "null") == [0, 1]


async def test_a_cache_from_before_redis_lost_its_data_does_not_mix_into_a_read(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Redis restarted without its data (versions start again from 0) before the instance's
    watcher noticed: a query whose first read hits the cache (the old history, at C) and whose
    next read goes to Redis (the new one, below C) must not answer with a document of the old
    history beside one of the new: it reads the new history alone."""
    store = make_store(redis_client, max_retries=0)
    old = await create(store, "o")
    for _ in range(3):
        await create(store, "x")  # the old history's version, above the new one's
    cache = ReadCache(None)
    cache.reset(await store.version())
    await store.run_query(both(old, old), cache)  # `old` is cached
    await redis_client.flushall()
    new = await create(store, "n")
    assert await store.version() < (cache.version or 0)

    answer = await store.run_query(both(old, new), cache)
    assert json.loads(answer.value_json or "null") == [None, 0], answer


async def test_a_run_behind_redis_costs_the_query_none_of_its_attempts(
    redis_client: redis.asyncio.Redis,
) -> None:
    """With one attempt per query, a run that met the cache behind Redis still answers: its
    run from Redis alone is not an attempt taken from the query."""
    store = make_store(redis_client, max_retries=0, query_attempts=1)
    other = await create(store, "o")
    counter = await create(store, "h")
    cache = ReadCache(None)
    cache.reset(await store.version())
    await store.run_query(both(other, other), cache)
    await call(store, bumper([]), "h", 1)

    answer = await store.run_query(both(other, counter), cache)
    assert json.loads(answer.value_json or "null") == [0, 1], answer


class Recorded(Watched):
    """A subscriber that keeps every delivery: (version, value JSON, error)."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[int, str | None, tuple[str, str] | None]] = []

    def deliver(self, version: int, updates: list[tuple[Any, Any]], shared: Any = None) -> None:
        for _, evaluation in updates:
            self.deliveries.append((version, evaluation.value_json, evaluation.error))


async def test_a_live_query_half_in_the_cache_gets_its_value_not_a_lasting_conflict(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A live query reads a document still cached, then one a commit wrote without its value
    (past ``commit_values_bytes``); another commit writes that one again before the re-run.
    The manager has applied the first commit only (as when this instance hands it over itself)
    when it re-runs the query: the re-run answers the documents' values, not ``conflict`` (which
    it then kept: its version was Redis's, so applying the second commit did not re-run it)."""
    queries = App("cache-live")
    queries.table("items", indexes={"by_tag": ["tag"]})

    @queries.query("items.both")
    async def items_both(ctx: Context, first: str, second: str) -> Any:
        a = await ctx.db.get("items", first)
        b = await ctx.db.get("items", second)
        return [a and a["n"], b and b["n"]]

    store = Store(
        redis_client, schema=queries.schema, clock=ManualClock(), commit_values_bytes=1024
    )
    engine = QueryEngine(queries, store)
    cache = ReadCache(None)
    manager = SubscriptionManager(
        engine, clock=ManualClock(), identity_usable=lambda _: True, read_cache=cache
    )
    manager._watch_ok = False  # no watcher here: the pump reads the stream itself
    a = await insert(store, {"tag": "a", "n": 0})
    b = await insert(store, {"tag": "b", "n": 0})
    args = engine.resolve("query", "items.both", {"first": a, "second": b})
    seen = Recorded()
    manager.attach([Registration(seen, 1, 1, 0, "items.both", args, None)])
    await manager._cycle()  # first evaluation: both documents cached
    assert seen.deliveries[-1][1:] == ("[0,0]", None)

    big = await patch(store, b, {"n": 1, "pad": "x" * 2000})  # no value in its stream entry
    await patch(store, b, {"n": 2})  # not applied by the manager yet
    manager.notify_commit(big.version, big.written_keys, big.written_values)
    await manager._cycle()
    await manager._cycle()  # and once more after the second commit is applied

    for version, _, error in seen.deliveries[1:]:
        assert error is None, (version, error)
    assert seen.deliveries[-1][1] == "[0,2]"


async def insert(store: Store, doc: dict[str, Any]) -> str:
    db = MutationDB(store)
    doc_id = await db.insert("items", doc)
    await store.commit(db, request=None, outcome_value_json=None)
    return doc_id


async def patch(store: Store, doc_id: str, fields: dict[str, Any]) -> Any:
    db = MutationDB(store)
    await db.patch("items", doc_id, fields)
    result = await store.commit(db, request=None, outcome_value_json=None)
    assert result.version is not None
    return result
