"""Reconnect storm: an instance holding N subscribed sockets dies; how long until every client
is back on the survivors, beside a bare ``websockets`` server accepting N handshakes.

Setup: one ``redis-server`` and three Tether instances A, B, C (``python -m tether serve``, one
key file). Every client has a session of its own (minted straight into Redis with the
deployment's keys: N sign-ups would take minutes of argon2) and is given the three URLs, A first
and then B, C or C, B by turns, as clients behind a load balancer would be spread; the Python
client fails over to its next URL after the backoff of its first attempt (full jitter, 0-100 ms).
``--procs`` load-generator processes (asyncio loops) open the N clients on A: ``connect``,
``authenticate``, one ``subscribe`` to ``counter.get``, all authenticated and holding a result.

The storm (t0): A is killed (SIGKILL); right after, a write (``counter.increment``) is made on
B by a connection of this process. A client is **back** once, after t0, it has received
``auth_ok`` and a result that includes that write, on a survivor. Figures: the time from t0 to
the last client back (and p50/p99), and the CPU the survivors (and Redis) spent per reconnect
(``/proc/PID/stat``, from t0 to the last client back).

Baseline, the same run, the same load-generator processes and client library: the Tether
deployment is stopped, ``--bare-servers`` (2, as there are two survivors) bare ``websockets``
servers start, and at t0 every client opens a WebSocket to one of them after the same random
0-100 ms delay: the time from t0 to the last handshake completed. Target (issue 14):
Tether's storm time <= 2x the baseline's.

Clients (``--client``):

* ``lean`` (default): the sans-I/O ``LeanClient`` of ``sync_memory.py``, reconnecting as the
  Python client does: the next URL after a 0-100 ms delay, then ``connect``, ``authenticate``
  and ``subscribe`` sent in one flight (protocol §5 rule 1). Baseline: ``LeanClient`` handshakes.
* ``python``: ``tether.client.TetherClient`` (``fetch_token`` returns the client's token), a
  task per subscription iterating its values; far heavier per client than ``lean``.
  Baseline: ``websockets.asyncio.client.connect`` handshakes, the library ``TetherClient``
  uses.

Run from the repository root::

    .venv/bin/python bench/reconnect_storm.py --n 2000
    .venv/bin/python bench/reconnect_storm.py --n 20000 --procs 4            # full size
    .venv/bin/python bench/reconnect_storm.py --n 2000 --client python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync_memory
from common import (
    BENCH_ISSUER,
    ChildServer,
    DeploymentWithRedis,
    child_options,
    cpu_seconds,
    describe_run,
    percentile,
    print_header,
    raise_nofile,
    run_bounded,
)
from sync_memory import LeanClient, lean_connect

COUNTER = "storm"
#: The Python client's first reconnect waits a uniform [0, this) seconds (Backoff.initial).
FIRST_BACKOFF = 0.1


def frames_for(index: int, token: str) -> list[str]:
    """What a lean client sends on each (re)connection, in one flight (protocol §5 rule 1)."""
    return [
        json.dumps({"type": "connect", "clientId": f"storm-{index}", "protocol": 1}),
        json.dumps({"type": "authenticate", "token": token, "authVersion": 1}),
        json.dumps(
            {"type": "subscribe", "queryId": 1, "name": "counter.get", "args": {"name": COUNTER}}
        ),
    ]


def urls_of(index: int, urls: list[str]) -> list[str]:
    """A first, then the two survivors in an order that alternates between clients."""
    a, b, c = urls
    return [a, b, c] if index % 2 == 0 else [a, c, b]


# ------------------------------------------------------------------------------ worker process


class Tracker:
    """Per client: when ``auth_ok`` and each counter value arrived (wall clock)."""

    def __init__(self, count: int) -> None:
        self.auth_ok: list[list[float]] = [[] for _ in range(count)]
        self.connected: list[list[float]] = [[] for _ in range(count)]
        self.values: list[list[tuple[float, int]]] = [[] for _ in range(count)]

    def see(self, i: int, text: str, at: float) -> None:
        if '"auth_ok"' in text:
            self.auth_ok[i].append(at)
        elif '"connected"' in text:
            self.connected[i].append(at)
        elif '"transition"' in text:
            for update in json.loads(text)["updates"]:
                if "value" in update:
                    self.values[i].append((at, int(update["value"])))

    def back_at(self, i: int, t0: float, target: int) -> float | None:
        auth = next((t for t in self.auth_ok[i] if t >= t0), None)
        value = next((t for t, v in self.values[i] if t >= t0 and v >= target), None)
        if auth is None or value is None:
            return None
        return max(auth, value)

    def ready(self, i: int) -> bool:
        return bool(self.auth_ok[i]) and bool(self.values[i])


class LeanStormClient:
    """One lean client: reconnects as the Python client does, pipelining its requests."""

    def __init__(
        self, index: int, client_id: int, token: str, urls: list[str], tracker: Tracker
    ) -> None:
        self.index, self.client_id, self.token = index, client_id, token
        self.urls, self.tracker = urls, tracker
        self.url_index = 0
        self.ws: LeanClient | None = None
        self.task: asyncio.Task[None] | None = None

    def on_message(self, _ws: LeanClient, text: str, at: float) -> None:
        self.tracker.see(self.index, text, at)

    async def open(self) -> None:
        url = self.urls[self.url_index]
        ws = await lean_connect(url, on_message=self.on_message)
        self.ws = ws
        for frame in frames_for(self.client_id, self.token):
            ws.send(frame)

    async def keep(self) -> None:
        """Reconnect whenever the connection is lost (as the Python client does)."""
        attempt = 0
        while True:
            assert self.ws is not None
            while not self.ws.closed:
                waiter = asyncio.get_running_loop().create_future()
                self.ws.waiter = waiter
                await waiter
            self.url_index = (self.url_index + 1) % len(self.urls)
            await asyncio.sleep(random.random() * min(16.0, FIRST_BACKOFF * 2**attempt))
            try:
                await self.open()
                attempt = 0
            except (OSError, TimeoutError):
                attempt += 1


async def open_bounded(count: int, concurrency: int, opener: Any) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                await opener(i)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(i) for i in range(count)))
    return failures


async def wait_all(check: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for i in range(count) if check(i)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def worker(args: argparse.Namespace) -> None:
    tokens = json.loads(Path(args.tokens_file).read_text())
    urls = args.urls.split(",")
    count = len(tokens)
    tracker = Tracker(count)
    first = args.first_index
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    lean: list[LeanStormClient] = []
    python_clients: list[Any] = []
    tasks: list[asyncio.Task[Any]] = []
    if args.client == "lean":
        lean = [
            LeanStormClient(i, first + i, tokens[i], urls_of(first + i, urls), tracker)
            for i in range(count)
        ]
        failures = await open_bounded(count, args.concurrency, lambda i: lean[i].open())
        tasks = [asyncio.create_task(c.keep()) for c in lean if c.ws is not None]
    else:
        from tether.client import ClientOptions, TetherClient

        def make(i: int) -> Any:
            token = tokens[i]

            def trace(direction: str, text: str) -> None:
                if direction == "recv":
                    tracker.see(i, text, time.time())

            return TetherClient(
                urls_of(first + i, urls),
                fetch_token=lambda _force: token,
                client_id=f"storm-{first + i}",
                trace=trace,
                options=ClientOptions(),
            )

        async def follow(client: Any) -> None:
            async with client.subscribe("counter.get", name=COUNTER) as sub:
                async for _ in sub:
                    pass

        async def open_python(i: int) -> None:
            client = make(i)
            python_clients.append(client)
            await client.__aenter__()
            tasks.append(asyncio.create_task(follow(client)))
            deadline = time.monotonic() + 60
            while not tracker.ready(i):
                if time.monotonic() > deadline:
                    raise TimeoutError("no auth_ok and result within 60 s")
                await asyncio.sleep(0.02)

        failures = await open_bounded(count, args.concurrency, open_python)
    await wait_all(tracker.ready, count, 30)
    answer({"ready": sum(1 for i in range(count) if tracker.ready(i)), "failures": failures[:3]})

    # Commands: {"storm": [t0, target, timeout]} then {"bare": [t0, url, url..., timeout]}.
    line = await reader.readline()
    t0, target, timeout = json.loads(line)["storm"]
    await wait_all(lambda i: tracker.back_at(i, t0, target) is not None, count, timeout)
    backs = [tracker.back_at(i, t0, target) for i in range(count)]
    auths = [next((t - t0 for t in tracker.auth_ok[i] if t >= t0), None) for i in range(count)]
    conns = [next((t - t0 for t in tracker.connected[i] if t >= t0), None) for i in range(count)]
    answer(
        {
            "back": [b - t0 for b in backs if b is not None],
            "missing": backs.count(None),
            "auth": [a for a in auths if a is not None],
            "connected": [c for c in conns if c is not None],
        }
    )

    for task in tasks:
        task.cancel()
    for c in lean:
        if c.ws is not None:
            c.ws.abort()
    for client in python_clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.__aexit__(None, None, None), 5)
    await asyncio.sleep(0.2)
    answer({"released": True})

    line = await reader.readline()
    command = json.loads(line)["bare"]
    t0, bare_urls, timeout = command[0], command[1:-1], command[-1]
    done: list[float] = []
    held: list[Any] = []

    async def handshake(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 - time.time()) + random.random() * FIRST_BACKOFF)
        url = bare_urls[(first + i) % len(bare_urls)]
        if args.client == "lean":
            held.append(await lean_connect(url))
        else:
            from websockets.asyncio.client import connect

            held.append(await connect(url, compression=None, open_timeout=60))
        done.append(time.time() - t0)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(handshake(i) for i in range(count)), return_exceptions=True)
    answer({"bare": done, "missing": count - len(done)})
    for ws in held:
        if isinstance(ws, LeanClient):
            ws.abort()
        else:
            ws.transport.abort()
    await reader.readline()  # "exit" (or EOF)


# ------------------------------------------------------------------------------ orchestrator


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def receive(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited (code {self.proc.returncode})")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def mint_tokens(deployment: DeploymentWithRedis, n: int) -> list[str]:
    """A session of its own per client, written to Redis as sign-in would, and its token."""
    from tether.server.auth.refresh_tokens import RefreshTokenCodec
    from tether.server.auth.sessions import SessionStore
    from tether.server.auth.signing_keys import KeyRing
    from tether.server.auth.tokens import AccessTokens
    from tether.server.redis.connection import connect
    from tether.server.settings import Settings

    settings = Settings.load({"issuer": BENCH_ISSUER}, environ={})
    ring = KeyRing(path=Path(deployment.env["TETHER_KEYS_FILE"]))
    assert deployment.redis_url is not None
    redis = connect(deployment.redis_url)
    try:
        store = SessionStore(redis, RefreshTokenCodec(ring.current.refresh_secret), settings)
        tokens = AccessTokens(
            ring,
            issuer=settings.effective_issuer,
            audience=settings.audience,
            leeway=settings.clock_leeway,
        )
        out: list[str] = []
        now = time.time()
        for start in range(0, n, 500):
            grants = await asyncio.gather(
                *(store.create(f"storm-user-{i}") for i in range(start, min(n, start + 500)))
            )
            out += [
                tokens.issue(
                    user_id=g.user_id, session_id=g.session_id, now=now, expires_at=int(now) + 7200
                )
                for g in grants
            ]
        return out
    finally:
        await redis.aclose()


async def writer_connection(url: str, token: str) -> tuple[LeanClient, int]:
    """A connection on ``url`` that makes the write; returns it and the counter's value."""
    ws = await lean_connect(url)
    for frame in frames_for(-1, token):
        ws.send(frame)
    while True:
        text, _ = await ws.recv()
        frame = json.loads(text)
        if frame["type"] == "transition":
            return ws, int(frame["updates"][0]["value"])


