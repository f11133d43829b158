"""Memory per idle, authenticated ``/sync`` connection, beside a bare ``websockets`` server.

Each server runs in a process of its own and gets the same N connections from this process (the
load generator): Tether's idle connections have sent ``connect`` and ``authenticate`` with a
valid access token and been answered; the baselines get the same two frames and echo them. The
server's resident memory (``VmRSS``) is read before the N connections (after a small warm-up,
so one-time costs such as lazy imports are not charged to the connections) and after all N are
open and have been idle for a few seconds. Rows, measured in the same run:

* ``bare``       -- ``websockets`` 17 asyncio server, compression off: the baseline (1.00x).
* ``asgi``       -- a raw ASGI echo callable on uvicorn with Tether's exact uvicorn settings
  (``websockets-sansio``, per-message deflate off): uvicorn's share.
* ``asgi-wsproto`` -- the same on uvicorn's ``wsproto`` implementation, for comparison.
* ``starlette``  -- the same callable behind Starlette's router, as Tether mounts ``/sync``:
  the router's share.
* ``tether-anon`` -- ``python -m tether serve``, connected but not authenticated.
* ``tether``     -- ``python -m tether serve``, connected and authenticated: the figure with
  the target (at most 1.5x bare; figures in ``docs/benchmarks.md``).

The load generator is one process of :class:`LeanClient` connections (sans-I/O, cheap);
``sync_connect.py``, ``sync_expiry.py`` and ``sync_revocation.py`` import it from here (the
process helpers every script shares are in ``common.py``). Run from the repository root::

    .venv/bin/python bench/sync_memory.py                    # N = 10,000, every row
    .venv/bin/python bench/sync_memory.py --n 2000 --servers bare,tether
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ChildServer,
    DeploymentWithRedis,
    comma_list,
    describe_run,
    print_header,
    raise_nofile,
    run_bounded,
    serve_websockets,
    sign_up,
)
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

TARGET_RATIO = 1.5
ALL_KINDS = ("bare", "asgi", "asgi-wsproto", "starlette", "tether-anon", "tether")
BASELINE_KINDS = ("bare", "asgi", "asgi-wsproto", "starlette")
LABELS = {
    "bare": "bare websockets 17 (asyncio)",
    "asgi": "raw ASGI echo, uvicorn sansio",
    "asgi-wsproto": "raw ASGI echo, uvicorn wsproto",
    "starlette": "raw ASGI echo behind Starlette router",
    "tether-anon": "Tether /sync, connected, anonymous",
    "tether": "Tether /sync, authenticated",
}
#: A connection that sent nothing for this long sends an application ``ping``: Tether closes a
#: connection silent for ``TETHER_HEARTBEAT_TIMEOUT`` (75 s), as a real client knows.
KEEPALIVE_AFTER = 60.0


# ------------------------------------------------------------------------------ helpers


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------ load generator


#: ``on_message(client, text, receipt wall time)``.
OnMessage = Callable[["LeanClient", str, float], None]


class LeanClient(asyncio.Protocol):
    """A WebSocket client connection on ``websockets``' sans-I/O ``ClientProtocol``.

    Much cheaper per connection and per message than ``websockets.asyncio.client`` (no task per
    connection, no message queue), so that one load-generator process can keep up with the
    servers it measures (``sync_connect.py`` prints its CPU share). Every text message is
    time-stamped (``time.time()``) in
    ``data_received``, before any other work. Pings from the server are answered by the
    protocol; per-message deflate is not offered.
    """

    def __init__(self, url: str, on_message: OnMessage | None) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=2**22)
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A handshake abandoned by an interrupted run must not log "exception never retrieved".
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.inbox: deque[tuple[str, float]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.close_code: int | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if not self.opened.done():
                    if self.protocol.handshake_exc is None:
                        self.opened.set_result(None)
                    else:
                        self.opened.set_exception(self.protocol.handshake_exc)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    text = event.data.decode()
                    if self.on_message is not None:
                        self.on_message(self, text, now)
                    else:
                        self.inbox.append((text, now))
                        self._wake()
                elif event.opcode is Opcode.CLOSE:
                    self.close_code = self.protocol.close_code
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        self._wake()

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # API
    @property
    def is_open(self) -> bool:
        return not self.closed and self.protocol.state is State.OPEN

    def send(self, text: str) -> None:
        if self.is_open:
            self.protocol.send_text(text.encode())
            self._flush()

    async def recv(self, timeout: float = 30.0) -> tuple[str, float]:
        """The next text message and its receipt time (only without ``on_message``)."""
        async with asyncio.timeout(timeout):
            while not self.inbox:
                if self.closed:
                    raise ConnectionError(f"connection closed (code {self.close_code})")
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
        return self.inbox.popleft()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def lean_connect(
    url: str,
    *,
    local_ip: str | None = None,
    on_message: OnMessage | None = None,
    timeout: float = 30.0,
) -> LeanClient:
    """Open a :class:`LeanClient` to ``url`` and complete the handshake."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    local_addr = (local_ip, 0) if local_ip is not None else None
    _, client = await loop.create_connection(
        lambda: LeanClient(url, on_message), uri.host, uri.port, local_addr=local_addr
    )
    try:
        async with asyncio.timeout(timeout):
            await client.opened
    except BaseException:
        client.abort()
        raise
    return client


