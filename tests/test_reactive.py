"""Reactive queries and mutations end to end (issue 4): two server processes on one real
``redis-server``, driven over ``/sync`` by real WebSocket clients.

Each socket is read by a background task (:class:`Live`) that keeps every frame and what the
client holds after it: the value (or error) of each subscription and the version of the last
``transition``. So a test can say what the client held *at the moment* a ``mutation_result``
arrived (read your writes), and every socket checks on its own that versions never go down.

The demo application (protocol §4) is the target, except for the error paths, which need a
query that raises or grows past the result limit: those are served from
``tests/apps/reactive_app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import redis.asyncio
import websockets
from tether.server.redis import keys as redis_keys

from tests.harness import RedisProcess, ServerProcess
from tests.sync_client import SyncClient, auth_post, check_frame, connect_sync, signup

pytestmark = pytest.mark.timeout(90)

#: Seconds a test waits for something that needs no retries and no restart.
WAIT = 5.0
#: Short lifetimes: a 3 s token, its notice 1 s before exp, identity gone 1 s after exp.
EXPIRY_ENV = {"TETHER_ACCESS_TTL": "3", "TETHER_EXPIRY_NOTICE": "1", "TETHER_CLOCK_LEEWAY": "1"}
TEST_APP = "tests.apps.reactive_app:app"
UNAUTHENTICATED = ("error", "unauthenticated")

Held = tuple[str, Any]  # ("value", value) or ("error", code)


# ---------------------------------------------------------------------------------- helpers


class Live:
    """One ``/sync`` socket, read continuously by a background task.

    ``held`` is what the client holds after the last frame: queryId → ``("value", v)`` or
    ``("error", code)``. ``version`` is the last transition's. For each ``mutation_result``,
    ``at_result[requestId]`` is ``(version, held)`` as they were when it arrived. A frame outside
    the contract, or a transition whose version is below the one before, is recorded in
    ``problems``; every wait fails on the first problem.
    """

    def __init__(self, client: SyncClient, label: str) -> None:
        self.client = client
        self.label = label
        self.frames: list[dict[str, Any]] = []
        self.held: dict[int, Held] = {}
        self.version = -1
        self.results: dict[int, dict[str, Any]] = {}
        self.rejections: dict[int, dict[str, Any]] = {}  # requestId → its ``error`` frame
        self.at_result: dict[int, tuple[int, dict[int, Held]]] = {}
        self.problems: list[str] = []
        self.closed = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    # ------------------------------------------------------------------ reading

    async def _read(self) -> None:
        try:
            async for data in self.client.ws:
                try:
                    frame = check_frame(data)
                except AssertionError as exc:
                    self.problems.append(f"{self.label}: {exc}")
                    continue
                self._apply(frame)
                async with self._changed:
                    self._changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = True
            async with self._changed:
                self._changed.notify_all()

    def _apply(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        kind = frame["type"]
        if kind == "transition":
            if frame["version"] < self.version:
                self.problems.append(
                    f"{self.label}: version went down from {self.version}: {frame}"
                )
            self.version = max(self.version, frame["version"])
            for update in frame["updates"]:
                if "error" in update:
                    self.held[update["queryId"]] = ("error", update["error"]["code"])
                else:
                    self.held[update["queryId"]] = ("value", update["value"])
        elif kind == "mutation_result":
            self.results[frame["requestId"]] = frame
            self.at_result[frame["requestId"]] = (self.version, dict(self.held))
        elif kind == "error" and "requestId" in frame:
            self.rejections[frame["requestId"]] = frame

    # ------------------------------------------------------------------ waiting

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Until ``predicate()`` holds; fails on a timeout, a problem, or a closed socket."""

        def ready() -> bool:
            return bool(self.problems) or predicate() or self.closed

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.label}: not within {timeout} s: {what}; held {self.held}, "
                f"last frames {self.frames[-5:]}"
            ) from None
        assert not self.problems, self.problems
        if not predicate():
            raise AssertionError(f"{self.label}: closed ({self.client.close_code}) before {what}")

    async def wait_held(self, query_id: int, expected: Held, timeout: float = WAIT) -> None:
        await self.wait(
            lambda: self.held.get(query_id) == expected,
            f"query {query_id} holds {expected}",
            timeout,
        )

    async def wait_value(
        self, query_id: int, test: Callable[[Any], bool], what: str, timeout: float = WAIT
    ) -> None:
        """Until ``query_id`` holds a value (not an error) that passes ``test``."""

        def ready() -> bool:
            held = self.held.get(query_id)
            return held is not None and held[0] == "value" and test(held[1])

        await self.wait(ready, f"query {query_id}: {what}", timeout)

    async def wait_frame(
        self, kind: str, after: int = 0, timeout: float = WAIT
    ) -> tuple[int, dict[str, Any]]:
        """The first frame of type ``kind`` at index ``after`` or later, and its index."""

        def find() -> tuple[int, dict[str, Any]] | None:
            for index in range(after, len(self.frames)):
                if self.frames[index]["type"] == kind:
                    return index, self.frames[index]
            return None

        await self.wait(lambda: find() is not None, f"a {kind!r} frame", timeout)
        found = find()
        assert found is not None
        return found

    def value(self, query_id: int) -> Any:
        kind, value = self.held[query_id]
        assert kind == "value", f"{self.label}: query {query_id} holds an error: {value}"
        return value

    # ------------------------------------------------------------------ sending

    async def send(self, frame: dict[str, Any]) -> None:
        await self.client.send(frame)

    async def subscribe(self, query_id: int, name: str, args: dict[str, Any] | None = None) -> None:
        """Subscribe and wait for the subscription's first result."""
        await self.send(
            {"type": "subscribe", "queryId": query_id, "name": name, "args": args or {}}
        )
        await self.wait(lambda: query_id in self.held, f"a first result for query {query_id}")

    async def mutate(
        self, request_id: int, name: str, args: dict[str, Any], timeout: float = WAIT
    ) -> dict[str, Any]:
        """Send ``mutate`` and return its ``mutation_result`` (a new one, if the request id was
        used before on this socket)."""
        self.results.pop(request_id, None)
        self.rejections.pop(request_id, None)
        await self.send({"type": "mutate", "requestId": request_id, "name": name, "args": args})
        return await self.result(request_id, timeout)

    async def result(self, request_id: int, timeout: float = WAIT) -> dict[str, Any]:
        """The ``mutation_result`` of ``request_id``; fails if the mutate was rejected with an
        ``error`` frame instead."""
        await self.wait(
            lambda: request_id in self.results or request_id in self.rejections,
            f"mutation_result {request_id}",
            timeout,
        )
        if request_id not in self.results:
            raise AssertionError(f"{self.label}: rejected: {self.rejections[request_id]}")
        return self.results[request_id]

    async def authenticate(self, token: str, auth_version: int) -> dict[str, Any]:
        """Send ``authenticate``; return the ``auth_ok`` (fails on ``auth_error``)."""
        start = len(self.frames)
        await self.send({"type": "authenticate", "token": token, "authVersion": auth_version})

        def answer() -> dict[str, Any] | None:
            for frame in self.frames[start:]:
                if frame["type"] in ("auth_ok", "auth_error"):
                    return frame
            return None

        await self.wait(lambda: answer() is not None, f"an answer to authVersion {auth_version}")
        frame = answer()
        assert frame is not None and frame["type"] == "auth_ok", frame
        return frame

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 3)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 3)


