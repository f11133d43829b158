"""Chaos run: real processes, injected faults, and an account of every mutation.

What runs (every process real, on free ports of 127.0.0.1):

* Redis: one ``redis-server`` with the append-only file on and ``appendfsync always`` (a write
  Redis acknowledged is on disk before the acknowledgement, so it survives a SIGKILL), or, with
  ``--redis cluster``, a Redis Cluster of 3 masters with a replica each;
* ``--instances`` Tether servers (``python -m tether serve``, the demo application) on that Redis,
  with 2-second access tokens (``TETHER_ACCESS_TTL=2``, ``TETHER_CLOCK_LEEWAY=1``,
  ``TETHER_EXPIRY_NOTICE=1``);
* a TCP proxy in this process in front of the instances, acting as a load balancer: round robin,
  no stickiness, the next instance when one refuses the connection;
* ``--clients`` client processes, each a :class:`tether.TetherClient` through the proxy with
  its own user (signed up once here; afterwards the client keeps its session alone, in a
  :class:`tether.FileTokenStore`), subscribed to ``whoami`` and ``counter.get {name: own}``,
  looping ``counter.increment {name: own, by: 1}``. Clients 0 and 1 share one user and one token
  file (two processes refreshing one session).

Faults, one every 2-10 s (seeded, printed), each kind once per round of a shuffled deck:

* ``kill_instance``    SIGKILL a Tether instance, restart it on its port 0-2 s later;
* ``cut_connections``  the proxy aborts every proxied connection;
* ``restart_redis``    SIGKILL redis-server, start it again on its port and data 0-2 s later;
* ``freeze_client``    SIGSTOP a client process past its access token's expiry, then SIGCONT;
* ``lost_mutate``      the proxy forwards the next ``mutate`` frame, then cuts that connection
  before any answer (the mutation ran; the client never saw its result);
* ``lost_refresh``     the same for the next ``refresh`` frame (the refresh token rotated; the
  client never saw the new one), or an HTTP ``POST /auth/refresh`` whose answer is dropped;
* ``cluster_failover`` (``--redis cluster``) ``CLUSTER FAILOVER`` on the replica of the master
  that holds the ``{tether-data}`` slot (a coordinated failover: no acknowledged write is lost);
* ``kill_master``      (opt-in, ``--faults``) SIGKILL that master instead, and restart it once
  its replica took over. Redis replicates asynchronously: writes it acknowledged just before
  the crash may be lost. That is Redis's guarantee, not Tether's; the figures of such a run
  mix the two.

What is counted (the target figures: the exit status is 1 unless every one is zero):

* forced sign-ins: a client's session ended (``SIGNED_OUT``): its user would need the password;
* lost mutations: an acknowledged value the final counter does not reflect;
* doubled mutations: a final counter above the number of mutations that can have applied;
  a value returned twice;
* failures surfaced: any exception from ``mutate`` (``MutationError('unavailable')``,
  ``OutcomeUnknown`` after its timeout, an application-level timeout on clients without one);
* read-your-writes violations: ``mutate`` returned v while the client's ``counter.get``
  subscription showed less than v (checked in the client the moment ``mutate`` returns);
* identity blanks: the ``whoami`` subscription showed ``null`` or another user while the client
  held a session (count and longest; blanks of a frozen client, and of the process sharing its
  token file, from the freeze until 2 s after it are reported apart, as expected; so are
  blanks that follow the server's ``auth_expired`` within ``OUTAGE_GRACE`` of a Redis outage's
  start: an identity that could not be renewed for longer than what was left of it ends at
  ``exp`` + leeway, as it must — any other blank, such as a refresh answered ``unavailable``
  blanking a valid identity, is a target);
* stale subscriptions: once the clients stopped, the harness reads every counter and increments
  it once more from a client of its own (a probe); a client whose subscriptions do not show
  that value, and its own user, within ``--fresh-within`` seconds of the faults' end is stale;
* server tracebacks (``Traceback`` in an instance's log), client tracebacks and
  ``never retrieved`` lines (in a client's log), client processes that died.

Run from the repository root::

    .venv/bin/python bench/chaos.py --clients 20 --lifetimes 500         # ~17 min (make chaos)
    .venv/bin/python bench/chaos.py --clients 6 --lifetimes 40           # ~1.5 min (the CI run)
    .venv/bin/python bench/chaos.py --redis cluster --clients 6 --lifetimes 30

``--client`` (internal) runs one client process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
import redis.asyncio
from common import (
    BENCH_ISSUER,
    FAST_ARGON2_ENV,
    TetherServer,
    child_options,
    cluster_node,
    comma_list,
    describe_run,
    load_average,
    run_bounded,
    start_cluster,
)
from tether.server.redis.embedded import EmbeddedRedis

SCRIPT = Path(__file__).resolve()
#: Per client index: what it sent.
Reports = dict[int, dict[str, Any]]

#: Access-token lifetime of the run, seconds: a client renews about every second.
ACCESS_TTL = 2
#: The deployment's settings. The leeway must be under the lifetime (the server checks it) and
#: the expiry notice at most half of it; the per-connection and per-session auth rates are
#: raised because a 2-second token is renewed ~60 times a minute (the defaults suit 1-hour
#: tokens), and the sign-up/sign-in limits because every client comes from the proxy's address.
CHAOS_ENV = {
    **FAST_ARGON2_ENV,
    "TETHER_ISSUER": BENCH_ISSUER,
    "TETHER_ACCESS_TTL": str(ACCESS_TTL),
    "TETHER_CLOCK_LEEWAY": "1",
    "TETHER_EXPIRY_NOTICE": "1",
    "TETHER_AUTH_RATE": "600/60",
    "TETHER_REFRESH_LIMIT_SESSION": "600/60",
    "TETHER_SIGNUP_LIMIT_ADDRESS": "1000/300",
    "TETHER_SIGNIN_LIMIT_ADDRESS": "1000/300",
    "TETHER_SIGNIN_LIMIT_ACCOUNT": "100/300",
}
#: ``redis-server`` options of the standalone Redis: fsync the AOF before acknowledging.
AOF_ALWAYS = ("--appendfsync", "always")
#: Seconds a frozen client stays stopped: past its token's ``exp`` + leeway.
FREEZE_SECONDS = (ACCESS_TTL + 1 + 1.0, ACCESS_TTL + 1 + 2.5)
#: Blanks starting from a freeze until this many seconds after it are expected (the server
#: ended the frozen client's identity at its ``exp`` + leeway, as the contract says).
FREEZE_GRACE = 2.0
#: Seconds after a Redis outage began within which an identity the server expired (it pushed
#: ``auth_expired``) counts as expired by the outage: the outage (a restart: up to 2 s, plus
#: loading the AOF) and then what was left of a 2 s token when it began (up to the notice + the
#: leeway, 2 s), with margin.
OUTAGE_GRACE = 8.0
#: Every user's password (throwaway accounts on a throwaway Redis).
PASSWORD = "chaos-pw-1"

STANDALONE_FAULTS = (
    "kill_instance",
    "cut_connections",
    "restart_redis",
    "freeze_client",
    "lost_mutate",
    "lost_refresh",
)
CLUSTER_FAULTS = (
    "kill_instance",
    "cut_connections",
    "cluster_failover",
    "freeze_client",
    "lost_mutate",
    "lost_refresh",
)
ALL_FAULTS = (*STANDALONE_FAULTS, "cluster_failover", "kill_master")

#: The figures that must be zero, in the report's order, with their labels.
TARGETS = {
    "forced_signins": "forced sign-ins (the password would be needed)",
    "lost_mutations": "lost mutations (acknowledged, not in the final counter)",
    "doubled_mutations": "doubled mutations (counter above what can have applied)",
    "repeated_values": "values returned twice",
    "failures_surfaced": "failures surfaced to the application by mutate",
    "ryw_violations": "read-your-writes violations",
    "identity_blanks": "identity blanks while signed in",
    "stale_subscriptions": "clients not fresh in time after the faults (probe write unseen)",
    "server_tracebacks": "server tracebacks (instance logs)",
    "client_tracebacks": "client tracebacks (client logs)",
    "never_retrieved": "'exception was never retrieved' lines (client logs)",
    "client_crashes": "client processes that died or did not report",
    "harness_errors": "faults the harness failed to inject or undo",
}


# ================================================================================= the proxy


class Sniffer:
    """Reads the client's side of one proxied connection: HTTP requests until a WebSocket
    upgrade, then WebSocket frames. :meth:`feed` returns what completed in the bytes given:
    ``"http_refresh"`` for a ``POST /auth/refresh``, ``"ws_<type>"`` for a client frame."""

    _TYPE = re.compile(rb'"type":"([a-z_]+)"')

    def __init__(self) -> None:
        self.buf = bytearray()
        self.websocket = False
        self.body_left = 0

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        seen: list[str] = []
        while self.buf:
            if not self.websocket:
                if self.body_left:
                    skip = min(self.body_left, len(self.buf))
                    del self.buf[:skip]
                    self.body_left -= skip
                    continue
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:  # not HTTP as we know it: stop looking
                        self.buf.clear()
                    break
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                if head.startswith(b"post /auth/refresh"):
                    seen.append("http_refresh")
                if b"upgrade: websocket" in head:
                    self.websocket = True
                match = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                self.body_left = int(match.group(1)) if match else 0
                continue
            frame = self._frame()
            if frame is None:
                break
            seen.extend(frame)
        return seen

    def _frame(self) -> list[str] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = int.from_bytes(buf[2:10], "big"), 10
        mask = b""
        if buf[1] & 0x80:
            if len(buf) < pos + 4:
                return None
            mask, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + length:
            return None
        head = bytes(buf[pos : pos + min(length, 80)])
        del buf[: pos + length]
        if opcode != 1:
            return []
        if mask:
            head = bytes(b ^ mask[i % 4] for i, b in enumerate(head))
        match = self._TYPE.search(head)
        return [f"ws_{match.group(1).decode()}"] if match else []


class Pipe:
    """One proxied connection: client <-> instance, both directions pumped until both end."""

    def __init__(
        self,
        proxy: Proxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = client
        self.s_reader, self.s_writer = server
        self.sniffer = Sniffer()
        self.drop_answer = False
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self.tasks = [
            asyncio.create_task(self._upstream()),
            asyncio.create_task(self._downstream()),
        ]
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            self.abort()

    def abort(self) -> None:
        """Cut both sides at once (RST-like: nothing buffered is sent)."""
        for task in self.tasks:
            task.cancel()
        self.c_writer.transport.abort()
        self.s_writer.transport.abort()

    def lose(self) -> None:
        """Cut the client at once; let the instance read what was forwarded, then EOF."""
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.c_writer.transport.abort()
        with contextlib.suppress(Exception):
            self.s_writer.close()  # flushes what was written, then FIN

    async def _upstream(self) -> None:
        try:
            while data := await self.c_reader.read(65536):
                seen = self.sniffer.feed(data)
                self.s_writer.write(data)
                await self.s_writer.drain()
                target = self.proxy.take_lost(seen)
                if target == "ws":
                    self.lose()
                    return
                if target == "http":
                    self.drop_answer = True
            with contextlib.suppress(OSError, RuntimeError):
                self.s_writer.write_eof()
        except (OSError, ConnectionError):
            self.abort()

    async def _downstream(self) -> None:
        try:
            while data := await self.s_reader.read(65536):
                if self.drop_answer:
                    self.lose()
                    return
                self.c_writer.write(data)
                await self.c_writer.drain()
            with contextlib.suppress(OSError, RuntimeError):
                self.c_writer.write_eof()
        except (OSError, ConnectionError):
            self.abort()


class Proxy:
    """A TCP load balancer in this process: round robin over ``backends`` (ports), the next
    one when a backend refuses; it can cut every connection, and lose answers."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self._next = 0
        self.pipes: set[Pipe] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        #: Lost answers still to inject, by target: ``"mutate"``, ``"refresh"``.
        self.armed: Counter[str] = Counter()
        #: Lost answers injected, by what: ``ws_mutate``, ``ws_refresh``, ``http_refresh``.
        self.lost: Counter[str] = Counter()
        self.connections = 0
        self.cuts = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.cut_all()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    def cut_all(self) -> int:
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.abort()
        self.cuts += len(pipes)
        return len(pipes)

    def take_lost(self, seen: list[str]) -> str | None:
        """If a frame or request just forwarded is one an armed fault waits for: consume the
        fault and say how to lose its answer (``"ws"``: cut now; ``"http"``: drop the answer)."""
        for kind in seen:
            target = {"ws_mutate": "mutate", "ws_refresh": "refresh", "http_refresh": "refresh"}
            wanted = target.get(kind)
            if wanted is not None and self.armed[wanted] > 0:
                self.armed[wanted] -= 1
                self.lost[kind] += 1
                return "http" if kind.startswith("http") else "ws"
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(len(self.backends)):
            port = self.backends[self._next]
            self._next = (self._next + 1) % len(self.backends)
            with contextlib.suppress(OSError, TimeoutError):
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
        if upstream is None:
            writer.transport.abort()
            return
        self.connections += 1
        pipe = Pipe(self, (reader, writer), upstream)
        self.pipes.add(pipe)
        try:
            await pipe.run()
        finally:
            self.pipes.discard(pipe)


