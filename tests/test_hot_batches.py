"""Group commit on hot keys (issue 14): on an instance, the mutations queued for a hot key's
turn run as one batch (one ``read.lua`` with every member's outcome check, each member's
function in order against the state the ones before it left, one ``commit.lua`` storing every
outcome at one version), and every guarantee of a single mutation holds for each member.

Real ``redis-server``; two :class:`Store` objects on one Redis stand for two instances. A key
is made hot as a conflict would (``Store._mark_hot``), after one run taught the store the
call's first read (batches form from calls whose first read is known).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import generate_latest
from redis.exceptions import RedisError
from tether.server.data.engine import run_mutation
from tether.server.data.functions import App, Auth, Context, FunctionSpec
from tether.server.data.store import (
    IDENTITY_ENDED,
    MAX_INSERTS,
    MutationDB,
    MutationOutcome,
    MutationRequest,
    RequestIdReused,
    Store,
    encode_index_values,
)
from tether.server.errors import FunctionError
from tether.server.metrics import Metrics

from tests.apps import partition_app
from tests.clock import ManualClock
from tests.harness import RedisProcess
from tests.test_metrics import Scrape
from tests.test_store_commits import client_commands, create

pytestmark = pytest.mark.timeout(60)

app = App("batches-test")
app.table("items", indexes={"by_tag": ["tag"]})
app.table("rows", indexes={"by_tag": ["tag"]})


def make_store(client: redis.asyncio.Redis, **options: Any) -> Store:
    return Store(client, schema=app.schema, clock=ManualClock(1_700_000_000.0), **options)


async def value(store: Store, doc_id: str) -> int:
    return int((await MutationDB(store).get("items", doc_id) or {})["n"])


def bumper(runs: list[int], name: str = "items.bump", *, fail: bool = False) -> FunctionSpec:
    """Add one to the item tagged ``tag`` (read through the index), appending the value read to
    ``runs``; with ``fail``, add 100 and then raise ``invalid``."""

    async def bump(ctx: Context, tag: str) -> int:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        n = int(docs[0]["n"])
        runs.append(n)
        await ctx.db.patch("items", docs[0]["_id"], {"n": n + (100 if fail else 1)})
        if fail:
            raise FunctionError("invalid", "no")
        return n + 1

    return FunctionSpec.from_function(name, "mutation", bump)


class PausingBump:
    """``items.bump`` (add one to the item tagged ``tag``) whose next run after :meth:`arm`
    stops after its read, sets ``reached`` and waits for ``proceed``; ``runs`` holds the value
    each run read."""

    def __init__(self) -> None:
        self.reached, self.proceed = asyncio.Event(), asyncio.Event()
        self.runs: list[int] = []
        self._pause = False

        async def bump(ctx: Context, tag: str) -> int:
            docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
            self.runs.append(int(docs[0]["n"]))
            if self._pause:
                self._pause = False
                self.reached.set()
                await self.proceed.wait()
            await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
            return int(docs[0]["n"]) + 1

        self.spec = FunctionSpec.from_function("items.bump", "mutation", bump)

    def arm(self) -> None:
        self._pause = True


async def batch_beaten_by(
    store: Store, other: Store, paused: PausingBump, tag: str, doc_id: str, n: int
) -> list[Any]:
    """Requests 1-3 of ``paused.spec`` on the hot item ``tag`` run as one batch on ``store``;
    while its first member runs, ``other`` (another instance) commits ``n`` into the item, so
    the batch's commit conflicts. The three outcomes."""
    await heat(store, tag, paused.spec)
    paused.arm()
    tasks = [asyncio.create_task(call(store, paused.spec, tag, i)) for i in range(1, 4)]
    await paused.reached.wait()
    db = MutationDB(other)
    await db.patch("items", doc_id, {"n": n})
    await other.commit(db, request=None, outcome_value_json=None)
    paused.proceed.set()
    return list(await asyncio.gather(*tasks))


async def commit_starts(store: Store, after: int) -> list[bool]:
    """For each version after ``after``: whether its stream entry lists keys (a commit alone,
    or a batch's first version) or none (a batch's later versions)."""
    batch = await store.read_commits(after)
    assert not batch.gap
    return [bool(commit.written_keys) for commit in batch.commits]


