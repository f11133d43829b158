"""Commit throughput of data partitions on a 3-master Redis Cluster, beside a raw Lua ceiling.

Starts its own Redis Cluster (3 masters, no replicas, AOF on as in production, on free ports of
127.0.0.1) and drives commits from this one process through Tether's store
(:func:`tether.server.data.engine.run_mutation`: the real ``read.lua`` + ``commit.lua`` path,
with a client id, so each commit also stores its outcome), C concurrent tasks with one mutation in
flight each, every task bumping its own counter (no conflicts). Rows, measured in the same run:

* ``tether one``    -- every task commits into one partition: one slot, one master.
* ``tether spread`` -- task i commits into partition ``p<i mod P>`` (P partitions, hashed over
  the three masters by their slots).
* ``tether paced`` (not by default) -- one partition again, paced at a third of the spread row's
  rate (each master's rate there). Evenly paced arrivals batch nothing, so it costs more per
  commit than either closed-loop row: it shows how much of a lightly loaded master's CPU per
  commit is per-wakeup cost, and is no better a base than ``tether one``.
* ``raw one`` / ``raw spread`` (/ ``raw paced``) -- the ceiling: ``EVALSHA`` of a two-key script
  (``INCR`` a version, ``XADD`` it to a stream: a commit's bare bones) from redis-py's cluster
  client, the same C tasks, one tag or P tags.

Measured: commits/s over the window; this process's CPU per commit; for each master, its commits
(from the partitions' version counters / the raw counters), and its CPU per commit (user + system
of its ``redis-server`` from ``/proc/PID/stat``, before and after, less the master's idle CPU
measured for the same time before the rows), and of that CPU the time spent executing commands
(``INFO commandstats``: without the I/O and event-loop costs, which shrink per commit as a busy
master batches). Computed, not measured:
each master's capacity at 100 % of one core of its own (1e6 / its µs per commit), and the
cluster's for the spread row: limited by the master with the largest share of the partitions
(capacity_m / share_m, the smallest over the masters), with the ratio to the one-master row.

On a machine with few cores the client (this process) is the bottleneck and the masters share
cores with it, so the wall-clock commits/s of the spread row cannot show the cluster's capacity:
the CPU per commit can. Run from the repository root::

    .venv/bin/python bench/partitions.py                       # C = 64, P = 64, 5 s a row
    .venv/bin/python bench/partitions.py --clients 16 --partitions 12 --seconds 2   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tempfile

import redis
import redis.asyncio
from common import (
    cluster_node,
    cpu_seconds,
    describe_run,
    load_average,
    run_bounded,
    start_cluster,
)
from tether.server.clock import system_clock
from tether.server.data.engine import run_mutation
from tether.server.data.functions import App, Context
from tether.server.data.store import Store
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import connect
from tether.server.redis.embedded import EmbeddedRedis

app = App("bench-partitions")
app.table("tallies", indexes={"by_name": ["name"]})


@app.mutation("bump", partition="tenant")
async def bump(ctx: Context, tenant: str, name: str) -> int:
    docs = await ctx.db.query("tallies", index="by_name", equals={"name": name}, limit=1)
    if not docs:
        await ctx.db.insert("tallies", {"name": name, "value": 1})
        return 1
    value = int(docs[0]["value"]) + 1
    await ctx.db.patch("tallies", docs[0]["_id"], {"value": value})
    return value


RAW_COMMIT = """
local v = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, v .. '-0', 'v', v)
return v
"""


def raw_keys(tag: str) -> tuple[str, str]:
    return f"bench:{{{tag}}}:v", f"bench:{{{tag}}}:s"


# ------------------------------------------------------------------------------ the cluster


class Cluster:
    """3 masters, no replicas, AOF on (``appendfsync everysec``: Redis's and the embedded
    default), joined by ``redis-cli --cluster create``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.nodes: list[EmbeddedRedis] = []

    def start(self, timeout: float = 60.0) -> str:
        return start_cluster(
            self.nodes, 3, self._node, replicas=0, node_ok=self._node_ok, timeout=timeout
        )

    def _node(self, port: int) -> EmbeddedRedis:
        return cluster_node(self.data_dir, port)

    @staticmethod
    def _node_ok(port: int) -> bool:
        with redis.Redis(port=port, socket_timeout=2) as r:
            info = r.execute_command("CLUSTER INFO")
        return str(info.get("cluster_state")) == "ok"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pids(self) -> dict[int, int | None]:
        return {node.port: node.pid for node in self.nodes}


# ------------------------------------------------------------------------------ rows


@dataclass
class Row:
    name: str
    commits: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0
    per_master: dict[int, tuple[int, float]] = field(default_factory=dict)  # port -> (n, cpu s)
    #: port -> seconds Redis spent executing commands (INFO commandstats ``usec``), all commands
    command_seconds: dict[int, float] = field(default_factory=dict)


def master_of(client: Any, key: str) -> int:
    return int(client.get_node_from_key(key).port)


