"""Data partitions (``App.query/mutation(partition=...)``, ``docs/scaling.md``): each partition
is its own hash tag (Cluster slot), version counter and commit stream; the default partition's
keys are unchanged; an ended session commits into no partition (contract §5 rule 6), also when
the end races a mutation; live queries of a partition follow its stream across instances; a
connection's versions only grow across partitions; a partitioned commit on a 3-master cluster.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot
from tether.protocol import SessionEndReason
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.data import functions
from tether.server.data.engine import QueryEngine, run_mutation, run_query
from tether.server.data.functions import App, Auth, Context
from tether.server.data.store import (
    IDENTITY_ENDED,
    MutationDB,
    MutationRequest,
    RequestIdReused,
    Store,
)
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import MAX_CONNECTIONS, connect

from tests.apps import partition_app
from tests.clock import ManualClock
from tests.harness import RedisClusterProcess, ServerProcess
from tests.sync_client import signup
from tests.test_reactive import Opener, open_live, unique
from tests.test_sessions import make_settings

__all__ = ["open_live"]

pytestmark = pytest.mark.timeout(60)

PARTITION_APP = "tests.apps.partition_app:app"
app = partition_app.app


def store_on(client: Any) -> Store:
    return Store(client, schema=app.schema, clock=ManualClock(float(int(time.time()))))


def sessions_on(client: Any) -> SessionStore:
    return SessionStore(client, RefreshTokenCodec(secrets.token_bytes(32)), make_settings())


async def bump(
    store: Store,
    tenant: str | None,
    name: str = "t",
    *,
    auth: Auth | None = None,
    client_id: str | None = None,
    request_id: int | None = None,
) -> Any:
    spec = app.lookup("tally.bump" if tenant is None else "tenant.bump")
    assert spec is not None
    kwargs: dict[str, Any] = {"name": name} if tenant is None else {"tenant": tenant, "name": name}
    return await run_mutation(store, spec, kwargs, auth, client_id=client_id, request_id=request_id)


async def tally(store: Store, tenant: str | None, name: str = "t") -> Any:
    spec = app.lookup("tally.get" if tenant is None else "tenant.get")
    assert spec is not None
    kwargs: dict[str, Any] = {"name": name} if tenant is None else {"tenant": tenant, "name": name}
    return await run_query(store, spec, kwargs, None)


# ---------------------------------------------------------------------------------- API


def test_partition_must_name_a_string_argument() -> None:
    bad = App("bad")

    async def f(ctx: Context, tenant: int) -> None: ...

    async def g(ctx: Context, tenant: str | None) -> None: ...

    async def h(ctx: Context, name: str) -> None: ...

    for fn in (f, g, h):
        with pytest.raises(ValueError, match="partition='tenant' must name one of its arguments"):
            bad.mutation("x", partition="tenant")(fn)
    assert app.functions["tenant.get"].partition == "tenant"
    assert app.functions["tally.get"].partition is None
    assert functions.MAX_PARTITION_BYTES == redis_keys.MAX_PARTITION_BYTES


@pytest.mark.parametrize("tenant", ["", "x" * 129, "é" * 65, "\ud800"])
async def test_a_bad_partition_name_is_invalid_before_anything_runs(
    redis_client: redis.asyncio.Redis, tenant: str
) -> None:
    store = store_on(redis_client)
    ran: list[str] = []
    local = App("local")
    local.table("tallies", indexes={"by_name": ["name"]})

    @local.mutation("m", partition="tenant")
    async def m(ctx: Context, tenant: str) -> None:
        ran.append(tenant)

    @local.query("q", partition="tenant")
    async def q(ctx: Context, tenant: str) -> None:
        ran.append(tenant)

    outcome = await run_mutation(
        store, local.functions["m"], {"tenant": tenant}, None, client_id="c", request_id=1
    )
    assert outcome.error is not None and outcome.error[0] == "invalid"
    result = await run_query(store, local.functions["q"], {"tenant": tenant}, None)
    assert result.error is not None and result.error[0] == "invalid"
    assert ran == []
    assert await redis_client.dbsize() == 0
    # The longest name allowed runs.
    ok = await run_query(store, local.functions["q"], {"tenant": "é" * 64}, None)
    assert ok.error is None and ran == ["é" * 64]


async def test_ctx_partition_and_ctx_db_see_only_their_partition(
    redis_client: redis.asyncio.Redis,
) -> None:
    store = store_on(redis_client)
    where = await run_query(store, app.functions["tenant.where"], {"tenant": "acme"}, None)
    assert where.value_json == '"acme"'
    assert (await bump(store, "acme")).value_json == "1"
    assert (await bump(store, "acme")).value_json == "2"
    assert (await bump(store, "globex")).value_json == "1"
    assert (await bump(store, None)).value_json == "1"
    assert (await tally(store, "acme")).value_json == "2"
    assert (await tally(store, "globex")).value_json == "1"
    assert (await tally(store, None)).value_json == "1"


# ---------------------------------------------------------------------------------- keys


async def test_each_partition_is_one_slot_and_the_default_keys_are_unchanged(
    redis_client: redis.asyncio.Redis,
) -> None:
    store = store_on(redis_client)
    await bump(store, None, client_id="c", request_id=1)
    await bump(store, "acme", client_id="c", request_id=2)
    await bump(store, "globex", client_id="c", request_id=3)
    keys = {str(k) async for k in redis_client.scan_iter(count=1000)}
    default = {k for k in keys if k.startswith("tether:{tether-data}:")}
    assert {"tether:{tether-data}:version", "tether:{tether-data}:commits"} <= default
    by_tag: dict[str, set[str]] = {}
    for key in keys:
        by_tag.setdefault(key[key.index("{") : key.index("}") + 1], set()).add(key)
    acme = redis_keys.data_keys("acme").tag
    globex = redis_keys.data_keys("globex").tag
    assert set(by_tag) == {"{tether-data}", acme, globex}
    assert acme == "{tether-data:YWNtZQ}"
    for group in by_tag.values():
        assert len({key_slot(k.encode()) for k in group}) == 1
    slots = {key_slot(tag.encode()) for tag in by_tag}
    assert len(slots) == 3
    # Names with the key separators stay inside the tag.
    odd = redis_keys.data_keys("a}b:{c")
    assert odd.tag.count("{") == odd.tag.count("}") == 1 and ":" not in odd.tag[1:-1].replace(
        "tether-data:", ""
    )


async def test_partitions_count_versions_and_commits_separately(
    redis_client: redis.asyncio.Redis,
) -> None:
    store = store_on(redis_client)
    for _ in range(3):
        await bump(store, "acme")
    await bump(store, "globex")
    acme, globex = store.in_partition("acme"), store.in_partition("globex")
    assert (await acme.version(), await globex.version(), await store.version()) == (3, 1, 0)
    batch = await acme.read_commits(0)
    assert [c.version for c in batch.commits] == [1, 2, 3] and not batch.gap
    assert all(k.startswith("tether:{tether-data:YWNtZQ}:") for k in batch.commits[0].written_keys)
    assert [c.version for c in (await globex.read_commits(0)).commits] == [1]
    assert (await store.read_commits(0)).commits == ()


async def test_outcomes_live_in_the_partition(redis_client: redis.asyncio.Redis) -> None:
    store = store_on(redis_client)
    first = await bump(store, "acme", client_id="c", request_id=7)
    again = await bump(store, "acme", client_id="c", request_id=7)
    assert first == again and first.value_json == "1"
    assert (await tally(store, "acme")).value_json == "1"
    outcome = redis_keys.data_keys("acme").outcome(None, "c", 7)
    assert await redis_client.exists(outcome) == 1
    assert await redis_client.exists(MutationRequest("tenant.bump", "c", 7).outcome_key) == 0


async def test_a_request_id_runs_in_one_partition_only(redis_client: redis.asyncio.Redis) -> None:
    """Contract §5 rule 4 and the ``mutate`` row: a requestId is answered with its first
    outcome and never run twice, and re-sent naming another function it is refused and runs
    nothing, also when the other call is in another partition (each keeps its outcomes in its
    own slot, so the outcome alone cannot tell)."""
    engine = QueryEngine(app, store_on(redis_client))
    store = engine.store

    async def mutate(name: str, request_id: int, **kwargs: Any) -> Any:
        return await engine.run_mutation(
            name, {"name": "t", **kwargs}, None, client_id="c", request_id=request_id
        )

    first = await mutate("tenant.bump", 7, tenant="acme")
    assert first.value_json == "1"
    assert (await mutate("tenant.bump", 7, tenant="acme")).value_json == "1"  # a replay
    with pytest.raises(RequestIdReused):
        await mutate("tenant.bump", 7, tenant="globex")
    with pytest.raises(RequestIdReused):
        await mutate("tally.bump", 7)
    await mutate("tally.bump", 8)
    with pytest.raises(RequestIdReused):
        await mutate("tenant.bump", 8, tenant="acme")
    assert await store.in_partition("acme").version() == 1
    assert await store.in_partition("globex").version() == 0
    assert await store.version() == 1


# ---------------------------------------------------------------------------------- session fence


async def new_session(sessions: SessionStore) -> Auth:
    grant = await sessions.create(unique("user"))
    return Auth(grant.user_id, grant.session_id)


async def test_an_ended_session_commits_into_no_partition(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, sessions = store_on(redis_client), sessions_on(redis_client)
    auth = await new_session(sessions)
    assert (await bump(store, "acme", auth=auth)).value_json == "1"  # registers acme
    assert await redis_client.smembers(redis_keys.session_partitions(auth.session_id)) == {"acme"}
    await sessions.end(auth.session_id, SessionEndReason.SIGNED_OUT)
    fence = redis_keys.data_keys("acme").session_fence(auth.session_id)
    assert await redis_client.get(fence) == "signed_out"
    # acme is registered (and cached on this instance): the fence refuses the commit.
    refused = await bump(store, "acme", auth=auth)
    assert refused.error == ("unauthenticated", IDENTITY_ENDED)
    # A partition never registered before the end: the registration is refused.
    refused = await bump(store, "initech", auth=auth)
    assert refused.error == ("unauthenticated", IDENTITY_ENDED)
    assert await store.in_partition("acme").version() == 1
    assert await store.in_partition("initech").version() == 0
    assert await redis_client.exists(redis_keys.data_keys("initech").version) == 0


async def test_no_partition_registers_once_the_session_is_ending(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Between the ending mark (which reads the registered partitions) and the session-end
    script, the session is still active: a first commit into a partition must be refused
    there, or that partition would miss its fence."""
    store, sessions = store_on(redis_client), sessions_on(redis_client)
    auth = await new_session(sessions)
    assert (await bump(store, "acme", auth=auth)).value_json == "1"
    assert await sessions._begin_ending(auth.session_id, "signed_out") == ["acme"]
    refused = await bump(store, "initech", auth=auth)
    assert refused.error == ("unauthenticated", IDENTITY_ENDED)
    assert await store.in_partition("initech").version() == 0


