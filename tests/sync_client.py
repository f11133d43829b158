"""A small test-side client for ``/sync``: exact about which frames arrive, and in which order.

Every frame received is checked against the wire contract (``/work/shared/protocol.md`` §3) by
:func:`check_frame`: a JSON object in a text frame, a ``type`` the server may send, and codes
from the contract's lists. The vocabularies below are copied from the contract on purpose, not
imported from ``tether.server.errors``: a test that took the server's word for the contract could
not catch the server drifting from it.

Usage::

    async with await connect_sync(server.ws_url) as client:   # sends `connect`, awaits `connected`
        await client.send({"type": "ping"})
        await client.expect("pong")
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Collection
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

#: Every ``type`` the server may send (contract §3, "Server → client").
SERVER_TYPES = frozenset(
    {
        "connected",
        "auth_ok",
        "auth_error",
        "auth_expiring",
        "auth_expired",
        "session_revoked",
        "transition",
        "mutation_result",
        "error",
        "pong",
    }
)
#: Every ``type`` a client may send (contract §3, "Client → server").
CLIENT_TYPES = ("connect", "authenticate", "refresh", "subscribe", "unsubscribe", "mutate", "ping")
ERROR_CODES = frozenset(
    {
        "bad_message",
        "unknown_type",
        "not_connected",
        "unknown_function",
        "bad_args",
        "duplicate_query_id",
        "limit_exceeded",
        "rate_limited",
        "internal",
    }
)
AUTH_ERROR_CODES = frozenset(
    {
        "invalid_token",
        "token_expired",
        "session_revoked",
        "refresh_invalid",
        "refresh_reused",
        "rate_limited",
        "unavailable",
    }
)
SESSION_END_REASONS = frozenset(
    {"signed_out", "signed_out_everywhere", "refresh_reused", "session_expired", "revoked"}
)
CLOSE_CODES = frozenset({1001, 1009, 1011, 1012, 4008, 4009, 4429, 4500, 4503})

#: Seconds a test waits for a frame it expects when nothing slow is involved.
DEFAULT_TIMEOUT = 5.0
PASSWORD = "correct horse battery"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_frame(data: str | bytes) -> dict[str, Any]:
    """Parse one server frame and check it against the contract; raise AssertionError if not."""
    assert isinstance(data, str), f"the server sent a binary frame: {data[:80]!r}"
    frame = json.loads(data)
    assert isinstance(frame, dict), f"the server sent a non-object: {data[:200]}"
    kind = frame.get("type")
    assert kind in SERVER_TYPES, f"the server sent an unknown type: {data[:200]}"
    if kind == "error":
        assert frame.get("code") in ERROR_CODES, f"error code not in the contract: {frame}"
        assert isinstance(frame.get("message"), str), frame
    elif kind == "auth_error":
        assert frame.get("code") in AUTH_ERROR_CODES, (
            f"auth_error code not in the contract: {frame}"
        )
        assert _is_int(frame.get("authVersion")), frame
    elif kind == "session_revoked":
        assert frame.get("reason") in SESSION_END_REASONS, frame
    elif kind in ("auth_expiring", "auth_expired"):
        assert _is_int(frame.get("expiresAt")) and _is_int(frame.get("serverTime")), frame
    elif kind in ("pong", "connected"):
        assert _is_int(frame.get("serverTime")), frame
    elif kind == "transition":
        assert _is_int(frame.get("version")) and isinstance(frame.get("updates"), list), frame
    return frame


class SyncClient:
    """One ``/sync`` connection. ``frames`` keeps every frame received, in order; every frame
    is checked with :func:`check_frame`, and transition versions must never go back."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        #: The ``connected`` frame, when :func:`connect_sync` sent ``connect``.
        self.connected: dict[str, Any] | None = None
        #: The newest ``transition`` version received.
        self.version = 0

    async def __aenter__(self) -> SyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def close_code(self) -> int | None:
        """The code of the close frame the server sent (1006: none); None while open."""
        return self.ws.close_code

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        """Send ``data`` as is: a text frame for ``str``, a binary frame for ``bytes``."""
        await self.ws.send(data)

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next frame, checked by :func:`check_frame`. Fails on a timeout or a close."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
        except TimeoutError:
            raise AssertionError(f"no frame within {timeout} s") from None
        except websockets.ConnectionClosed:
            raise AssertionError(f"the connection closed with code {self.close_code}") from None
        return self._received(data)

    def _received(self, data: str | bytes) -> dict[str, Any]:
        frame = check_frame(data)
        if frame["type"] == "transition":
            # Contract §3: versions only grow on a connection.
            assert frame["version"] >= self.version, f"version went back: {frame}"
            self.version = frame["version"]
        self.frames.append(frame)
        return frame

    async def expect(
        self, kind: str, timeout: float = DEFAULT_TIMEOUT, *, allow: Collection[str] = ()
    ) -> dict[str, Any]:
        """The next frame of type ``kind``. Frames of the types in ``allow`` are skipped; any
        other frame before it fails the test, as does no such frame within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {kind!r} frame within {timeout} s")
            try:
                frame = await self.recv(remaining)
            except AssertionError as exc:
                raise AssertionError(f"waiting for {kind!r}: {exc}") from None
            if frame["type"] == kind:
                return frame
            if frame["type"] not in allow:
                raise AssertionError(f"expected a {kind!r} frame, got {frame}")

    async def assert_silent(self, seconds: float) -> None:
        """Fail if any frame arrives (or the connection closes) within ``seconds``."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        except websockets.ConnectionClosed:
            raise AssertionError(f"expected silence; closed with code {self.close_code}") from None
        raise AssertionError(f"expected silence for {seconds} s, got {data!r:.300}")

    async def wait_closed(
        self, timeout: float = DEFAULT_TIMEOUT, *, allow: Collection[str] | None = ()
    ) -> int:
        """Read until the server closes the connection; return its close code. A frame of a type
        not in ``allow`` (``None``: any type) fails the test, as does no close within
        ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"the connection did not close within {timeout} s")
            try:
                data = await asyncio.wait_for(self.ws.recv(), remaining)
            except TimeoutError:
                raise AssertionError(f"the connection did not close within {timeout} s") from None
            except websockets.ConnectionClosed:
                code = self.close_code
                assert code is not None
                return code
            frame = self._received(data)
            if allow is not None and frame["type"] not in allow:
                raise AssertionError(f"expected the connection to close, got {frame}")

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Send ``ping`` and return the ``pong`` (nothing else may arrive in between)."""
        await self.send({"type": "ping"})
        return await self.expect("pong", timeout)

    async def close(self) -> None:
        await self.ws.close()