async def tether_row(
    name: str,
    client: Any,
    cluster: Cluster,
    tasks: int,
    partitions: list[str],
    seconds: float,
    rate: float | None = None,
) -> Row:
    store = Store(client, schema=app.schema, clock=system_clock)
    spec = app.functions["bump"]
    assigned = [partitions[i % len(partitions)] for i in range(tasks)]
    counter = {"n": 0}

    async def one(i: int, request_id: int) -> None:
        outcome = await run_mutation(
            store,
            spec,
            {"tenant": assigned[i], "name": f"c{i}"},
            None,
            client_id=f"bench-{name}-{i}",
            request_id=request_id,
        )
        assert outcome.error is None, outcome.error

    await asyncio.gather(*(one(i, 0) for i in range(tasks)))  # counters exist before the window
    used = sorted(set(assigned))

    async def versions() -> dict[str, int]:
        out = {}
        for p in used:
            out[p] = int(await client.get(redis_keys.data_keys(p).version) or 0)
        return out

    return await measure(
        name,
        cluster,
        seconds,
        tasks,
        lambda i, n: one(i, n),
        versions,
        {p: master_of(client, redis_keys.data_keys(p).version) for p in used},
        counter,
        rate,
    )


async def raw_row(
    name: str,
    client: Any,
    cluster: Cluster,
    tasks: int,
    tags: list[str],
    seconds: float,
    rate: float | None = None,
) -> Row:
    script = client.register_script(RAW_COMMIT)
    assigned = [tags[i % len(tags)] for i in range(tasks)]
    used = sorted(set(assigned))

    async def one(i: int, _: int) -> None:
        await script(keys=list(raw_keys(assigned[i])))

    async def versions() -> dict[str, int]:
        return {t: int(await client.get(raw_keys(t)[0]) or 0) for t in used}

    await asyncio.gather(*(one(i, 0) for i in range(tasks)))
    return await measure(
        name,
        cluster,
        seconds,
        tasks,
        one,
        versions,
        {t: master_of(client, raw_keys(t)[0]) for t in used},
        {"n": 0},
        rate,
    )


def command_usec(port: int) -> int:
    """Microseconds the node has spent executing commands (``INFO commandstats``, every
    command): the work of the commands themselves, without reading, parsing and answering
    them or the event loop's own costs."""
    with redis.Redis(port=port, socket_timeout=5) as r:
        stats = r.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_"))


#: Each master's CPU seconds per second while no client sends anything (its cron, AOF
#: housekeeping), measured once before the rows and subtracted from every row's figure.
IDLE: dict[int, float] = {}


async def measure_idle(cluster: Cluster, seconds: float) -> None:
    pids = cluster.pids()
    before = {port: cpu_seconds(pid) for port, pid in pids.items()}
    start = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    for port, pid in pids.items():
        IDLE[port] = (cpu_seconds(pid) - before[port]) / elapsed


async def measure(
    name: str,
    cluster: Cluster,
    seconds: float,
    tasks: int,
    one: Any,
    versions: Any,
    masters: dict[str, int],
    counter: dict[str, int],
    rate: float | None = None,
) -> Row:
    pids = cluster.pids()
    before = await versions()
    usec_before = {port: command_usec(port) for port in pids}
    cpu_before = {port: cpu_seconds(pid) for port, pid in pids.items()}
    me_before = cpu_seconds(os.getpid())
    start = time.monotonic()
    stop_at = start + seconds

    async def loop(i: int) -> None:
        n = 1
        period = tasks / rate if rate else 0.0  # paced: the tasks together make ``rate``/s
        next_at = start + period * i / tasks
        while time.monotonic() < stop_at:
            if period:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += period
            await one(i, n)
            n += 1

    await asyncio.gather(*(loop(i) for i in range(tasks)))
    elapsed = time.monotonic() - start
    me = cpu_seconds(os.getpid()) - me_before
    cpu_after = {port: cpu_seconds(pid) for port, pid in pids.items()}
    usec_after = {port: command_usec(port) for port in pids}
    after = await versions()
    row = Row(name, seconds=elapsed, client_cpu=me)
    row.command_seconds = {p: (usec_after[p] - usec_before[p]) / 1e6 for p in pids}
    for port in pids:
        n = sum(after[k] - before[k] for k, m in masters.items() if m == port)
        busy = cpu_after[port] - cpu_before[port] - IDLE.get(port, 0.0) * elapsed
        row.per_master[port] = (n, max(busy, 0.0))
    row.commits = sum(after[k] - before[k] for k in masters)
    return row


