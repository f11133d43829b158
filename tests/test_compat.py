"""The dependency internals Tether relies on (``server/tether/server/compat/``), checked against
the installed dependencies themselves: a real uvicorn server, a real Redis Cluster, the running
Python's asyncio.

Each test fails with a message that names the dependency, its version and what changed, so an
upgrade that breaks one of them says which compat function to fix instead of surfacing as a
socket never aborted, a burst answered ``unavailable`` or a stuck writer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import inspect
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import h11
import pytest
import redis.asyncio
import uvicorn
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.exceptions import MovedError
from tether.server.compat.asyncio import start_eagerly
from tether.server.compat.redis import (
    NodeHookedCluster,
    cancel_safe,
    node_of_command,
    reload_layout,
)
from tether.server.compat.uvicorn import (
    _UpgradeRequest,
    cache_handshake_date,
    limited_protocols,
    transport_of,
    upgrade_head,
)
from tether.server.connection_limits import AddressCap, TrustedProxies

from tests.harness import RedisClusterProcess, free_port, recv_until
from tests.test_sync import OVERSIZE_DECLARED, OVERSIZE_FIRST, _masked_frame

pytestmark = pytest.mark.timeout(60)

#: The WebSocket implementation ``tether serve`` asks uvicorn for (server/tether/server/cli.py).
TETHER_WS_IMPLEMENTATION = "websockets-sansio"


@contextlib.asynccontextmanager
async def serving_uvicorn(config: uvicorn.Config) -> AsyncIterator[uvicorn.Server]:
    """A uvicorn server in this event loop, started before the body and stopped after it."""
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


# ---------------------------------------------------------------------------------- uvicorn


async def test_uvicorn_send_leads_to_the_sockets_transport() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        transport = transport_of(send)
        seen["transport"] = transport
        seen["peer"] = None if transport is None else transport.get_extra_info("peername")
        await send({"type": "websocket.close", "code": 1000})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws=TETHER_WS_IMPLEMENTATION, lifespan="off"
    )
    async with serving_uvicorn(config):
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
            local = ws.transport.get_extra_info("sockname")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    assert seen.get("transport") is not None, (
        f"uvicorn {version('uvicorn')} ({TETHER_WS_IMPLEMENTATION}): the ASGI send is no longer "
        "a bound method of a protocol with an asyncio WriteTransport at send.__self__.transport; "
        "tether.server.compat.uvicorn.transport_of must find the socket another way, or "
        "release_socket_later can no longer abort a client that never completes the close"
    )
    assert tuple(seen["peer"])[:2] == tuple(local)[:2], (
        f"uvicorn {version('uvicorn')}: send.__self__.transport is not this connection's socket"
    )


async def test_messages_to_a_waiting_app_do_not_stop_the_reads_and_others_do() -> None:
    """Tether's WebSocket protocol does not stop and restart reading the socket for a message
    that an app waiting in receive() takes at once (uvicorn does, two epoll_ctl calls per
    message); a message the app does not wait for stops the reads as uvicorn's does, so what is
    queued for an app that does not read stays bounded."""
    http, ws = limited_protocols(AddressCap(0), TrustedProxies([]), 20.0, 10.0)
    pauses = 0
    seen: dict[str, Any] = {}
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal pauses
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        transport = transport_of(send)
        assert transport is not None
        pause = transport.pause_reading

        def counted() -> None:
            nonlocal pauses
            pauses += 1
            pause()

        transport.pause_reading = counted  # type: ignore[method-assign]
        seen["protocol"], seen["transport"] = send.__self__, transport
        while (message := await receive())["type"] == "websocket.receive":
            if message["text"] == "hold":
                await send({"type": "websocket.send", "text": "holding"})
                await release.wait()  # not reading: what arrives meanwhile waits in the queue
                continue
            await send({"type": "websocket.send", "text": message["text"]})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, ws=ws, lifespan="off")
    async with serving_uvicorn(config):
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as client:
            for i in range(20):
                await client.send(str(i))
                assert await client.recv() == str(i)
            assert pauses == 0, (
                f"uvicorn {version('uvicorn')}: reads stopped {pauses} times for messages the "
                "app waited for (LimitedWebSocketProtocol.send_receive_event_to_app)"
            )
            await client.send("hold")
            assert await client.recv() == "holding"
            await client.send("queued")
            protocol, transport = seen["protocol"], seen["transport"]
            while protocol.queue.empty():
                await asyncio.sleep(0.01)  # polls for the server's read (no event to await)
            assert pauses == 1 and not transport.is_reading(), (
                f"uvicorn {version('uvicorn')}: a message the app did not wait for left the "
                "socket's reads on: the queue of an app that does not read is unbounded"
            )
            release.set()
            assert await client.recv() == "queued"
            assert transport.is_reading()


# ------------------------------------------------------------------ upgrades without h11


def _h11_upgrade(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """What uvicorn's h11 path upgrades ``data`` to: the target and the lower-cased headers of
    the one whole GET request h11 parses from it, when uvicorn would upgrade it to a WebSocket
    (its own ``_get_upgrade``), with nothing after it; None otherwise."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or conn.trailing_data[0]:
        return None
    headers = [(name.lower(), value) for name, value in event.headers]
    upgrade = H11Protocol._get_upgrade(types.SimpleNamespace(headers=headers))  # type: ignore[arg-type]
    if upgrade != b"websocket" or event.method != b"GET" or event.http_version != b"1.1":
        return None
    return event.target, headers