async def test_the_expiry_sweep_fences_the_partitions_and_lifts_its_marks_for_a_live_session(
    redis_client: redis.asyncio.Redis,
) -> None:
    """The sweep ends an expired session in every partition it registered; for a session a
    refresh kept alive meanwhile (the sweep's end script finds it active), it lifts the
    partition fences and the ending mark it wrote, so the session commits again."""
    clock = ManualClock(float(int(time.time())))
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600)
    codec = RefreshTokenCodec(secrets.token_bytes(32))
    store = store_on(redis_client)
    revive: dict[str, str] = {}

    class RacedSweep(SessionStore):
        async def _fence_expired(self, session_ids: list[str], now: int) -> Any:
            fenced = await super()._fence_expired(session_ids, now)
            for sid in session_ids:
                if sid in revive:  # a refresh on an instance whose clock lags
                    await SessionStore(redis_client, codec, settings, lagging).rotate(revive[sid])
            return fenced

    lagging = ManualClock(clock())
    sweeper = RacedSweep(redis_client, codec, settings, clock)
    expired, alive = await sweeper.create("u1"), await sweeper.create("u2")
    revive[alive.session_id] = alive.refresh_token
    for grant in (expired, alive):
        auth = Auth(grant.user_id, grant.session_id)
        assert (await bump(store, "acme", grant.user_id, auth=auth)).value_json == "1"
    clock.advance(61)
    lagging.advance(59)
    assert await sweeper.sweep_expired() == 1
    acme = redis_keys.data_keys("acme")
    assert await redis_client.exists(acme.session_fence(expired.session_id)) == 1
    assert await redis_client.exists(acme.session_fence(alive.session_id)) == 0
    assert await redis_client.exists(redis_keys.session_ending(alive.session_id)) == 0
    fresh = store_on(redis_client)  # no cached registration: registers again
    auth = Auth(alive.user_id, alive.session_id)
    assert (await bump(fresh, "acme", alive.user_id, auth=auth)).value_json == "2"
    assert (await bump(fresh, "globex", alive.user_id, auth=auth)).value_json == "1"
    gone = Auth(expired.user_id, expired.session_id)
    assert (await bump(fresh, "acme", expired.user_id, auth=gone)).error == (
        "unauthenticated",
        IDENTITY_ENDED,
    )


