"""Contract 1.1 rules 4 and 6 in the data layer, against a real ``redis-server``.

Rule 4, outcomes belong to one user: a stored outcome is keyed by (user or anonymous, clientId,
requestId) and records its function's name. Another user with the same ids runs its own
mutation; an anonymous caller cannot pre-fill a victim's ids; another name raises
``RequestIdReused`` and writes nothing (found by the first read, by ``commit.lua``'s duplicate
path and by ``put_outcome``'s race alike).

Rule 6, an ended session writes nothing: a mutation whose connection still thinks its session
alive (``authorized()`` says yes) while another instance ends the session between the
mutation's run and its commit is refused by the session fence inside ``commit.lua``. The
mutations here wait on an :class:`asyncio.Event` to put the end exactly there: no timing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot
from tether.protocol import FunctionErrorCode, SessionEndReason
from tether.server import demo
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.data.engine import MutationResult, QueryEngine
from tether.server.data.functions import App, Context
from tether.server.data.store import (
    IDENTITY_ENDED,
    MutationRequest,
    RequestIdReused,
    Store,
)
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect as redis_connect
from tether.server.settings import Settings

from tests.clock import ManualClock
from tests.harness import RedisClusterProcess

ENDED = (FunctionErrorCode.UNAUTHENTICATED, IDENTITY_ENDED)


@dataclass(frozen=True)
class Caller:
    """An identity as the realtime layer hands it to the engine."""

    user_id: str
    session_id: str
    expires_at: float = 4_000_000_000.0


ALICE = Caller("alice", "alice-session")
MALLORY = Caller("mallory", "mallory-session")


class Gate:
    """Holds a mutation between its run and its commit until the test opens it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.proceed = asyncio.Event()

    async def __call__(self) -> None:
        self.reached.set()
        await self.proceed.wait()


app = App("outcomes-test")
app.table("items", indexes={"by_tag": ["tag"]})
gates: dict[str, Gate] = {}


@app.mutation("items.add")
async def add_item(ctx: Context, tag: str, gate: str = "") -> str:
    item_id = await ctx.db.insert("items", {"tag": tag})
    if gate:
        await gates[gate]()
    return item_id


@app.mutation("items.touch")
async def touch(ctx: Context, tag: str, gate: str = "") -> int:
    """Reads the index and writes nothing."""
    found = await ctx.db.query("items", index="by_tag", equals={"tag": tag})
    if gate:
        await gates[gate]()
    return len(found)


@app.query("items.tagged")
async def tagged(ctx: Context, tag: str) -> list[str]:
    return [doc["tag"] for doc in await ctx.db.query("items", index="by_tag", equals={"tag": tag})]


@pytest.fixture
def clock() -> ManualClock:
    # Real time: Redis expires the session keys by its own clock.
    return ManualClock(float(int(time.time())))


@pytest.fixture
def store(redis_client: redis.asyncio.Redis, clock: ManualClock) -> Store:
    return Store(redis_client, schema=app.schema, clock=clock)


@pytest.fixture
def engine(store: Store) -> QueryEngine:
    return QueryEngine(app, store)


@pytest.fixture
def demo_engine(redis_client: redis.asyncio.Redis, clock: ManualClock) -> QueryEngine:
    return QueryEngine(demo.app, Store(redis_client, schema=demo.app.schema, clock=clock))


@pytest.fixture
def sessions_settings() -> Settings:
    return Settings.load(
        {"argon2_time_cost": 2, "argon2_memory_kib": 19456, "argon2_parallelism": 1}, environ={}
    )


@pytest.fixture
def sessions(
    redis_client: redis.asyncio.Redis, clock: ManualClock, sessions_settings: Settings
) -> SessionStore:
    return SessionStore(redis_client, RefreshTokenCodec(b"k" * 32), sessions_settings, clock)


async def mutate(
    engine: QueryEngine,
    name: str,
    args: dict[str, Any],
    caller: Caller | None,
    *,
    client_id: str = "client",
    request_id: int = 1,
    authorized: Any = None,
) -> MutationResult:
    return await engine.run_mutation(
        name,
        engine.resolve("mutation", name, args),
        caller,
        client_id=client_id,
        request_id=request_id,
        authorized=authorized,
    )


