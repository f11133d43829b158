"""Tether on a real Redis Cluster: three masters, no replicas, started by each test (one test
gives each master a replica and crashes a master).

``TETHER_REDIS_URL=redis+cluster://…`` is a supported deployment
(``server/tether/server/redis/connection.py``, ``docs/redis.md``). Here two server processes share
one cluster (``redis_url`` is overridden below, so ``server_factory`` points every server at it) and
the key file of ``shared_env``, and what crosses keys, slots, nodes and instances is driven end to
end: the HTTP session lifecycle, reactive queries over ``/sync``, and ``session_revoked`` across
instances, also when the event is lost, when every node goes down and comes back, and when the
master the instances subscribe on crashes and its replica takes over.

The helpers are those of the standalone tests, imported, so both deployments are held to the
same checks. ``redis-cli`` creates the cluster: the harness takes the one beside the
``redis-server`` it runs (``make install`` provides both), and fails without one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
from tether.protocol import SessionEndReason
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.realtime.session_hub import SessionHub
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect as redis_connect
from tether.server.settings import Settings

from tests import test_admin as admin
from tests.harness import FAST_ARGON2_ENV, RedisClusterProcess, ServerProcess
from tests.sync_client import auth_post, signin, signup
from tests.test_auth_http import (
    assert_error,
    assert_token_pair,
    bearer,
    client_for,
    new_email,
    refresh,
    sign_in,
    sign_up,
    wait_ready,
)
from tests.test_reactive import Live, Opener, open_live, two_instances, unique, values_of
from tests.test_session_hub import Recorder
from tests.test_sync import authed, expect_revoked, open_sync

pytestmark = pytest.mark.timeout(60)

# The fixtures imported from the standalone tests, which pytest finds here by name: listed so
# that the imports count as used.
__all__ = ["open_live", "open_sync"]

#: A short reuse window (seconds), so that "after the window" comes within the test.
REUSE_WINDOW_S = 2
CLUSTER_ENV = {"TETHER_REFRESH_REUSE_WINDOW": str(REUSE_WINDOW_S)}
#: A Redis user the test makes on every node (no password: the nodes listen on 127.0.0.1 only).
TEST_USER = "tether-test"


#: For ``@pytest.mark.parametrize("cluster", [REPLICATED], indirect=True)``: each master with a
#: replica, and a node timeout short enough that a failover comes within the test (~2 s).
REPLICATED = {"replicas": 1, "node_timeout_ms": 1000}


@pytest.fixture
def redis_url(cluster: RedisClusterProcess) -> str:
    """Overrides the standalone ``redis_url``: ``server_factory`` starts servers on the cluster."""
    return cluster.url


@pytest.fixture
async def cluster_client(cluster: RedisClusterProcess) -> AsyncIterator[redis.asyncio.RedisCluster]:
    client = cluster.client()
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------- auth


async def test_session_lifecycle_over_http_on_two_instances(
    server_factory: Callable[..., ServerProcess],
    cluster_client: redis.asyncio.RedisCluster,
) -> None:
    a, b = two_instances(server_factory, CLUSTER_ENV)
    async with client_for(a) as on_a, client_for(b) as on_b:
        email = new_email()
        pair = await sign_up(on_a, email)
        assert_token_pair(pair)
        # Sign-up wrote keys in several slots (spread over the nodes): all are there.
        session_key = redis_keys.session(pair["sessionId"])
        index_key = redis_keys.user_sessions(pair["userId"])
        assert cluster_client.keyslot(session_key) != cluster_client.keyslot(index_key)
        assert await cluster_client.hget(session_key, "state") == "active"
        assert await cluster_client.smembers(index_key) == {pair["sessionId"]}
        assert await cluster_client.get(redis_keys.email(email)) == pair["userId"]

        # Rotation on B; within the window the old token converges on A to the same pair.
        rotated = await refresh(on_b, pair["refreshToken"])
        assert rotated.status_code == 200, rotated.text
        second = rotated.json()
        assert_token_pair(second)
        assert second["refreshToken"] != pair["refreshToken"]
        assert second["sessionId"] == pair["sessionId"]
        again = await refresh(on_a, pair["refreshToken"])
        assert again.status_code == 200, again.text
        assert again.json()["refreshToken"] == second["refreshToken"]

        # After the window, the old token is reuse: the session ends, on every instance.
        await asyncio.sleep(REUSE_WINDOW_S + 0.3)
        assert_error(await refresh(on_a, pair["refreshToken"]), 401, "refresh_reused")
        assert await cluster_client.hget(session_key, "reason") == "refresh_reused"
        assert_error(await refresh(on_b, second["refreshToken"]), 401, "refresh_invalid")
        assert_error(await on_b.post("/auth/signout", headers=bearer(second)), 401, "invalid_token")

        # A new session: refreshed on A, signed out on B.
        signed_in = await sign_in(on_b, email)
        assert signed_in.status_code == 200, signed_in.text
        third = signed_in.json()
        refreshed = await refresh(on_a, third["refreshToken"])
        assert refreshed.status_code == 200, refreshed.text
        fourth = refreshed.json()
        signed_out = await on_b.post("/auth/signout", headers=bearer(fourth))
        assert signed_out.status_code == 204, signed_out.text
        assert_error(await refresh(on_a, fourth["refreshToken"]), 401, "refresh_invalid")
        assert_error(await on_a.post("/auth/signout", headers=bearer(fourth)), 401, "invalid_token")
        third_key = redis_keys.session(third["sessionId"])
        assert await cluster_client.hget(third_key, "reason") == "signed_out"
        assert await cluster_client.zscore(redis_keys.SESSION_DEADLINES, third["sessionId"]) is None


# ---------------------------------------------------------------------------------- /sync


async def test_counter_on_both_instances_reaches_every_subscriber_in_order(
    server_factory: Callable[..., ServerProcess], open_live: Opener
) -> None:
    a, b = two_instances(server_factory)
    user = await signup(a.base_url)
    name = unique("cluster")
    watchers: list[Live] = []
    writers: list[Live] = []
    for label, server in (("A", a), ("B", b)):
        for role, group in (("watcher", watchers), ("writer", writers)):
            live = await open_live(server, label=f"{role} on {label}")
            await live.authenticate(user["accessToken"], 1)
            await live.subscribe(1, "counter.get", {"name": name})
            assert live.value(1) == 0
            group.append(live)

    # Turn by turn, A then B: every subscriber must hold every value, in order.
    rounds = 10
    for n in range(1, rounds + 1):
        writer = writers[n % 2]
        result = await writer.mutate(n, "counter.increment", {"name": name})
        assert "error" not in result, result
        assert result["value"] == n
        # Read your writes: the writer held its own write when the result arrived.
        version, held = writer.at_result[n]
        assert version >= result["version"], (writer.label, result, version)
        assert held[1] == ("value", n), (writer.label, result, held)
        for live in watchers + writers:
            await live.wait_held(1, ("value", n))
    for live in watchers + writers:
        assert values_of(live, 1) == list(range(rounds + 1)), live.label

    # Both writers at once: every increment counted once, subscribers never go back.
    async def burst(writer: Live, first: int) -> list[dict[str, Any]]:
        ids = range(first, first + 5)
        for request_id in ids:
            await writer.send(
                {
                    "type": "mutate",
                    "requestId": request_id,
                    "name": "counter.increment",
                    "args": {"name": name},
                }
            )
        return [await writer.result(request_id, timeout=30) for request_id in ids]

    results = [r for rs in await asyncio.gather(*(burst(w, 100) for w in writers)) for r in rs]
    acked = [r for r in results if "error" not in r]
    assert all(r["error"]["code"] == "conflict" for r in results if "error" in r), results
    assert sorted(r["value"] for r in acked) == list(range(rounds + 1, rounds + 1 + len(acked)))
    total = rounds + len(acked)
    for live in watchers + writers:
        await live.wait_held(1, ("value", total))
        seen = values_of(live, 1)
        assert seen == sorted(seen), (live.label, seen)


# ---------------------------------------------------------------------------------- revocation


async def acl_on_every_node(cluster: RedisClusterProcess, *rules: str) -> None:
    """``ACL SETUSER`` ``rules`` on every node (ACLs are per node in a cluster)."""
    for port in cluster.ports:
        async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
            await node.execute_command("ACL", "SETUSER", *rules)


async def listeners_by_node(cluster: RedisClusterProcess) -> dict[int, int]:
    """Subscribers of the session-ended channel on each running node, by port."""
    counts: dict[int, int] = {}
    for port in cluster.live_ports:
        async with redis.asyncio.Redis(host="127.0.0.1", port=port) as node:
            [(_, count)] = await node.pubsub_numsub(redis_keys.SESSION_ENDED_CHANNEL)
            counts[port] = int(count)
    return counts


async def session_ended_listeners(cluster: RedisClusterProcess) -> int:
    """Subscribers of the session-ended channel, summed over the running nodes (a PUBLISH
    reaches the subscribers of every node)."""
    return sum((await listeners_by_node(cluster)).values())


async def test_revocations_cross_instances_survive_a_lost_event_and_a_cluster_outage(
    server_factory: Callable[..., ServerProcess],
    open_sync: Any,
    open_live: Opener,
    cluster: RedisClusterProcess,
) -> None:
    a, b = two_instances(server_factory)
    first = await signup(a.base_url)
    second = await signin(b.base_url, first["email"])
    third = await signin(a.base_url, first["email"])
    first_on_a = await authed(open_sync, a, first)
    first_on_b = await authed(open_sync, b, first)
    second_on_b = await authed(open_sync, b, second)
    third_on_a = await authed(open_sync, a, third)

    # Sign-out on A reaches the session's sockets on both instances, and no other session's.
    response = await auth_post(a.base_url, "/auth/signout", token=first["accessToken"])
    assert response.status_code == 204, response.text
    await expect_revoked(first_on_b, "signed_out")
    await expect_revoked(first_on_a, "signed_out")
    await second_on_b.ping()
    await third_on_a.ping()

    # The hubs lose their subscription (the channel is taken from the user they connect as, so
    # Redis drops them and refuses them again), and a session ends meanwhile, by a test user:
    # its event reaches nobody. Then the hubs subscribe again and must find it by re-checking.
    await acl_on_every_node(cluster, TEST_USER, "on", "nopass", "~*", "&*", "+@all")
    await acl_on_every_node(cluster, "default", "resetchannels")
    assert await session_ended_listeners(cluster) == 0
    client = redis_connect(cluster.url.replace("://", f"://{TEST_USER}@", 1))
    try:
        settings = Settings.load(environ=FAST_ARGON2_ENV)
        store = SessionStore(client, RefreshTokenCodec(b"\0" * 32), settings)
        assert await store.end(second["sessionId"], SessionEndReason.SIGNED_OUT)
    finally:
        await client.aclose()
    assert await session_ended_listeners(cluster) == 0  # precondition: the event was lost
    await acl_on_every_node(cluster, "default", "allchannels")
    await expect_revoked(second_on_b, "signed_out", timeout=8)
    await third_on_a.assert_silent(0.5)

    # Every node down: the instances answer "unavailable", sockets stay; then all come back.
    name = unique("outage")
    watcher = await open_live(b, label="watcher on B")
    await watcher.subscribe(1, "counter.get", {"name": name})
    writer = await open_live(a, label="writer on A")
    async with client_for(a) as http_a, client_for(b) as http_b:
        await asyncio.to_thread(cluster.stop)
        assert_error(await refresh(http_a, third["refreshToken"]), 503, "unavailable")
        down = await writer.mutate(1, "counter.increment", {"name": name})
        assert down["error"]["code"] == "unavailable", down
        await third_on_a.ping()
        await asyncio.to_thread(cluster.restart)
        await wait_ready(http_a, 200)
        await wait_ready(http_b, 200)

        # The outage signed nobody out, and the data path works again on both instances.
        refreshed = await refresh(http_a, third["refreshToken"])
        assert refreshed.status_code == 200, refreshed.text
        up = await writer.mutate(2, "counter.increment", {"name": name})
        assert up["value"] == 1, up
        await watcher.wait_held(1, ("value", 1), timeout=10)
        everywhere = await http_b.post("/auth/signout-all", headers=bearer(refreshed.json()))
        assert everywhere.status_code == 204, everywhere.text
    await expect_revoked(third_on_a, "signed_out_everywhere")


async def master_of_key(cluster: RedisClusterProcess, key: str) -> int:
    """The port of the master serving ``key``'s slot, as the first running node sees it."""
    async with redis.asyncio.Redis(host="127.0.0.1", port=cluster.live_ports[0]) as node:
        slot = int(await node.execute_command("CLUSTER KEYSLOT", key))
        for first, last, master, *_ in await node.execute_command("CLUSTER SLOTS"):
            if int(first) <= slot <= int(last):
                return int(master[1])
    raise AssertionError(f"slot of {key!r} is not served")


