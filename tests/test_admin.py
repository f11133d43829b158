"""The administrator's commands against real deployments: ``tether users find``, ``tether sessions
list`` with the live sockets every instance reports, and ``tether sessions revoke --email``.

Two instances share one real Redis; sockets authenticate on both; the commands run as real
processes. Instances heartbeat their live-socket report every 0.5 s here, so a killed instance's
report expires 1.5 s after its last heartbeat (3 intervals, docs/redis.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.realtime.live_sockets import LiveSockets, read_live_sockets
from tether.server.realtime.session_hub import SessionHub
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect as redis_connect
from tether.server.settings import Settings

from tests.harness import REPO_ROOT, ServerProcess, free_port
from tests.sync_client import SyncClient, connect_sync, signin, signup

INTERVAL = "0.5"
#: Generous: the report's TTL is 1.5 s, the wait allows for a slow machine.
WAIT = 20.0


def run_tether(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tether ARGS`` as a real process, with no TETHER_* from the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=REPO_ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def tether(*args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_tether` off the event loop, so the test's sockets keep being served."""
    return await asyncio.to_thread(run_tether, *args)


async def sessions_json(redis_url: str, email: str) -> dict[str, Any]:
    result = await tether("sessions", "list", "--email", email, "--json", "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    listing: dict[str, Any] = json.loads(result.stdout)
    return listing


def live(listing: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Session id → instance id → live sockets, from ``sessions list --json``."""
    return {s["sessionId"]: s["instances"] for s in listing["sessions"]}


async def wait_for_live(
    redis_url: str, email: str, want: Callable[[dict[str, dict[str, int]]], bool]
) -> dict[str, Any]:
    """Poll ``sessions list`` until ``want(live(listing))``; fail after :data:`WAIT` s."""
    deadline = time.monotonic() + WAIT
    while True:
        listing = await sessions_json(redis_url, email)
        if want(live(listing)):
            return listing
        if time.monotonic() > deadline:
            raise AssertionError(f"live sockets never matched; last: {live(listing)}")
        await asyncio.sleep(0.2)


def instance_of(server: ServerProcess) -> Callable[[str], bool]:
    """Whether an instance id (``HOST-PID-RANDOM``) is ``server``'s."""
    return lambda instance: instance.rsplit("-", 2)[1] == str(server.pid)


def per_server(instances: dict[str, int], *servers: ServerProcess) -> list[int]:
    """The live sockets ``instances`` gives each of ``servers`` (0 when absent)."""
    return [sum(n for i, n in instances.items() if instance_of(s)(i)) for s in servers]


async def authenticated(server: ServerProcess, tokens: dict[str, Any]) -> SyncClient:
    client = await connect_sync(server.ws_url)
    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 1})
    await client.expect("auth_ok")
    return client


@pytest.fixture
def two_instances(
    server_factory: Callable[..., ServerProcess],
) -> tuple[ServerProcess, ServerProcess]:
    env = {"TETHER_LIVE_SOCKETS_INTERVAL": INTERVAL}
    return server_factory(env=env), server_factory(env=env)


