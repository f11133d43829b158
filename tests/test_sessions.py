"""The session store against a real ``redis-server``: the five rotation rules of protocol §2, the
idempotence of the rotation script under a retried call, the session-ended events, and what
Tether leaves in Redis.

Time is a :class:`ManualClock` started at the real time: Redis expires keys by its own clock, so a
manual clock in the past would make Redis drop every session the moment it is written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from tether.protocol import HTTPCode, SessionEndReason
from tether.server.app import Node
from tether.server.auth import sessions as sessions_module
from tether.server.auth.errors import AuthFailure
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import (
    DEADLINE_GRACE_MS,
    FENCE_MARGIN,
    RefreshRejected,
    SessionGrant,
    SessionInfo,
    SessionStore,
    revoke_from_cli,
)
from tether.server.auth.signing_keys import KeySet
from tether.server.clock import to_ms
from tether.server.demo import app as demo_app
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect
from tether.server.settings import Settings
from tether.server.tasks import stop_tasks

from tests.clock import ManualClock
from tests.harness import RedisProcess, lost_cancellations

#: argon2id at the OWASP minimum (the settings refuse anything weaker).
FAST_ARGON2 = {"argon2_time_cost": 2, "argon2_memory_kib": 19456, "argon2_parallelism": 1}
CHANNEL = redis_keys.SESSION_ENDED_CHANNEL
INVALID = HTTPCode.REFRESH_INVALID
REUSED = HTTPCode.REFRESH_REUSED


def make_settings(**overrides: Any) -> Settings:
    return Settings.load({**FAST_ARGON2, **overrides}, environ={})


def secret_of(token: str) -> str:
    """The secret segment of ``rt1.<sid>.<secret>.<tag>``."""
    return token.split(".")[2]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def clock() -> ManualClock:
    # Whole seconds: every advance below is exact in binary, so to_ms() never rounds a
    # boundary case to the other side.
    return ManualClock(float(int(time.time())))


@pytest.fixture
def mac_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def codec(mac_key: bytes) -> RefreshTokenCodec:
    return RefreshTokenCodec(mac_key)


@pytest.fixture
def settings() -> Settings:
    # A day of inactivity within a 30-day session: the inactivity deadline is the binding one.
    return make_settings(refresh_reuse_window=10, session_inactive_ttl=86_400)


@pytest.fixture
def store(
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    settings: Settings,
    clock: ManualClock,
) -> SessionStore:
    return SessionStore(redis_client, codec, settings, clock)


async def rejected(store: SessionStore, token: object, retry_key: str | None = None) -> str:
    """The code ``rotate`` refuses ``token`` with; fails the test if it is accepted."""
    with pytest.raises(RefreshRejected) as info:
        await store.rotate(token, retry_key)
    return str(info.value.code)


async def all_keys(client: redis.asyncio.Redis) -> set[str]:
    return {str(k) async for k in client.scan_iter(count=1000)}


class SessionEvents:
    """Session-ended events read from a real subscription.

    :meth:`drain` publishes a sentinel on the channel and reads up to it: Redis delivers the
    messages of one channel in the order the PUBLISHes ran, so every event caused by an awaited
    call arrives before the sentinel, and "nothing more was announced" needs no sleep.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self._n = 0

    async def start(self) -> None:
        await self.pubsub.subscribe(CHANNEL)
        async with asyncio.timeout(5):
            while True:
                msg = await self.pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] == "subscribe":
                    return

    async def drain(self) -> list[dict[str, Any]]:
        self._n += 1
        sentinel = json.dumps({"type": "test-sentinel", "n": self._n})
        await self.client.publish(CHANNEL, sentinel)
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while True:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                if msg["data"] == sentinel:
                    return events
                events.append(json.loads(msg["data"]))

    async def close(self) -> None:
        await self.pubsub.unsubscribe()
        await self.pubsub.aclose()


@pytest.fixture
async def events(redis_client: redis.asyncio.Redis) -> AsyncIterator[SessionEvents]:
    sub = SessionEvents(redis_client)
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


def assert_event(
    event: dict[str, Any], grant: SessionGrant, reason: SessionEndReason, at_ms: int
) -> None:
    assert event == {
        "type": "session_ended",
        "sessionId": grant.session_id,
        "userId": grant.user_id,
        "reason": reason.value,
        "at": at_ms,
    }


# ----------------------------------------------------------------------------- rule 1


async def test_rule1_current_token_rotates_and_becomes_previous(
    store: SessionStore,
    redis_client: redis.asyncio.Redis,
    clock: ManualClock,
    settings: Settings,
) -> None:
    first = await store.create("user-1")
    assert re.fullmatch(r"rt1\.[\w-]+\.[\w-]+\.[\w-]+", first.refresh_token)
    clock.advance(3)

    second = await store.rotate(first.refresh_token)

    assert second.refresh_token != first.refresh_token
    assert (second.user_id, second.session_id) == ("user-1", first.session_id)
    assert second.deadline_ms == to_ms(clock()) + settings.session_inactive_ttl * 1000
    stored = await redis_client.hgetall(redis_keys.session(first.session_id))
    assert stored["cur"] == sha256(secret_of(second.refresh_token))
    assert stored["prev"] == sha256(secret_of(first.refresh_token))
    assert int(stored["rotated"]) == to_ms(clock())

    # The new token is now the current one: it rotates in turn.
    third = await store.rotate(second.refresh_token)
    assert third.refresh_token not in (first.refresh_token, second.refresh_token)
    assert await store.lookup(first.session_id) is not None


@pytest.mark.parametrize("user_id", ["u", "user with spaces", "line\r\nbreak\n", "ünïcødé"])
async def test_any_user_id_comes_back_unaltered(store: SessionStore, user_id: str) -> None:
    # The script answers with a one-line status reply, in which Redis would turn CR and LF
    # into spaces; such a user id must take the bulk-reply path.
    first = await store.create(user_id)
    second = await store.rotate(first.refresh_token)
    again = await store.rotate(first.refresh_token)  # rule 2: the "current" answer
    assert second.user_id == again.user_id == user_id


# ----------------------------------------------------------------------------- rule 2


async def test_rule2_previous_within_window_yields_the_same_pair(
    store: SessionStore, clock: ManualClock, events: SessionEvents
) -> None:
    first = await store.create("user-1")
    second = await store.rotate(first.refresh_token)

    clock.advance(5)  # inside the 10 s window
    again = await store.rotate(first.refresh_token)
    clock.advance(5)  # exactly at its end: still inside
    once_more = await store.rotate(first.refresh_token, "a-retry-key-nobody-used-0000")

    assert again == second
    assert once_more == second
    # No rotation happened: the current token still rotates, to a new token.
    third = await store.rotate(second.refresh_token)
    assert third.refresh_token != second.refresh_token
    assert await events.drain() == []