# ================================================================================= Redis


class StandaloneRedis:
    """One ``redis-server``, AOF on with ``appendfsync always``; restarts keep port and data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.node = EmbeddedRedis(data_dir, appendonly=True, private=False, extra_args=AOF_ALWAYS)
        self.url = ""

    def start(self) -> str:
        self.url = self.node.start()
        return self.url

    async def crash_and_restart(self, down: float) -> None:
        port = self.node.port
        self.node.kill()
        await asyncio.sleep(down)
        self.node = EmbeddedRedis(
            self.data_dir, port=port, appendonly=True, private=False, extra_args=AOF_ALWAYS
        )
        # In a worker thread: loading the AOF must not stall the proxy. The default executor's
        # threads live until the loop closes, after this run stopped Redis, so the
        # die-with-parent signal (sent when the forking *thread* exits) comes only with them.
        await asyncio.to_thread(self.node.start, 30.0)

    def stop(self) -> None:
        self.node.stop()


class ClusterRedis:
    """A Redis Cluster of 3 masters with one replica each, AOF on, on free ports."""

    NODE_TIMEOUT_MS = 2000

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.nodes: list[EmbeddedRedis] = []
        self.url = ""

    def _node(self, port: int) -> EmbeddedRedis:
        return cluster_node(
            self.data_dir,
            port,
            "--cluster-node-timeout",
            str(self.NODE_TIMEOUT_MS),
            "--repl-diskless-sync-delay",
            "0",
            *AOF_ALWAYS,
        )

    def start(self, timeout: float = 60.0) -> str:
        self.url = start_cluster(
            self.nodes, 6, self._node, replicas=1, node_ok=self._node_ok, timeout=timeout
        )
        return self.url

    @staticmethod
    def _node_ok(port: int) -> bool:
        with (
            contextlib.suppress(redis.RedisError, OSError),
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as r,
        ):
            info = r.execute_command("CLUSTER INFO")
            replication = r.info("replication")
            link_up = replication.get("role") != "slave" or (
                replication.get("master_link_status") == "up"
            )
            return bool(
                str(info.get("cluster_state")) == "ok"
                and str(info.get("cluster_slots_ok")) == "16384"
                and str(info.get("cluster_known_nodes")) == "6"
                and link_up
            )
        return False

    async def _data_shard(self) -> tuple[int, list[int]]:
        """The port of the master holding the ``{tether-data}`` slot, and its replicas'."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                node_client = redis.asyncio.Redis(port=node.port, socket_timeout=2)
                async with node_client as r:
                    slot = int(await r.execute_command("CLUSTER KEYSLOT", "{tether-data}"))
                    ranges = await r.execute_command("CLUSTER SLOTS")
            except (redis.RedisError, OSError):
                continue
            for entry in ranges:
                if int(entry[0]) <= slot <= int(entry[1]):
                    return int(entry[2][1]), [int(r[1]) for r in entry[3:]]
        raise RuntimeError("no node answers CLUSTER SLOTS")

    async def failover(self, *, kill: bool) -> str:
        """Make the replica of the data slot's master take over: ``CLUSTER FAILOVER`` on it, or
        (``kill``) SIGKILL the master, wait for the takeover, then restart the old master
        (it rejoins as a replica). Returns a description."""
        master, replicas = await self._data_shard()
        if not replicas:
            raise RuntimeError(f"the master :{master} has no replica")
        replica = replicas[0]
        if kill:
            node = next(n for n in self.nodes if n.port == master)
            node.kill()
        else:
            async with redis.asyncio.Redis(host="127.0.0.1", port=replica, socket_timeout=5) as r:
                await r.execute_command("CLUSTER FAILOVER")
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(RuntimeError):
                now_master, _ = await self._data_shard()
                if now_master == replica:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica :{replica} did not take over from :{master}")
            await asyncio.sleep(0.1)
        if kill:
            index = next(i for i, n in enumerate(self.nodes) if n.port == master)
            self.nodes[index] = self._node(master)
            await asyncio.to_thread(self.nodes[index].start, 30.0)
        return f"data master :{master} -> :{replica}"

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