#: Upgrade heads as clients send them: websockets' client (the Python client's) and Chromium's.
CLIENT_HEADS = [
    b"GET /sync HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"User-Agent: Python/3.11 websockets/17.4\r\n\r\n",
    b"GET /sync?v=1 HTTP/1.1\r\nHost: app.example:8443\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)"
    b" AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\nOrigin: https://app.example\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
]


def test_client_upgrade_heads_skip_h11_and_parse_as_h11_does() -> None:
    import websockets.client
    import websockets.uri

    protocol = websockets.client.ClientProtocol(websockets.uri.parse_uri("ws://127.0.0.1:1/sync"))
    head = protocol.connect().serialize()
    for data in [head, *CLIENT_HEADS]:
        assert upgrade_head(data) is not None, data  # the fast path is taken
        assert upgrade_head(data) == _h11_upgrade(data), data
        _assert_stands_in_for_h11(data)


def _assert_stands_in_for_h11(data: bytes) -> None:
    """The event the upgrade without h11 hands uvicorn has every field of the h11 ``Request``
    that h11's path would hand it, with the same value."""
    parsed = upgrade_head(data)
    assert parsed is not None
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    stand_in = _UpgradeRequest(*parsed)
    for name in type(event).__slots__:
        assert getattr(stand_in, name) == getattr(event, name), (name, data)


