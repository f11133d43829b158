"""Connect + authenticate rate of one Tether process, beside a bare ``websockets`` server.

The load generator (this process) opens ``--n`` connections (default 2,000), ``--concurrency``
(default 100) in flight at a time, and keeps them open until the end. For Tether each connection
is the WebSocket handshake, ``connect`` -> ``connected`` and ``authenticate`` (a valid access
token) -> ``auth_ok``; the baselines get the same handshake and the same two frames, echoed.
Rows, measured in the same run, each server in a process of its own:

* ``bare``   -- ``websockets`` 17 asyncio server, compression off: the baseline (1.00x).
* ``asgi``   -- a raw ASGI echo callable on uvicorn with Tether's uvicorn settings.
* ``starlette`` -- (optional) the same callable behind Starlette's router, as Tether mounts it.
* ``tether-anon`` -- (optional) Tether with ``connect`` + ``ping``: the cost of all but auth.
* ``tether`` -- ``python -m tether serve`` (its own ``redis-server``), ES256 access tokens.
* ``tether-rs256`` -- the same with ``TETHER_SIGNING_ALGORITHM=RS256``: RS256 access tokens.

Besides connections/s (wall clock, which the load generator can limit on a 2-CPU machine), it
prints the CPU time the server process spent per connection (``/proc/PID/stat``), which does not
depend on the client: ``1 / (CPU per connection)`` is what one server process could accept with
a core to itself. Run from the repository root::

    .venv/bin/python bench/sync_connect.py
    .venv/bin/python bench/sync_connect.py --n 5000 --concurrency 200 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync_memory
from common import (
    ChildServer,
    DeploymentWithRedis,
    comma_list,
    cpu_seconds,
    describe_run,
    percentile,
    print_header,
    raise_nofile,
    run_bounded,
    sign_up,
)
from sync_memory import Clients, tether_frames, token_stand_ins

KINDS = ("bare", "asgi", "starlette", "tether-anon", "tether", "tether-rs256")
DEFAULT_KINDS = KINDS
LABELS = {
    "bare": "bare websockets 17: handshake + 2 echoes",
    "asgi": "raw ASGI echo, uvicorn sansio: same",
    "starlette": "same, behind Starlette's router",
    "tether-anon": "Tether: handshake + connect + ping",
    "tether": "Tether: handshake + connect + authenticate",
    "tether-rs256": "Tether, RS256 tokens: same",
}
#: Settings of each Tether row beyond the common ones.
TETHER_ENV = {"tether-rs256": {"TETHER_SIGNING_ALGORITHM": "RS256"}}


@dataclass
class Row:
    kind: str
    opened: int
    failed: int
    seconds: float
    server_cpu: float
    redis_cpu: float
    client_cpu: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.opened / self.seconds

    @property
    def server_us(self) -> float:
        return self.server_cpu / max(self.opened, 1) * 1e6


def token_alg(token: str) -> str:
    """The ``alg`` of a JWS's header: the row measures the algorithm it says it does."""
    segment = token.split(".")[0]
    alg: str = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))["alg"]
    return alg