# ================================================================================= a client


class _Never(Exception):
    """Stands in for an exception class this version of the client does not have."""


@dataclass
class ClientRun:
    """What one client process saw; sent to the harness as its report."""

    user_id: str
    counter: str
    acked: list[int] = field(default_factory=list)
    maybe_applied: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    definite_errors: Counter[str] = field(default_factory=Counter)
    #: The first few failures surfaced, with their message and time, to find their cause.
    failure_samples: list[dict[str, Any]] = field(default_factory=list)
    ryw: list[dict[str, Any]] = field(default_factory=list)
    ryw_count: int = 0
    #: Acknowledged values that skipped some (``got`` > ``after`` + 1): where another
    #: increment landed, an unknown outcome that applied or a double; with times, to find it.
    jumps: list[dict[str, Any]] = field(default_factory=list)
    blanks: list[list[Any]] = field(default_factory=list)
    signed_out: list[str] = field(default_factory=list)
    query_errors: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "maybe_applied": self.maybe_applied,
            "failures": dict(self.failures),
            "definite_errors": dict(self.definite_errors),
            "failure_samples": self.failure_samples[:10],
            "ryw_count": self.ryw_count,
            "jumps": self.jumps[:50],
            "ryw_examples": self.ryw[:10],
            "blanks": self.blanks,
            "signed_out": self.signed_out,
            "query_errors": dict(self.query_errors),
        }