async def connect_sync(
    ws_url: str,
    *,
    origin: str | None = None,
    client_id: str | None = None,
    hello: bool = True,
    **kwargs: Any,
) -> SyncClient:
    """Open ``/sync``; with ``hello`` (the default) send ``connect`` and await ``connected``.

    The client sends no keepalive pings of its own, so the server sees only the frames a test
    sends. ``kwargs`` go to ``websockets.connect`` (``sock``, ``max_queue`` …).
    """
    options: dict[str, Any] = {
        "origin": origin,
        "ping_interval": None,
        "compression": None,
        "open_timeout": DEFAULT_TIMEOUT,
        "close_timeout": 2,
        **kwargs,
    }
    ws = await websockets.connect(ws_url, **options)
    client = SyncClient(ws)
    if hello:
        client_id = client_id if client_id is not None else f"test-{uuid.uuid4().hex[:12]}"
        await client.send({"type": "connect", "clientId": client_id, "protocol": 1})
        client.connected = await client.expect("connected")
    return client


# ---------------------------------------------------------------------------------- HTTP


def unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


async def auth_post(
    base_url: str, path: str, *, json: dict[str, Any] | None = None, token: str | None = None
) -> httpx.Response:
    """POST to the HTTP auth API (``path`` such as ``/auth/signout``), with a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        return await http.post(base_url + path, json=json, headers=headers)


async def signup(
    base_url: str, email: str | None = None, password: str = PASSWORD
) -> dict[str, Any]:
    """Sign up a new user; the token response (``accessToken``, ``refreshToken`` …)."""
    email = email if email is not None else unique_email()
    response = await auth_post(
        base_url, "/auth/signup", json={"email": email, "password": password}
    )
    assert response.status_code == 201, response.text
    tokens: dict[str, Any] = response.json()
    tokens["email"] = email
    return tokens


async def signin(base_url: str, email: str, password: str = PASSWORD) -> dict[str, Any]:
    """Sign in: a new session of the user; the token response."""
    response = await auth_post(
        base_url, "/auth/signin", json={"email": email, "password": password}
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens
