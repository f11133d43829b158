"""``/sync`` end to end: real ``redis-server``, real server processes, a real WebSocket client.

Where the behaviour spans instances (expiry of a token minted elsewhere, revocations, a Redis
restart, draining) a test runs two server processes on one Redis: tokens are minted over HTTP on
instance A and used on a socket of instance B. Limits that live in one connection use one server.

Times: auth frames are checked on the server's own clock (``serverTime`` against ``expiresAt``),
so the tolerance below measures how late the server's timers fire, not the test's scheduling.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from tether.protocol import SessionEndReason
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore
from tether.server.compat.uvicorn import LINGER_MAX_BYTES
from tether.server.realtime.endpoint import CLOSE_TIMEOUT, DRAIN_REASON
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect as redis_connect
from tether.server.settings import Settings
from tether.server.tasks import TASK_STOP_TIMEOUT

from tests.harness import FAST_ARGON2_ENV, REPO_ROOT, RedisProcess, ServerProcess
from tests.sync_client import SyncClient, auth_post, connect_sync, signin, signup

pytestmark = pytest.mark.timeout(60)

#: How late (ms) a pushed auth frame may be after the instant it announces.
TIMER_TOLERANCE_MS = 300
#: Short lifetimes: a 3 s token, its notice 1 s before exp, identity over 1 s after exp.
EXPIRY_ENV = {"TETHER_ACCESS_TTL": "3", "TETHER_EXPIRY_NOTICE": "1", "TETHER_CLOCK_LEEWAY": "1"}
#: Seconds within which a revocation reaches a socket when nothing is wrong (generous).
REVOCATION_BOUND = 3.0

Opener = Callable[..., Awaitable[SyncClient]]


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture
async def open_sync() -> AsyncIterator[Opener]:
    """``await open_sync(ws_url, **kwargs)``: :func:`connect_sync`, closed after the test."""
    opened: list[SyncClient] = []

    async def open_(ws_url: str, **kwargs: Any) -> SyncClient:
        client = await connect_sync(ws_url, **kwargs)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)


def two_instances(
    server_factory: Callable[..., ServerProcess], env: dict[str, str] | None = None
) -> tuple[ServerProcess, ServerProcess]:
    """Instances A and B of one deployment: one Redis, one key file, one issuer."""
    return server_factory(env=env), server_factory(env=env)


async def authed(opener: Opener, server: ServerProcess, tokens: dict[str, Any]) -> SyncClient:
    """A socket on ``server`` subscribed to ``whoami`` (queryId 1) and authenticated with
    ``tokens``; the subscription's value has moved from null to the user."""
    client = await opener(server.ws_url)
    await client.send({"type": "subscribe", "queryId": 1, "name": "whoami", "args": {}})
    first = await client.expect("transition")
    assert first["updates"] == [{"queryId": 1, "value": None}]
    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 1})
    ok = await client.expect("auth_ok")
    assert ok["authVersion"] == 1
    assert ok["identity"] == {"userId": tokens["userId"], "sessionId": tokens["sessionId"]}
    assert ok["expiresAt"] == tokens["expiresAt"]
    assert "tokens" not in ok  # nothing was minted: an access token was presented
    signed_in = await client.expect("transition")
    assert signed_in["updates"] == [{"queryId": 1, "value": {"userId": tokens["userId"]}}]
    return client


async def expect_revoked(
    client: SyncClient, reason: str, timeout: float = REVOCATION_BOUND
) -> None:
    """``session_revoked`` with ``reason``, then whoami (queryId 1) goes null; nothing else."""
    revoked = await client.expect("session_revoked", timeout)
    assert revoked["reason"] == reason
    anonymous = await client.expect("transition")
    assert anonymous["updates"] == [{"queryId": 1, "value": None}]


def assert_on_time(frame: dict[str, Any], due_ms: int) -> None:
    """``frame`` was sent at ``due_ms`` on the server's clock: never before, at most a little
    after."""
    late = frame["serverTime"] - due_ms
    assert 0 <= late <= TIMER_TOLERANCE_MS, f"{frame['type']} {late} ms after its instant: {frame}"


def alter(token: str, position: int) -> str:
    """``token`` with the character at ``position`` replaced (base64url stays base64url).

    Not the last character: its low bits may be padding that decoders ignore.
    """
    old = token[position]
    new = "A" if old != "A" else "B"
    return token[:position] + new + token[position + 1 :]


async def refresh_http(base_url: str, refresh_token: str) -> httpx.Response:
    return await auth_post(base_url, "/auth/refresh", json={"refreshToken": refresh_token})


# ---------------------------------------------------------------------------------- expiry


async def test_identity_gets_auth_expiring_then_auth_expired_on_time(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory, EXPIRY_ENV)
    tokens = await signup(a.base_url)
    exp = tokens["expiresAt"]
    client = await authed(open_sync, b, tokens)

    expiring = await client.expect("auth_expiring", timeout=4)
    assert expiring["expiresAt"] == exp
    assert_on_time(expiring, exp - 1000)  # TETHER_EXPIRY_NOTICE before exp

    expired = await client.expect("auth_expired", timeout=4)
    assert expired["expiresAt"] == exp
    assert_on_time(expired, exp + 1000)  # exp + TETHER_CLOCK_LEEWAY

    anonymous = await client.expect("transition")
    assert anonymous["updates"] == [{"queryId": 1, "value": None}]
    # Anonymous now: a new subscription runs without the identity, and the socket stays open.
    await client.send({"type": "subscribe", "queryId": 2, "name": "whoami", "args": {}})
    later = await client.expect("transition")
    assert later["updates"] == [{"queryId": 2, "value": None}]
    await client.ping()