#: Keys whose values a frame trace never shows (tokens, refresh secrets, retry keys).
_SECRET_KEY = re.compile(r"token|refresh|retrykey|password|secret", re.IGNORECASE)


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "<redacted>" if _SECRET_KEY.search(k) and isinstance(v, str) else _redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def trace_frame(direction: str, text: str) -> None:
    """``--trace-client``: every frame of the client to its log, secrets redacted."""
    try:
        shown = json.dumps(_redacted(json.loads(text)), separators=(",", ":"))
    except ValueError:
        shown = "<not JSON>"
    print(f"{time.time():.3f} {direction} {shown[:500]}", file=sys.stderr, flush=True)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def client_main(spec: dict[str, Any]) -> None:
    """One client process: see the module docstring. Talks to the harness by JSON lines,
    commands on stdin, events on stdout; its log goes to stderr."""
    import tether
    import tether.client
    from tether.client import AuthState, FileTokenStore, MutationError, TetherClient, TetherError

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # OutcomeUnknown and mutate(timeout=) come with contract 1.1's client; without them this
    # client times its mutations itself, and counts the timeouts as failures surfaced.
    outcome_unknown: type[BaseException] = getattr(
        tether, "OutcomeUnknown", getattr(tether.client, "OutcomeUnknown", _Never)
    )
    has_timeout = "timeout" in inspect.signature(TetherClient.mutate).parameters
    mutate_timeout = float(spec["mutate_timeout"])
    run = ClientRun(spec["user_id"], spec["counter"])
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def read_commands() -> None:
        while line := await stdin.readline():
            await commands.put(json.loads(line))
        await commands.put({"cmd": "exit"})

    client: TetherClient
    signing_in: asyncio.Task[Any] | None = None

    def on_auth(status: Any) -> None:
        nonlocal signing_in
        if status.state is AuthState.SIGNED_OUT and signing_in is None:
            run.signed_out.append(str(status.reason))
            # The harness's stand-in for the user typing the password again.
            signing_in = loop.create_task(sign_in_again())

    async def sign_in_again() -> None:
        nonlocal signing_in
        try:
            for attempt in range(50):
                try:
                    await client.sign_in(spec["email"], PASSWORD)
                    return
                except TetherError as exc:
                    logging.getLogger("chaos").warning("sign-in again failed: %s", exc.code)
                    await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
        finally:
            signing_in = None

    #: When the server pushed ``auth_expired`` (no ``auth_ok`` since): the identity really
    #: ended at its ``exp`` + leeway, a renewal having been impossible until then.
    expired_at: float | None = None
    tracing = bool(spec.get("trace"))

    def on_frame(direction: str, text: str) -> None:
        nonlocal expired_at
        if direction == "recv":
            if text.startswith('{"type":"auth_expired"'):
                expired_at = time.time()
            elif text.startswith('{"type":"auth_ok"'):
                expired_at = None
        if tracing:
            trace_frame(direction, text)

    client = TetherClient(
        spec["url"],
        token_store=FileTokenStore(spec["token_file"]),
        on_auth_state=on_auth,
        trace=on_frame,
    )
    own = spec["user_id"]
    whoami_seen_own = False
    whoami_own_at = 0.0
    blank: list[Any] | None = None
    counter_value: int | None = None
    counter_at = 0.0
    ready = asyncio.Event()
    stop = asyncio.Event()

    def holds_session() -> bool:
        return client.auth_status.state in (AuthState.AUTHENTICATED, AuthState.REFRESHING)

    async def watch_whoami(sub: Any) -> None:
        nonlocal whoami_seen_own, whoami_own_at, blank
        while True:
            try:
                value = await sub.__anext__()
            except StopAsyncIteration:
                return
            except TetherError as exc:
                run.query_errors[f"whoami:{exc.code}"] += 1
                continue
            now = time.time()
            if isinstance(value, dict) and value.get("userId") == own:
                whoami_seen_own, whoami_own_at = True, now
                if blank is not None:
                    blank[1] = now
                    run.blanks.append(blank)
                    blank = None
            elif whoami_seen_own and holds_session() and blank is None:
                shown = "null" if value is None else "another user"
                blank = [now, None, shown, str(client.auth_status.state), expired_at is not None]
            if whoami_seen_own and counter_value is not None:
                ready.set()

    async def watch_counter(sub: Any) -> None:
        nonlocal counter_value, counter_at
        while True:
            try:
                value = await sub.__anext__()
            except StopAsyncIteration:
                return
            except TetherError as exc:
                run.query_errors[f"counter.get:{exc.code}"] += 1
                continue
            counter_value, counter_at = int(value), time.time()
            if whoami_seen_own:
                ready.set()

    async def increment(request_id: int | None) -> int:
        args = {"name": run.counter, "by": 1}
        if has_timeout:
            kw: dict[str, Any] = {"timeout": mutate_timeout}
            if request_id is not None:
                kw["request_id"] = request_id
            return int(await client.mutate("counter.increment", **args, **kw))
        async with asyncio.timeout(mutate_timeout):
            return int(await client.mutate("counter.increment", **args))

    async def mutate_loop(counter_sub: Any) -> None:
        pause = float(spec["pause"])
        while not stop.is_set():
            request_id: int | None = None
            sent_at = time.time()
            while True:
                try:
                    value = await increment(request_id)
                except outcome_unknown as exc:
                    run.failures["outcome_unknown"] += 1
                    if stop.is_set():
                        run.maybe_applied += 1
                        break
                    request_id = getattr(exc, "request_id", None)
                    continue  # the same requestId again: it applies once at most
                except MutationError as exc:
                    run.failures[f"MutationError:{exc.code}"] += 1
                    if len(run.failure_samples) < 10:
                        run.failure_samples.append(
                            {"error": exc.code, "message": str(exc), "at": time.time()}
                        )
                    if exc.code == "unavailable":
                        run.maybe_applied += 1  # "outcome unknown" in today's words
                    else:
                        run.definite_errors[exc.code] += 1
                    break
                except TimeoutError:
                    run.failures["timeout"] += 1
                    run.maybe_applied += 1  # cancelled: applied once or not at all
                    break
                except TetherError as exc:  # ClientClosed: the client stopped for good
                    run.failures[f"{type(exc).__name__}:{exc.code}"] += 1
                    run.maybe_applied += 1
                    return
                shown = counter_sub.latest
                if shown is None or shown < value:
                    run.ryw_count += 1
                    if len(run.ryw) < 10:
                        run.ryw.append({"returned": value, "shown": shown, "at": time.time()})
                previous = run.acked[-1] if run.acked else 0
                if value != previous + 1:
                    run.jumps.append(
                        {"after": previous, "got": value, "sent": sent_at, "at": time.time()}
                    )
                run.acked.append(value)
                break
            if pause:
                await asyncio.sleep(pause)

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            emit("progress", acked=len(run.acked), failures=sum(run.failures.values()))

    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(read_commands())]
    async with client:
        whoami = client.subscribe("whoami")
        counter = client.subscribe("counter.get", name=run.counter)
        async with whoami, counter:
            tasks += [
                asyncio.create_task(watch_whoami(whoami)),
                asyncio.create_task(watch_counter(counter)),
            ]
            await ready.wait()
            emit("ready")
            tasks.append(asyncio.create_task(progress()))
            mutating = asyncio.create_task(mutate_loop(counter))
            while True:
                command = await commands.get()
                if command["cmd"] == "stop":
                    stop.set()
                    await mutating
                    if blank is not None:  # still blank at the end: counted, open-ended
                        run.blanks.append(
                            [blank[0], time.time(), blank[2], "open at the end", blank[4]]
                        )
                        blank = None
                    emit("stopped", report=run.report())
                elif command["cmd"] == "settle":
                    final = int(command["final"])
                    deadline = time.monotonic() + float(command["wait"])
                    while time.monotonic() < deadline:
                        own_now = (
                            isinstance(whoami.latest, dict) and whoami.latest.get("userId") == own
                        )
                        if counter_value == final and own_now:
                            break
                        await asyncio.sleep(0.05)
                    fresh = counter_value == final and blank is None
                    emit(
                        "settled",
                        fresh_at=max(counter_at, whoami_own_at) if fresh else None,
                        shown=counter_value,
                        whoami=whoami.latest,
                    )
                elif command["cmd"] == "exit":
                    break
    for task in tasks:
        task.cancel()


