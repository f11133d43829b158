"""The client's pure parts, without a socket or a sleep: backoff, close-code decisions, the
protocol core (authVersion, gating, resubscribe and replay), renewal deadlines, error
classification, and the token stores (files and locks, but no network)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tether.client.core import (
    GIVEN_UP_RETENTION,
    MAX_GIVEN_UP_MUTATIONS,
    REQUEST_IDS_PER_MS,
    USER_CHANGED_MESSAGE,
    AuthExpiring,
    AuthFailed,
    AuthOk,
    Backoff,
    ClientCore,
    CloseDecision,
    Identity,
    MutationDeferred,
    MutationDone,
    Principal,
    QueryRejected,
    QueryUpdate,
    Reconnector,
    ServerError,
    SessionRevoked,
    Unrecognized,
    close_decision,
    initial_request_id,
    renewal_due,
    token_subject,
)
from tether.client.errors import (
    AuthErrorKind,
    MessageTooLarge,
    MutationError,
    classify_auth_code,
)
from tether.client.http_auth import http_base_url
from tether.client.token_store import FileTokenStore, MemoryTokenStore, StoredSession

from tests.clock import ManualClock

pytestmark = pytest.mark.timeout(30)


def frames(core: ClientCore) -> list[dict[str, Any]]:
    return [json.loads(text) for text in core.data_to_send()]


def connected(core: ClientCore) -> None:
    """Open a connection on ``core`` and answer its ``connect``."""
    core.connection_opened()
    sent = frames(core)
    assert sent == [{"type": "connect", "clientId": core.client_id, "protocol": 1}]
    core.receive(json.dumps({"type": "connected", "connectionId": "c", "serverTime": 1}))


# ---------------------------------------------------------------------------------- backoff


def test_backoff_ceiling_doubles_from_100_ms_to_16_s() -> None:
    backoff = Backoff()
    ceilings = [backoff.ceiling(n) for n in range(10)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 16.0, 16.0])
    assert backoff.ceiling(1000) == 16.0


@pytest.mark.parametrize("attempt", [0, 1, 3, 7, 8, 50])
def test_full_jitter_spreads_over_the_whole_window(attempt: int) -> None:
    backoff = Backoff()
    ceiling = backoff.ceiling(attempt)
    assert backoff.delay(attempt, 0.0) == 0.0
    assert backoff.delay(attempt, 0.999999) == pytest.approx(ceiling, rel=1e-5)
    rng = random.Random(attempt)
    samples = [backoff.delay(attempt, rng.random()) for _ in range(4000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    # Full jitter: uniform over [0, ceiling] — not "equal jitter" (which never waits less
    # than half) and not a fixed delay.
    assert min(samples) < 0.02 * ceiling
    assert max(samples) > 0.98 * ceiling
    assert sum(samples) / len(samples) == pytest.approx(ceiling / 2, rel=0.05)
    assert sum(s < ceiling / 2 for s in samples) / len(samples) == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------- close codes


@pytest.mark.parametrize(
    ("code", "decision"),
    [
        (4000, CloseDecision.RECONNECT),
        (4008, CloseDecision.RECONNECT),
        (4009, CloseDecision.RECONNECT),
        (4429, CloseDecision.RECONNECT),
        (4499, CloseDecision.RECONNECT),
        (4500, CloseDecision.STOP),
        (4503, CloseDecision.STOP),
        (4999, CloseDecision.STOP),
        (1012, CloseDecision.RECONNECT_NOW),
        (1000, CloseDecision.RECONNECT),
        (1001, CloseDecision.RECONNECT),
        (1006, CloseDecision.RECONNECT),
        (1009, CloseDecision.RECONNECT),
        (1011, CloseDecision.RECONNECT),
        (None, CloseDecision.RECONNECT),
    ],
)
def test_close_code_decisions(code: int | None, decision: CloseDecision) -> None:
    assert close_decision(code) is decision


def test_reconnector_backs_off_rotates_urls_and_stops_on_45xx() -> None:
    reconnector = Reconnector(3, Backoff(), stable_after=10.0, rand=lambda: 0.999999)
    plans = [reconnector.plan(4429, now=0.0) for _ in range(5)]
    assert [p.url_index for p in plans] == [1, 2, 0, 1, 2]
    assert [p.delay for p in plans] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6], rel=1e-5)
    assert not any(p.stop for p in plans)

    stop = reconnector.plan(4503, now=0.0)
    assert stop.stop and stop.close_code == 4503 and stop.delay == 0.0


def test_1012_reconnects_at_once_to_the_next_url_whatever_the_backoff() -> None:
    reconnector = Reconnector(2, Backoff(), rand=lambda: 0.999999)
    for _ in range(6):
        reconnector.plan(None, now=0.0)  # six failures: the backoff is at 6.4 s
    assert reconnector.url_index == 0
    plan = reconnector.plan(1012, now=0.0)
    assert plan.decision is CloseDecision.RECONNECT_NOW
    assert (plan.delay, plan.url_index) == (0.0, 1)
    # Draining does not reset the backoff: a deployment that drains every instance at once
    # still meets the growing backoff on the failures that follow.
    assert reconnector.plan(None, now=0.0).delay == pytest.approx(6.4, rel=1e-5)


def test_backoff_starts_over_only_after_a_stable_connection() -> None:
    reconnector = Reconnector(1, Backoff(), stable_after=10.0, rand=lambda: 0.999999)
    for _ in range(4):
        reconnector.plan(None, now=0.0)
    # Accepted, then closed at once (a crash loop, a rate limit): the backoff keeps growing.
    reconnector.connected(100.0)
    assert reconnector.plan(4429, now=101.0).delay == pytest.approx(1.6, rel=1e-5)
    # Up for ten seconds: the next failure starts from the first step again.
    reconnector.connected(200.0)
    assert reconnector.plan(1006, now=210.0).delay == pytest.approx(0.1, rel=1e-5)


# ---------------------------------------------------------------------------------- core


def test_auth_version_strictly_increases_across_requests_and_connections() -> None:
    core = ClientCore("client-1")
    versions: list[int] = []
    for _ in range(3):
        connected(core)
        versions.append(core.authenticate("token"))
        versions.append(core.refresh("refresh-token", "k" * 20))
        versions.append(core.authenticate(None))
        sent = frames(core)
        assert [f["authVersion"] for f in sent] == versions[-3:]
        core.connection_lost()
    assert versions == sorted(set(versions))
    assert versions[0] >= 1


def test_auth_frames_need_an_open_connection() -> None:
    core = ClientCore("client-1")
    with pytest.raises(RuntimeError):
        core.authenticate("token")
    core.connection_opened()
    core.refresh("rt")  # `connect` not answered yet: pipelined behind it (rule 1)
    assert [f["type"] for f in frames(core)] == ["connect", "refresh"]
    core.connection_lost()
    with pytest.raises(RuntimeError):
        core.refresh("rt")


def test_refresh_frame_carries_the_retry_key_only_when_given() -> None:
    core = ClientCore("client-1")
    connected(core)
    core.refresh("rt-1")
    core.refresh("rt-2", "key-" * 5)
    first, second = frames(core)
    assert first == {"type": "refresh", "refreshToken": "rt-1", "authVersion": 1}
    assert second["retryKey"] == "key-" * 5


def test_nothing_but_connect_and_auth_goes_out_before_ready() -> None:
    core = ClientCore("client-1")
    core.subscribe("whoami", {})
    request_id = core.mutate("notes.add", {"text": "hi"})
    assert core.data_to_send() == []
    connected(core)
    version = core.authenticate("token", user="u")
    assert [f["type"] for f in frames(core)] == ["authenticate"]
    core.set_ready(True)
    # Subscriptions are pipelined behind the auth request; the mutation waits for its answer
    # (a failed authenticate leaves the connection anonymous, and the write must not run so).
    assert [f["type"] for f in frames(core)] == ["subscribe"]
    auth_ok(core, version, "u")
    assert sent_mutations(core) == [request_id]


def test_reconnect_resubscribes_and_replays_unacknowledged_mutations_in_order() -> None:
    core = ClientCore("client-1")
    connected(core)
    core.set_ready(True)
    q1 = core.subscribe("whoami", {})
    q2 = core.subscribe("counter.get", {"name": "a"})
    q3 = core.subscribe("notes.mine", {})
    r1 = core.mutate("counter.increment", {"name": "a"})
    r2 = core.mutate("notes.add", {"text": "x"})
    r3 = core.mutate("counter.increment", {"name": "b", "by": 2})
    first_sent = frames(core)
    assert len(first_sent) == 6
    core.unsubscribe(q2)
    assert frames(core) == [{"type": "unsubscribe", "queryId": q2}]
    core.receive(json.dumps({"type": "mutation_result", "requestId": r2, "value": "n1"}))

    core.connection_lost()
    core.unsubscribe(q3)  # while disconnected: nothing to tell the server
    assert core.data_to_send() == []

    connected(core)
    assert core.data_to_send() == []  # held until the identity is settled
    core.set_ready(True)
    assert frames(core) == [
        {"type": "subscribe", "queryId": q1, "name": "whoami", "args": {}},
        {"type": "mutate", "requestId": r1, "name": "counter.increment", "args": {"name": "a"}},
        {
            "type": "mutate",
            "requestId": r3,
            "name": "counter.increment",
            "args": {"name": "b", "by": 2},
        },
    ]
    # The replayed frames are the originals: same requestId, name and args.
    originals = {f["requestId"]: f for f in first_sent if f["type"] == "mutate"}
    assert originals[r1]["args"] == {"name": "a"}
    # New identifiers never reuse old ones.
    assert core.subscribe("whoami", {}) > q3
    assert core.mutate("notes.add", {"text": "y"}) > r3


def test_holding_keeps_what_was_sent_and_queues_new_operations() -> None:
    core = ClientCore("client-1")
    connected(core)
    core.set_ready(True)
    core.subscribe("whoami", {})
    frames(core)
    core.set_ready(False)  # the identity lapsed: nothing new may run as anonymous
    q = core.subscribe("notes.mine", {})
    r = core.mutate("notes.add", {"text": "x"})
    assert core.data_to_send() == []
    core.set_ready(True)
    assert [(f["type"], f.get("queryId", f.get("requestId"))) for f in frames(core)] == [
        ("subscribe", q),
        ("mutate", r),
    ]


def test_server_frames_become_events() -> None:
    core = ClientCore("client-1")
    connected(core)
    core.set_ready(True)
    q = core.subscribe("whoami", {})
    r = core.mutate("counter.increment", {"name": "a"}, user="u")
    frames(core)

    auth_version = core.authenticate("t", user="u")
    ok = core.receive(
        json.dumps(
            {
                "type": "auth_ok",
                "authVersion": auth_version,
                "identity": {"userId": "u", "sessionId": "s"},
                "expiresAt": 5000,
                "serverTime": 1000,
            }
        )
    )
    assert ok == [AuthOk(auth_version, Identity("u", "s"), 5000, 1000, None)]
    assert core.identity == Identity("u", "s") and not core.pending_auth

    update = {"type": "transition", "version": 7, "updates": [{"queryId": q, "value": 1}]}
    update["updates"].append({"queryId": 999, "value": "unsubscribed long ago"})
    assert core.receive(json.dumps(update)) == [QueryUpdate(q, 7, value=1)]
    failed = {"queryId": q, "error": {"code": "unauthenticated", "message": "m"}}
    assert core.receive(json.dumps({"type": "transition", "version": 8, "updates": [failed]})) == [
        QueryUpdate(q, 8, error=("unauthenticated", "m"))
    ]
    result = {"type": "mutation_result", "requestId": r, "value": 3, "version": 9}
    assert core.receive(json.dumps(result)) == [MutationDone(r, value=3, version=9)]
    assert core.receive(json.dumps(result)) == []  # a duplicate answer is dropped
    assert core.version == 9

    # auth_expiring about an identity the connection no longer holds is dropped.
    assert core.receive(json.dumps({"type": "auth_expiring", "expiresAt": 4000})) == []
    expiring = {"type": "auth_expiring", "expiresAt": 5000, "serverTime": 4000}
    assert core.receive(json.dumps(expiring)) == [AuthExpiring(5000, 4000)]
    assert core.receive(json.dumps({"type": "session_revoked", "reason": "signed_out"})) == [
        SessionRevoked("signed_out")
    ]
    assert core.identity is None

    bad = core.authenticate("t2")
    failed_auth = {"type": "auth_error", "authVersion": bad, "code": "unavailable"}
    assert core.receive(json.dumps(failed_auth)) == [AuthFailed(bad, "unavailable", "")]

    assert isinstance(core.receive("not json"), list)
    assert core.receive('{"type": "from_the_future"}') == [
        Unrecognized('{"type": "from_the_future"}')
    ]


def test_error_frames_reject_the_named_query_or_mutation() -> None:
    core = ClientCore("client-1")
    connected(core)
    core.set_ready(True)
    q = core.subscribe("nope", {})
    r = core.mutate("nope", {})
    frames(core)
    error = {"type": "error", "code": "unknown_function", "message": "m", "queryId": q}
    assert core.receive(json.dumps(error)) == [QueryRejected(q, "unknown_function", "m")]
    assert q not in core.subscriptions  # not re-sent after a reconnect
    error = {"type": "error", "code": "bad_args", "message": "m", "requestId": r}
    assert core.receive(json.dumps(error)) == [MutationDone(r, error=("bad_args", "m"))]
    assert r not in core.mutations
    general = {"type": "error", "code": "rate_limited", "message": "too many"}
    assert core.receive(json.dumps(general)) == [ServerError("rate_limited", "too many")]


def test_a_frame_over_the_limit_fails_the_call_and_is_never_queued() -> None:
    core = ClientCore("client-1", max_message_bytes=200)
    connected(core)
    core.set_ready(True)
    with pytest.raises(MessageTooLarge):
        core.mutate("notes.add", {"text": "é" * 100})  # 200 bytes of UTF-8 in the args alone
    assert core.mutations == {} and core.data_to_send() == []
    core.mutate("notes.add", {"text": "short"})
    assert len(core.data_to_send()) == 1


def test_client_id_is_the_same_on_every_connect() -> None:
    core = ClientCore("stable-id")
    for _ in range(3):
        core.connection_opened()
        assert frames(core)[0]["clientId"] == "stable-id"
        core.connection_lost()
    with pytest.raises(ValueError):
        ClientCore("")


# ---------------------------------------------------------------------------------- time


def test_renewal_deadline_is_corrected_for_clock_skew() -> None:
    local_now = 1_000_000.0
    skew = 3600.0  # the server's clock is an hour ahead of ours
    server_now_ms = int((local_now + skew) * 1000)
    expires_ms = server_now_ms + 3_600_000  # a one-hour token
    due = renewal_due(expires_ms, server_now_ms, received_at=local_now)
    # 30 s before exp by the server's clock, which is local_now + 3600 - 30 by ours.
    assert due == pytest.approx(local_now + 3600 - 30)


def test_renewal_margin_is_a_quarter_of_a_short_lifetime() -> None:
    due = renewal_due(expires_at_ms=12_000, server_time_ms=10_000, received_at=10.0)
    assert due == pytest.approx(11.5)  # a 2 s token: renewed 0.5 s before exp


def test_stored_session_freshness_uses_the_stored_skew() -> None:
    session = StoredSession(
        "u", "s", "at", "rt", expires_at=20_000, server_time=10_000, received_at=1000.0
    )
    # Issued 10 s before exp by the server's clock; the server is 990 s behind ours.
    assert session.access_fresh(now=1005.0)
    assert not session.access_fresh(now=1008.0)  # within 2.5 s (a quarter) of exp


# ---------------------------------------------------------------------------------- codes


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("unavailable", AuthErrorKind.RETRY),
        ("rate_limited", AuthErrorKind.RETRY),
        ("network", AuthErrorKind.RETRY),
        ("something_new", AuthErrorKind.RETRY),
        ("token_expired", AuthErrorKind.RENEW),
        ("invalid_token", AuthErrorKind.RENEW),
        ("refresh_invalid", AuthErrorKind.SIGNED_OUT),
        ("refresh_reused", AuthErrorKind.SIGNED_OUT),
        ("session_revoked", AuthErrorKind.SIGNED_OUT),
        ("invalid_credentials", AuthErrorKind.SIGNED_OUT),
    ],
)
def test_auth_codes_are_classified(code: str, kind: AuthErrorKind) -> None:
    assert classify_auth_code(code) is kind


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("ws://127.0.0.1:8000/sync", "http://127.0.0.1:8000"),
        ("wss://example.com/tether/sync", "https://example.com/tether"),
        ("wss://example.com/sync/", "https://example.com"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ],
)
def test_http_base_url_is_derived_from_the_sync_url(url: str, base: str) -> None:
    assert http_base_url(url) == base


# ---------------------------------------------------------------------------------- stores


def session(refresh_token: str = "rt-1") -> StoredSession:
    return StoredSession("u", "s", "at", refresh_token, 5000, 1000, 1_000_000.5)


async def test_memory_store_round_trip() -> None:
    store = MemoryTokenStore()
    assert await store.load() is None
    async with store.locked():
        await store.save(session())
    assert await store.load() == session()
    await store.save(None)
    assert await store.load() is None


async def test_file_store_writes_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "session.json"
    store = FileTokenStore(path)
    assert await store.load() is None
    stored = session().with_retry_key("k" * 32)
    await store.save(stored)
    assert await FileTokenStore(path).load() == stored  # another instance reads the same
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["session.json"]  # no temp files
    doc = json.loads(path.read_text())
    assert doc["session"]["refresh_token"] == "rt-1"
    assert doc["session"]["retry_key"] == "k" * 32
    await store.save(None)
    assert await store.load() is None


async def test_file_store_ignores_a_file_that_is_not_a_session(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text("{not json")
    assert await FileTokenStore(path).load() is None


async def test_file_store_lock_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    lock_path = str(path) + ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({lock_path!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(1.5)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == b"locked\n"
        store = FileTokenStore(path, lock_timeout=0.3)
        with pytest.raises(TimeoutError):
            async with store.locked():
                pass
        # Once the other process lets go (here: exits), the lock is ours.
        patient = FileTokenStore(path, lock_timeout=5.0)
        started = time.monotonic()
        async with patient.locked():
            waited = time.monotonic() - started
        assert 0.5 < waited < 5.0
    finally:
        holder.kill()
        holder.wait()


async def test_file_store_lock_excludes_a_second_instance_in_the_same_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "session.json"
    first, second = FileTokenStore(path), FileTokenStore(path, lock_timeout=0.2)
    async with first.locked():
        with pytest.raises(TimeoutError):
            async with second.locked():
                pass
    async with second.locked():
        pass
    assert os.path.exists(str(path) + ".lock")


# ---------------------------------------------------------------------------------- contract 1.1


def ready_core(clock: ManualClock | None = None, **kwargs: Any) -> ClientCore:
    """A core on a connected connection, ready, anonymous; re-sends after 1 s exactly."""
    core = ClientCore(
        "client-1",
        clock=clock or ManualClock(),
        rand=lambda: 0.5,
        retry_backoff=Backoff(initial=2.0, maximum=8.0),
        first_request_id=100,
        **kwargs,
    )
    connected(core)
    core.set_ready(True)
    core.validate()
    return core


def auth_ok(core: ClientCore, version: int, user: str | None, session: str = "s1") -> list[Any]:
    identity = None if user is None else {"userId": user, "sessionId": session}
    frame = {"type": "auth_ok", "authVersion": version, "identity": identity, "serverTime": 1}
    if user is not None:
        frame["expiresAt"] = 10**13
    events = core.receive(json.dumps(frame))
    core.validate()
    return events


def signed_in(core: ClientCore, user: str = "u1", session: str = "s1") -> None:
    version = core.authenticate("token", user=user)
    auth_ok(core, version, user, session)
    frames(core)


def sent_mutations(core: ClientCore) -> list[int]:
    core.flush()
    core.validate()
    return [f["requestId"] for f in frames(core) if f["type"] == "mutate"]


def result(request_id: int, **fields: Any) -> str:
    return json.dumps({"type": "mutation_result", "requestId": request_id, **fields})


def test_request_ids_start_at_a_time_based_value_below_2_53() -> None:
    now = time.time()
    first = initial_request_id(now)
    assert first == int(now * 1000) * REQUEST_IDS_PER_MS
    assert first < 2**53 - 1
    # A process restarted with the same clientId a millisecond later starts above every id
    # the one before took, unless it took more than REQUEST_IDS_PER_MS a millisecond.
    assert initial_request_id(now + 0.001) >= first + REQUEST_IDS_PER_MS - REQUEST_IDS_PER_MS // 8
    assert initial_request_id(now + 3600) > first + 3600 * 1000 * (REQUEST_IDS_PER_MS - 1)
    assert initial_request_id(2**53) <= 2**53 - 1  # never past JSON's exact integers
    core = ClientCore("c")
    assert abs(core.new_request_id() - initial_request_id(time.time())) < 10**7
    assert ClientCore("c", first_request_id=7).mutate("m", {}) == 7


def test_unavailable_is_not_an_outcome_the_same_request_id_is_sent_again_after_a_backoff() -> None:
    clock = ManualClock()
    core = ready_core(clock)
    r = core.mutate("counter.increment", {"name": "a"})
    (first,) = frames(core)
    unknown = {"code": "unavailable", "message": "the data store is unreachable"}
    assert core.receive(result(r, error=unknown)) == [MutationDeferred(r, "unavailable", 1.0)]
    assert r in core.mutations and core.next_retry_at() == clock.now + 1.0
    assert sent_mutations(core) == []  # not before the backoff
    clock.advance(0.999)
    assert sent_mutations(core) == []
    clock.advance(0.001)
    core.flush()
    assert frames(core) == [first]  # the same frame: same requestId, name and args
    assert core.next_retry_at() is None
    # The next one waits twice as long (2 s × 2 × 0.5).
    assert core.receive(result(r, error=unknown)) == [MutationDeferred(r, "unavailable", 2.0)]
    clock.advance(2.0)
    assert sent_mutations(core) == [r]
    # A definite answer ends it.
    assert core.receive(result(r, value=1, version=3)) == [MutationDone(r, value=1, version=3)]
    assert core.mutations == {} and core.next_retry_at() is None


def test_a_dropped_mutate_rate_limited_is_sent_again_other_errors_are_outcomes() -> None:
    clock = ManualClock()
    core = ready_core(clock)
    r1 = core.mutate("counter.increment", {})
    r2 = core.mutate("counter.increment", {})
    frames(core)
    dropped = {"type": "error", "code": "rate_limited", "message": "dropped", "requestId": r1}
    assert core.receive(json.dumps(dropped)) == [MutationDeferred(r1, "rate_limited", 1.0)]
    refused = {"type": "error", "code": "bad_message", "message": "name", "requestId": r2}
    assert core.receive(json.dumps(refused)) == [MutationDone(r2, error=("bad_message", "name"))]
    failed = {"code": "internal", "message": "m"}
    clock.advance(1.0)
    assert sent_mutations(core) == [r1]
    assert core.receive(result(r1, error=failed)) == [MutationDone(r1, error=("internal", "m"))]


def test_a_retry_waits_across_a_reconnect_and_goes_out_on_the_next_connection() -> None:
    clock = ManualClock()
    core = ready_core(clock)
    r = core.mutate("counter.increment", {})
    frames(core)
    core.receive(result(r, error={"code": "unavailable", "message": ""}))
    core.connection_lost()
    connected(core)
    core.set_ready(True)
    assert sent_mutations(core) == []  # its backoff still runs
    clock.advance(1.0)
    assert sent_mutations(core) == [r]
    # An `unavailable` for a mutation already due to go out again changes nothing.
    core.connection_lost()
    assert core.receive(result(r, error={"code": "unavailable", "message": ""})) == []


def test_mutate_with_a_request_id_sends_that_id_and_joins_a_pending_one() -> None:
    core = ready_core()
    r = core.mutate("counter.increment", {"name": "a"})
    assert r == 100
    frames(core)
    core.forget_mutation(r)  # its caller timed out: it is not sent again ...
    assert sent_mutations(core) == []
    # ... until the application re-sends it with its requestId: same id, nothing new taken.
    assert core.mutate("counter.increment", {"name": "a"}, request_id=r) == r
    assert frames(core) == [
        {"type": "mutate", "requestId": r, "name": "counter.increment", "args": {"name": "a"}}
    ]
    assert core.mutate("counter.increment", {"name": "a"}, request_id=r) == r  # still pending
    assert core.data_to_send() == []
    with pytest.raises(ValueError, match="pending"):
        core.mutate("notes.add", {"text": "x"}, request_id=r)
    with pytest.raises(ValueError):
        core.mutate("m", {}, request_id=2**53)
    assert core.mutate("m", {}) == 101  # the counter did not move


def test_transient_auth_errors_keep_the_identity_others_blank_it() -> None:
    core = ready_core()
    signed_in(core)
    r = core.mutate("notes.add", {}, user="u1")
    assert sent_mutations(core) == [r]
    for code in ("unavailable", "rate_limited"):
        version = core.refresh("rt", user="u1")
        error = {"type": "auth_error", "authVersion": version, "code": code}
        assert core.receive(json.dumps(error)) == [AuthFailed(version, code, "")]
        core.validate()
        assert core.identity == Identity("u1", "s1")  # rule 2
        assert core.presumed_user == "u1" and core.mutations[r].sent  # nothing to re-send
    version = core.refresh("rt", user="u1")
    core.receive(
        json.dumps({"type": "auth_error", "authVersion": version, "code": "refresh_invalid"})
    )
    core.validate()
    assert core.identity is None and core.presumed_user is None
    assert not core.mutations[r].sent  # its result may never come: due again as u1
    assert sent_mutations(core) == []  # ... but never as anonymous


@pytest.mark.parametrize(
    "end",
    [
        {"type": "auth_expired", "expiresAt": 5, "serverTime": 6},
        {"type": "session_revoked", "reason": "revoked"},
        {"type": "auth_error", "code": "token_expired"},
        "reconnect",
    ],
)
def test_mutations_sent_before_an_identity_ended_go_out_again_as_the_same_user(end: Any) -> None:
    core = ready_core()
    signed_in(core)
    r = core.mutate("notes.add", {"text": "x"}, user="u1")
    assert frames(core)[0]["requestId"] == r
    if end == "reconnect":
        core.connection_lost()
        connected(core)
        core.set_ready(True)
    elif end["type"] == "auth_error":
        end["authVersion"] = core.authenticate("stale", user="u1")
        core.receive(json.dumps(end))
    else:
        core.receive(json.dumps(end))
    core.validate()
    assert sent_mutations(core) == []  # anonymous now: waits
    # Back as the same user, in a new session (outcomes are keyed by user): the same id again.
    version = core.refresh("rt", user="u1")
    assert sent_mutations(core) == []  # not behind an unanswered refresh: it may fail
    assert auth_ok(core, version, "u1", session="s2")[1:] == []
    assert sent_mutations(core) == [r]  # the connection is u1 again
    assert sent_mutations(core) == []  # once


def test_a_new_session_of_the_same_user_resends_only_what_was_sent_before_it() -> None:
    core = ready_core()
    signed_in(core)
    before = core.mutate("notes.add", {}, user="u1")
    frames(core)
    version = core.authenticate("another-session", user="u1")
    after = core.mutate("notes.add", {}, user="u1")
    assert [f["type"] for f in frames(core)] == ["authenticate"]  # `after` waits for it
    assert auth_ok(core, version, "u1", session="s2")[1:] == []
    # `before` ran under s1 (its result may be dropped): again; `after` for the first time.
    assert sent_mutations(core) == [before, after]
    # The same session refreshed: nothing ended, nothing is sent again.
    version = core.refresh("rt", user="u1")
    auth_ok(core, version, "u1", session="s2")
    assert sent_mutations(core) == [] and set(core.mutations) == {before, after}


def test_a_pending_mutation_is_never_sent_under_another_user_it_fails_unauthenticated() -> None:
    core = ready_core()
    signed_in(core)
    sent = core.mutate("notes.add", {"text": "sent as u1"}, user="u1")
    frames(core)
    core.connection_lost()
    connected(core)
    core.set_ready(True)
    waiting = core.mutate("notes.add", {"text": "not sent yet"}, user="u1")
    version = core.authenticate("token-of-u2", user="u2")
    assert [f["type"] for f in frames(core)] == ["authenticate"]  # no u1 mutation behind it
    events = auth_ok(core, version, "u2")
    assert events[1:] == [
        MutationDone(sent, error=("unauthenticated", USER_CHANGED_MESSAGE)),
        MutationDone(waiting, error=("unauthenticated", USER_CHANGED_MESSAGE)),
    ]
    assert core.mutations == {} and sent_mutations(core) == []
    # Issued under u2 now: goes out.
    assert sent_mutations(core) == []
    mine = core.mutate("notes.add", {}, user="u2")
    assert [f["requestId"] for f in frames(core)] == [mine]


def test_an_anonymous_mutation_is_not_sent_as_the_user_who_signs_in() -> None:
    core = ready_core()
    r = core.mutate("counter.increment", {}, user=None)
    frames(core)
    version = core.authenticate("token", user="u1")
    events = auth_ok(core, version, "u1")
    assert events[1:] == [MutationDone(r, error=("unauthenticated", USER_CHANGED_MESSAGE))]


def test_signing_out_fails_the_mutations_of_the_user_keeps_anonymous_ones() -> None:
    core = ready_core()
    signed_in(core)
    mine = core.mutate("notes.add", {}, user="u1")
    unbound = core.mutate("notes.add", {})  # issued before the client knew its user
    core.set_ready(False)
    anonymous = core.mutate("counter.increment", {}, user=None)
    assert core.abandon_user_mutations() == [
        MutationDone(mine, error=("unauthenticated", USER_CHANGED_MESSAGE)),
        MutationDone(unbound, error=("unauthenticated", USER_CHANGED_MESSAGE)),
    ]
    assert set(core.mutations) == {anonymous}


def test_an_unbound_mutation_belongs_to_the_user_it_is_first_sent_as() -> None:
    core = ClientCore("client-1", first_request_id=1)
    r = core.mutate("notes.add", {})  # before any connection: the user is not known yet
    connected(core)
    version = core.authenticate("token")  # a token whose user the client cannot read
    core.set_ready(True)
    assert sent_mutations(core) == []  # who will run it? wait for the answer
    auth_ok(core, version, "u1")
    assert sent_mutations(core) == [r]
    assert core.mutations[r].user == "u1"


def test_a_jwt_names_its_user() -> None:
    def jwt(claims: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJFUzI1NiJ9.{body}.c2ln"

    assert token_subject(jwt({"sub": "u-1", "sid": "s"})) == "u-1"
    assert token_subject(jwt({"sid": "s"})) is Principal.UNKNOWN
    assert token_subject(jwt({"sub": 5})) is Principal.UNKNOWN
    assert token_subject("opaque") is Principal.UNKNOWN
    assert token_subject("a.%%%.c") is Principal.UNKNOWN
    assert token_subject("a.bm90IGpzb24.c") is Principal.UNKNOWN


def test_a_new_connection_pipelines_auth_and_subscriptions_behind_connect() -> None:
    core = ready_core()
    signed_in(core)
    q = core.subscribe("notes.mine", {})
    mine = core.mutate("notes.add", {"text": "x"}, user="u1")
    frames(core)
    core.connection_lost()
    theirs = core.mutate("notes.add", {}, user="u2")  # another user's, queued meanwhile
    core.connection_opened()
    version = core.authenticate("token", user="u1")  # before `connected`: rule 1 allows it
    core.pipeline()
    core.validate()
    sent = frames(core)
    assert [f["type"] for f in sent] == ["connect", "authenticate", "subscribe"]
    assert sent[2]["queryId"] == q
    core.receive(json.dumps({"type": "connected", "connectionId": "c2", "serverTime": 1}))
    events = auth_ok(core, version, "u1", session="s1")
    # u2's mutation was never sent as u1: it fails, the user having changed (rule 4).
    assert MutationDone(theirs, error=("unauthenticated", USER_CHANGED_MESSAGE)) in events
    assert sent_mutations(core) == [mine]  # once the connection is u1


def test_an_anonymous_connection_pipelines_without_an_auth_request() -> None:
    core = ClientCore("client-1")
    q = core.subscribe("whoami", {})
    r = core.mutate("counter.increment", {}, user=None)
    core.connection_opened()
    core.pipeline()
    assert [(f["type"], f.get("queryId", f.get("requestId"))) for f in frames(core)] == [
        ("connect", None),
        ("subscribe", q),
        ("mutate", r),
    ]
    core.connection_lost()
    with pytest.raises(RuntimeError):
        core.pipeline()


def test_a_mutation_answered_unauthenticated_after_the_server_ended_its_identity_is_resent() -> (
    None
):
    """The freeze of issue 11's chaos run: the mutate reaches the server after its identity
    expired; the server answers unauthenticated (nothing ran). Not a final answer: the same
    requestId goes out again once the connection is the user again, once."""
    core = ready_core()
    signed_in(core)
    r = core.mutate("counter.increment", {}, user="u1")
    assert sent_mutations(core) == [r]
    core.receive(json.dumps({"type": "auth_expired", "expiresAt": 5, "serverTime": 6}))
    refused = {"code": "unauthenticated", "message": "the identity has ended"}
    assert core.receive(result(r, error=refused)) == []
    assert sent_mutations(core) == []  # anonymous now: waits
    version = core.refresh("rt", user="u1")
    auth_ok(core, version, "u1")
    assert sent_mutations(core) == [r]
    assert core.receive(result(r, value=1, version=3)) == [MutationDone(r, value=1, version=3)]


def test_unauthenticated_while_the_connection_is_the_user_is_final() -> None:
    core = ready_core()
    signed_in(core)
    r = core.mutate("admin.only", {}, user="u1")
    sent_mutations(core)
    refused = {"code": "unauthenticated", "message": "admins only"}
    assert core.receive(result(r, error=refused)) == [
        MutationDone(r, error=("unauthenticated", "admins only"))
    ]
    anonymous = ClientCore("client-2")
    anonymous.connection_opened()
    anonymous.pipeline()
    r = anonymous.mutate("notes.add", {}, user=None)
    assert anonymous.receive(result(r, error=refused)) == [
        MutationDone(r, error=("unauthenticated", "admins only"))
    ]


# ---------------------------------------------------------------------------------- review fixes


def auth_error(core: ClientCore, version: int, code: str) -> list[Any]:
    events = core.receive(json.dumps({"type": "auth_error", "authVersion": version, "code": code}))
    core.validate()
    return events


@pytest.mark.parametrize(
    "end",
    [
        {"type": "auth_expired", "expiresAt": 5, "serverTime": 6},
        {"type": "session_revoked", "reason": "signed_out"},
    ],
)
def test_after_the_server_ended_the_identity_no_mutation_goes_out_until_an_auth_answer(
    end: dict[str, Any],
) -> None:
    """The server answers every mutate `unauthenticated` while lapsed (1.1 rule 1): an
    anonymous mutation waits for the `authenticate` with no token, and goes out after its
    `auth_ok` (sent earlier, it would fail for good)."""
    core = ready_core()
    signed_in(core)
    core.receive(json.dumps(end))
    core.validate()
    assert core.lapsed and core.presumed_user is None
    r = core.mutate("counter.increment", {}, user=None)
    assert sent_mutations(core) == []
    version = core.authenticate(None)
    assert sent_mutations(core) == []  # behind an unanswered auth request
    auth_ok(core, version, None)
    assert not core.lapsed
    assert sent_mutations(core) == [r]


def test_the_lapsed_state_ends_as_the_servers_does() -> None:
    core = ready_core()
    signed_in(core)
    core.receive(json.dumps({"type": "session_revoked", "reason": "revoked"}))
    # unavailable / rate_limited keep it (the server keeps its state, rule 2) ...
    for code in ("unavailable", "rate_limited"):
        auth_error(core, core.refresh("rt", user="u1"), code)
        assert core.lapsed
    # ... any other answer to a request of ours ends it, as does a new connection.
    auth_error(core, core.refresh("rt", user="u1"), "refresh_invalid")
    assert not core.lapsed
    core.receive(json.dumps({"type": "auth_expired", "expiresAt": 5, "serverTime": 6}))
    assert core.lapsed
    core.connection_lost()
    core.validate()
    assert not core.lapsed


def test_subscriptions_behind_a_refused_auth_request_never_deliver_and_are_resent() -> None:
    """A new connection pipelines `authenticate` and its subscriptions; the token is refused.
    The server answers auth_error, then runs the held subscribe as anonymous: that result must
    not reach the application. The subscription moves to a new queryId once the identity
    settles (here: behind the next token)."""
    core = ClientCore("client-1", first_request_id=1)
    q = core.subscribe("whoami", {})
    core.connection_opened()
    v1 = core.authenticate("stale", user="u1")
    core.pipeline()
    assert [f["type"] for f in frames(core)] == ["connect", "authenticate", "subscribe"]
    core.receive(json.dumps({"type": "connected", "connectionId": "c", "serverTime": 1}))
    auth_error(core, v1, "invalid_token")
    # The old queryId is unsubscribed at once; nothing else goes out in the gap.
    assert frames(core) == [{"type": "unsubscribe", "queryId": q}]
    assert core.held
    anonymous = {"type": "transition", "version": 3, "updates": [{"queryId": q, "value": None}]}
    assert core.receive(json.dumps(anonymous)) == []
    core.flush()
    assert core.data_to_send() == []  # held until the identity settles
    v2 = core.authenticate("fresh", user="u1")
    sent = frames(core)
    assert [f["type"] for f in sent] == ["authenticate", "subscribe"]  # pipelined behind it
    moved = sent[1]["queryId"]
    assert moved != q and sent[1]["name"] == "whoami"
    auth_ok(core, v2, "u1")
    assert core.receive(json.dumps(anonymous)) == []  # a late result of the old queryId
    value = {"userId": "u1"}
    first = {"type": "transition", "version": 4, "updates": [{"queryId": moved, "value": value}]}
    assert core.receive(json.dumps(first)) == [QueryUpdate(q, 4, value=value)]  # its handle
    # Unsubscribing by the handle names the queryId the server has.
    core.unsubscribe(q)
    assert frames(core) == [{"type": "unsubscribe", "queryId": moved}]
    core.validate()


@pytest.mark.parametrize("answer", ["unavailable", "another_user"])
def test_subscriptions_behind_an_auth_request_that_gave_another_identity_are_resent(
    answer: str,
) -> None:
    """`unavailable` keeps the identity, but a new connection has none to keep: what was
    pipelined ran anonymous. An auth_ok for a user other than the one expected is no better.
    Either way the subscription goes out again, on a new queryId, once the identity settles
    (here: the shell settles without another request)."""
    core = ClientCore("client-1", first_request_id=1)
    q = core.subscribe("whoami", {})
    core.connection_opened()
    version = core.refresh("rt", user="u1")
    core.pipeline()
    frames(core)
    if answer == "unavailable":
        auth_error(core, version, "unavailable")
    else:
        auth_ok(core, version, "u2")
    assert frames(core) == [{"type": "unsubscribe", "queryId": q}]
    wrong = {"type": "transition", "version": 2, "updates": [{"queryId": q, "value": "x"}]}
    assert core.receive(json.dumps(wrong)) == []
    core.identity_settled()
    (again,) = frames(core)
    assert again["type"] == "subscribe" and again["queryId"] != q


def test_subscriptions_behind_an_answered_as_expected_auth_request_stay() -> None:
    core = ready_core()
    signed_in(core)
    version = core.refresh("rt", user="u1")  # an in-band renewal
    q = core.subscribe("notes.mine", {})  # sent behind it
    frames(core)
    auth_error(core, version, "unavailable")  # the identity held stays (rule 2)
    assert frames(core) == [] and not core.held
    update = {"type": "transition", "version": 2, "updates": [{"queryId": q, "value": []}]}
    assert core.receive(json.dumps(update)) == [QueryUpdate(q, 2, value=[])]
    version = core.authenticate(None)  # becoming anonymous, as expected
    q2 = core.subscribe("whoami", {})
    frames(core)
    auth_ok(core, version, None)
    assert frames(core) == [] and not core.held
    update = {"type": "transition", "version": 3, "updates": [{"queryId": q2, "value": None}]}
    assert core.receive(json.dumps(update)) == [QueryUpdate(q2, 3, value=None)]


def test_a_mutation_issued_while_signing_in_never_runs_in_the_gap_after_a_refused_token() -> None:
    """The gap: the first token was refused (the connection is anonymous, no auth request is
    pending, the core is ready from the pipelining) and the shell fetches another. A mutation
    issued while signing in (unbound) must wait for the user, not run as anonymous."""
    core = ClientCore("client-1", first_request_id=1)
    core.connection_opened()
    v1 = core.authenticate("stale", user="u1")
    core.pipeline()
    r = core.mutate("notes.add", {"text": "x"})  # unbound: the client does not know its user
    frames(core)
    auth_error(core, v1, "token_expired")
    assert core.presumed_user is None and not core.pending_auth and core.ready
    assert sent_mutations(core) == []
    assert core.mutations[r].user is Principal.UNBOUND
    v2 = core.authenticate("fresh", user="u1")
    assert sent_mutations(core) == []
    auth_ok(core, v2, "u1")
    assert sent_mutations(core) == [r]
    assert core.mutations[r].user == "u1"


def test_a_retry_of_a_given_up_request_id_belongs_to_the_user_it_was_sent_as() -> None:
    clock = ManualClock()
    core = ready_core(clock)
    signed_in(core)
    r = core.mutate("notes.add", {"text": "x"}, user="u1")
    frames(core)
    assert core.forget_mutation(r) == "u1"  # the caller timed out: OutcomeUnknown
    assert core.given_up_user(r) == "u1"
    # Another user now (or anonymous): refused, nothing sent, nothing kept.
    for other in ("u2", None):
        with pytest.raises(MutationError) as refused:
            core.mutate("notes.add", {"text": "x"}, user=other, request_id=r)
        assert refused.value.code == "unauthenticated"
        assert core.mutations == {} and core.data_to_send() == []
    # Signing in, user not known yet: it waits for its own user, not the first one to come.
    core.connection_lost()
    connected(core)
    core.set_ready(True)
    assert core.mutate("notes.add", {"text": "x"}, request_id=r) == r
    assert core.mutations[r].user == "u1"
    core.forget_mutation(r)
    # The same user: sent, same requestId.
    signed_in(core, "u1", session="s2")
    assert core.mutate("notes.add", {"text": "x"}, user="u1", request_id=r) == r
    assert sent_mutations(core) == [r]
    core.forget_mutation(r)
    # Once the server has forgotten the outcome (15 minutes), so has the client.
    clock.advance(GIVEN_UP_RETENTION)
    assert core.given_up_user(r) is Principal.UNBOUND
    assert core.mutate("notes.add", {"text": "x"}, user="u2", request_id=r) == r


def test_given_up_mutations_are_remembered_within_a_bound() -> None:
    core = ready_core()
    for _ in range(MAX_GIVEN_UP_MUTATIONS + 5):
        core.forget_mutation(core.mutate("counter.increment", {}, user=None))
    assert len(core._given_up) == MAX_GIVEN_UP_MUTATIONS
    assert core.given_up_user(100) is Principal.UNBOUND  # the oldest went first
    assert core.given_up_user(100 + MAX_GIVEN_UP_MUTATIONS + 4) is None
