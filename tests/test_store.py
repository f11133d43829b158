"""The data layer's storage (``tether.server.data.store``) against a real ``redis-server``.

Every database operation, index order and limits, a mutation's view of its own writes, optimistic
concurrency (conflicts, retries, 50 concurrent increments), once-only mutations per
``(clientId, requestId)``, the commit script under a retried call and ``SCRIPT FLUSH``, query
snapshots under concurrent commits (driven step by step with events, not timing), the commit
stream and its gaps, the key layout, and the demo application end to end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from tether.server import demo
from tether.server.clock import to_ms
from tether.server.data import store as store_module
from tether.server.data.engine import run_mutation, run_query
from tether.server.data.functions import App, Auth, Context, FunctionKind, FunctionSpec
from tether.server.data.store import (
    Conflict,
    MutationDB,
    MutationOutcome,
    MutationRequest,
    QueryDB,
    Store,
    encode_index_values,
)
from tether.server.errors import FunctionError
from tether.server.redis import keys as redis_keys

from tests.clock import ManualClock
from tests.harness import RedisProcess, free_port

USER = Auth(user_id="u1", session_id="s1")
OTHER = Auth(user_id="u2", session_id="s2")
START = 1_700_000_000.0

app = App("store-test")
app.table("items", indexes={"by_tag": ["tag"], "by_pair": ["a", "b"], "all": []})
app.table("plain")

DATA_PREFIX = "tether:{tether-data}:"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(redis_client: redis.asyncio.Redis, clock: ManualClock) -> Store:
    return Store(redis_client, schema=app.schema, clock=clock)


@pytest.fixture
def demo_store(redis_client: redis.asyncio.Redis, clock: ManualClock) -> Store:
    return Store(redis_client, schema=demo.app.schema, clock=clock)


def spec(fn: Callable[..., Awaitable[Any]], kind: FunctionKind = "query") -> FunctionSpec:
    return FunctionSpec.from_function("f", kind, fn)


async def mutate(store: Store, body: Callable[[MutationDB], Awaitable[Any]]) -> Any:
    """Run ``body`` on a fresh MutationDB and commit it (no client id); return body's value."""
    db = MutationDB(store)
    value = await body(db)
    await store.commit(db, request=None, outcome_value_json=None)
    return value


async def insert(store: Store, table: str, *docs: dict[str, Any]) -> list[str]:
    """Insert ``docs`` in one commit; their ids."""

    async def body(db: MutationDB) -> list[str]:
        return [await db.insert(table, doc) for doc in docs]

    ids: list[str] = await mutate(store, body)
    return ids


async def by_tag(store: Store, tag: Any, **options: Any) -> list[dict[str, Any]]:
    return await QueryDB(store).query("items", index="by_tag", equals={"tag": tag}, **options)


def req(
    client_id: str, request_id: int, name: str = "f", *, user: Auth | None = None
) -> MutationRequest:
    """The request :func:`run_mutation` makes for ``spec(...)`` (named ``f``) under ``user``."""
    return MutationRequest(name, client_id, request_id, None if user is None else user.user_id)


def fields(docs: list[dict[str, Any]], name: str = "n") -> list[Any]:
    return [doc.get(name) for doc in docs]


# ---------------------------------------------------------------------------------- schema


def test_app_table_declares_the_schema() -> None:
    schema = app.schema
    assert dict(schema["items"]) == {"by_tag": ("tag",), "by_pair": ("a", "b"), "all": ()}
    assert dict(schema["plain"]) == {}
    with pytest.raises(TypeError):
        schema["x"] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "indexes", "message"),
    [
        ("items", {}, "already declared"),
        ("bad name", {}, "invalid table name"),
        ("t", {"bad-index": ["x"]}, "invalid index name"),
        ("t", {"i": "channel"}, "as a list of names"),
        ("t", {"i": ["_id"]}, "reserved"),
        ("t", {"i": [""]}, "non-empty string"),
        ("t", {"i": ["a", "a"]}, "listed twice"),
    ],
)
def test_app_table_refuses_bad_declarations(
    name: str, indexes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        app.table(name, indexes=indexes)


def test_demo_declares_its_tables() -> None:
    assert {t: dict(i) for t, i in demo.app.schema.items()} == {
        "messages": {"by_channel": ("channel",)},
        "notes": {"by_owner": ("owner",)},
        "counters": {"by_name": ("name",)},
    }


def test_outcome_ttl_below_ten_minutes_is_refused(redis_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="outcome_ttl"):
        Store(redis_client, schema=app.schema, clock=ManualClock(), outcome_ttl=599)


@pytest.mark.parametrize("kind", ["query", "mutation"])
async def test_undeclared_tables_and_indexes_are_invalid(store: Store, kind: str) -> None:
    db: QueryDB | MutationDB = QueryDB(store) if kind == "query" else MutationDB(store)
    calls: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: db.get("nope", "x"), "no table 'nope'"),
        (lambda: db.query("nope", index="i", equals={}), "no table 'nope'"),
        (lambda: db.query("items", index="nope", equals={}), "has no index 'nope'"),
        (lambda: db.query("items", index="by_tag", equals={}), "equals must give exactly"),
        (lambda: db.query("items", index="by_tag", equals={"x": 1}), "equals must give exactly"),
        (
            lambda: db.query("items", index="by_tag", equals={"tag": 1}, order="up"),  # type: ignore[arg-type]
            "order",
        ),
        (lambda: db.query("items", index="by_tag", equals={"tag": 1}, limit=-1), "limit"),
        (lambda: db.query("items", index="by_tag", equals={"tag": 1}, limit=True), "limit"),
    ]
    for call, message in calls:
        with pytest.raises(FunctionError, match=message) as info:
            await call()
        assert info.value.code == "invalid"


async def test_queries_cannot_write(store: Store) -> None:
    db = QueryDB(store)
    for call in (
        lambda: db.insert("items", {}),
        lambda: db.patch("items", "x", {}),
        lambda: db.replace("items", "x", {}),
        lambda: db.delete("items", "x"),
    ):
        with pytest.raises(FunctionError) as info:
            await call()
        assert (info.value.code, info.value.message) == ("invalid", "queries cannot write")


