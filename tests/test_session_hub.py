"""The session hub against a real ``redis-server``: ended sessions reach the connections bound
to them, once, with their reason; and events that Pub/Sub loses (a killed subscriber connection,
a Redis restart) are made up for by the re-check that follows every re-subscribe.

Events on one subscription arrive in order, so a *witness* listener told after an event proves
the hub has already handled everything published before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from tether.protocol import SessionEndReason
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.realtime.session_hub import SessionHub
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect
from tether.server.settings import Settings

from tests.clock import ManualClock
from tests.harness import FAST_ARGON2_ENV, RedisProcess

pytestmark = pytest.mark.timeout(30)

CHANNEL = redis_keys.SESSION_ENDED_CHANNEL
#: The hub's longest reconnect delay (2 s) plus the one second a re-check may take.
RECONNECT_BOUND = 3.0
#: How long an event takes to reach a listener when nothing is wrong (generous).
EVENT_BOUND = 2.0


class Recorder:
    """A listener that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, SessionEndReason]] = []
        self.told = asyncio.Event()

    def session_ended(self, session_id: str, reason: SessionEndReason) -> None:
        self.calls.append((session_id, reason))
        self.told.set()

    async def wait(self, timeout: float = EVENT_BOUND) -> None:
        await asyncio.wait_for(self.told.wait(), timeout)


class FailingRecorder(Recorder):
    """A listener with a bug: records the call, then raises."""

    def session_ended(self, session_id: str, reason: SessionEndReason) -> None:
        super().session_ended(session_id, reason)
        raise RuntimeError("listener bug")


def make_store(client: Any) -> SessionStore:
    return SessionStore(
        client, RefreshTokenCodec(b"k" * 32), Settings.load(environ=FAST_ARGON2_ENV)
    )


def event(session_id: str, reason: str) -> str:
    """A session-ended event as ``session_end.lua`` publishes it."""
    return json.dumps(
        {"type": "session_ended", "sessionId": session_id, "userId": "u", "reason": reason, "at": 1}
    )


async def end_silently(client: redis.asyncio.Redis, session_id: str, reason: str) -> None:
    """Leave the tombstone ``session_end.lua`` leaves, but publish no event."""
    await client.hset(redis_keys.session(session_id), mapping={"state": "ended", "reason": reason})


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[SessionStore]:
    # The production client (bounded retries): it reconnects by itself after a Redis restart.
    client = connect(redis_url)
    try:
        yield make_store(client)
    finally:
        await client.aclose()


HubStarter = Callable[..., Awaitable[SessionHub]]


@pytest.fixture
async def start_hub(redis_url: str, store: SessionStore) -> AsyncIterator[HubStarter]:
    """Start hubs (subscribed on return); each is closed after the test, and its ``run()``
    must then return normally."""
    started: list[tuple[SessionHub, asyncio.Task[None]]] = []

    async def start(**kwargs: Any) -> SessionHub:
        hub = SessionHub(redis_url, store, **kwargs)
        task = asyncio.create_task(hub.run())
        started.append((hub, task))
        await asyncio.wait_for(hub.ready.wait(), 5)
        return hub

    try:
        yield start
    finally:
        for hub, task in started:
            await asyncio.wait_for(hub.close(), 5)
            await asyncio.wait_for(task, 1)


@pytest.fixture
async def hub(start_hub: HubStarter) -> SessionHub:
    return await start_hub()


async def new_session(store: SessionStore, user_id: str = "u1") -> str:
    return (await store.create(user_id)).session_id


# ------------------------------------------------------------------------------ events


async def test_bound_listener_is_told_once_with_the_reason(
    hub: SessionHub, store: SessionStore, redis_client: redis.asyncio.Redis
) -> None:
    sid = await new_session(store)
    listener = Recorder()
    hub.bind(sid, listener)

    assert await store.end(sid, SessionEndReason.SIGNED_OUT)
    await listener.wait()

    # Ending it again announces nothing; a duplicate event finds nobody left to tell.
    assert not await store.end(sid, SessionEndReason.REVOKED)
    await redis_client.publish(CHANNEL, event(sid, "revoked"))
    witness_sid = await new_session(store)
    witness = Recorder()
    hub.bind(witness_sid, witness)
    await store.end(witness_sid, SessionEndReason.REVOKED)
    await witness.wait()

    assert listener.calls == [(sid, SessionEndReason.SIGNED_OUT)]