async def test_the_sweep_never_takes_over_another_ends_mark(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A sign-out's ending mark stays when the sweep marks the same session: the sweep may
    lift its own mark later (a refresh kept the session alive), never the sign-out's, which
    would let a partition register between the sign-out's read of the set and its end."""
    sessions = sessions_on(redis_client)
    auth = await new_session(sessions)
    mark = redis_keys.session_ending(auth.session_id)
    await sessions._begin_ending(auth.session_id, "signed_out")
    await sessions._begin_ending(auth.session_id, "session_expired x", nx=True)
    assert await redis_client.get(mark) == "signed_out"


async def test_a_session_registers_at_most_max_session_partitions(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Every partition a session registers is fenced, one write each, when it ends: a session
    must not grow that set without bound (a mutation the application refuses registers too),
    or one user makes every end of their session, and the script that reads the set, as slow
    as they like. Past the limit a first commit into one more partition runs nothing and is
    answered ``limit_exceeded``; partitions registered already go on committing."""
    sessions = sessions_on(redis_client)
    store = Store(
        redis_client,
        schema=app.schema,
        clock=ManualClock(float(int(time.time()))),
        max_session_partitions=2,
    )
    auth = await new_session(sessions)
    assert (await bump(store, "a", auth=auth)).value_json == "1"
    assert (await bump(store, "b", auth=auth)).value_json == "1"
    refused = await bump(store, "c", auth=auth)
    assert refused.error is not None and refused.error[0] == "limit_exceeded"
    assert await store.in_partition("c").version() == 0
    again = Store(redis_client, schema=app.schema, clock=store.clock, max_session_partitions=2)
    assert (await bump(again, "a", auth=auth)).value_json == "2"  # registered: not counted
    assert await redis_client.smembers(redis_keys.session_partitions(auth.session_id)) == {
        "a",
        "b",
    }
    assert (await bump(store, "c", auth=await new_session(sessions))).value_json == "1"


async def test_two_sweeps_racing_end_a_session_only_once_its_partitions_are_fenced(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two instances sweep the same expired session at once: the first writes the default
    partition's fence, and before it has read the partitions and fenced them, the second
    finds that fence (its own NX write fails) and runs the end script. The second must still
    fence every registered partition before it ends the session, or a commit there (the
    registration cached on an instance) lands after the end."""
    clock = ManualClock(float(int(time.time())))
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600)
    codec = RefreshTokenCodec(secrets.token_bytes(32))
    store = store_on(redis_client)
    late: list[Any] = []

    class First(SessionStore):
        async def _begin_ending(self, session_id: str, value: str, *, nx: bool = False) -> Any:
            # The default fence is written; the other instance's sweep runs now.
            assert await SessionStore(redis_client, codec, settings, clock).sweep_expired() == 1
            late.append(await bump(store, "acme", auth=auth))
            return await super()._begin_ending(session_id, value, nx=nx)

    first = First(redis_client, codec, settings, clock)
    grant = await first.create("u")
    auth = Auth(grant.user_id, grant.session_id)
    assert (await bump(store, "acme", auth=auth)).value_json == "1"  # registers, cached
    clock.advance(61)
    assert await first.sweep_expired() == 0  # the other one ended it
    assert await redis_client.hget(redis_keys.session(grant.session_id), "state") == "ended"
    assert [outcome.error for outcome in late] == [("unauthenticated", IDENTITY_ENDED)]
    assert await store.in_partition("acme").version() == 1


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "first-commit"])
async def test_a_session_ended_while_a_partition_mutation_runs_commits_nothing(
    redis_client: redis.asyncio.Redis, registered: bool
) -> None:
    """The end races the mutation: it lands after the function ran and before the commit,
    both for a partition registered before (the fence refuses it) and for a first commit into
    a partition (the registration is refused)."""
    store, sessions = store_on(redis_client), sessions_on(redis_client)
    auth = await new_session(sessions)
    tenant = unique("tenant")
    if registered:
        assert (await bump(store, tenant, auth=auth)).value_json == "1"
    reached, release = asyncio.Event(), asyncio.Event()

    async def body(db: MutationDB) -> str:
        ctx = Context(auth, db=db, partition=tenant)
        value = await partition_app._bump(ctx, "t", 1)
        reached.set()
        await release.wait()
        return str(value)

    task = asyncio.create_task(
        store.in_partition(tenant).run_mutation(
            body,
            MutationRequest("tenant.bump", "c", 1, auth.user_id),
            session_id=auth.session_id,
        )
    )
    await reached.wait()
    assert await sessions.end(auth.session_id, SessionEndReason.REVOKED)
    release.set()
    outcome = await task
    assert outcome.error == ("unauthenticated", IDENTITY_ENDED)
    assert await store.in_partition(tenant).version() == (1 if registered else 0)