async def test_misuse_of_the_data_layer_is_logged_once_with_the_function_name(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets ``invalid``; the application's author gets a WARNING naming the function
    and what was wrong. An ``invalid`` the application raises itself is its answer: not logged."""

    async def reads_an_undeclared_table(ctx: Context) -> Any:
        return await ctx.db.query("nope", index="i", equals={})

    async def writes_in_a_query(ctx: Context) -> Any:
        return await ctx.db.insert("items", {"tag": "t"})

    async def gives_the_wrong_index_fields(ctx: Context, secret: str) -> Any:
        return await ctx.db.query("items", index="by_tag", equals={"colour": secret})

    async def answers_invalid_itself(ctx: Context) -> Any:
        raise FunctionError("invalid", "that is not a colour")

    def named(fn: Callable[..., Awaitable[Any]], kind: FunctionKind) -> FunctionSpec:
        return FunctionSpec.from_function(fn.__name__, kind, fn)

    with caplog.at_level(logging.DEBUG, logger="tether.functions"):
        query = await run_query(store, named(reads_an_undeclared_table, "query"), {}, None)
        writing = await run_query(store, named(writes_in_a_query, "query"), {}, None)
        outcome = await run_mutation(
            store, named(gives_the_wrong_index_fields, "mutation"), {"secret": "hunter2"}, USER,
            client_id="c", request_id=1,
        )  # fmt: skip
        own = await run_query(store, named(answers_invalid_itself, "query"), {}, None)

    assert query.error is not None and query.error[0] == "invalid"
    assert writing.error == ("invalid", "queries cannot write")
    assert outcome.error is not None and outcome.error[0] == "invalid"
    assert own.error == ("invalid", "that is not a colour")
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tether.functions"]
    assert logged == [
        (
            logging.WARNING,
            "query 'reads_an_undeclared_table' used the data layer wrongly: "
            "no table 'nope' in the schema (declare it with App.table)",
        ),
        (
            logging.WARNING,
            "query 'writes_in_a_query' used the data layer wrongly: queries cannot write",
        ),
        (
            logging.WARNING,
            "mutation 'gives_the_wrong_index_fields' used the data layer wrongly: "
            "index 'by_tag' of table 'items' is on tag: equals must give exactly those",
        ),
    ]
    assert "hunter2" not in caplog.text


# ---------------------------------------------------------------------------------- documents


async def test_insert_and_get(store: Store, clock: ManualClock) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 1, "nested": {"k": [1, 2.5]}})
    assert isinstance(doc_id, str) and len(doc_id) >= 16
    doc = await QueryDB(store).get("items", doc_id)
    assert doc == {
        "_id": doc_id,
        "_creationTime": to_ms(START),
        "tag": "x",
        "n": 1,
        "nested": {"k": [1, 2.5]},
    }
    assert await QueryDB(store).get("items", "missing") is None
    assert await QueryDB(store).get("items", "not an id: {x}") is None
    assert await QueryDB(store).get("plain", doc_id) is None  # ids belong to their table


async def test_patch_replace_delete(store: Store, clock: ManualClock) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 1, "keep": True})
    clock.advance(5)

    await mutate(store, lambda db: db.patch("items", doc_id, {"n": 2, "extra": None}))
    doc = await QueryDB(store).get("items", doc_id)
    assert doc is not None
    assert (doc["n"], doc["keep"], doc["extra"], doc["_creationTime"]) == (2, True, None, 1.7e12)

    await mutate(store, lambda db: db.replace("items", doc_id, {"tag": "y"}))
    assert await QueryDB(store).get("items", doc_id) == {
        "_id": doc_id,
        "_creationTime": to_ms(START),
        "tag": "y",
    }

    await mutate(store, lambda db: db.delete("items", doc_id))
    assert await QueryDB(store).get("items", doc_id) is None
    assert await by_tag(store, "y") == []


@pytest.mark.parametrize("operation", ["patch", "replace", "delete"])
async def test_writing_a_missing_document_is_not_found(store: Store, operation: str) -> None:
    (deleted,) = await insert(store, "items", {"tag": "x"})
    await mutate(store, lambda db: db.delete("items", deleted))
    for doc_id in ("missing", deleted, "bad id!"):
        db = MutationDB(store)
        call = getattr(db, operation)
        args = ("items", doc_id) if operation == "delete" else ("items", doc_id, {"n": 1})
        with pytest.raises(FunctionError) as info:
            await call(*args)
        assert info.value.code == "not_found"


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        ({"_id": "mine"}, "invalid"),
        ({"_creationTime": 1}, "invalid"),
        ({"x": float("nan")}, "invalid"),
        ({"x": object()}, "invalid"),
        ("not an object", "invalid"),
        ({"x": "y" * 1_100_000}, "limit_exceeded"),
        ({"tag": "t" * 2000}, "limit_exceeded"),  # an indexed value over 1024 bytes
    ],
)
async def test_bad_documents_are_refused(store: Store, doc: Any, code: str) -> None:
    (existing,) = await insert(store, "items", {"tag": "x"})
    db = MutationDB(store)
    for call in (
        lambda: db.insert("items", doc),
        lambda: db.patch("items", existing, doc),
        lambda: db.replace("items", existing, doc),
    ):
        with pytest.raises(FunctionError) as info:
            await call()
        assert info.value.code == code
    result = await store.commit(db, request=None, outcome_value_json=None)
    assert result.written_keys == frozenset()


async def test_returned_documents_are_copies(store: Store) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 1, "list": [1]})

    async def body(db: MutationDB) -> None:
        doc = await db.get("items", doc_id)
        assert doc is not None
        doc["tag"] = "changed"
        doc["list"].append(2)
        (queried,) = await db.query("items", index="by_tag", equals={"tag": "x"})
        queried["tag"] = "changed too"
        await db.patch("items", doc_id, {"n": 2})

    await mutate(store, body)
    doc = await QueryDB(store).get("items", doc_id)
    assert doc is not None and (doc["tag"], doc["list"], doc["n"]) == ("x", [1], 2)
    assert fields(await by_tag(store, "x")) == [2]


# ---------------------------------------------------------------------------------- indexes


async def test_index_queries_in_creation_order_with_order_and_limit(
    store: Store, clock: ManualClock
) -> None:
    first = await insert(store, "items", {"tag": "x", "n": 0}, {"tag": "x", "n": 1})
    await insert(store, "items", {"tag": "other", "n": 99})
    second = await insert(store, "items", {"tag": "x", "n": 2}, {"tag": "x", "n": 3})
    clock.advance(-100)  # a clock going back does not reorder: order is commit order
    await insert(store, "items", {"tag": "x", "n": 4})

    assert fields(await by_tag(store, "x")) == [0, 1, 2, 3, 4]
    assert fields(await by_tag(store, "x", order="desc")) == [4, 3, 2, 1, 0]
    assert fields(await by_tag(store, "x", limit=2)) == [0, 1]
    assert fields(await by_tag(store, "x", order="desc", limit=2)) == [4, 3]
    assert await by_tag(store, "x", limit=0) == []
    assert fields(await by_tag(store, "x", limit=50)) == [0, 1, 2, 3, 4]
    assert fields(await by_tag(store, "x", order="desc", limit=10**30)) == [4, 3, 2, 1, 0]
    assert await by_tag(store, "nothing") == []
    assert [d["_id"] for d in await by_tag(store, "x")][:4] == first + second

    everything = await QueryDB(store).query("items", index="all", equals={})
    assert fields(everything) == [0, 1, 99, 2, 3, 4]


async def test_index_equality_is_json_equality(store: Store) -> None:
    await insert(
        store,
        "items",
        {"tag": 1, "n": "int"},
        {"tag": 1.0, "n": "float"},
        {"tag": True, "n": "bool"},
        {"tag": "1", "n": "string"},
        {"tag": [1], "n": "list"},
        {"tag": {"b": 1, "a": 2}, "n": "object"},
        {"n": "missing"},
        {"tag": None, "n": "null"},
    )
    assert fields(await by_tag(store, 1)) == ["int", "float"]
    assert fields(await by_tag(store, 1.0)) == ["int", "float"]
    assert fields(await by_tag(store, True)) == ["bool"]
    assert fields(await by_tag(store, "1")) == ["string"]
    assert fields(await by_tag(store, [1])) == ["list"]
    assert fields(await by_tag(store, {"a": 2, "b": 1})) == ["object"]
    assert fields(await by_tag(store, None)) == ["missing", "null"]


async def test_compound_index(store: Store) -> None:
    await insert(
        store,
        "items",
        {"a": "x", "b": "y", "n": 1},
        {"a": "x,y", "b": "", "n": 2},
        {"a": "x", "b": "z", "n": 3},
        {"a": "x", "b": "y", "n": 4},
    )
    db = QueryDB(store)
    assert fields(await db.query("items", index="by_pair", equals={"b": "y", "a": "x"})) == [1, 4]
    assert fields(await db.query("items", index="by_pair", equals={"a": "x,y", "b": ""})) == [2]


async def test_a_patch_moves_a_document_between_index_keys_keeping_its_place(store: Store) -> None:
    (a,) = await insert(store, "items", {"tag": "x", "n": "a"})
    await insert(store, "items", {"tag": "y", "n": "b"})
    await insert(store, "items", {"tag": "x", "n": "c"})
    await mutate(store, lambda db: db.patch("items", a, {"tag": "y"}))
    assert fields(await by_tag(store, "x")) == ["c"]
    assert fields(await by_tag(store, "y")) == ["a", "b"]  # a was created first


def test_index_value_encoding() -> None:
    same: list[tuple[list[Any], list[Any]]] = [
        ([1], [1.0]),
        ([{"a": 1, "b": 2}], [{"b": 2, "a": 1.0}]),
        ([-0.0], [0]),
    ]
    for left, right in same:
        assert encode_index_values(left) == encode_index_values(right)
    different: list[tuple[list[Any], list[Any]]] = [
        ([1], [True]),
        ([1], ["1"]),
        (["a"], [["a"]]),
        (["a,b"], ["a", "b"]),
        (["a", "b"], ["b", "a"]),
        ([None], []),
        ([""], []),
        ([1.5], [1]),
    ]
    for left, right in different:
        assert encode_index_values(left) != encode_index_values(right)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.lists(json_values, max_size=4))
def test_index_value_encoding_is_injective(values: list[Any]) -> None:
    """The segment decodes back to the canonical values: a left inverse, so no two differ."""
    try:
        segment = encode_index_values(values)
    except FunctionError as exc:
        assert exc.code == "limit_exceeded"
        return
    assert set(segment) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    decoded = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert decoded == store_module._canonical(values)
    canonical = json.dumps(store_module._canonical(values), sort_keys=True)
    assert json.dumps(decoded, sort_keys=True) == canonical


# ---------------------------------------------------------------------------------- overlay


async def test_a_mutation_sees_its_own_writes(store: Store) -> None:
    e1, e2, e3 = await insert(
        store, "items", {"tag": "x", "n": "e1"}, {"tag": "x", "n": "e2"}, {"tag": "x", "n": "e3"}
    )
    await insert(store, "items", {"tag": "y", "n": "e4"})
    seen: dict[str, Any] = {}

    async def body(db: MutationDB) -> None:
        n1 = await db.insert("items", {"tag": "x", "n": "n1"})
        await db.patch("items", e2, {"tag": "y"})
        await db.delete("items", e3)
        await db.patch("items", e1, {"n": "e1*"})
        await db.insert("items", {"tag": "y", "n": "n2"})
        gone = await db.insert("items", {"tag": "x", "n": "gone"})
        await db.delete("items", gone)
        seen["get n1"] = await db.get("items", n1)
        seen["get e3"] = await db.get("items", e3)
        seen["get gone"] = await db.get("items", gone)
        seen["x"] = fields(await db.query("items", index="by_tag", equals={"tag": "x"}))
        seen["y"] = fields(await db.query("items", index="by_tag", equals={"tag": "y"}))
        seen["y desc"] = fields(
            await db.query("items", index="by_tag", equals={"tag": "y"}, order="desc")
        )
        seen["x limit"] = fields(
            await db.query("items", index="by_tag", equals={"tag": "x"}, limit=1)
        )
        seen["y desc limit"] = fields(
            await db.query("items", index="by_tag", equals={"tag": "y"}, order="desc", limit=2)
        )

    await mutate(store, body)
    assert seen["get n1"]["n"] == "n1" and seen["get n1"]["_creationTime"] == to_ms(START)
    assert seen["get e3"] is None and seen["get gone"] is None
    assert seen["x"] == ["e1*", "n1"]
    assert seen["y"] == ["e2", "e4", "n2"]  # e2 keeps its creation place; new ones come last
    assert seen["y desc"] == ["n2", "e4", "e2"]
    assert seen["x limit"] == ["e1*"]
    assert seen["y desc limit"] == ["n2", "e4"]

    # What the mutation saw is what the commit stored.
    assert fields(await by_tag(store, "x")) == seen["x"]
    assert fields(await by_tag(store, "y")) == seen["y"]


async def test_overlay_with_limit_reads_past_removed_documents(store: Store) -> None:
    ids = await insert(store, "items", *({"tag": "x", "n": i} for i in range(6)))

    async def body(db: MutationDB) -> list[Any]:
        await db.delete("items", ids[0])
        await db.patch("items", ids[1], {"tag": "z"})
        await db.delete("items", ids[5])
        asc = fields(await db.query("items", index="by_tag", equals={"tag": "x"}, limit=2))
        desc = fields(
            await db.query("items", index="by_tag", equals={"tag": "x"}, order="desc", limit=2)
        )
        return [asc, desc]

    assert await mutate(store, body) == [[2, 3], [4, 3]]


# ---------------------------------------------------------------------------------- OCC


async def test_first_commit_wins_and_the_second_conflicts(store: Store) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    first, second = MutationDB(store), MutationDB(store)
    for db, n in ((first, 1), (second, 2)):
        doc = await db.get("items", doc_id)
        assert doc is not None
        await db.patch("items", doc_id, {"n": doc["n"] + n})
    version = await store.version()
    result = await store.commit(first, request=None, outcome_value_json=None)
    assert result.version == version + 1
    with pytest.raises(Conflict) as info:
        await store.commit(second, request=None, outcome_value_json=None)
    assert info.value.key == redis_keys.data_doc("items", doc_id)
    assert await store.version() == version + 1
    assert fields(await by_tag(store, "x")) == [1]


async def test_an_index_read_conflicts_with_an_insert_under_it(store: Store) -> None:
    reader = MutationDB(store)
    assert await reader.query("items", index="by_tag", equals={"tag": "x"}) == []
    await reader.insert("items", {"tag": "x", "n": "reader"})
    await insert(store, "items", {"tag": "x", "n": "other"})
    with pytest.raises(Conflict) as info:
        await store.commit(reader, request=None, outcome_value_json=None)
    assert ":idx:items:by_tag:" in info.value.key
    # Blind inserts (no reads) commute: neither conflicts.
    blind = MutationDB(store)
    await blind.insert("items", {"tag": "x", "n": "blind"})
    await insert(store, "items", {"tag": "x", "n": "other 2"})
    await store.commit(blind, request=None, outcome_value_json=None)
    assert fields(await by_tag(store, "x")) == ["other", "other 2", "blind"]


async def test_a_conflict_leaves_nothing_behind(store: Store, redis_client: Any) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    loser = MutationDB(store)
    await loser.get("items", doc_id)
    await loser.insert("items", {"tag": "new"})
    await loser.delete("items", doc_id)
    await mutate(store, lambda db: db.patch("items", doc_id, {"n": 1}))
    before = sorted(await redis_client.keys("*"))
    stream = await redis_client.xlen(redis_keys.DATA_COMMITS)
    with pytest.raises(Conflict):
        await store.commit(loser, request=req("c", 1), outcome_value_json="1")
    assert sorted(await redis_client.keys("*")) == before
    assert await redis_client.xlen(redis_keys.DATA_COMMITS) == stream
    assert await store.get_outcome(req("c", 1)) is None


async def test_each_commit_entry_records_when_it_committed_on_redis_clock(
    store: Store, redis_client: Any
) -> None:
    before_s, before_us = await redis_client.time()
    await insert(store, "items", {"tag": "x"})
    await insert(store, "items", {"tag": "y"})
    after_s, after_us = await redis_client.time()
    entries = await redis_client.xrange(redis_keys.DATA_COMMITS)
    first, second = (int(fields["t"]) for _, fields in entries[-2:])
    assert before_s * 1_000_000 + before_us <= first <= second <= after_s * 1_000_000 + after_us


async def test_a_mutation_that_writes_nothing_does_not_advance_the_version(
    store: Store, redis_client: Any
) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x"})
    db = MutationDB(store)
    await db.get("items", doc_id)
    gone = await db.insert("items", {"tag": "y"})
    await db.delete("items", gone)
    result = await store.commit(db, request=req("c", 7), outcome_value_json='"v"')
    assert (result.version, result.written_keys) == (1, frozenset())
    assert await store.version() == 1
    assert await redis_client.xlen(redis_keys.DATA_COMMITS) == 1
    assert await store.get_outcome(req("c", 7)) == {"version": 1, "value": "v", "name": "f"}


async def test_retries_on_one_hot_key_take_turns_on_an_instance(
    redis_client: redis.asyncio.Redis, clock: ManualClock
) -> None:
    """Twenty increments read the same counter, then all commit: one wins, nineteen conflict.
    Their retries take turns on the key, so each retry commits on its first try — one retry is
    enough for all of them. (Run together, the nineteen retries would mostly conflict again.)"""
    store = Store(redis_client, schema=app.schema, clock=clock, max_retries=1)
    (doc_id,) = await insert(store, "items", {"tag": "hot", "n": 0})
    first_reads: list[asyncio.Event] = []
    all_read = asyncio.Event()
    clients = 20

    async def increment(ctx: Context, doc_id: str, client: int) -> int:
        doc = await ctx.db.get("items", doc_id)
        if len(first_reads) < clients:  # a first attempt: wait until every first read is done
            first_reads.append(asyncio.Event())
            if len(first_reads) == clients:
                all_read.set()
            await all_read.wait()
        await ctx.db.patch("items", doc_id, {"n": doc["n"] + 1})
        return int(doc["n"]) + 1

    outcomes = await asyncio.gather(
        *(
            run_mutation(
                store,
                spec(increment, "mutation"),
                {"doc_id": doc_id, "client": i},
                None,
                client_id=f"client-{i}",
                request_id=1,
            )
            for i in range(clients)
        )
    )
    assert [o.error for o in outcomes] == [None] * clients
    assert sorted(int(o.value_json or 0) for o in outcomes) == list(range(1, clients + 1))
    assert fields(await by_tag(store, "hot")) == [clients]
    assert store._retry_turns == {}  # no key's turn outlives its retries


async def test_a_retry_after_the_identity_ended_commits_nothing(store: Store) -> None:
    """The caller's identity is asked for again before every commit attempt: a session that
    ends while a conflicting mutation waits to retry gets nothing written in its name."""
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()
    runs = 0
    identity_alive = True
    asked = 0

    async def bump(ctx: Context, doc_id: str) -> int:
        nonlocal runs, identity_alive
        runs += 1
        doc = await ctx.db.get("items", doc_id)
        if runs == 1:
            reached.set()
            await proceed.wait()
        elif runs == 2:
            identity_alive = False  # the session ends while the retry runs
        await ctx.db.patch("items", doc_id, {"n": doc["n"] + 1})
        return int(doc["n"]) + 1

    def authorized() -> bool:
        nonlocal asked
        asked += 1
        return identity_alive

    task = asyncio.create_task(
        run_mutation(
            store,
            spec(bump, "mutation"),
            {"doc_id": doc_id},
            None,
            client_id="c",
            request_id=1,
            authorized=authorized,
        )
    )
    await reached.wait()
    await mutate(store, lambda db: db.patch("items", doc_id, {"n": 10}))  # the first conflicts
    version = await store.version()
    proceed.set()
    outcome = await task
    # Asked before the first commit (which conflicted) and before the retry's (refused).
    assert (asked, runs) == (2, 2)
    assert outcome.error is not None and outcome.error[0] == "unauthenticated"
    assert outcome.version is None
    assert await store.version() == version  # nothing committed
    assert fields(await by_tag(store, "x")) == [10]
    # Not remembered: signing in again and re-sending the same request runs it.
    assert await store.get_outcome(req("c", 1)) is None
    identity_alive, runs = True, 10  # signed in again; no more session ending in `bump`
    again = await run_mutation(
        store,
        spec(bump, "mutation"),
        {"doc_id": doc_id},
        None,
        client_id="c",
        request_id=1,
        authorized=authorized,
    )
    assert again.value_json == "11" and again.error is None


async def test_run_mutation_retries_after_a_conflict(store: Store) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()
    runs = 0

    async def bump(ctx: Context, doc_id: str) -> int:
        nonlocal runs
        runs += 1
        doc = await ctx.db.get("items", doc_id)
        if runs == 1:
            reached.set()
            await proceed.wait()
        await ctx.db.patch("items", doc_id, {"n": doc["n"] + 1})
        return int(doc["n"]) + 1

    task = asyncio.create_task(
        run_mutation(
            store, spec(bump, "mutation"), {"doc_id": doc_id}, None, client_id="c", request_id=1
        )
    )
    await reached.wait()
    await mutate(store, lambda db: db.patch("items", doc_id, {"n": 10}))
    proceed.set()
    outcome = await task
    assert runs == 2
    assert outcome == MutationOutcome("11", None, await store.version())
    assert fields(await by_tag(store, "x")) == [11]


async def test_run_mutation_gives_up_with_conflict_and_remembers_it(
    redis_client: Any, clock: ManualClock
) -> None:
    store = Store(redis_client, schema=app.schema, clock=clock, max_retries=2)
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    runs = 0

    async def contended(ctx: Context) -> None:
        nonlocal runs
        runs += 1
        await ctx.db.get("items", doc_id)
        await ctx.db.insert("items", {"tag": "mine"})
        # Someone else changes what we read, every time.
        await mutate(store, lambda db: db.patch("items", doc_id, {"n": runs}))

    fn = spec(contended, "mutation")
    outcome = await run_mutation(store, fn, {}, None, client_id="c", request_id=1)
    assert runs == 3
    assert outcome.error is not None and outcome.error[0] == "conflict"
    assert await by_tag(store, "mine") == []
    assert await run_mutation(store, fn, {}, None, client_id="c", request_id=1) == outcome
    assert runs == 3
    anonymous = await run_mutation(store, fn, {}, None, client_id=None, request_id=None)
    assert anonymous.error is not None and anonymous.error[0] == "conflict"


async def test_fifty_concurrent_increments_are_neither_lost_nor_doubled(
    demo_store: Store,
) -> None:
    increment = demo.app.lookup("counter.increment")
    assert increment is not None
    outcomes = await asyncio.gather(
        *(
            run_mutation(
                demo_store, increment, {"name": "c"}, None, client_id="client", request_id=i
            )
            for i in range(50)
        )
    )
    values = sorted(int(o.value_json) for o in outcomes if o.value_json is not None)
    failures = [o.error for o in outcomes if o.error is not None]
    assert all(code == "conflict" for code, _ in failures)
    assert len(values) + len(failures) == 50
    assert values == list(range(1, len(values) + 1))
    # Jittered retries let nearly all through (50 of 50 in most runs); the rest fail with
    # conflict, never silently.
    assert len(values) >= 25
    get = demo.app.lookup("counter.get")
    assert get is not None
    result = await run_query(demo_store, get, {"name": "c"}, None)
    assert result.value_json == str(len(values))
    versions = [o.version for o in outcomes if o.version is not None]
    assert len(set(versions)) == len(versions)  # each success is its own commit


# ---------------------------------------------------------------------------------- once only


async def test_the_same_request_twice_returns_the_first_outcome_and_applies_once(
    demo_store: Store, redis_client: Any, redis_proc: RedisProcess, clock: ManualClock
) -> None:
    increment = demo.app.lookup("counter.increment")
    assert increment is not None
    first = await run_mutation(
        demo_store, increment, {"name": "c"}, None, client_id="client", request_id=1
    )
    assert first == MutationOutcome("1", None, 1)
    again = await run_mutation(
        demo_store, increment, {"name": "c", "by": 100}, None, client_id="client", request_id=1
    )
    assert again == first
    # Another instance (its own client and store) answers the same.
    other_client = redis_proc.client()
    try:
        other = Store(other_client, schema=demo.app.schema, clock=clock)
        assert (
            await run_mutation(
                other, increment, {"name": "c"}, None, client_id="client", request_id=1
            )
            == first
        )
    finally:
        await other_client.aclose()
    assert await demo_store.get_outcome(req("client", 1, "counter.increment")) == {
        "version": 1,
        "value": 1,
        "name": "counter.increment",
    }
    # Another request id, or another client, is another mutation.
    second = await run_mutation(
        demo_store, increment, {"name": "c"}, None, client_id="client", request_id=2
    )
    third = await run_mutation(
        demo_store, increment, {"name": "c"}, None, client_id="other", request_id=1
    )
    assert (second.value_json, third.value_json) == ("2", "3")
    ttl = await redis_client.pttl(redis_keys.data_outcome(None, "client", 1))
    assert 600_000 <= ttl <= 900_000


async def test_the_same_request_concurrently_applies_once(demo_store: Store) -> None:
    increment = demo.app.lookup("counter.increment")
    assert increment is not None
    outcomes = await asyncio.gather(
        *(
            run_mutation(
                demo_store, increment, {"name": "c"}, None, client_id="client", request_id=1
            )
            for _ in range(10)
        )
    )
    assert all(o == outcomes[0] for o in outcomes)
    assert outcomes[0].value_json == "1"
    assert await demo_store.version() == 1


async def test_an_application_error_is_the_outcome_and_is_not_run_again(
    store: Store, redis_client: Any
) -> None:
    runs = 0

    async def failing(ctx: Context) -> None:
        nonlocal runs
        runs += 1
        await ctx.db.insert("items", {"tag": "x"})
        raise FunctionError("forbidden", f"no (run {runs})")

    fn = spec(failing, "mutation")
    first = await run_mutation(store, fn, {}, USER, client_id="c", request_id=1)
    assert first == MutationOutcome(None, ("forbidden", "no (run 1)"), None)
    assert await run_mutation(store, fn, {}, USER, client_id="c", request_id=1) == first
    assert runs == 1
    assert await store.version() == 0  # its writes were dropped
    assert await by_tag(store, "x") == []
    assert await store.get_outcome(req("c", 1, user=USER)) == {
        "version": None,
        "error": {"code": "forbidden", "message": "no (run 1)"},
        "name": "f",
    }

    together = await asyncio.gather(
        *(run_mutation(store, fn, {}, USER, client_id="c", request_id=2) for _ in range(5))
    )
    assert all(o == together[0] for o in together)
    assert together[0].error is not None and together[0].error[0] == "forbidden"
    assert await store.version() == 0
    assert await redis_client.xlen(redis_keys.DATA_COMMITS) == 0


async def test_an_internal_error_and_a_too_large_result_are_outcomes(
    redis_client: Any, clock: ManualClock
) -> None:
    store = Store(redis_client, schema=app.schema, clock=clock, max_result_bytes=10)

    async def broken(ctx: Context) -> None:
        await ctx.db.insert("items", {"tag": "x"})
        raise RuntimeError("secret detail")

    async def large(ctx: Context) -> str:
        await ctx.db.insert("items", {"tag": "x"})
        return "x" * 100

    internal = await run_mutation(
        store, spec(broken, "mutation"), {}, None, client_id="c", request_id=1
    )
    assert internal.error == ("internal", "the function failed")
    too_large = await run_mutation(
        store, spec(large, "mutation"), {}, None, client_id="c", request_id=2
    )
    assert too_large.error is not None and too_large.error[0] == "limit_exceeded"
    assert await store.version() == 0


async def test_put_outcome_keeps_the_first(store: Store) -> None:
    first = await store.put_outcome(req("c", 1), "conflict", "one")
    assert first == {
        "version": None,
        "error": {"code": "conflict", "message": "one"},
        "name": "f",
    }
    assert await store.put_outcome(req("c", 1), "conflict", "two") == first
    assert await store.get_outcome(req("c", 1)) == first
    # A commit for a request that already has an outcome writes nothing.
    db = MutationDB(store)
    await db.insert("items", {"tag": "x"})
    result = await store.commit(db, request=req("c", 1), outcome_value_json="1")
    assert (result.version, result.duplicate) == (None, first)
    assert await store.version() == 0


# ---------------------------------------------------------------------------------- the script


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("client_id", ["client", None])
async def test_the_commit_script_retried_after_a_lost_reply_applies_once(
    store: Store, redis_client: Any, flush: bool, client_id: str | None
) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "n": 0})
    db = MutationDB(store)
    doc = await db.get("items", doc_id)
    assert doc is not None
    await db.patch("items", doc_id, {"n": doc["n"] + 1})
    await db.insert("items", {"tag": "x", "n": "new"})
    # What Store.commit sends, built once: a retry re-sends exactly these keys and arguments.
    attempt = "attempt-1"
    if client_id is None:
        key, ttl = redis_keys.data_attempt(attempt), store_module.ATTEMPT_TTL
        text = store_module._outcome_text(attempt)
    else:
        key, ttl = redis_keys.data_outcome(None, client_id, 1), store.outcome_ttl
        text = store_module._outcome_text(attempt, name="f", value_json="1")
    request = store._commit_request(db, key, attempt, text, ttl)

    first = await store._commit_script(keys=request.keys, args=request.args)
    if flush:
        await redis_client.script_flush()
    second = await store._commit_script(keys=request.keys, args=request.args)
    assert first == second == ["ok", 2]
    assert await store.version() == 2
    assert await redis_client.xlen(redis_keys.DATA_COMMITS) == 2
    assert fields(await by_tag(store, "x")) == [1, "new"]
    if client_id is not None:
        assert await store.get_outcome(req(client_id, 1)) == {
            "version": 2,
            "value": 1,
            "name": "f",
        }
    else:
        assert 0 < await redis_client.pttl(key) <= store_module.ATTEMPT_TTL * 1000


async def test_commits_survive_script_flush(store: Store, redis_client: Any) -> None:
    await insert(store, "items", {"tag": "x", "n": 1})
    await redis_client.script_flush()
    await insert(store, "items", {"tag": "x", "n": 2})
    await redis_client.script_flush()
    assert fields(await by_tag(store, "x")) == [1, 2]


# ---------------------------------------------------------------------------------- snapshots


def pair_query(
    a: str, b: str, between: Callable[[], Awaitable[None]]
) -> tuple[FunctionSpec, list[int]]:
    """A query that reads ``a``, awaits ``between()``, then reads ``b``; and its run counter."""
    runs = [0]

    async def pair(ctx: Context) -> list[Any]:
        runs[0] += 1
        first = await ctx.db.get("items", a)
        await between()
        second = await ctx.db.get("items", b)
        return [None if d is None else d["n"] for d in (first, second)]

    return spec(pair), runs


async def test_a_query_never_mixes_two_commits(store: Store) -> None:
    a, b = await insert(store, "items", {"n": 0}, {"n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()

    async def between() -> None:
        reached.set()
        await proceed.wait()

    fn, runs = pair_query(a, b, between)
    task = asyncio.create_task(run_query(store, fn, {}, None))
    await reached.wait()

    async def both(db: MutationDB) -> None:
        await db.patch("items", a, {"n": 1})
        await db.patch("items", b, {"n": 1})

    await mutate(store, both)
    proceed.set()
    result = await task
    assert result.value_json == "[1,1]"
    assert runs == [2]
    assert result.version == await store.version() == 2
    assert result.read_set == {redis_keys.data_doc("items", a), redis_keys.data_doc("items", b)}
    assert result.error is None and result.reads_identity is False


async def test_a_commit_to_what_was_already_read_keeps_the_snapshot(store: Store) -> None:
    a, b = await insert(store, "items", {"n": 0}, {"n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()

    async def between() -> None:
        reached.set()
        await proceed.wait()

    fn, runs = pair_query(a, b, between)
    task = asyncio.create_task(run_query(store, fn, {}, None))
    await reached.wait()
    await mutate(store, lambda db: db.patch("items", a, {"n": 1}))
    proceed.set()
    result = await task
    # b did not change after the snapshot: the result is exactly the state at version 1.
    assert (result.value_json, result.version, runs) == ("[0,0]", 1, [1])


async def test_a_deletion_after_the_snapshot_is_seen(store: Store) -> None:
    a, b = await insert(store, "items", {"n": 0}, {"n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()

    async def between() -> None:
        reached.set()
        await proceed.wait()

    fn, runs = pair_query(a, b, between)
    task = asyncio.create_task(run_query(store, fn, {}, None))
    await reached.wait()

    async def change(db: MutationDB) -> None:
        await db.patch("items", a, {"n": 1})
        await db.delete("items", b)

    await mutate(store, change)
    proceed.set()
    result = await task
    assert (result.value_json, runs) == ("[1,null]", [2])


async def test_an_index_read_is_one_snapshot_with_its_documents(store: Store) -> None:
    (a,) = await insert(store, "items", {"tag": "x", "n": 0})
    reached, proceed = asyncio.Event(), asyncio.Event()
    runs = 0

    async def listing(ctx: Context) -> list[Any]:
        nonlocal runs
        runs += 1
        first = await ctx.db.get("items", a)
        if runs == 1:
            reached.set()
            await proceed.wait()
        docs = await ctx.db.query("items", index="by_tag", equals={"tag": "y"})
        return [first["n"], [d["n"] for d in docs]]

    task = asyncio.create_task(run_query(store, spec(listing), {}, None))
    await reached.wait()

    async def change(db: MutationDB) -> None:
        await db.patch("items", a, {"n": 1})
        await db.insert("items", {"tag": "y", "n": 2})

    await mutate(store, change)
    proceed.set()
    result = await task
    assert (result.value_json, runs) == ("[1,[2]]", 2)
    assert any(":idx:items:by_tag:" in key for key in result.read_set)


async def test_a_query_that_never_settles_fails_with_conflict(
    redis_client: Any, clock: ManualClock
) -> None:
    store = Store(redis_client, schema=app.schema, clock=clock, query_attempts=3)
    a, b = await insert(store, "items", {"n": 0}, {"n": 0})

    async def between() -> None:
        await mutate(store, lambda db: db.patch("items", b, {"n": 1}))

    fn, runs = pair_query(a, b, between)
    result = await run_query(store, fn, {}, None)
    assert runs == [3]
    assert result.error is not None and result.error[0] == "conflict"
    assert redis_keys.data_doc("items", b) in result.read_set


async def test_a_query_result_carries_its_error_and_identity(store: Store) -> None:
    async def mine(ctx: Context) -> Any:
        auth = ctx.require_auth()
        return await ctx.db.query("items", index="by_tag", equals={"tag": auth.user_id})

    anonymous = await run_query(store, spec(mine), {}, None)
    assert anonymous.error == ("unauthenticated", "sign in first")
    assert anonymous.reads_identity is True
    assert anonymous.read_set == frozenset()
    signed_in = await run_query(store, spec(mine), {}, USER)
    assert (signed_in.value_json, signed_in.reads_identity) == ("[]", True)

    async def writes(ctx: Context) -> Any:
        return await ctx.db.insert("items", {})

    assert (await run_query(store, spec(writes), {}, None)).error == (
        "invalid",
        "queries cannot write",
    )


async def test_redis_errors_propagate(clock: ManualClock) -> None:
    dead = redis.asyncio.Redis(
        port=free_port(), decode_responses=True, retry=Retry(NoBackoff(), retries=0)
    )
    try:
        store = Store(dead, schema=demo.app.schema, clock=clock)
        listing, send = demo.app.lookup("messages.list"), demo.app.lookup("messages.send")
        assert listing is not None and send is not None
        with pytest.raises(RedisConnectionError):
            await run_query(store, listing, {"channel": "c"}, None)
        with pytest.raises(RedisConnectionError):
            await run_mutation(
                store, send, {"channel": "c", "body": "hi"}, USER, client_id=None, request_id=None
            )

        async def swallows(ctx: Context) -> str:
            try:
                await ctx.db.get("items", "x")
            except Exception:
                return "swallowed"
            return "read"

        with pytest.raises(RedisConnectionError):
            await run_query(Store(dead, schema=app.schema, clock=clock), spec(swallows), {}, None)
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------------------- commits


async def test_read_commits_lists_written_keys_in_order(store: Store) -> None:
    results = []
    for tag in ("x", "y", "x"):
        db = MutationDB(store)
        await db.insert("items", {"tag": tag})
        results.append(await store.commit(db, request=None, outcome_value_json=None))
    batch = await store.read_commits(0)
    assert not batch.gap and batch.version == 3
    assert [c.version for c in batch.commits] == [1, 2, 3]
    assert [c.written_keys for c in batch.commits] == [r.written_keys for r in results]
    first = batch.commits[0].written_keys
    assert len(first) == 1 + 3  # the document and its three index keys
    assert all(key.startswith(DATA_PREFIX) for key in first)

    assert [c.version for c in (await store.read_commits(1, count=1)).commits] == [2]
    empty = await store.read_commits(3)
    assert (empty.commits, empty.gap, empty.version) == ((), False, 3)
    quiet = await store.read_commits(3, block_ms=50)
    assert (quiet.commits, quiet.gap) == ((), False)


async def test_read_commits_blocks_until_a_commit(store: Store) -> None:
    await insert(store, "items", {"tag": "x"})
    waiting = asyncio.create_task(store.read_commits(1, block_ms=3000))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await insert(store, "items", {"tag": "y"})
    batch = await asyncio.wait_for(waiting, 3)
    assert [c.version for c in batch.commits] == [2] and not batch.gap


async def test_read_commits_reports_a_trimmed_stream(store: Store, redis_client: Any) -> None:
    for n in range(3):
        await insert(store, "items", {"n": n})
    await redis_client.xtrim(redis_keys.DATA_COMMITS, maxlen=0)
    assert (await store.read_commits(0)).gap
    assert (await store.read_commits(2)).gap
    assert not (await store.read_commits(3)).gap
    # The watcher's blocking read, which reads the version only when the stream holds nothing
    # after its position or a hole, tells the same.
    assert (await store.read_commits(0, block_ms=50)).gap
    assert not (await store.read_commits(3, block_ms=50)).gap
    await insert(store, "items", {"n": 3})
    batch = await store.read_commits(3)
    assert [c.version for c in batch.commits] == [4] and not batch.gap
    assert (await store.read_commits(2)).gap  # version 3 is gone, 4 is there
    blocking = await store.read_commits(2, block_ms=50)
    assert (blocking.gap, blocking.version) == (True, 4)
    assert [c.version for c in (await store.read_commits(3, block_ms=50)).commits] == [4]


async def test_read_commits_reports_a_version_that_went_backwards(
    store: Store, redis_client: Any
) -> None:
    for n in range(3):
        await insert(store, "items", {"n": n})
    await redis_client.set(redis_keys.DATA_VERSION, 1)
    batch = await store.read_commits(3)
    assert (batch.gap, batch.version) == (True, 1)
    # The next commit continues after the stream, so versions still only grow.
    await insert(store, "items", {"n": 3})
    assert await store.version() == 4
    after = await store.read_commits(3)
    assert [c.version for c in after.commits] == [4] and not after.gap
    await redis_client.set(redis_keys.DATA_VERSION, 1)
    blocking = await store.read_commits(4, block_ms=50)
    assert (blocking.gap, blocking.version) == (True, 1)


async def test_read_commits_after_redis_lost_everything(store: Store, redis_client: Any) -> None:
    for n in range(2):
        await insert(store, "items", {"n": n})
    await redis_client.flushall()
    assert (await store.read_commits(2)).gap
    await insert(store, "items", {"n": 2})
    assert (await store.read_commits(2)).gap
    assert [c.version for c in (await store.read_commits(0)).commits] == [1]


async def test_the_stream_is_trimmed_to_about_maxlen(redis_client: Any, clock: ManualClock) -> None:
    store = Store(redis_client, schema=app.schema, clock=clock, stream_maxlen=10)
    for n in range(300):
        await insert(store, "plain", {"n": n})
    length = await redis_client.xlen(redis_keys.DATA_COMMITS)
    assert 10 <= length < 300


# ---------------------------------------------------------------------------------- keys


async def test_every_key_carries_the_data_hash_tag(
    demo_store: Store, store: Store, redis_client: Any
) -> None:
    (doc_id,) = await insert(store, "items", {"tag": "x", "a": 1, "b": 2})
    await mutate(store, lambda db: db.patch("items", doc_id, {"tag": "y"}))
    (gone,) = await insert(store, "items", {"tag": "z"})
    await mutate(store, lambda db: db.delete("items", gone))
    send = demo.app.lookup("messages.send")
    assert send is not None
    await run_mutation(
        demo_store, send, {"channel": "c", "body": "hi"}, USER, client_id="c", request_id=1
    )
    await run_mutation(
        demo_store, send, {"channel": "c", "body": ""}, USER, client_id="c", request_id=2
    )
    await store.put_outcome(req("c", 3), "conflict", "x")
    keys = await redis_client.keys("*")
    kinds = {key.split(":")[2] for key in keys}
    assert kinds == {"version", "commits", "kv", "doc", "idx", "outcome", "attempt"}
    assert all(key.startswith(DATA_PREFIX) for key in keys)
    assert {key_slot(key.encode()) for key in keys} == {key_slot(b"{tether-data}")}
    # A deleted document leaves a tombstone that expires.
    tombstone = redis_keys.data_doc("items", gone)
    assert await redis_client.hgetall(tombstone) == {"v": "4"}
    assert 0 < await redis_client.pttl(tombstone) <= 86_400_000
    assert await redis_client.pttl(redis_keys.data_doc("items", doc_id)) == -1


# ---------------------------------------------------------------------------------- the demo


async def call(
    store: Store, name: str, args: dict[str, Any], auth: Auth | None = None, request: int = 0
) -> tuple[Any, tuple[str, str] | None]:
    """Call a demo function through the store: (value, None) or (None, error)."""
    fn = demo.app.lookup(name)
    assert fn is not None
    kwargs = fn.validate_args(args)
    if fn.kind == "query":
        q = await run_query(store, fn, kwargs, auth)
        return (None if q.value_json is None else json.loads(q.value_json)), q.error
    m = await run_mutation(store, fn, kwargs, auth, client_id="demo", request_id=request)
    return (None if m.value_json is None else json.loads(m.value_json)), m.error


async def test_demo_messages(demo_store: Store, clock: ManualClock) -> None:
    first, error = await call(demo_store, "messages.send", {"channel": "c", "body": "one"}, USER, 1)
    assert error is None and isinstance(first, str)
    clock.advance(1)
    await call(demo_store, "messages.send", {"channel": "d", "body": "elsewhere"}, OTHER, 2)
    second, _ = await call(demo_store, "messages.send", {"channel": "c", "body": "two"}, OTHER, 3)
    listed, error = await call(demo_store, "messages.list", {"channel": "c"})
    assert error is None
    assert listed == [
        {"id": first, "channel": "c", "body": "one", "author": "u1", "createdAt": to_ms(START)},
        {
            "id": second,
            "channel": "c",
            "body": "two",
            "author": "u2",
            "createdAt": to_ms(START) + 1000,
        },
    ]
    assert await call(demo_store, "messages.send", {"channel": "c", "body": "x"}, None, 4) == (
        None,
        ("unauthenticated", "sign in first"),
    )
    assert await call(demo_store, "messages.send", {"channel": "c", "body": ""}, USER, 5) == (
        None,
        ("invalid", "the message body is empty"),
    )
    too_long = {"channel": "c", "body": "x" * 4001}
    assert (await call(demo_store, "messages.send", too_long, USER, 6))[1] == (
        "invalid",
        "the message body is over 4000 characters",
    )
    listing = demo.app.lookup("messages.list")
    assert listing is not None
    # The list is the same for everyone: a change of user does not re-run it.
    assert (await run_query(demo_store, listing, {"channel": "c"}, USER)).reads_identity is False


async def test_demo_messages_list_the_last_hundred_oldest_first(demo_store: Store) -> None:
    for i in range(105):
        await call(demo_store, "messages.send", {"channel": "c", "body": str(i)}, USER, i)
    listed, _ = await call(demo_store, "messages.list", {"channel": "c"})
    assert [m["body"] for m in listed] == [str(i) for i in range(5, 105)]


async def test_demo_notes(demo_store: Store) -> None:
    a, _ = await call(demo_store, "notes.add", {"text": "mine 1"}, USER, 1)
    t, _ = await call(demo_store, "notes.add", {"text": "theirs"}, OTHER, 2)
    b, _ = await call(demo_store, "notes.add", {"text": "mine 2"}, USER, 3)
    assert await call(demo_store, "notes.mine", {}, USER) == (
        [{"id": a, "text": "mine 1"}, {"id": b, "text": "mine 2"}],
        None,
    )
    assert await call(demo_store, "notes.mine", {}, OTHER) == ([{"id": t, "text": "theirs"}], None)
    mine = demo.app.lookup("notes.mine")
    assert mine is not None
    assert (await run_query(demo_store, mine, {}, USER)).reads_identity is True
    assert await call(demo_store, "notes.mine", {}, None) == (
        None,
        ("unauthenticated", "sign in first"),
    )
    assert (await call(demo_store, "notes.add", {"text": "x"}, None, 4))[1] == (
        "unauthenticated",
        "sign in first",
    )


async def test_demo_counter_and_whoami(demo_store: Store) -> None:
    assert await call(demo_store, "counter.get", {"name": "c"}) == (0, None)
    assert await call(demo_store, "counter.increment", {"name": "c"}, None, 1) == (1, None)
    assert await call(demo_store, "counter.increment", {"name": "c", "by": 5}, None, 2) == (6, None)
    assert await call(demo_store, "counter.increment", {"name": "d", "by": -2}, None, 3) == (
        -2,
        None,
    )
    assert await call(demo_store, "counter.get", {"name": "c"}) == (6, None)
    assert await call(demo_store, "counter.get", {"name": "d"}) == (-2, None)
    get = demo.app.lookup("counter.get")
    assert get is not None
    assert (await run_query(demo_store, get, {"name": "c"}, USER)).reads_identity is False
    assert await call(demo_store, "whoami", {}, USER) == ({"userId": "u1"}, None)
    who = demo.app.lookup("whoami")
    assert who is not None
    result = await run_query(demo_store, who, {}, None)
    assert (result.value_json, result.read_set, result.version) == ("null", frozenset(), 3)
    assert result.reads_identity is True


async def test_demo_mutation_result_version_is_the_commit(demo_store: Store) -> None:
    increment = demo.app.lookup("counter.increment")
    get = demo.app.lookup("counter.get")
    assert increment is not None and get is not None
    outcome = await run_mutation(
        demo_store, increment, {"name": "c"}, None, client_id="x", request_id=1
    )
    seen = await run_query(demo_store, get, {"name": "c"}, None)
    assert outcome.version == seen.version == 1
    assert seen.value_json == "1"
    assert await demo_store.get_outcome(req("x", 1, "counter.increment")) == {
        "version": 1,
        "value": 1,
        "name": "counter.increment",
    }
