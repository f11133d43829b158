"""uvicorn: the socket transport behind the ASGI ``send`` it hands a WebSocket app, hooks into
its start-up and shutdown, and its HTTP and WebSocket protocols with Tether's connection limits.

ASGI gives an app no handle on its connection's socket; uvicorn's ``send`` is a bound method
of its protocol object, whose ``transport`` attribute is the socket's asyncio transport.

ASGI's lifespan shutdown runs only after uvicorn has closed every WebSocket itself (1012, not
waiting for the client), too late for an app to drain its own sockets: :func:`draining_server`
runs the app's drain from ``uvicorn.Server.shutdown``, which uvicorn calls first. Its start-up
binds the sockets as uvicorn does but accepts through :class:`tether.server.listener.Listener`,
which backs off when out of file descriptors (asyncio's accept loop does not, on 3.11).

uvicorn has no deadline for a request that arrives slowly nor any per-address cap: its
keep-alive timer runs only between requests. :func:`limited_protocols` subclasses its h11 and
websockets-sansio protocols (``conn``, ``cycle``, ``client``, ``headers`` and
``handle_websocket_upgrade`` are internals) to add both. Its WebSocket protocol also closes a
connection it fails (an oversize frame, a protocol error) only after the client has stopped
sending (see :func:`limited_protocols`), and its HTTP protocol hands a WebSocket upgrade that
arrives whole in its socket's first read to the WebSocket protocol without h11's parse (see
:func:`upgrade_head`; ``ws_protocol_class`` and ``_unset_keepalive_if_required`` are internals
too; its event stands in for h11's ``Request``, field for field).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import re
import socket
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tether.server.connection_limits import AddressCap, TrustedProxies, address_key
from tether.server.listener import Listener

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("tether.server.connections")

#: uvicorn's exit status when the server cannot start (``uvicorn.server.STARTUP_FAILURE``).
STARTUP_FAILURE = 3

#: Bytes a failed WebSocket (its close frame sent, its sending side shut) reads and discards
#: while it waits for the client to stop sending, before it gives up and closes the socket:
#: the rest of an oversize frame a client was sending, a few frames queued behind it.
LINGER_MAX_BYTES = 4 << 20


# h11's request grammar (h11/_abnf.py, RFC 9110/9112), as bytes patterns. A field line is a
# token, a colon, then a value with optional spaces or tabs around it, where a value is runs of
# any byte but NUL and whitespace joined by spaces or tabs: so what follows the colon is any
# bytes but NUL, CR, LF, VT and FF, and the value is that with its spaces and tabs stripped.
# Written so, neither pattern backtracks more than a line end: OWS-value-OWS as one pattern
# takes quadratic time to refuse a long run of spaces and tabs.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_REST = rb"[^\x00\n\r\x0b\x0c]*"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):(" + _FIELD_REST + rb")\r\n")
#: The one request shape :func:`upgrade_head` parses: ``GET``, an origin-form or other
#: visible-ASCII target, HTTP/1.1, CRLF line ends, no folded lines, nothing after the head.
_UPGRADE_HEAD = re.compile(
    rb"GET ([\x21-\x7e]+) HTTP/1\.1\r\n((?:" + _TOKEN + rb":" + _FIELD_REST + rb"\r\n)*)\r\n"
)
#: Longer heads take h11's path (so its size handling stays the only one for them).
UPGRADE_HEAD_MAX_BYTES = 8192


def upgrade_head(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The target and the headers (names lower-cased, as uvicorn keeps them) of ``data`` when it
    is exactly one WebSocket upgrade request that h11 would parse to the same and uvicorn would
    upgrade; None for anything else, which then takes h11's path unchanged.

    uvicorn parses an upgrade with h11, writes the head out again from what h11 parsed, and
    hands those bytes to websockets, which parses them again (about 25 us of h11 per socket).
    For the requests this accepts, the bytes websockets gets are the same either way, so its
    answer is too; everything else (another method or version, a bare LF, a folded or malformed
    line, a body, no or several ``Host``, a head over :data:`UPGRADE_HEAD_MAX_BYTES`, any other
    upgrade) keeps h11's answer. ``tests/test_compat.py`` holds this against h11 itself.
    """
    if len(data) > UPGRADE_HEAD_MAX_BYTES or not data.startswith(b"GET "):
        return None
    match = _UPGRADE_HEAD.fullmatch(data)
    if match is None:
        return None
    headers = [(name.lower(), rest.strip(b" \t")) for name, rest in _FIELD.findall(match[2])]
    hosts = 0
    connection: list[bytes] = []
    upgrade = None
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"connection":  # uvicorn reads the last of each
            connection = [token.lower().strip() for token in value.split(b",")]
        elif name == b"upgrade":
            upgrade = value.lower()
        elif name == b"content-length" or name == b"transfer-encoding":
            return None  # h11 checks these; an upgrade has no body
    # h11 refuses an HTTP/1.1 request without exactly one Host (RFC 9112 §3.2).
    if hosts != 1 or upgrade != b"websocket" or b"upgrade" not in connection:
        return None
    return match[1], headers