async def sign_out_through_failover(server: ServerProcess, tokens: dict[str, Any]) -> int:
    """Sign out, again while the instance answers 503 (a key it writes is on a dead master); the
    status of the last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        response = await auth_post(server.base_url, "/auth/signout", token=tokens["accessToken"])
        if response.status_code != 503 or loop.time() > deadline:
            return response.status_code
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("cluster", [REPLICATED], indirect=True, ids=["replicated"])
async def test_revocations_reach_both_instances_after_a_failover_of_their_subscription_node(
    server_factory: Callable[..., ServerProcess],
    open_sync: Any,
    cluster: RedisClusterProcess,
) -> None:
    a, b = two_instances(server_factory)
    # One session whose key lives on a master that survives (its end is written, and its event
    # published, while the instances' subscription is down), and one ended after the failover.
    channel_node = await master_of_key(cluster, redis_keys.SESSION_ENDED_CHANNEL)
    first = await signup(a.base_url)
    email = first["email"]
    for _ in range(20):
        if await master_of_key(cluster, redis_keys.session(first["sessionId"])) != channel_node:
            break
        first = await signin(a.base_url, email)
    else:
        raise AssertionError("no session landed on a master that survives")
    second = await signin(b.base_url, email)
    sockets = {
        "first": [await authed(open_sync, a, first), await authed(open_sync, b, first)],
        "second": [await authed(open_sync, a, second), await authed(open_sync, b, second)],
    }

    # Both hubs subscribe on the master of the channel's slot.
    assert cluster.role(channel_node) == "master"
    assert await listeners_by_node(cluster) == {
        port: (2 if port == channel_node else 0) for port in cluster.ports
    }

    # No session has ended yet: the script that ends one is on no node, and must reach the one
    # it runs on while a master is down.
    # That master crashes. Before its replica takes over, the first session ends (on a master
    # that lives): its event reaches no instance.
    await asyncio.to_thread(cluster.kill_node, channel_node)
    # Answered at once, though the deadline index may be on the dead master: the session has
    # ended, and the stale entry is the sweep's to drop.
    response = await auth_post(a.base_url, "/auth/signout", token=first["accessToken"])
    assert response.status_code == 204, response.text
    assert await session_ended_listeners(cluster) == 0  # precondition: the event was lost
    async with redis.asyncio.Redis(
        host="127.0.0.1", port=await master_of_key(cluster, redis_keys.session(first["sessionId"]))
    ) as node:
        assert await node.hget(redis_keys.session(first["sessionId"]), "state") == b"ended"

    # The replica takes over; both hubs subscribe again, on it, and their re-check finds the
    # first session ended.
    await asyncio.to_thread(cluster.wait_failed_over, channel_node)
    for socket in sockets["first"]:
        await expect_revoked(socket, "signed_out", timeout=8)
    promoted = await master_of_key(cluster, redis_keys.SESSION_ENDED_CHANNEL)
    assert promoted != channel_node
    assert await listeners_by_node(cluster) == {
        port: (2 if port == promoted else 0) for port in cluster.live_ports
    }

    # A session ended after the failover reaches both instances as an event, as before it.
    assert await sign_out_through_failover(b, second) == 204
    for socket in sockets["second"]:
        await expect_revoked(socket, "signed_out", timeout=5)


async def test_hub_retries_quietly_while_no_node_answers_then_catches_up(
    cluster: RedisClusterProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_connect(cluster.url)
    store = SessionStore(
        client, RefreshTokenCodec(b"\0" * 32), Settings.load(environ=FAST_ARGON2_ENV)
    )
    hub = SessionHub(cluster.url, store)
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.ready.wait(), 5)
        sid = (await store.create("u1")).session_id
        listener = Recorder()
        hub.bind(sid, listener)

        # Every node down: each retry's layout query fails too. One warning for the outage,
        # then quiet retries; the loop goes on.
        caplog.set_level(logging.DEBUG, logger="tether.session_hub")
        await asyncio.to_thread(cluster.stop)

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "subscription failed" in r.getMessage()]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(failures()) < 4:
            assert loop.time() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert [r.levelno for r in failures()][:4] == [logging.WARNING] + [logging.DEBUG] * 3
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert not task.done()

        # The cluster comes back; a session ended then reaches the hub (event or re-check).
        await asyncio.to_thread(cluster.restart)
        assert await store.end(sid, SessionEndReason.SIGNED_OUT)
        await listener.wait(8)
        assert listener.calls == [(sid, SessionEndReason.SIGNED_OUT)]
    finally:
        await asyncio.wait_for(hub.close(), 5)
        await asyncio.wait_for(task, 1)
        await client.aclose()


# ---------------------------------------------------------------------------------- admin


async def test_sessions_list_and_revoke_by_email_on_a_cluster(
    server_factory: Callable[..., ServerProcess],
    cluster: RedisClusterProcess,
    cluster_client: redis.asyncio.RedisCluster,
) -> None:
    """The live-socket reports (one hash per instance, each its own slot) and the sessions (one
    slot each) are read across nodes by one ``tether sessions list``; ``revoke --email`` ends
    every session of the user."""
    env = {**CLUSTER_ENV, "TETHER_LIVE_SOCKETS_INTERVAL": admin.INTERVAL}
    a, b = two_instances(server_factory, env)
    first = await signup(a.base_url)
    email = first["email"]
    second = await signin(b.base_url, email)
    s1, s2 = first["sessionId"], second["sessionId"]
    sockets = [
        await admin.authenticated(a, first),
        await admin.authenticated(b, first),
        await admin.authenticated(b, second),
    ]
    reports = [redis_keys.live_sockets(f"x-{n}") for n in range(2)]
    assert cluster_client.keyslot(reports[0]) != cluster_client.keyslot(reports[1])

    await admin.wait_for_live(
        cluster.url,
        email,
        lambda got: (
            admin.per_server(got.get(s1, {}), a, b) == [1, 1]
            and admin.per_server(got.get(s2, {}), a, b) == [0, 1]
        ),
    )
    revoke = await admin.tether("sessions", "revoke", "--email", email, "--redis-url", cluster.url)
    assert revoke.returncode == 0, revoke.stderr
    assert revoke.stdout.strip() == "ended 2 session(s)"
    for client in sockets:
        assert (await client.expect("session_revoked"))["reason"] == "revoked"
        await client.close()
    assert (await admin.sessions_json(cluster.url, email))["sessions"] == []