_request_lines = st.sampled_from(
    [
        b"GET /sync HTTP/1.1",
        b"GET /sync?token=a%20b&x HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET http://h/sync HTTP/1.1",
        b"get /sync HTTP/1.1",
        b"GET /sync HTTP/1.0",
        b"GET /sync HTTP/2.0",
        b"POST /sync HTTP/1.1",
        b"GET  /sync HTTP/1.1",
        b"GET /sync HTTP/1.1 ",
        b"GET /s\x7fync HTTP/1.1",
        b"GET /s\xc3\xa9 HTTP/1.1",
        b"GET HTTP/1.1",
        b"",
    ]
) | st.builds(lambda target: b"GET " + target + b" HTTP/1.1", st.binary(min_size=0, max_size=6))
_names = st.sampled_from(
    [
        b"Host",
        b"host",
        b"HOST",
        b"Upgrade",
        b"Connection",
        b"connection",
        b"Sec-WebSocket-Key",
        b"Sec-WebSocket-Version",
        b"Content-Length",
        b"Transfer-Encoding",
        b"X-Forwarded-For",
        b"Bad Name",
        b"",
        b"a(b",
    ]
) | st.binary(min_size=0, max_size=4)
_values = st.sampled_from(
    [
        b"websocket",
        b"WebSocket",
        b"h2c",
        b"Upgrade",
        b"keep-alive, Upgrade",
        b"upgrade,",
        b" Upgrade ",
        b"websocket, h2c",
        b"0",
        b"chunked",
        b"dGhlIHNhbXBsZSBub25jZQ==",
        b"13",
        b"a  \t b",
        b"",
        b"x\x00y",
        b"a\x01b",
        b"\xff\xfe",
        b"a\x0bb",
        b"a\rb",
        b"a\nb",
    ]
) | st.binary(min_size=0, max_size=6)
_separators = st.sampled_from([b": ", b":", b":\t", b" :", b":  ", b": \t"])
_trailers = st.sampled_from([b"", b"", b" ", b"\t", b" \t "])
_line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])


