"""``/sync`` driven in memory: the real :class:`~tether.server.realtime.endpoint.SyncEndpoint`,
built as ``tether serve`` builds it (:meth:`tether.server.app.Node.build`), on a real
``redis-server``, with a fake ASGI ``receive``/``send`` pair in place of uvicorn and a socket (as
Starlette's ``TestClient`` drives an app). No server process: the socket shell, the deadline
queue, the session hub and the live queries run in the test's own event loop.

What needs real processes (several instances, a Redis restart, SIGTERM, TCP buffers, the HTTP
upgrade) stays in ``tests/test_sync.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tether.server.app import Node
from tether.server.auth.service import TokenPair
from tether.server.clock import to_ms
from tether.server.demo import app as demo
from tether.server.settings import Settings

from tests.harness import FAST_ARGON2_ENV, TEST_ISSUER
from tests.sync_client import PASSWORD, check_frame

pytestmark = pytest.mark.timeout(60)

#: Seconds a test waits for a frame it expects.
FRAME_TIMEOUT = 5.0
#: How late (ms, server clock) a pushed auth frame may be after the instant it announces.
TIMER_TOLERANCE_MS = 300


class MemorySocket:
    """One WebSocket as the ASGI app sees it: ``receive`` is fed from a queue by the test, and
    ``send`` records every message the app sends, in order.

    It has no transport (as a server that hides its socket would not):
    ``release_socket_later`` leaves it alone.
    """

    def __init__(self) -> None:
        self._incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._incoming.put_nowait({"type": "websocket.connect"})
        #: Every frame received so far (decoded), for assertions on what did *not* arrive.
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None

    # The two ASGI callables the app is given.

    async def receive(self) -> dict[str, Any]:
        return await self._incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self._outgoing.put_nowait(dict(message))

    # The client's side.

    def send_frame(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        self._incoming.put_nowait({"type": "websocket.receive", "text": text})

    def disconnect(self, code: int = 1000) -> None:
        self._incoming.put_nowait({"type": "websocket.disconnect", "code": code})

    async def next_message(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        """The next ASGI message the app sent (``websocket.accept``/``send``/``close``)."""
        return await asyncio.wait_for(self._outgoing.get(), timeout)

    async def expect(self, kind: str, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        """The next frame, which must be of type ``kind`` and valid under the contract."""
        message = await self.next_message(timeout)
        assert message["type"] == "websocket.send", f"expected {kind}, got {message}"
        frame = check_frame(message["text"])
        self.frames.append(frame)
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    async def expect_close(self, timeout: float = FRAME_TIMEOUT) -> int:
        """The close code of the app's ``websocket.close``, after any frames (kept in
        :attr:`frames`)."""
        while True:
            message = await self.next_message(timeout)
            if message["type"] == "websocket.close":
                self.close_code = int(message["code"])
                return self.close_code
            assert message["type"] == "websocket.send", message
            self.frames.append(check_frame(message["text"]))

    def nothing_sent(self) -> bool:
        return self._outgoing.empty()


Opener = Callable[..., Awaitable[MemorySocket]]


def _settings(redis_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    environ = {
        **FAST_ARGON2_ENV,
        "TETHER_KEYS_FILE": str(tmp_path / "keys.json"),
        "TETHER_ISSUER": TEST_ISSUER,
    }
    return Settings.load({"redis_url": redis_url, **overrides}, environ=environ)


@contextlib.asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[Node]:
    """A node with the background work the app's lifespan starts (revocations, live queries),
    stopped and closed on exit."""
    node = Node.build(settings, demo)
    tasks = [
        asyncio.create_task(node.hub.run()),
        asyncio.create_task(node.sync.subscriptions.run()),
    ]
    try:
        await asyncio.wait_for(node.hub.ready.wait(), FRAME_TIMEOUT)
        yield node
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await node.close()


@contextlib.asynccontextmanager
async def sockets(node: Node) -> AsyncIterator[Opener]:
    """``await open_socket(hello=True)``: a :class:`MemorySocket` served by ``node``'s endpoint
    (accepted, and with ``connect`` answered unless ``hello`` is false). Every socket still
    open on exit is disconnected, and its endpoint call must return."""
    served: list[tuple[MemorySocket, asyncio.Task[None]]] = []

    async def open_socket(hello: bool = True) -> MemorySocket:
        socket = MemorySocket()
        scope = {"type": "websocket", "path": "/sync", "headers": [], "scheme": "ws"}
        task = asyncio.create_task(node.sync(scope, socket.receive, socket.send))
        served.append((socket, task))
        assert (await socket.next_message())["type"] == "websocket.accept"
        if hello:
            client_id = f"c-{uuid.uuid4().hex[:8]}"
            socket.send_frame({"type": "connect", "clientId": client_id, "protocol": 1})
            await socket.expect("connected")
        return socket

    try:
        yield open_socket
    finally:
        for socket, task in served:
            socket.disconnect()
            await asyncio.wait_for(task, FRAME_TIMEOUT)


@pytest.fixture
async def node(redis_url: str, tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(_settings(redis_url, tmp_path)) as node:
        yield node


@pytest.fixture
async def open_socket(node: Node) -> AsyncIterator[Opener]:
    async with sockets(node) as opener:
        yield opener


async def sign_up(node: Node) -> TokenPair:
    """A real account and session, through the same service the HTTP API calls."""
    return await node.auth.sign_up(f"{uuid.uuid4().hex[:12]}@example.com", PASSWORD, "127.0.0.1")


async def authenticate(socket: MemorySocket, tokens: TokenPair) -> None:
    """Subscribe ``whoami`` as queryId 1 and authenticate: the value moves from null to the
    user in a transition after ``auth_ok``."""
    socket.send_frame({"type": "subscribe", "queryId": 1, "name": "whoami", "args": {}})
    assert (await socket.expect("transition"))["updates"] == [{"queryId": 1, "value": None}]
    socket.send_frame({"type": "authenticate", "token": tokens.access_token, "authVersion": 1})
    ok = await socket.expect("auth_ok")
    assert ok["identity"] == {"userId": tokens.user_id, "sessionId": tokens.session_id}
    assert ok["expiresAt"] == tokens.expires_at
    signed_in = await socket.expect("transition")
    assert signed_in["updates"] == [{"queryId": 1, "value": {"userId": tokens.user_id}}]


def assert_on_time(frame: dict[str, Any], due_ms: int) -> None:
    late = frame["serverTime"] - due_ms
    assert 0 <= late <= TIMER_TOLERANCE_MS, f"{frame['type']} {late} ms after its instant: {frame}"


# ---------------------------------------------------------------------------------- tests


async def test_connect_then_ping(open_socket: Opener) -> None:
    socket = await open_socket(hello=False)
    socket.send_frame({"type": "connect", "clientId": "c-1", "protocol": 1})
    connected = await socket.expect("connected")
    assert connected["protocol"] == 1 and isinstance(connected["connectionId"], str)
    socket.send_frame({"type": "ping"})
    await socket.expect("pong")


async def test_connect_must_come_first_and_name_protocol_1(open_socket: Opener) -> None:
    # Moved here from tests/test_sync.py: the rule lives in the connection's core and shell.
    socket = await open_socket(hello=False)
    for early in ({"type": "ping"}, {"type": "subscribe", "queryId": 1, "name": "whoami"}):
        socket.send_frame(early)
        error = await socket.expect("error")
        assert error["code"] == "not_connected", early
    socket.send_frame({"type": "connect", "clientId": "c-1", "protocol": 1})
    assert (await socket.expect("connected"))["protocol"] == 1

    future = await open_socket(hello=False)
    future.send_frame({"type": "connect", "clientId": "c-2", "protocol": 2})
    assert await future.expect_close() == 4503


async def test_authenticate_with_a_real_token_reruns_identity_queries(
    node: Node, open_socket: Opener
) -> None:
    tokens = await sign_up(node)
    socket = await open_socket()
    await authenticate(socket, tokens)
    socket.send_frame({"type": "authenticate", "token": "not.a.jwt", "authVersion": 2})
    error = await socket.expect("auth_error")
    assert (error["authVersion"], error["code"]) == (2, "invalid_token")
    assert (await socket.expect("transition"))["updates"] == [{"queryId": 1, "value": None}]


async def test_a_mutation_reaches_subscribers_before_its_result(
    node: Node, open_socket: Opener
) -> None:
    writer, watcher = await open_socket(), await open_socket()
    for socket in (writer, watcher):
        socket.send_frame(
            {"type": "subscribe", "queryId": 7, "name": "counter.get", "args": {"name": "m"}}
        )
        assert (await socket.expect("transition"))["updates"] == [{"queryId": 7, "value": 0}]
    writer.send_frame(
        {"type": "mutate", "requestId": 1, "name": "counter.increment", "args": {"name": "m"}}
    )
    # Read your writes: the writer's transition comes first, then the result, at its version.
    seen = await writer.expect("transition")
    assert seen["updates"] == [{"queryId": 7, "value": 1}]
    result = await writer.expect("mutation_result")
    assert (result["requestId"], result["value"]) == (1, 1)
    assert seen["version"] >= result["version"]
    elsewhere = await watcher.expect("transition")
    assert elsewhere["updates"] == [{"queryId": 7, "value": 1}]


async def test_sign_out_revokes_the_live_socket(node: Node, open_socket: Opener) -> None:
    tokens = await sign_up(node)
    socket = await open_socket()
    await authenticate(socket, tokens)
    await node.auth.sign_out(tokens.access_token)
    revoked = await socket.expect("session_revoked")
    assert revoked["reason"] == "signed_out"
    assert (await socket.expect("transition"))["updates"] == [{"queryId": 1, "value": None}]


async def test_identity_gets_auth_expiring_then_auth_expired_on_time(
    redis_url: str, tmp_path: Path
) -> None:
    # A 3 s token, its notice 1 s before exp, the identity over 1 s after exp.
    settings = _settings(redis_url, tmp_path, access_ttl=3, expiry_notice=1, clock_leeway=1)
    async with running_node(settings) as node, sockets(node) as open_socket:
        tokens = await sign_up(node)
        socket = await open_socket()
        await authenticate(socket, tokens)
        expiring = await socket.expect("auth_expiring")
        assert expiring["expiresAt"] == tokens.expires_at
        assert_on_time(expiring, tokens.expires_at - 1000)
        expired = await socket.expect("auth_expired")
        assert expired["expiresAt"] == tokens.expires_at
        assert_on_time(expired, tokens.expires_at + 1000)
        assert (await socket.expect("transition"))["updates"] == [{"queryId": 1, "value": None}]
        # The deadline queue holds nothing more for this connection.
        assert socket.nothing_sent()
        assert to_ms(node.clock()) >= tokens.expires_at + 1000


async def test_subscription_limit_answers_limit_exceeded(redis_url: str, tmp_path: Path) -> None:
    # Moved here from tests/test_sync.py: the limit lives in the connection's core.
    settings = _settings(redis_url, tmp_path, max_subscriptions=3)
    async with running_node(settings) as node, sockets(node) as open_socket:
        socket = await open_socket()
        for query_id in (1, 2, 3):
            socket.send_frame({"type": "subscribe", "queryId": query_id, "name": "whoami"})
            await socket.expect("transition")
        socket.send_frame({"type": "subscribe", "queryId": 4, "name": "whoami"})
        error = await socket.expect("error")
        assert (error["code"], error["queryId"]) == ("limit_exceeded", 4)
        # The limit counts live subscriptions: after an unsubscribe there is room again.
        socket.send_frame({"type": "unsubscribe", "queryId": 2})
        socket.send_frame({"type": "subscribe", "queryId": 4, "name": "whoami"})
        added = await socket.expect("transition")
        assert added["updates"] == [{"queryId": 4, "value": None}]


async def test_a_frame_over_max_message_bytes_closes_with_1009(
    redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(redis_url, tmp_path, max_message_bytes=1024)
    async with running_node(settings) as node, sockets(node) as open_socket:
        socket = await open_socket()
        socket.send_frame({"type": "ping", "pad": "x" * 2048})
        assert await socket.expect_close() == 1009


async def test_a_client_that_leaves_releases_its_connection(
    node: Node, open_socket: Opener
) -> None:
    tokens = await sign_up(node)
    socket = await open_socket()
    await authenticate(socket, tokens)  # a subscription, a session binding, deadlines
    assert len(node.sync.connections) == 1
    socket.disconnect()
    async with asyncio.timeout(FRAME_TIMEOUT):
        while node.sync.connections:
            await asyncio.sleep(0.01)
    # Its session ending afterwards reaches no one, and sends nothing.
    await node.auth.sign_out(tokens.access_token)
    await asyncio.sleep(0.2)
    assert socket.nothing_sent()


class _Message(dict[str, Any]):
    """An ASGI message that can be watched with a weak reference."""


async def test_an_idle_socket_keeps_no_message_it_received(node: Node, open_socket: Opener) -> None:
    """While a socket idles, nothing of the endpoint keeps the last ASGI message (and its
    frame text) alive: idle memory per socket (docs/benchmarks.md, "Scale")."""
    socket = await open_socket()
    tokens = await sign_up(node)
    message = _Message(type="websocket.receive")
    message["text"] = json.dumps(
        {"type": "authenticate", "token": tokens.access_token, "authVersion": 1}
    )
    watched = weakref.ref(message)
    socket._incoming.put_nowait(message)
    del message
    await socket.expect("auth_ok")
    await asyncio.sleep(0.05)  # the socket idles in its next receive
    gc.collect()
    assert watched() is None, gc.get_referrers(watched())


class ReadingSocket(MemorySocket):
    """A client that reads and answers the close: after the app's ``websocket.close`` the ASGI
    server reports the disconnect, as uvicorn does once the close frame is out."""

    async def send(self, message: dict[str, Any]) -> None:
        await super().send(message)
        if message["type"] == "websocket.close":
            self.disconnect(int(message.get("code", 1000)))


class StuckSocket(ReadingSocket):
    """A client that stopped reading: once :attr:`stuck`, every frame the app writes waits
    for ever (the transport's buffer never drains), so a close queued behind it never goes."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        await super().send(message)


async def _serve(node: Node, socket: MemorySocket) -> asyncio.Task[None]:
    scope = {"type": "websocket", "path": "/sync", "headers": [], "scheme": "ws"}
    task = asyncio.create_task(node.sync(scope, socket.receive, socket.send))
    assert (await socket.next_message())["type"] == "websocket.accept"
    socket.send_frame({"type": "connect", "clientId": f"c-{uuid.uuid4().hex[:8]}", "protocol": 1})
    await socket.expect("connected")
    return task


async def test_drain_closes_every_socket_with_1012_and_ends_when_they_answer(
    node: Node,
) -> None:
    readers = [ReadingSocket() for _ in range(3)]
    tasks = [await _serve(node, socket) for socket in readers]
    started = asyncio.get_running_loop().time()
    left = await node.sync.drain(30.0)
    assert left == 0
    # Not the bound: every socket answered, so the drain ended as soon as they had.
    assert asyncio.get_running_loop().time() - started < 5.0
    for socket, task in zip(readers, tasks, strict=True):
        assert await socket.expect_close() == 1012
        await asyncio.wait_for(task, FRAME_TIMEOUT)
    # A socket accepted while the instance drains is closed with 1012 at once.
    late = ReadingSocket()
    scope = {"type": "websocket", "path": "/sync", "headers": [], "scheme": "ws"}
    late_task = asyncio.create_task(node.sync(scope, late.receive, late.send))
    closed = [await late.next_message(), await late.next_message()]
    assert [m["type"] for m in closed] == ["websocket.accept", "websocket.close"]
    assert closed[1]["code"] == 1012
    await asyncio.wait_for(late_task, FRAME_TIMEOUT)


@pytest.mark.parametrize("drain_timeout", [0.5, 2.0])
async def test_drain_waits_for_a_socket_that_cannot_take_its_close_at_most_the_timeout(
    node: Node, drain_timeout: float
) -> None:
    stuck, reader = StuckSocket(), ReadingSocket()
    stuck_task = await _serve(node, stuck)
    reader_task = await _serve(node, reader)
    stuck.stuck = True
    stuck.send_frame({"type": "ping"})  # its pong now waits for ever, and the close behind it
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    left = await node.sync.drain(drain_timeout)
    waited = loop.time() - started
    assert left == 1  # the stuck socket is left to the ASGI server's shutdown
    assert drain_timeout <= waited < drain_timeout + 1.0, waited
    assert await reader.expect_close() == 1012
    await asyncio.wait_for(reader_task, FRAME_TIMEOUT)
    stuck.stuck = False
    stuck.disconnect()
    await asyncio.wait_for(stuck_task, FRAME_TIMEOUT)