# ================================================================================= the harness


class ClientProc:
    """One client process, as the harness drives it."""

    def __init__(self, index: int, spec: dict[str, Any], log_path: Path) -> None:
        self.index = index
        self.spec = spec
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.acked = 0
        self.frozen = False
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                "--client",
                json.dumps(self.spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                **child_options(),
            )
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event["event"] == "ready":
                self.ready.set()
            elif event["event"] == "progress":
                self.acked = event["acked"]
            else:
                await self.events.put(event)
        await self.events.put({"event": "exited"})

    async def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict[str, Any] | None:
        """The next event from the client if it is ``event`` within ``timeout``; else None."""
        try:
            async with asyncio.timeout(timeout):
                got = await self.events.get()
        except TimeoutError:
            return None
        return got if got["event"] == event else None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def finish(self) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)
        await self.send("exit")
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()
        return self.proc.returncode


@dataclass
class Fault:
    at: float  # seconds since the faults began
    kind: str
    detail: str


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-chaos-"))
        self.redis: StandaloneRedis | ClusterRedis | None = None
        self.servers: list[TetherServer] = []
        self.down: set[int] = set()
        self.proxy: Proxy | None = None
        self.clients: list[ClientProc] = []
        self.faults: list[Fault] = []
        self.fault_errors: list[str] = []
        self.freezes: list[tuple[int, float, float]] = []  # client, SIGSTOP at, SIGCONT at
        self.background: set[asyncio.Task[None]] = set()
        self.started = 0.0  # time.monotonic() when the faults began
        self.started_epoch = 0.0  # time.time() then: the clients report wall-clock times
        self.kinds = tuple(args.faults)

    # ------------------------------------------------------------------ set-up

    async def set_up(self) -> None:
        args = self.args
        if args.redis == "cluster":
            self.redis = ClusterRedis(self.tmp / "redis")
        else:
            self.redis = StandaloneRedis(self.tmp / "redis")
        redis_url = self.redis.start()
        print(f"redis ({args.redis}) on {redis_url}", flush=True)
        env = {**CHAOS_ENV, "TETHER_KEYS_FILE": str(self.tmp / "keys.json")}
        for i in range(args.instances):
            server = TetherServer(redis_url, env=env, tmp_dir=self.tmp / f"server{i}")
            self.servers.append(server)
            await server.astart(60)  # the first creates the shared key file
        self.proxy = Proxy([s.port for s in self.servers])
        await self.proxy.start()
        print(
            f"{args.instances} instances on ports {self.proxy.backends}, "
            f"proxy on {self.proxy.port}",
            flush=True,
        )
        from tether.client import AuthAPI, FileTokenStore

        api = AuthAPI(self.servers[0].base_url)
        run_id = uuid.uuid4().hex[:8]
        users: list[tuple[str, str, Path]] = []
        for u in range(max(1, args.clients - 1)):
            email = f"chaos-{run_id}-{u}@example.com"
            session = await api.sign_up(email, PASSWORD)
            token_file = self.tmp / "tokens" / f"user{u}.json"
            await FileTokenStore(token_file).save(session)
            users.append((email, session.user_id, token_file))
        for i in range(args.clients):
            # Clients 0 and 1 share user 0 and its token file; client i > 1 has user i - 1.
            email, user_id, token_file = users[max(0, i - 1)]
            spec = {
                "index": i,
                "url": f"ws://127.0.0.1:{self.proxy.port}/sync",
                "email": email,
                "user_id": user_id,
                "token_file": str(token_file),
                "counter": f"chaos-{run_id}-c{i}",
                "pause": args.pause,
                "mutate_timeout": args.mutate_timeout,
                "trace": i in args.trace_client,
            }
            client = ClientProc(i, spec, self.tmp / f"client{i}.log")
            self.clients.append(client)
            await client.start()
        async with asyncio.timeout(120):
            await asyncio.gather(*(c.ready.wait() for c in self.clients))
        print(f"{args.clients} clients ready", flush=True)

    def siblings(self, index: int) -> set[int]:
        """The client processes sharing ``index``'s token file, itself included."""
        return {0, 1} if index in (0, 1) and self.args.clients > 1 else {index}

    # ------------------------------------------------------------------ faults

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log_fault(self, kind: str, detail: str) -> None:
        self.faults.append(Fault(round(self.elapsed(), 2), kind, detail))
        print(f"[{self.elapsed():7.1f} s] {kind}: {detail}", flush=True)

    def in_background(self, make: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(make)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def inject(self, kind: str) -> None:
        assert self.proxy is not None and self.redis is not None
        if kind == "kill_instance":
            candidates = [i for i in range(len(self.servers)) if i not in self.down]
            if not candidates:
                return
            i = self.rng.choice(candidates)
            down = round(self.rng.uniform(0, 2), 2)
            self.down.add(i)
            self.servers[i].kill()
            self.log_fault(kind, f"instance {i} (:{self.servers[i].port}), back in {down} s")
            self.in_background(self._restart_instance(i, down))
        elif kind == "cut_connections":
            self.log_fault(kind, f"{self.proxy.cut_all()} connections")
        elif kind == "restart_redis":
            assert isinstance(self.redis, StandaloneRedis)
            down = round(self.rng.uniform(0, 2), 2)
            self.log_fault(kind, f"SIGKILL, back in {down} s")
            await self.redis.crash_and_restart(down)
        elif kind == "freeze_client":
            candidates = [c for c in self.clients if not c.frozen]
            if not candidates:
                return
            client = self.rng.choice(candidates)
            seconds = round(self.rng.uniform(*FREEZE_SECONDS), 2)
            self.log_fault(kind, f"client {client.index} for {seconds} s")
            self.in_background(self._freeze(client, seconds))
        elif kind in ("lost_mutate", "lost_refresh"):
            target = kind.removeprefix("lost_")
            self.proxy.armed[target] += 1
            self.log_fault(kind, f"the answer to the next {target} is lost")
        elif kind in ("cluster_failover", "kill_master"):
            assert isinstance(self.redis, ClusterRedis)
            self.log_fault(kind, "started")
            detail = await self.redis.failover(kill=kind == "kill_master")
            self.log_fault(kind, detail)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    async def _restart_instance(self, i: int, down: float) -> None:
        await asyncio.sleep(down)
        for attempt in range(5):
            try:
                await self.servers[i].astart(30)
                break
            except Exception as exc:
                self.fault_errors.append(f"instance {i} restart {attempt}: {exc!s:.300}")
        self.down.discard(i)

    async def _freeze(self, client: ClientProc, seconds: float) -> None:
        client.frozen = True
        start = time.time()
        client.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            client.signal(signal.SIGCONT)
            client.frozen = False
            self.freezes.append((client.index, start, time.time()))

    async def run_faults(self, duration: float) -> None:
        low, high = self.args.fault_interval
        deck: list[str] = []
        deadline = self.started + duration
        next_progress = time.monotonic() + 10
        while True:
            wait = self.rng.uniform(low, high)
            if time.monotonic() + wait >= deadline:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            while wait > 0:
                step = min(wait, max(0.1, next_progress - time.monotonic()))
                await asyncio.sleep(step)
                wait -= step
                if time.monotonic() >= next_progress:
                    next_progress += 10
                    self.print_progress()
            if not deck:
                deck = list(self.kinds)
                self.rng.shuffle(deck)
            kind = deck.pop()
            try:
                await self.inject(kind)
            except Exception as exc:
                self.fault_errors.append(f"{kind}: {exc!r:.300}")
                print(f"fault {kind} failed: {exc!r}", flush=True)

    def print_progress(self) -> None:
        acked = sum(c.acked for c in self.clients)
        print(
            f"[{self.elapsed():7.1f} s] {acked} mutations acknowledged, "
            f"{sum(f.detail != 'started' for f in self.faults)} faults, load {load_average()}",
            flush=True,
        )

    async def end_faults(self) -> None:
        """Undo every fault still in effect: thaw, restart, disarm."""
        assert self.proxy is not None
        self.proxy.armed.clear()
        if self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)
        for i, server in enumerate(self.servers):
            if server.returncode is not None:
                await server.astart(30)
                self.down.discard(i)

    # ------------------------------------------------------------------ the end

    async def collect(self) -> tuple[Reports, Reports, dict[str, int]]:
        """Stop the clients, read every counter, then write to each once more from outside
        (a probe): the clients' reports, their freshness, and the counters before the probe.

        The probe is how "fresh" is checked: a client's subscription shows the probe's value
        only if it still receives other writers' commits, not merely its own last result."""
        args = self.args
        for client in self.clients:
            await client.send("stop")
        reports: Reports = {}
        for client in self.clients:
            got = await client.expect("stopped", args.mutate_timeout * 2 + 30)
            if got is not None:
                reports[client.index] = got["report"]
        from tether.client import TetherClient

        finals: dict[str, int] = {}
        probes: dict[str, int] = {}
        async with asyncio.timeout(60), TetherClient(self.servers[0].ws_url) as outsider:
            for client in self.clients:
                name = client.spec["counter"]
                finals[name] = int(await outsider.query("counter.get", name=name))
            for client in self.clients:
                name = client.spec["counter"]
                probes[name] = int(await outsider.mutate("counter.increment", name=name, by=1))
                if probes[name] != finals[name] + 1:
                    self.fault_errors.append(f"probe of {name}: {finals[name]} -> {probes[name]}")
        settled: Reports = {}
        for client in self.clients:
            if client.index in reports:
                await client.send("settle", final=probes[client.spec["counter"]], wait=60)
        for client in self.clients:
            if client.index in reports:
                got = await client.expect("settled", 75)
                if got is not None:
                    settled[client.index] = got
        if any(got.get("fresh_at") is None for got in settled.values()):
            # Stale clients: have each instance log where its tasks wait (see app.dump_tasks).
            for server in self.servers:
                with contextlib.suppress(Exception):
                    if server.process is not None:
                        server.process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1)
        return reports, settled, finals

    async def tear_down(self) -> dict[int, int | None]:
        codes: dict[int, int | None] = {}
        for client in self.clients:
            codes[client.index] = await client.finish()
        if self.proxy is not None:
            await self.proxy.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop(15)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        return codes

    def kill_everything(self) -> None:
        for client in self.clients:
            client.signal(signal.SIGCONT)
            client.signal(signal.SIGKILL)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
        if isinstance(self.redis, StandaloneRedis):
            with contextlib.suppress(Exception):
                self.redis.node.kill()
        elif isinstance(self.redis, ClusterRedis):
            for node in self.redis.nodes:
                with contextlib.suppress(Exception):
                    node.kill()