class _UpgradeRequest:
    """The h11 ``Request`` of an upgrade :func:`upgrade_head` parsed, which uvicorn's
    ``handle_websocket_upgrade`` gets in place of h11's.

    It has every field of h11's ``Request``, with the values h11 gives (``method``, ``target``,
    ``http_version``, and ``headers``, h11's ``Headers``, built only when read: uvicorn reads
    only ``method`` and ``target``), so a uvicorn that reads more of its event still upgrades.
    The one difference: the header names that ``headers.raw_items()`` gives are lower-cased.
    """

    __slots__ = ("_fields", "_headers", "target")
    method = b"GET"
    http_version = b"1.1"

    def __init__(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.target = target
        self._fields = headers
        self._headers: Any = None

    @property
    def headers(self) -> Any:
        if self._headers is None:
            import h11

            request = h11.Request(method=self.method, target=self.target, headers=self._fields)
            self._headers = request.headers
        return self._headers


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole ``Connection: close`` response with Tether's JSON error body, for answers given
    outside any request cycle (the request never arrived whole, or was not let in)."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def transport_of(send: Callable[..., Any]) -> asyncio.WriteTransport | None:
    """The asyncio transport of the socket behind ``send``, or None when ``send`` does not come
    from a uvicorn protocol that has one (another ASGI server, an in-memory test harness).

    Never raises: a server that hides its transport leaves callers without the abort, nothing
    worse. Which of uvicorn's WebSocket implementations exposes it is checked by
    ``tests/test_compat.py``.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None


def draining_server(
    config: uvicorn.Config, drain: Callable[[], Awaitable[object]]
) -> uvicorn.Server:
    """A ``uvicorn.Server`` whose shutdown stops accepting, awaits ``drain()``, then does what
    uvicorn does (closing what is left, the lifespan's shutdown), and which accepts through a
    :class:`~tether.server.listener.Listener` (host and port without TLS, as ``tether serve``
    runs; other set-ups keep uvicorn's accept loop).

    A second Ctrl-C (uvicorn's ``force_exit``) cuts the drain short, as it cuts uvicorn's own
    wait for connections.
    """
    import uvicorn  # imported here: ``tether --help`` must not pay for it

    class _DrainingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            config = self.config
            if config.fd is not None or config.uds is not None or config.ssl:
                await super().startup(sockets)  # not how ``tether serve`` runs
                return
            # uvicorn.Server.startup's host/port case, accepting through our Listener.
            await self.lifespan.startup()
            if self.lifespan.should_exit:
                sys.exit(STARTUP_FAILURE)

            def create_protocol() -> asyncio.Protocol:
                protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )
                return protocol

            if sockets:
                # Bound by the caller (``tether serve`` binds before it starts anything else,
                # so that a port in use is one clear line).
                listening = list(sockets)
            else:
                listening = await self._bind(create_protocol)
            for sock in listening:
                sock.listen(config.backlog)  # asyncio's start_serving would have
            listener = Listener(listening, create_protocol)
            listener.start()
            # uvicorn's shutdown only calls close() and wait_closed() on these.
            self.servers = [listener]  # type: ignore[list-item]
            self._log_started_message(listening)
            self.started = True

        async def _bind(
            self, create_protocol: Callable[[], asyncio.Protocol]
        ) -> list[socket.socket]:
            config = self.config
            loop = asyncio.get_running_loop()
            try:
                # Bound by asyncio (every address the host resolves to, SO_REUSEADDR, the
                # same messages as uvicorn's on failure), never served by it.
                bound = await loop.create_server(
                    create_protocol,
                    host=config.host,
                    port=config.port,
                    ssl=config.ssl,
                    backlog=config.backlog,
                    start_serving=False,
                )
            except OSError as exc:
                logging.getLogger("uvicorn.error").error(exc)
                await self.lifespan.shutdown()
                sys.exit(STARTUP_FAILURE)
            listening = [
                socket.socket(s.family, s.type, s.proto, fileno=os.dup(s.fileno()))
                for s in bound.sockets
            ]
            bound.close()  # its descriptors; ours stay bound
            return listening

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Stop accepting first, as uvicorn's own shutdown does next: nothing new arrives
            # while the sockets drain. Closing a server twice is harmless.
            for listener in self.servers:
                listener.close()
            draining = asyncio.ensure_future(drain())
            while not draining.done() and not self.force_exit:
                await asyncio.wait({draining}, timeout=0.1)
            if not draining.done():
                draining.cancel()
            await super().shutdown(sockets)

    return _DrainingServer(config)


class _DatePerSecond:
    """``email.utils`` as websockets' ``ServerProtocol`` uses it: ``formatdate(usegmt=True)``,
    the ``Date`` of each handshake response, formatted once a second instead of per socket (the
    string changes only with the second). Any other name is ``email.utils``'s own."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(email.utils, name)

    def formatdate(
        self, timeval: float | None = None, localtime: bool = False, usegmt: bool = False
    ) -> str:
        if timeval is not None or localtime or not usegmt:
            return email.utils.formatdate(timeval, localtime, usegmt)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._text = email.utils.formatdate(now, usegmt=True)
            self._second = second
        return self._text


def cache_handshake_date() -> None:
    """Have websockets' server handshake format its ``Date`` header once a second.

    ``ServerProtocol.accept`` (and ``reject``) format the date for every socket, about 5 us each
    (uvicorn then replaces it with its own on an accepted handshake); the module's ``email``
    name is pointed at :class:`_DatePerSecond`, whose header is the same string.
    ``tests/test_compat.py`` checks that websockets still formats it there. Idempotent.
    """
    import websockets.server

    module = vars(websockets.server)
    if module.get("email") is not email:
        # Already done, or websockets no longer formats the date through ``email.utils`` (its
        # module is its own business): leave it as it is, at the per-socket cost.
        return
    module["email"] = _EmailWithDatePerSecond()


class _EmailWithDatePerSecond(types.ModuleType):
    """The ``email`` package as ``websockets.server`` sees it: ``utils`` is
    :class:`_DatePerSecond`; every other name is the package's own."""

    def __init__(self) -> None:
        super().__init__("email")
        self.utils = _DatePerSecond()

    def __getattr__(self, name: str) -> Any:
        return getattr(email, name)


def limited_protocols(
    cap: AddressCap, proxies: TrustedProxies, request_timeout: float, close_grace: float
) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
    """uvicorn's h11 HTTP protocol and websockets-sansio WebSocket protocol, with limits: pass
    them as ``uvicorn.Config(http=..., ws=...)``.

    - A socket whose peer already holds ``cap.limit`` sockets is answered 429 ``rate_limited``
      and closed at once; behind a trusted proxy the client named by ``X-Forwarded-For`` is
      counted when its WebSocket upgrade arrives (see :mod:`tether.server.connection_limits`).
    - A request (head and body) must arrive within ``request_timeout`` seconds of its first
      byte, the first request of a socket within ``request_timeout`` of the socket's opening;
      otherwise the socket is closed, with 408 ``invalid_request`` when part of a request came.
      The WebSocket upgrade is such a request; after it, ``TETHER_HEARTBEAT_TIMEOUT`` applies.
    - A WebSocket that websockets fails (a frame over ``ws_max_size``: 1009; a protocol error:
      1002; invalid UTF-8: 1007) sends its close frame and shuts its sending side, then reads
      and discards what the client still sends until the client's end of the stream, for at
      most ``close_grace`` seconds and :data:`LINGER_MAX_BYTES` bytes, and only then closes
      the socket (RFC 6455 §7.1.1: the server closes the TCP connection after the client).
      uvicorn closes it at once: bytes the client sent that are still unread then, or that
      arrive after, are answered with a reset, and a client whose next write meets the reset
      (asyncio ends the connection then) never reads the close frame: it sees 1006.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    cache_handshake_date()

    refused = _raw_response(
        429,
        "Too Many Requests",
        "rate_limited",
        "too many open connections from this address (TETHER_MAX_CONNECTIONS_PER_ADDRESS)",
    )
    too_slow = _raw_response(
        408,
        "Request Timeout",
        "invalid_request",
        f"the request did not arrive within {request_timeout:g} s (TETHER_REQUEST_TIMEOUT)",
    )
    # States of the client's side in which its request has been received whole (or never will
    # be): no deadline runs in them.
    received = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.SWITCHED_PROTOCOL, h11.ERROR)

    def refuse(transport: asyncio.Transport, address: str) -> None:
        logger.warning(
            "refused a connection from %s: it holds %d (TETHER_MAX_CONNECTIONS_PER_ADDRESS)",
            address,
            cap.count(address),
        )
        transport.write(refused)
        transport.close()

    class LimitedH11Protocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if peer is not None and peer not in proxies:
                counted = address_key(peer)
                if not cap.admit(transport, counted):
                    refuse(transport, counted)
                    return
            self._start_request_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_request_timer()
            cap.release(self.transport)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None and self._upgrade_at_once(data):
                return
            self._start_request_timer()
            super().data_received(data)
            self._stop_timer_if_received()

        def _upgrade_at_once(self, data: bytes) -> bool:
            """Upgrade without h11 when ``data`` is the socket's first request, whole and
            alone, and :func:`upgrade_head` parses it: what uvicorn's ``handle_events`` does
            with h11's ``Request`` for an upgrade, from the same target and headers."""
            conn = self.conn
            if (
                self.ws_protocol_class is None
                or conn.their_state is not h11.IDLE
                or conn.our_state is not h11.IDLE
                or conn.trailing_data[0]
            ):
                return False
            head = upgrade_head(data)
            if head is None:
                return False
            self._unset_keepalive_if_required()
            target, self.headers = head
            event = _UpgradeRequest(target, self.headers)
            self.handle_websocket_upgrade(event)  # type: ignore[arg-type]
            return True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A pipelined request whose head was buffered may now wait for its body: its clock
            # runs from here. (A partial head waits under uvicorn's keep-alive timer.)
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                self._start_request_timer()

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            self._stop_request_timer()
            peer = self.client[0] if self.client else None
            if peer is not None and peer in proxies:
                raw = next((v for k, v in self.headers if k == b"x-forwarded-for"), None)
                forwarded = raw.decode("latin-1") if raw is not None else None
                client = address_key(proxies.client_address(peer, forwarded))
                if not cap.admit(self.transport, client):
                    refuse(self.transport, client)
                    return
            super().handle_websocket_upgrade(event)

        def _start_request_timer(self) -> None:
            if self._request_timer is None and not self.transport.is_closing():
                self._request_timer = self.loop.call_later(request_timeout, self._timed_out)

        def _stop_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _stop_timer_if_received(self) -> None:
            if self.conn.their_state in received or self.transport.get_protocol() is not self:
                self._stop_request_timer()

        def _timed_out(self) -> None:
            self._request_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            began = self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])
            # A cycle whose response started and did not finish is this request's: its answer
            # is under way and a 408 would corrupt it. (A finished one is the previous request's.)
            cycle = self.cycle
            answering = cycle is not None and cycle.response_started and not cycle.response_complete
            if began and not answering:
                self.transport.write(too_slow)
            logger.debug("closed %s: no whole request within %g s", self.client, request_timeout)
            self.transport.close()

    class LimitedWebSocketProtocol(WebSocketsSansIOProtocol):
        # Is the app waiting in receive() on an empty queue (see send_receive_event_to_app)?
        _app_waiting = False
        # Failed: the close frame is sent, the sending side shut; what arrives is discarded.
        _lingering = False
        _discarded = 0

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._discarded += len(data)
                if self._discarded > LINGER_MAX_BYTES:
                    self._end_linger()
                return
            super().data_received(data)

        # eof_received (uvicorn's returns None): asyncio closes the transport when the client
        # ends its stream, which ends a linger as it should.

        def handle_parser_exception(self) -> None:
            # uvicorn's, but with a lingering close instead of transport.close(). Reached from
            # data_received once websockets has failed the connection (its parser_exc), and
            # from an invalid UTF-8 text message.
            if self._lingering or self.transport.is_closing():
                return
            assert self.conn.close_sent is not None
            code = self.conn.close_sent.code
            reason = self.conn.close_sent.reason
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.stop_keepalive()
            transport = self.transport
            if not transport.can_write_eof():  # TLS: no half-close; not how tether serves
                transport.close()
                return
            self._lingering = True
            transport.write_eof()  # after the close frame, once it is written
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
            # uvicorn leaves a socket with a close timer to it when the app returns, and
            # cancels the timer when the connection is lost. (One the app's close started, when
            # the client's reply to it failed the connection, is replaced.)
            if self.close_timer is not None:
                self.close_timer.cancel()
            self.close_timer = self.loop.call_later(close_grace, self._end_linger)

        def handle_ping(self) -> None:
            # A ping parsed in the read that failed the connection (1007 fails it inside
            # handle_events): its pong went out with the close frame; no write after the FIN.
            if not self._lingering:
                super().handle_ping()

        def _end_linger(self) -> None:
            # The client is still sending: it has had the close grace (or the bytes) to read
            # the close frame. Whatever it sends now is answered with a reset.
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            logger.debug("closed %s: still sending after its connection failed", self.client)
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            cap.release(self.transport)
            super().connection_lost(exc)

        def send_receive_event_to_app(self) -> None:
            # uvicorn stops reading the socket after queueing each message and starts again
            # when the app has taken the queue's last one: two epoll_ctl calls and their
            # bookkeeping per message. A message handed to an app that already waits in
            # receive() is taken before this socket is read again (the app's wake-up is queued
            # in the event loop ahead of the next poll's reads), so reading need not stop for
            # it. Any further message, of this read or a later one, stops it as uvicorn does:
            # what is queued stays bounded by one read (by two on an event loop that may read
            # again before it runs the app's wake-up: uvloop, which uvicorn's default picks
            # when installed; Tether does not depend on it).
            if self._app_waiting and not self.read_paused and self.queue.empty():
                self._app_waiting = False
                self.read_paused = True  # uvicorn's method then leaves the reads on
                try:
                    super().send_receive_event_to_app()
                finally:
                    self.read_paused = False
                return
            super().send_receive_event_to_app()

        async def receive(self) -> Any:
            self._app_waiting = self.queue.empty()
            try:
                return await super().receive()
            finally:
                self._app_waiting = False

    return LimitedH11Protocol, LimitedWebSocketProtocol