async def test_unbound_listener_and_other_sessions_are_not_told(
    hub: SessionHub, store: SessionStore
) -> None:
    sid = await new_session(store)
    other_sid = await new_session(store)
    unbound, other, witness = Recorder(), Recorder(), Recorder()
    hub.bind(sid, unbound)
    hub.bind(sid, witness)
    hub.bind(other_sid, other)
    hub.unbind(sid, unbound)
    hub.unbind(sid, unbound)  # twice: harmless

    await store.end(sid, SessionEndReason.SIGNED_OUT)
    await witness.wait()

    assert unbound.calls == []
    assert other.calls == []
    assert witness.calls == [(sid, SessionEndReason.SIGNED_OUT)]


async def test_every_listener_of_a_session_is_told(hub: SessionHub, store: SessionStore) -> None:
    sid = await new_session(store)
    first, second = Recorder(), Recorder()
    hub.bind(sid, first)
    hub.bind(sid, second)
    hub.bind(sid, second)  # twice: still told once

    await store.end(sid, SessionEndReason.SIGNED_OUT_EVERYWHERE)
    await first.wait()
    await second.wait()

    assert first.calls == [(sid, SessionEndReason.SIGNED_OUT_EVERYWHERE)]
    assert second.calls == [(sid, SessionEndReason.SIGNED_OUT_EVERYWHERE)]