async def test_sessions_list_counts_live_sockets_per_session_across_instances(
    two_instances: tuple[ServerProcess, ServerProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    a, b = two_instances
    first = await signup(a.base_url)
    email = first["email"]
    second = await signin(b.base_url, email)
    s1, s2 = first["sessionId"], second["sessionId"]
    # Session 1: two sockets on A, one on B. Session 2: one on B. One anonymous socket on each.
    a1 = await authenticated(a, first)
    a2 = await authenticated(a, first)
    b1 = await authenticated(b, first)
    b2 = await authenticated(b, second)
    anonymous = [await connect_sync(a.ws_url), await connect_sync(b.ws_url)]

    listing = await wait_for_live(
        redis_url,
        email,
        lambda got: (
            per_server(got.get(s1, {}), a, b) == [2, 1]
            and per_server(got.get(s2, {}), a, b) == [0, 1]
        ),
    )
    assert listing["userId"] == first["userId"]
    rows = {s["sessionId"]: s for s in listing["sessions"]}
    assert set(rows) == {s1, s2}
    assert rows[s1]["liveSockets"] == 3 and rows[s2]["liveSockets"] == 1
    assert rows[s1]["lastRefresh"] is None
    assert rows[s1]["created"] <= rows[s2]["created"] < rows[s1]["expires"]

    # The table for people, and users find.
    table = await tether("sessions", "list", "--email", email, "--redis-url", redis_url)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()[1:]
    assert header.split() == ["SESSION", "CREATED", "LAST", "REFRESH", "EXPIRES", "LIVE", "SOCKETS"]
    by_id = {line.split()[0]: line.split() for line in lines}
    assert by_id[s1][-1] == "3" and by_id[s2][-1] == "1"
    assert "never" in by_id[s1]
    found = await tether("users", "find", email.upper(), "--json", "--redis-url", redis_url)
    assert found.returncode == 0, found.stderr
    user = json.loads(found.stdout)
    assert user["userId"] == first["userId"] and user["email"] == email
    assert user["sessions"] == 2 and user["liveSockets"] == 4
    assert user["created"] <= time.time() * 1000
    human = await tether("users", "find", email, "--redis-url", redis_url)
    assert human.returncode == 0, human.stderr
    assert first["userId"] in human.stdout.splitlines()[1].split()

    # A socket closes: its count drops.
    await a2.close()
    await wait_for_live(redis_url, email, lambda got: per_server(got.get(s1, {}), a, b) == [1, 1])

    # Redis loses the reports (here: deleted): each instance writes its own again, whole.
    reports = [key async for key in redis_client.scan_iter("tether:live:*")]
    assert len(reports) == 2, reports
    await redis_client.delete(*reports)
    await wait_for_live(
        redis_url,
        email,
        lambda got: (
            per_server(got.get(s1, {}), a, b) == [1, 1]
            and per_server(got.get(s2, {}), a, b) == [0, 1]
        ),
    )

    # revoke --email ends both sessions; every authenticated socket, on both instances, hears it.
    revoke = await tether("sessions", "revoke", "--email", email, "--redis-url", redis_url)
    assert revoke.returncode == 0, revoke.stderr
    assert revoke.stdout.strip() == "ended 2 session(s)"
    for client in (a1, b1, b2):
        revoked = await client.expect("session_revoked")
        assert revoked["reason"] == "revoked"
    for client in anonymous:
        await client.assert_silent(0.3)
    after = await sessions_json(redis_url, email)
    assert after["sessions"] == []
    # The revoked sockets are anonymous now: no instance reports them any more.
    assert not await redis_client.exists(*reports)
    for client in (a1, b1, b2, *anonymous):
        await client.close()


async def test_a_killed_instances_sockets_disappear_from_sessions_list(
    two_instances: tuple[ServerProcess, ServerProcess], redis_url: str
) -> None:
    a, b = two_instances
    tokens = await signup(a.base_url)
    email, sid = tokens["email"], tokens["sessionId"]
    on_a = await authenticated(a, tokens)
    on_b = await authenticated(b, tokens)
    await wait_for_live(redis_url, email, lambda got: per_server(got[sid], a, b) == [1, 1])

    b.kill()  # SIGKILL: no goodbye, its report must expire on its own
    # Gone within the documented TTL (3 x 0.5 s after the last heartbeat); WAIT leaves slack
    # for a slow machine.
    await wait_for_live(redis_url, email, lambda got: per_server(got[sid], a, b) == [1, 0])
    # The live instance keeps its report alive well past that TTL (polled: on a machine so
    # loaded that a heartbeat came late, the instance writes its report again).
    await asyncio.sleep(2.0)
    await wait_for_live(redis_url, email, lambda got: per_server(got[sid], a, b) == [1, 0])
    await on_a.close()
    await on_b.close()


async def test_users_find_and_sessions_list_name_an_unknown_user(redis_url: str) -> None:
    for args in (
        ("users", "find", "nobody@example.com"),
        ("sessions", "list", "--email", "nobody@example.com"),
        ("sessions", "revoke", "--email", "nobody@example.com"),
    ):
        result = await tether(*args, "--redis-url", redis_url)
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.strip() == "tether: no user with e-mail nobody@example.com"
    result = await tether("sessions", "list", "--user", "-no-such-id", "--redis-url", redis_url)
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == "tether: no user with id -no-such-id"
    bad = await tether("users", "find", "not-an-address", "--redis-url", redis_url)
    assert bad.returncode == 1
    assert "not a valid e-mail address" in bad.stderr


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    url = f"redis://admin:s3cret-pw@127.0.0.1:{free_port()}/0"
    for args in (("users", "find", "a@example.com"), ("sessions", "revoke", "--user", "u1")):
        result = run_tether(*args, "--redis-url", url)
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith(
            "tether: cannot reach Redis at redis://admin:***@127.0.0.1:"
        )
        assert "s3cret-pw" not in result.stderr + result.stdout


async def test_a_redis_that_refuses_the_commands_is_one_line_not_a_traceback(
    redis_url: str,
) -> None:
    # A real Redis whose ACL user may connect but not read (or a Redis that stops answering:
    # redis.exceptions.TimeoutError) fails with a RedisError that is no ConnectionError.
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "limited", "on", ">l1mited-pw", "+@connection"
        )
    finally:
        await admin.aclose()
    url = redis_url.replace("redis://", "redis://limited:l1mited-pw@", 1)
    for args in (
        ("users", "find", "a@example.com"),
        ("sessions", "list", "--email", "a@example.com"),
        ("sessions", "revoke", "--email", "a@example.com"),
    ):
        result = await tether(*args, "--redis-url", url)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("tether: Redis at redis://limited:***@"), result.stderr
        assert "l1mited-pw" not in result.stderr + result.stdout


async def test_a_burst_of_binds_is_one_write_and_the_report_follows_the_hub(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    """The hot path (bind, unbind) writes nothing itself: the reporter writes the changed
    sessions' counts in one batch. Here 1,000 binds over 100 sessions, made with no await in
    between, become one HSET."""
    command_client = redis_connect(redis_url)
    sessions = SessionStore(command_client, RefreshTokenCodec(b"\0" * 32), Settings.load({}, {}))
    hub = SessionHub(redis_url, sessions)
    reporter = LiveSockets(command_client, hub, interval=60, instance_id="test-1-abc")
    key = redis_keys.live_sockets("test-1-abc")
    task = asyncio.create_task(reporter.run())
    try:
        deadline = time.monotonic() + WAIT
        while await redis_client.zscore(redis_keys.INSTANCES, "test-1-abc") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await redis_client.config_resetstat()

        listeners = [Listener() for _ in range(1000)]
        for i, listener in enumerate(listeners):
            hub.bind(f"s{i % 100}", listener)

        async def report() -> dict[str, str]:
            fields: dict[str, str] = await redis_client.hgetall(key)
            return fields

        deadline = time.monotonic() + WAIT
        while await report() != {f"s{n}": "10" for n in range(100)}:
            assert time.monotonic() < deadline, await report()
            await asyncio.sleep(0.05)
        stats = await redis_client.info("commandstats")
        assert stats["cmdstat_hset"]["calls"] == 1, stats["cmdstat_hset"]
        assert 0 < await redis_client.pttl(key) <= 180_000

        # Half the sockets of every session go; then every socket of the first 50 sessions.
        for i, listener in enumerate(listeners[:500]):
            hub.unbind(f"s{i % 100}", listener)
        for i, listener in enumerate(listeners[500:]):
            if i % 100 < 50:
                hub.unbind(f"s{i % 100}", listener)
        want = {f"s{n}": "5" for n in range(50, 100)}
        deadline = time.monotonic() + WAIT
        while await report() != want:
            assert time.monotonic() < deadline, await report()
            await asyncio.sleep(0.05)
        found = await read_live_sockets(command_client, ["s0", "s99", "nobody"])
        assert found == {"s0": {}, "s99": {"test-1-abc": 5}, "nobody": {}}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reporter.close()
        await hub.close()
        await command_client.aclose()
    # A clean stop withdraws the report.
    assert not await redis_client.exists(key)
    assert await redis_client.zscore(redis_keys.INSTANCES, "test-1-abc") is None


class Listener:
    def session_ended(self, session_id: str, reason: object) -> None:
        pass
