"""The server's log: ``TETHER_LOG_FORMAT=json`` gives one JSON object per line with the ids of the
connection (or HTTP request) a line belongs to; in either format no password, access token or
refresh token (nor its secret part) is ever written.

A real server process, at log level ``debug`` (the most it will ever write), serves sign-up,
sign-in (a wrong password too), refresh over HTTP and in-band, a forged token, a mutation that
fails inside the application (logged with its traceback from the connection's own task) and a
sign-out pushed to the socket; then the whole log is read back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from tether.server.logs import ContextFilter, bind_connection
from tether.server.realtime.timers import DeadlineQueue

from tests.harness import ServerProcess
from tests.sync_client import PASSWORD, auth_post, connect_sync, signup

APP = "tests.apps.reactive_app:app"


def _forged(access_token: str) -> str:
    """``access_token`` with its claims changed: a JWT-shaped token whose signature fails."""
    header, claims, signature = access_token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    doc["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def _traffic(server: ServerProcess) -> dict[str, Any]:
    """Drive the server; return what the log may name (ids) and what it must not (secrets)."""
    base = server.base_url
    secrets: set[str] = {PASSWORD, "wrong password 123"}

    def remember(tokens: dict[str, Any]) -> None:
        secrets.add(tokens["accessToken"])
        secrets.add(tokens["refreshToken"])
        secrets.add(tokens["refreshToken"].split(".")[2])  # the secret part alone

    first = await signup(base)
    remember(first)
    email = first["email"]
    wrong = await auth_post(
        base, "/auth/signin", json={"email": email, "password": "wrong password 123"}
    )
    assert wrong.status_code == 401
    signed_in = await auth_post(base, "/auth/signin", json={"email": email, "password": PASSWORD})
    assert signed_in.status_code == 200
    tokens = signed_in.json()
    remember(tokens)
    refreshed = await auth_post(
        base, "/auth/refresh", json={"refreshToken": tokens["refreshToken"]}
    )
    assert refreshed.status_code == 200
    tokens = refreshed.json()
    remember(tokens)

    forged = _forged(tokens["accessToken"])
    secrets.add(forged)
    client = await connect_sync(server.ws_url)
    try:
        connection_id = client.connected["connectionId"]
        await client.send({"type": "authenticate", "token": forged, "authVersion": 1})
        assert (await client.expect("auth_error"))["code"] == "invalid_token"
        await client.send(
            {"type": "authenticate", "token": tokens["accessToken"], "authVersion": 2}
        )
        await client.expect("auth_ok")
        await client.send(
            {"type": "refresh", "refreshToken": tokens["refreshToken"], "authVersion": 3}
        )
        in_band = (await client.expect("auth_ok"))["tokens"]
        remember(in_band)
        await client.send(
            {
                "type": "mutate",
                "requestId": 1,
                "name": "tally.bump_then_raise",
                "args": {"name": "t"},
            }
        )
        failed = await client.expect("mutation_result")
        assert failed["error"]["code"] == "internal"
        out = await auth_post(base, "/auth/signout", token=in_band["accessToken"])
        assert out.status_code == 204
        await client.expect("session_revoked")
        # A bearer token where none is valid any more: refused, and not logged either.
        again = await auth_post(base, "/auth/signout", token=in_band["accessToken"])
        assert again.status_code == 401
    finally:
        await client.close()
    return {
        "secrets": secrets,
        "connection": connection_id,
        "user": tokens["userId"],
        "session": tokens["sessionId"],
    }


def _assert_no_secret(log: str, secrets: set[str]) -> None:
    assert log.strip(), "the server logged nothing"
    leaked = sorted(s[:12] + "…" for s in secrets if s in log)
    assert not leaked, f"the log holds secrets: {leaked}"


async def test_json_log_lines_parse_carry_ids_and_hold_no_secret(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"TETHER_LOG_FORMAT": "json", "TETHER_LOG_LEVEL": "debug"}, app=APP)
    seen = await _traffic(server)
    server.stop()
    log = server.log_text()
    _assert_no_secret(log, seen["secrets"])

    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
        assert line["time"].endswith("Z")

    mine = [line for line in lines if line.get("connection") == seen["connection"]]
    # The socket's own lines: the failed authenticate, the adopted identity, the application's
    # traceback (logged by the mutation's task), the revocation pushed by the hub.
    assert any("refused: invalid_token" in line["message"] for line in mine), mine
    authed = [line for line in mine if line.get("user") == seen["user"]]
    assert any(line["logger"] == "tether.functions" and "exception" in line for line in authed)
    assert all(line["session"] == seen["session"] for line in authed)
    assert any("session revoked" in line["message"] for line in mine)
    # An HTTP request's lines name who it acted for; uvicorn's access log is JSON too.
    assert any(
        line["logger"] == "tether.auth" and line.get("user") == seen["user"] for line in lines
    )
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any(
        line.get("path") == "/auth/refresh" and line.get("status") == 200 for line in access
    ), access


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_text_log_holds_no_secret(
    server_factory: Callable[..., ServerProcess], level: str
) -> None:
    server = server_factory(env={"TETHER_LOG_FORMAT": "text", "TETHER_LOG_LEVEL": level}, app=APP)
    seen = await _traffic(server)
    server.stop()
    log = server.log_text()
    _assert_no_secret(log, seen["secrets"])
    # The socket's lines name it, in text too.
    assert f"connection={seen['connection']}" in log


class _Subject:
    connection_id = "armed-by-this-connection"
    identity = None


class _Target:
    """A deadline target that records whose ids a line logged from its callback would carry."""

    def __init__(self) -> None:
        self.scheduled_deadline: float | None = None
        self.seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def on_deadline(self, now: float) -> None:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "line", None, None)
        ContextFilter().filter(record)
        self.seen.set_result(record.connection_id)


async def test_a_deadline_fires_in_no_connections_context() -> None:
    # One timer serves every connection: armed from one connection's task, its callback must
    # not log another connection's deadline under the first one's ids.
    queue = DeadlineQueue()
    target = _Target()

    async def a_connection_arms_it() -> None:
        bind_connection(_Subject())
        queue.schedule(target, time.time() + 0.05)

    await asyncio.create_task(a_connection_arms_it())
    try:
        assert await asyncio.wait_for(target.seen, 5) is None
    finally:
        queue.close()