def index_key(store: Store, tag: str, table: str = "items") -> str:
    return store.keys.index(table, "by_tag", encode_index_values([tag]))


async def heat(store: Store, tag: str, *specs: FunctionSpec) -> None:
    """Teach ``store`` each call's first read (one run each, request ids 0 of client
    ``warm``), then make the index key of ``tag`` hot there."""
    for spec in specs:
        await run_mutation(
            store, spec, {"tag": tag}, None, client_id=f"warm-{spec.name}-{id(store)}", request_id=0
        )
    store._mark_hot(index_key(store, tag))


def call(
    store: Store,
    spec: FunctionSpec,
    tag: str,
    request_id: int,
    *,
    client_id: str = "c",
    auth: Auth | None = None,
    authorized: Callable[[], bool] | None = None,
) -> Any:
    return run_mutation(
        store,
        spec,
        {"tag": tag},
        auth,
        client_id=client_id,
        request_id=request_id,
        authorized=authorized,
    )


async def test_queued_mutations_on_a_hot_key_commit_together(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Twenty increments queued at once on a hot key: one read and one commit (two script
    calls); each result has its own version, in order, and its value is the counter at that
    version; the stream holds the twenty versions, the first listing the document; replaying
    every request answers the same and runs nothing. A batch of several keeps the key hot."""
    store = make_store(redis_client, max_retries=0)
    doc_id = await create(store, "h")
    runs: list[int] = []
    bump = bumper(runs)
    await heat(store, "h", bump)
    hot_until = store._hot[index_key(store, "h")]
    before = await store.version()
    outcomes, sent = await client_commands(
        redis_client,
        lambda: asyncio.gather(*(call(store, bump, "h", i) for i in range(1, 21))),
    )
    assert sent == ["EVALSHA", "EVALSHA"]
    assert [o.error for o in outcomes] == [None] * 20
    assert store._hot[index_key(store, "h")] > hot_until
    assert sorted(int(o.value_json) for o in outcomes) == list(range(2, 22))
    assert sorted(o.version for o in outcomes) == list(range(before + 1, before + 21))
    assert all(int(o.value_json) - 1 == o.version - before for o in outcomes)
    assert await store.version() == before + 20
    assert await value(store, doc_id) == 21
    batch = await store.read_commits(before)
    assert [c.version for c in batch.commits] == list(range(before + 1, before + 21))
    assert batch.commits[0].written_keys == {store.keys.doc("items", doc_id)} and not any(
        c.written_keys for c in batch.commits[1:]
    )
    # The warm-up, a commit alone, carried its document for read caches; the batch carries
    # none: its first entry would pass the final state off as the first member's.
    [warm] = (await store.read_commits(before - 1, count=1)).commits
    assert warm.version == before and warm.values is not None
    assert all(c.values is None for c in batch.commits)
    for i, outcome in enumerate(outcomes, start=1):
        stored = await store.get_outcome(MutationRequest("items.bump", "c", i))
        assert stored == {
            "version": outcome.version,
            "value": int(outcome.value_json),
            "name": "items.bump",
        }
    replays = await asyncio.gather(*(call(store, bump, "h", i) for i in range(1, 21)))
    assert replays == outcomes
    assert len(runs) == 21  # the warm-up and twenty: replays ran nothing
    assert await store.version() == before + 20
    assert store._batches == {} and store._retry_turns == {}


async def test_a_batch_member_with_an_outcome_is_a_replay_and_one_request_runs_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A queued request that already has an outcome is answered with it and does not run; the
    same request queued twice runs once (the second waits for the next batch and replays the
    first's outcome); a request whose outcome is another function's raises
    ``RequestIdReused``."""
    store = make_store(redis_client)
    doc_id = await create(store, "r")
    runs: list[int] = []
    bump = bumper(runs)
    other = bumper([], "items.other")
    await run_mutation(store, other, {"tag": "r"}, None, client_id="c", request_id=9)
    first = await call(store, bump, "r", 5)
    await heat(store, "r", bump)
    ran = len(runs)
    results = await asyncio.gather(
        call(store, bump, "r", 5),
        call(store, bump, "r", 6),
        call(store, bump, "r", 7),
        call(store, bump, "r", 6),
        call(store, bump, "r", 9),
        return_exceptions=True,
    )
    replay, six, seven, six_again, reused = results
    assert replay == first
    assert isinstance(six, MutationOutcome) and isinstance(seven, MutationOutcome)
    assert six_again == six
    assert isinstance(reused, RequestIdReused)
    assert sorted([int(six.value_json or 0), int(seven.value_json or 0)]) == [4, 5]
    assert len(runs) == ran + 2  # 6 and 7 only
    assert await value(store, doc_id) == 5


async def test_a_member_whose_session_ended_commits_nothing_and_the_others_run_without_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    """In one batch, a member whose session's fence exists, and one whose ``authorized()``
    is false (from the start, or once it has run), each get ``unauthenticated`` and leave no
    outcome; the others commit, run again without them: their values follow each other."""
    store = make_store(redis_client)
    doc_id = await create(store, "s")
    runs: list[int] = []
    bump = bumper(runs)
    await heat(store, "s", bump)
    await redis_client.set(store.keys.session_fence("gone"), "1")
    asked = 0

    def flips() -> bool:
        nonlocal asked
        asked += 1
        return asked == 1  # true when the batch admits it, false before the commit

    live, ended = Auth("u", "live"), Auth("u", "gone")
    results = await asyncio.gather(
        call(store, bump, "s", 1, auth=live),
        call(store, bump, "s", 2, auth=ended),
        call(store, bump, "s", 3, auth=live, authorized=lambda: False),
        call(store, bump, "s", 4, auth=live),
    )
    refused = ("unauthenticated", IDENTITY_ENDED)
    assert [r.error for r in results] == [None, refused, refused, None]
    assert [r.value_json for r in results[::3]] == ["2", "3"]
    assert await value(store, doc_id) == 3
    results = await asyncio.gather(
        call(store, bump, "s", 5, auth=live),
        call(store, bump, "s", 6, auth=live, authorized=flips),
        call(store, bump, "s", 7, auth=live),
    )
    assert [(r.value_json, r.error) for r in results] == [("4", None), (None, refused), ("5", None)]
    assert await value(store, doc_id) == 5
    for request_id in (2, 3, 6):
        assert await store.get_outcome(MutationRequest("items.bump", "c", request_id, "u")) is None


async def test_a_member_that_raises_gets_its_error_and_the_others_writes_stand(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A member that wrote and then raised a ``FunctionError``: its writes are dropped (the
    next member reads the value before it), its error is its stored outcome; the members
    around it commit, in one batch, at the next two versions (an error takes none)."""
    store = make_store(redis_client)
    doc_id = await create(store, "e")
    runs: list[int] = []
    bump, failing = bumper(runs), bumper(runs, "items.fail", fail=True)
    await heat(store, "e", bump, failing)
    before = await store.version()
    one, two, three = await asyncio.gather(
        call(store, bump, "e", 1), call(store, failing, "e", 2), call(store, bump, "e", 3)
    )
    assert (one.value_json, one.version) == ("2", before + 1)
    assert two == MutationOutcome(None, ("invalid", "no"), None)
    assert (three.value_json, three.version) == ("3", before + 2)
    assert await commit_starts(store, before) == [True, False]
    assert runs[-3:] == [1, 2, 2]
    assert await value(store, doc_id) == 3
    stored = await store.get_outcome(MutationRequest("items.fail", "c", 2))
    assert stored == {
        "version": None,
        "error": {"code": "invalid", "message": "no"},
        "name": "items.fail",
    }


async def test_a_conflict_runs_the_whole_batch_again(redis_client: redis.asyncio.Redis) -> None:
    """Another instance commits while a batch runs: the batch's commit conflicts, and every
    member runs again at once, in order, reading that commit, and commits (one retry allowed;
    the first half of the batch re-runs in it, the rest in the next batch, right after)."""
    store, other = make_store(redis_client, max_retries=1), make_store(redis_client)
    doc_id = await create(store, "k")
    paused = PausingBump()
    outcomes = await batch_beaten_by(store, other, paused, "k", doc_id, 1000)
    runs = paused.runs
    assert sorted(o.value_json for o in outcomes) == ["1001", "1002", "1003"]
    assert runs[1:] == [1, 2, 3, 1000, 1001, 1002]
    assert await value(store, doc_id) == 1003
    assert store._retry_turns == {}


async def test_two_instances_batching_one_hot_key_stay_serialisable(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two stores, each with forty increments queued on the same hot counter: every success
    has its own value, the value of the counter at its own version, the counter ends at their
    number, and they committed in batches."""
    stores = [make_store(redis_client), make_store(redis_client)]
    doc_id = await create(stores[0], "x")
    bump = bumper([])
    for store in stores:
        await heat(store, "x", bump)
    start = await value(stores[0], doc_id)
    before = await stores[0].version()
    outcomes = await asyncio.gather(
        *(call(stores[i % 2], bump, "x", i, client_id=f"client-{i % 2}") for i in range(1, 81))
    )
    values = sorted(int(o.value_json) for o in outcomes if o.value_json is not None)
    assert all(o.error is None or o.error[0] == "conflict" for o in outcomes)
    assert values == list(range(start + 1, start + 1 + len(values)))
    assert len(values) >= 60
    assert await value(stores[0], doc_id) == start + len(values)
    assert all(int(o.value_json) - start == o.version - before for o in outcomes if o.version)
    starts = await commit_starts(stores[0], before)
    assert len(starts) == len(values) and starts.count(True) < len(values)


async def test_batches_stay_inside_their_partition(redis_client: redis.asyncio.Redis) -> None:
    """The same counter name bumped concurrently in the default partition and in two tenants'
    partitions, hot in each: each partition's batch commits there (one batch each, at its
    versions), and each counter counts its own bumps."""
    store = Store(redis_client, schema=partition_app.app.schema, clock=ManualClock(time.time()))
    tenant, tally = partition_app.app.lookup("tenant.bump"), partition_app.app.lookup("tally.bump")
    assert tenant is not None and tally is not None

    def bump(where: str | None, request_id: int) -> Any:
        spec, kwargs = (
            (tally, {"name": "t"}) if where is None else (tenant, {"tenant": where, "name": "t"})
        )
        return run_mutation(
            store, spec, kwargs, None, client_id=f"c-{where}", request_id=request_id
        )

    places: list[str | None] = [None, "a", "b"]
    for where in places:
        await bump(where, 0)
        view = store.in_partition(where)
        view._mark_hot(view.keys.index("tallies", "by_name", encode_index_values(["t"])))
    versions = {where: await store.in_partition(where).version() for where in places}
    outcomes = await asyncio.gather(*(bump(where, i) for i in range(1, 11) for where in places))
    for k, where in enumerate(places):
        mine = outcomes[k::3]
        assert sorted(int(o.value_json) for o in mine) == list(range(2, 12))
        assert all(int(o.value_json) - 1 == o.version - versions[where] for o in mine)
        view = store.in_partition(where)
        assert await view.version() == versions[where] + 10
        assert await commit_starts(view, versions[where]) == [True] + [False] * 9


async def test_a_batch_is_bounded(redis_client: redis.asyncio.Redis) -> None:
    """At most ``max_batch`` members a batch, and members whose writes (final documents) and
    results would take it past ``max_batch_bytes`` wait for the next one; members inserting
    more creation slots than one version holds (``MAX_INSERTS``) commit in separate batches,
    their documents in order."""
    small = make_store(redis_client, max_batch=3)
    await create(small, "b")
    bump = bumper([])
    await heat(small, "b", bump)
    before = await small.version()
    outcomes = await asyncio.gather(*(call(small, bump, "b", i) for i in range(1, 8)))
    assert [o.version for o in outcomes] == list(range(before + 1, before + 8))
    assert await commit_starts(small, before) == [True, False, False] * 2 + [True]

    async def grow(ctx: Context, tag: str) -> int:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        await ctx.db.insert("rows", {"tag": "pad", "pad": "x" * 400})
        return int(docs[0]["n"]) + 1

    tight = make_store(redis_client, max_batch_bytes=600)
    await create(tight, "p")
    spec = FunctionSpec.from_function("items.grow", "mutation", grow)
    await heat(tight, "p", spec)
    before = await tight.version()
    outcomes = await asyncio.gather(
        *(call(tight, spec, "p", i, client_id="g") for i in range(1, 4))
    )
    assert [o.value_json for o in outcomes] == ["2", "3", "4"]
    # Each member's row is over half the bound: each batch holds one member.
    assert await commit_starts(tight, before) == [True, True, True]

    many = make_store(redis_client)
    await create(many, "m")
    share = MAX_INSERTS // 2 + 1

    async def insert_many(ctx: Context, tag: str) -> int:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        for j in range(share):
            await ctx.db.insert("rows", {"tag": tag, "j": j, "by": int(docs[0]["n"])})
        return int(docs[0]["n"]) + 1

    spec = FunctionSpec.from_function("items.insert_many", "mutation", insert_many)
    await heat(many, "m", spec)
    before = await many.version()
    outcomes = await asyncio.gather(*(call(many, spec, "m", i, client_id="m") for i in range(1, 3)))
    assert [o.error for o in outcomes] == [None, None]
    assert [o.version for o in outcomes] == [before + 1, before + 2]
    assert await commit_starts(many, before) == [True, True]
    rows = await MutationDB(many).query("rows", index="by_tag", equals={"tag": "m"})
    assert len(rows) == 2 * share + share  # the warm-up's, then the two members'
    assert [(r["by"], r["j"]) for r in rows[share:]] == [
        (b, j) for b in (1, 2) for j in range(share)
    ]


async def test_each_committed_batch_is_observed_in_the_batch_size_histogram(
    redis_client: redis.asyncio.Redis,
) -> None:
    """``tether_mutation_batch_members`` as ``/metrics`` renders it (``generate_latest`` of the
    instance's registry): seven mutations queued on a hot key with batches of at most three
    commit as 3 + 3 + 1; the warm-up run, alone, is not a batch."""
    metrics = Metrics()
    store = make_store(redis_client, max_batch=3, metrics=metrics)
    await create(store, "h")
    bump = bumper([])
    await heat(store, "h", bump)
    name = "tether_mutation_batch_members"
    assert Scrape(generate_latest(metrics.registry).decode())(f"{name}_count") == 0
    await asyncio.gather(*(call(store, bump, "h", i) for i in range(1, 8)))
    scrape = Scrape(generate_latest(metrics.registry).decode())
    assert scrape(f"{name}_count") == 3
    assert scrape(f"{name}_sum") == 7
    assert [scrape(f"{name}_bucket", le=le) for le in ("1.0", "2.0", "4.0", "+Inf")] == [1, 1, 3, 3]


async def test_the_batch_bound_counts_utf8_bytes(redis_client: redis.asyncio.Redis) -> None:
    """``max_batch_bytes`` is in bytes (UTF-8), not characters: members whose non-ASCII
    arguments end up in their writes and results fit two to a batch counted in characters
    (the first document 78, each member's row 184 and result 102: 650 against 720) but not in
    bytes (each member's row 284 and result 202: 1,050)."""
    pad = "é" * 100  # 100 characters, 200 bytes

    async def note(ctx: Context, tag: str, text: str) -> str:
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": tag}, limit=1)
        await ctx.db.patch("items", docs[0]["_id"], {"n": docs[0]["n"] + 1})
        await ctx.db.insert("rows", {"tag": "pad", "text": text})
        return text

    spec = FunctionSpec.from_function("items.note", "mutation", note)
    store = make_store(redis_client, max_batch_bytes=720)
    await create(store, "u")
    await run_mutation(store, spec, {"tag": "u", "text": pad}, None, client_id="w", request_id=0)
    store._mark_hot(index_key(store, "u"))
    before = await store.version()
    outcomes = await asyncio.gather(
        *(
            run_mutation(store, spec, {"tag": "u", "text": pad}, None, client_id="u", request_id=i)
            for i in range(1, 4)
        )
    )
    assert [o.error for o in outcomes] == [None, None, None]
    assert [o.version for o in outcomes] == [before + 1, before + 2, before + 3]
    # One member a batch: each batch's version lists its keys.
    assert await commit_starts(store, before) == [True, True, True]
    # The same in ASCII (100 bytes): two to a batch, the third in a batch of its own.
    ascii_args = {"tag": "u", "text": "e" * 100}
    await run_mutation(store, spec, ascii_args, None, client_id="w", request_id=1)  # learnt
    store._mark_hot(index_key(store, "u"))
    before = await store.version()
    await asyncio.gather(
        *(
            run_mutation(store, spec, ascii_args, None, client_id="a", request_id=i)
            for i in range(1, 4)
        )
    )
    assert await commit_starts(store, before) == [True, False, True]


async def test_a_redis_failure_mid_batch_answers_every_member_and_a_replay_finds_out(
    redis_proc: RedisProcess,
) -> None:
    """Redis goes away while a batch runs (after its read, before its commit): every member
    raises the Redis error (outcome unknown); once Redis is back, each request re-sent runs
    once and commits."""
    client = redis_proc.client()
    try:
        store = make_store(client, max_retries=0)
        doc_id = await create(store, "f")
        paused = PausingBump()
        reached, proceed, spec = paused.reached, paused.proceed, paused.spec
        await heat(store, "f", spec)
        paused.arm()
        tasks = [asyncio.create_task(call(store, spec, "f", i)) for i in range(1, 4)]
        await reached.wait()
        redis_proc.stop()
        proceed.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RedisError) for r in results), results
        assert store._batches == {}
        redis_proc.restart()
        again = await asyncio.gather(*(call(store, spec, "f", i) for i in range(1, 4)))
        assert sorted(o.value_json for o in again) == ["2", "3", "4"]
        assert await value(store, doc_id) == 4
    finally:
        await client.aclose()