async def test_in_band_refresh_keeps_the_socket_authenticated_for_five_lifetimes(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    ttl_ms = 2000
    env = {"TETHER_ACCESS_TTL": "2", "TETHER_EXPIRY_NOTICE": "1", "TETHER_CLOCK_LEEWAY": "1"}
    a, b = two_instances(server_factory, env)
    tokens = await signup(a.base_url)
    identity = {"userId": tokens["userId"], "sessionId": tokens["sessionId"]}
    client = await authed(open_sync, b, tokens)

    # Five lifetimes from the first token's iat; the client sends nothing but `refresh`.
    first_exp = tokens["expiresAt"]
    until = first_exp - ttl_ms + 5 * ttl_ms
    exp, refresh_token, version, rounds = first_exp, tokens["refreshToken"], 1, 0
    while True:
        # Exactly this, in this order: no auth_expired, and no transition for whoami.
        expiring = await client.expect("auth_expiring", timeout=3)
        assert expiring["expiresAt"] == exp
        assert_on_time(expiring, exp - 1000)
        if expiring["serverTime"] >= until:
            break
        version += 1
        await client.send(
            {"type": "refresh", "refreshToken": refresh_token, "authVersion": version}
        )
        ok = await client.expect("auth_ok")
        assert ok["authVersion"] == version
        assert ok["identity"] == identity
        minted = ok["tokens"]
        assert set(minted) == {"accessToken", "refreshToken", "expiresAt"}
        assert minted["expiresAt"] == ok["expiresAt"] > exp
        assert minted["refreshToken"] != refresh_token  # rotated
        exp, refresh_token = ok["expiresAt"], minted["refreshToken"]
        rounds += 1
    assert rounds >= 5
    assert expiring["serverTime"] > first_exp + 1000  # the first identity would have ended

    # Still authenticated as the same user; queryId 1 was never re-sent.
    await client.send({"type": "subscribe", "queryId": 2, "name": "whoami", "args": {}})
    fresh = await client.expect("transition")
    assert fresh["updates"] == [{"queryId": 2, "value": {"userId": tokens["userId"]}}]
    # The last access token minted in-band is a real one: it signs the session out over HTTP.
    response = await auth_post(a.base_url, "/auth/signout", token=minted["accessToken"])
    assert response.status_code == 204
    revoked = await client.expect("session_revoked")
    assert revoked["reason"] == "signed_out"
    anonymous = await client.expect("transition")
    assert sorted(anonymous["updates"], key=lambda u: u["queryId"]) == [
        {"queryId": 1, "value": None},
        {"queryId": 2, "value": None},
    ]


# ---------------------------------------------------------------------------------- revocation


async def test_sign_out_on_one_instance_revokes_the_socket_on_the_other(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    other_session = await signin(a.base_url, tokens["email"])
    on_b = await authed(open_sync, b, tokens)
    bystander = await authed(open_sync, b, other_session)  # same user, another session

    response = await auth_post(a.base_url, "/auth/signout", token=tokens["accessToken"])
    assert response.status_code == 204
    await expect_revoked(on_b, "signed_out")
    await bystander.assert_silent(0.5)
    await bystander.ping()


async def test_sign_out_all_revokes_every_session_of_the_user_on_every_instance(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory)
    first = await signup(a.base_url)
    second = await signin(b.base_url, first["email"])
    stranger = await signup(a.base_url)
    on_a = await authed(open_sync, a, first)
    on_b = await authed(open_sync, b, second)
    strangers_socket = await authed(open_sync, b, stranger)

    response = await auth_post(b.base_url, "/auth/signout-all", token=second["accessToken"])
    assert response.status_code == 204
    await expect_revoked(on_a, "signed_out_everywhere")
    await expect_revoked(on_b, "signed_out_everywhere")
    await strangers_socket.assert_silent(0.5)


async def test_reused_refresh_token_revokes_the_sessions_live_sockets(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    other_session = await signin(a.base_url, tokens["email"])
    on_a = await authed(open_sync, a, tokens)
    on_b = await authed(open_sync, b, tokens)
    bystander = await authed(open_sync, a, other_session)

    child = await refresh_http(a.base_url, tokens["refreshToken"])
    assert child.status_code == 200, child.text
    grandchild = await refresh_http(b.base_url, child.json()["refreshToken"])
    assert grandchild.status_code == 200, grandchild.text
    # The grandparent is neither current nor previous: reuse, the whole session ends.
    reused = await refresh_http(a.base_url, tokens["refreshToken"])
    assert reused.status_code == 401
    assert reused.json()["error"] == "refresh_reused"

    await expect_revoked(on_a, "refresh_reused")
    await expect_revoked(on_b, "refresh_reused")
    await bystander.assert_silent(0.5)


async def test_cli_revoke_of_a_session_reaches_both_instances(
    server_factory: Callable[..., ServerProcess], open_sync: Opener, redis_url: str
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    other_session = await signin(a.base_url, tokens["email"])
    on_a = await authed(open_sync, a, tokens)
    on_b = await authed(open_sync, b, tokens)
    bystander = await authed(open_sync, b, other_session)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    command = [sys.executable, "-m", "tether", "sessions", "revoke"]
    command += ["--session", tokens["sessionId"], "--redis-url", redis_url]
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert "ended 1 session" in out.decode()

    await expect_revoked(on_a, "revoked")
    await expect_revoked(on_b, "revoked")
    await bystander.assert_silent(0.5)


async def test_session_ended_while_redis_restarts_is_still_revoked_on_both_instances(
    server_factory: Callable[..., ServerProcess], open_sync: Opener, redis_proc: RedisProcess
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    other_session = await signin(a.base_url, tokens["email"])
    on_a = await authed(open_sync, a, tokens)
    on_b = await authed(open_sync, b, tokens)
    bystander = await authed(open_sync, b, other_session)

    redis_proc.stop()
    # Sockets outlive the outage: answering a ping needs no Redis.
    await on_a.ping()
    await on_b.ping()
    # Long enough for the hubs' reconnect backoff to reach its cap (2 s): after the restart
    # they come back only after a delay, and the event below is published to nobody.
    await asyncio.sleep(3.0)
    redis_proc.restart()

    redis = redis_connect(redis_proc.url)
    try:
        listeners = dict(await redis.pubsub_numsub(redis_keys.SESSION_ENDED_CHANNEL))
        store = SessionStore(
            redis, RefreshTokenCodec(b"\0" * 32), Settings.load(environ=FAST_ARGON2_ENV)
        )
        # The same call HTTP sign-out makes: tombstone plus event, in one script.
        assert await store.end(tokens["sessionId"], SessionEndReason.SIGNED_OUT)
    finally:
        await redis.aclose()
    # Precondition: the event was lost, so what follows proves the re-check after reconnecting.
    assert listeners[redis_keys.SESSION_ENDED_CHANNEL] == 0, listeners

    await expect_revoked(on_a, "signed_out", timeout=8)
    await expect_revoked(on_b, "signed_out", timeout=8)
    await bystander.assert_silent(0.5)
    await bystander.ping()


# ---------------------------------------------------------------------------------- auth errors


async def test_garbage_or_forged_tokens_answer_invalid_token_and_the_socket_stays_open(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory()
    tokens = await signup(server.base_url)
    client = await authed(open_sync, server, tokens)
    header, payload, signature = tokens["accessToken"].split(".")
    forged_signature = f"{header}.{payload}.{alter(signature, len(signature) // 2)}"
    unsigned = f"{header}.{payload}."

    # The first failure ends the identity: whoami goes null.
    await client.send({"type": "authenticate", "token": "garbage", "authVersion": 2})
    error = await client.expect("auth_error")
    assert (error["code"], error["authVersion"]) == ("invalid_token", 2)
    anonymous = await client.expect("transition")
    assert anonymous["updates"] == [{"queryId": 1, "value": None}]
    await client.ping()

    for version, token in enumerate((forged_signature, unsigned, "a.b.c"), start=3):
        await client.send({"type": "authenticate", "token": token, "authVersion": version})
        error = await client.expect("auth_error")
        assert (error["code"], error["authVersion"]) == ("invalid_token", version), token
        await client.ping()  # open, and nothing else was sent (already anonymous)


async def test_expired_token_is_accepted_within_the_leeway_then_refused_as_token_expired(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    env = {"TETHER_ACCESS_TTL": "2", "TETHER_EXPIRY_NOTICE": "1", "TETHER_CLOCK_LEEWAY": "1"}
    a, b = two_instances(server_factory, env)
    tokens = await signup(a.base_url)
    exp = tokens["expiresAt"]
    client = await open_sync(b.ws_url)

    # Past exp but inside the leeway: accepted, and the identity ends at exp + leeway.
    await asyncio.sleep(max(0.0, (exp + 300) / 1000 - time.time()))
    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 1})
    ok = await client.expect("auth_ok")
    assert ok["expiresAt"] == exp
    expiring = await client.expect("auth_expiring")  # once per identity, at once when late
    assert expiring["expiresAt"] == exp
    expired = await client.expect("auth_expired", timeout=2)
    assert_on_time(expired, exp + 1000)

    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 2})
    error = await client.expect("auth_error")
    assert (error["code"], error["authVersion"]) == ("token_expired", 2)
    await client.ping()


async def test_token_of_a_signed_out_session_answers_session_revoked(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    response = await auth_post(a.base_url, "/auth/signout", token=tokens["accessToken"])
    assert response.status_code == 204
    client = await open_sync(b.ws_url)

    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 1})
    error = await client.expect("auth_error")
    assert (error["code"], error["authVersion"]) == ("session_revoked", 1)
    await client.send({"type": "refresh", "refreshToken": tokens["refreshToken"], "authVersion": 2})
    error = await client.expect("auth_error")
    assert (error["code"], error["authVersion"]) == ("refresh_invalid", 2)
    await client.ping()


async def test_forged_refresh_token_answers_refresh_invalid_and_touches_nothing(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    a, b = two_instances(server_factory)
    tokens = await signup(a.base_url)
    on_b = await authed(open_sync, b, tokens)
    on_a = await authed(open_sync, a, tokens)  # the same session on the other instance
    real = tokens["refreshToken"]
    forgeries = [alter(real, len(real) - 10), alter(real, len(real) // 2), "rt1.nope.nope.nope"]

    for version, forged in enumerate(forgeries, start=2):
        await on_b.send({"type": "refresh", "refreshToken": forged, "authVersion": version})
        error = await on_b.expect("auth_error")
        assert (error["code"], error["authVersion"]) == ("refresh_invalid", version), forged
        if version == 2:  # a failed refresh leaves the connection anonymous
            anonymous = await on_b.expect("transition")
            assert anonymous["updates"] == [{"queryId": 1, "value": None}]
        await on_b.ping()

    # Rule 4: nothing changed. The session's other socket kept its identity, and the real
    # refresh token still rotates.
    await on_a.assert_silent(0.3)
    response = await refresh_http(a.base_url, real)
    assert response.status_code == 200, response.text
    assert response.json()["sessionId"] == tokens["sessionId"]


async def test_auth_version_must_grow(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory()
    tokens = await signup(server.base_url)
    client = await open_sync(server.ws_url)
    await client.send({"type": "subscribe", "queryId": 1, "name": "whoami", "args": {}})
    await client.expect("transition")
    await client.send({"type": "authenticate", "token": tokens["accessToken"], "authVersion": 5})
    await client.expect("auth_ok")
    await client.expect("transition")

    stale = [
        {"type": "authenticate", "token": tokens["accessToken"], "authVersion": 5},
        {"type": "authenticate", "token": None, "authVersion": 4},
        {"type": "refresh", "refreshToken": tokens["refreshToken"], "authVersion": 0},
    ]
    for frame in stale:
        await client.send(frame)
        error = await client.expect("error")
        assert error["code"] == "bad_message", frame
    # None of them touched the identity: still signed in, no transition was sent.
    await client.ping()

    await client.send({"type": "authenticate", "token": None, "authVersion": 6})
    ok = await client.expect("auth_ok")
    assert (ok["authVersion"], ok["identity"]) == (6, None)
    anonymous = await client.expect("transition")
    assert anonymous["updates"] == [{"queryId": 1, "value": None}]


# ---------------------------------------------------------------------------------- upgrade


async def _upgrade_status(ws_url: str, origin: str | None, host: str | None = None) -> int:
    """101 when the upgrade is accepted (and ``connect`` works), else the HTTP status. With
    ``host``, the request names that ``Host`` (still sent to the server of ``ws_url``)."""
    options: dict[str, Any] = {}
    if host is not None:
        target = urllib.parse.urlsplit(ws_url)
        options = {"host": target.hostname, "port": target.port}
        ws_url = target._replace(netloc=host).geturl()
    try:
        client = await connect_sync(ws_url, origin=origin, **options)
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    try:
        await client.ping()
    finally:
        await client.close()
    return 101


async def test_origins_are_checked_at_the_upgrade(
    server_factory: Callable[..., ServerProcess],
) -> None:
    default = server_factory()
    strict = server_factory(env={"TETHER_ALLOWED_ORIGINS": "https://app.example"})

    assert await _upgrade_status(default.ws_url, "https://evil.example") == 403
    assert await _upgrade_status(default.ws_url, "null") == 403
    assert await _upgrade_status(default.ws_url, "http://localhost:3000") == 101
    assert await _upgrade_status(default.ws_url, f"http://127.0.0.1:{default.port}") == 101
    assert await _upgrade_status(default.ws_url, None) == 101

    # DNS rebinding: a page on a name the attacker points at this server sends that name as
    # both Host and Origin. "self" is the server's own origin only for an IP or loopback Host,
    # or TETHER_PUBLIC_URL's origin.
    rebound = f"evil.example:{default.port}"
    assert await _upgrade_status(default.ws_url, f"http://{rebound}", host=rebound) == 403
    named = server_factory(env={"TETHER_PUBLIC_URL": "https://app.example"})
    assert await _upgrade_status(named.ws_url, "https://app.example", host="app.example") == 101
    assert await _upgrade_status(named.ws_url, f"http://{rebound}", host=rebound) == 403

    assert await _upgrade_status(strict.ws_url, "https://app.example") == 101
    assert await _upgrade_status(strict.ws_url, "http://localhost:3000") == 403
    assert await _upgrade_status(strict.ws_url, "https://evil.example") == 403
    assert await _upgrade_status(strict.ws_url, None) == 101


# ---------------------------------------------------------------------------------- limits


def _ping_of_size(size: int, pad: str = "x") -> str:
    """A ``ping`` frame of exactly ``size`` UTF-8 bytes, padded with ``pad`` (1 or 2 bytes)."""
    empty = json.dumps({"type": "ping", "pad": ""}, ensure_ascii=False)
    room = size - len(empty.encode())
    width = len(pad.encode())
    text = json.dumps(
        {"type": "ping", "pad": pad * (room // width) + "x" * (room % width)}, ensure_ascii=False
    )
    assert len(text.encode()) == size
    return text


async def test_a_frame_over_max_message_bytes_closes_with_1009(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory(env={"TETHER_MAX_MESSAGE_BYTES": "4096"})
    client = await open_sync(server.ws_url)
    await client.send_raw(_ping_of_size(4096))
    await client.expect("pong")
    await client.send_raw(_ping_of_size(4097))
    assert await client.wait_closed() == 1009

    binary = await open_sync(server.ws_url)
    await binary.send_raw(b"\0" * 4097)
    assert await binary.wait_closed() == 1009


async def test_max_message_bytes_counts_utf8_bytes_not_characters(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory(env={"TETHER_MAX_MESSAGE_BYTES": "4096"})
    client = await open_sync(server.ws_url)
    frame = _ping_of_size(6000, pad="é")  # 6000 bytes, about 3000 characters
    assert len(frame) <= 4096 < len(frame.encode())
    await client.send_raw(frame)
    assert await client.wait_closed(allow=()) == 1009


#: Longest wait for the server to end a connection it refused: generous for a slow machine.
PATIENCE = 20.0


def _masked_frame(opcode: int, payload: bytes, declared: int | None = None) -> bytes:
    """A final client frame (masked, as a client must) carrying ``payload``; its header declares
    ``declared`` bytes (default: the payload's length), so a frame may be sent in parts."""
    length = len(payload) if declared is None else declared
    if length < 126:
        head = bytes([0x80 | opcode, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _peer_ended(sock: socket.socket, timeout: float) -> bool:
    """Has the peer half-closed (FIN) or reset the connection within ``timeout`` seconds? Seen
    without reading: what the server sent stays unread in this socket."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(timeout * 1000))


#: An oversize frame's declared length, and the part of it a client below sends at first.
OVERSIZE_DECLARED, OVERSIZE_FIRST = 1 << 20, 1024


def _open_raw_ws(port: int) -> socket.socket:
    """A WebSocket to ``/sync`` on a bare blocking socket, its handshake done."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /sync HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # the server sends nothing more unasked
        chunk = sock.recv(1)
        assert chunk, f"closed during the handshake: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _open_oversize(port: int) -> tuple[socket.socket, bytes]:
    """A WebSocket on a bare blocking socket that has sent the first part of a text frame over
    the server's 4096-byte limit; returns it and the frame's remaining bytes."""
    sock = _open_raw_ws(port)
    sock.sendall(_masked_frame(0x1, b"x" * OVERSIZE_FIRST, declared=OVERSIZE_DECLARED))
    return sock, b"y" * (OVERSIZE_DECLARED - OVERSIZE_FIRST)


def _send_until_the_server_ends(sock: socket.socket, rest: bytes) -> None:
    """Send ``rest`` (64 KiB at a time), then small frames, reading nothing, until the server
    has ended its side (a FIN or a reset); a reset fails the test."""
    junk = _masked_frame(0x1, json.dumps({"type": "ping"}).encode())
    deadline = time.monotonic() + PATIENCE
    while not _peer_ended(sock, 0.0 if rest else 0.01):
        assert time.monotonic() < deadline, "the server never ended its side"
        try:
            sock.sendall(rest[:65536] if rest else junk)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AssertionError(f"the server reset the connection: {exc!r}") from None
        rest = rest[65536:]


def test_the_1009_close_frame_reaches_a_client_that_keeps_sending_after_the_oversize_frame(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # A client that sends an oversize frame does not know it is refused until it reads the
    # close frame: it may well still be sending (the rest of that frame, frames queued behind
    # it). A server that closes its socket with such bytes unread, or that gets some after it
    # closed, answers them with a reset; the client's next write then fails, and asyncio (the
    # websockets client's transport) ends the connection at once without reading the close
    # frame waiting in its socket: the client sees 1006, not the 1009 the contract promises.
    # This client sends the frame's first part, then keeps sending (the rest, then small
    # frames), reading nothing until the server has ended its side, and a few frames after
    # that: no write may fail, and the close frame must be read, then the end of the stream.
    server = server_factory(env={"TETHER_MAX_MESSAGE_BYTES": "4096"})
    sock, rest = _open_oversize(server.port)
    try:
        _send_until_the_server_ends(sock, rest)
        junk = _masked_frame(0x1, json.dumps({"type": "ping"}).encode())
        try:
            for _ in range(8):
                sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AssertionError(f"the server reset the connection: {exc!r}") from None
        received = bytearray()
        while chunk := sock.recv(65536):  # a reset fails the test here too
            received += chunk
        opcode, payload = _last_frame(bytes(received))
        assert opcode == 0x8, f"no close frame before the end of the stream: {bytes(received)!r}"
        assert int.from_bytes(payload[:2], "big") == 1009, payload
    finally:
        sock.close()


def _loopback_buffer_limit() -> int:
    """Most bytes the kernels can hold on a loopback TCP connection between a client's writes
    and the server's reads: the client's send buffer and the server's receive buffer, each at
    most its autotuning maximum (``tcp_wmem``, ``tcp_rmem``; Linux)."""
    maximum = {}
    for name in ("tcp_rmem", "tcp_wmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as limits:
            maximum[name] = int(limits.read().split()[2])
    return maximum["tcp_rmem"] + maximum["tcp_wmem"]


@pytest.mark.parametrize("bound", ["grace", "bytes"])
def test_a_client_that_never_stops_sending_after_the_oversize_frame_loses_its_socket(
    server_factory: Callable[..., ServerProcess], bound: str
) -> None:
    # The server reads and discards what follows a 1009 until the client ends its stream, but
    # not for ever: for at most TETHER_CLOSE_GRACE seconds (a client sending slowly) and
    # LINGER_MAX_BYTES (a client sending fast), then it drops the socket.
    grace = 2 if bound == "grace" else 60
    server = server_factory(
        env={"TETHER_MAX_MESSAGE_BYTES": "4096", "TETHER_CLOSE_GRACE": str(grace)}
    )
    sock, rest = _open_oversize(server.port)
    try:
        _send_until_the_server_ends(sock, rest)
        ended = time.monotonic()
        # Slowly: a small frame every 0.1 s. Fast: 1 MiB a write (the kernels' buffers hold a
        # few MiB besides what the server discards).
        chunk = (
            _masked_frame(0x1, json.dumps({"type": "ping"}).encode())
            if bound == "grace"
            else _masked_frame(0x2, b"z" * (1 << 20))
        )
        # Slow: dropped within the grace. Fast: well before it, once the bytes are over.
        limit = grace + 5 if bound == "grace" else grace / 2
        sent = 0
        try:
            while time.monotonic() - ended < limit:
                sock.sendall(chunk)
                sent += len(chunk)
                if bound == "grace":
                    time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError(f"still held {limit} s after the 1009 ({sent} bytes sent)")
        # What the server discards, what the kernels' buffers can hold besides (derived from
        # this machine's limits, not assumed), and the writes in flight.
        assert sent < LINGER_MAX_BYTES + _loopback_buffer_limit() + 2 * len(chunk), sent
    finally:
        sock.close()


#: Receive buffers for a client that stops reading: as small as the kernel allows (the server's
#: writes back up almost at once) and as large as it allows (the kernels take everything the
#: server writes, so its own buffer reads empty while the close handshake never ends).
SMALL_RCVBUF, LARGE_RCVBUF = 4096, 1 << 30


def _slow_socket(port: int, rcvbuf: int = SMALL_RCVBUF) -> socket.socket:
    """A TCP connection whose receive buffer is ``rcvbuf`` bytes, clamped by the kernel (it must
    be set before connecting: it fixes the window scale)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return sock


class RawWebSocket:
    """A WebSocket client on a bare socket that reads nothing after the handshake unless told
    to: a client library reads (and answers a close frame) in the background, this does not."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]

    @classmethod
    async def open(cls, port: int, rcvbuf: int = SMALL_RCVBUF) -> RawWebSocket:
        raw = cls(_slow_socket(port, rcvbuf))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /sync HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(raw.sock, request.encode())
        response = b""
        while not response.endswith(b"\r\n\r\n"):  # the server sends nothing more unasked
            chunk = await asyncio.wait_for(loop.sock_recv(raw.sock, 1), 5)
            assert chunk, f"closed during the handshake: {response!r}"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        return raw

    async def send(self, frame: dict[str, Any]) -> None:
        payload = json.dumps(frame).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        data = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_to_end(self, timeout: float) -> bytes:
        """Everything the server sent, up to its end of the stream."""
        loop = asyncio.get_running_loop()
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout):
            received += chunk
        return bytes(received)

    def close(self) -> None:
        self.sock.close()


def _last_frame(stream: bytes) -> tuple[int, bytes]:
    """``(opcode, payload)`` of the last complete frame in an unmasked server ``stream``."""
    last, offset = (0, b""), 0
    while offset + 2 <= len(stream):
        opcode, length = stream[offset] & 0x0F, stream[offset + 1] & 0x7F
        offset += 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length = int.from_bytes(stream[offset : offset + size], "big")
            offset += size
        if offset + length > len(stream):
            break
        last = (opcode, stream[offset : offset + length])
        offset += length
    return last


#: The flood below: three subscriptions of this size (together within a 256 KiB send limit,
#: so within the connection's result budget), and this many commits, each changing all three.
STAMPED_SIZE, FLOOD_COMMITS = 60_000, 60


async def _flood_big_transitions(
    slow: SyncClient | RawWebSocket, watcher: SyncClient, count: int = FLOOD_COMMITS
) -> float:
    """Subscribe ``slow`` (which does not read) three times to ``stamped``; then ``count``
    commits, each sending it a transition of three such results, made by ``watcher`` (a
    ``stamp``, then a ``ping``); return the slowest pong round trip (seconds)."""
    for query_id in (1, 2, 3):
        frame = {"type": "subscribe", "queryId": query_id, "name": "stamped"}
        with contextlib.suppress(websockets.ConnectionClosed, ConnectionError):
            await slow.send({**frame, "args": {"size": STAMPED_SIZE}})
    slowest = 0.0
    for request_id in range(1, count + 1):
        await watcher.send({"type": "mutate", "requestId": request_id, "name": "stamp"})
        # Answered once every subscriber's transition is out of the pump (read your writes).
        await watcher.expect("mutation_result", 10, allow={"transition"})
        started = time.monotonic()
        await watcher.ping(timeout=2)
        slowest = max(slowest, time.monotonic() - started)
    return slowest


def _server_unsent_bytes(server: ServerProcess, client_port: int) -> int:
    """Bytes the server's kernel holds for the client at ``client_port`` (``tx_queue`` in
    ``/proc/net/tcp``: written by the server, not yet acknowledged by the client)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if (local_port, remote_port) == (server.port, client_port):
                    return int(fields[4].split(":")[0], 16)
    return 0


def _server_holds_connection(server: ServerProcess, client_port: int) -> bool:
    """Does the server process still hold the TCP socket of the client at ``client_port``?

    Read from ``/proc``: the socket inode of that connection (local port = the server's, remote
    port = the client's), then whether it is among the process's open descriptors.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if (local_port, remote_port) == (server.port, client_port):
                    inodes.add(fields[9])
    assert server.pid is not None
    held = set()
    for fd in Path(f"/proc/{server.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            held.add(os.readlink(fd))
    return any(f"socket:[{inode}]" in held for inode in inodes)


async def test_slow_consumer_is_closed_with_4008_and_released_while_the_server_stays_responsive(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory(
        env={"TETHER_SEND_QUEUE_BYTES": "262144"}, app="tests.apps.bigresult:app"
    )
    count = FLOOD_COMMITS  # 10 MB of results: far past the queue and every socket buffer

    # A client that never reads cannot see a close frame. Two honest checks instead:
    # 1. A client that stops reading, then reads again: what the socket buffers held, then the
    #    close frame with 4008 — and not all the transitions, which would mean an unbounded
    #    queue. (max_queue=1: the client library stops reading the socket while one frame
    #    waits.) The commit and ping of a second client, one by one, pace the flood, so the server's
    #    writes really back up on the full socket (the realistic slow consumer) before its
    #    queue overflows; those pongs also show the instance stays responsive.
    late_reader = await open_sync(server.ws_url, sock=_slow_socket(server.port), max_queue=1)
    watcher = await open_sync(server.ws_url)
    flood_started = time.monotonic()
    slowest = await _flood_big_transitions(late_reader, watcher, count)
    flood_seconds = time.monotonic() - flood_started
    assert slowest < 0.5, f"a pong took {slowest:.3f} s while the slow client backed up"
    code = await late_reader.wait_closed(15, allow={"transition"})
    # The close frame sits behind megabytes of unread data; this client library (max_queue=1,
    # a 4 KiB receive buffer, still sending while it does not read) does not always get to it
    # before the TCP connection ends, and then reports 1006. Known weakness, see the closing
    # note; part 2 below checks the 4008 frame on the wire with a client that reads it raw.
    assert code in (4008, 1006), (code, flood_seconds)
    transitions = [f for f in late_reader.frames if f["type"] == "transition"]
    assert 0 < len(transitions) < count

    # 2. A client that never reads at all after the handshake (a bare socket: no library
    #    answering the close frame behind the test's back): the instance stays responsive while
    #    it backs up, and once the client does read, the last frame on the wire is the close
    #    with 4008 — the server gave up on it instead of queueing without bound.
    #    (One that never reads loses its socket: the next test.)
    silent = await RawWebSocket.open(server.port)
    try:
        assert _server_holds_connection(server, silent.port)  # the probe sees it
        await silent.send({"type": "connect", "clientId": "silent", "protocol": 1})
        watcher = await open_sync(server.ws_url)  # a fresh message-rate window
        slowest = await _flood_big_transitions(silent, watcher, count)
        assert slowest < 0.5, f"a pong took {slowest:.3f} s while the slow client backed up"
        await watcher.ping(timeout=1)
        received = await silent.read_to_end(30)
        opcode, payload = _last_frame(received)
        assert (opcode, payload[:2]) == (0x8, (4008).to_bytes(2, "big")), payload
        everything = count * 3 * STAMPED_SIZE
        assert len(received) < everything, "everything was queued: the limit did not hold"
        # Counted for operators: tether_connection_closes_total{code="4008"} (docs/operations.md).
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(server.base_url + "/metrics")).text
        assert 'tether_connection_closes_total{code="4008"}' in metrics, metrics
    finally:
        silent.close()


@pytest.mark.parametrize(
    "rcvbuf", [SMALL_RCVBUF, LARGE_RCVBUF], ids=["small-buffer", "large-buffer"]
)
async def test_a_client_that_never_reads_loses_its_socket_after_the_close_grace(
    server_factory: Callable[..., ServerProcess], open_sync: Opener, rcvbuf: int
) -> None:
    # The close frame of a client that stopped reading waits behind everything it did not take
    # (small buffers), or sits unread in its kernel (large ones): either way the close handshake
    # never completes, and TCP would keep the connection (and the server's buffer) for as long
    # as the client's kernel answers. The server aborts it instead (contract §5 rule 9).
    # With large buffers the flood may fit in the two kernels and never overflow the send
    # queue: the heartbeat then ends the connection, and its close frame is never answered.
    grace, heartbeat = 3, 2
    server = server_factory(
        env={
            "TETHER_SEND_QUEUE_BYTES": "262144",
            "TETHER_CLOSE_GRACE": str(grace),
            "TETHER_HEARTBEAT_TIMEOUT": str(heartbeat),
        },
        app="tests.apps.bigresult:app",
    )
    silent = await RawWebSocket.open(server.port, rcvbuf)
    try:
        await silent.send({"type": "connect", "clientId": "silent", "protocol": 1})
        watcher = await open_sync(server.ws_url)
        await _flood_big_transitions(silent, watcher)
        # Not dropped at once: the server waits CLOSE_TIMEOUT for the close frame to go out,
        # then the grace, before it aborts.
        assert _server_holds_connection(server, silent.port)
        deadline = time.monotonic() + heartbeat + CLOSE_TIMEOUT + grace + 5
        while _server_holds_connection(server, silent.port):
            assert time.monotonic() < deadline, "the socket of a client that never reads is held"
            await asyncio.sleep(0.1)
        # The client, reading at last, finds the end of the stream (a reset, or what its buffer
        # held and then the end), not a connection that goes on.
        with contextlib.suppress(ConnectionResetError):
            await silent.read_to_end(5)
        fresh = await open_sync(server.ws_url)  # (the watcher's heartbeat has run out by now)
        await fresh.ping()  # the instance is fine
    finally:
        silent.close()


async def _gone_within(server: ServerProcess, raw: RawWebSocket, seconds: float) -> float:
    """Ping on ``raw`` (which never reads) every 0.5 s until the server no longer holds its
    socket; fail after ``seconds``. Returns how long it took."""
    started = time.monotonic()
    while _server_holds_connection(server, raw.port):
        took = time.monotonic() - started
        assert took < seconds, (
            f"a client that never reads but pings still holds its socket after {took:.1f} s"
        )
        with contextlib.suppress(ConnectionError):
            await raw.send({"type": "ping"})
        await asyncio.sleep(0.5)
    return time.monotonic() - started


@pytest.mark.parametrize(
    "rcvbuf", [SMALL_RCVBUF, LARGE_RCVBUF], ids=["small-buffer", "large-buffer"]
)
async def test_a_client_that_never_reads_but_keeps_pinging_loses_its_socket(
    server_factory: Callable[..., ServerProcess], rcvbuf: int
) -> None:
    # Its pings keep the heartbeat (75 s) from ever ending it, and each pong is tiny: the send
    # queue's byte limit never trips, and when the kernels take what was sent (a 600 KB result
    # fits in them, whatever the client's receive buffer) nothing waits in the server either.
    # What ends it is the WebSocket ping it never answers (TETHER_PING_INTERVAL, and as long
    # again for the answer); then the socket goes (contract §5 rule 9).
    ping_interval, grace = 2, 2
    server = server_factory(
        env={
            "TETHER_PING_INTERVAL": str(ping_interval),
            "TETHER_SEND_TIMEOUT": "60",  # out of the test's reach: the next test's mechanism
            "TETHER_CLOSE_GRACE": str(grace),
        },
        app="tests.apps.bigresult:app",
    )
    silent = await RawWebSocket.open(server.port, rcvbuf)
    try:
        await silent.send({"type": "connect", "clientId": "silent", "protocol": 1})
        await silent.send(
            {"type": "subscribe", "queryId": 1, "name": "big", "args": {"size": 600_000}}
        )
        await _gone_within(server, silent, 2 * ping_interval + CLOSE_TIMEOUT + grace + 5)
    finally:
        silent.close()


@pytest.mark.parametrize(
    ("send_timeout", "ping_interval", "logged"),
    [
        (2, 60, "closed a slow consumer"),
        (60, 2, "closing a socket on its own"),
    ],
    ids=["send-timeout", "unanswered-ping"],
)
async def test_a_client_that_takes_nothing_while_frames_wait_loses_its_socket(
    server_factory: Callable[..., ServerProcess],
    open_sync: Opener,
    send_timeout: int,
    ping_interval: int,
    logged: str,
) -> None:
    # More than the kernels' buffers (~4 MB on loopback) was sent to a client that never reads,
    # so frames wait in the server; but fewer bytes than the send queue's limit, and the
    # client keeps pinging: neither 4008 for the queue's bytes nor the heartbeat applies.
    # Either mechanism ends it (each case sets the other out of the test's reach):
    # - a send that waits TETHER_SEND_TIMEOUT on a socket that takes nothing: 4008;
    # - the WebSocket ping, which cannot even reach such a client: uvicorn then closes the
    #   socket without telling Tether, and that close never completes (bytes are waiting)
    #   unless Tether, seeing it, arms the abort.
    # Then the socket goes after the close grace.
    grace = 2
    server = server_factory(
        env={
            "TETHER_SEND_QUEUE_BYTES": str(64 * 2**20),
            "TETHER_MAX_CONNECTION_RESULT_BYTES": str(2**20),
            "TETHER_SEND_TIMEOUT": str(send_timeout),
            "TETHER_PING_INTERVAL": str(ping_interval),
            "TETHER_CLOSE_GRACE": str(grace),
        },
        app="tests.apps.bigresult:app",
    )
    silent = await RawWebSocket.open(server.port)
    try:
        await silent.send({"type": "connect", "clientId": "silent", "protocol": 1})
        await silent.send(
            {"type": "subscribe", "queryId": 1, "name": "stamped", "args": {"size": 900_000}}
        )
        watcher = await open_sync(server.ws_url)
        for request_id in range(1, 11):  # 10 transitions of 900 KB: 9 MB
            await watcher.send({"type": "mutate", "requestId": request_id, "name": "stamp"})
            await watcher.expect("mutation_result", 10, allow={"transition"})
        ends = min(send_timeout, 3 * ping_interval) + CLOSE_TIMEOUT + grace
        await _gone_within(server, silent, ends + 5)
        log = server.log_text()
        assert logged in log, log[-3000:]
    finally:
        silent.close()


async def _post_messages(author: SyncClient, channel: str, count: int, first: int = 1) -> None:
    """``count`` messages of 4000 characters to ``channel``, one after another."""
    for request_id in range(first, first + count):
        args = {"channel": channel, "body": "m" * 4000}
        await author.send(
            {"type": "mutate", "requestId": request_id, "name": "messages.send", "args": args}
        )
        result = await author.expect("mutation_result", 10, allow={"transition"})
        assert "error" not in result, result


async def test_many_subscriptions_to_a_large_result_are_refused_and_no_frame_exceeds_the_limit(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    # Issue 13: an anonymous socket sent 190 `subscribe messages.list` (~20 KB) on a channel of
    # 100 × 4 KB messages and received one 78 MB transition. Now the connection's results are
    # held to TETHER_MAX_CONNECTION_RESULT_BYTES (default: the 1 MiB send limit): the
    # subscriptions past it are refused with limit_exceeded, and no frame is over the limit.
    # Measured on the wire (the largest frame), not as RSS: the same on every machine.
    send_limit = 1_048_576
    server = server_factory()
    author = await authed(open_sync, server, await signup(server.base_url))
    await _post_messages(author, "big", 100)
    attacker = await open_sync(server.ws_url, max_size=None)  # takes a frame of any size
    count = 190
    for query_id in range(1, count + 1):
        subscribe = {"type": "subscribe", "queryId": query_id, "name": "messages.list"}
        await attacker.send({**subscribe, "args": {"channel": "big"}})
    accepted: dict[int, int] = {}  # queryId -> characters of its result
    refused: set[int] = set()
    largest = 0
    while len(accepted) + len(refused) < count:
        text = await asyncio.wait_for(attacker.ws.recv(), 30)
        assert isinstance(text, str)
        largest = max(largest, len(text.encode()))
        frame = attacker._received(text)
        if frame["type"] == "error":
            assert frame["code"] == "limit_exceeded", frame
            assert "TETHER_MAX_CONNECTION_RESULT_BYTES" in frame["message"]
            refused.add(frame["queryId"])
        else:
            assert frame["type"] == "transition", frame
            for update in frame["updates"]:
                assert len(update["value"]) == 100, update["queryId"]
                accepted[update["queryId"]] = len(json.dumps(update["value"]))
    assert largest <= send_limit, f"a frame of {largest} bytes"
    assert not accepted.keys() & refused
    assert 1 <= len(accepted) <= send_limit // min(accepted.values())
    assert len(refused) == count - len(accepted)
    # The connection stays open and usable; a refused queryId can be used again (and is
    # refused again, the connection still being full).
    await attacker.ping()
    again = min(refused)
    await attacker.send(
        {"type": "subscribe", "queryId": again, "name": "messages.list", "args": {"channel": "big"}}
    )
    assert (await attacker.expect("error"))["queryId"] == again


async def test_a_result_that_grows_past_the_connection_budget_ends_that_subscription_only(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    budget = 32_768
    server = server_factory(env={"TETHER_MAX_CONNECTION_RESULT_BYTES": str(budget)})
    author = await authed(open_sync, server, await signup(server.base_url))
    watcher = await open_sync(server.ws_url, max_size=None)
    await watcher.send(
        {"type": "subscribe", "queryId": 1, "name": "messages.list", "args": {"channel": "g"}}
    )
    await watcher.send(
        {"type": "subscribe", "queryId": 2, "name": "counter.get", "args": {"name": "g"}}
    )
    seen: set[int] = set()
    while seen != {1, 2}:
        seen.update(u["queryId"] for u in (await watcher.expect("transition"))["updates"])
    # 4 KB a message: the channel's list passes 32 KiB at the 8th.
    await _post_messages(author, "g", 8)
    values = 0
    while True:
        text = await asyncio.wait_for(watcher.ws.recv(), 10)
        assert isinstance(text, str) and len(text.encode()) <= budget, len(text)
        frame = watcher._received(text)
        if frame["type"] == "error":
            break
        assert frame["type"] == "transition", frame
        values += 1
    assert (frame["code"], frame["queryId"]) == ("limit_exceeded", 1)
    assert "ended" in frame["message"]
    assert 1 <= values < 8
    # The connection is not closed for it, and its other subscription goes on.
    await author.send(
        {"type": "mutate", "requestId": 100, "name": "counter.increment", "args": {"name": "g"}}
    )
    assert (await watcher.expect("transition"))["updates"] == [{"queryId": 2, "value": 1}]
    # Nothing more comes for the ended subscription.
    await _post_messages(author, "g", 1, first=101)
    await watcher.assert_silent(0.5)


async def test_heartbeat_timeout_closes_a_silent_client_with_4009(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory(env={"TETHER_HEARTBEAT_TIMEOUT": "2"})
    silent = await open_sync(server.ws_url)
    silent_since = time.monotonic()
    talker = await open_sync(server.ws_url)

    async def keep_pinging() -> None:
        for _ in range(7):  # 3.5 s, well past the timeout
            await talker.ping()
            await asyncio.sleep(0.5)

    async def silent_close() -> tuple[int, float]:
        code = await silent.wait_closed(4)
        return code, time.monotonic() - silent_since

    (code, after), _ = await asyncio.gather(silent_close(), keep_pinging())
    assert code == 4009
    assert 1.8 <= after <= 2.8, f"closed {after:.2f} s after the last frame"
    await talker.ping()  # the client that kept talking is still open


@pytest.mark.slow
async def test_no_connect_within_10_seconds_closes_with_4500(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory()
    opened = time.monotonic()
    silent = await open_sync(server.ws_url, hello=False)
    chatty = await open_sync(server.ws_url, hello=False)  # talks, but never sends `connect`
    connected = await open_sync(server.ws_url)  # sent `connect`: the deadline does not apply

    async def chatter() -> None:
        while chatty.close_code is None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await chatty.send({"type": "ping"})
            await asyncio.sleep(1.0)

    task = asyncio.create_task(chatter())
    try:
        code = await silent.wait_closed(12)
        after = time.monotonic() - opened
        assert code == 4500
        assert 9.8 <= after <= 11.0, f"closed {after:.2f} s after the upgrade"
        assert await chatty.wait_closed(1, allow={"error"}) == 4500
        assert {f["code"] for f in chatty.frames} == {"not_connected"}
    finally:
        task.cancel()
    await connected.ping()


async def test_message_rate_limit_answers_rate_limited_then_closes_with_4429(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    server = server_factory(env={"TETHER_MESSAGE_RATE": "20/10"})
    client = await open_sync(server.ws_url)  # `connect` is the window's first message
    for _ in range(19):
        await client.ping()
    await client.send({"type": "ping"})
    error = await client.expect("error")
    assert error["code"] == "rate_limited"

    async def flood() -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(500):
                await client.send({"type": "ping"})

    flooding = asyncio.create_task(flood())
    try:
        assert await client.wait_closed(5, allow={"error"}) == 4429
    finally:
        await flooding
    assert {f["code"] for f in client.frames if f["type"] == "error"} == {"rate_limited"}


# ---------------------------------------------------------------------------------- drain


async def test_sigterm_drains_sockets_with_1012_and_exits_0(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    drain_timeout = 2.0
    env = {"TETHER_DRAIN_TIMEOUT": str(drain_timeout)}
    a, b = two_instances(server_factory, env)
    tokens = await signup(a.base_url)
    client = await authed(open_sync, a, tokens)

    started = time.monotonic()
    code, exit_code = await asyncio.gather(
        client.wait_closed(drain_timeout + 5), a.astop(signal.SIGTERM, timeout=drain_timeout + 5)
    )
    assert code == 1012
    assert exit_code == 0, a.log_text()[-3000:]
    assert time.monotonic() - started <= drain_timeout + 3

    # 1012 means "reconnect at once, to any instance": B takes the same token.
    again = await authed(open_sync, b, tokens)
    await again.ping()


async def _stuck_client(server: ServerProcess, open_sync: Opener) -> RawWebSocket:
    """A client that stopped reading with ~90 MB queued (far past any kernel's socket
    buffers): a close can never reach it."""
    silent = await RawWebSocket.open(server.port)
    await silent.send({"type": "connect", "clientId": "silent", "protocol": 1})
    watcher = await open_sync(server.ws_url)
    for query_id in range(1, 31):
        frame = {"type": "subscribe", "queryId": query_id, "name": "big"}
        await silent.send({**frame, "args": {"size": 3_000_000}})
    await watcher.ping(timeout=10)  # the instance has taken every subscribe by now
    # ... but their results are evaluated, encoded and written later: until they are, a close
    # (a drain's 1012) would go out at once, and the client would not be stuck at all.
    deadline = time.monotonic() + 20
    while _server_unsent_bytes(server, silent.port) < 1_000_000:
        assert time.monotonic() < deadline, "the results never reached the stuck client's socket"
        await asyncio.sleep(0.05)
    return silent


STUCK_ENV = {
    "TETHER_SEND_QUEUE_BYTES": str(256 * 2**20),
    "TETHER_MAX_RESULT_BYTES": str(4 * 2**20),
}


async def test_sigterm_drain_waits_tether_drain_timeout_for_a_socket_that_cannot_take_its_close(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    """``TETHER_DRAIN_TIMEOUT`` bounds Tether's own drain: the 1012 of a client that stopped
    reading cannot go out, so the drain waits the setting, not the default (10 s) and not
    zero, before uvicorn's shutdown."""
    drain_timeout = 3
    server = server_factory(
        env={"TETHER_DRAIN_TIMEOUT": str(drain_timeout), **STUCK_ENV},
        app="tests.apps.bigresult:app",
    )
    silent = await _stuck_client(server, open_sync)
    try:
        started = time.monotonic()
        exit_code = await server.astop(signal.SIGTERM, timeout=drain_timeout + 20)
        took = time.monotonic() - started
        assert exit_code == 0, server.log_text()[-3000:]
        log = server.log_text()
        assert f"still open after {drain_timeout:.1f} s" in log, log[-3000:]
        assert drain_timeout - 0.5 <= took < 10, took
    finally:
        silent.close()


async def test_a_second_ctrl_c_cuts_the_drain_short(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    # The operator's way out, as in uvicorn: the first SIGINT drains, the second stops waiting.
    server = server_factory(
        # The close grace would abort the stuck socket (and so end the drain) after 2 + 60 s.
        env={"TETHER_DRAIN_TIMEOUT": "60", "TETHER_CLOSE_GRACE": "60", **STUCK_ENV},
        app="tests.apps.bigresult:app",
    )
    silent = await _stuck_client(server, open_sync)
    try:
        assert server.process is not None
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        await asyncio.sleep(1.0)
        assert server.process.poll() is None  # draining: the stuck client holds it
        server.process.send_signal(signal.SIGINT)
        exit_code = await asyncio.to_thread(server.process.wait, 30)
        assert time.monotonic() - started < 20, "the drain ran on after the second Ctrl-C"
        assert exit_code == 0, server.log_text()[-3000:]
    finally:
        silent.close()


async def test_sigterm_1012_comes_from_tethers_drain_not_uvicorn(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    """Tether closes its sockets itself on SIGTERM: uvicorn's own 1012 carries no reason."""
    server = server_factory(env={"TETHER_DRAIN_TIMEOUT": "3"})
    reader = await open_sync(server.ws_url)
    await reader.ping()
    code, exit_code = await asyncio.gather(
        reader.wait_closed(10), server.astop(signal.SIGTERM, timeout=15)
    )
    assert code == 1012
    assert reader.ws.close_reason == DRAIN_REASON
    assert exit_code == 0, server.log_text()[-3000:]


async def test_sigterm_exits_though_an_application_task_ignores_its_cancellation(
    server_factory: Callable[..., ServerProcess], open_sync: Opener
) -> None:
    """An application's task that swallows every cancellation is left behind, logged as an
    error, instead of holding up the exit (asyncio.run would wait for it forever)."""
    server = server_factory(env={"TETHER_DRAIN_TIMEOUT": "1"}, app="tests.apps.stubborn:app")
    client = await open_sync(server.ws_url)
    await client.send({"type": "subscribe", "queryId": 1, "name": "start", "args": {}})
    assert (await client.expect("transition"))["updates"] == [{"queryId": 1, "value": 1}]
    started = time.monotonic()
    exit_code = await server.astop(signal.SIGTERM, timeout=1 + TASK_STOP_TIMEOUT + 20)
    log = server.log_text()
    assert exit_code == 0, log[-3000:]
    # The drain (1 s) and the bounded wait for the task; not the harness's SIGKILL.
    assert time.monotonic() - started < 1 + TASK_STOP_TIMEOUT + 15, log[-3000:]
    assert "background task stubborn did not stop" in log, log[-3000:]


def test_a_ping_behind_an_invalid_utf8_text_frame_gets_the_lingering_1007(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # Invalid UTF-8 fails the connection inside uvicorn's handle_events (send_receive_event_to_app
    # -> 1007 -> handle_parser_exception -> write_eof), and handle_events then goes on with the
    # frames parsed from the same read: handle_ping calls transport.write(b"") after write_eof,
    # which asyncio refuses (RuntimeError) before it checks for empty data. The transport is
    # force-closed ("Fatal error: protocol.data_received() call failed." + traceback at ERROR):
    # no linger, and a client still sending gets a reset (the 1006 the change set out to end).
    server = server_factory()
    sock = _open_raw_ws(server.port)
    try:
        # One write, so one read on the server: the bad text frame, then a ping.
        sock.sendall(_masked_frame(0x1, b"\xff\xfe\xfd") + _masked_frame(0x9, b"p"))
        time.sleep(0.5)
        log = server.log_text()
        assert "Cannot call write() after write_eof()" not in log, log[-3000:]
        _send_until_the_server_ends(sock, b"")
        junk = _masked_frame(0x1, json.dumps({"type": "ping"}).encode())
        try:
            for _ in range(8):
                sock.sendall(junk)
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AssertionError(f"the server reset the connection: {exc!r}") from None
        opcode, payload = _last_frame(bytes(received))
        assert opcode == 0x8, bytes(received)
        assert int.from_bytes(payload[:2], "big") == 1007, payload
    finally:
        sock.close()