@dataclass
class Clients:
    """The load generator's connections to one server."""

    url: str
    source_ips: int = 1
    #: Source addresses are 127.0.0.``first_source_ip`` … (+ ``source_ips`` - 1): load
    #: generators in several processes use distinct ones (each address has its own ports).
    first_source_ip: int = 1
    #: Called for every message after the opening exchange (else messages queue up unread).
    on_message: OnMessage | None = None
    conns: list[LeanClient] = field(default_factory=list)
    last_sent: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Seconds from the TCP connect to the last expected reply, per connection opened.
    latencies: list[float] = field(default_factory=list)

    async def open_one(self, index: int, frames: list[str], expect: list[str | None]) -> None:
        """Connect, then send each frame and wait for its reply: the type in ``expect``, or an
        echo of the frame where ``expect`` says None."""
        started = time.perf_counter()
        spread = self.source_ips > 1 or self.first_source_ip != 1
        local_ip = f"127.0.0.{self.first_source_ip + index % self.source_ips}" if spread else None
        ws = await lean_connect(self.url, local_ip=local_ip)
        try:
            for frame, kind in zip(frames, expect, strict=True):
                ws.send(frame)
                reply, _ = await ws.recv()
                got = json.loads(reply).get("type")
                if (kind is None and reply != frame) or (kind is not None and got != kind):
                    raise RuntimeError(f"expected {kind or 'an echo'}, got {reply[:200]}")
        except BaseException:
            ws.abort()
            raise
        self.latencies.append(time.perf_counter() - started)
        ws.on_message = self.on_message
        self.conns.append(ws)
        self.last_sent.append(time.monotonic())

    async def open_many(
        self,
        n: int,
        frames_for: Callable[[int], list[str]],
        expect: list[str | None],
        concurrency: int,
        label: str,
        *,
        rate: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> float:
        """Open ``n`` connections, ``concurrency`` at a time and (with ``rate``) starting at
        most ``rate`` per second; return the seconds it took. ``concurrency`` workers share the
        work: no task per connection. ``progress`` gets a line every 2 s (default: print)."""
        started = time.monotonic()
        last_print = started
        target = len(self.conns) + n
        indices = iter(range(n))
        report = progress or (lambda line: print(line, flush=True))

        async def worker() -> None:
            nonlocal last_print
            for i in indices:
                if rate:
                    # Connection i starts no earlier than i / rate seconds after the first.
                    await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                try:
                    await self.open_one(i, frames_for(i), expect)
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                now = time.monotonic()
                if now - last_print >= 2.0:
                    last_print = now
                    report(f"  {label}: {len(self.conns):>6}/{target} open")

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
        return time.monotonic() - started

    async def keepalive(self, ping: str) -> None:
        """Send an application ping on connections silent for :data:`KEEPALIVE_AFTER` (the
        pong is left unread: the client buffers it, the server does not care)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for i, ws in enumerate(self.conns):
                if now - self.last_sent[i] >= KEEPALIVE_AFTER and ws.is_open:
                    self.last_sent[i] = now
                    ws.send(ping)

    def open_count(self) -> int:
        return sum(1 for ws in self.conns if ws.is_open)

    async def abort_all(self) -> None:
        """Drop every connection at once (no closing handshake). Awaited so that the sockets
        are really closed before a server is stopped: a server that still sees them open
        would wait for them to drain."""
        for ws in self.conns:
            ws.abort()
        self.conns.clear()
        await asyncio.sleep(0.05)  # abort() closes the socket in a callback of the loop


def tether_frames(tokens: list[str] | None, *, ping: bool = False) -> Callable[[int], list[str]]:
    """Frames connection ``i`` sends: ``connect``, then ``authenticate`` with one of ``tokens``
    (none when ``tokens`` is None), or with ``ping`` an application ``ping`` instead."""

    def frames(i: int) -> list[str]:
        out = [json.dumps({"type": "connect", "clientId": f"bench-{i}", "protocol": 1})]
        if ping:
            out.append(json.dumps({"type": "ping"}))
        elif tokens is not None:
            token = tokens[i % len(tokens)]
            out.append(json.dumps({"type": "authenticate", "token": token, "authVersion": 1}))
        return out

    return frames


# ------------------------------------------------------------------------------ one row


@dataclass
class Row:
    kind: str
    n_open: int
    rss_before: int
    rss_after: int
    open_seconds: float
    failures: int

    @property
    def kib_per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.n_open, 1)


async def measure(kind: str, args: argparse.Namespace) -> Row:
    deployment: DeploymentWithRedis | None = None
    child: ChildServer | None = None
    clients: Clients | None = None
    keepalive: asyncio.Task[None] | None = None
    try:
        tokens: list[str] | None = None
        if kind.startswith("tether"):
            deployment = DeploymentWithRedis(
                {"TETHER_ACCESS_TTL": "3600", "TETHER_LOG_LEVEL": "warning"}
            )
            deployment.start_redis()
            server = deployment.start_server()
            pid, url = server.pid, server.ws_url
            assert pid is not None
            alive: Callable[[], bool] = lambda: server.returncode is None  # noqa: E731
            all_tokens = await sign_up(server.base_url, args.users)
            tokens = all_tokens if kind == "tether" else None
            expect: list[str | None] = ["connected", "auth_ok"] if tokens else ["connected"]
            frames_for = tether_frames(tokens)
        else:
            child = ChildServer(kind, script=__file__)
            pid, url, alive = child.pid, child.ws_url, child.alive
            # The same two frames Tether gets, echoed back: same sizes, same number of writes.
            all_tokens = token_stand_ins(args.users)
            frames_for = tether_frames(all_tokens)
            expect = [None, None]

        # Warm-up: one-time costs (lazy imports, first-use caches) are not per-connection.
        warm = Clients(url, 1)
        await warm.open_many(args.warmup, frames_for, expect, args.concurrency, "warm-up")
        await warm.abort_all()
        if warm.failures:
            raise RuntimeError(f"{kind}: warm-up connection failed: {warm.failures[0]}")
        await asyncio.sleep(1.0)
        before = rss_kib(pid)
        print(f"{LABELS[kind]}: RSS before {before / 1024:.1f} MiB; opening {args.n}", flush=True)

        clients = Clients(url, args.source_ips)
        keepalive = asyncio.create_task(clients.keepalive(json.dumps({"type": "ping"})))
        seconds = await clients.open_many(args.n, frames_for, expect, args.concurrency, kind)
        if clients.failures:
            print(f"  {len(clients.failures)} connections failed, e.g. {clients.failures[0]}")
        print(f"  {len(clients.conns)} open in {seconds:.1f} s; idle {args.idle:.0f} s", flush=True)
        await asyncio.sleep(args.idle)
        after = rss_kib(pid)
        n_open = clients.open_count()
        if not alive():
            raise RuntimeError(f"{kind} server died during the run")
        if n_open < len(clients.conns):
            print(f"  warning: {len(clients.conns) - n_open} connections closed while idle")
        return Row(kind, n_open, before, after, seconds, len(clients.failures))
    finally:
        if keepalive is not None:
            keepalive.cancel()
        if clients is not None:
            await clients.abort_all()
        if child is not None:
            child.stop()
        if deployment is not None:
            deployment.close()


def token_stand_ins(count: int) -> list[str]:
    """Token-sized stand-ins for the echo baselines (ES256 JWTs are about this long)."""
    return [("eyJ" + uuid.uuid4().hex * 8)[:370] for _ in range(count)]


# ------------------------------------------------------------------------------ baseline servers


def serve_bare(port: int) -> None:
    from websockets.asyncio.server import ServerConnection
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:  # the load generator aborts its connections at the end
            pass

    asyncio.run(serve_websockets(echo, port, backlog=1024))


class AsgiEcho:
    """The smallest ASGI WebSocket app: accept, echo text frames, return on disconnect.

    A callable object, not a function, as Tether's ``SyncEndpoint``: Starlette's
    ``WebSocketRoute`` then mounts it as a raw ASGI app instead of wrapping it in a session.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})