async def test_many_mutations_racing_an_end_commit_only_before_its_fence(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Mutations into several partitions run while the session ends: every one that commits
    does so before the end returns, and none after it."""
    store, sessions = store_on(redis_client), sessions_on(redis_client)
    auth = await new_session(sessions)
    tenants = [unique("tenant") for _ in range(4)]
    ended = asyncio.Event()
    late: list[tuple[str, int]] = []

    async def worker(tenant: str) -> None:
        while True:
            after_end = ended.is_set()
            outcome = await bump(store, tenant, auth=auth)
            if outcome.error is not None:
                assert outcome.error == ("unauthenticated", IDENTITY_ENDED)
                return
            if after_end:
                late.append((tenant, outcome.version))

    workers = [asyncio.create_task(worker(t)) for t in tenants for _ in range(2)]
    await asyncio.sleep(0.05)
    await sessions.end(auth.session_id, SessionEndReason.SIGNED_OUT)
    ended.set()
    await asyncio.wait_for(asyncio.gather(*workers), 20)
    assert late == []


# ---------------------------------------------------------------------------------- live, /sync


async def test_a_partitioned_subscription_follows_another_instances_commits(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = server_factory(app=PARTITION_APP), server_factory(app=PARTITION_APP)
    tenant = unique("tenant")
    watcher = await open_live(a, label="watcher on A")
    await watcher.subscribe(1, "tenant.get", {"tenant": tenant, "name": "n"})
    await watcher.subscribe(2, "tenant.get", {"tenant": unique("other"), "name": "n"})
    assert watcher.value(1) == 0
    writer = await open_live(b, label="writer on B")
    for expected in (1, 2, 3):
        result = await writer.mutate(expected, "tenant.bump", {"tenant": tenant, "name": "n"})
        assert result["value"] == expected
        await watcher.wait_value(1, lambda v, e=expected: v == e, f"tally {expected}")
    assert watcher.value(2) == 0
    # Unsubscribed and subscribed again: the follower stops and starts again.
    await watcher.send({"type": "unsubscribe", "queryId": 1})
    await writer.mutate(4, "tenant.bump", {"tenant": tenant, "name": "n"})
    await watcher.subscribe(3, "tenant.get", {"tenant": tenant, "name": "n"})
    assert watcher.value(3) == 4
    await writer.mutate(5, "tenant.bump", {"tenant": tenant, "name": "n"})
    await watcher.wait_value(3, lambda v: v == 5, "tally 5")


async def test_a_writer_without_subscriptions_is_answered_before_the_partition_delivers(
    server_factory: Callable[..., ServerProcess], open_live: Opener, tmp_path: Any
) -> None:
    """As in the default partition (tests/test_reactive.py): a connection that holds no
    subscription is answered at the commit, while the partition's follower on this instance is
    still busy with it; its next subscription there starts at or after the commit."""
    server = server_factory(app=PARTITION_APP)
    tenant, gate = unique("tenant"), tmp_path / "gate"
    gate.touch()
    watcher = await open_live(server, label="watcher")
    args = {"tenant": tenant, "name": "n", "gate": str(gate)}
    await watcher.subscribe(1, "tenant.behind_gate", args)
    gate.unlink()
    writer = await open_live(server, label="writer")
    try:
        result = await writer.mutate(1, "tenant.bump", {"tenant": tenant, "name": "n"})
        assert result["value"] == 1 and watcher.held[1] == ("value", 0), (result, watcher.held)
        assert not [f for f in writer.frames if f["type"] == "transition"], writer.frames
        subscribe = {"tenant": tenant, "name": "n"}
        await writer.send(
            {"type": "subscribe", "queryId": 2, "name": "tenant.get", "args": subscribe}
        )
    finally:
        gate.touch()
    await writer.wait_held(2, ("value", 1))
    first = next(f for f in writer.frames if f["type"] == "transition")
    assert first["version"] >= result["version"], (first, result)
    await watcher.wait_held(1, ("value", 1))


async def test_a_result_held_for_a_subscription_is_sent_when_that_subscription_ends(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """A mutation's result waits for every subscription's first result (rule 5). When the
    subscription it waits for is unsubscribed first, the result goes out then: nothing else
    would ever send it."""
    server = server_factory(app=PARTITION_APP)
    live = await open_live(server, label="unsubscriber")
    await live.subscribe(1, "tally.get", {"name": "n"})
    # Its first result takes 3 s (a partition's query): the mutation's result is held for it.
    slow = {"tenant": unique("tenant"), "name": "n", "ms": 3000}
    await live.send({"type": "subscribe", "queryId": 2, "name": "tenant.slow", "args": slow})
    await live.send(
        {"type": "mutate", "requestId": 1, "name": "tally.bump", "args": {"name": unique("t")}}
    )
    with pytest.raises(AssertionError):
        await live.result(1, timeout=0.5)
    await live.send({"type": "unsubscribe", "queryId": 2})
    result = await live.result(1, timeout=2.0)  # well before the slow result would come
    version, held = live.at_result[1]
    assert "error" not in result and version >= result["version"], (result, live.frames)
    assert 2 not in held


async def test_a_request_id_re_sent_into_another_partition_is_refused_on_the_wire(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    server = server_factory(app=PARTITION_APP)
    acme, globex = unique("acme"), unique("globex")
    live = await open_live(server, label="re-sender")
    await live.subscribe(1, "tenant.get", {"tenant": globex, "name": "n"})
    result = await live.mutate(1, "tenant.bump", {"tenant": acme, "name": "n"})
    assert result["value"] == 1
    with pytest.raises(AssertionError, match="bad_message"):
        await live.mutate(1, "tenant.bump", {"tenant": globex, "name": "n"})
    assert (await live.mutate(1, "tenant.bump", {"tenant": acme, "name": "n"}))["value"] == 1
    await live.mutate(2, "tenant.bump", {"tenant": globex, "name": "n"})
    assert live.value(1) == 1  # request 1 never ran in globex


async def test_read_your_writes_and_growing_versions_across_partitions(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """One connection subscribes to two partitions and the default one, whose versions
    differ: each mutation_result comes after its partition's result, and no transition's
    version goes down (Live records that as a problem)."""
    server = server_factory(app=PARTITION_APP)
    busy, quiet = unique("busy"), unique("quiet")
    other = await open_live(server, label="other")
    for i in range(1, 6):  # the busy partition's version runs ahead
        await other.mutate(i, "tenant.bump", {"tenant": busy, "name": "pad"})
    live = await open_live(server, label="two partitions")
    await live.subscribe(1, "tenant.get", {"tenant": busy, "name": "n"})
    await live.subscribe(2, "tenant.get", {"tenant": quiet, "name": "n"})
    await live.subscribe(3, "tally.get", {"name": "n"})
    seen: list[int] = []
    for rid, (name, args, qid) in enumerate(
        [
            ("tenant.bump", {"tenant": quiet, "name": "n"}, 2),
            ("tenant.bump", {"tenant": busy, "name": "n"}, 1),
            ("tally.bump", {"name": "n"}, 3),
            ("tenant.bump", {"tenant": quiet, "name": "n"}, 2),
        ],
        start=10,
    ):
        result = await live.mutate(rid, name, args)
        version, held = live.at_result[rid]
        assert held[qid] == ("value", result["value"]), (name, held)
        assert result["version"] <= version
        seen.append(result["version"])
    assert seen == sorted(seen)
    assert not live.problems


# ---------------------------------------------------------------------------------- cluster


async def test_partitions_on_a_three_master_cluster(cluster: RedisClusterProcess) -> None:
    client = cluster.client()
    try:
        store, sessions = store_on(client), sessions_on(client)
        auth = await new_session(sessions)
        tenants = [f"tenant-{i}" for i in range(12)]
        for tenant in tenants:
            assert (await bump(store, tenant, auth=auth)).value_json == "1"
            assert (await tally(store, tenant)).value_json == "1"
        slots = {key_slot(redis_keys.data_keys(t).tag.encode()) for t in tenants}
        owners = {client.get_node_from_key(redis_keys.data_keys(t).version).name for t in tenants}
        assert len(slots) == len(tenants) and len(owners) == 3
        await sessions.end(auth.session_id, SessionEndReason.SIGNED_OUT)
        for tenant in tenants[:3]:
            refused = await bump(store, tenant, auth=auth)
            assert refused.error == ("unauthenticated", IDENTITY_ENDED)
        assert (await bump(store, "tenant-new", auth=auth)).error == (
            "unauthenticated",
            IDENTITY_ENDED,
        )
    finally:
        await client.aclose()


async def test_a_partition_watch_blocks_on_a_connection_of_its_own(redis_url: str) -> None:
    """Each followed partition's blocking watch has its own connection: following more
    partitions than the instance's pool holds (MAX_CONNECTIONS) leaves the pool to the rest."""
    client = connect(redis_url)
    store = store_on(client).in_partition("acme")
    assert isinstance(client, redis.asyncio.Redis)
    pool = client.connection_pool
    watchers = [store.with_watch_connection() for _ in range(MAX_CONNECTIONS + 2)]
    try:
        reads = [asyncio.create_task(w.read_commits(0, block_ms=5000)) for w in watchers]
        await asyncio.sleep(0.2)  # let them block; nothing asserted about time
        assert not any(read.done() for read in reads)
        assert len(pool._in_use_connections) == 0
        assert await client.ping()
        assert (await bump(store_on(client), "acme")).value_json == "1"
        batches = await asyncio.gather(*reads)
        assert all([c.version for c in b.commits] == [1] for b in batches)
    finally:
        for w in watchers:
            await w.aclose_watch()
        await client.aclose()


async def test_a_partitioned_subscription_that_reads_the_identity_follows_a_sign_in(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    server = server_factory(app=PARTITION_APP)
    tenant = unique("tenant")
    live = await open_live(server, label="signing in")
    await live.subscribe(1, "tenant.mine", {"tenant": tenant, "name": "n"})
    await live.subscribe(2, "tenant.get", {"tenant": tenant, "name": "n"})
    assert live.value(1) == {"user": None, "value": 0}
    user = await signup(server.base_url)
    await live.authenticate(user["accessToken"], 1)
    await live.wait_value(1, lambda v: v["user"] == user["userId"], "the signed-in user")
    result = await live.mutate(1, "tenant.bump", {"tenant": tenant, "name": "n"})
    assert result["value"] == 1
    assert live.at_result[1][1][1] == ("value", {"user": user["userId"], "value": 1})
    assert live.at_result[1][1][2] == ("value", 1)


async def _watching(redis_client: redis.asyncio.Redis) -> int:
    """Redis connections blocked in a commit-stream read (a follower's watch: ``XREAD BLOCK``).
    Not any connection whose last command was an ``XREAD``: a pooled connection a pump used to
    read a stream itself (a slow watcher, on a loaded machine) keeps that as its last command
    after the follower has stopped."""
    return sum(
        c.get("cmd") == "xread" and "b" in c.get("flags", "")
        for c in await redis_client.client_list()
    )


async def test_a_connection_closed_while_its_mutation_waits_leaves_no_follower(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """A partitioned mutation waits for its partition's live queries (read your writes); the
    socket closes meanwhile, so its subscription leaves while the wait holds the follower and
    the wait is then cancelled: the follower (its task and its Redis connection) must still be
    stopped."""
    server = server_factory(app=PARTITION_APP)
    tenant = unique("tenant")
    live = await open_live(server, label="closing")
    await live.subscribe(1, "tally.get", {"name": "n"})
    baseline = await _watching(redis_client)
    # Every run of this query takes 3 s: the pump is busy when the commit lands.
    args = {"tenant": tenant, "name": "n", "ms": 3000}
    await live.send({"type": "subscribe", "queryId": 2, "name": "tenant.slow", "args": args})
    mutate = {"tenant": tenant, "name": "n"}
    await live.send({"type": "mutate", "requestId": 1, "name": "tenant.bump", "args": mutate})
    version = redis_keys.data_keys(tenant).version
    for _ in range(2000):
        if await redis_client.get(version) == "1":
            break
        await asyncio.sleep(0.005)
    assert 2 not in live.held and 1 not in live.results  # still waiting
    for _ in range(400):  # the partition's follower runs
        if await _watching(redis_client) > baseline:
            break
        await asyncio.sleep(0.05)
    assert await _watching(redis_client) > baseline
    await live.close()
    for _ in range(400):  # until the follower is gone, or fail
        if await _watching(redis_client) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert await _watching(redis_client) <= baseline


async def test_one_connection_spans_at_most_its_partition_limit(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """A connection may not claim more of the instance's followers (each a Redis connection)
    than TETHER_MAX_CONNECTION_PARTITIONS; another connection is not held back by it."""
    server = server_factory(app=PARTITION_APP, env={"TETHER_MAX_CONNECTION_PARTITIONS": "2"})
    first, second, third = (unique("tenant") for _ in range(3))
    live = await open_live(server, label="one connection")
    await live.subscribe(1, "tenant.get", {"tenant": first, "name": "n"})
    await live.subscribe(2, "tenant.get", {"tenant": second, "name": "n"})
    await live.subscribe(3, "tenant.get", {"tenant": first, "name": "m"})  # spanned already
    await live.subscribe(4, "tally.get", {"name": "n"})  # the default partition: not counted
    await live.subscribe(5, "tenant.get", {"tenant": third, "name": "n"})
    assert live.held[5] == ("error", "limit_exceeded")
    assert [live.value(q) for q in (1, 2, 3, 4)] == [0, 0, 0, 0]
    other = await open_live(server, label="another connection")
    await other.subscribe(1, "tenant.get", {"tenant": third, "name": "n"})
    assert other.value(1) == 0
    # Unsubscribing frees a place; the refused subscription does not hold one.
    await live.send({"type": "unsubscribe", "queryId": 2})
    await live.subscribe(6, "tenant.get", {"tenant": third, "name": "n"})
    assert live.value(6) == 0
    result = await live.mutate(1, "tenant.bump", {"tenant": third, "name": "n"})
    assert live.at_result[1][1][6] == ("value", result["value"]) == ("value", 1)
    await other.wait_value(1, lambda v: v == 1, "the other connection sees the bump")


async def test_subscriptions_past_the_followed_partitions_limit_are_refused(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    server = server_factory(app=PARTITION_APP, env={"TETHER_MAX_FOLLOWED_PARTITIONS": "2"})
    first, second, third = (unique("tenant") for _ in range(3))
    live = await open_live(server, label="limited")
    await live.subscribe(1, "tenant.get", {"tenant": first, "name": "n"})
    await live.subscribe(2, "tenant.get", {"tenant": second, "name": "n"})
    await live.subscribe(3, "tenant.get", {"tenant": first, "name": "m"})  # followed already
    await live.subscribe(4, "tenant.get", {"tenant": third, "name": "n"})
    assert live.held[4] == ("error", "limit_exceeded")
    assert [live.value(q) for q in (1, 2, 3)] == [0, 0, 0]
    await live.send({"type": "unsubscribe", "queryId": 4})
    await live.send({"type": "unsubscribe", "queryId": 2})  # the second is followed no more
    await live.subscribe(5, "tenant.get", {"tenant": third, "name": "n"})
    assert live.value(5) == 0
    result = await live.mutate(1, "tenant.bump", {"tenant": third, "name": "n"})
    assert live.at_result[1][1][5] == ("value", result["value"]) == ("value", 1)
