"""Fan-out latency: one change, N subscribers, trigger to the last receipt, beside two baselines.

Every system gets the same N receiving connections, opened by receiver processes of their own
(not the servers', not this one), and the same ~70-byte JSON payload. A *trigger* client in this
process causes one change per round; each receiver time-stamps, per connection, the moment the
bytes that complete the new value's frame reach it. Rows, measured in the same run:

* ``bare``     -- the ceiling: a bare ``websockets`` 17 asyncio server (compression off) that
  calls ``websockets.asyncio.server.broadcast`` with the payload on every receiver when the
  trigger client sends it a message. One process.
* ``tether``   -- two ``python -m tether serve`` processes sharing one ``redis-server``; the N
  receivers, spread evenly over both, are anonymous and subscribe to
  ``counter.get {"name": "fan"}``; the trigger sends ``mutate counter.increment {"name": "fan"}``
  (to each instance in turn) and the transition carrying the new value is the receipt.
* ``socketio`` -- python-socketio 5 with ``AsyncRedisManager`` on the same ``redis-server``, two
  aiohttp server processes with the receivers spread evenly over both; the trigger emits an event
  (to each process in turn) whose handler calls ``sio.emit`` of the payload to everyone (the
  Socket.IO event framing, ``42["transition",...]``, adds 17 bytes on the wire). The
  receivers speak raw Engine.IO 4 / Socket.IO 5 over WebSocket (``websocket`` transport only):
  the python-socketio client is too heavy to hold 10,000 connections in two processes.

Latency of one round, two ways. From the trigger: from just before the trigger sends its message
(``t0``) to the *last* of the N receipts ("last"), and to their median ("median"). From the commit
(issue 4's definition, a second table): from the moment the change exists on the server side to the
same receipts: Tether's commit, the ``t`` field (Redis's ``TIME``, microseconds) that
``commit.lua`` writes into the commit's stream entry, read after the round; for the baselines, the
``time.time()`` their server takes just before it starts sending (``broadcast``, ``emit``) and
returns in its answer. Wall-clock times are put on the monotonic scale with the two clocks' offset,
read in this process. "ack" is ``t0`` to the trigger's own answer: Tether's ``mutation_result``
(sent once the mutating instance has queued the transition to its own subscribers:
read-your-writes), the bare server's reply after ``broadcast()`` returned, python-socketio's reply
after ``emit()`` returned. Time is ``time.monotonic()`` (``CLOCK_MONOTONIC``, one clock for every
process of the machine). Over R rounds (after a few warm-up rounds) the tables show p50 and p99
(nearest rank: with R < 100 rounds that is the slowest round). Targets (issue 4): Tether's p50 and
p99 within 1.5x the ceiling's, and at least 2x faster than python-socketio; the verdicts are
printed for both clocks. "CPU ms/round" is the user + system CPU the system's server processes used
over the measured rounds (``/proc/PID/stat``, pauses between rounds included), per round: the work
one fan-out costs, steadier than latency on a shared machine. The notes give the same for
``redis-server`` and the receivers (their parsing, after each round, included).

Receivers are cheap on purpose: a sans-I/O ``websockets`` client on ``asyncio.Protocol``; while a
round runs, ``data_received`` only appends ``(time, bytes)``; the bytes are parsed (and the value
checked) once every connection of every receiver process has received something, so parsing
does not delay a later timestamp, in this process or the other. Run from the repository root::

    .venv/bin/python bench/fanout.py                          # N = 2, 20, 1,000, 10,000; all rows
    .venv/bin/python bench/fanout.py --n 2000 --rounds 30 --systems bare,tether
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ChildServer,
    Deployment,
    child_options,
    comma_list,
    cpu_seconds,
    describe_run,
    load_average,
    now,
    percentile,
    print_header,
    raise_nofile,
    redis_unless_given,
    run_bounded,
    serve_websockets,
)
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

SYSTEMS = ("bare", "tether", "socketio")
LABELS = {
    "bare": "bare websockets.broadcast (ceiling)",
    "tether": "Tether, 2 instances",
    "socketio": "python-socketio + Redis, 2 procs",
}
TARGET_VS_CEILING = 1.5
TARGET_VS_SOCKETIO = 2.0
#: Issue 14 (small rooms): at N <= SMALL_ROOM, p50 from the commit within 1.5x the ceiling's; at
#: every N, Tether's p50 below python-socketio's.
SMALL_ROOM = 20
#: The query every Tether receiver subscribes to, and the mutation that changes it.
COUNTER = "fan"
#: Tether settings for the bench deployment. Heartbeat: the receivers stay silent for the whole
#: run (a real client pings; here that would only add frames between rounds).
#: Receivers' client ids are unique per run (the trigger's per row): a mutation's outcome is kept
#: per (clientId, requestId), so a trigger reusing an id on the same Redis would get an earlier
#: answer back.
RUN_ID = uuid.uuid4().hex[:8]
TETHER_ENV = {"TETHER_LOG_LEVEL": "warning", "TETHER_HEARTBEAT_TIMEOUT": "3600"}


# ------------------------------------------------------------------------------ payloads


def transition_text(version: int, value: int) -> str:
    """The frame Tether sends for one changed subscription (``encode_frame``'s compact JSON);
    the baselines send exactly this text, so every row moves the same bytes."""
    return (
        f'{{"type":"transition","version":{version},"updates":[{{"queryId":1,"value":{value}}}]}}'
    )


def carries(obj: Any, expected: int) -> bool:
    """Whether a decoded transition carries ``expected`` as its (first) value."""
    if not isinstance(obj, dict) or obj.get("type") != "transition":
        return False
    return any(u.get("value") == expected for u in obj.get("updates", ()))


def matches(system: str, text: str, expected: int) -> bool:
    """Whether a receiver's text frame is the round's new value, for ``system``."""
    if system == "socketio":
        if not text.startswith('42["transition"'):
            return False
        event = json.loads(text[2:])
        return len(event) > 1 and carries(event[1], expected)
    if '"transition"' not in text:
        return False
    return carries(json.loads(text), expected)


# ------------------------------------------------------------------------------ clocks


def wall_to_monotonic(wall: float) -> float:
    """``wall`` (``time.time()`` seconds, or Redis's ``TIME``: the same ``CLOCK_REALTIME``) on
    the ``time.monotonic()`` scale, by the two clocks' offset read now (to ~1 µs)."""
    offset = max(time.time() - time.monotonic() for _ in range(5))
    return wall - offset


async def commit_time(redis_url: str, version: int) -> float:
    """When Tether committed ``version``: the ``t`` field (Redis's clock, µs) of its entry in
    the commit stream, in ``time.time()`` seconds."""
    import redis.asyncio
    from tether.server.redis import keys as redis_keys

    async with redis.asyncio.Redis.from_url(redis_url) as client:
        entries = await client.xrange(
            redis_keys.DATA_COMMITS, min=f"{version}-0", max=f"{version}-0"
        )
    if not entries:
        raise RuntimeError(f"commit {version} is not in the commit stream")
    _, fields = entries[0]
    return int(fields[b"t"]) / 1e6


# ------------------------------------------------------------------------------ client connection


class Conn(asyncio.Protocol):
    """A WebSocket client connection on ``websockets``' sans-I/O ``ClientProtocol``.

    Two modes. Normally every text message is parsed on arrival and queued with its receipt time
    (:meth:`recv`). *Armed* (during a round), ``data_received`` does nothing but append
    ``(time.monotonic(), bytes)`` to :attr:`chunks`; :meth:`settle` parses them afterwards and
    answers with the time of the chunk that completed the matching frame. Protocol pings are
    answered by the protocol; with ``eio`` Engine.IO pings (``2``) are answered with ``3``.
    """

    __slots__ = (
        "armed",
        "chunks",
        "close_code",
        "closed",
        "eio",
        "inbox",
        "on_first_chunk",
        "opened",
        "protocol",
        "transport",
        "waiter",
    )

    def __init__(self, url: str, *, eio: bool = False) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=2**20)
        self.eio = eio
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inbox: list[tuple[float, str]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.close_code: int | None = None
        self.armed = False
        self.chunks: list[tuple[float, bytes]] = []
        self.on_first_chunk: Callable[[], None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        t = time.monotonic()
        if self.armed:
            self.chunks.append((t, data))
            if len(self.chunks) == 1 and self.on_first_chunk is not None:
                self.on_first_chunk()
            return
        for text in self._feed(data):
            self.inbox.append((t, text))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _feed(self, data: bytes) -> list[str]:
        """Parse ``data``; return its text messages (Engine.IO pings answered, not returned)."""
        self.protocol.receive_data(data)
        texts = []
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
                    if self.eio and text == "2":
                        self.protocol.send_text(b"3")
                    else:
                        texts.append(text)
                elif event.opcode is Opcode.CLOSE:
                    self.close_code = self.protocol.close_code
        self._flush()
        return texts

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    # API
    @property
    def is_open(self) -> bool:
        return not self.closed and self.protocol.state is State.OPEN

    def send(self, text: str) -> None:
        if self.is_open:
            self.protocol.send_text(text.encode())
            self._flush()

    async def recv(self, timeout: float = 30.0) -> tuple[float, str]:
        """The next text message and its receipt time (normal mode)."""
        async with asyncio.timeout(timeout):
            while not self.inbox:
                if self.closed:
                    raise ConnectionError(f"connection closed (code {self.close_code})")
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
        return self.inbox.pop(0)

    async def recv_until(
        self, accept: Callable[[str], bool], timeout: float = 30.0
    ) -> tuple[float, str]:
        """Skip messages until one that ``accept`` takes; return it with its receipt time."""
        async with asyncio.timeout(timeout):
            while True:
                t, text = await self.recv(timeout)
                if accept(text):
                    return t, text

    def arm(self, on_first_chunk: Callable[[], None]) -> None:
        self.chunks = []
        self.on_first_chunk = on_first_chunk
        self.armed = True

    def settle(self, accept: Callable[[str], bool]) -> tuple[float, int] | None:
        """Parse what arrived while armed; ``(receipt time, frame length)`` of the first frame
        that ``accept`` takes, else None (the connection stays armed)."""
        chunks, self.chunks = self.chunks, []
        found: tuple[float, int] | None = None
        for t, data in chunks:
            for text in self._feed(data):
                if found is None and accept(text):
                    found = (t, len(text))
        if found is not None:
            self.disarm()
        return found

    def disarm(self) -> None:
        self.armed = False
        self.on_first_chunk = None
        chunks, self.chunks = self.chunks, []
        for t, data in chunks:
            self.inbox.extend((t, text) for text in self._feed(data))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_conn(url: str, *, eio: bool = False, timeout: float = 30.0) -> Conn:
    """Open a :class:`Conn` to ``url`` and complete the WebSocket handshake."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(url, eio=eio), uri.host, uri.port)
    try:
        async with asyncio.timeout(timeout):
            await conn.opened
    except BaseException:
        conn.abort()
        raise
    return conn


def frame_type(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text).get("type"))
    return "?"


async def open_subscriber(system: str, url: str, index: int) -> tuple[Conn, int | None]:
    """One receiving connection, ready for rounds; with Tether, also its initial value."""
    if system == "socketio":
        conn = await open_conn(url, eio=True)
        _, text = await conn.recv()
        if not text.startswith("0"):
            raise RuntimeError(f"expected an Engine.IO open packet, got {text[:100]}")
        conn.send("40")
        await conn.recv_until(lambda t: t.startswith("40"))
        return conn, None
    conn = await open_conn(url)
    if system == "bare":
        _, text = await conn.recv()
        if text != "ready":
            raise RuntimeError(f"expected 'ready', got {text[:100]}")
        return conn, None
    conn.send(json.dumps({"type": "connect", "clientId": f"fan-{RUN_ID}-{index}", "protocol": 1}))
    _, text = await conn.recv()
    if frame_type(text) != "connected":
        raise RuntimeError(f"expected connected, got {text[:200]}")
    conn.send(
        json.dumps(
            {"type": "subscribe", "queryId": 1, "name": "counter.get", "args": {"name": COUNTER}}
        )
    )
    _, text = await conn.recv()
    frame = json.loads(text)
    if frame.get("type") != "transition" or not frame.get("updates"):
        raise RuntimeError(f"expected the initial transition, got {text[:200]}")
    return conn, int(frame["updates"][0]["value"])


# ------------------------------------------------------------------------------ receiver process


class Receiver:
    """The receiver process: opens its share of the N connections, then runs rounds on command.

    Commands arrive on stdin, one JSON object a line; answers go to stdout the same way
    (progress to stderr): ``ready`` after opening, ``armed`` after ``arm``, then ``round`` with
    every connection's receipt time once all have the new value (or the deadline passed).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.system: str = args.system
        self.urls: list[str] = args.urls.split(",")
        self.count: int = args.count
        self.first: int = args.first_index
        self.concurrency: int = args.concurrency
        self.conns: list[Conn] = []
        self.pending = 0
        self.all_in = asyncio.Event()
        self.settle_now = asyncio.Event()

    def answer(self, **obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def open_all(self) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        failures: list[str] = []
        initial: set[int | None] = set()
        started = last_print = now()
        tag = f"receiver {self.first // max(self.count, 1)}"

        async def one(i: int) -> None:
            nonlocal last_print
            url = self.urls[i % len(self.urls)]
            async with sem:
                try:
                    conn, value = await open_subscriber(self.system, url, i)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
            self.conns.append(conn)
            initial.add(value)
            if now() - last_print >= 2.0:
                last_print = now()
                print(f"    {tag}: {len(self.conns)}/{self.count} open", file=sys.stderr)

        await asyncio.gather(*(one(self.first + i) for i in range(self.count)))
        self.answer(
            event="ready",
            open=len(self.conns),
            failed=len(failures),
            failure=failures[0] if failures else None,
            initial=sorted(v for v in initial if v is not None),
            seconds=now() - started,
        )

    def _first_chunk(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.all_in.set()

    async def run_round(self, expected: int, timeout: float) -> None:
        def accept(text: str) -> bool:
            return matches(self.system, text, expected)

        waiting = {conn for conn in self.conns if conn.is_open}
        self.pending = len(waiting)
        self.all_in.clear()
        self.settle_now.clear()
        for conn in waiting:
            conn.arm(self._first_chunk)
        self.answer(event="armed")
        times: list[float] = []
        sizes: set[int] = set()
        deadline = now() + timeout
        # Parse nothing until every receiver process has heard on every connection: parsing
        # here would take CPU from the other receiver process while it is still receiving.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), max(deadline - now(), 0))
        self.answer(event="in")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settle_now.wait(), max(deadline - now(), 0))
        while waiting:
            self.all_in.clear()
            for conn in list(waiting):
                if not conn.chunks:
                    continue
                found = conn.settle(accept)
                if found is not None:
                    times.append(found[0])
                    sizes.add(found[1])
                    waiting.discard(conn)
                else:
                    self.pending += 1  # it received something else (a ping): wait for more
            if not waiting or now() >= deadline:
                break
            if self.pending > 0:
                with contextlib.suppress(TimeoutError):
                    # Poll now and then: a connection can get a ping and its value in one read.
                    await asyncio.wait_for(self.all_in.wait(), min(0.5, deadline - now()))
        for conn in self.conns:
            if conn.armed:
                conn.disarm()
            conn.inbox.clear()
        self.answer(
            event="round",
            times=times,
            missing=len(waiting),
            sizes=sorted(sizes),
            closed=sum(1 for conn in self.conns if not conn.is_open),
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await self.open_all()
        # Collect now, freeze what survives, and never collect during a round: a full
        # collection over 10,000 connections would be charged to the server.
        gc.collect()
        gc.freeze()
        gc.disable()
        round_task: asyncio.Task[None] | None = None
        try:
            while line := await reader.readline():
                command = json.loads(line)
                if command["cmd"] == "arm":
                    if round_task is not None:
                        await round_task
                    gc.collect(0)
                    round_task = asyncio.create_task(
                        self.run_round(command["expected"], command["timeout"])
                    )
                elif command["cmd"] == "settle":
                    self.settle_now.set()
                elif command["cmd"] == "quit":
                    break
        finally:
            if round_task is not None:
                round_task.cancel()
            for conn in self.conns:
                conn.abort()


# ------------------------------------------------------------------------------ baseline servers


def serve_bare(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast
    from websockets.exceptions import ConnectionClosed

    receivers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        try:
            if ws.request is not None and ws.request.path == "/trigger":
                async for message in ws:
                    fire = json.loads(message)
                    at = time.time()  # the "commit": the change is known, sending starts
                    broadcast(receivers, transition_text(fire["version"], fire["value"]))
                    await ws.send(f"ok {at!r}")
                return
            receivers.add(ws)
            try:
                await ws.send("ready")
                await ws.wait_closed()
            finally:
                receivers.discard(ws)
        except ConnectionClosed:  # the clients abort their connections at the end
            pass

    asyncio.run(serve_websockets(handler, port, backlog=2048))


def serve_socketio(port: int, redis_url: str) -> None:
    import socketio
    from aiohttp import web

    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=socketio.AsyncRedisManager(redis_url),
        logger=False,
        engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app)

    @sio.on("fire")  # type: ignore[misc]
    async def fire(sid: str, data: dict[str, int]) -> None:
        at = time.time()  # the "commit": the change is known, sending starts
        payload = json.loads(transition_text(data["version"], data["value"]))
        await sio.emit("transition", payload, skip_sid=sid)
        await sio.emit("fired", {"at": at}, to=sid)

    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=2048)


def serve(kind: str, port: int, redis_url: str | None) -> None:
    raise_nofile()
    if kind == "bare":
        serve_bare(port)
    elif kind == "socketio":
        assert redis_url is not None
        serve_socketio(port, redis_url)
    else:
        raise SystemExit(f"unknown server kind {kind}")


# ------------------------------------------------------------------------------ orchestration


class ReceiverProcess:
    """A receiver child process (``SCRIPT --receive ...``) and its command pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, count: int) -> None:
        self.proc = proc
        self.count = count

    @classmethod
    async def start(
        cls, system: str, urls: list[str], count: int, first: int, concurrency: int
    ) -> ReceiverProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--receive",
            "--system",
            system,
            "--urls",
            ",".join(urls),
            "--count",
            str(count),
            "--first-index",
            str(first),
            "--concurrency",
            str(concurrency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**24,  # a round's answer holds every receipt time
            **child_options(),
        )
        return cls(proc, count)

    async def command(self, **obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"receiver process exited (code {await self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.command(cmd="quit")
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        finally:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


@dataclass
class Round:
    last: float  # seconds from t0 to the last receipt
    median: float  # ... to the median receipt
    first: float  # ... to the first receipt
    ack: float  # ... to the trigger's own answer
    commit: float  # ... to the commit (Tether) or the start of the sending (baselines)

    @property
    def last_from_commit(self) -> float:
        """The issue's definition: from the commit to the last receipt."""
        return self.last - self.commit

    @property
    def median_from_commit(self) -> float:
        return self.median - self.commit


@dataclass
class Result:
    system: str
    n: int
    rounds: list[Round] = field(default_factory=list)
    payload_bytes: set[int] = field(default_factory=set)
    missing: int = 0
    setup_seconds: float = 0.0
    #: CPU seconds the system's server processes (and Redis) used over the measured rounds.
    server_cpu: float = 0.0
    redis_cpu: float = 0.0
    receiver_cpu: float = 0.0
    load: str = ""

    def p(self, attr: str, q: float) -> float:
        """Nearest-rank percentile ``q`` (0-100) of a round attribute, in ms."""
        return percentile([getattr(r, attr) for r in self.rounds], q, nearest_rank=True) * 1000


class Trigger:
    """The client that causes one change per round, on each server in turn."""

    def __init__(self, system: str, urls: list[str]) -> None:
        self.system = system
        self.urls = urls
        self.conns: list[Conn] = []
        self.request_id = 0

    async def open(self) -> None:
        for i, url in enumerate(self.urls):
            if self.system == "socketio":
                conn, _ = await open_subscriber("socketio", url, i)
            elif self.system == "bare":
                conn = await open_conn(url)
            else:
                conn = await open_conn(url)
                conn.send(
                    json.dumps(
                        {
                            "type": "connect",
                            "clientId": f"trigger-{uuid.uuid4().hex[:8]}-{i}",
                            "protocol": 1,
                        }
                    )
                )
                _, text = await conn.recv()
                if frame_type(text) != "connected":
                    raise RuntimeError(f"trigger: expected connected, got {text[:200]}")
            self.conns.append(conn)

    async def fire(self, round_index: int, expected: int) -> tuple[float, float, float | int]:
        """Cause the change; return ``(t0, time of the trigger's answer, commit)``: ``commit`` is
        the wall-clock time (``time.time()``) at which the baseline server started sending, or
        Tether's commit version (its time is in the commit stream: :func:`commit_time`)."""
        conn = self.conns[round_index % len(self.conns)]
        if self.system == "tether":
            self.request_id += 1
            frame = json.dumps(
                {
                    "type": "mutate",
                    "requestId": self.request_id,
                    "name": "counter.increment",
                    "args": {"name": COUNTER},
                }
            )
            t0 = now()
            conn.send(frame)
            t_ack, text = await conn.recv_until(lambda t: frame_type(t) == "mutation_result")
            result = json.loads(text)
            if result.get("value") != expected:
                raise RuntimeError(f"mutation_result {text[:200]}, expected value {expected}")
            return t0, t_ack, int(result["version"])
        fire = {"version": round_index + 1, "value": expected}
        if self.system == "bare":
            t0 = now()
            conn.send(json.dumps(fire))
            t_ack, text = await conn.recv_until(lambda t: t.startswith("ok "))
            return t0, t_ack, float(text[3:])
        t0 = now()
        conn.send("42" + json.dumps(["fire", fire]))
        t_ack, text = await conn.recv_until(lambda t: t.startswith('42["fired"'))
        return t0, t_ack, float(json.loads(text[2:])[1]["at"])

    def close(self) -> None:
        for conn in self.conns:
            conn.abort()


async def measure(system: str, n: int, rounds: int, args: argparse.Namespace) -> Result:
    """Start ``system``'s servers and receivers, run warm-up and measured rounds, clean up."""
    result = Result(system, n)
    deployment: Deployment | None = None
    children: list[ChildServer] = []
    receivers: list[ReceiverProcess] = []
    trigger: Trigger | None = None
    alive: Callable[[], bool]
    try:
        print(f"[{system} N={n:,}] starting servers; load {load_average()}", flush=True)
        if system == "tether":
            deployment = Deployment(args.redis_url, TETHER_ENV)
            servers = [deployment.start_server() for _ in range(2)]
            urls = [s.ws_url for s in servers]
            trigger_urls = urls
            alive = lambda: all(s.returncode is None for s in servers)  # noqa: E731
            pids = [s.pid for s in servers]
        elif system == "bare":
            children.append(ChildServer("bare", script=__file__))
            base = f"ws://127.0.0.1:{children[0].port}"
            urls, trigger_urls = [base + "/"], [base + "/trigger"]
            alive = children[0].alive
            pids = [children[0].pid]
        else:
            for _ in range(2):
                children.append(
                    ChildServer("socketio", script=__file__, extra=("--redis-url", args.redis_url))
                )
            urls = [
                f"ws://127.0.0.1:{c.port}/socket.io/?EIO=4&transport=websocket" for c in children
            ]
            trigger_urls = urls
            alive = lambda: all(c.alive() for c in children)  # noqa: E731
            pids = [c.pid for c in children]
        print(f"  server pids {', '.join(map(str, pids))}", flush=True)

        per = [
            n // args.receivers + (1 if i < n % args.receivers else 0)
            for i in range(args.receivers)
        ]
        first = 0
        for count in per:
            receivers.append(
                await ReceiverProcess.start(system, urls, count, first, args.concurrency)
            )
            first += count
        started = now()
        readies = await asyncio.gather(*(r.answer(args.open_timeout) for r in receivers))
        result.setup_seconds = now() - started
        opened = sum(r["open"] for r in readies)
        initial_values = {v for r in readies for v in r["initial"]}
        print(
            f"[{system} N={n:,}] {opened:,} receivers open in {result.setup_seconds:.1f} s "
            f"({len(receivers)} processes)",
            flush=True,
        )
        if opened < n:
            failure = next((r["failure"] for r in readies if r["failure"]), None)
            raise RuntimeError(f"only {opened} of {n} connections opened; e.g. {failure}")
        if len(initial_values) > 1:
            raise RuntimeError(f"receivers disagree on the initial value: {initial_values}")
        value = initial_values.pop() if initial_values else 0

        trigger = Trigger(system, trigger_urls)
        await trigger.open()
        gc.collect()
        gc.disable()
        total = args.warmup + rounds
        cpu0 = redis0 = receivers0 = 0.0
        for i in range(total):
            if i == args.warmup:
                cpu0 = sum(cpu_seconds(pid, missing_ok=True) for pid in pids)
                redis0 = cpu_seconds(args.redis_pid, missing_ok=True)
                receivers0 = sum(cpu_seconds(r.proc.pid, missing_ok=True) for r in receivers)
                result.load = f"load {load_average()}"
            value += 1
            for r in receivers:
                await r.command(cmd="arm", expected=value, timeout=args.round_timeout)
            for r in receivers:
                answer = await r.answer(args.round_timeout)
                assert answer["event"] == "armed", answer
            await asyncio.sleep(args.settle)
            t0, t_ack, commit = await trigger.fire(i, value)
            for r in receivers:
                answer = await r.answer(args.round_timeout + 10)
                assert answer["event"] == "in", answer
            for r in receivers:
                await r.command(cmd="settle")
            answers = await asyncio.gather(*(r.answer(args.round_timeout + 10) for r in receivers))
            assert all(a["event"] == "round" for a in answers), answers
            times = sorted(t for a in answers for t in a["times"])
            missing = sum(a["missing"] for a in answers)
            if not times:
                raise RuntimeError(f"round {i}: no receiver got value {value}")
            if system == "tether":
                # Read after the round, so the read does not compete with the fan-out.
                commit = await commit_time(args.redis_url, int(commit))
            rnd = Round(
                last=times[-1] - t0,
                median=statistics.median(times) - t0,
                first=times[0] - t0,
                ack=t_ack - t0,
                commit=wall_to_monotonic(commit) - t0,
            )
            warm = i < args.warmup
            if not warm:
                result.rounds.append(rnd)
                result.missing += missing
                for a in answers:
                    result.payload_bytes.update(a["sizes"])
            label = "warm-up" if warm else f"round {i - args.warmup + 1}/{rounds}"
            extra = f", {missing} MISSING" if missing else ""
            print(
                f"  {label:>12}: last {rnd.last * 1000:7.1f} ms, median "
                f"{rnd.median * 1000:7.1f} ms, first {rnd.first * 1000:6.1f} ms, "
                f"ack {rnd.ack * 1000:6.1f} ms, commit {rnd.commit * 1000:5.1f} ms{extra}",
                flush=True,
            )
            if not alive():
                raise RuntimeError(f"a {system} server died during the run")
            gc.collect(0)
        result.server_cpu = sum(cpu_seconds(pid, missing_ok=True) for pid in pids) - cpu0
        result.redis_cpu = cpu_seconds(args.redis_pid, missing_ok=True) - redis0
        result.receiver_cpu = (
            sum(cpu_seconds(r.proc.pid, missing_ok=True) for r in receivers) - receivers0
        )
        return result
    except BaseException:
        if deployment is not None:
            print(deployment.log_tails(), file=sys.stderr)
        raise
    finally:
        gc.enable()
        if trigger is not None:
            trigger.close()
        for r in receivers:
            with contextlib.suppress(Exception):
                await r.stop()
        for child in children:
            child.stop()
        if deployment is not None:
            deployment.close()


# ------------------------------------------------------------------------------ main


def print_table(results: list[Result]) -> None:
    print()
    print("Fan-out: trigger -> receipt of the new value by N subscribers (ms; p99 = worst round")
    print("when rounds < 100). ratios: Tether / ceiling (target <= 1.5x), socketio / Tether")
    print("(target >= 2x faster).")
    header = (
        f"| {'N':>6} | {'system':<36} | {'rounds':>6} | {'last p50':>8} | {'last p99':>8} | "
        f"{'median p50':>10} | {'ack p50':>7} | {'CPU ms/round':>12} | "
        f"{'vs ceiling p50/p99':>18} | {'socketio / this p50/p99':>23} |"
    )
    print_header(header)
    for n, system, r, rows in table_rows(results):
        print(
            f"| {n:>6,} | {LABELS[system]:<36} | {len(r.rounds):>6} | "
            f"{r.p('last', 50):>8.1f} | {r.p('last', 99):>8.1f} | "
            f"{r.p('median', 50):>10.1f} | {r.p('ack', 50):>7.1f} | "
            f"{r.server_cpu * 1000 / max(len(r.rounds), 1):>12.1f} | "
            f"{ratios(rows, system, 'last'):>18} | {speedups(rows, system, 'last'):>23} |"
        )
    print()
    print("From the commit (the issue's definition): Tether's commit time is the `t` Redis stamps")
    print("on the commit's stream entry; a baseline's is the moment its server starts sending.")
    header = (
        f"| {'N':>6} | {'system':<36} | {'commit p50':>10} | {'last p50':>8} | {'last p99':>8} | "
        f"{'median p50':>10} | {'vs ceiling p50/p99':>18} | {'socketio / this p50/p99':>23} |"
    )
    print_header(header)
    for n, system, r, rows in table_rows(results):
        print(
            f"| {n:>6,} | {LABELS[system]:<36} | {r.p('commit', 50):>10.1f} | "
            f"{r.p('last_from_commit', 50):>8.1f} | {r.p('last_from_commit', 99):>8.1f} | "
            f"{r.p('median_from_commit', 50):>10.1f} | "
            f"{ratios(rows, system, 'last_from_commit'):>18} | "
            f"{speedups(rows, system, 'last_from_commit'):>23} |"
        )
    for n in sorted({r.n for r in results}):
        rows = {r.system: r for r in results if r.n == n}
        tether, bare, sio = rows.get("tether"), rows.get("bare"), rows.get("socketio")
        for attr, clock in (("last_from_commit", "from the commit"), ("last", "from the trigger")):
            if tether and bare:
                ratio = max(tether.p(attr, q) / bare.p(attr, q) for q in (50, 99))
                ok = "met" if ratio <= TARGET_VS_CEILING else "MISSED"
                print(f"N={n:,}, {clock}: Tether within {TARGET_VS_CEILING}x of the ceiling: {ok}")
            if tether and sio:
                speedup = min(sio.p(attr, q) / tether.p(attr, q) for q in (50, 99))
                ok = "met" if speedup >= TARGET_VS_SOCKETIO else "MISSED"
                print(
                    f"N={n:,}, {clock}: Tether >= {TARGET_VS_SOCKETIO}x faster than "
                    f"python-socketio: {ok}"
                )
        # Issue 14's small-room targets, at p50 from the commit.
        attr = "last_from_commit"
        if tether and bare and n <= SMALL_ROOM:
            ratio = tether.p(attr, 50) / bare.p(attr, 50)
            ok = "met" if ratio <= TARGET_VS_CEILING else "MISSED"
            print(
                f"N={n:,}, small room, p50 from the commit: Tether {ratio:.2f}x the ceiling "
                f"(target <= {TARGET_VS_CEILING}x): {ok}"
            )
        if tether and sio:
            ok = "met" if tether.p(attr, 50) < sio.p(attr, 50) else "MISSED"
            print(
                f"N={n:,}, p50 from the commit: Tether {tether.p(attr, 50):.1f} ms, "
                f"python-socketio {sio.p(attr, 50):.1f} ms (target: faster): {ok}"
            )
    for r in results:
        per_round = 1000 / max(len(r.rounds), 1)
        note = f"payload {'/'.join(map(str, sorted(r.payload_bytes)))} bytes"
        note += f", CPU ms/round: redis-server {r.redis_cpu * per_round:.0f}, receivers "
        note += f"{r.receiver_cpu * per_round:.0f}; {r.load} at the start"
        if r.missing:
            note += f", {r.missing} receipts MISSING"
        print(f"note: {r.system} N={r.n:,}: {note}, receivers opened in {r.setup_seconds:.1f} s")


def table_rows(results: list[Result]) -> Iterator[tuple[int, str, Result, dict[str, Result]]]:
    """``(N, system, result, every result of that N)`` in table order: by N, then system."""
    for n in sorted({r.n for r in results}):
        rows = {r.system: r for r in results if r.n == n}
        for system in SYSTEMS:
            if system in rows:
                yield n, system, rows[system], rows


def ratio(top: Result | None, bottom: Result | None, attr: str) -> str:
    """``top``'s p50 / p99 of ``attr`` over ``bottom``'s, or "-" when either row is missing."""
    if top is None or bottom is None:
        return "-"
    p50 = top.p(attr, 50) / bottom.p(attr, 50)
    return f"{p50:.2f}x / {top.p(attr, 99) / bottom.p(attr, 99):.2f}x"


def ratios(rows: dict[str, Result], system: str, attr: str) -> str:
    """``system`` over the ceiling."""
    return ratio(rows[system], rows.get("bare"), attr)


def speedups(rows: dict[str, Result], system: str, attr: str) -> str:
    """python-socketio over ``system``."""
    return ratio(rows.get("socketio"), rows[system], attr)


def default_rounds(n: int) -> int:
    return 40 if n <= 100 else 20 if n <= 2000 else 10


async def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with redis_unless_given(args, "fanout-redis-"):
        for n in args.n:
            rounds = args.rounds or default_rounds(n)
            for system in args.systems:
                results.append(await measure(system, n, rounds, args))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", default="2,20,1000,10000", help="subscriber counts [2,20,1000,10000]"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"rows among {','.join(SYSTEMS)} [all]"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="measured rounds [40 for N<=100, 20 for N<=2000, else 10]",
    )
    parser.add_argument("--warmup", type=int, default=2, help="rounds not counted [2]")
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes [2]")
    parser.add_argument("--concurrency", type=int, default=100, help="opens in flight, each [100]")
    parser.add_argument("--settle", type=float, default=0.3, help="idle seconds before a round")
    parser.add_argument("--round-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--open-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help="use this redis-server (default: start one)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    parser.add_argument("--serve", choices=("bare", "socketio"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.redis_pid = None
    if args.serve:
        serve(args.serve, args.port, args.redis_url)
        return
    if args.receive:
        raise_nofile()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Receiver(args).run())
        return
    args.n = [int(x) for x in comma_list(args.n)]
    args.systems = comma_list(args.systems)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    limit = raise_nofile()
    if limit < max(args.n) // args.receivers + 200:
        parser.error(f"RLIMIT_NOFILE is {limit}: too low for {max(args.n)} connections")
    print(
        f"fanout: N={','.join(map(str, args.n))}, rows {', '.join(args.systems)}, "
        f"{args.receivers} receiver processes; {describe_run()}",
        flush=True,
    )

    results = run_bounded(lambda: run(args), args.timeout)
    print_table(results)


if __name__ == "__main__":
    main()