def serve_uvicorn(port: int, *, behind_router: bool = False, ws: str = "websockets-sansio") -> None:
    import uvicorn

    app: Any = AsgiEcho()
    if behind_router:
        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute

        app = Starlette(routes=[WebSocketRoute("/sync", AsgiEcho())])
    # The settings of server/tether/server/cli.py's _run_uvicorn, so only the application (or, for
    # the wsproto row, the WebSocket implementation) differs.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws=ws,
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
        proxy_headers=False,
        backlog=1024,
    )
    uvicorn.Server(config).run()


def serve(kind: str, port: int) -> None:
    raise_nofile()
    if kind == "bare":
        serve_bare(port)
    elif kind == "asgi":
        serve_uvicorn(port)
    elif kind == "asgi-wsproto":
        serve_uvicorn(port, ws="wsproto")
    elif kind == "starlette":
        serve_uvicorn(port, behind_router=True)
    else:
        raise SystemExit(f"unknown server kind {kind}")


# ------------------------------------------------------------------------------ main


def print_table(rows: list[Row], n: int) -> None:
    base = next((r for r in rows if r.kind == "bare"), None)
    print()
    print(f"Memory per idle connection, N = {n:,} (server VmRSS after - before) / N")
    header = f"| {'server':<38} | {'RSS before':>10} | {'RSS after':>10} | {'KiB/conn':>8} |"
    header += f" {'vs bare':>7} | {'open/s':>7} |"
    print_header(header)
    for row in rows:
        ratio = f"{row.kib_per_conn / base.kib_per_conn:.2f}x" if base else "-"
        print(
            f"| {LABELS[row.kind]:<38} | {row.rss_before / 1024:>6.1f} MiB | "
            f"{row.rss_after / 1024:>6.1f} MiB | {row.kib_per_conn:>8.1f} | {ratio:>7} | "
            f"{row.n_open / row.open_seconds:>7.0f} |"
        )
    tether = next((r for r in rows if r.kind == "tether"), None)
    if base and tether:
        ratio = tether.kib_per_conn / base.kib_per_conn
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(f"Target: Tether <= {TARGET_RATIO:.2f}x bare -> {ratio:.2f}x, {verdict}")
    for row in rows:
        if row.failures or row.n_open < n:
            print(f"note: {row.kind}: {row.n_open} of {n} open at the end, {row.failures} failed")


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    for kind in args.servers:
        rows.append(await measure(kind, args))
        print(f"  -> {rows[-1].kib_per_conn:.1f} KiB/connection", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="connections per server [10000]")
    parser.add_argument(
        "--servers",
        default=",".join(ALL_KINDS),
        help=f"comma-separated rows among {','.join(ALL_KINDS)} [all]",
    )
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes in flight [50]")
    parser.add_argument("--idle", type=float, default=5.0, help="idle seconds before reading RSS")
    parser.add_argument("--users", type=int, default=8, help="users whose tokens are shared [8]")
    parser.add_argument("--warmup", type=int, default=50, help="connections before 'before' [50]")
    parser.add_argument(
        "--source-ips", type=int, default=1, help="spread clients over 127.0.0.1..K [1]"
    )
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many s")
    parser.add_argument("--serve", choices=BASELINE_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    args.servers = comma_list(args.servers)
    unknown = set(args.servers) - set(ALL_KINDS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    limit = raise_nofile()
    if limit < args.n + 100:
        parser.error(f"RLIMIT_NOFILE is {limit}: too low for {args.n} connections")
    print(f"sync_memory: N={args.n}, rows {', '.join(args.servers)}; {describe_run()}", flush=True)

    rows = run_bounded(lambda: run(args), args.timeout)
    print_table(rows, args.n)


if __name__ == "__main__":
    main()
