"""The live queries' read cache (issue 14): commits carry the documents they wrote, and a query
re-runs from what the instance has applied, answering exactly what Redis would at that version.

Real ``redis-server``. A :class:`ReadCache` follows the commit stream the way a
:class:`SubscriptionManager` does (in order, starting over on a gap); two managers on one Redis
stand for two instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import redis.asyncio
from tether.server import demo
from tether.server.data.engine import QueryEngine
from tether.server.data.live import PartitionFollowers, Registration, SubscriptionManager
from tether.server.data.read_cache import ReadCache
from tether.server.data.store import MutationDB, QueryDB, Store

from tests.clock import ManualClock
from tests.harness import ServerProcess
from tests.test_live import Watched
from tests.test_reactive import Opener, open_live, two_instances, unique, values_of
from tests.test_store_commits import make_store

__all__ = ["open_live"]  # a fixture, used by name

READ_SHA = hashlib.sha1(
    resources.files("tether.server.data").joinpath("lua", "read.lua").read_text().encode(),
    usedforsecurity=False,
).hexdigest()

TAGS = ("a", "b", "c")
#: Every read the workload checks: (order, limit) over each tag's range.
SHAPES = [(order, limit) for order in ("asc", "desc") for limit in (None, 0, 1, 2, 5)]


async def follow(store: Store, cache: ReadCache) -> None:
    """Apply every commit after the cache's version, as a manager does."""
    assert cache.version is not None
    batch = await store.read_commits(cache.version, count=10_000)
    if batch.gap:
        cache.reset(batch.version)
        return
    for commit in batch.commits:
        cache.apply(commit.version, commit.written_keys, commit.values)


def ranged(tag: str, order: str, limit: int | None) -> Callable[[QueryDB], Awaitable[str]]:
    async def run(db: QueryDB) -> str:
        docs = await db.query(
            "items",
            index="by_tag",
            equals={"tag": tag},
            order=order,  # type: ignore[arg-type]
            limit=limit,
        )
        return json.dumps(docs, sort_keys=True)

    return run


def by_id(doc_id: str) -> Callable[[QueryDB], Awaitable[str]]:
    async def run(db: QueryDB) -> str:
        return json.dumps(await db.get("items", doc_id), sort_keys=True)

    return run


async def mutate(store: Store, change: Callable[[MutationDB], Awaitable[Any]]) -> Any:
    db = MutationDB(store)
    value = await change(db)
    result = await store.commit(db, request=None, outcome_value_json=None)
    assert result.version is not None
    return value