async def tags(engine: QueryEngine, tag: str) -> list[str]:
    result = await engine.evaluate("items.tagged", {"tag": tag}, None)
    assert result.value_json is not None
    value: list[str] = json.loads(result.value_json)
    return value


# ---------------------------------------------------------------------------------- rule 4


async def test_another_user_with_the_same_ids_runs_its_own_mutation(
    demo_engine: QueryEngine,
) -> None:
    args = {"name": "shared"}
    first = await mutate(demo_engine, "counter.increment", args, ALICE)
    assert (first.value_json, first.error) == ("1", None)
    # Mallory sends Alice's clientId and requestId: she does not get Alice's outcome, her own
    # increment applies.
    theirs = await mutate(demo_engine, "counter.increment", args, MALLORY)
    assert (theirs.value_json, theirs.error) == ("2", None)
    assert theirs.version is not None and first.version is not None
    assert theirs.version > first.version
    # Each replay still answers its own user's outcome, and runs nothing.
    assert await mutate(demo_engine, "counter.increment", args, ALICE) == first
    assert await mutate(demo_engine, "counter.increment", args, MALLORY) == theirs
    counter = await demo_engine.evaluate("counter.get", args, None)
    assert counter.value_json == "2"


async def test_an_anonymous_caller_prefilling_a_victims_ids_does_not_disturb_the_victim(
    demo_engine: QueryEngine, redis_client: redis.asyncio.Redis
) -> None:
    # The attacker knows the victim's clientId and next requestId, and goes first, anonymous,
    # with a mutation that fails (an anonymous notes.add is refused: a stored error outcome).
    pre = await mutate(demo_engine, "notes.add", {"text": "x"}, None, client_id="victim")
    assert pre.error is not None and pre.error[0] == "unauthenticated"
    # ...and with a user whose id is the anonymous owner's name.
    named = Caller("anonymous", "s-anon")
    pre_named = await mutate(
        demo_engine,
        "notes.add",
        {"text": "from a user called anonymous"},
        named,
        client_id="victim",
    )
    assert pre_named.error is None
    victim = await mutate(demo_engine, "notes.add", {"text": "mine"}, ALICE, client_id="victim")
    assert victim.error is None and victim.value_json is not None
    mine = await demo_engine.evaluate("notes.mine", {}, ALICE)
    assert mine.value_json is not None and '"text":"mine"' in mine.value_json
    # Three owners, three outcomes, none overwritten.
    assert await mutate(demo_engine, "notes.add", {"text": "x"}, None, client_id="victim") == pre
    assert (
        await mutate(demo_engine, "notes.add", {"text": "y"}, named, client_id="victim")
        == pre_named
    )
    assert (
        await mutate(demo_engine, "notes.add", {"text": "z"}, ALICE, client_id="victim") == victim
    )
    keys = {
        redis_keys.data_outcome(None, "victim", 1),
        redis_keys.data_outcome("anonymous", "victim", 1),
        redis_keys.data_outcome("alice", "victim", 1),
    }
    assert len(keys) == 3
    assert await redis_client.exists(*keys) == 3


async def test_the_same_ids_with_another_name_raise_request_id_reused_and_write_nothing(
    demo_engine: QueryEngine,
) -> None:
    first = await mutate(demo_engine, "counter.increment", {"name": "c"}, ALICE)
    version = await demo_engine.version()
    with pytest.raises(RequestIdReused) as info:
        await mutate(demo_engine, "notes.add", {"text": "sneaky"}, ALICE)
    assert (info.value.request_id, info.value.name) == (1, "notes.add")
    assert info.value.stored_name == "counter.increment"
    assert await demo_engine.version() == version
    notes = await demo_engine.evaluate("notes.mine", {}, ALICE)
    assert notes.value_json == "[]"
    # The outcome is untouched: the right name still replays it.
    assert await mutate(demo_engine, "counter.increment", {"name": "c"}, ALICE) == first