async def test_a_member_whose_request_commits_elsewhere_meanwhile_is_a_replay(
    redis_client: redis.asyncio.Redis,
) -> None:
    """While a batch runs, another instance runs and commits one of its members' requests (on
    another counter: nothing the batch read changes): the batch's commit finds that outcome,
    answers the member with it, and commits the other members without it (they ran again:
    their values follow each other)."""
    store, other = make_store(redis_client), make_store(redis_client)
    doc_id = await create(store, "d")
    elsewhere_id = await create(store, "o")
    paused = PausingBump()
    reached, proceed, runs, spec = paused.reached, paused.proceed, paused.runs, paused.spec
    await heat(store, "d", spec)
    paused.arm()
    tasks = [asyncio.create_task(call(store, spec, "d", i)) for i in range(1, 4)]
    await reached.wait()
    elsewhere = await call(other, spec, "o", 2)  # request 2, committed on the other instance
    assert elsewhere.value_json == "1"
    proceed.set()
    one, two, three = await asyncio.gather(*tasks)
    assert two == elsewhere
    assert (one.value_json, three.value_json) == ("2", "3")
    assert (await value(store, doc_id), await value(store, elsewhere_id)) == (3, 1)
    assert runs[1:] == [1, 0, 2, 3, 1, 2]  # 1, elsewhere, 2 and 3; the batch again without 2


async def test_members_past_their_retries_get_conflict_and_keep_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    """With no retry allowed, a batch whose commit conflicts answers every member
    ``conflict``, stored as its outcome (a replay gets it too), and commits nothing."""
    store, other = make_store(redis_client, max_retries=0), make_store(redis_client)
    doc_id = await create(store, "c")
    paused = PausingBump()
    spec = paused.spec
    outcomes = await batch_beaten_by(store, other, paused, "c", doc_id, 50)
    assert [o.error[0] if o.error else None for o in outcomes] == ["conflict"] * 3
    assert await value(store, doc_id) == 50
    replays = await asyncio.gather(*(call(store, spec, "c", i) for i in range(1, 4)))
    assert replays == outcomes