def capacities(row: Row, seconds_of: dict[int, float]) -> tuple[dict[int, float], float, float]:
    """Computed from ``seconds_of`` (each master's CPU, or command, seconds in the row): each
    master's commits/s at 100 % of one core; the cluster's at the row's spread (the pace of the
    master with the largest share of the commits); and spread evenly over the masters (the sum).
    A master whose CPU read 0 ticks (too few commits for /proc's 10 ms resolution) counts as
    unknown: the figures are then 0."""
    caps: dict[int, float] = {}
    for port, (n, _) in row.per_master.items():
        if n and seconds_of.get(port):
            caps[port] = n / seconds_of[port]
    counted = [p for p, (n, _) in row.per_master.items() if n]
    if not counted or any(p not in caps for p in counted):
        return caps, 0.0, 0.0
    shares = {p: row.per_master[p][0] / row.commits for p in counted}
    at_spread = min(caps[p] / shares[p] for p in counted)
    even = sum(caps.values()) if len(counted) == len(row.per_master) else at_spread
    return caps, at_spread, even


def report(rows: list[Row], partitions_per_master: dict[int, int]) -> None:
    print(
        f"{'row':<14} {'commits/s':>10} {'client µs/c':>11}   "
        "per master: commits, CPU µs/commit (of which executing commands), busy"
    )
    computed: dict[str, tuple[float, float, float, float]] = {}
    for row in rows:
        rate = row.commits / row.seconds if row.seconds else 0.0
        client = row.client_cpu / row.commits * 1e6 if row.commits else 0.0
        parts = []
        for port, (n, cpu) in row.per_master.items():
            busy = cpu / row.seconds
            if n:
                us, ex = cpu / n * 1e6, row.command_seconds[port] / n * 1e6
                parts.append(f":{port} {n} {us:.0f}µs ({ex:.0f}µs) {busy:.0%}")
            else:
                parts.append(f":{port} 0 ({busy:.0%})")
        print(f"{row.name:<14} {rate:>10,.0f} {client:>11,.0f}   " + "; ".join(parts))
        _, cpu_at, cpu_even = capacities(row, {p: c for p, (_, c) in row.per_master.items()})
        _, ex_at, ex_even = capacities(row, row.command_seconds)
        computed[row.name] = (cpu_at, cpu_even, ex_at, ex_even)
        print(
            f"{'':<14} computed, a core per master: from CPU {cpu_at:,.0f}/s at this spread,"
            f" {cpu_even:,.0f}/s evenly; from command time {ex_at:,.0f}/s, {ex_even:,.0f}/s"
        )
    for kind in ("tether", "raw"):
        spread = computed.get(f"{kind} spread")
        for base in ("one", "paced"):
            one = computed.get(f"{kind} {base}")
            if one and spread and one[0] and one[2]:
                print(
                    f"{kind}: spread / {base}, computed from CPU: {spread[0] / one[0]:.2f}x at"
                    f" this spread, {spread[1] / one[0]:.2f}x evenly; from command time:"
                    f" {spread[2] / one[2]:.2f}x, {spread[3] / one[2]:.2f}x"
                )
    print(
        "partitions per master (spread rows): "
        + ", ".join(f":{p} {n}" for p, n in sorted(partitions_per_master.items()))
    )


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    cluster = Cluster(tmp)
    try:
        url = cluster.start()
        client = connect(url)
        raw_client = redis.asyncio.RedisCluster.from_url(url.replace("+cluster", ""))
        try:
            await client.ping()
            await raw_client.ping()
            print(
                f"bench/partitions.py: C={args.clients} tasks, P={args.partitions} partitions, "
                f"{args.seconds:g} s a row, 3 masters; {describe_run()}"
            )
            spread = [f"p{i}" for i in range(args.partitions)]
            per_master: dict[int, int] = {}
            for p in spread:
                port = master_of(client, redis_keys.data_keys(p).version)
                per_master[port] = per_master.get(port, 0) + 1
            await measure_idle(cluster, args.seconds)
            print(
                "idle CPU per master (subtracted below): "
                + ", ".join(f":{p} {r:.2%}" for p, r in sorted(IDLE.items()))
            )
            rows = []
            rates: dict[str, float] = {}
            for name in args.rows:
                kind, _, where = name.partition("-")
                label = f"{kind} {where}"
                tags = spread if where == "spread" else ["one"]
                # paced: one partition at the commit rate each master had in the spread row
                rate = rates.get(f"{kind} spread", 0.0) / 3 if where == "paced" else None
                if where == "paced" and not rate:
                    parser_error = f"{name} needs {kind}-spread before it in --rows"
                    raise SystemExit(parser_error)
                make = tether_row if kind == "tether" else raw_row
                row = await make(
                    label,
                    client if kind == "tether" else raw_client,
                    cluster,
                    args.clients,
                    tags,
                    args.seconds,
                    rate,
                )
                rates[label] = row.commits / row.seconds
                rows.append(row)
            report(rows, per_master)
            print(f"load average after: {load_average()}")
        finally:
            await client.aclose()
            await raw_client.aclose()
    finally:
        cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--rows",
        type=lambda s: s.split(","),
        default=["tether-one", "tether-spread", "raw-one", "raw-spread"],
        help="rows in order; add tether-paced / raw-paced after the spread row to compare",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    arguments = parser.parse_args()
    run_bounded(lambda: main(arguments), arguments.timeout)