async def test_rule2_previous_with_same_retry_key_after_window_until_current_is_used(
    store: SessionStore, clock: ManualClock, events: SessionEvents
) -> None:
    retry_key = secrets.token_urlsafe(24)
    first = await store.create("user-1")
    second = await store.rotate(first.refresh_token, retry_key)

    clock.advance(3600)  # far past the reuse window
    assert await store.rotate(first.refresh_token, retry_key) == second
    assert await store.rotate(first.refresh_token, retry_key) == second

    # Once the current token has been used, the old previous one is reuse even with the key.
    third = await store.rotate(second.refresh_token)
    assert await rejected(store, first.refresh_token, retry_key) == REUSED
    assert await store.lookup(first.session_id) is None
    assert await rejected(store, third.refresh_token) == INVALID
    [event] = await events.drain()
    assert_event(event, first, SessionEndReason.REFRESH_REUSED, to_ms(clock()))


async def test_rule2_previous_within_window_after_current_was_used_is_reuse(
    store: SessionStore, clock: ManualClock
) -> None:
    first = await store.create("user-1")
    second = await store.rotate(first.refresh_token)
    clock.advance(1)
    await store.rotate(second.refresh_token)
    clock.advance(1)
    # `first` is now the grandparent, though its rotation was 2 s ago.
    assert await rejected(store, first.refresh_token) == REUSED
    assert await store.lookup(first.session_id) is None


# ----------------------------------------------------------------------------- rule 3


async def test_rule3_grandparent_is_reuse_and_ends_the_whole_session(
    store: SessionStore,
    clock: ManualClock,
    events: SessionEvents,
    redis_client: redis.asyncio.Redis,
) -> None:
    first = await store.create("user-1")
    second = await store.rotate(first.refresh_token)
    third = await store.rotate(second.refresh_token)
    other = await store.create("user-1")  # another session of the same user
    clock.advance(1)

    assert await rejected(store, first.refresh_token) == REUSED

    assert await store.lookup(first.session_id) is None
    assert await rejected(store, third.refresh_token) == INVALID
    assert await rejected(store, second.refresh_token) == INVALID
    # Asked again with the token that revoked it: the same answer, and no second announcement.
    assert await rejected(store, first.refresh_token) == REUSED
    [event] = await events.drain()
    assert_event(event, first, SessionEndReason.REFRESH_REUSED, to_ms(clock()))
    tombstone = await redis_client.hgetall(redis_keys.session(first.session_id))
    assert tombstone["state"] == "ended" and tombstone["reason"] == "refresh_reused"
    assert "cur" not in tombstone and "prev" not in tombstone
    # Only that session ended.
    assert await store.lookup(other.session_id) is not None
    await store.rotate(other.refresh_token)


@pytest.mark.parametrize(
    ("rotated_with", "presented_with"),
    [("key", None), ("key", "other"), (None, None), (None, "other")],
    ids=["no-key-presented", "other-key-presented", "no-key-at-all", "key-never-stored"],
)
async def test_rule3_previous_after_window_without_matching_retry_key_is_reuse(
    store: SessionStore,
    clock: ManualClock,
    events: SessionEvents,
    rotated_with: str | None,
    presented_with: str | None,
) -> None:
    first = await store.create("user-1")
    second = await store.rotate(first.refresh_token, rotated_with and secrets.token_urlsafe(24))
    clock.advance(10.0625)  # 62 ms past the 10 s window

    presented_key = presented_with and secrets.token_urlsafe(24)
    assert await rejected(store, first.refresh_token, presented_key) == REUSED

    assert await store.lookup(first.session_id) is None
    assert await rejected(store, second.refresh_token) == INVALID
    [event] = await events.drain()
    assert_event(event, first, SessionEndReason.REFRESH_REUSED, to_ms(clock()))


# ----------------------------------------------------------------------------- rule 4


def forgeries(victim: SessionGrant, victim_codec: RefreshTokenCodec) -> dict[str, object]:
    """Tokens that must change nothing; several name the victim's session."""
    _, sid, secret, tag = victim.refresh_token.split(".")
    rand = secrets.token_urlsafe
    flipped_tag = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    other_key_token = RefreshTokenCodec(secrets.token_bytes(32)).mint(sid).token
    return {
        "not-a-string": 12345,
        "none": None,
        "empty": "",
        "garbage": "definitely not a token",
        "three-segments": f"rt1.{sid}.{secret}",
        "five-segments": f"{victim.refresh_token}.{rand(16)}",
        "wrong-version": f"rt2.{sid}.{secret}.{tag}",
        "short-segment": f"rt1.{sid}.abc.{tag}",
        "bad-characters": f"rt1.{sid}.{secret[:-1]}!.{tag}",
        "oversized": f"rt1.{sid}.{secret}.{tag}" + "A" * 300,
        "victim-sid-random-secret-and-tag": f"rt1.{sid}.{rand(32)}.{rand(32)}",
        "victim-sid-and-secret-flipped-tag": f"rt1.{sid}.{secret}.{flipped_tag}",
        "victim-sid-minted-with-another-key": other_key_token,
        "unknown-sid-valid-mac": victim_codec.mint(rand(16)).token,
    }


async def test_rule4_malformed_and_forged_tokens_change_nothing(
    store: SessionStore,
    codec: RefreshTokenCodec,
    redis_client: redis.asyncio.Redis,
    events: SessionEvents,
    clock: ManualClock,
) -> None:
    victim = await store.create("victim")
    victim_next = await store.rotate(victim.refresh_token, secrets.token_urlsafe(24))
    clock.advance(60)  # past the window: a state in which the wrong move would be "reuse"
    victim_key = redis_keys.session(victim.session_id)
    before = await redis_client.hgetall(victim_key)
    keys_before = await all_keys(redis_client)

    for name, token in forgeries(victim, codec).items():
        code = await rejected(store, token)
        assert code == INVALID, name

    assert await redis_client.hgetall(victim_key) == before
    assert await all_keys(redis_client) == keys_before
    assert await events.drain() == []
    assert await store.lookup(victim.session_id) is not None
    # The victim's real token still works.
    after = await store.rotate(victim_next.refresh_token)
    assert after.session_id == victim.session_id


async def test_rule4_valid_mac_for_a_session_that_does_not_exist_creates_nothing(
    store: SessionStore, codec: RefreshTokenCodec, redis_client: redis.asyncio.Redis
) -> None:
    token = codec.mint("no-such-session-0000")
    assert await rejected(store, token.token) == INVALID
    assert await all_keys(redis_client) == set()