async def test_another_name_found_by_the_commit_script_commits_nothing(
    engine: QueryEngine, store: Store
) -> None:
    """The first read found no outcome; while the mutation ran, the same ids committed another
    function: ``commit.lua``'s duplicate path answers, the store raises, nothing is written."""
    gates["held"] = gate = Gate()
    task = asyncio.create_task(mutate(engine, "items.add", {"tag": "a", "gate": "held"}, ALICE))
    await gate.reached.wait()
    other = await mutate(engine, "items.touch", {"tag": "b"}, ALICE)
    version = await store.version()
    gate.proceed.set()
    with pytest.raises(RequestIdReused) as info:
        await task
    assert (info.value.name, info.value.stored_name) == ("items.add", "items.touch")
    assert await store.version() == version
    assert await tags(engine, "a") == []
    assert await mutate(engine, "items.touch", {"tag": "b"}, ALICE) == other


async def test_another_name_found_by_put_outcome_is_refused(
    redis_client: redis.asyncio.Redis, clock: ManualClock
) -> None:
    """A mutation out of retries stores ``conflict`` with SET NX; when the same ids got another
    function's outcome in between, that one holds and the store raises."""

    class RacedStore(Store):
        async def put_outcome(
            self, request: MutationRequest, code: str, message: str
        ) -> dict[str, Any]:
            # Another request with the same ids and another function finishes just before.
            other = MutationRequest("items.add", request.client_id, request.request_id, "alice")
            await super().put_outcome(other, "forbidden", "first")
            return await super().put_outcome(request, code, message)

    store = RacedStore(redis_client, schema=app.schema, clock=clock, max_retries=0)
    engine = QueryEngine(app, store)
    gates["conflicted"] = gate = Gate()
    task = asyncio.create_task(
        mutate(engine, "items.touch", {"tag": "t", "gate": "conflicted"}, ALICE)
    )
    await gate.reached.wait()
    await mutate(engine, "items.add", {"tag": "t"}, ALICE, request_id=2)  # the touch conflicts
    version = await store.version()
    gate.proceed.set()
    with pytest.raises(RequestIdReused) as info:
        await task
    assert (info.value.name, info.value.stored_name) == ("items.touch", "items.add")
    assert await store.version() == version
    stored = await store.get_outcome(MutationRequest("items.touch", "client", 1, "alice"))
    assert stored is not None and stored["error"] == {"code": "forbidden", "message": "first"}


# ---------------------------------------------------------------------------------- rule 6


async def test_a_session_ended_between_run_and_commit_writes_nothing(
    engine: QueryEngine, store: Store, sessions: SessionStore, redis_client: redis.asyncio.Redis
) -> None:
    grant = await sessions.create("alice")
    caller = Caller("alice", grant.session_id)
    asked = 0

    def authorized() -> bool:
        # The connection's own view: this instance has not heard of the sign-out yet.
        nonlocal asked
        asked += 1
        return True

    gates["signout"] = gate = Gate()
    task = asyncio.create_task(
        mutate(engine, "items.add", {"tag": "a", "gate": "signout"}, caller, authorized=authorized)
    )
    await gate.reached.wait()
    version = await store.version()
    assert await sessions.end(grant.session_id, SessionEndReason.SIGNED_OUT) is True
    gate.proceed.set()
    outcome = await task
    assert asked == 1  # asked, and said yes: only the fence refused the commit
    assert (outcome.error, outcome.version, outcome.value_json) == (ENDED, None, None)
    assert await store.version() == version
    assert await tags(engine, "a") == []
    # Nothing remembered: after signing in again, the same user re-sends it and it runs.
    request = MutationRequest("items.add", "client", 1, "alice")
    assert await store.get_outcome(request) is None
    again = await sessions.create("alice")
    rerun = await mutate(engine, "items.add", {"tag": "a"}, Caller("alice", again.session_id))
    assert rerun.error is None and rerun.version == version + 1
    assert await tags(engine, "a") == ["a"]

    # The control: the same race without the fence (deleted by hand) commits. The refusal
    # above is the fence's doing, not the test's.
    grant = await sessions.create("alice")
    caller = Caller("alice", grant.session_id)
    gates["signout"] = gate = Gate()
    task = asyncio.create_task(
        mutate(
            engine,
            "items.add",
            {"tag": "b", "gate": "signout"},
            caller,
            request_id=2,
            authorized=authorized,
        )
    )
    await gate.reached.wait()
    await sessions.end(grant.session_id, SessionEndReason.SIGNED_OUT)
    assert await redis_client.delete(redis_keys.data_session_fence(grant.session_id)) == 1
    gate.proceed.set()
    assert (await task).error is None
    assert await tags(engine, "b") == ["b"]


