"""Scale: N idle authenticated ``/sync`` sockets over K Tether instances on one machine.

A process may hold at most 20,000 file descriptors here, so the sockets are spread: K Tether
instances (``python -m tether serve``, default 6, at most :data:`MAX_PER_PROCESS` sockets each)
on one ``redis-server`` of this run, and the clients in several load-generator processes (this
script with ``--client``; :class:`~sync_memory.LeanClient` connections, no task per socket, the
garbage collector frozen), each binding its sockets to loopback source addresses of its own
(127.0.0.10 and up: every address has its own ~28,000 ephemeral ports). Every Tether socket sends
``connect`` and ``authenticate`` with a valid access token (a few signed-up users' tokens shared,
``TETHER_ACCESS_TTL=3600``), opened at a controlled rate (``--rate``).

Figures, all from the same run:

* **Memory.** Each instance's ``VmRSS`` after a warm-up and again once its sockets are open and
  idle: KiB per socket, next to a raw ASGI echo on uvicorn sansio (``sync_memory.py``'s
  ``asgi`` row) holding as many sockets as the fullest instance, measured first.
* **``auth_expiring`` lateness** with all N connected: ``--expiry`` sockets spread over every
  instance re-authenticate with short tokens, minted every second by an extra instance that
  holds no socket and issues ``TETHER_ACCESS_TTL=40`` tokens (same keys and issuer), so that
  their notices fall due over ``--spread`` seconds (as ``sync_expiry.py``; lateness = receipt
  time - due time).
* **Revocation across instances** with all N connected: ``--rounds`` rounds of sign-up on
  instance A, a socket on instance B, sign-out on A, ``session_revoked`` on B (as
  ``sync_revocation.py``; latency from the sign-out response).

Client and servers share the machine's cores. Run from the repository root::

    .venv/bin/python bench/scale_sockets.py                          # N = 100,000, 6 instances
    .venv/bin/python bench/scale_sockets.py --instances 1 --n 19000  # one instance on its own
    .venv/bin/python bench/scale_sockets.py --instances 2 --n 6000   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import sync_memory
from common import (
    ChildServer,
    DeploymentWithRedis,
    child_options,
    cpu_seconds,
    describe_run,
    load_average,
    percentile,
    print_header,
    quiet_gc,
    raise_nofile,
    run_bounded,
    sign_up,
)
from sync_expiry import ACCESS_TTL, EXPIRY_NOTICE, jwt_times, notice_for
from sync_memory import Clients, LeanClient, rss_kib, tether_frames, token_stand_ins
from sync_revocation import Samples, tether_round

#: Sockets per process, at most: the hard file-descriptor limit is 20,000 here.
MAX_PER_PROCESS = 19_000
TARGET_MEMORY_RATIO = 1.1
TARGET_P99_MS = 100.0
#: Source addresses per load-generator process (127.0.0.10 + its index * this, ...).
IPS_PER_CLIENT = 4
FIRST_CLIENT_IP = 10


# ------------------------------------------------------------------------------ load generator


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal counts, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class ClientProcess:
    """One load-generator process (this script with ``--client``), driven by JSON lines on its
    stdin; it answers with JSON lines (``{"event": ...}``) on its stdout."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc

    @classmethod
    async def start(cls, index: int) -> ClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            str(index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,
            **child_options(),
        )
        return cls(index, proc)

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send ``command``; print its progress lines; return its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"client process {self.index} exited ({self.proc.returncode})")
            event = json.loads(line)
            if event["event"] == "progress":
                print(f"  [client {self.index}] {event['line'].strip()}", flush=True)
                continue
            if event["event"] == "failed":
                raise RuntimeError(f"client process {self.index}: {event['error']}")
            return event

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.call({"cmd": "exit"})
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class ClientSide:
    """What runs in a ``--client`` process: its connections to each server, by target index."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.targets: list[Clients] = []
        self.inbox: list[tuple[int, str, float]] = []
        self.keepalives: list[asyncio.Task[None]] = []

    def on_message(self, client: LeanClient, text: str, received: float) -> None:
        # Idle sockets get pongs only; keep what the measurements need, unparsed.
        if "auth_" in text or "session_" in text or '"error"' in text:
            self.inbox.append((id(client), text, received))

    def say(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``cmd["targets"]`` (url, n, frames) concurrently, ``cmd["rate"]`` per second."""
        targets = cmd["targets"]
        tokens = cmd["tokens"]
        expect: list[str | None] = [None, None] if cmd["echo"] else ["connected", "auth_ok"]
        opened = []
        live = [t for t in targets if t["n"]]
        for t in live:
            first_ip = FIRST_CLIENT_IP + self.index * IPS_PER_CLIENT
            clients = Clients(
                t["url"], IPS_PER_CLIENT, on_message=self.on_message, first_source_ip=first_ip
            )
            self.targets.append(clients)
            opened.append(clients)
        gc.disable()  # collected and frozen once they are open (quiet_gc's reasoning)
        # From the start: the first sockets must not idle past TETHER_HEARTBEAT_TIMEOUT (75 s)
        # while the last ones open.
        ping = json.dumps({"type": "ping"})
        self.keepalives += [asyncio.create_task(c.keepalive(ping)) for c in opened]
        rate = cmd["rate"] / max(1, len(live))
        label = "asgi" if cmd["echo"] else "tether"
        await asyncio.gather(
            *(
                c.open_many(
                    t["n"],
                    tether_frames(tokens),
                    expect,
                    cmd["concurrency"],
                    f"{label} {t['url'].split(':')[2].split('/')[0]}",
                    rate=rate,
                    progress=lambda line: self.say("progress", line=line),
                )
                for c, t in zip(opened, live, strict=True)
            )
        )
        gc.collect()
        gc.freeze()
        failures = [f for c in opened for f in c.failures]
        by_target = iter(opened)
        return {
            "per_target": [len(next(by_target).conns) if t["n"] else 0 for t in targets],
            "failures": len(failures),
            "first_failure": failures[0] if failures else None,
        }

    async def drop(self) -> dict[str, Any]:
        for task in self.keepalives:
            task.cancel()
        self.keepalives.clear()
        for clients in self.targets:
            await clients.abort_all()
        self.targets.clear()
        gc.unfreeze()
        gc.collect()
        return {}

    def count(self) -> dict[str, Any]:
        """Sockets open now, per url."""
        per_url: dict[str, int] = {}
        for c in self.targets:
            per_url[c.url] = per_url.get(c.url, 0) + c.open_count()
        return {"per_url": per_url}

    async def expiry(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Re-authenticate ``cmd["n"]`` of this process's sockets (spread over its targets) with
        short tokens minted each second on ``cmd["mint_url"]``, their notices due over
        ``cmd["spread"]`` seconds; wait for the notices and return the lateness figures."""
        conns: list[tuple[Clients, int]] = []
        per_target = split(cmd["n"], len(self.targets))
        for clients, k in zip(self.targets, per_target, strict=True):
            conns += [(clients, i) for i, ws in enumerate(clients.conns) if ws.is_open][:k]
        # Interleave the targets, so that every second's batch reaches every instance.
        conns.sort(key=lambda pair: pair[1])
        async with httpx.AsyncClient(base_url=cmd["mint_url"], timeout=30, trust_env=False) as http:
            refresh = []
            for _ in range(2):
                email = f"scale-{uuid.uuid4().hex[:12]}@example.com"
                body = {"email": email, "password": "bench-pw-1"}
                resp = await http.post("/auth/signup", json=body)
                resp.raise_for_status()
                refresh.append(resp.json()["refreshToken"])
            await asyncio.sleep(max(0.0, cmd["start_at"] - time.time()))
            due_of: dict[int, float] = {}
            ticks = max(1, round(cmd["spread"]))
            batch = math.ceil(len(conns) / ticks)
            start = time.monotonic()
            last_due = 0.0
            self.inbox.clear()
            with quiet_gc():
                for tick in range(ticks):
                    part = conns[tick * batch : (tick + 1) * batch]
                    if not part:
                        break
                    await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
                    session = tick % len(refresh)
                    resp = await http.post("/auth/refresh", json={"refreshToken": refresh[session]})
                    resp.raise_for_status()
                    refresh[session] = resp.json()["refreshToken"]
                    token = resp.json()["accessToken"]
                    iat, exp = jwt_times(token)
                    due = exp - notice_for(iat, exp)
                    last_due = max(last_due, due)
                    frame = json.dumps({"type": "authenticate", "token": token, "authVersion": 2})
                    # Spread the batch over 0.8 s in chunks of 20: a burst is another benchmark.
                    chunks = max(1, math.ceil(len(part) / 20))
                    for c in range(chunks):
                        now = time.monotonic()
                        for clients, i in part[c * 20 : (c + 1) * 20]:
                            ws = clients.conns[i]
                            due_of[id(ws)] = due
                            ws.send(frame)
                            clients.last_sent[i] = now
                        await asyncio.sleep(0.8 / chunks)
                while time.time() < last_due + 10 and self._notices() < len(due_of):
                    await asyncio.sleep(1.0)
        lateness, server_part, errors, seen = [], [], [], set()
        for cid, text, received in self.inbox:
            doc = json.loads(text)
            kind = doc.get("type")
            if kind == "auth_expiring" and cid in due_of and cid not in seen:
                seen.add(cid)
                lateness.append(received - due_of[cid])
                server_part.append(doc["serverTime"] / 1000 - due_of[cid])
            elif kind in ("auth_error", "error", "session_revoked"):
                errors.append(text[:200])
        self.inbox.clear()
        return {
            "expected": len(due_of),
            "lateness": lateness,
            "server_part": server_part,
            "errors": errors,
        }

    def _notices(self) -> int:
        return sum(1 for _, text, _ in self.inbox if "auth_expiring" in text)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "open":
                    answer = await self.open(cmd)
                elif cmd["cmd"] == "drop":
                    answer = await self.drop()
                elif cmd["cmd"] == "count":
                    answer = self.count()
                elif cmd["cmd"] == "expiry":
                    answer = await self.expiry(cmd)
                else:  # exit
                    await self.drop()
                    self.say("done")
                    return
            except Exception as exc:
                self.say("failed", error=f"{type(exc).__name__}: {exc}")
                continue
            self.say("done", **answer)


def client_main(index: int) -> None:
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(ClientSide(index).serve())


# ------------------------------------------------------------------------------ the run


@dataclass
class Instance:
    label: str
    pid: int
    sockets: int
    rss_before: int = 0
    rss_after: int = 0
    #: Share of one core the server used while its sockets idled (``--idle`` seconds).
    idle_cpu: float = 0.0

    @property
    def kib_per_socket(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.sockets, 1)


@dataclass
class Results:
    baseline: Instance | None = None
    instances: list[Instance] = field(default_factory=list)
    connected: int = 0
    failures: int = 0
    first_failure: str | None = None
    open_seconds: float = 0.0
    open_at_end: int = 0
    expiry_expected: int = 0
    lateness: list[float] = field(default_factory=list)
    server_part: list[float] = field(default_factory=list)
    expiry_errors: list[str] = field(default_factory=list)
    revocation: Samples | None = None
    redis_rss: int = 0
    client_rss: int = 0
    load: str = ""


async def warm_and_read(url: str, pid: int, frames: Any, expect: list[str | None]) -> int:
    """50 connections opened and dropped (one-time costs are not per socket), then VmRSS."""
    warm = Clients(url)
    await warm.open_many(50, frames, expect, 10, "warm-up")
    await warm.abort_all()
    if warm.failures:
        raise RuntimeError(f"warm-up failed on {url}: {warm.failures[0]}")
    await asyncio.sleep(1.0)
    return rss_kib(pid)


async def open_everywhere(
    clients: list[ClientProcess],
    urls: list[str],
    counts: list[int],
    args: argparse.Namespace,
    tokens: list[str],
    *,
    echo: bool,
) -> tuple[list[int], int, str | None, float]:
    """Open ``counts[k]`` sockets to ``urls[k]``, each spread over every client process; return
    how many are open per url, how many failed (and the first failure) and the seconds taken."""
    shares = [split(n, len(clients)) for n in counts]
    started = time.monotonic()
    answers = await asyncio.gather(
        *(
            c.call(
                {
                    "cmd": "open",
                    "targets": [
                        {"url": url, "n": shares[k][c.index]} for k, url in enumerate(urls)
                    ],
                    "tokens": tokens,
                    "echo": echo,
                    "rate": args.rate / len(clients),
                    "concurrency": args.concurrency,
                }
            )
            for c in clients
        )
    )
    seconds = time.monotonic() - started
    failures = sum(a["failures"] for a in answers)
    first = next((a["first_failure"] for a in answers if a["first_failure"]), None)
    opened = [sum(a["per_target"][k] for a in answers) for k in range(len(urls))]
    return opened, failures, first, seconds


async def open_now(clients: list[ClientProcess], urls: list[str]) -> list[int]:
    """How many sockets to each of ``urls`` are open now, over every client process."""
    answers = await asyncio.gather(*(c.call({"cmd": "count"}) for c in clients))
    return [sum(a["per_url"].get(url, 0) for a in answers) for url in urls]


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    per_instance = split(args.n, args.instances)
    clients: list[ClientProcess] = []
    baseline: ChildServer | None = None
    deployment = DeploymentWithRedis(
        {
            "TETHER_ACCESS_TTL": "3600",
            "TETHER_EXPIRY_NOTICE": str(EXPIRY_NOTICE),
            "TETHER_LOG_LEVEL": "warning",
            "TETHER_SIGNUP_LIMIT_ADDRESS": "100000/60",
        }
    )
    try:
        clients = [await ClientProcess.start(i) for i in range(args.clients)]
        stand_ins = token_stand_ins(args.users)
        # 1. The raw-ASGI floor, as many sockets as the fullest instance gets; then dropped.
        if args.baseline:
            baseline = ChildServer("asgi", script=sync_memory.__file__)
            frames = tether_frames(stand_ins)
            row = Instance("raw ASGI echo, uvicorn sansio", baseline.pid, per_instance[0])
            row.rss_before = await warm_and_read(baseline.ws_url, baseline.pid, frames, [None] * 2)
            print(f"raw ASGI: opening {per_instance[0]}", flush=True)
            opened, failed, first, _ = await open_everywhere(
                clients, [baseline.ws_url], [per_instance[0]], args, stand_ins, echo=True
            )
            cpu = cpu_seconds(baseline.pid)
            await asyncio.sleep(args.idle)
            row.idle_cpu = (cpu_seconds(baseline.pid) - cpu) / args.idle
            row.rss_after = rss_kib(baseline.pid)
            row.sockets = (await open_now(clients, [baseline.ws_url]))[0]
            if failed:
                print(f"  raw ASGI: {failed} failed, e.g. {first}", flush=True)
            results.baseline = row
            print(f"  -> {row.kib_per_socket:.1f} KiB/socket", flush=True)
            await asyncio.gather(*(c.call({"cmd": "drop"}) for c in clients))
            baseline.stop()
            baseline = None

        # 2. Tether: K instances and the minting instance (no sockets), on one redis-server.
        deployment.start_redis()
        servers = [deployment.start_server() for _ in range(args.instances)]
        mint = deployment.start_server({"TETHER_ACCESS_TTL": str(ACCESS_TTL)})
        tokens = await sign_up(servers[0].base_url, args.users)
        frames = tether_frames(tokens)
        for k, server in enumerate(servers):
            assert server.pid is not None
            row = Instance(f"Tether instance {k + 1}", server.pid, per_instance[k])
            row.rss_before = await warm_and_read(
                server.ws_url, server.pid, frames, ["connected", "auth_ok"]
            )
            results.instances.append(row)
        print(f"Tether: opening {args.n} over {args.instances} instance(s)", flush=True)
        opened, failed, first, seconds = await open_everywhere(
            clients, [s.ws_url for s in servers], per_instance, args, tokens, echo=False
        )
        results.connected, results.failures, results.first_failure = sum(opened), failed, first
        results.open_seconds = seconds
        print(f"  {sum(opened)} open in {seconds:.0f} s ({failed} failed); idle {args.idle:.0f} s")
        cpu = [cpu_seconds(row.pid) for row in results.instances]
        await asyncio.sleep(args.idle)
        for row, before in zip(results.instances, cpu, strict=True):
            row.idle_cpu = (cpu_seconds(row.pid) - before) / args.idle
            row.rss_after = rss_kib(row.pid)
        # Per socket open at the time of the reading (a failed or closed one is not counted).
        held = await open_now(clients, [s.ws_url for s in servers])
        for row, server, n_open in zip(results.instances, servers, held, strict=True):
            row.sockets = n_open
            if server.returncode is not None:
                raise RuntimeError(f"{row.label} died")
        results.redis_rss = rss_kib(deployment.redis.pid) if deployment.redis.pid else 0
        results.client_rss = sum(rss_kib(c.proc.pid) for c in clients if c.proc.returncode is None)
        results.load = load_average()

        # 3. With all of them connected: expiry notices, then revocations.
        if args.expiry:
            start_at = time.time() + 3.0
            print(f"auth_expiring: {args.expiry} sockets over {args.spread:.0f} s", flush=True)
            answers = await asyncio.gather(
                *(
                    c.call(
                        {
                            "cmd": "expiry",
                            "n": share,
                            "mint_url": mint.base_url,
                            "spread": args.spread,
                            "start_at": start_at,
                        }
                    )
                    for c, share in zip(clients, split(args.expiry, len(clients)), strict=True)
                )
            )
            for a in answers:
                results.expiry_expected += a["expected"]
                results.lateness += a["lateness"]
                results.server_part += a["server_part"]
                results.expiry_errors += a["errors"]
        if args.rounds:
            a_server = servers[0]
            b_servers = servers[1:] or servers
            label = "sign-out on A -> session_revoked on B"
            if len(servers) == 1:
                label = "sign-out -> session_revoked, same instance"
            samples = Samples(label)
            print(f"revocation: {args.rounds} rounds", flush=True)
            async with httpx.AsyncClient(
                base_url=a_server.base_url, timeout=30, trust_env=False
            ) as http_a:
                with quiet_gc():
                    for i in range(args.rounds):
                        b = b_servers[i % len(b_servers)]
                        try:
                            await tether_round(i, http_a, b.ws_url, samples, 10.0)
                        except Exception as exc:
                            samples.failures.append(f"{type(exc).__name__}: {exc}")
            results.revocation = samples
        results.open_at_end = sum(await open_now(clients, [s.ws_url for s in servers]))
        failed_rounds = results.revocation is not None and results.revocation.failures
        if results.expiry_errors or failed_rounds:
            # Their cause is in the servers' logs, which close() removes.
            print(deployment.log_tails(), file=sys.stderr)
        return results
    except BaseException:
        print(deployment.log_tails(), file=sys.stderr)
        raise
    finally:
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        if baseline is not None:
            baseline.stop()
        deployment.close()


# ------------------------------------------------------------------------------ table


def print_table(r: Results, args: argparse.Namespace) -> None:
    print()
    print(
        f"Scale: {args.n:,} idle authenticated sockets over {args.instances} instance(s), "
        f"{args.clients} client processes, load {r.load}"
    )
    header = f"| {'server':<32} | {'sockets':>7} | {'RSS before':>10} | {'RSS after':>10} |"
    header += f" {'KiB/socket':>10} | {'vs raw ASGI':>11} | {'idle CPU':>8} |"
    print_header(header)
    base = r.baseline
    rows = ([base] if base else []) + r.instances
    for row in rows:
        ratio = f"{row.kib_per_socket / base.kib_per_socket:.2f}x" if base else "-"
        print(
            f"| {row.label:<32} | {row.sockets:>7} | {row.rss_before / 1024:>6.1f} MiB |"
            f" {row.rss_after / 1024:>6.1f} MiB | {row.kib_per_socket:>10.1f} | {ratio:>11} |"
            f" {row.idle_cpu:>7.0%} |"
        )
    total = sum(row.rss_after for row in r.instances)
    print(
        f"Tether total RSS {total / 1024:.0f} MiB for {r.connected:,} sockets; redis-server "
        f"{r.redis_rss / 1024:.0f} MiB; load generators {r.client_rss / 1024:.0f} MiB; opened "
        f"in {r.open_seconds:.0f} s ({r.connected / max(r.open_seconds, 1e-9):.0f}/s); "
        f"{r.open_at_end:,} open at the end"
    )
    if base and r.instances:
        worst = max(row.kib_per_socket for row in r.instances) / base.kib_per_socket
        verdict = "met" if worst <= TARGET_MEMORY_RATIO else "MISSED"
        print(f"Target: memory <= {TARGET_MEMORY_RATIO:.1f}x raw ASGI -> {worst:.2f}x, {verdict}")
    if r.failures:
        print(f"note: {r.failures} sockets failed to open, e.g. {r.first_failure}")
    if r.open_at_end < r.connected:
        print(f"note: {r.connected - r.open_at_end} sockets closed during the run")
    print()
    header = f"| {'with all sockets connected':<44} | {'n':>13} | {'p50 ms':>7} |"
    header += f" {'p99 ms':>7} | {'max ms':>7} |"
    print_header(header)
    if args.expiry and not r.lateness:
        print(f"| {'auth_expiring lateness':<44} | {f'0/{r.expiry_expected}':>13} | none |")
    if args.expiry:
        lat = [x * 1e3 for x in r.lateness]
        srv = [x * 1e3 for x in r.server_part]
        n = f"{len(lat)}/{r.expiry_expected}"
        for label, values in (("auth_expiring lateness", lat), ("  server part (timer)", srv)):
            if values:
                print(
                    f"| {label:<44} | {n:>13} | {percentile(values, 50):>7.1f} |"
                    f" {percentile(values, 99):>7.1f} | {max(values):>7.1f} |"
                )
    s = r.revocation
    if s is not None and s.from_reply:
        reply = [x * 1e3 for x in s.from_reply]
        print(
            f"| {s.label:<44} | {f'{len(reply)}/{args.rounds}':>13} |"
            f" {percentile(reply, 50):>7.1f} | {percentile(reply, 99):>7.1f} |"
            f" {max(reply):>7.1f} |"
        )
    if r.lateness:
        p99 = percentile(r.lateness, 99) * 1e3
        verdict = (
            "met" if p99 <= TARGET_P99_MS and len(r.lateness) == r.expiry_expected else "MISSED"
        )
        print(f"Target: auth_expiring p99 <= {TARGET_P99_MS:.0f} ms -> {p99:.1f} ms, {verdict}")
    if s is not None and s.from_reply:
        p99 = percentile(s.from_reply, 99) * 1e3
        verdict = "met" if p99 <= TARGET_P99_MS and not s.failures else "MISSED"
        print(f"Target: revocation p99 <= {TARGET_P99_MS:.0f} ms -> {p99:.1f} ms, {verdict}")
    if s is not None and s.failures:
        print(f"note: {len(s.failures)} revocation rounds failed, e.g. {s.failures[0]}")
    if r.expiry_errors:
        print(f"note: {len(r.expiry_errors)} unexpected frames, e.g. {r.expiry_errors[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="sockets in all [100000]")
    parser.add_argument("--instances", type=int, default=6, help="Tether instances [6]")
    parser.add_argument(
        "--clients", type=int, help="load-generator processes [N / 15,000 rounded up, >= 2]"
    )
    parser.add_argument("--rate", type=float, default=800, help="sockets opened per s [800]")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="handshakes in flight per client process and instance [16]",
    )
    parser.add_argument("--users", type=int, default=8, help="users whose tokens are shared [8]")
    parser.add_argument("--idle", type=float, default=5.0, help="idle s before reading RSS [5]")
    parser.add_argument(
        "--expiry", type=int, default=3000, help="sockets re-authenticated with short tokens [3000]"
    )
    parser.add_argument("--spread", type=float, default=10, help="their notices due over s [10]")
    parser.add_argument("--rounds", type=int, default=100, help="revocation rounds [100]")
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the raw ASGI row"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many s")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client_main(args.client)
        return
    per_instance = math.ceil(args.n / args.instances)
    if per_instance > MAX_PER_PROCESS:
        parser.error(f"{per_instance} sockets per instance: at most {MAX_PER_PROCESS}")
    if args.clients is None:
        args.clients = max(2, math.ceil(args.n / 15_000))
    if math.ceil(args.n / args.clients) > MAX_PER_PROCESS:
        parser.error(f"at most {MAX_PER_PROCESS} sockets per client process: raise --clients")
    if FIRST_CLIENT_IP + args.clients * IPS_PER_CLIENT > 255:
        parser.error("too many client processes for 127.0.0.x source addresses")
    raise_nofile()
    print(
        f"scale_sockets: N={args.n}, {args.instances} instance(s), {args.clients} client "
        f"processes; {describe_run()}; load {load_average()}",
        flush=True,
    )
    started = time.monotonic()
    results = run_bounded(lambda: run(args), args.timeout)
    print_table(results, args)
    print(f"(run took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