def count_lines(path: Path, needle: str) -> tuple[int, list[str]]:
    """Lines of ``path`` containing ``needle``, and the few lines that say what failed."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0, []
    hits = [i for i, line in enumerate(lines) if needle in line]
    samples: list[str] = []
    for i in hits[:5]:
        # The exception line ends the traceback: the first unindented line after it.
        j = i + 1
        while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
            j += 1
        samples.append(lines[j][:300] if j < len(lines) else lines[i][:300])
    return len(hits), samples


def account(
    harness: Harness,
    reports: dict[int, dict[str, Any]],
    settled: dict[int, dict[str, Any]],
    finals: dict[str, int],
    faults_ended: float,
    exit_codes: dict[int, int | None],
) -> dict[str, Any]:
    """Every figure of the report, from the clients' reports and the logs."""
    args = harness.args
    t0 = harness.started_epoch
    figures: dict[str, Any] = dict.fromkeys(TARGETS, 0)
    per_client: list[dict[str, Any]] = []
    failure_kinds: Counter[str] = Counter()
    blanks_expected = blanks_expired = 0
    longest_blank = longest_expected = longest_expired = 0.0
    # Redis unreachable: a restart, or a master's failover. An identity that could not be
    # renewed for longer than what was left of it (with 2 s tokens: the 1 s notice + the 1 s
    # leeway at most) ends at exp + leeway: the server must not keep an expired identity, so a
    # blank that follows the server's auth_expired within OUTAGE_GRACE of an outage's start is
    # expected, not a target. Any other blank (a refresh answered unavailable, for one) is.
    outages = [
        (t0 + f.at, t0 + f.at + OUTAGE_GRACE)
        for f in harness.faults
        if f.kind in ("restart_redis", "cluster_failover", "kill_master") and f.detail != "started"
    ]
    ryw_examples: list[dict[str, Any]] = []
    lags: list[float] = []
    for client in harness.clients:
        i = client.index
        report = reports.get(i)
        if report is None:
            figures["client_crashes"] += 1
            per_client.append({"client": i, "report": None, "exit": exit_codes.get(i)})
            continue
        final = finals[client.spec["counter"]]
        acked: list[int] = report["acked"]
        can_apply = len(acked) + report["maybe_applied"]
        lost = max(sum(1 for v in acked if v > final), len(acked) - final, 0)
        doubled = max(final - can_apply, 0)
        repeated = len(acked) - len(set(acked))
        figures["lost_mutations"] += lost
        figures["doubled_mutations"] += doubled
        figures["repeated_values"] += repeated
        surfaced = sum(report["failures"].values())
        figures["failures_surfaced"] += surfaced
        failure_kinds.update(report["failures"])
        figures["ryw_violations"] += report["ryw_count"]
        ryw_examples += [
            {"client": i, **e, "at": round(e["at"] - t0, 3)} for e in report["ryw_examples"][:3]
        ]
        figures["forced_signins"] += len(report["signed_out"])
        windows = [
            (start, cont + FREEZE_GRACE)
            for frozen, start, cont in harness.freezes
            if i in harness.siblings(frozen)
        ]
        for start, end, _shown, _state, *more in report["blanks"]:
            length = end - start
            expired = bool(more and more[0])
            if any(a <= start <= b for a, b in windows):
                blanks_expected += 1
                longest_expected = max(longest_expected, length)
            elif expired and any(a <= start <= b for a, b in outages):
                blanks_expired += 1
                longest_expired = max(longest_expired, length)
            else:
                figures["identity_blanks"] += 1
                longest_blank = max(longest_blank, length)
        fresh = settled.get(i, {}).get("fresh_at")
        lag = None if fresh is None else max(0.0, fresh - faults_ended)
        if lag is None or lag > args.fresh_within:
            figures["stale_subscriptions"] += 1
        if lag is not None:
            lags.append(lag)
        if exit_codes.get(i) not in (0, None):
            figures["client_crashes"] += 1
        n, samples = count_lines(client.log_path, "Traceback")
        figures["client_tracebacks"] += n
        never, never_samples = count_lines(client.log_path, "never retrieved")
        figures["never_retrieved"] += never
        per_client.append(
            {
                "client": i,
                "acked": len(acked),
                "maybe_applied": report["maybe_applied"],
                "final": final,
                "lost": lost,
                "doubled": doubled,
                "repeated": repeated,
                "failures": report["failures"],
                "definite_errors": report["definite_errors"],
                "failure_samples": [
                    {**f, "at": round(f["at"] - t0, 3)} for f in report["failure_samples"]
                ],
                "ryw": report["ryw_count"],
                "jumps": [
                    {**j, "sent": round(j["sent"] - t0, 3), "at": round(j["at"] - t0, 3)}
                    for j in report["jumps"]
                ],
                # Seconds since the faults began, as in the fault log.
                "blanks": [
                    {
                        "at": round(a - t0, 3),
                        "seconds": round(b - a, 3),
                        "shown": what,
                        "state": st,
                        "expired": bool(more and more[0]),
                    }
                    for a, b, what, st, *more in report["blanks"]
                ],
                "signed_out": report["signed_out"],
                "query_errors": report["query_errors"],
                "lag": lag,
                "log_samples": samples + never_samples,
            }
        )
    server_samples: list[str] = []
    for server in harness.servers:
        n, samples = count_lines(server.log_path, "Traceback")
        figures["server_tracebacks"] += n
        server_samples += samples
    figures["harness_errors"] = len(harness.fault_errors)
    assert harness.proxy is not None
    injected = Counter(f.kind for f in harness.faults if f.detail != "started")
    return {
        "run": describe_run(),
        "params": {
            "redis": args.redis,
            "clients": args.clients,
            "instances": args.instances,
            "lifetimes": args.lifetimes,
            "seconds": args.lifetimes * ACCESS_TTL,
            "seed": args.seed,
            "fault_interval": args.fault_interval,
            "pause": args.pause,
            "mutate_timeout": args.mutate_timeout,
            "fresh_within": args.fresh_within,
        },
        "figures": figures,
        "ok": not any(figures.values()),
        "details": {
            "acknowledged": sum(p.get("acked", 0) for p in per_client),
            "failure_kinds": dict(failure_kinds),
            "longest_blank_s": round(longest_blank, 3),
            "blanks_after_freeze_expected": blanks_expected,
            "blanks_expired_in_outage": blanks_expired,
            "longest_blank_expired_in_outage_s": round(longest_expired, 3),
            "longest_blank_after_freeze_s": round(longest_expected, 3),
            "max_subscription_lag_s": round(max(lags), 3) if lags else None,
            "ryw_examples": ryw_examples[:10],
            "server_traceback_samples": server_samples[:10],
            "faults_injected": dict(injected),
            "lost_answers": dict(harness.proxy.lost),
            "proxied_connections": harness.proxy.connections,
            "connections_cut": harness.proxy.cuts,
            "fault_errors": harness.fault_errors,
        },
        "faults": [f.__dict__ for f in harness.faults],
        "freezes": [
            {"client": c, "at": round(a - t0, 3), "seconds": round(b - a, 3)}
            for c, a, b in harness.freezes
        ],
        "clients": per_client,
    }


