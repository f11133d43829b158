"""Mutation throughput in commits per second, beside the Redis ceiling for a scripted write.

Two Tether instances (``python -m tether serve``) share one ``redis-server``; C clients, spread
evenly over both, each run ``counter.increment`` in a closed loop (one mutation in flight per
client, the next sent when ``mutation_result`` arrives). Rows, measured in the same run, for
each C:

* ``tether hot``   -- every client increments the same counter (``{"name": "hot-C"}``): each
  commit invalidates what every concurrent attempt read, so commits conflict and are re-run
  (``TETHER_MUTATION_RETRIES``, jittered backoff) or fail with ``conflict``.
* ``tether indep`` -- client i increments its own counter ``ind-C-i``: no conflicts, the
  throughput of the commit path itself.
* ``redis hot`` / ``redis indep`` -- the ceiling: ``EVALSHA`` of a one-key Lua script
  (``return redis.call('INCR', KEYS[1])``) from redis-py asyncio, C tasks with one call in flight
  each, split over two processes as the two instances are; one key, or one key per task.

Counters are created before the measurement, so every measured commit is a read-then-patch.
"commits/s" is the growth of Tether's global version over the measured window: every
committed mutation adds one, also in a hot key's batch (``TETHER_MUTATION_BATCH``: an instance
commits the mutations queued on a hot key with one script call, each at a version of its own),
so it counts committed mutations. "acks/s" is the ``mutation_result`` frames received in the
window. "conflicts" is the share of answers that were the ``conflict`` error;
"attempts/commit" the commit attempts per committed mutation (from Redis ``INFO
commandstats``: an attempt, of one mutation or of a batch, is one ``read.lua`` and one
``commit.lua`` call, so attempts = ``EVALSHA`` calls / 2; the indep row, which cannot
conflict, checks that at 1.00; below 1, batches committed several mutations per attempt).
Latency is ``mutate`` to ``mutation_result`` as the client sees it.

Tether runs with ``TETHER_MESSAGE_RATE=1000000/1`` (the default 200 messages per 10 s and
connection would cap a closed-loop client at 20 mutations/s). Run from the repository root::

    .venv/bin/python bench/mutations.py                       # C = 1, 16, 64; 5 s a row
    .venv/bin/python bench/mutations.py --clients 32 --seconds 10 --rows tether-hot,redis-hot
    .venv/bin/python bench/mutations.py --clients 16,64 --rows tether-hot --mutation-batch 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio
from common import (
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
)
from fanout import Conn, frame_type, open_conn

# Importing common (above) put the repository root on sys.path.
from tether.server.redis import keys as redis_keys

#: Issue 14's targets (see print_table).
TARGET_HOT = 2000
TARGET_INDEP = 0.5

ROWS = ("tether-hot", "tether-indep", "redis-hot", "redis-indep")
LABELS = {
    "tether-hot": "Tether, one hot key",
    "tether-indep": "Tether, independent keys",
    "redis-hot": "EVALSHA INCR, one key (ceiling)",
    "redis-indep": "EVALSHA INCR, key per task (ceiling)",
}
TETHER_ENV = {
    "TETHER_LOG_LEVEL": "warning",
    "TETHER_MESSAGE_RATE": "1000000/1",
    "TETHER_HEARTBEAT_TIMEOUT": "3600",
}
INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"


@dataclass
class Row:
    kind: str
    clients: int
    seconds: float
    commits: int  # successful commits (Tether: version growth; Redis: script calls)
    acks: int = 0  # answers received in the window
    conflicts: int = 0  # answers that were the conflict error
    other_errors: int = 0
    evalsha: int = 0  # EVALSHA calls Redis served in the window
    #: CPU seconds in the window: Tether's two servers, or the two redis-py worker processes
    client_cpu: float = 0.0
    redis_cpu: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan

    @property
    def rate(self) -> float:
        return self.commits / self.seconds

    def cpu_us(self, seconds: float) -> float:
        """CPU microseconds per commit."""
        return seconds * 1e6 / self.commits if self.commits else math.nan

    @property
    def attempts_per_commit(self) -> float:
        return (self.evalsha / 2) / self.commits if self.commits else math.nan


@dataclass
class Snapshot:
    at: float
    version: int  # Tether's global version
    evalsha: int  # EVALSHA calls Redis has served
    server_cpu: float  # CPU seconds of the Tether servers
    redis_cpu: float


async def snapshot(
    r: redis.asyncio.Redis, pids: list[int | None], redis_pid: int | None
) -> Snapshot:
    stats = await r.info("commandstats")
    return Snapshot(
        at=now(),
        version=int(await r.get(redis_keys.DATA_VERSION) or 0),
        evalsha=int(stats.get("cmdstat_evalsha", {}).get("calls", 0)),
        server_cpu=sum(cpu_seconds(pid, missing_ok=True) for pid in pids),
        redis_cpu=cpu_seconds(redis_pid, missing_ok=True),
    )


# ------------------------------------------------------------------------------ Tether rows


def mutate_frame(request_id: int, name: str) -> str:
    return json.dumps(
        {
            "type": "mutate",
            "requestId": request_id,
            "name": "counter.increment",
            "args": {"name": name},
        }
    )


async def increment(conn: Conn, request_id: int, name: str) -> tuple[float, dict[str, Any]]:
    """One ``counter.increment``; ``(receipt time, mutation_result)``."""
    conn.send(mutate_frame(request_id, name))
    t, text = await conn.recv_until(lambda t: frame_type(t) == "mutation_result")
    conn.inbox.clear()  # anything before it (a client with no subscription gets no transition)
    return t, json.loads(text)


async def measure_tether(
    kind: str,
    clients: int,
    urls: list[str],
    pids: list[int | None],
    r: redis.asyncio.Redis,
    args: argparse.Namespace,
) -> Row:
    hot = kind == "tether-hot"
    names = [f"hot-{clients}" if hot else f"ind-{clients}-{i}" for i in range(clients)]
    conns: list[Conn] = []
    tasks: list[asyncio.Task[None]] = []
    # (completion time, latency, error code or None) per answered mutation
    done: list[tuple[float, float, str | None]] = []
    stop = asyncio.Event()
    try:
        for i in range(clients):
            conn = await open_conn(urls[i % len(urls)])
            conns.append(conn)
            conn.send(
                json.dumps(
                    {
                        "type": "connect",
                        "clientId": f"{kind}-{clients}-{i}-{uuid.uuid4().hex[:8]}",
                        "protocol": 1,
                    }
                )
            )
            _, text = await conn.recv()
            if frame_type(text) != "connected":
                raise RuntimeError(f"expected connected, got {text[:200]}")
        # Create every counter first: the measured commits are all read-then-patch.
        for j, name in enumerate(sorted(set(names))):
            _, result = await increment(conns[0], 10**9 + j, name)
            if "error" in result:
                raise RuntimeError(f"creating counter {name}: {result}")

        async def loop(conn: Conn, name: str) -> None:
            request_id = 0
            while not stop.is_set():
                request_id += 1
                t0 = now()
                t1, result = await increment(conn, request_id, name)
                error = result.get("error")
                done.append((t1, t1 - t0, error["code"] if error else None))

        tasks = [asyncio.create_task(loop(c, n)) for c, n in zip(conns, names, strict=True)]
        await asyncio.sleep(args.warmup)
        start = await snapshot(r, pids, args.redis_pid)
        await asyncio.sleep(args.seconds)
        end = await snapshot(r, pids, args.redis_pid)
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        window = [d for d in done if start.at <= d[0] < end.at]
        latencies = [d[1] for d in window if d[2] is None]
        return Row(
            kind,
            clients,
            end.at - start.at,
            commits=end.version - start.version,
            acks=len(window),
            conflicts=sum(1 for d in window if d[2] == "conflict"),
            other_errors=sum(1 for d in window if d[2] not in (None, "conflict")),
            evalsha=end.evalsha - start.evalsha,
            client_cpu=end.server_cpu - start.server_cpu,
            redis_cpu=end.redis_cpu - start.redis_cpu,
            p50_ms=percentile(latencies, 50, nearest_rank=True) * 1000,
            p99_ms=percentile(latencies, 99, nearest_rank=True) * 1000,
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for conn in conns:
            conn.abort()


# ------------------------------------------------------------------------------ Redis rows


async def evalsha_worker(args: argparse.Namespace) -> None:
    """One baseline process: ``--tasks`` loops of EVALSHA, counted over the window."""
    r = redis.asyncio.Redis.from_url(args.redis_url, decode_responses=True)
    script = r.register_script(INCR_SCRIPT)
    stop = False
    count = 0
    latencies: list[float] = []
    window = (0.0, 0.0)
    cpu = 0.0
    counting = False

    async def loop(key: str) -> None:
        nonlocal count
        await script(keys=[key])  # loads the script, opens this task's connection
        while not stop:
            t0 = now()
            await script(keys=[key])
            if counting:
                count += 1
                latencies.append(now() - t0)

    try:
        keys = [
            f"bench:{{mut}}:{args.key_prefix}" + ("" if args.hot else f":{i}")
            for i in range(args.tasks)
        ]
        tasks = [asyncio.create_task(loop(k)) for k in keys]
        await asyncio.sleep(args.warmup)
        counting = True
        start, cpu0 = now(), time.process_time()
        await asyncio.sleep(args.seconds)
        counting = False
        window, cpu = (start, now()), time.process_time() - cpu0
        stop = True
        await asyncio.gather(*tasks)
    finally:
        await r.aclose()
    print(
        json.dumps(
            {
                "count": count,
                "seconds": window[1] - window[0],
                "cpu": cpu,
                "latencies": latencies,
            }
        ),
        flush=True,
    )


async def measure_redis(kind: str, clients: int, args: argparse.Namespace) -> Row:
    hot = kind == "redis-hot"
    procs: list[asyncio.subprocess.Process] = []
    shares = [clients // 2 + clients % 2, clients // 2]
    try:
        for i, share in enumerate(s for s in shares if s):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--evalsha-worker",
                    "--redis-url",
                    args.redis_url,
                    "--tasks",
                    str(share),
                    "--key-prefix",
                    f"{kind}-{clients}" + ("" if hot else f"-p{i}"),
                    *(["--hot"] if hot else []),
                    "--seconds",
                    str(args.seconds),
                    "--warmup",
                    str(args.warmup),
                    stdout=asyncio.subprocess.PIPE,
                    limit=2**26,
                    **child_options(),
                )
            )
        outs = []
        redis_cpu0 = cpu_seconds(args.redis_pid, missing_ok=True)
        async with asyncio.timeout(args.seconds + args.warmup + 30):
            for proc in procs:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"EVALSHA worker exited with {await proc.wait()}")
                outs.append(json.loads(line))
        # (Redis CPU over the workers' whole life, warm-up included, scaled to the window.)
        redis_cpu = (
            (cpu_seconds(args.redis_pid, missing_ok=True) - redis_cpu0)
            * args.seconds
            / (args.seconds + args.warmup)
        )
        count = sum(o["count"] for o in outs)
        seconds = max(o["seconds"] for o in outs)
        latencies = [x for o in outs for x in o["latencies"]]
        return Row(
            kind,
            clients,
            seconds,
            commits=count,
            acks=count,
            evalsha=2 * count,
            client_cpu=sum(o["cpu"] for o in outs),
            redis_cpu=redis_cpu,
            p50_ms=percentile(latencies, 50, nearest_rank=True) * 1000,
            p99_ms=percentile(latencies, 99, nearest_rank=True) * 1000,
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()


# ------------------------------------------------------------------------------ main


def print_table(rows: list[Row]) -> None:
    print()
    print("Mutation throughput (closed loop, one mutation in flight per client; two instances)")
    header = (
        f"| {'C':>3} | {'row':<36} | {'commits/s':>9} | {'acks/s':>7} | {'conflicts':>9} | "
        f"{'attempts/commit':>15} | {'p50 ms':>7} | {'p99 ms':>7} | {'vs ceiling':>10} | "
        f"{'CPU us/commit':>13} | {'redis us/commit':>15} |"
    )
    print_header(header)
    for row in rows:
        ceiling_kind = "redis-hot" if row.kind.endswith("hot") else "redis-indep"
        ceiling = next(
            (r for r in rows if r.kind == ceiling_kind and r.clients == row.clients), None
        )
        vs = f"{row.rate / ceiling.rate:.3f}x" if ceiling else "-"
        tether = row.kind.startswith("tether")
        conflicts = f"{row.conflicts / row.acks:.1%}" if tether and row.acks else "-"
        attempts = f"{row.attempts_per_commit:.2f}" if tether else "-"
        acks = row.acks / row.seconds
        print(
            f"| {row.clients:>3} | {LABELS[row.kind]:<36} | {row.rate:>9,.0f} | {acks:>7,.0f} | "
            f"{conflicts:>9} | {attempts:>15} | {row.p50_ms:>7.2f} | {row.p99_ms:>7.2f} | "
            f"{vs:>10} | {row.cpu_us(row.client_cpu):>13.0f} | {row.cpu_us(row.redis_cpu):>15.1f} |"
        )
    # Issue 14: one hot key >= 2,000 commits/s over two instances; independent keys >= 50 % of
    # the EVALSHA ceiling at the same concurrency.
    for row in rows:
        if row.kind == "tether-hot":
            ok = "met" if row.rate >= TARGET_HOT else "MISSED"
            print(
                f"C={row.clients}: one hot key {row.rate:,.0f}/s (target >= {TARGET_HOT:,}): {ok}"
            )
        ceiling = next(
            (r for r in rows if r.kind == "redis-indep" and r.clients == row.clients), None
        )
        if row.kind == "tether-indep" and ceiling is not None:
            share = row.rate / ceiling.rate
            ok = "met" if share >= TARGET_INDEP else "MISSED"
            print(
                f"C={row.clients}: independent keys {share:.0%} of EVALSHA "
                f"(target >= {TARGET_INDEP:.0%}): {ok}"
            )
    for row in rows:
        if row.other_errors:
            print(f"note: {row.kind} C={row.clients}: {row.other_errors} answers were other errors")


async def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    deployment: Deployment | None = None
    r: redis.asyncio.Redis | None = None
    with redis_unless_given(args, "mutations-redis-"):
        try:
            r = redis.asyncio.Redis.from_url(args.redis_url, decode_responses=True)
            urls: list[str] = []
            pids: list[int | None] = []
            if any(k.startswith("tether") for k in args.rows):
                env = dict(TETHER_ENV)
                if args.mutation_batch is not None:
                    env["TETHER_MUTATION_BATCH"] = str(args.mutation_batch)
                deployment = Deployment(args.redis_url, env)
                servers = [deployment.start_server() for _ in range(2)]
                urls = [s.ws_url for s in servers]
                pids = [s.pid for s in servers]
                print(f"two Tether instances: {', '.join(urls)}", flush=True)
            for clients in args.clients:
                for kind in args.rows:
                    print(
                        f"[{kind} C={clients}] {args.warmup:.0f} s warm-up + {args.seconds:.0f} s; "
                        f"load {load_average()}",
                        flush=True,
                    )
                    if kind.startswith("tether"):
                        row = await measure_tether(kind, clients, urls, pids, r, args)
                    else:
                        row = await measure_redis(kind, clients, args)
                    rows.append(row)
                    extra = ""
                    if kind.startswith("tether"):
                        extra = (
                            f", {row.conflicts} conflict errors of {row.acks} answers, "
                            f"{row.attempts_per_commit:.2f} attempts/commit"
                        )
                    print(
                        f"  -> {row.rate:,.0f} commits/s, p50 {row.p50_ms:.2f} ms, "
                        f"p99 {row.p99_ms:.2f} ms{extra}",
                        flush=True,
                    )
                    if deployment is not None and any(
                        s.returncode is not None for s in deployment.servers
                    ):
                        raise RuntimeError("a Tether server died:\n" + deployment.log_tails())
        finally:
            if r is not None:
                await r.aclose()
            if deployment is not None:
                deployment.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,16,64", help="concurrent clients [1,16,64]")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"among {','.join(ROWS)} [all]")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds a row [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring [1]")
    parser.add_argument("--redis-url", help="use this redis-server (default: start one)")
    parser.add_argument(
        "--mutation-batch",
        type=int,
        default=None,
        help="TETHER_MUTATION_BATCH for the instances (1: no group commit) [their default]",
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    parser.add_argument("--evalsha-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--hot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.redis_pid = None
    if args.evalsha_worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(evalsha_worker(args))
        return
    args.clients = [int(x) for x in comma_list(args.clients)]
    args.rows = comma_list(args.rows)
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    raise_nofile()
    print(
        f"mutations: C={','.join(map(str, args.clients))}, rows {', '.join(args.rows)}; "
        f"{describe_run()}",
        flush=True,
    )

    rows = run_bounded(lambda: run(args), args.timeout)
    print_table(rows)


if __name__ == "__main__":
    main()