async def test_a_failing_listener_does_not_stop_the_others(
    hub: SessionHub, store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    sid = await new_session(store)
    failing, first, second = FailingRecorder(), Recorder(), Recorder()
    for listener in (first, failing, second):
        hub.bind(sid, listener)

    with caplog.at_level(logging.ERROR, logger="tether.session_hub"):
        await store.end(sid, SessionEndReason.REFRESH_REUSED)
        await first.wait()
        await second.wait()

    assert failing.calls == [(sid, SessionEndReason.REFRESH_REUSED)]
    assert first.calls == second.calls == [(sid, SessionEndReason.REFRESH_REUSED)]
    assert "listener failed" in caplog.text

    # The subscriber survived it.
    later_sid = await new_session(store)
    later = Recorder()
    hub.bind(later_sid, later)
    await store.end(later_sid, SessionEndReason.SIGNED_OUT)
    await later.wait()


async def test_recently_ended_remembers_then_forgets(
    start_hub: HubStarter, store: SessionStore
) -> None:
    clock = ManualClock()
    hub = await start_hub(recent_ttl=5.0, monotonic=clock)
    # Nobody is bound to this one: the case of a connection whose lookup raced with the end.
    raced_sid = await new_session(store)
    active_sid = await new_session(store)
    witness_sid = await new_session(store)
    witness = Recorder()
    hub.bind(witness_sid, witness)

    await store.end(raced_sid, SessionEndReason.REFRESH_REUSED)
    await store.end(witness_sid, SessionEndReason.SIGNED_OUT)
    await witness.wait()

    assert hub.recently_ended(raced_sid) == SessionEndReason.REFRESH_REUSED
    assert hub.recently_ended(witness_sid) == SessionEndReason.SIGNED_OUT
    assert hub.recently_ended(active_sid) is None
    clock.advance(4.9)
    assert hub.recently_ended(raced_sid) == SessionEndReason.REFRESH_REUSED
    clock.advance(0.2)
    assert hub.recently_ended(raced_sid) is None
    assert hub.recently_ended(witness_sid) is None


async def test_malformed_events_are_ignored_without_logging_them(
    hub: SessionHub,
    store: SessionStore,
    redis_client: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = await new_session(store)
    listener = Recorder()
    hub.bind(sid, listener)
    secret = "rt1.SECRET-PAYLOAD"

    with caplog.at_level(logging.DEBUG, logger="tether.session_hub"):
        for payload in (
            secret,
            json.dumps([secret]),
            json.dumps({"type": "session_ended", "reason": secret}),
            json.dumps({"type": "session_ended", "sessionId": 7, "reason": "revoked"}),
            json.dumps({"type": "other", "sessionId": sid, "reason": "revoked", "x": secret}),
        ):
            await redis_client.publish(CHANNEL, payload)
        await store.end(sid, SessionEndReason.SIGNED_OUT)
        await listener.wait()

    assert listener.calls == [(sid, SessionEndReason.SIGNED_OUT)]
    assert "malformed" in caplog.text
    assert "SECRET-PAYLOAD" not in caplog.text


async def test_an_unknown_reason_still_ends_the_session_as_revoked(
    hub: SessionHub, store: SessionStore, redis_client: redis.asyncio.Redis
) -> None:
    sid = await new_session(store)
    listener = Recorder()
    hub.bind(sid, listener)

    await redis_client.publish(CHANNEL, event(sid, "a_reason_from_a_newer_version"))
    await listener.wait()

    assert listener.calls == [(sid, SessionEndReason.REVOKED)]


# ------------------------------------------------------------------------------ re-check


async def test_recheck_reports_ended_sessions_in_batches(
    start_hub: HubStarter, store: SessionStore, redis_client: redis.asyncio.Redis
) -> None:
    hub = await start_hub(recheck_batch=2)
    sids = [await new_session(store) for _ in range(5)]
    listeners = {sid: Recorder() for sid in sids}
    for sid, listener in listeners.items():
        hub.bind(sid, listener)
    # Ended with no event: two tombstones, and one session whose key is gone altogether.
    await end_silently(redis_client, sids[0], "signed_out")
    await end_silently(redis_client, sids[2], "revoked")
    await redis_client.delete(redis_keys.session(sids[4]))

    assert await hub.recheck() == 3

    assert listeners[sids[0]].calls == [(sids[0], SessionEndReason.SIGNED_OUT)]
    assert listeners[sids[2]].calls == [(sids[2], SessionEndReason.REVOKED)]
    assert listeners[sids[4]].calls == [(sids[4], SessionEndReason.SESSION_EXPIRED)]
    assert listeners[sids[1]].calls == listeners[sids[3]].calls == []
    assert hub.recently_ended(sids[2]) == SessionEndReason.REVOKED
    # Reported sessions are no longer held: a second pass finds nothing new.
    assert await hub.recheck() == 0


async def test_event_lost_while_the_subscriber_is_killed_is_caught_by_the_recheck(
    hub: SessionHub, store: SessionStore, redis_client: redis.asyncio.Redis
) -> None:
    sid = await new_session(store)
    active_sid = await new_session(store)
    listener, active = Recorder(), Recorder()
    hub.bind(sid, listener)
    hub.bind(active_sid, active)

    # The session ends while Redis is up, with no event yet: the hub does not poll.
    await end_silently(redis_client, sid, "revoked")
    await asyncio.sleep(0.3)
    assert listener.calls == []

    # Kill the hub's subscriber connection and publish the event while it is gone, atomically.
    async with redis_client.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        pipe.publish(CHANNEL, event(sid, "revoked"))
        killed, receivers = await pipe.execute()
    assert killed == 1
    assert receivers == 0  # the event is lost to the hub

    await listener.wait(RECONNECT_BOUND)
    assert listener.calls == [(sid, SessionEndReason.REVOKED)]
    assert active.calls == []


async def test_session_revoked_while_redis_was_down_is_caught_by_the_recheck(
    redis_proc: RedisProcess, hub: SessionHub, store: SessionStore
) -> None:
    sid = await new_session(store)
    active_sid = await new_session(store)
    listener, active = Recorder(), Recorder()
    hub.bind(sid, listener)
    hub.bind(active_sid, active)

    redis_proc.stop()  # in order: the AOF is flushed
    await asyncio.sleep(0.3)  # the hub notices and starts reconnecting

    # Another instance revokes the session on the same data (another port, so the hub cannot
    # be subscribed when the event goes out), then that Redis stops too.
    other = RedisProcess(redis_proc.data_dir)
    other.start()
    other_client = connect(other.url)
    try:
        assert await make_store(other_client).end(sid, SessionEndReason.REVOKED)
    finally:
        await other_client.aclose()
        other.stop()
    assert listener.calls == []  # an outage alone never ends a session

    redis_proc.restart()  # same port, same data
    await listener.wait(RECONNECT_BOUND)

    assert listener.calls == [(sid, SessionEndReason.REVOKED)]
    assert active.calls == []
    assert hub.recently_ended(sid) == SessionEndReason.REVOKED


async def test_session_ended_right_after_a_redis_crash_is_told_once(
    redis_proc: RedisProcess, hub: SessionHub, store: SessionStore
) -> None:
    sid = await new_session(store)
    listener = Recorder()
    hub.bind(sid, listener)

    redis_proc.kill()  # a crash: the session survives in the AOF all the same
    await asyncio.sleep(0.5)
    redis_proc.restart()
    # The hub is most likely still in its backoff, so it misses the event; if it is back
    # already, the event tells it. Either way: told once, within the bound.
    assert await store.end(sid, SessionEndReason.SIGNED_OUT)
    await listener.wait(RECONNECT_BOUND)
    await asyncio.sleep(0.3)

    assert listener.calls == [(sid, SessionEndReason.SIGNED_OUT)]