@pytest.mark.parametrize("key_bytes", [1, 32, 64, 65, 100])
def test_token_macs_are_hmac_sha256_as_documented(key_bytes: int) -> None:
    # The codec computes HMAC-SHA-256 from precomputed key states; tokens already issued (and
    # any other implementation) use the standard construction: they must agree exactly.
    key = secrets.token_bytes(key_bytes)
    codec = RefreshTokenCodec(key)

    def mac(label: str, sid: str, secret: str) -> str:
        digest = hmac.new(key, f"{label}:{sid}.{secret}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    sid, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
    by_hand = f"rt1.{sid}.{secret}.{mac('tag', sid, secret)}"
    parsed = codec.parse(by_hand)
    assert parsed is not None and (parsed.session_id, parsed.secret) == (sid, secret)
    assert parsed.secret_hash == sha256(secret)
    following = mac("next", sid, secret)
    assert codec.successor(parsed).token == f"rt1.{sid}.{following}.{mac('tag', sid, following)}"
    minted = codec.mint(sid).token
    _, _, minted_secret, minted_tag = minted.split(".")
    assert minted_tag == mac("tag", sid, minted_secret)


# ----------------------------------------------------------------------------- rule 5


async def test_rule5_inactivity_expiry(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600, access_ttl=30)
    store = SessionStore(redis_client, codec, settings, clock)
    grant = await store.create("user-1")
    # Each refresh restarts the inactivity period: 2 × 59 s is more than 60 s in total.
    clock.advance(59)
    grant = await store.rotate(grant.refresh_token)
    clock.advance(59)
    grant = await store.rotate(grant.refresh_token)
    assert grant.deadline_ms == to_ms(clock()) + 60_000

    clock.advance(60)  # exactly at the deadline: ended
    assert await store.lookup(grant.session_id) is None
    assert await rejected(store, grant.refresh_token) == INVALID
    assert await rejected(store, grant.refresh_token) == INVALID


async def test_rule5_absolute_expiry_despite_recent_refreshes(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    settings = make_settings(session_inactive_ttl=60, session_ttl=100, access_ttl=30)
    store = SessionStore(redis_client, codec, settings, clock)
    start_ms = to_ms(clock())
    grant = await store.create("user-1")
    clock.advance(50)
    grant = await store.rotate(grant.refresh_token)
    clock.advance(49)
    grant = await store.rotate(grant.refresh_token)
    # The inactivity deadline would be 159 s; the absolute one (100 s) wins.
    assert grant.deadline_ms == start_ms + 100_000
    clock.advance(2)  # 101 s after sign-in, 2 s after the last refresh
    assert await store.lookup(grant.session_id) is None
    assert await rejected(store, grant.refresh_token) == INVALID


@pytest.mark.parametrize(
    "inactive_ttl", [86_400, 2_592_000], ids=["inactivity-binds", "absolute-binds"]
)
async def test_session_key_expires_at_deadline_plus_grace_after_each_rotation(
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    inactive_ttl: int,
) -> None:
    # The script skips PEXPIREAT when the deadline did not move (the absolute one binds): the
    # expiry set at sign-in must then still be the right one.
    settings = make_settings(session_inactive_ttl=inactive_ttl, session_ttl=2_592_000)
    store = SessionStore(redis_client, codec, settings, clock)
    signed_in_ms = to_ms(clock())
    grant = await store.create("user-1")
    key = redis_keys.session(grant.session_id)

    async def assert_expiry() -> None:
        # Redis counts the TTL on its own (real) clock.
        expected = grant.deadline_ms + DEADLINE_GRACE_MS - int(time.time() * 1000)
        assert abs(await redis_client.pttl(key) - expected) < 1000

    await assert_expiry()
    for _ in range(3):
        clock.advance(600)
        grant = await store.rotate(grant.refresh_token)
        await assert_expiry()
    if inactive_ttl == 86_400:
        assert grant.deadline_ms == to_ms(clock()) + 86_400_000
    else:
        assert grant.deadline_ms == signed_in_ms + 2_592_000_000


# ----------------------------------------------------------------------------- idempotence


def rotate_args(
    codec: RefreshTokenCodec, settings: Settings, token: str, now_ms: int, retry_hash: str = ""
) -> tuple[str, list[object]]:
    """KEYS[1] and ARGV of ``session_rotate.lua`` as its header documents them."""
    parsed = codec.parse(token)
    assert parsed is not None
    successor = codec.successor(parsed)
    tombstone_ms = (settings.access_ttl + settings.clock_leeway) * 1000
    constants = (
        f"{settings.refresh_reuse_window * 1000} {tombstone_ms} {DEADLINE_GRACE_MS} {CHANNEL}"
    )
    argv: list[object] = [
        now_ms,
        parsed.secret_hash + successor.secret_hash + retry_hash,
        constants,
    ]
    return redis_keys.session(parsed.session_id), argv


async def test_rotate_script_called_twice_with_identical_arguments_answers_the_same(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    # Window 0: only the retry of the very same call (same `now`) may converge.
    settings = make_settings(refresh_reuse_window=0)
    store = SessionStore(redis_client, codec, settings, clock)
    grant = await store.create("user-1")
    source = resources.files("tether.server.auth").joinpath("lua", "session_rotate.lua").read_text()
    sha = await redis_client.script_load(source)
    key, argv = rotate_args(codec, settings, grant.refresh_token, to_ms(clock()))

    first = await redis_client.evalsha(sha, 1, key, *argv)
    second = await redis_client.evalsha(sha, 1, key, *argv)

    deadline = to_ms(clock()) + 2_592_000_000
    assert first == f"rotated {deadline} user-1"
    assert second == f"current {deadline} user-1"
    # The store derives the same successor from those answers: the same refresh token string.
    clock.advance(0.0625)
    successor = codec.successor(codec.parse(grant.refresh_token))  # type: ignore[arg-type]
    assert await rejected(store, grant.refresh_token) == REUSED  # 62 ms later, window 0: reuse
    assert await rejected(store, successor.token) == INVALID


async def test_store_rotate_retried_at_the_same_instant_survives_script_flush(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    settings = make_settings(refresh_reuse_window=0)
    store = SessionStore(redis_client, codec, settings, clock)
    grant = await store.create("user-1")
    retry_key = secrets.token_urlsafe(24)

    first = await store.rotate(grant.refresh_token, retry_key)
    await redis_client.script_flush()
    assert await redis_client.script_exists(store._rotate.sha) == [False]
    second = await store.rotate(grant.refresh_token, retry_key)

    assert second == first
    assert await redis_client.script_exists(store._rotate.sha) == [True]
    # Exactly one rotation: the new token rotates once, then the original is a grandparent.
    await store.rotate(first.refresh_token)
    assert await rejected(store, grant.refresh_token, retry_key) == REUSED


class ReplyDroppingProxy:
    """A TCP proxy in front of Redis that forwards everything but swallows the reply to the
    first write carrying ``trigger`` (by default the first ``EVALSHA``; a script's SHA-1 picks
    that script) and then cuts that connection, as a network failure after Redis ran the script
    would."""

    def __init__(self, upstream_port: int, trigger: bytes = b"EVALSHA") -> None:
        self.upstream_port = upstream_port
        self.trigger = trigger.upper()
        self.dropped: bytes | None = None
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        armed = asyncio.Event()
        cut = asyncio.Event()

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if self.dropped is None and self.trigger in data.upper():
                    armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def redis_to_client() -> None:
            while data := await up_reader.read(65536):
                if armed.is_set() and self.dropped is None:
                    self.dropped = data
                    cut.set()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())]
        self._tasks.update(tasks)
        cut_wait = asyncio.create_task(cut.wait())
        await asyncio.wait([*tasks, cut_wait], return_when=asyncio.FIRST_COMPLETED)
        for task in (*tasks, cut_wait):
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


@contextlib.asynccontextmanager
async def store_behind(
    proxy: ReplyDroppingProxy, like: SessionStore
) -> AsyncIterator[SessionStore]:
    """A store like ``like`` whose Redis client goes through ``proxy``: the production client,
    with its bounded retries on connection errors (tether.server.redis.connection)."""
    port = await proxy.start()
    client = connect(f"redis://127.0.0.1:{port}/0")
    try:
        yield SessionStore(client, like.codec, like.settings, like.clock)
    finally:
        await client.aclose()
        await proxy.close()


async def test_lost_reply_to_rotation_is_retried_by_redis_py_and_converges(
    redis_proc: RedisProcess,
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    settings: Settings,
    events: SessionEvents,
) -> None:
    direct = SessionStore(redis_client, codec, settings, clock)
    grant = await direct.create("user-1")  # also loads the scripts into Redis
    await redis_client.script_load(direct._rotate.script)
    proxy = ReplyDroppingProxy(redis_proc.port)
    async with store_behind(proxy, direct) as via_proxy:
        rotated = await via_proxy.rotate(grant.refresh_token)

    # Redis ran the rotation, its reply was lost, redis-py retried on a new connection.
    assert proxy.dropped is not None and b"rotated" in proxy.dropped
    assert proxy.connections >= 2
    stored = await redis_client.hgetall(redis_keys.session(grant.session_id))
    assert stored["state"] == "active"
    assert stored["cur"] == sha256(secret_of(rotated.refresh_token))
    assert stored["prev"] == sha256(secret_of(grant.refresh_token))
    assert await events.drain() == []
    # The token the client got back is the live one.
    assert (await direct.rotate(rotated.refresh_token)).session_id == grant.session_id


async def test_lost_reply_to_end_all_still_counts_the_sessions_it_ended(
    redis_proc: RedisProcess,
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    settings: Settings,
    events: SessionEvents,
) -> None:
    """Sign-out-everywhere whose session-end replies are lost: redis-py sends the scripts
    again, which find the sessions ended by this very call (its id in the tombstone) and say
    so. Before, they answered "already ended" and the count was 0; each is announced once."""
    direct = SessionStore(redis_client, codec, settings, clock)
    mine = [await direct.create("user-1") for _ in range(2)]
    await redis_client.script_load(direct._end.script)
    await redis_client.script_load(direct._ending.script)
    proxy = ReplyDroppingProxy(redis_proc.port, trigger=direct._end.sha.encode())
    async with store_behind(proxy, direct) as via_proxy:
        count = await via_proxy.end_all("user-1", SessionEndReason.SIGNED_OUT_EVERYWHERE)
        one = await direct.create("user-2")
        proxy.dropped = None  # once more, for a single session's end
        assert await via_proxy.end(one.session_id, SessionEndReason.SIGNED_OUT) is True

    assert proxy.dropped is not None and proxy.connections >= 3  # a reply lost each time
    assert count == 2
    assert sorted(e["sessionId"] for e in await events.drain()) == sorted(
        g.session_id for g in [*mine, one]
    )
    # Another call, with another id, did not end them.
    assert await direct.end_all("user-1", SessionEndReason.SIGNED_OUT_EVERYWHERE) == 0
    assert await direct.end(one.session_id, SessionEndReason.SIGNED_OUT) is False


async def test_end_all_ends_at_most_a_bounded_number_of_sessions_at_once(
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    settings: Settings,
) -> None:
    """A user with many sessions: end_all marks and ends them END_ALL_CONCURRENCY at a time,
    not one task and script call per session at once."""

    class Counting(SessionStore):
        in_flight = 0
        most: Counter[str] = Counter()

        async def _track(self, step: str, call: Awaitable[Any]) -> Any:
            Counting.in_flight += 1
            Counting.most[step] = max(Counting.most[step], Counting.in_flight)
            try:
                return await call
            finally:
                Counting.in_flight -= 1

        async def _begin_ending(self, session_id: str, value: str, *, nx: bool = False) -> Any:
            return await self._track("mark", super()._begin_ending(session_id, value, nx=nx))

        async def _end_fenced(self, session_id: str, reason: SessionEndReason, call: str) -> Any:
            return await self._track("end", super()._end_fenced(session_id, reason, call))

    store = Counting(redis_client, codec, settings, clock)
    n = 3 * sessions_module.END_ALL_CONCURRENCY + 1
    for _ in range(n):
        await store.create("user-1")
    assert await store.end_all("user-1", SessionEndReason.SIGNED_OUT_EVERYWHERE) == n
    assert Counting.most == {
        "mark": sessions_module.END_ALL_CONCURRENCY,
        "end": sessions_module.END_ALL_CONCURRENCY,
    }


async def test_fences_go_out_in_bounded_pipelines(
    store: SessionStore, redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's sessions times their partitions can be millions of fences: they are written
    FENCE_PIPELINE_COMMANDS at a time, and every one of them is written."""
    monkeypatch.setattr(sessions_module, "FENCE_PIPELINE_COMMANDS", 5)
    sids = [(await store.create("user-1")).session_id for _ in range(12)]
    sizes: list[int] = []
    original = redis_client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **k: Any) -> Any:
            sizes.append(len(pipe.command_stack))
            return await execute(*a, **k)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(redis_client, "pipeline", pipeline)
    await store._fence(sids, SessionEndReason.SIGNED_OUT_EVERYWHERE)
    assert sizes == [5, 5, 2], sizes
    fences = [redis_keys.data_session_fence(sid) for sid in sids]
    assert await redis_client.mget(fences) == ["signed_out_everywhere"] * 12


# ----------------------------------------------------------------------------- session-ended events


async def test_sign_out_announces_once(
    store: SessionStore, events: SessionEvents, clock: ManualClock
) -> None:
    grant = await store.create("user-1")
    clock.advance(7)
    assert await store.end(grant.session_id, SessionEndReason.SIGNED_OUT) is True
    assert await store.end(grant.session_id, SessionEndReason.SIGNED_OUT) is False
    assert await store.end(grant.session_id, SessionEndReason.REVOKED) is False

    [event] = await events.drain()
    assert_event(event, grant, SessionEndReason.SIGNED_OUT, to_ms(clock()))
    assert await store.lookup(grant.session_id) is None
    assert await rejected(store, grant.refresh_token) == INVALID


async def test_end_all_announces_each_session_once_and_spares_other_users(
    store: SessionStore, events: SessionEvents, clock: ManualClock
) -> None:
    mine = [await store.create("user-1") for _ in range(2)]
    theirs = await store.create("user-2")
    mine[1] = await store.rotate(mine[1].refresh_token)

    assert await store.end_all("user-1", SessionEndReason.SIGNED_OUT_EVERYWHERE) == 2
    assert await store.end_all("user-1", SessionEndReason.SIGNED_OUT_EVERYWHERE) == 0

    got = sorted(await events.drain(), key=lambda e: e["sessionId"])
    want = sorted(mine, key=lambda g: g.session_id)
    assert len(got) == 2
    for event, grant in zip(got, want, strict=True):
        assert_event(event, grant, SessionEndReason.SIGNED_OUT_EVERYWHERE, to_ms(clock()))
    for grant in mine:
        assert await store.lookup(grant.session_id) is None
        assert await rejected(store, grant.refresh_token) == INVALID
        # Unindexed together at the end: the sweep has nothing left to end.
        assert await store.redis.zscore(redis_keys.SESSION_DEADLINES, grant.session_id) is None
    assert await store.redis.zscore(redis_keys.SESSION_DEADLINES, theirs.session_id) is not None
    assert await store.lookup(theirs.session_id) is not None
    await store.rotate(theirs.refresh_token)


async def test_reuse_announces_refresh_reused(
    store: SessionStore, events: SessionEvents, clock: ManualClock
) -> None:
    grant = await store.create("user-1")
    second = await store.rotate(grant.refresh_token)
    await store.rotate(second.refresh_token)
    assert await rejected(store, grant.refresh_token) == REUSED
    assert await store.end(grant.session_id, SessionEndReason.SIGNED_OUT) is False
    [event] = await events.drain()
    assert_event(event, grant, SessionEndReason.REFRESH_REUSED, to_ms(clock()))


async def test_sweep_ends_expired_sessions_once_and_follows_refreshed_ones(
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    events: SessionEvents,
) -> None:
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600, access_ttl=30)
    store = SessionStore(redis_client, codec, settings, clock)
    idle = await store.create("user-1")
    busy = await store.create("user-2")
    clock.advance(50)
    busy = await store.rotate(busy.refresh_token)  # its deadline moves to +110 s
    clock.advance(11)  # +61 s: idle is due, busy is indexed as due but was refreshed

    assert await store.sweep_expired() == 1
    [event] = await events.drain()
    assert_event(event, idle, SessionEndReason.SESSION_EXPIRED, to_ms(clock()))
    assert await store.lookup(busy.session_id) is not None
    assert await redis_client.zscore(redis_keys.SESSION_DEADLINES, busy.session_id) == (
        busy.deadline_ms
    )
    assert await redis_client.zscore(redis_keys.SESSION_DEADLINES, idle.session_id) is None

    assert await store.sweep_expired() == 0
    assert await events.drain() == []
    assert await rejected(store, idle.refresh_token) == INVALID

    clock.advance(50)  # +111 s: now busy is due as well
    assert await store.sweep_expired() == 1
    [event] = await events.drain()
    assert_event(event, busy, SessionEndReason.SESSION_EXPIRED, to_ms(clock()))


async def test_expired_session_found_by_refresh_is_announced_once(
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    clock: ManualClock,
    events: SessionEvents,
) -> None:
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600, access_ttl=30)
    store = SessionStore(redis_client, codec, settings, clock)
    grant = await store.create("user-1")
    clock.advance(61)
    assert await rejected(store, grant.refresh_token) == INVALID
    assert await store.sweep_expired() == 0  # already ended by the refresh
    [event] = await events.drain()
    assert_event(event, grant, SessionEndReason.SESSION_EXPIRED, to_ms(clock()))


async def test_admin_revoke_announces_revoked(
    store: SessionStore, events: SessionEvents, redis_url: str
) -> None:
    one = await store.create("user-1")
    two = [await store.create("user-2") for _ in range(2)]
    spared = await store.create("user-3")

    before_ms = int(time.time() * 1000)
    assert await revoke_from_cli(redis_url, user_id=None, session_id=one.session_id) == 1
    assert await revoke_from_cli(redis_url, user_id=None, session_id=one.session_id) == 0
    assert await revoke_from_cli(redis_url, user_id="user-2", session_id=None) == 2
    after_ms = int(time.time() * 1000)

    got = await events.drain()
    assert len(got) == 3
    by_sid = {e["sessionId"]: e for e in got}
    for grant in (one, *two):
        event = by_sid[grant.session_id]
        # The CLI runs on the real clock.
        assert before_ms <= event["at"] <= after_ms
        assert_event(event, grant, SessionEndReason.REVOKED, event["at"])
        assert await store.lookup(grant.session_id) is None
        value, pttl = await fence_of(store, grant.session_id)
        assert value == "revoked" and pttl > 0
    assert await store.lookup(spared.session_id) is not None


# ----------------------------------------------------------------------------- fences


async def fence_of(store: SessionStore, session_id: str) -> tuple[str | None, int]:
    """The fence's value and remaining lifetime (ms; -2 when there is none)."""
    key = redis_keys.data_session_fence(session_id)
    return await store.redis.get(key), await store.redis.pttl(key)


def assert_fence_lifetime(store: SessionStore, pttl: int) -> None:
    # Access-token lifetime + clock leeway + FENCE_MARGIN, counted on Redis's clock from the
    # write a moment ago.
    assert store.fence_ttl_ms == (3600 + 5 + FENCE_MARGIN) * 1000
    assert store.fence_ttl_ms - 10_000 < pttl <= store.fence_ttl_ms


async def test_sign_out_and_sign_out_all_leave_a_fence(store: SessionStore) -> None:
    one = await store.create("user-1")
    assert await store.end(one.session_id, SessionEndReason.SIGNED_OUT)
    value, pttl = await fence_of(store, one.session_id)
    assert value == "signed_out"
    assert_fence_lifetime(store, pttl)

    mine = [await store.create("user-2") for _ in range(2)]
    mine[1] = await store.rotate(mine[1].refresh_token)
    theirs = await store.create("user-3")
    assert await store.end_all("user-2", SessionEndReason.SIGNED_OUT_EVERYWHERE) == 2
    for grant in mine:
        value, pttl = await fence_of(store, grant.session_id)
        assert value == "signed_out_everywhere"
        assert_fence_lifetime(store, pttl)
    assert await fence_of(store, theirs.session_id) == (None, -2)


async def test_reuse_and_a_refresh_past_the_deadline_leave_a_fence(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    store = SessionStore(
        redis_client, codec, make_settings(session_inactive_ttl=60, session_ttl=3600), clock
    )
    grant = await store.create("user-1")
    second = await store.rotate(grant.refresh_token)
    await store.rotate(second.refresh_token)
    assert await fence_of(store, grant.session_id) == (None, -2)  # rotation fences nothing
    assert await rejected(store, grant.refresh_token) == REUSED
    value, pttl = await fence_of(store, grant.session_id)
    assert value == "refresh_reused"
    assert_fence_lifetime(store, pttl)

    idle = await store.create("user-2")
    clock.advance(61)
    assert await rejected(store, idle.refresh_token) == INVALID  # this call ended it
    value, pttl = await fence_of(store, idle.session_id)
    assert value == "session_expired"
    assert_fence_lifetime(store, pttl)


async def test_the_sweep_fences_only_the_sessions_it_ends(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600, access_ttl=30)
    store = SessionStore(redis_client, codec, settings, clock)
    idle = await store.create("user-1")
    busy = await store.create("user-2")
    clock.advance(50)
    busy = await store.rotate(busy.refresh_token)
    clock.advance(11)  # idle is due; busy is indexed as due but was refreshed
    lifted: list[Any] = []
    release = store._release_fence

    async def spy(**kwargs: Any) -> Any:
        lifted.append(kwargs)
        return await release(**kwargs)

    store._release_fence = spy  # type: ignore[method-assign]
    assert await store.sweep_expired() == 1
    assert lifted == []  # busy was never fenced, not even for a moment
    value, pttl = await fence_of(store, idle.session_id)
    assert value is not None and value.startswith("session_expired ")
    assert store.fence_ttl_ms == (30 + 5 + FENCE_MARGIN) * 1000
    assert store.fence_ttl_ms - 10_000 < pttl <= store.fence_ttl_ms
    assert await fence_of(store, busy.session_id) == (None, -2)
    assert await store.lookup(busy.session_id) is not None


async def test_the_sweep_lifts_its_fence_when_a_refresh_wins_the_race_and_no_other(
    redis_client: redis.asyncio.Redis, codec: RefreshTokenCodec, clock: ManualClock
) -> None:
    """An instance whose clock lags refreshes a session between the sweep's read (due) and its
    end script (alive): the sweep lifts the fence it wrote, but never one another end wrote."""
    settings = make_settings(session_inactive_ttl=60, session_ttl=3600)
    lagging = ManualClock(clock())
    racer = SessionStore(redis_client, codec, settings, lagging)
    tokens: dict[str, str] = {}
    signing_out: set[str] = set()

    class RacedSweep(SessionStore):
        async def _fence_expired(self, session_ids: list[str], now: int) -> dict[str, str]:
            fenced = await super()._fence_expired(session_ids, now)
            for sid in session_ids:
                if sid in signing_out:  # a sign-out elsewhere has written its fence
                    key = redis_keys.data_session_fence(sid)
                    await redis_client.set(key, "signed_out", px=self.fence_ttl_ms)
                await racer.rotate(tokens[sid])
            return fenced

    sweeper = RacedSweep(redis_client, codec, settings, clock)
    first, second = await sweeper.create("user-1"), await sweeper.create("user-2")
    tokens = {first.session_id: first.refresh_token, second.session_id: second.refresh_token}
    signing_out.add(second.session_id)
    clock.advance(61)
    lagging.advance(59)
    assert await sweeper.sweep_expired() == 0
    assert await sweeper.lookup(first.session_id) is not None
    assert await fence_of(sweeper, first.session_id) == (None, -2)
    assert (await fence_of(sweeper, second.session_id))[0] == "signed_out"


@pytest.fixture
async def fenceless_client(redis_proc: RedisProcess) -> AsyncIterator[redis.asyncio.Redis]:
    """A client whose Redis user may use every key of the auth layer but no data-layer key: a
    fence write fails (NOPERM) as it would on an unreachable data node."""
    await redis_proc_acl(redis_proc)
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=redis_proc.port, username="no-fences", decode_responses=True
    )
    try:
        yield client
    finally:
        await client.aclose()


async def redis_proc_acl(redis_proc: RedisProcess) -> None:
    admin = redis_proc.client()
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "no-fences", "on", "nopass", "&*", "+@all",
            "~tether:session:*", "~tether:session-deadlines", "~tether:user:*",
            "~tether:email:*", "~tether:rl:*",
        )  # fmt: skip
    finally:
        await admin.aclose()


async def test_a_fence_that_cannot_be_written_fails_the_end_before_it_happens(
    store: SessionStore,
    fenceless_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    settings: Settings,
    clock: ManualClock,
    events: SessionEvents,
) -> None:
    limited = SessionStore(fenceless_client, codec, settings, clock)
    one = await limited.create("user-1")
    two = await limited.create("user-2")
    with pytest.raises(redis.exceptions.NoPermissionError):
        await limited.end(one.session_id, SessionEndReason.SIGNED_OUT)
    with pytest.raises(redis.exceptions.NoPermissionError):
        await limited.end_all("user-2", SessionEndReason.SIGNED_OUT_EVERYWHERE)
    clock.advance(86_400)  # both past their deadline
    with pytest.raises(redis.exceptions.NoPermissionError):
        await limited.sweep_expired()
    # Nothing ended: no tombstone, no event; the sessions end, fenced, once the fence can be
    # written.
    for grant in (one, two):
        assert await store.redis.hget(redis_keys.session(grant.session_id), "state") == "active"
    assert await events.drain() == []
    assert await store.sweep_expired() == 2
    assert len(await events.drain()) == 2
    for grant in (one, two):
        assert (await fence_of(store, grant.session_id))[0] is not None


@pytest.fixture
async def fenceless_store(
    fenceless_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    settings: Settings,
    clock: ManualClock,
) -> AsyncIterator[SessionStore]:
    """A session store that cannot write fences (see ``fenceless_client``); its background
    fence retries are stopped after the test."""
    limited = SessionStore(fenceless_client, codec, settings, clock)
    try:
        yield limited
    finally:
        await limited.aclose()


async def rotated_then_reused(
    limited: SessionStore, clock: ManualClock, *, replays: int
) -> SessionGrant:
    """A session of ``limited`` (a store that cannot write fences) whose first refresh token
    is presented ``replays`` times after its rotation, far past the reuse window: each ends the
    session (reuse) and fails to fence it (NOPERM)."""
    first = await limited.create("user-1")
    await limited.rotate(first.refresh_token)
    clock.advance(3600)
    for _ in range(replays):
        with pytest.raises(redis.exceptions.NoPermissionError):
            await limited.rotate(first.refresh_token)
    return first


async def test_a_reuse_whose_fence_cannot_be_written_is_fenced_once_redis_allows(
    store: SessionStore,
    redis_proc: RedisProcess,
    fenceless_store: SessionStore,
    clock: ManualClock,
) -> None:
    # The rotation script ends the session on reuse, then the fence is written. When that write
    # fails nobody may retry (the reuse may be an attacker's): the instance retries it.
    first = await rotated_then_reused(fenceless_store, clock, replays=1)
    assert await store.lookup(first.session_id) is None  # ended, not yet fenced
    assert await fence_of(store, first.session_id) == (None, -2)
    admin = redis_proc.client()
    try:  # the data node is reachable again
        await admin.execute_command("ACL", "SETUSER", "no-fences", "allkeys")
    finally:
        await admin.aclose()
    for _ in range(300):  # retried in the background, backing off from 0.1 s
        if (await fence_of(store, first.session_id))[0] is not None:
            break
        await asyncio.sleep(0.05)
    fence, pttl = await fence_of(store, first.session_id)
    assert fence == SessionEndReason.REFRESH_REUSED.value
    assert_fence_lifetime(store, pttl)
    await fenceless_store.aclose()
    assert not fenceless_store._refencing  # nothing left running


async def test_reuses_replayed_while_the_fence_cannot_be_written_retry_it_once(
    fenceless_store: SessionStore, clock: ManualClock
) -> None:
    # Each replay of the reused token answers 'reused' again and fails to fence again: one
    # background retry per session, not one per request (an attacker replaying a stolen token
    # during the outage would otherwise start a task per request, each living a fence lifetime).
    await rotated_then_reused(fenceless_store, clock, replays=5)
    assert len(fenceless_store._refencing) == 1
    await fenceless_store.aclose()
    assert not fenceless_store._refencing


async def test_a_sign_out_whose_fence_cannot_be_written_answers_unavailable(
    redis_proc: RedisProcess, fenceless_client: redis.asyncio.Redis, clock: ManualClock
) -> None:
    url = redis_proc.url.replace("://", "://no-fences@", 1)
    node = Node.build(
        make_settings(redis_url=url, keys=KeySet.generate().to_json()), demo_app, clock
    )
    try:
        pair = await node.auth.sign_up("carol@example.com", "correct horse battery", "10.0.0.1")
        with pytest.raises(AuthFailure) as info:
            await node.auth.sign_out(pair.access_token)
        assert info.value.code == "unavailable"  # HTTP 503: retry, the session is still on
        assert await node.sessions.lookup(pair.session_id) is not None
    finally:
        await node.close()


# ----------------------------------------------------------------------------- rule 7


async def test_the_same_current_pair_is_the_same_refresh_token_and_a_fresh_access_token(
    redis_proc: RedisProcess, clock: ManualClock
) -> None:
    """Contract 1.1 §5 rule 7: the previous token within the window, or with the same retryKey
    after it, yields the identical refresh token string and a newly signed access token for the
    same session (valid, with its own iat and jti)."""
    node = Node.build(
        make_settings(
            redis_url=redis_proc.url, keys=KeySet.generate().to_json(), refresh_reuse_window=10
        ),
        demo_app,
        clock,
    )
    retry_key = secrets.token_urlsafe(24)
    try:
        auth = node.auth
        first = await auth.sign_up("dave@example.com", "correct horse battery", "10.0.0.1")
        clock.advance(2)
        rotated = await auth.refresh(first.refresh_token, retry_key)
        clock.advance(3)  # within the window
        within = await auth.refresh(first.refresh_token)
        clock.advance(30)  # past the window, the same retryKey, the new token still unused
        retried = await auth.refresh(first.refresh_token, retry_key)
        seen = {rotated.access_token}
        base = node.tokens.verify(rotated.access_token, now=clock())
        for again in (within, retried):
            assert again.refresh_token == rotated.refresh_token
            assert (again.session_id, again.user_id) == (rotated.session_id, rotated.user_id)
            assert again.access_token not in seen
            seen.add(again.access_token)
            claims = node.tokens.verify(again.access_token, now=clock())
            assert (claims.session_id, claims.user_id) == (base.session_id, base.user_id)
            assert claims.issued_at > base.issued_at
            assert claims.token_id != base.token_id
            base = claims
    finally:
        await node.close()


# ----------------------------------------------------------------------------- key hygiene

HASH_TAGGED = re.compile(r"^tether:[a-z-]+:\{[^{}]+\}(:[a-z-]+)?$")
#: Session fences live in the data layer's one slot (``commit.lua`` reads them).
FENCE = re.compile(r"^tether:\{tether-data\}:ended:[A-Za-z0-9_-]+$")
#: Global indexes: one key each, touched by single-key commands only, never with another key
#: in one script, so a hash tag would change nothing.
UNTAGGED_GLOBALS = {redis_keys.SESSION_DEADLINES, redis_keys.INSTANCES}


async def dump_everything(client: redis.asyncio.Redis) -> dict[bytes, list[bytes]]:
    """Every key and every stored byte string under it, read by type (no DEBUG, no DUMP, whose
    compression could hide a substring)."""
    out: dict[bytes, list[bytes]] = {}
    async for key in client.scan_iter(count=1000):
        kind = (await client.type(key)).decode()
        if kind == "string":
            values = [await client.get(key)]
        elif kind == "hash":
            values = [b for kv in (await client.hgetall(key)).items() for b in kv]
        elif kind == "set":
            values = list(await client.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            values = await client.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected type {kind} for {key!r}")
        out[key] = values
    return out


async def test_keys_are_tagged_expiring_and_hold_no_secret(
    redis_proc: RedisProcess, redis_client: redis.asyncio.Redis, clock: ManualClock
) -> None:
    key_set = KeySet.generate()
    node = Node.build(
        make_settings(redis_url=redis_proc.url, keys=key_set.to_json(), refresh_reuse_window=10),
        demo_app,
        clock,
    )
    password = "correct horse battery staple"
    retry_key = secrets.token_urlsafe(24)
    issued: list[str] = []
    try:
        auth = node.auth
        alice = await auth.sign_up("alice@example.com", password, "10.0.0.1")
        bob = await auth.sign_up("bob@example.com", password + "!", "10.0.0.2")
        with pytest.raises(Exception, match="invalid_credentials"):
            await auth.sign_in("alice@example.com", "wrong password!", "10.0.0.3")
        alice2 = await auth.sign_in("ALICE@example.com", password, "10.0.0.3")
        rotated = await auth.refresh(alice.refresh_token, retry_key)
        again = await auth.refresh(alice.refresh_token, retry_key)  # rule 2 answer
        bob2 = await auth.refresh(bob.refresh_token)
        await auth.refresh(bob2.refresh_token)
        with pytest.raises(Exception, match="refresh_reused"):
            await auth.refresh(bob.refresh_token)  # ends bob's session
        await auth.sign_out(alice2.access_token)
        untouched = await auth.sign_in("bob@example.com", password + "!", "10.0.0.4")
        issued = [
            t
            for pair in (alice, bob, alice2, rotated, again, bob2, untouched)
            for t in (pair.refresh_token, pair.access_token)
        ]
    finally:
        await node.close()

    raw = redis_proc.client(decode_responses=False)
    try:
        dump = await dump_everything(raw)
        names = [k.decode() for k in dump]
        assert any(n.startswith("tether:rl:") for n in names)  # the flows did hit the limiter
        assert any(n.startswith("tether:session:") for n in names)
        for name in names:
            assert name in UNTAGGED_GLOBALS or HASH_TAGGED.match(name) or FENCE.match(name), name
            if (
                name.startswith(("tether:session:", "tether:rl:"))
                or name.endswith(":sessions")
                or FENCE.match(name)
            ):
                assert await raw.pttl(name) > 0, f"{name} has no TTL"

        mac = key_set.refresh_secret
        needles = {
            "password": password.encode(),
            "retry key": retry_key.encode(),
            "MAC key (raw)": mac,
            "MAC key (hex)": mac.hex().encode(),
            "MAC key (base64url)": base64.urlsafe_b64encode(mac).rstrip(b"=")[:32],
            "MAC key (base64)": base64.b64encode(mac).rstrip(b"=")[:32],
        }
        for token in issued:
            needles[f"token {token[:12]}"] = token.encode()
            if token.startswith("rt1."):
                _, _, secret, tag = token.split(".")
                needles[f"secret of {token[:12]}"] = secret.encode()
                needles[f"tag of {token[:12]}"] = tag.encode()
        blobs = [k for k in dump] + [v for vs in dump.values() for v in vs]
        for label, needle in needles.items():
            for blob in blobs:
                assert needle not in blob, f"{label} found in Redis"
        # Not vacuous: the sessions are there, a fresh one (never rotated) with its TTL too.
        assert redis_keys.session(alice.session_id).encode() in dump
        assert redis_keys.data_session_fence(alice2.session_id).encode() in dump
        assert redis_keys.data_session_fence(bob.session_id).encode() in dump  # reuse
        assert await raw.pttl(redis_keys.session(untouched.session_id)) > 0
    finally:
        await raw.aclose()


# ----------------------------------------------------------------------------- lookups


class PipelineCounter:
    """Counts the pipelines and lone HMGETs a store sends through its (real) client."""

    def __init__(self, store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines = 0
        self.hmgets = 0
        real_pipeline, real_hmget = store.redis.pipeline, store.redis.hmget

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return real_pipeline(*args, **kwargs)

        async def hmget(*args: Any, **kwargs: Any) -> Any:
            self.hmgets += 1
            return await real_hmget(*args, **kwargs)

        monkeypatch.setattr(store.redis, "pipeline", pipeline)
        monkeypatch.setattr(store.redis, "hmget", hmget)


async def test_lookups_of_one_turn_share_one_pipeline_and_each_gets_its_own_answer(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect storm's authenticates look their sessions up together (one round trip)."""
    grants = [await store.create(f"user-{i}") for i in range(12)]
    for grant in grants[::3]:
        await store.end(grant.session_id, SessionEndReason.SIGNED_OUT)
    sids = [g.session_id for g in grants] + [grants[1].session_id, "no-such-session"]
    counter = PipelineCounter(store, monkeypatch)

    found = await asyncio.gather(*(store.lookup(sid) for sid in sids))

    assert (counter.pipelines, counter.hmgets) == (1, 0)
    expected = [None if i % 3 == 0 else g.user_id for i, g in enumerate(grants)]
    assert [info and info.user_id for info in found] == [*expected, "user-1", None]
    # The next turn's lookups are a new batch; a lone lookup is one plain HMGET.
    assert await store.lookup(grants[2].session_id) is not None
    assert (counter.pipelines, counter.hmgets) == (1, 1)


async def test_a_batched_lookup_whose_caller_went_away_spares_the_others(
    store: SessionStore,
) -> None:
    one, two = await store.create("user-1"), await store.create("user-2")
    gone = asyncio.ensure_future(store.lookup(one.session_id))
    stays = asyncio.ensure_future(store.lookup(two.session_id))
    await asyncio.sleep(0)  # both are waiting in the batch
    gone.cancel()
    info = await stays
    assert info is not None and info.user_id == "user-2"
    assert gone.cancelled()


async def test_a_redis_error_reaches_every_lookup_of_the_batch(
    redis_proc: RedisProcess, codec: RefreshTokenCodec, settings: Settings, clock: ManualClock
) -> None:
    admin = redis_proc.client()
    # A Redis user that may not read hashes: each lookup meets a real NOPERM error.
    await admin.execute_command(
        "ACL", "SETUSER", "no-hmget", "on", "nopass", "~*", "+@all", "-hmget"
    )
    limited = redis.asyncio.Redis(
        host="127.0.0.1", port=redis_proc.port, username="no-hmget", decode_responses=True
    )
    try:
        grants = [await SessionStore(admin, codec, settings, clock).create(f"u{i}") for i in (1, 2)]
        store = SessionStore(limited, codec, settings, clock)
        outcomes = await asyncio.gather(
            *(store.lookup(g.session_id) for g in grants), return_exceptions=True
        )
        assert all(isinstance(o, redis.exceptions.NoPermissionError) for o in outcomes), outcomes
        store.redis = admin  # the store recovers: a later batch is sent afresh
        assert [i and i.user_id for i in await asyncio.gather(
            *(store.lookup(g.session_id) for g in grants)
        )] == ["u1", "u2"]  # fmt: skip
    finally:
        await limited.aclose()
        await admin.aclose()


async def test_a_failed_batch_fails_only_the_lookups_that_fail_on_their_own(
    redis_proc: RedisProcess,
    redis_client: redis.asyncio.Redis,
    codec: RefreshTokenCodec,
    settings: Settings,
    clock: ManualClock,
) -> None:
    """As on a cluster with one master down: a session the client cannot read must not make
    the authenticates batched with it fail."""
    admin_store = SessionStore(redis_client, codec, settings, clock)
    readable, hidden = await admin_store.create("u1"), await admin_store.create("u2")
    # A Redis user that may read only the first session's key.
    await redis_client.execute_command(
        "ACL", "SETUSER", "one-session", "on", "nopass", "+@all",
        f"~{redis_keys.session(readable.session_id)}",
    )  # fmt: skip
    limited = redis.asyncio.Redis(
        host="127.0.0.1", port=redis_proc.port, username="one-session", decode_responses=True
    )
    try:
        store = SessionStore(limited, codec, settings, clock)
        ok, refused = await asyncio.gather(
            store.lookup(readable.session_id),
            store.lookup(hidden.session_id),
            return_exceptions=True,
        )
        assert isinstance(ok, SessionInfo) and ok.user_id == "u1", ok
        assert isinstance(refused, redis.exceptions.NoPermissionError), refused
    finally:
        await limited.aclose()


async def test_a_large_batch_is_sent_in_pipelines_of_at_most_lookup_batch(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "LOOKUP_BATCH", 4)
    grants = [await store.create(f"user-{i}") for i in range(3)]
    sids = [f"absent-{i}" for i in range(7)] + [g.session_id for g in grants]
    counter = PipelineCounter(store, monkeypatch)
    found = await asyncio.gather(*(store.lookup(sid) for sid in sids))
    assert (counter.pipelines, counter.hmgets) == (3, 0)  # 4 + 4 + 2
    assert [info and info.user_id for info in found] == [None] * 7 + ["user-0", "user-1", "user-2"]


# ----------------------------------------------------------------------------- shutdown


async def test_the_sweep_cancelled_at_any_point_ends(
    redis_proc: RedisProcess, clock: ManualClock
) -> None:
    """Found by CI: a server process did not exit within 15 s of SIGTERM. The session sweep,
    cancelled by the shutdown during one of its Redis calls, lost the cancellation (redis-py
    writes under asyncio.wait_for, which on Python 3.11 can swallow it) and swept on every
    second. Cancelled after any number of loop turns, the sweep must end."""
    node = Node.build(
        make_settings(
            redis_url=redis_proc.url,
            keys=KeySet.generate().to_json(),
            session_sweep_interval=0.001,
        ),
        demo_app,
        clock,
    )
    try:
        assert await lost_cancellations(node.sweep_sessions_forever, range(200)) == []
    finally:
        await node.close()


async def test_the_shutdown_goes_on_without_a_task_that_ignores_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever swallows a cancellation next, the lifespan's shutdown waits for its background
    tasks at most its grace: a task that lost one cancellation is cancelled again and ends (a
    warning names it); one that ignores them all is named as an error and left; one whose
    clean-up raises has its error logged."""
    released = asyncio.Event()

    async def lost_one() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)  # its first cancellation is lost here
        await asyncio.sleep(3600)

    async def ignores_all() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def obedient() -> None:
        await asyncio.sleep(3600)

    async def fails_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("its clean-up failed")

    tasks = [
        asyncio.create_task(lost_one(), name="lost-one"),
        asyncio.create_task(ignores_all(), name="ignores-all"),
        asyncio.create_task(obedient(), name="obedient"),
        asyncio.create_task(fails_cleanup(), name="fails-cleanup"),
    ]
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="tether"):
        left = await stop_tasks(tasks, grace=1.5)
    assert 1.5 <= time.monotonic() - started < 4
    assert left == [tasks[1]]
    assert tasks[0].cancelled() and tasks[2].cancelled()
    assert "background task ignores-all did not stop within 1.5 s" in caplog.text
    assert "background task lost-one stopped only after 2 cancellations" in caplog.text
    assert "obedient" not in caplog.text
    # An error instead of the cancellation is reported, as asyncio.run reports one.
    assert "background task fails-cleanup raised while it stopped" in caplog.text
    assert "RuntimeError: its clean-up failed" in caplog.text
    released.set()
    tasks[1].cancel()
    await asyncio.wait([tasks[1]], timeout=1)
    assert tasks[1].done()