async def test_a_mutation_that_writes_nothing_is_fenced_too_and_anonymous_is_not(
    engine: QueryEngine, store: Store, sessions: SessionStore
) -> None:
    grant = await sessions.create("alice")
    caller = Caller("alice", grant.session_id)
    gates["end-all"] = gate = Gate()
    task = asyncio.create_task(
        mutate(engine, "items.touch", {"tag": "t", "gate": "end-all"}, caller)
    )
    await gate.reached.wait()
    assert await sessions.end_all("alice", SessionEndReason.SIGNED_OUT_EVERYWHERE) == 1
    gate.proceed.set()
    assert (await task).error == ENDED
    assert await store.get_outcome(MutationRequest("items.touch", "client", 1, "alice")) is None
    # An anonymous caller has no session to end: its commit carries no fence.
    anonymous = await mutate(engine, "items.touch", {"tag": "t"}, None)
    assert (anonymous.error, anonymous.value_json) == (None, "0")


async def test_a_replay_of_what_committed_before_the_end_still_answers(
    engine: QueryEngine, sessions: SessionStore
) -> None:
    grant = await sessions.create("alice")
    caller = Caller("alice", grant.session_id)
    first = await mutate(engine, "items.add", {"tag": "a"}, caller)
    assert first.error is None
    await sessions.end(grant.session_id, SessionEndReason.SIGNED_OUT)
    # Found by the first read, and by commit.lua's stored-outcome check, which comes first.
    assert await mutate(engine, "items.add", {"tag": "a"}, caller) == first
    assert await tags(engine, "a") == ["a"]
    # A new request under the ended session is refused.
    assert (await mutate(engine, "items.add", {"tag": "a"}, caller, request_id=2)).error == ENDED


@pytest.mark.timeout(60)
async def test_on_a_redis_cluster_the_fence_is_checked_in_the_commits_slot(
    cluster: RedisClusterProcess, clock: ManualClock, sessions_settings: Settings
) -> None:
    """The fence, the outcome and the documents share the data slot (one script, no
    CROSSSLOT); the session hash lives elsewhere and is ended by its own script."""
    client = redis_connect(cluster.url)
    try:
        store = Store(client, schema=app.schema, clock=clock)
        engine = QueryEngine(app, store)
        sessions = SessionStore(client, RefreshTokenCodec(b"k" * 32), sessions_settings, clock)
        grant = await sessions.create("alice")
        caller = Caller("alice", grant.session_id)
        assert key_slot(redis_keys.session(grant.session_id).encode()) != key_slot(
            redis_keys.data_session_fence(grant.session_id).encode()
        )
        first = await mutate(engine, "items.add", {"tag": "c"}, caller)
        assert first.error is None
        gates["cluster"] = gate = Gate()
        task = asyncio.create_task(
            mutate(engine, "items.add", {"tag": "c", "gate": "cluster"}, caller, request_id=2)
        )
        await gate.reached.wait()
        assert await sessions.end(grant.session_id, SessionEndReason.SIGNED_OUT)
        gate.proceed.set()
        assert (await task).error == ENDED
        assert await mutate(engine, "items.add", {"tag": "c"}, caller) == first  # a replay
        assert await tags(engine, "c") == ["c"]
    finally:
        await client.aclose()