async def write(ws: LeanClient) -> int:
    ws.send(
        json.dumps(
            {
                "type": "mutate",
                "requestId": 1,
                "name": "counter.increment",
                "args": {"name": COUNTER},
            }
        )
    )
    while True:
        text, _ = await ws.recv()
        frame = json.loads(text)
        if frame["type"] == "mutation_result":
            return int(frame["value"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    deployment = DeploymentWithRedis({"TETHER_ACCESS_TTL": "3600", "TETHER_LOG_LEVEL": "warning"})
    workers: list[Worker] = []
    bares: list[ChildServer] = []
    tmp = deployment.tmp
    result: dict[str, Any] = {}
    try:
        deployment.start_redis()
        servers = [deployment.start_server() for _ in range(3)]
        urls = [s.ws_url for s in servers]
        print(f"3 Tether instances, {args.n:,} sessions to mint ...", flush=True)
        tokens = await mint_tokens(deployment, args.n + 1)
        writer_token = tokens.pop()
        share = -(-args.n // args.procs)
        for p in range(args.procs):
            part = tokens[p * share : (p + 1) * share]
            if not part:
                continue
            path = tmp / f"tokens-{p}.json"
            path.write_text(json.dumps(part))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                "--client",
                args.client,
                "--tokens-file",
                str(path),
                "--urls",
                ",".join(urls),
                "--first-index",
                str(p * share),
                "--concurrency",
                str(args.concurrency),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**26,  # a report is one line with a time per client
                **child_options(),
            )
            workers.append(Worker(proc))
        ready = [await w.receive(args.timeout) for w in workers]
        opened = sum(r["ready"] for r in ready)
        print(f"{opened:,} clients authenticated and subscribed on A", flush=True)
        for r in ready:
            if r["failures"]:
                print(f"  failures, e.g. {r['failures'][0]}", flush=True)
        writer, _ = await writer_connection(urls[1], writer_token)
        await asyncio.sleep(1.0)  # let the opening settle

        survivors = [s.pid for s in servers[1:]]
        assert all(pid is not None for pid in survivors)
        cpu0 = [cpu_seconds(pid) for pid in survivors]
        redis_pid = deployment.redis.pid
        redis0 = cpu_seconds(redis_pid)
        t0 = time.time()
        servers[0].kill()
        target = await write(writer)
        written = time.time() - t0
        for w in workers:
            w.send({"storm": [t0, target, args.storm_timeout]})
        reports = [await w.receive(args.storm_timeout + 30) for w in workers]
        backs = sorted(x for r in reports for x in r["back"])
        missing = sum(r["missing"] for r in reports)
        # CPU up to the last client back (the survivors keep their keepalive work after).
        cpu = sum(cpu_seconds(pid) - c for pid, c in zip(survivors, cpu0, strict=True))
        redis_cpu = cpu_seconds(redis_pid) - redis0
        result["tether"] = (backs, missing, cpu, redis_cpu)
        auths = sorted(x for r in reports for x in r["auth"])
        conns = sorted(x for r in reports for x in r["connected"])
        print(
            f"storm: {len(backs):,} back, {missing} not; last at {backs[-1] if backs else 0:.2f} s;"
            f" the write answered at {written:.3f} s; auth_ok p50 {percentile(auths, 50):.2f} s,"
            f" last {auths[-1] if auths else float('nan'):.2f} s; connected p50"
            f" {percentile(conns, 50):.2f} s, last {conns[-1] if conns else float('nan'):.2f} s",
            flush=True,
        )
        for w in workers:
            await w.receive(60)  # released
        writer.abort()
        deployment.close()

        bares = [ChildServer("bare", script=sync_memory.__file__) for _ in range(args.bare_servers)]
        await asyncio.sleep(0.5)
        bare0 = [cpu_seconds(b.pid) for b in bares]
        t0 = time.time() + 0.5
        for w in workers:
            w.send({"bare": [t0, *(b.ws_url for b in bares), args.storm_timeout]})
        reports = [await w.receive(args.storm_timeout + 30) for w in workers]
        done = sorted(x for r in reports for x in r["bare"])
        bare_cpu = sum(cpu_seconds(b.pid) - c for b, c in zip(bares, bare0, strict=True))
        result["bare"] = (done, sum(r["missing"] for r in reports), bare_cpu, 0.0)
        for w in workers:
            w.send({"exit": True})
        return result
    finally:
        for w in workers:
            await w.stop()
        for b in bares:
            b.stop()
        deployment.close()


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"Reconnect storm: N = {args.n:,} clients ({args.client}) in {args.procs} processes; "
        f"times from t0 (the kill, or the baseline's start) in seconds"
    )
    header = (
        f"| {'run':<52} | {'back':>7} | {'missing':>7} | {'p50 s':>6} | {'p99 s':>6} |"
        f" {'last s':>6} | {'vs bare':>7} | {'server CPU us/conn':>18} | {'redis us/conn':>13} |"
    )
    print_header(header)
    base = result["bare"][0][-1] if result.get("bare") and result["bare"][0] else None
    labels = {
        "bare": f"bare websockets x{args.bare_servers}: {args.n:,} handshakes",
        "tether": "Tether: A killed, back on B + C (auth_ok + fresh result)",
    }
    for kind in ("bare", "tether"):
        if kind not in result:
            continue
        times, missing, cpu, redis_cpu = result[kind]
        last = times[-1] if times else float("nan")
        ratio = f"{last / base:.2f}x" if base else "-"
        per = max(len(times), 1)
        print(
            f"| {labels[kind]:<52} | {len(times):>7} | {missing:>7} | "
            f"{percentile(times, 50):>6.2f} | {percentile(times, 99):>6.2f} | {last:>6.2f} | "
            f"{ratio:>7} | {cpu / per * 1e6:>18.0f} | {redis_cpu / per * 1e6:>13.0f} |"
        )
    if base and result.get("tether") and result["tether"][0]:
        last = result["tether"][0][-1]
        verdict = "met" if last <= 2 * base and not result["tether"][1] else "missed"
        print(f"Target: Tether's storm <= 2x the baseline ({2 * base:.2f} s): {verdict}")
    if result.get("tether") and result["tether"][0]:
        print(f"(median of the storm's back times: {statistics.median(result['tether'][0]):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="clients on instance A [20000]")
    parser.add_argument("--client", choices=("lean", "python"), default="lean")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes [4]")
    parser.add_argument("--concurrency", type=int, default=100, help="opening in flight [100]")
    parser.add_argument("--bare-servers", type=int, default=2, help="baseline servers [2]")
    parser.add_argument("--storm-timeout", type=float, default=120, help="per phase, s [120]")
    parser.add_argument("--timeout", type=float, default=900, help="whole run, s [900]")
    # Internal: a load-generator process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        raise_nofile()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(args))
        return
    if raise_nofile() < 1000:
        parser.error("RLIMIT_NOFILE too low")
    if -(-args.n // args.procs) * 2 + 200 > 20_000:
        parser.error("more than ~9,900 clients per process: raise --procs (fd limit 20,000)")
    print(f"reconnect_storm: N={args.n}, {args.client} clients; {describe_run()}", flush=True)
    print(f"(pid {os.getpid()})", flush=True)
    result = run_bounded(lambda: run(args), args.timeout)
    print_table(result, args)


if __name__ == "__main__":
    main()