def print_report(result: dict[str, Any]) -> None:
    params, figures, details = result["params"], result["figures"], result["details"]
    print()
    print(
        f"chaos run: {params['clients']} clients, {params['instances']} instances, "
        f"redis {params['redis']}, {params['seconds']} s ({params['lifetimes']} token "
        f"lifetimes), seed {params['seed']}; {result['run']}"
    )
    print(
        f"{details['acknowledged']} mutations acknowledged; faults injected: "
        + ", ".join(f"{k} {v}" for k, v in sorted(details["faults_injected"].items()))
        + "; answers lost: "
        + (", ".join(f"{k} {v}" for k, v in sorted(details["lost_answers"].items())) or "none")
    )
    print()
    print("| figure | value | target |")
    print("|---|---|---|")
    for name, label in TARGETS.items():
        value = figures[name]
        extra = ""
        if name == "identity_blanks" and value:
            extra = f" (longest {details['longest_blank_s']} s)"
        if name == "failures_surfaced" and value:
            extra = " (" + ", ".join(f"{k} {v}" for k, v in details["failure_kinds"].items()) + ")"
        print(f"| {label} | {value}{extra} | 0 |")
    print(
        f"| identity blanks after a freeze (expected) | {details['blanks_after_freeze_expected']}"
        f" (longest {details['longest_blank_after_freeze_s']} s) | - |"
    )
    print(
        "| identity blanks: expired during a Redis outage (expected)"
        f" | {details['blanks_expired_in_outage']}"
        f" (longest {details['longest_blank_expired_in_outage_s']} s) | - |"
    )
    print(f"| longest subscription lag after the faults (s) | {details['max_subscription_lag_s']}"
          f" | <= {params['fresh_within']} |")  # fmt: skip
    if details["ryw_examples"]:
        print("\nread-your-writes violations (first; `at` in seconds from the start):")
        for example in details["ryw_examples"]:
            print(f"  {example}")
    if details["fault_errors"]:
        print("\nfaults that failed to inject or undo:")
        for line in details["fault_errors"]:
            print(f"  {line}")
    if details["server_traceback_samples"]:
        print("\nserver exceptions (first lines):")
        for line in details["server_traceback_samples"]:
            print(f"  {line}")
    print("\nRESULT:", "PASS (every target figure is zero)" if result["ok"] else "FAIL")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    harness = Harness(args)
    ok = False
    try:
        await harness.set_up()
        harness.started, harness.started_epoch = time.monotonic(), time.time()
        duration = args.lifetimes * ACCESS_TTL
        print(f"faults for {duration} s, seed {args.seed}, kinds: {', '.join(harness.kinds)}")
        await harness.run_faults(duration)
        await harness.end_faults()
        faults_ended = time.time()
        print(f"[{harness.elapsed():7.1f} s] faults over; stopping the clients", flush=True)
        reports, settled, finals = await harness.collect()
        codes = await harness.tear_down()
        result = account(harness, reports, settled, finals, faults_ended, codes)
        result["tmp"] = str(harness.tmp)
        ok = bool(result["ok"])
        return result
    finally:
        harness.kill_everything()
        if ok and not args.keep:
            shutil.rmtree(harness.tmp, ignore_errors=True)
        else:
            print(f"logs and data kept in {harness.tmp}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6, help="client processes (default 6)")
    parser.add_argument("--instances", type=int, default=3, help="Tether instances (default 3)")
    parser.add_argument(
        "--lifetimes",
        type=int,
        default=60,
        help=f"length of the faults, in access-token lifetimes of {ACCESS_TTL} s (default 60)",
    )
    parser.add_argument("--redis", choices=("standalone", "cluster"), default="standalone")
    parser.add_argument(
        "--faults", type=comma_list, default=None, help=f"fault kinds, of: {', '.join(ALL_FAULTS)}"
    )
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed (random)")
    parser.add_argument(
        "--fault-interval",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=(2.0, 10.0),
        help="seconds between faults, low,high (default 2,10)",
    )
    parser.add_argument(
        "--pause", type=float, default=0.1, help="seconds between a client's mutations"
    )
    parser.add_argument(
        "--mutate-timeout", type=float, default=30.0, help="the application's mutate timeout"
    )
    parser.add_argument(
        "--fresh-within",
        type=float,
        default=15.0,
        help="seconds after the faults by which every subscription must be fresh (default 15)",
    )
    parser.add_argument(
        "--trace-client",
        type=lambda s: [int(x) for x in comma_list(s)],
        default=[],
        help="log every frame of these clients (indexes, e.g. 0,1) to their logs, secrets "
        "redacted; the log is then not scanned for tracebacks",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep logs and data even on a pass")
    parser.add_argument("--timeout", type=float, default=None, help="give up after (seconds)")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(client_main(json.loads(args.client)))
        return

    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if args.faults is None:
        args.faults = list(CLUSTER_FAULTS if args.redis == "cluster" else STANDALONE_FAULTS)
    unknown = set(args.faults) - set(ALL_FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    needs_cluster = {"cluster_failover", "kill_master"} & set(args.faults)
    if needs_cluster and args.redis != "cluster":
        parser.error(f"{', '.join(sorted(needs_cluster))} need --redis cluster")
    if "restart_redis" in args.faults and args.redis == "cluster":
        parser.error("restart_redis is for --redis standalone")
    if args.clients < 1 or args.instances < 1:
        parser.error("at least one client and one instance")
    timeout = args.timeout or args.lifetimes * ACCESS_TTL + 600
    result = run_bounded(lambda: run(args), timeout)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