Opener = Callable[..., Awaitable[Live]]


@pytest.fixture
async def open_live() -> AsyncIterator[Opener]:
    """``await open_live(server, label=..., client_id=...)``: a connected :class:`Live`, closed
    after the test."""
    opened: list[Live] = []

    async def open_(server: ServerProcess, label: str = "", **kwargs: Any) -> Live:
        client = await connect_sync(server.ws_url, **kwargs)
        live = Live(client, label or f"socket {len(opened) + 1} on :{server.port}")
        opened.append(live)
        return live

    yield open_
    await asyncio.gather(*(live.close() for live in opened))


def two_instances(
    server_factory: Callable[..., ServerProcess], env: dict[str, str] | None = None
) -> tuple[ServerProcess, ServerProcess]:
    """Instances A and B of one deployment: one Redis, one key file, one issuer."""
    return server_factory(env=env), server_factory(env=env)


def tally_is(expected: int) -> Callable[[Any], bool]:
    """For :meth:`Live.wait_value`: a ``{"value", ...}`` result whose value is ``expected``."""
    return lambda result: bool(result["value"] == expected)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def transitions(live: Live, start: int = 0) -> list[dict[str, Any]]:
    return [f for f in live.frames[start:] if f["type"] == "transition"]


def values_of(live: Live, query_id: int) -> list[Any]:
    """Every value ``query_id`` took on ``live``, in order."""
    return [
        update["value"]
        for frame in transitions(live)
        for update in frame["updates"]
        if update["queryId"] == query_id and "value" in update
    ]


async def commit_versions(redis_client: redis.asyncio.Redis) -> list[int]:
    """The versions in the commit stream, in order."""
    entries = cast("list[Any]", await redis_client.xrange(redis_keys.DATA_COMMITS))
    return [int(fields["v"]) for _, fields in entries]


# ---------------------------------------------------------------------------------- counting