async def measure(kind: str, args: argparse.Namespace) -> Row:
    deployment: DeploymentWithRedis | None = None
    child: ChildServer | None = None
    clients: Clients | None = None
    try:
        redis_pid: int | None = None
        if kind.startswith("tether"):
            deployment = DeploymentWithRedis(
                {
                    "TETHER_ACCESS_TTL": "3600",
                    "TETHER_LOG_LEVEL": "warning",
                    **TETHER_ENV.get(kind, {}),
                }
            )
            deployment.start_redis()
            redis_pid = deployment.redis.pid
            server = deployment.start_server()
            assert server.pid is not None
            pid, url = server.pid, server.ws_url
            tokens = await sign_up(server.base_url, args.users)
            alg = token_alg(tokens[0])
            wanted = TETHER_ENV.get(kind, {}).get("TETHER_SIGNING_ALGORITHM", "ES256")
            if alg != wanted:
                raise RuntimeError(f"{kind}: the server signs with {alg}, not {wanted}")
            frames_for = tether_frames(tokens, ping=kind == "tether-anon")
            expect: list[str | None] = ["connected", "pong" if kind == "tether-anon" else "auth_ok"]
        else:
            # The baseline servers are those of sync_memory.py.
            child = ChildServer(kind, script=sync_memory.__file__)
            pid, url = child.pid, child.ws_url
            frames_for = tether_frames(token_stand_ins(args.users))
            expect = [None, None]
        warm = Clients(url, 1)
        await warm.open_many(args.warmup, frames_for, expect, args.concurrency, "warm-up")
        await warm.abort_all()
        if warm.failures:
            raise RuntimeError(f"{kind}: warm-up failed: {warm.failures[0]}")
        await asyncio.sleep(0.5)

        clients = Clients(url, args.source_ips)
        cpu0, redis0, client0 = cpu_seconds(pid), 0.0, time.process_time()
        if redis_pid is not None:
            redis0 = cpu_seconds(redis_pid)
        seconds = await clients.open_many(args.n, frames_for, expect, args.concurrency, kind)
        server_cpu = cpu_seconds(pid) - cpu0
        redis_cpu = cpu_seconds(redis_pid) - redis0 if redis_pid is not None else 0.0
        client_cpu = time.process_time() - client0
        if clients.failures:
            print(f"  {len(clients.failures)} failed, e.g. {clients.failures[0]}", flush=True)
        row = Row(
            kind,
            len(clients.conns),
            len(clients.failures),
            seconds,
            server_cpu,
            redis_cpu,
            client_cpu,
            clients.latencies,
        )
        print(
            f"  {kind}: {row.rate:.0f} connections/s, server CPU {row.server_us:.0f} us/conn, "
            f"client CPU {client_cpu / seconds * 100:.0f}% of the wall time",
            flush=True,
        )
        return row
    finally:
        if clients is not None:
            await clients.abort_all()
        if child is not None:
            child.stop()
        if deployment is not None:
            deployment.close()


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(
        f"Connect rate: {args.n:,} connections, {args.concurrency} in flight, kept open; "
        f"median of {args.repeat} run(s) per row"
    )
    header = (
        f"| {'server':<44} | {'conn/s':>7} | {'vs bare':>7} | {'p50 ms':>7} | {'p99 ms':>7} |"
        f" {'server CPU us/conn':>18} | {'vs bare':>7} | {'redis us/conn':>13} |"
        f" {'client CPU':>10} |"
    )
    print_header(header)
    by_kind: dict[str, list[Row]] = {}
    for row in rows:
        by_kind.setdefault(row.kind, []).append(row)
    summary: dict[str, tuple[float, float]] = {}
    for kind, runs in by_kind.items():
        rate = statistics.median(r.rate for r in runs)
        cpu = statistics.median(r.server_us for r in runs)
        summary[kind] = (rate, cpu)
    base = summary.get("bare")
    for kind, runs in by_kind.items():
        rate, cpu = summary[kind]
        lat = [x for r in runs for x in r.latencies]
        redis_us = statistics.median(r.redis_cpu / max(r.opened, 1) * 1e6 for r in runs)
        client = statistics.median(r.client_cpu / r.seconds * 100 for r in runs)
        rate_ratio = f"{rate / base[0]:.2f}x" if base else "-"
        cpu_ratio = f"{cpu / base[1]:.2f}x" if base else "-"
        print(
            f"| {LABELS[kind]:<44} | {rate:>7.0f} | {rate_ratio:>7} | "
            f"{percentile(lat, 50) * 1e3:>7.1f} | {percentile(lat, 99) * 1e3:>7.1f} | "
            f"{cpu:>18.0f} | {cpu_ratio:>7} | {redis_us:>13.0f} | {client:>9.0f}% |"
        )
    for kind, alg in (("tether", "ES256"), ("tether-rs256", "RS256")):
        if kind in summary:
            _, cpu = summary[kind]
            print(
                f"Tether ({alg}) server CPU per connect + authenticate: {cpu:.0f} us -> at most "
                f"{1e6 / cpu:,.0f} connections/s per server process with a core to itself"
            )
    failed = sum(r.failed for r in rows)
    if failed:
        print(f"note: {failed} connections failed in total")


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    for i in range(args.repeat):
        for kind in args.servers:
            print(f"run {i + 1}/{args.repeat}: {LABELS[kind]}", flush=True)
            rows.append(await measure(kind, args))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="connections per run [2000]")
    parser.add_argument("--concurrency", type=int, default=100, help="in flight [100]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; median [3]")
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_KINDS),
        help=f"comma-separated rows among {','.join(KINDS)} [{','.join(DEFAULT_KINDS)}]",
    )
    parser.add_argument("--users", type=int, default=8, help="users whose tokens are shared [8]")
    parser.add_argument("--warmup", type=int, default=50, help="connections before timing [50]")
    parser.add_argument("--source-ips", type=int, default=1, help="127.0.0.1..K as sources [1]")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    args = parser.parse_args()
    args.servers = comma_list(args.servers)
    if set(args.servers) - set(KINDS):
        parser.error(f"--servers: choose among {', '.join(KINDS)}")
    if raise_nofile() < args.n + 100:
        parser.error("RLIMIT_NOFILE too low for --n")
    print(
        f"sync_connect: N={args.n}, {args.concurrency} in flight, {args.repeat} run(s); "
        f"{describe_run()}",
        flush=True,
    )

    rows = run_bounded(lambda: run(args), args.timeout)
    print_table(rows, args)


if __name__ == "__main__":
    main()