def _mostly(draw: st.DrawFn, usual: bytes, other: st.SearchStrategy[bytes]) -> bytes:
    """``usual`` 4 times in 5, else something drawn from ``other``."""
    return usual if draw(st.integers(0, 4)) else draw(other)


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    """Upgrade heads, about half of them ones a client sends, the rest open to what h11
    refuses or reads another way (a bare LF, folded lines, odd bytes, a body, a missing or
    repeated header, another upgrade)."""
    lines = [_mostly(draw, b"GET /sync HTTP/1.1", _request_lines)]
    required = [
        (b"Host", b"localhost"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    fields = [pair for pair in required if draw(st.integers(0, 19))]  # each kept 19 in 20
    for _ in range(draw(st.integers(0, 3))):
        name = _mostly(draw, b"X-Extra", _names)
        fields.append((name, _mostly(draw, b"some value", _values)))
    if draw(st.integers(0, 5)) == 0:
        fields.append(draw(st.sampled_from(required)))  # a repeated header
    fields = draw(st.permutations(fields))
    for name, value in fields:
        line = name + _mostly(draw, b": ", _separators) + value + _mostly(draw, b"", _trailers)
        if draw(st.integers(0, 29)) == 0:
            line = draw(st.sampled_from([b" folded", b"\tfolded"])) + b"\r\n" + line
        lines.append(line)
    end = b"\r\n" if draw(st.integers(0, 9)) else draw(_line_ends)
    data = end.join(lines) + end
    data += _mostly(draw, b"\r\n", st.sampled_from([b"\n", b"", b"\r\nx", b"\r\n\r\n"]))
    if draw(st.integers(0, 9)) == 0:  # one byte anywhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at:]
    return data


_UPGRADE = b"GET /sync HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_heads())
# The grammar's edges, each a way to read a head another way than h11 (found by chance only).
@example(_UPGRADE + b"Upgrade: websocket\r\nX: a\x0bb\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nX: a\x0cb\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nX: a\rb\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nX: a\x00b\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nX: \x7f\x80\xff \t\r\n\r\n")
@example(_UPGRADE + b"Upgrade: h2c\r\nUpgrade: websocket\r\n\r\n")  # uvicorn reads the last
@example(_UPGRADE + b"Upgrade: websocket\r\nUpgrade: h2c\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nConnection: close\r\n\r\n")
@example(_UPGRADE + b"Upgrade: websocket\r\nContent-Length: 0\r\n\r\n")
def test_an_upgrade_skips_h11_only_where_h11_reads_it_the_same(data: bytes) -> None:
    """upgrade_head never reads a request another way than uvicorn's h11 path: where it parses
    one, h11 parses the same target and headers and uvicorn upgrades it; anything else it
    leaves to h11 (whose answer, a 400 or a plain request, is then unchanged)."""
    fast = upgrade_head(data)
    if fast is not None:
        assert fast == _h11_upgrade(data), data
        assert all(name not in (b"content-length", b"transfer-encoding") for name, _ in fast[1])
        _assert_stands_in_for_h11(data)


async def test_both_upgrade_paths_give_the_app_the_same_websocket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Against a real uvicorn with Tether's protocols: a head whole in one read upgrades without
    h11 (its h11 connection is never used), a head in two reads through h11, and the app sees
    the same scope from both; a head h11 refuses gets h11's 400 as before."""
    http, ws = limited_protocols(AddressCap(0), TrustedProxies([]), 20.0, 10.0)
    made: list[Any] = []

    reads = threading.Semaphore(0)

    class Recorded(http):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(self)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            reads.release()

    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        scopes.append(scope)
        await receive()
        await send({"type": "websocket.accept"})
        await receive()

    def exchange(port: int, *parts: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for part in parts:
                sock.sendall(part)
                # The next part is sent once the server has read this one: separate reads.
                assert reads.acquire(timeout=10), "the server did not read the part"
            return recv_until(sock, b"\r\n\r\n")

    head = CLIENT_HEADS[1]
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=Recorded, ws=ws, lifespan="off")
    async with serving_uvicorn(config):
        whole = await asyncio.to_thread(exchange, port, head)
        assert whole.startswith(b"HTTP/1.1 101 "), whole
        assert made[-1].conn.their_state is h11.IDLE, "the whole head went through h11"
        split = await asyncio.to_thread(exchange, port, head[:20], head[20:])
        assert split.startswith(b"HTTP/1.1 101 "), split
        assert made[-1].conn.their_state is not h11.IDLE, "the split head did not use h11"
        fast, slow = scopes
        for key in ("path", "raw_path", "query_string", "headers", "subprotocols", "scheme"):
            assert fast[key] == slow[key], key
        assert all(name == name.lower() for name, _ in fast["headers"])
        # No Host: h11's 400, in one read as in two.
        hostless = head.replace(b"Host: app.example:8443\r\n", b"")
        for parts in ((hostless,), (hostless[:20], hostless[20:])):
            answer = await asyncio.to_thread(exchange, port, *parts)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
        # A whole head after a partial line in an earlier read is that line's continuation.
        answer = await asyncio.to_thread(exchange, port, b"GET /x HTTP/1.1\r\nX", head)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert len(scopes) == 2


def test_the_handshake_date_is_formatted_once_a_second() -> None:
    import websockets.server

    source = inspect.getsource(websockets.server.ServerProtocol.accept)
    assert "email.utils.formatdate(usegmt=True)" in source, (
        f"websockets {version('websockets')}: ServerProtocol.accept no longer formats its Date "
        "with email.utils.formatdate; adapt tether.server.compat.uvicorn.cache_handshake_date"
    )
    cache_handshake_date()
    cache_handshake_date()  # idempotent
    formatter = vars(websockets.server)["email"].utils
    protocol = websockets.server.ServerProtocol()
    protocol.receive_data(
        b"GET /sync HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    [request] = protocol.events_received()
    before = email.utils.formatdate(usegmt=True)
    response = protocol.accept(request)
    after = email.utils.formatdate(usegmt=True)
    assert response.status_code == 101
    assert response.headers["Date"] in (before, after)  # the same string as email.utils'
    assert formatter._second != -1  # and it came from the cache
    assert formatter.formatdate(0, usegmt=True) == email.utils.formatdate(0, usegmt=True)
    # websockets.server's whole view of email is unchanged but for the cached date.
    seen = vars(websockets.server)["email"]
    for name in ("format_datetime", "parsedate_to_datetime", "formataddr", "localtime"):
        assert getattr(seen.utils, name) is getattr(email.utils, name), name
    assert seen.message_from_string is email.message_from_string


def test_the_date_cache_leaves_a_websockets_without_its_email_import_alone() -> None:
    """Should websockets stop formatting the date through its ``email`` name, the server must
    still start: the cache is skipped, not a KeyError at start-up."""
    code = (
        "import websockets.server as s\n"
        "from email.utils import formatdate\n"
        "del vars(s)['email']\n"
        "s.formatdate = formatdate\n"
        "from tether.server.compat.uvicorn import limited_protocols\n"
        "from tether.server.connection_limits import AddressCap, TrustedProxies\n"
        "limited_protocols(AddressCap(0), TrustedProxies([]), 20.0, 2.0)\n"
        "assert 'email' not in vars(s)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-600:]


# ---------------------------------------------------------------------------------- redis-py


class _Recording(NodeHookedCluster):
    """Records the node of every command that passes the hook."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes: list[str] = []

    def around_node(self, node_name: str) -> Any:
        self.nodes.append(node_name)
        return super().around_node(node_name)


async def _owner_of(cluster: RedisClusterProcess, key: str) -> str:
    """The node serving ``key``, as the cluster itself says: the one master that answers a
    ``GET`` of it instead of redirecting (``MOVED``)."""
    owners = []
    for port in cluster.live_ports:
        async with redis.asyncio.Redis(host="127.0.0.1", port=port) as probe:
            try:
                await probe.execute_command("GET", key)
            except MovedError:
                continue
            owners.append(f"127.0.0.1:{port}")
    assert len(owners) == 1, owners
    return owners[0]


#: SHA-256 of redis-py 8.1's ``AbstractConnection.send_packed_command`` source, which
#: ``tether.server.compat.redis._CancelSafeWrites`` re-implements (under asyncio.timeout).
SEND_PACKED_COMMAND_SHA256 = "baaeabd916209157db40455f034a0bac6fb3e2db902271313e0702bcbc678321"


def test_redis_send_packed_command_is_the_one_the_cancel_safe_copy_replaces() -> None:
    from redis.asyncio.connection import AbstractConnection

    source = inspect.getsource(AbstractConnection.send_packed_command)
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert "self._send_packed_command(command)" in source and digest == (
        SEND_PACKED_COMMAND_SHA256
    ), (
        f"redis-py {version('redis')}: AbstractConnection.send_packed_command changed. "
        "tether.server.compat.redis._CancelSafeWrites re-implements it with asyncio.timeout "
        "instead of asyncio.wait_for (which loses cancellations on Python 3.11): carry the "
        "change over (or drop the override if redis-py no longer writes under wait_for), then "
        f"update SEND_PACKED_COMMAND_SHA256 to {digest}"
    )


async def test_every_cluster_node_connects_with_the_cancel_safe_class(
    cluster: RedisClusterProcess,
) -> None:
    """cancel_safe_cluster sets the class in the client's connection_kwargs, the dict every
    node learnt later is built from: it must be the node manager's own."""
    from tether.server.redis.connection import connect

    client = connect(cluster.url)
    try:
        assert isinstance(client, redis.asyncio.RedisCluster)
        assert client.connection_kwargs is client.nodes_manager.connection_kwargs, (
            f"redis-py {version('redis')}: the cluster client no longer shares its "
            "connection_kwargs with its NodesManager; cancel_safe_cluster must set the "
            "connection class where nodes are built now"
        )
        await client.set("compat:{a}", "1")
        nodes = client.get_nodes()
        assert len(nodes) >= 3
        assert all(node.connection_class is cancel_safe(node.connection_class) for node in nodes)
        used = [c for node in nodes for c in node._connections]
        assert used and all(type(c) is cancel_safe(type(c)) for c in used)
    finally:
        await client.aclose()


async def test_redis_cluster_commands_pass_the_per_node_hook(cluster: RedisClusterProcess) -> None:
    assert "_execute_command" in vars(redis.asyncio.RedisCluster), (
        f"redis-py {version('redis')}: RedisCluster has no _execute_command any more; "
        "tether.server.compat.redis.NodeHookedCluster must hook per-node commands elsewhere"
    )
    client = _Recording.from_url(cluster.url.replace("+cluster", "", 1), decode_responses=True)
    seen: list[list[str]] = []
    try:
        for key in ("compat:{a}", "compat:{b}", "compat:{c}"):
            await client.set(key, "1")  # a stale slot map is corrected by the MOVED reply
            before = len(client.nodes)
            await client.get(key)
            seen.append(client.nodes[before:])
    finally:
        await client.aclose()
    owners = [[await _owner_of(cluster, key)] for key in ("compat:{a}", "compat:{b}", "compat:{c}")]
    assert seen == owners, (
        f"redis-py {version('redis')}: a cluster command no longer passes "
        f"RedisCluster._execute_command once with its target node (the hook saw {seen}, the keys "
        f"live on {owners}); Tether's per-node turns (tether.server.redis.connection) are bypassed"
    )


async def test_redis_cluster_node_of_a_command_is_its_first_keys_node(
    cluster: RedisClusterProcess,
) -> None:
    client = cluster.client()
    try:
        for key in ("compat:{a}", "compat:{b}", "compat:{c}"):
            try:
                found = await node_of_command(client, ("INCR", key))
            except AttributeError as exc:
                pytest.fail(
                    f"redis-py {version('redis')}: the cluster client's commands_parser.get_keys "
                    f"is gone ({exc}); tether.server.compat.redis.node_of_command needs another "
                    "way to find a command's keys"
                )
            assert found == await _owner_of(cluster, key), (
                f"redis-py {version('redis')}: node_of_command names the wrong node for {key}"
            )
        assert await node_of_command(client, ("PING",)) is None
    finally:
        await client.aclose()


async def test_redis_cluster_layout_reloads_with_a_failed_node_asked_last(
    cluster: RedisClusterProcess,
) -> None:
    client = cluster.client()
    try:
        await client.initialize()
        first = f"127.0.0.1:{cluster.ports[0]}"
        try:
            await reload_layout(client, first)
        except (AttributeError, TypeError) as exc:
            pytest.fail(
                f"redis-py {version('redis')}: RedisCluster.nodes_manager.initialize("
                f"last_failed_node_name=...) changed ({exc}); "
                "tether.server.compat.redis.reload_layout must re-read the slot map another way"
            )
        # The map is whole again: every key still routes, and to its owner.
        assert await node_of_command(client, ("GET", "compat:{a}")) == await _owner_of(
            cluster, "compat:{a}"
        )
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------- asyncio


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are Python 3.12+")
async def test_python_has_eager_tasks() -> None:
    assert hasattr(asyncio, "eager_task_factory"), (
        f"Python {sys.version}: asyncio.eager_task_factory is gone; "
        "tether.server.compat.asyncio.start_eagerly needs another way to start eagerly"
    )


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the hand driver is for Python 3.11")
async def test_python_311_futures_carry_the_blocking_flag_the_driver_clears() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> int:
        return await future

    coro = waits()
    yielded = coro.send(None)
    assert yielded is future and getattr(future, "_asyncio_future_blocking", None) is True, (
        f"Python {sys.version}: an awaited future no longer sets _asyncio_future_blocking; "
        "tether.server.compat.asyncio's 3.11 driver of start_eagerly relies on it"
    )
    coro.close()


async def test_start_eagerly_runs_inline_then_hands_a_waiting_coroutine_to_a_task() -> None:
    # The contract both implementations keep (tests/test_eager.py covers it in depth).
    gate = asyncio.Event()
    steps: list[str] = []

    async def work() -> None:
        steps.append("inline")
        await gate.wait()
        steps.append("task")

    task = start_eagerly(work())
    assert steps == ["inline"] and task is not None
    gate.set()
    await asyncio.wait_for(task, 1)
    assert steps == ["inline", "task"]


def test_uvicorn_protocols_have_what_limited_protocols_extends() -> None:
    # tether.server.compat.uvicorn.limited_protocols subclasses these and reads their state;
    # draining_server's startup calls Server._log_started_message. The behaviour itself is
    # tested against the real server in tests/test_http_limits.py.
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    needed = {
        H11Protocol: (
            "connection_made",
            "connection_lost",
            "data_received",
            "on_response_complete",
            "handle_websocket_upgrade",
            "_unset_keepalive_if_required",
        ),
        WebSocketsSansIOProtocol: (
            "connection_lost",
            "data_received",
            "handle_parser_exception",
            "handle_ping",
            "send_receive_event_to_app",
            "receive",
            "stop_keepalive",
        ),
        uvicorn.Server: ("startup", "_log_started_message"),
    }
    for cls, names in needed.items():
        missing = [name for name in names if not hasattr(cls, name)]
        assert not missing, (
            f"uvicorn {version('uvicorn')}: {cls.__qualname__} has no {missing}; adapt "
            "tether.server.compat.uvicorn (limited_protocols, draining_server)"
        )
    # The upgrade without h11 hands handle_websocket_upgrade a stand-in for h11's Request,
    # which has h11's fields (_assert_stands_in_for_h11): what it reads must be one of them.
    source = inspect.getsource(H11Protocol.handle_websocket_upgrade)
    read = {name.removeprefix("event.") for name in re.findall(r"event\.\w+", source)}
    assert read and read <= set(h11.Request.__slots__), (
        f"uvicorn {version('uvicorn')}: handle_websocket_upgrade reads {read} of its event; "
        "adapt tether.server.compat.uvicorn._UpgradeRequest"
    )


# ---------------------------------------------------------------------------------- lingering close

#: The close grace given to limited_protocols below (seconds).
LINGER_GRACE = 1.0


def _failing_client(port: int, keep_sending: bool, stop: threading.Event) -> float:
    """Fail a WebSocket with an oversize frame, then send a ping every 0.1 s (or nothing),
    never an EOF, until the server drops the socket or ``stop`` is set; the seconds from the
    oversize frame to the drop (``inf``: not dropped)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while not response.endswith(b"\r\n\r\n"):
            response += sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        sock.sendall(_masked_frame(0x1, b"x" * OVERSIZE_FIRST, declared=OVERSIZE_DECLARED))
        failed = time.monotonic()
        ping = _masked_frame(0x9, b"p")
        while not stop.is_set() and time.monotonic() - failed < 10 * LINGER_GRACE:
            try:
                if keep_sending:
                    sock.sendall(ping)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - failed
            stop.wait(0.1)
        return float("inf")
    finally:
        sock.close()


@pytest.mark.parametrize("keep_sending", [True, False], ids=["still-sending", "silent"])
async def test_the_linger_after_a_failed_websocket_ends_at_its_own_grace(
    keep_sending: bool,
) -> None:
    """Without Tether's endpoint (whose own abort after the same grace would hide a linger
    that never ends): a client that keeps sending after its connection failed, and one that
    goes silent without an EOF, both lose the socket within the grace."""
    http, ws = limited_protocols(AddressCap(0), TrustedProxies([]), 20.0, LINGER_GRACE)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=http, ws=ws, ws_max_size=4096, lifespan="off"
    )
    stop = threading.Event()
    async with serving_uvicorn(config) as server:
        client = asyncio.create_task(asyncio.to_thread(_failing_client, port, keep_sending, stop))
        try:
            while not server.server_state.connections and not client.done():
                await asyncio.sleep(0.01)
            began = time.monotonic()
            while server.server_state.connections and time.monotonic() - began < 10:
                await asyncio.sleep(0.05)
            held = time.monotonic() - began
            assert not server.server_state.connections, f"still open after {held:.1f} s"
            assert held < LINGER_GRACE + 2, f"held {held:.1f} s (grace {LINGER_GRACE} s)"
        finally:
            stop.set()
            await client