async def test_twenty_clients_on_two_instances_increment_one_counter_exactly_once_each(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    a, b = two_instances(server_factory)
    name = unique("hits")
    watchers = [await open_live(server, label=f"watcher {i}") for i, server in enumerate((a, b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": name})
        assert watcher.value(1) == 0
    per_client = 5
    clients = [await open_live((a, b)[i % 2], label=f"client {i}") for i in range(20)]

    async def burst(client: Live) -> list[dict[str, Any]]:
        # Every increment of the client is in flight at once.
        for request_id in range(1, per_client + 1):
            await client.send(
                {
                    "type": "mutate",
                    "requestId": request_id,
                    "name": "counter.increment",
                    "args": {"name": name},
                }
            )
        return [await client.result(rid, timeout=60) for rid in range(1, per_client + 1)]

    outcomes = [r for results in await asyncio.gather(*map(burst, clients)) for r in results]
    acked = [r for r in outcomes if "error" not in r]
    refused = [r for r in outcomes if "error" in r]
    assert all(r["error"]["code"] == "conflict" for r in refused), refused
    assert acked, "every increment failed: nothing was tested"

    # Serialisable increments by 1 return 1, 2, ..., n: none lost, none applied twice.
    assert sorted(r["value"] for r in acked) == list(range(1, len(acked) + 1))
    assert len({r["version"] for r in acked}) == len(acked)
    # One commit per acknowledged increment, and none for the refused ones.
    assert sorted(await commit_versions(redis_client)) == sorted(r["version"] for r in acked)

    for watcher in watchers:
        await watcher.wait_held(1, ("value", len(acked)))
        seen = values_of(watcher, 1)
        assert seen == sorted(seen), f"the counter went down on {watcher.label}: {seen}"
    for server in (a, b):
        reader = await open_live(server, label="late reader")
        await reader.subscribe(1, "counter.get", {"name": name})
        assert reader.value(1) == len(acked)


async def command_calls(redis_client: redis.asyncio.Redis, command: str) -> int:
    """How many times Redis has run ``command`` (``INFO commandstats``)."""
    stats = await redis_client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_instances_follow_commits_without_reading_the_stream_back(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Each instance learns of a commit once: the instance that made it from its own commit, the
    other from the entries its blocking stream read returned. Neither reads the stream again
    (XRANGE) to deliver it, yet both deliver every value."""
    a, b = two_instances(server_factory)
    name = unique("rtt")
    watchers = [await open_live(server, label=f"watcher {i}") for i, server in enumerate((a, b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": name})
    writer = await open_live(a, label="writer")
    await writer.mutate(1, "counter.increment", {"name": name})  # creates the counter
    for watcher in watchers:
        await watcher.wait_held(1, ("value", 1))
    before = await command_calls(redis_client, "xrange")
    for request_id in range(2, 12):
        await writer.mutate(request_id, "counter.increment", {"name": name})
        for watcher in watchers:
            await watcher.wait_held(1, ("value", request_id))
    assert await command_calls(redis_client, "xrange") == before
    for watcher in watchers:
        assert values_of(watcher, 1) == list(range(12))


async def test_concurrent_commits_on_both_instances_are_not_read_back_either(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Both instances commit at once (twenty mutations in flight on each): an instance that
    knows its own commit but not the other's just before it waits for its watcher to hand that
    one over instead of reading the stream (XRANGE); every value still arrives everywhere."""
    a, b = two_instances(server_factory)
    name = unique("both")
    watchers = [await open_live(server, label=f"watcher {i}") for i, server in enumerate((a, b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": name})
    writers = [await open_live(server, label=f"writer {i}") for i, server in enumerate((a, b))]
    await writers[0].mutate(1, "counter.increment", {"name": name})  # creates the counter
    for watcher in watchers:
        await watcher.wait_held(1, ("value", 1))
    before = await command_calls(redis_client, "xrange")
    for round_ in range(3):
        for w, writer in enumerate(writers):
            for i in range(10):
                other = {"name": f"{name}-{w}-{i}"}  # no conflicts: a counter per request
                request_id = 100 * round_ + 10 * w + i + 2
                await writer.send(
                    {
                        "type": "mutate",
                        "requestId": request_id,
                        "name": "counter.increment",
                        "args": other,
                    }
                )
        await writers[round_ % 2].mutate(1000 + round_, "counter.increment", {"name": name})
        for w, writer in enumerate(writers):
            for i in range(10):
                result = await writer.result(100 * round_ + 10 * w + i + 2)
                assert "error" not in result, result
        for watcher in watchers:
            await watcher.wait_held(1, ("value", round_ + 2))
    assert await command_calls(redis_client, "xrange") == before


# ------------------------------------------------------------------------------ read your writes


async def test_read_your_writes_for_counter_notes_and_messages_on_both_instances(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    counter, channel = unique("rw"), unique("room")
    writers = [
        await open_live(server, label=f"writer on {n}") for n, server in (("A", a), ("B", b))
    ]
    for auth_version, writer in enumerate(writers, 1):
        await writer.authenticate(user["accessToken"], auth_version)
        await writer.subscribe(1, "counter.get", {"name": counter})
        await writer.subscribe(2, "notes.mine")
        await writer.subscribe(3, "messages.list", {"channel": channel})

    async def write(writer: Live, tag: str) -> int:
        checked = 0
        request_id = 0
        for round_ in range(4):
            text = f"{tag}-{round_}"
            calls = {
                request_id + 1: ("counter.increment", {"name": counter}),
                request_id + 2: ("notes.add", {"text": text}),
                request_id + 3: ("messages.send", {"channel": channel, "body": text}),
            }
            request_id += 3
            # Pipelined: the three mutations are in flight together on the socket.
            for rid, (name, args) in calls.items():
                await writer.send({"type": "mutate", "requestId": rid, "name": name, "args": args})
            for rid, (name, _args) in calls.items():
                result = await writer.result(rid)
                assert "error" not in result, result
                version, held = writer.at_result[rid]
                where = f"{writer.label}, {name} → {result}, holding {held} at {version}"
                assert version >= result["version"], where
                if name == "counter.increment":
                    assert held[1][0] == "value" and held[1][1] >= result["value"], where
                elif name == "notes.add":
                    assert {"id": result["value"], "text": text} in held[2][1], where
                else:
                    ids = {(m["id"], m["body"]) for m in held[3][1]}
                    assert (result["value"], text) in ids, where
                checked += 1
        return checked

    assert list(await asyncio.gather(write(writers[0], "a"), write(writers[1], "b"))) == [12, 12]
    # And each writer ends with the other's writes too.
    for writer in writers:
        await writer.wait_held(1, ("value", 8))
        await writer.wait_value(2, lambda notes: len(notes) == 8, "eight notes")


async def test_a_writer_without_subscriptions_is_answered_before_the_pump_delivers_the_commit(
    server_factory: Callable[..., ServerProcess], open_live: Opener, tmp_path: Any
) -> None:
    """Read your writes binds a connection's subscriptions; one that holds none is answered as
    soon as the commit is made, even while this instance's pump is still busy with it, and a
    subscription it makes afterwards is delivered at or after the commit's version."""
    server = server_factory(app=TEST_APP)
    name = unique("writer")
    gate = tmp_path / "gate"
    gate.touch()
    watcher = await open_live(server, label="subscriber")
    await watcher.subscribe(1, "tally.behind_gate", {"name": name, "gate": str(gate)})
    gate.unlink()  # from now on the pump's re-run of query 1 waits for the gate
    writer = await open_live(server, label="writer")
    try:
        result = await writer.mutate(1, "tally.bump", {"name": name})
        # Answered while the pump is held: nothing was delivered at the commit's version yet.
        assert result["value"] == 1, result
        assert watcher.held[1] == ("value", 0), watcher.held
        assert transitions(writer) == [], writer.frames  # no subscription, nothing to say
        # A subscription made now is not answered from before the commit, even though the
        # pump has not delivered it yet.
        await writer.send(
            {"type": "subscribe", "queryId": 7, "name": "tally.get", "args": {"name": name}}
        )
    finally:
        gate.touch()
    await writer.wait(lambda: 7 in writer.held, "a first result for query 7")
    first = transitions(writer)[0]
    assert first["version"] >= result["version"], (first, result)
    assert writer.held[7] == ("value", 1), writer.frames
    await watcher.wait_held(1, ("value", 1))
    # A connection with a subscription still waits for it (read your writes).
    gate.unlink()
    sent = len(writer.frames)
    await writer.send(
        {
            "type": "subscribe",
            "queryId": 8,
            "name": "tally.behind_gate",
            "args": {"name": name, "gate": str(gate)},
        }
    )
    try:
        await writer.send(
            {"type": "mutate", "requestId": 2, "name": "tally.bump", "args": {"name": name}}
        )
        with pytest.raises(AssertionError):
            await writer.result(2, timeout=1.0)
    finally:
        gate.touch()
    second = await writer.result(2)
    version, held = writer.at_result[2]
    assert version >= second["version"] and held[7] == ("value", 2), (second, writer.frames[sent:])


async def test_a_subscription_made_while_the_pump_is_below_the_commit_starts_at_the_commit(
    server_factory: Callable[..., ServerProcess], open_live: Opener, tmp_path: Any
) -> None:
    """The pump is held in a cycle for an earlier commit (on another tally) when a
    subscription-less writer's commit V is answered; the writer then subscribes to a query
    whose shared live entry still holds the value from before V. Its first result is the
    written value, at a version >= V."""
    server = server_factory(app=TEST_APP)
    held_name, name = unique("held"), unique("written")
    gate = tmp_path / "gate"
    gate.touch()
    watcher = await open_live(server, label="watcher")
    await watcher.subscribe(1, "tally.behind_gate", {"name": held_name, "gate": str(gate)})
    await watcher.subscribe(2, "tally.get", {"name": name})
    gate.unlink()
    other, writer = await open_live(server, label="other"), await open_live(server, label="writer")
    try:
        bump = {"type": "mutate", "requestId": 1, "name": "tally.bump", "args": {"name": held_name}}
        await other.send(bump)
        # No signal says the pump has reached the gate: the pause widens what the test covers
        # (the writer's commit lands while the pump is below it); it cannot make it fail.
        await asyncio.sleep(0.3)
        result = await writer.mutate(1, "tally.bump", {"name": name})
        assert watcher.held[2] == ("value", 0), watcher.held
        subscribe = {"type": "subscribe", "queryId": 7, "name": "tally.get", "args": {"name": name}}
        await writer.send(subscribe)
    finally:
        gate.touch()
    await writer.wait(lambda: 7 in writer.held, "a first result for query 7")
    assert transitions(writer)[0]["version"] >= result["version"], (writer.frames, result)
    assert writer.held[7] == ("value", 1), writer.frames
    await watcher.wait_held(2, ("value", 1))


# ---------------------------------------------------------------------------------- idempotency


async def test_a_mutation_resent_on_the_other_instance_gets_its_original_outcome_once(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    client_id = unique("replayer")
    counter, channel = unique("once"), unique("room")

    on_a = await open_live(a, label="first socket on A", client_id=client_id)
    await on_a.authenticate(user["accessToken"], 1)
    note = await on_a.mutate(1, "notes.add", {"text": "only once"})
    bump = await on_a.mutate(2, "counter.increment", {"name": counter, "by": 5})
    invalid = await on_a.mutate(3, "messages.send", {"channel": channel, "body": ""})
    assert "error" not in note and "error" not in bump, (note, bump)
    assert bump["value"] == 5
    assert invalid["error"]["code"] == "invalid"
    await on_a.close()

    on_b = await open_live(b, label="reconnected on B", client_id=client_id)
    await on_b.authenticate(user["accessToken"], 1)
    await on_b.subscribe(1, "notes.mine")
    await on_b.subscribe(2, "counter.get", {"name": counter})
    await on_b.subscribe(3, "messages.list", {"channel": channel})
    assert await on_b.mutate(1, "notes.add", {"text": "only once"}) == note
    assert await on_b.mutate(2, "counter.increment", {"name": counter, "by": 5}) == bump
    assert await on_b.mutate(3, "messages.send", {"channel": channel, "body": ""}) == invalid
    assert on_b.value(1) == [{"id": note["value"], "text": "only once"}]
    assert on_b.value(2) == 5
    assert on_b.value(3) == []

    # The same request on both instances at once (a client that reconnected while its first
    # socket was still open): one outcome, applied once.
    on_a2 = await open_live(a, label="second socket on A", client_id=client_id)
    await on_a2.authenticate(user["accessToken"], 1)
    frame = {
        "type": "mutate",
        "requestId": 4,
        "name": "counter.increment",
        "args": {"name": counter},
    }
    await asyncio.gather(on_a2.send(frame), on_b.send(frame))
    twins = await asyncio.gather(on_a2.result(4), on_b.result(4))
    assert twins[0] == twins[1] and twins[0]["value"] == 6, twins
    await on_b.wait_held(2, ("value", 6))

    # A reply lost with its socket: the client re-sends on the other instance.
    await on_a2.send(
        {"type": "mutate", "requestId": 5, "name": "notes.add", "args": {"text": "lost reply"}}
    )
    await on_a2.close()
    resent = await on_b.mutate(5, "notes.add", {"text": "lost reply"})
    assert "error" not in resent, resent
    await on_b.wait_value(1, lambda notes: len(notes) == 2, "two notes")
    assert on_b.value(1) == [
        {"id": note["value"], "text": "only once"},
        {"id": resent["value"], "text": "lost reply"},
    ]
    await asyncio.sleep(0.5)  # a late second application would show up here
    assert len(on_b.value(1)) == 2 and on_b.value(2) == 6


# ---------------------------------------------------------------------------------- identity


async def test_notes_mine_follows_the_identity_and_a_same_user_refresh_sends_nothing(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = two_instances(server_factory)
    alice, bob = await signup(a.base_url), await signup(a.base_url)
    alice_writer = await open_live(a, label="alice writer")
    await alice_writer.authenticate(alice["accessToken"], 1)
    bob_writer = await open_live(a, label="bob writer")
    await bob_writer.authenticate(bob["accessToken"], 1)
    a1 = (await alice_writer.mutate(1, "notes.add", {"text": "a1"}))["value"]
    b1 = (await bob_writer.mutate(1, "notes.add", {"text": "b1"}))["value"]

    watcher = await open_live(b, label="watcher on B")
    await watcher.subscribe(1, "notes.mine")
    await watcher.subscribe(2, "whoami")
    await watcher.subscribe(3, "counter.get", {"name": unique("bystander")})
    assert watcher.held[1] == UNAUTHENTICATED
    assert watcher.held[2] == ("value", None)

    # Anonymous → alice: both identity-reading queries change in one transition; the counter,
    # which never read the identity, is not re-sent.
    start = len(watcher.frames)
    await watcher.authenticate(alice["accessToken"], 1)
    await watcher.wait_held(1, ("value", [{"id": a1, "text": "a1"}]))
    changed = transitions(watcher, start)
    assert len(changed) == 1, changed
    assert sorted(u["queryId"] for u in changed[0]["updates"]) == [1, 2]
    assert watcher.value(2) == {"userId": alice["userId"]}

    a2 = (await alice_writer.mutate(2, "notes.add", {"text": "a2"}))["value"]
    await watcher.wait_held(1, ("value", [{"id": a1, "text": "a1"}, {"id": a2, "text": "a2"}]))

    # Alice → bob.
    start = len(watcher.frames)
    await watcher.authenticate(bob["accessToken"], 2)
    await watcher.wait_held(1, ("value", [{"id": b1, "text": "b1"}]))
    changed = transitions(watcher, start)
    assert len(changed) == 1 and watcher.value(2) == {"userId": bob["userId"]}, changed

    # Alice's new note is not bob's business; bob's is.
    a3 = (await alice_writer.mutate(3, "notes.add", {"text": "a3"}))["value"]
    b2 = (await bob_writer.mutate(2, "notes.add", {"text": "b2"}))["value"]
    bobs = [{"id": b1, "text": "b1"}, {"id": b2, "text": "b2"}]
    await watcher.wait_held(1, ("value", bobs))
    # Neither the note's id nor its text reached bob's socket. (Not a substring test on the
    # frames: random ids and user ids contain "a3" about one run in twenty.)
    leaked = [f for f in watcher.frames if a3 in json.dumps(f)]
    leaked += [note for value in values_of(watcher, 1) for note in value if note["text"] == "a3"]
    assert leaked == []

    # An in-band refresh that keeps user and session: auth_ok (with new tokens), nothing else.
    start = len(watcher.frames)
    await watcher.send({"type": "refresh", "refreshToken": bob["refreshToken"], "authVersion": 3})
    _, ok = await watcher.wait_frame("auth_ok", start)
    assert ok["authVersion"] == 3 and "tokens" in ok, ok
    assert ok["identity"] == {"userId": bob["userId"], "sessionId": bob["sessionId"]}
    await asyncio.sleep(1.0)
    assert watcher.frames[start:] == [ok], watcher.frames[start:]

    # Bob signs out over HTTP on the other instance: back to unauthenticated.
    start = len(watcher.frames)
    response = await auth_post(a.base_url, "/auth/signout", token=ok["tokens"]["accessToken"])
    assert response.status_code == 204, response.text
    await watcher.wait_held(1, UNAUTHENTICATED)
    revoked, anonymous = watcher.frames[start:][:2]
    assert revoked == {"type": "session_revoked", "reason": "signed_out"}, revoked
    assert anonymous["type"] == "transition", anonymous
    assert sorted(u["queryId"] for u in anonymous["updates"]) == [1, 2]
    assert watcher.held[2] == ("value", None)
    assert watcher.held[3] == ("value", 0)


async def test_notes_mine_becomes_unauthenticated_when_the_identity_expires(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = two_instances(server_factory, EXPIRY_ENV)
    alice = await signup(a.base_url)
    writer = await open_live(a, label="alice writer")
    await writer.authenticate(alice["accessToken"], 1)
    note = (await writer.mutate(1, "notes.add", {"text": "before expiry"}))["value"]

    watcher = await open_live(b, label="watcher on B")
    await watcher.subscribe(1, "notes.mine")
    assert watcher.held[1] == UNAUTHENTICATED
    await watcher.authenticate(alice["accessToken"], 1)
    await watcher.wait_held(1, ("value", [{"id": note, "text": "before expiry"}]))

    # exp is 3 s after sign-up, plus 1 s of leeway.
    index, _ = await watcher.wait_frame("auth_expired", timeout=8)
    await watcher.wait_held(1, UNAUTHENTICATED)
    later = watcher.frames[index + 1 :]
    assert [f["type"] for f in later] == ["transition"], later
    [update] = later[0]["updates"]
    assert update["queryId"] == 1 and update["error"]["code"] == "unauthenticated", later
    # Nothing computed under the ended identity arrives afterwards.
    await asyncio.sleep(0.5)
    assert watcher.held[1] == UNAUTHENTICATED


# ---------------------------------------------------------------------------------- sharing


async def test_identical_subscriptions_on_one_instance_share_one_evaluation(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Black box: ``tally.evaluations`` returns a per-process count of its runs, so sockets that
    share one evaluation receive the same count, and sockets evaluated apart cannot."""
    server = server_factory(app=TEST_APP)
    alice = await signup(server.base_url)
    bob = await signup(server.base_url)
    name = unique("shared")

    same = [await open_live(server, label=f"same args {i}") for i in range(3)]
    other_args = await open_live(server, label="other args")
    for live in same:
        await live.subscribe(1, "tally.evaluations", {"name": name})
    await other_args.subscribe(1, "tally.evaluations", {"name": unique("other")})
    # Identity-reading: shared per (user, session), never across users.
    alice_sockets = [await open_live(server, label=f"alice {i}") for i in range(2)]
    for live in alice_sockets:
        await live.authenticate(alice["accessToken"], 1)
        await live.subscribe(2, "tally.mine", {"name": name})
    bob_socket = await open_live(server, label="bob")
    await bob_socket.authenticate(bob["accessToken"], 1)
    await bob_socket.subscribe(2, "tally.mine", {"name": name})

    writer = await open_live(server, label="writer")
    for round_ in range(1, 4):
        await writer.mutate(round_, "tally.bump", {"name": name})
        for live in same:
            await live.wait_value(1, tally_is(round_), f"tally {round_}")
        for live in (*alice_sockets, bob_socket):
            await live.wait_value(2, tally_is(round_), f"tally {round_}")
        counts = {live.value(1)["evaluation"] for live in same}
        assert len(counts) == 1, f"round {round_}: evaluated separately: {counts}"
        alice_counts = {live.value(2)["evaluation"] for live in alice_sockets}
        assert len(alice_counts) == 1, f"round {round_}: alice's sockets apart: {alice_counts}"
        assert {live.value(2)["user"] for live in alice_sockets} == {alice["userId"]}
        assert bob_socket.value(2)["user"] == bob["userId"]
        assert bob_socket.value(2)["evaluation"] not in alice_counts | counts
    # The unrelated subscription was not re-run by commits it did not read.
    assert len(values_of(other_args, 1)) == 1


async def test_a_same_user_refresh_reruns_no_subscription(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """``tally.mine`` reads the identity and counts its runs: a re-run after the refresh would
    show up as a new count, even though the result is otherwise the same."""
    server = server_factory(app=TEST_APP)
    alice = await signup(server.base_url)
    name = unique("refresh")
    live = await open_live(server)
    await live.authenticate(alice["accessToken"], 1)
    await live.subscribe(1, "tally.mine", {"name": name})
    first = live.value(1)
    assert first["user"] == alice["userId"]

    start = len(live.frames)
    await live.send({"type": "refresh", "refreshToken": alice["refreshToken"], "authVersion": 2})
    _, ok = await live.wait_frame("auth_ok", start)
    assert ok["identity"]["sessionId"] == alice["sessionId"], ok
    await asyncio.sleep(1.0)
    assert live.frames[start:] == [ok], live.frames[start:]

    # Still live under the refreshed identity.
    writer = await open_live(server, label="writer")
    await writer.mutate(1, "tally.bump", {"name": name})
    await live.wait_value(1, lambda v: v["value"] == 1, "the bump")
    assert live.value(1)["user"] == alice["userId"]


# ---------------------------------------------------------------------------------- Redis restart


async def test_subscriptions_resynchronise_after_redis_restarts(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_proc: RedisProcess,
) -> None:
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    counter, channel = unique("restart"), unique("room")
    watchers = [await open_live(s, label=f"watcher on {n}") for n, s in (("A", a), ("B", b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": counter})
        await watcher.subscribe(2, "messages.list", {"channel": channel})
    writer = await open_live(a, label="writer on A")
    await writer.authenticate(user["accessToken"], 1)
    for rid in range(1, 4):
        assert (await writer.mutate(rid, "counter.increment", {"name": counter}))["value"] == rid
    for watcher in watchers:
        await watcher.wait_held(1, ("value", 3))

    redis_proc.stop()
    # A subscription made while Redis is away gets its first value once it is back.
    newcomer = await open_live(b, label="newcomer on B")
    await newcomer.send(
        {"type": "subscribe", "queryId": 1, "name": "counter.get", "args": {"name": counter}}
    )
    await asyncio.sleep(1.5)
    redis_proc.restart()

    # Re-send with the same requestId until answered: idempotent, so never applied twice.
    async def until_answered(rid: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
        for _ in range(20):
            with contextlib.suppress(AssertionError):
                result = await writer.mutate(rid, name, args, timeout=1.0)
                if "error" not in result:
                    return result
        raise AssertionError(f"mutation {rid} never succeeded: {writer.frames[-5:]}")

    bump = await until_answered(10, "counter.increment", {"name": counter})
    assert bump["value"] == 4, bump
    sent = await until_answered(11, "messages.send", {"channel": channel, "body": "after"})
    for watcher in (*watchers, newcomer):
        await watcher.wait_held(1, ("value", 4), timeout=10)
    for watcher in watchers:
        await watcher.wait_value(
            2,
            lambda listed: [m["id"] for m in listed] == [sent["value"]],
            "the message sent after the restart",
            timeout=10,
        )
    for live in (*watchers, newcomer, writer):
        assert not live.problems, live.problems  # versions never went down


# ---------------------------------------------------------------------------------- trimming


async def test_subscribers_converge_while_the_commit_stream_is_trimmed(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    counter, channel = unique("trim"), unique("room")
    watchers = [await open_live(s, label=f"watcher on {n}") for n, s in (("A", a), ("B", b))]
    for watcher in watchers:
        await watcher.subscribe(1, "counter.get", {"name": counter})
        await watcher.subscribe(2, "messages.list", {"channel": channel})
    writers = [await open_live(s, label=f"writer on {n}") for n, s in (("A", a), ("B", b))]
    for writer in writers:
        await writer.authenticate(user["accessToken"], 1)

    done = asyncio.Event()
    trims = 0

    async def trim() -> None:
        nonlocal trims
        while not done.is_set():
            await redis_client.xtrim(redis_keys.DATA_COMMITS, maxlen=0, approximate=False)
            trims += 1
            await asyncio.sleep(0.01)

    async def write(writer: Live, tag: str) -> tuple[int, list[tuple[int, str]]]:
        bumps, messages = 0, []
        # At least 15 rounds, and on until the stream has been trimmed under them many times (a
        # fast machine did 60 mutations in 7 trims).
        i = 0
        while i < 15 or (trims <= 10 and i < 500):
            result = await writer.mutate(2 * i + 1, "counter.increment", {"name": counter})
            bumps += "error" not in result
            sent = await writer.mutate(
                2 * i + 2, "messages.send", {"channel": channel, "body": f"{tag}{i}"}
            )
            if "error" not in sent:
                messages.append((sent["version"], sent["value"]))
            i += 1
        return bumps, messages

    trimmer = asyncio.create_task(trim())
    try:
        written = await asyncio.gather(write(writers[0], "a"), write(writers[1], "b"))
    finally:
        done.set()
        await trimmer
    assert trims > 10
    total = sum(bumps for bumps, _ in written)
    messages = [mid for _, mid in sorted(m for _, ms in written for m in ms)]
    assert total > 0 and messages
    for watcher in watchers:
        await watcher.wait_held(1, ("value", total), timeout=10)
        await watcher.wait_value(
            2,
            lambda listed: [m["id"] for m in listed] == messages[-100:],
            "every message (the last 100: what messages.list shows), in commit order",
            timeout=10,
        )
        seen = values_of(watcher, 1)
        assert seen == sorted(seen), f"the counter went down on {watcher.label}: {seen}"


# ---------------------------------------------------------------------------------- bad input


async def test_unknown_functions_and_bad_args_are_refused_and_the_socket_keeps_working(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    server = server_factory()
    live = await open_live(server)
    cases = [
        ({"type": "subscribe", "queryId": 1, "name": "no.such", "args": {}}, "unknown_function"),
        # A mutation is not a query, and the other way round.
        (
            {"type": "subscribe", "queryId": 2, "name": "counter.increment", "args": {"name": "x"}},
            "unknown_function",
        ),
        ({"type": "mutate", "requestId": 1, "name": "no.such", "args": {}}, "unknown_function"),
        (
            {"type": "mutate", "requestId": 2, "name": "counter.get", "args": {"name": "x"}},
            "unknown_function",
        ),
        ({"type": "subscribe", "queryId": 3, "name": "counter.get", "args": {}}, "bad_args"),
        (
            {"type": "subscribe", "queryId": 4, "name": "counter.get", "args": {"name": 7}},
            "bad_args",
        ),
        ({"type": "subscribe", "queryId": 5, "name": "whoami", "args": {"extra": 1}}, "bad_args"),
        (
            {
                "type": "mutate",
                "requestId": 3,
                "name": "counter.increment",
                "args": {"name": "x", "by": "two"},
            },
            "bad_args",
        ),
        (
            {
                "type": "mutate",
                "requestId": 4,
                "name": "counter.increment",
                "args": {"name": "x", "by": True},
            },
            "bad_args",
        ),
    ]
    for frame, code in cases:
        start = len(live.frames)
        await live.send(frame)
        _, error = await live.wait_frame("error", start)
        assert error["code"] == code, (frame, error)
        id_field = "queryId" if frame["type"] == "subscribe" else "requestId"
        other = "requestId" if id_field == "queryId" else "queryId"
        id_value = frame[id_field]
        assert error.get(id_field) == id_value and other not in error, (frame, error)
    assert not live.held and not live.results
    # Nothing was registered or run: the ids are free, and the counter was never touched.
    await live.subscribe(1, "counter.get", {"name": "x"})
    await live.subscribe(3, "counter.get", {"name": "x"})
    assert live.held == {1: ("value", 0), 3: ("value", 0)}
    assert (await live.mutate(3, "counter.increment", {"name": "x"}))["value"] == 1
    await live.wait_held(1, ("value", 1))


async def test_failing_and_oversized_queries_get_error_updates_and_nothing_else_breaks(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    server = server_factory(app=TEST_APP, env={"TETHER_MAX_RESULT_BYTES": "1000"})
    name = unique("t")
    live = await open_live(server, label="subscriber")
    bystander = await open_live(server, label="bystander")
    await bystander.subscribe(1, "tally.get", {"name": name})

    await live.subscribe(1, "tally.get", {"name": name})
    await live.subscribe(2, "boom")
    assert live.held[2] == ("error", "internal")
    await live.subscribe(3, "tally.flaky", {"name": name})
    await live.subscribe(4, "big", {"size": 1000})  # 1002 bytes with its quotes
    await live.subscribe(5, "big", {"size": 998})
    await live.subscribe(6, "tally.sized", {"name": name, "unit": 400})
    assert live.held[3] == ("value", 0)
    assert live.held[4] == ("error", "limit_exceeded")
    assert live.held[5] == ("value", "x" * 998)
    assert live.held[6] == ("value", "")
    # The error messages are the contract's, not the exception's text.
    boom_update = next(u for f in transitions(live) for u in f["updates"] if u["queryId"] == 2)
    assert "always fails" not in boom_update["error"]["message"]

    expected: dict[int, list[Held]] = {
        1: [("value", 1), ("value", 2), ("value", 3)],
        3: [("error", "internal"), ("value", 2), ("error", "internal")],
        6: [("value", "x" * 400), ("value", "x" * 800), ("error", "limit_exceeded")],
    }
    writer = await open_live(server, label="writer")
    for step in range(3):
        result = await writer.mutate(step + 1, "tally.bump", {"name": name})
        assert result["value"] == step + 1
        for query_id, states in expected.items():
            await live.wait_held(query_id, states[step])
        await bystander.wait_held(1, ("value", step + 1))
    # The failing queries left the others alone, and the socket still answers.
    assert live.held[2] == ("error", "internal") and live.held[4] == ("error", "limit_exceeded")
    start = len(live.frames)
    await live.send({"type": "ping"})
    await live.wait_frame("pong", start)

    # Mutations that fail after writing: the error is the outcome and the writes are dropped.
    failed = await writer.mutate(10, "tally.bump_then_raise", {"name": name})
    assert failed["error"]["code"] == "internal", failed
    too_big = await writer.mutate(11, "tally.bump_big", {"name": name, "size": 2000})
    assert too_big["error"]["code"] == "limit_exceeded", too_big
    fine = await writer.mutate(12, "tally.bump_big", {"name": name, "size": 10})
    assert fine["value"] == "x" * 10
    await live.wait_held(1, ("value", 4))
    await bystander.wait_held(1, ("value", 4))
    assert values_of(bystander, 1) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------- known bugs


def held_after_each_transition(live: Live) -> Iterator[tuple[dict[str, Any], dict[int, Any]]]:
    """Each transition of ``live`` with the values the client holds right after it."""
    held: dict[int, Any] = {}
    for frame in transitions(live):
        for update in frame["updates"]:
            held[update["queryId"]] = update.get("value", update.get("error"))
        yield frame, dict(held)


async def test_a_query_that_starts_reading_the_identity_stays_consistent_with_its_siblings(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """``tally.gated`` reads the identity only once its tally is positive (a query that checks
    access for some documents only). ``tally.get`` on the same tally is its sibling: after
    every transition both must show the same tally, and a writer must read its write in both."""
    server = server_factory(app=TEST_APP)
    watched, own = unique("gated"), unique("gated-own")
    live = await open_live(server, label="subscriber")
    await live.subscribe(1, "tally.get", {"name": watched})
    await live.subscribe(2, "tally.gated", {"name": watched})
    await live.subscribe(3, "tally.get", {"name": own})
    await live.subscribe(4, "tally.gated", {"name": own})

    writer = await open_live(server, label="writer")
    await writer.mutate(1, "tally.bump", {"name": watched})
    await live.wait_value(2, lambda v: v["value"] == 1, "tally.gated at 1")
    own_result = await live.mutate(1, "tally.bump", {"name": own})

    problems = [
        f"after {frame}: holding {held}"
        for frame, held in held_after_each_transition(live)
        if len(held) == 4 and (held[1] != held[2]["value"] or held[3] != held[4]["value"])
    ]
    _, at_result = live.at_result[1]
    if at_result[4] != ("value", {"value": own_result["value"], "user": None}):
        problems.append(f"mutation_result {own_result} arrived while holding {at_result}")
    assert not problems, "\n".join(problems)


async def test_a_mutation_sent_while_redis_is_down_is_answered_and_releases_its_slot(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_proc: RedisProcess,
) -> None:
    server = server_factory(env={"TETHER_MAX_PENDING_MUTATIONS": "1"})
    name = unique("outage")
    live = await open_live(server)
    await live.subscribe(1, "counter.get", {"name": name})
    redis_proc.stop()
    await live.send(
        {"type": "mutate", "requestId": 1, "name": "counter.increment", "args": {"name": name}}
    )
    await asyncio.sleep(1.0)
    redis_proc.restart()
    await asyncio.sleep(3.0)  # past the server's reconnect backoff
    problems = []
    try:
        first = await live.result(1, timeout=5)
    except AssertionError:
        problems.append("no mutation_result for the mutation sent while Redis was down")
        first = {"error": "none"}
    try:
        second = await live.mutate(2, "counter.increment", {"name": name})
    except AssertionError as exc:
        problems.append(f"the next mutation, with Redis back: {exc}")
    else:
        # Applied once each: the first only if it says it succeeded.
        assert second["value"] == (1 if "error" not in first else 0) + 1, (first, second)
    assert not problems, problems


# ---------------------------------------------------------------------------------- contract 1.1


async def test_a_pipelined_reconnect_gets_its_replayed_result_after_its_subscriptions(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Issue 11, item 2 (contract §5 rules 1 and 5): connect, authenticate, subscribe and the
    re-sent mutate, back to back on a new connection; the stored outcome is answered only
    after every subscription's first result, and under the new connection's identity."""
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    client_id, counter = unique("pipeliner"), unique("ryw")
    first = await open_live(a, label="first socket", client_id=client_id)
    await first.authenticate(user["accessToken"], 1)
    applied = await first.mutate(1, "counter.increment", {"name": counter})
    assert applied["value"] == 1
    await first.close()

    for server, label in ((a, "same instance"), (b, "other instance")):
        live = await open_live(server, label=label, hello=False)
        for frame in (
            {"type": "connect", "clientId": client_id, "protocol": 1},
            {"type": "authenticate", "token": user["accessToken"], "authVersion": 1},
            {"type": "subscribe", "queryId": 1, "name": "counter.get", "args": {"name": counter}},
            {"type": "subscribe", "queryId": 2, "name": "notes.mine", "args": {}},
            {
                "type": "mutate",
                "requestId": 1,
                "name": "counter.increment",
                "args": {"name": counter},
            },
        ):
            await live.send(frame)
        replayed = await live.result(1)
        assert replayed == applied, (label, replayed)
        version, held = live.at_result[1]
        assert held == {1: ("value", 1), 2: ("value", [])}, (label, held)
        assert version >= replayed["version"], (label, live.frames)
        # notes.mine answered as the user: the subscribe ran after the authenticate.
        await live.close()


async def test_messages_sent_after_authenticate_run_under_the_identity_it_establishes(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Issue 11, item 4 (rule 1): authenticate as B then mutate at once → the note is B's."""
    server = server_factory()
    alice, bob = await signup(server.base_url), await signup(server.base_url)
    live = await open_live(server)
    await live.authenticate(alice["accessToken"], 1)
    await live.subscribe(1, "notes.mine")
    await live.send({"type": "authenticate", "token": bob["accessToken"], "authVersion": 2})
    await live.send({"type": "subscribe", "queryId": 2, "name": "whoami", "args": {}})
    await live.send(
        {"type": "mutate", "requestId": 1, "name": "notes.add", "args": {"text": "bob's"}}
    )
    result = await live.result(1)
    assert "error" not in result, result
    assert live.at_result[1][1][2] == ("value", {"userId": bob["userId"]})
    assert live.at_result[1][1][1] == ("value", [{"id": result["value"], "text": "bob's"}])
    alices = await open_live(server, label="alice's other socket")
    await alices.authenticate(alice["accessToken"], 1)
    await alices.subscribe(1, "notes.mine")
    assert alices.value(1) == []


async def test_a_mutation_result_computed_under_an_ended_identity_is_never_sent(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Issue 11, item 6 (rule 1): mutate then authenticate(null) → no mutation_result. The
    mutation committed (if it reached its commit first) or not at all (a commit after the
    identity was replaced is refused); either way the client's re-send, once signed in again,
    answers it and it applies exactly once."""
    server = server_factory()
    user = await signup(server.base_url)
    counter = unique("ended")
    live = await open_live(server)
    await live.authenticate(user["accessToken"], 1)
    await live.subscribe(1, "counter.get", {"name": counter})
    await live.send(
        {"type": "mutate", "requestId": 1, "name": "counter.increment", "args": {"name": counter}}
    )
    await live.send({"type": "authenticate", "token": None, "authVersion": 2})
    await asyncio.sleep(1.0)
    assert 1 not in live.results, live.frames
    assert live.value(1) in (0, 1)
    await live.authenticate(user["accessToken"], 3)
    again = await live.mutate(1, "counter.increment", {"name": counter})
    assert again["value"] == 1, again
    await live.wait_value(1, lambda value: value == 1, "the increment, once")
    await asyncio.sleep(0.3)
    assert live.value(1) == 1


async def test_a_refresh_answered_unavailable_keeps_the_identity(
    server_factory: Callable[..., ServerProcess], open_live: Opener, redis_proc: RedisProcess
) -> None:
    """Issue 11, item 3 (rule 2): Redis down during an in-band refresh → auth_error
    unavailable, and whoami stays the user, during the outage and after it."""
    server = server_factory()
    user = await signup(server.base_url)
    live = await open_live(server)
    await live.authenticate(user["accessToken"], 1)
    await live.subscribe(1, "whoami")
    assert live.value(1) == {"userId": user["userId"]}
    start = len(live.frames)
    redis_proc.stop()
    try:
        await live.send({"type": "refresh", "refreshToken": user["refreshToken"], "authVersion": 2})
        _, answer = await live.wait_frame("auth_error", after=start, timeout=15)
        assert answer["code"] == "unavailable", answer
    finally:
        redis_proc.restart()
    await asyncio.sleep(2.5)  # Redis is back and the subscriptions resynchronise
    assert live.value(1) == {"userId": user["userId"]}, live.frames[start:]
    # The refresh token was not used: it still rotates, to the same user and session.
    await live.send({"type": "refresh", "refreshToken": user["refreshToken"], "authVersion": 3})
    _, ok = await live.wait_frame("auth_ok", after=start, timeout=15)
    assert ok["identity"] == {"userId": user["userId"], "sessionId": user["sessionId"]}
    await asyncio.sleep(0.5)
    assert values_of(live, 1)[-1] == {"userId": user["userId"]}
    whoami_since = [
        update
        for frame in transitions(live, start)
        for update in frame["updates"]
        if update["queryId"] == 1
    ]
    assert whoami_since == [], whoami_since  # never blanked, never re-sent


async def test_outcomes_belong_to_one_user_and_one_function(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Issue 11, item 5 (rule 4), end to end: the same (clientId, requestId) from an anonymous
    socket, then from two users, runs three mutations; a requestId re-sent with another
    function's name is refused with bad_message and writes nothing."""
    server = server_factory()
    alice, bob = await signup(server.base_url), await signup(server.base_url)
    client_id, counter = unique("shared-ids"), unique("owned")
    squatter = await open_live(server, label="anonymous", client_id=client_id)
    assert (await squatter.mutate(1, "counter.increment", {"name": counter}))["value"] == 1
    seen = []
    for user in (alice, bob):
        live = await open_live(server, label=user["userId"], client_id=client_id)
        await live.authenticate(user["accessToken"], 1)
        await live.subscribe(1, "notes.mine")
        result = await live.mutate(1, "counter.increment", {"name": counter})
        seen.append(result["value"])
        await live.send(
            {"type": "mutate", "requestId": 1, "name": "notes.add", "args": {"text": "x"}}
        )
        await live.wait(lambda live=live: 1 in live.rejections, "the refusal")
        assert live.rejections[1]["code"] == "bad_message", live.rejections[1]
        # The original outcome is still the answer for the original name.
        assert await live.mutate(1, "counter.increment", {"name": counter}) == result
        await asyncio.sleep(0.2)
        assert live.value(1) == []  # the refused notes.add wrote nothing
    assert seen == [2, 3]


async def test_a_mutate_meant_for_an_expired_identity_runs_nothing_and_replays_once_as_the_user(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """The chaos harness's frozen client: the mutate reaches the server after the identity
    expired. It is answered unauthenticated and nothing runs (run as anonymous, the re-send as
    the user would apply it again); once the client is the user again, the same requestId
    applies once."""
    server = server_factory(env=EXPIRY_ENV)
    user = await signup(server.base_url)
    counter = unique("lapsed")
    live = await open_live(server)
    await live.authenticate(user["accessToken"], 1)
    await live.subscribe(1, "counter.get", {"name": counter})
    await live.wait_frame("auth_expired", timeout=10)
    refused = await live.mutate(1, "counter.increment", {"name": counter})
    assert refused["error"]["code"] == "unauthenticated", refused
    await asyncio.sleep(0.3)
    assert live.value(1) == 0
    fresh = await auth_post(
        server.base_url, "/auth/refresh", json={"refreshToken": user["refreshToken"]}
    )
    await live.authenticate(fresh.json()["accessToken"], 2)
    applied = await live.mutate(1, "counter.increment", {"name": counter})
    assert applied["value"] == 1, applied
    assert await live.mutate(1, "counter.increment", {"name": counter}) == applied


async def test_a_fence_this_instance_cannot_confirm_answers_unavailable_not_unauthenticated(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """A session fence (rule 6) on a session this instance knows of no end for — the expiry
    sweep fences a session a refresh then keeps alive, and lifts the fence — is not a definite
    answer: unavailable (re-send), never unauthenticated on a live session."""
    server = server_factory()
    user = await signup(server.base_url)
    counter = unique("fenced")
    live = await open_live(server)
    await live.authenticate(user["accessToken"], 1)
    fence = redis_keys.data_session_fence(user["sessionId"])
    await redis_client.set(fence, "session_expired", px=60_000)
    answer = await live.mutate(1, "counter.increment", {"name": counter})
    assert answer["error"]["code"] == "unavailable", answer
    await redis_client.delete(fence)
    applied = await live.mutate(1, "counter.increment", {"name": counter})
    assert applied["value"] == 1, applied


async def test_a_mutation_outliving_its_token_commits_when_a_same_session_refresh_extended_it(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    """Found by the long chaos run: a mutation started under a token that a same-session
    refresh then replaced was checked against the old token's exp when it came to commit, and
    answered unauthenticated (a definite failure) while the connection was signed in."""
    server = server_factory(env=EXPIRY_ENV, app=TEST_APP)  # 3 s tokens, 1 s leeway
    user = await signup(server.base_url)
    name = unique("outliving")
    live = await open_live(server)
    ok = await live.authenticate(user["accessToken"], 1)
    await live.subscribe(1, "tally.get", {"name": name})
    remaining = ok["expiresAt"] / 1000 - time.time()
    # Runs past the first token's exp + leeway; meanwhile a refresh extends the identity.
    await live.send(
        {
            "type": "mutate",
            "requestId": 1,
            "name": "tally.bump_slowly",
            "args": {"name": name, "seconds": remaining + 2.0},
        }
    )
    await asyncio.sleep(max(remaining - 1.0, 0.0))  # a token minted now outlives the mutation
    await live.send({"type": "refresh", "refreshToken": user["refreshToken"], "authVersion": 2})
    result = await live.result(1, timeout=10)
    assert result.get("value") == 1, result
    assert not [f for f in live.frames if f["type"] == "auth_expired"], live.frames


async def test_after_redis_loses_its_data_the_watcher_follows_the_new_versions(
    server_factory: Callable[..., ServerProcess],
    open_live: Opener,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Redis loses every key (a restart without persistence): versions start again from 0.
    Each instance notices (a gap), re-runs its live queries once, and then follows the new,
    lower versions: another instance's commit reaches it as a commit, not through a full
    re-evaluation every time the watcher's blocking read times out. ``tally.evaluations``
    counts its runs, so every re-run shows up as a transition."""
    a = server_factory(app=TEST_APP)
    b = server_factory(app=TEST_APP)
    watcher = await open_live(a, label="watcher on A")
    writer = await open_live(b, label="writer on B")
    name = unique("loss")
    await watcher.subscribe(1, "tally.evaluations", {"name": name})
    for i in range(1, 21):
        await writer.mutate(i, "tally.bump", {"name": name})
    await watcher.wait_value(1, tally_is(20), "tally 20")
    await redis_client.flushall()
    await watcher.wait_value(1, tally_is(0), "the loss seen (a resync)")
    await asyncio.sleep(1)  # the resync's own transitions
    quiet = len(transitions(watcher))
    await asyncio.sleep(5)  # more than two of the watcher's 2-s blocking reads
    assert len(transitions(watcher)) == quiet, "re-run without any commit"
    await writer.mutate(21, "tally.bump", {"name": name})
    await watcher.wait_value(1, tally_is(1), "B's commit after the loss")
    assert len(transitions(watcher)) == quiet + 1