async def test_a_cached_rerun_answers_what_redis_answers(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Inserts, patches, deletes, replacements and moves between index ranges, in a random
    order (seeded): after each commit, every range (ascending, descending, with limits) and
    every document read through the cache that followed the stream equals the same read from
    Redis, at the same version; and most reads after a patch are answered by the cache."""
    store = make_store(redis_client)
    cache = ReadCache(None)
    cache.reset(await store.version())
    rng = random.Random(14)
    live: list[str] = []
    gone: list[str] = []  # deleted: still read, each answers None
    checked = 0
    for step in range(60):
        kind = rng.choice(["insert", "insert", "patch", "patch", "patch", "move", "delete"])
        if kind == "insert" or not live:
            tag = rng.choice(TAGS)
            live.append(
                await mutate(store, lambda db, t=tag: db.insert("items", {"tag": t, "n": 0}))
            )
        else:
            doc_id = rng.choice(live)
            if kind == "patch":
                await mutate(store, lambda db, i=doc_id, s=step: db.patch("items", i, {"n": s}))
            elif kind == "move":
                tag = rng.choice(TAGS)
                await mutate(store, lambda db, i=doc_id, t=tag: db.replace("items", i, {"tag": t}))
            else:
                await mutate(store, lambda db, i=doc_id: db.delete("items", i))
                live.remove(doc_id)
                gone.append(doc_id)
        await follow(store, cache)
        runs = [ranged(tag, order, limit) for tag in TAGS for order, limit in SHAPES]
        runs += [by_id(doc_id) for doc_id in live + gone]
        for run in runs:
            cached = await store.run_query(run, cache)
            fresh = await store.run_query(run)
            assert (cached.value_json, cached.version) == (fresh.value_json, fresh.version), step
            assert cached.read_set == fresh.read_set
            checked += 1
    assert checked > 1000
    # Reads that hit: every patch keeps the ranges and updates the documents in place.
    assert cache.hits > checked // 4, (cache.hits, cache.misses)


async def test_a_document_written_without_its_value_leaves_the_cache(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A commit whose documents are over ``commit_values_bytes`` carries their keys only: the
    cached document goes, and the next read is Redis's (the new value), not the old one."""
    store = make_store(redis_client, commit_values_bytes=1024)
    cache = ReadCache(None)
    doc_id = await mutate(store, lambda db: db.insert("items", {"tag": "a", "n": 0}))
    cache.reset(await store.version())
    read = by_id(doc_id)
    await store.run_query(read, cache)  # fills it
    assert (await store.run_query(read, cache)).value_json is not None
    hits = cache.hits

    await mutate(store, lambda db: db.patch("items", doc_id, {"n": 1, "big": "x" * 2000}))
    entry = (await redis_client.xrevrange(store.keys.commits, count=1))[0][1]
    assert "w" not in entry and doc_id in entry["k"]  # keys only
    await follow(store, cache)
    cached = await store.run_query(read, cache)
    assert json.loads(cached.value_json or "null")["n"] == 1
    assert cache.hits == hits  # a miss: read from Redis

    # A small one again travels with its commit, and is answered from the cache.
    await mutate(store, lambda db: db.replace("items", doc_id, {"tag": "a", "n": 2}))
    entry = (await redis_client.xrevrange(store.keys.commits, count=1))[0][1]
    assert json.loads(entry["w"])[0][0] == store.keys.doc("items", doc_id)
    await follow(store, cache)
    cached = await store.run_query(read, cache)
    assert json.loads(cached.value_json or "null")["n"] == 2
    assert cache.hits == hits + 1


async def test_a_query_newer_than_the_cache_reads_redis(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A query whose first read (from Redis) saw a commit the cache has not applied yet reads
    the rest from Redis too: a cached answer at the older version would mix two snapshots."""
    store = make_store(redis_client)
    ids = [await mutate(store, lambda db: db.insert("items", {"tag": "a", "n": 0})) for _ in "ab"]
    cache = ReadCache(None)
    cache.reset(await store.version())
    await store.run_query(by_id(ids[1]), cache)  # cached at the cache's version
    uncached = await mutate(store, lambda db: db.insert("items", {"tag": "b", "n": 0}))
    await mutate(store, lambda db: db.patch("items", ids[1], {"n": 7}))  # not applied here

    async def both(db: QueryDB) -> str:
        first = await db.get("items", uncached)  # a miss: Redis, at the newest version
        second = await db.get("items", ids[1])
        return json.dumps([first, second])

    hits = cache.hits
    result = await store.run_query(both, cache)
    assert json.loads(result.value_json or "null")[1]["n"] == 7
    assert result.version == await store.version()
    assert cache.hits == hits
    assert len(cache) == 1  # nothing read past the cache's version was kept


async def client_reads(client: redis.asyncio.Redis, action: Callable[[], Awaitable[Any]]) -> int:
    """The ``read.lua`` calls clients made while ``action()`` ran (from ``MONITOR``)."""
    marker = "end-of-action"
    reads = 0
    async with client.monitor() as monitor:
        await action()
        await client.echo(marker)
        while True:
            info = await monitor.next_command()
            command = str(info["command"])
            if info["client_type"] == "lua":
                continue
            if command == f"ECHO {marker}":
                return reads
            if command.upper().startswith(("EVALSHA " + READ_SHA).upper()):
                reads += 1
            elif command.upper().startswith("EVAL ") and "Read a batch" in command:
                reads += 1


class Instance:
    """One instance's data layer: its engine and the manager of its live queries."""

    def __init__(self, client: redis.asyncio.Redis, *, cached: bool = True, **options: Any) -> None:
        clock = ManualClock()
        self.engine = QueryEngine(demo.app, Store(client, schema=demo.app.schema, clock=clock))
        self.cache = ReadCache(None) if cached else None
        self.manager = SubscriptionManager(
            self.engine,
            clock=clock,
            identity_usable=lambda _: True,
            read_cache=self.cache,
            **options,
        )
        self.watched = Watched()
        self.pump: asyncio.Task[None] | None = None

    def start(self, counter: str) -> None:
        args = self.engine.resolve("query", "counter.get", {"name": counter})
        reg = Registration(self.watched, 1, 1, 0, "counter.get", args, None)
        self.manager.attach([reg])
        self.pump = asyncio.create_task(self.manager.run())

    async def increment(self, counter: str, request_id: int) -> int:
        """``counter.increment`` as the endpoint runs it: commit, then deliver here before the
        mutation's result (read your writes)."""
        kwargs = self.engine.resolve("mutation", "counter.increment", {"name": counter})
        result = await self.engine.run_mutation(
            "counter.increment", kwargs, None, client_id="c", request_id=request_id
        )
        assert result.error is None and result.version is not None, result
        self.manager.notify_commit(result.version, result.written_keys, result.written_values)
        await self.manager.wait_processed(result.version)
        assert result.value_json is not None
        return int(result.value_json)

    async def increment_elsewhere(self, counter: str, request_id: int) -> None:
        """A commit made by this instance's engine that no manager hears of (another
        instance's, as far as a follower is concerned)."""
        kwargs = self.engine.resolve("mutation", "counter.increment", {"name": counter})
        result = await self.engine.run_mutation(
            "counter.increment", kwargs, None, client_id="elsewhere", request_id=request_id
        )
        assert result.error is None, result

    async def stop(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump
            self.pump = None


async def test_the_follower_delivers_a_commit_without_reading_redis(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two instances follow ``counter.get``; one increments. The committing instance delivers
    the new value before the result, the other once its watcher hands over the stream entry:
    the only ``read.lua`` call is the mutation's own read. Without the cache each instance
    reads the counter back (three calls)."""
    here, there = Instance(redis_client), Instance(redis_client)
    for instance in (here, there):
        instance.start("fan")
    try:
        for instance in (here, there):
            await instance.watched.wait_for(0, timeout=10)
        assert await here.increment("fan", 1) == 1  # warms the scripts and the caches
        await there.watched.wait_for(1, timeout=10)

        async def round_trip() -> None:
            assert await here.increment("fan", 2) == 2
            assert here.watched.values[-1] == 2  # delivered before the mutation's result
            await there.watched.wait_for(2, timeout=10)

        assert await client_reads(redis_client, round_trip) == 1
        assert there.watched.values[-1] == 2
        assert here.cache is not None and there.cache is not None
        assert here.cache.version == there.cache.version == await here.engine.version()
    finally:
        for instance in (here, there):
            await instance.stop()


async def reads_of_a_second_increment(
    redis_client: redis.asyncio.Redis, here: Instance, there: Instance
) -> int:
    """Both follow ``counter.get``; ``here`` increments twice: the ``read.lua`` calls of the
    second round, until ``there`` has delivered it."""
    for instance in (here, there):
        instance.start("fan")
    try:
        for instance in (here, there):
            await instance.watched.wait_for(0, timeout=10)
        assert await here.increment("fan", 1) == 1
        await there.watched.wait_for(1, timeout=10)

        async def round_trip() -> None:
            assert await here.increment("fan", 2) == 2
            await there.watched.wait_for(2, timeout=10)

        return await client_reads(redis_client, round_trip)
    finally:
        for instance in (here, there):
            await instance.stop()


async def test_without_the_cache_each_instance_reads_back(
    redis_client: redis.asyncio.Redis,
) -> None:
    """The same round without read caches: the measure the test above is compared with."""
    no_cache = Instance(redis_client, cached=False), Instance(redis_client, cached=False)
    assert await reads_of_a_second_increment(redis_client, *no_cache) == 3


async def test_a_follower_holds_documents_of_at_most_its_pending_commits(
    redis_client: redis.asyncio.Redis,
) -> None:
    """``TETHER_READ_CACHE_PENDING_COMMITS`` (``known_values``) 0: the watcher hands the
    commits over by their keys only, so the follower's cache drops the counter and reads it
    back (two ``read.lua`` calls where the test above has one)."""
    here, there = Instance(redis_client), Instance(redis_client, known_values=0)
    assert await reads_of_a_second_increment(redis_client, here, there) == 2


async def test_a_trimmed_stream_clears_the_cache(redis_client: redis.asyncio.Redis) -> None:
    """An instance that was away while commits were made and the stream trimmed past them
    (a gap) must not answer from what it cached before: its live query gets the new value."""
    here = Instance(redis_client)
    other = Instance(redis_client, cached=False)  # commits only: no pump
    here.start("g")
    try:
        await here.watched.wait_for(0, timeout=10)
        await other.increment_elsewhere("g", 1)
        await here.watched.wait_for(1, timeout=10)
        assert here.cache is not None and len(here.cache) > 0
        await here.stop()
        for request_id in (2, 3):
            await other.increment_elsewhere("g", request_id)
        store = here.engine.store
        await redis_client.xtrim(store.keys.commits, maxlen=0)
        here.pump = asyncio.create_task(here.manager.run())
        await here.watched.wait_for(3, timeout=15)
        assert here.watched.values[-1] == 3
    finally:
        await here.stop()


async def test_two_server_processes_deliver_a_commit_without_reading_it_back(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """End to end, two instances (``tether serve`` processes) each with a subscriber of
    ``counter.get``, a writer on one: per increment, the only ``read.lua`` call is the
    mutation's own read (its instance and the other deliver from their read caches), and
    every value reaches both subscribers, the writer's before its ``mutation_result``."""
    a, b = two_instances(server_factory)
    name = unique("cached")
    watchers = [await open_live(server, label=f"watcher {i}") for i, server in enumerate((a, b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": name})
    writer = await open_live(a, label="writer")
    await writer.subscribe(1, "counter.get", {"name": name})
    await writer.mutate(1, "counter.increment", {"name": name})  # creates the counter
    for watcher in watchers:
        await watcher.wait_held(1, ("value", 1))

    async def increments() -> None:
        for request_id in range(2, 12):
            await writer.mutate(request_id, "counter.increment", {"name": name})
            assert writer.at_result[request_id][1][1] == ("value", request_id)
            for watcher in watchers:
                await watcher.wait_held(1, ("value", request_id))

    assert await client_reads(redis_client, increments) == 10
    for watcher in watchers:
        assert values_of(watcher, 1) == list(range(12))


async def test_each_followed_partition_has_a_cache_of_its_own(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A partition's follower re-runs its queries from a cache of that partition (its own
    version and stream): one ``read.lua`` call per bump, the mutation's. A cache is never used
    by a store of another partition (versions of two streams do not compare)."""
    from tests.apps.partition_app import app as partition_app

    clock = ManualClock()
    store = Store(redis_client, schema=partition_app.schema, clock=clock)
    engine = QueryEngine(partition_app, store)
    followers = PartitionFollowers(
        engine, clock=clock, identity_usable=lambda _: True, read_cache_bytes=1 << 20
    )
    manager = followers.manager("acme")
    assert manager is not None and manager.read_cache is not None
    assert manager.read_cache.partition == "acme"
    watched = Watched()
    args = engine.resolve("query", "tenant.get", {"tenant": "acme", "name": "t"})
    manager.attach([Registration(watched, 1, 1, 0, "tenant.get", args, None, partition="acme")])

    async def bump(request_id: int) -> None:
        kwargs = engine.resolve("mutation", "tenant.bump", {"tenant": "acme", "name": "t"})
        result = await engine.run_mutation(
            "tenant.bump", kwargs, None, client_id="c", request_id=request_id
        )
        assert result.partition == "acme" and result.version is not None, result
        manager.notify_commit(result.version, result.written_keys, result.written_values)
        await manager.wait_processed(result.version)

    try:
        await watched.wait_for(0, timeout=10)
        await bump(1)
        await watched.wait_for(1, timeout=10)

        async def second() -> None:
            await bump(2)
            await watched.wait_for(2, timeout=10)

        assert await client_reads(redis_client, second) == 1
        cache = manager.read_cache
        assert cache.version == await store.in_partition("acme").version()

        # The default partition's store leaves another partition's cache alone.
        hits, misses, held = cache.hits, cache.misses, len(cache)
        tally = engine.resolve("query", "tally.get", {"name": "t"})
        await engine.evaluate("tally.get", tally, None, cache)
        assert (cache.hits, cache.misses, len(cache)) == (hits, misses, held)
    finally:
        await followers.close()
