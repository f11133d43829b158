"""Commit throughput of data partitions on a 3-master Redis Cluster, beside a raw Lua ceiling.

Starts its own Redis Cluster (3 masters, no replicas, AOF on as in production, on free ports of
127.0.0.1), caps every master to the same small share of a core (``--master-cpu``, 4 % by
default: a CPU cgroup of its own with a CFS quota; root), and drives commits from ``--procs``
client processes through Tether's store (:func:`tether.server.data.engine.run_mutation`: the
real ``read.lua`` + ``commit.lua`` path, with a client id, so each commit also stores its
outcome; without the request-id claim an application with partitions adds, a ``SET NX`` in a
slot of its own), C concurrent tasks with one mutation in flight each, every task bumping its
own counter (no conflicts). Rows, in ``--repeat`` rounds (3), alternated:

* ``tether one``    -- every task commits into one partition: one slot, one master.
* ``tether spread`` -- 3C tasks (``--spread-clients``): task i commits into partition
  ``p<i mod P>`` (P partitions, hashed over the three masters by their slots). Three times the
  tasks, so that each master is offered about the load the one master had alone: a master's
  commits per wake-up, and so its CPU per commit, depend on how many commits wait for it. The
  question is what three masters carry where one carries its load (weak scaling); with
  ``--spread-clients`` equal to C, how one load divides over three masters, each batching less.
* ``tether paced`` (not by default; uncapped only) -- one partition again, paced at a third of
  the spread row's rate (each master's rate there). Evenly paced arrivals batch nothing, so it
  costs more per commit than either closed-loop row: it shows how much of a lightly loaded
  master's CPU per commit is per-wakeup cost, and is no better a base than ``tether one``.
* ``raw one`` / ``raw spread`` (/ ``raw paced``) -- the ceiling: ``EVALSHA`` of a two-key script
  (``INCR`` a version, ``XADD`` it to a stream: a commit's bare bones) from redis-py's cluster
  client, the same tasks, one tag or P tags.

**Why the cap.** Two cores cannot hold three masters at full speed beside the clients that
would saturate them (a Tether commit costs its client more CPU than it costs the master), so
uncapped, every row's commits/s is the clients' limit and says nothing about the cluster. With
each master held to the same small budget, the masters are the bottleneck at a load the clients
drive with most of their time to spare, and the spread row's commits/s over the one-partition
row's is the cluster's scaling under that budget, **measured**. A row counts as the masters'
throughput only where every master that took commits used at least 90 % of its budget and the
clients at most 80 % of their time; the summary says whether every row did. A capped master is
paused for most of each period and batches the commands that queued meanwhile, so its CPU per
commit is lower than a lightly loaded master's and says nothing of a whole core's capacity:
nothing is computed from it under the cap.

Measured: commits/s over the window; the clients' CPU per commit and busy share; for each
master, its commits (from the partitions' version counters / the raw counters), its CPU per
commit (the sum over its threads of ``/proc/PID/task/TID/schedstat``, to the nanosecond) and,
capped, its busy share of the budget and the quota periods in which it was throttled
(``cpu.stat``). Uncapped (``--master-cpu 0``, or where no cgroup can be made: the run says so)
the report adds the time spent executing commands (``INFO commandstats``), subtracts each
master's idle CPU, and computes, not measures: each master's capacity at 100 % of one core of
its own (1e6 / its µs per commit), and the cluster's for the spread row, limited by the master
with the largest share of the commits (capacity_m / share_m, the smallest over the masters),
with the ratio to the one-master row. Run from the repository root (as root, for the cap)::

    .venv/bin/python bench/partitions.py                       # C = 64, P = 64, 5 s a row
    .venv/bin/python bench/partitions.py --master-cpu 0.08     # a larger budget per master
    .venv/bin/python bench/partitions.py --spread-clients 64   # the same tasks in both rows
    .venv/bin/python bench/partitions.py --master-cpu 0        # uncapped: ratios computed only
    .venv/bin/python bench/partitions.py --clients 16 --partitions 12 --seconds 2   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
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
    child_options,
    cluster_node,
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


# ------------------------------------------------------------------------------ the masters' CPU


class CpuCap:
    """Each master in a CPU cgroup of its own with a CFS quota: ``fraction`` of one core.

    Two cores cannot hold three masters at full speed and the clients that would saturate them.
    Capping every master to the same small budget makes the masters the bottleneck at a load the
    clients can drive: the commits/s of a row is then the masters' throughput under that
    budget, measured. cgroup v1's ``cpu`` controller (``cpu.cfs_quota_us``) or cgroup v2's
    ``cpu.max`` (groups at the hierarchy's root; only v1 was exercised here); root is needed.
    The quota's period is chosen so the quota is at least 1 ms (the kernel's minimum)."""

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PREFIX = "tether-bench-"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.period_us = max(10_000, int(1000 / fraction) + 1)
        self.quota_us = int(self.period_us * fraction)
        self.groups: dict[int, Path] = {}  # master's port -> its group
        self.base: Path | None = None

    @classmethod
    def root(cls) -> tuple[Path, str]:
        """The cgroup hierarchy to use and its kind, or a ``RuntimeError`` saying why none."""
        if (cls.V1 / "cpu.cfs_quota_us").exists() or (cls.V1 / "tasks").exists():
            return cls.V1, "v1"
        controllers = cls.V2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return cls.V2, "v2"
        raise RuntimeError("no cgroup cpu controller (cgroup v1 cpu or v2 cpu.max) is mounted")

    def remove_stale(self) -> list[str]:
        """Remove the empty groups an earlier run left (one killed before its clean-up), those
        whose benchmark process is gone; return their names."""
        base, _ = self.root()
        removed = []
        for group in base.glob(f"{self.PREFIX}*"):
            owner = group.name.removeprefix(self.PREFIX).partition("-")[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                with contextlib.suppress(OSError):
                    group.rmdir()  # refused while a process is still in it
                    removed.append(group.name)
        return removed

    def apply(self, pid: int, port: int) -> None:
        base, kind = self.root()
        self.base = base
        group = base / f"{self.PREFIX}{os.getpid()}-{port}"
        group.mkdir()
        self.groups[port] = group
        if kind == "v1":
            (group / "cpu.cfs_period_us").write_text(str(self.period_us))
            (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            with contextlib.suppress(OSError):  # may be on already; cpu.max tells below
                (base / "cgroup.subtree_control").write_text("+cpu")
            (group / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
        (group / "cgroup.procs").write_text(str(pid))

    def stat(self) -> dict[int, tuple[int, int]]:
        """Per master's port, so far (``cpu.stat``): the quota periods in which it ran, and
        those in which it used up its quota and was throttled."""
        out = {}
        for port, group in self.groups.items():
            with contextlib.suppress(OSError):
                fields = dict(
                    line.split(" ", 1) for line in (group / "cpu.stat").read_text().splitlines()
                )
                out[port] = (int(fields["nr_periods"]), int(fields["nr_throttled"]))
        return out

    def release(self) -> list[str]:
        """Move what is left in each group back to the root, remove the groups, and return
        the names of those that could not be removed (after a few tries)."""
        left = []
        for group in self.groups.values():
            for _ in range(20):
                with contextlib.suppress(OSError):
                    if self.base is not None:
                        for pid in (group / "cgroup.procs").read_text().split():
                            with contextlib.suppress(OSError):
                                (self.base / "cgroup.procs").write_text(pid)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                left.append(str(group))
        self.groups.clear()
        return left

    def describe(self) -> str:
        return (
            f"each master capped at {self.fraction:.0%} of a core "
            f"({self.quota_us} µs of CPU per {self.period_us} µs)"
        )


# ------------------------------------------------------------------------------ rows


@dataclass
class Row:
    name: str
    commits: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0
    #: seconds over which the masters' CPU was read (the window and the workers' exit)
    cpu_window: float = 0.0
    per_master: dict[int, tuple[int, float]] = field(default_factory=dict)  # port -> (n, cpu s)
    #: port -> seconds Redis spent executing commands (INFO commandstats ``usec``), all commands
    command_seconds: dict[int, float] = field(default_factory=dict)
    #: port -> (quota periods the master ran in, periods it was throttled in) during the row
    periods: dict[int, tuple[int, int]] = field(default_factory=dict)


def master_of(client: Any, key: str) -> int:
    return int(client.get_node_from_key(key).port)


def cpu_exact(pid: int | None) -> float:
    """CPU seconds process ``pid`` has used so far, to the nanosecond: the sum over its threads
    of ``/proc/PID/task/TID/schedstat`` (``/proc/PID/stat`` counts 10 ms ticks: ±25 % for a
    master at 4 % of a core over a second)."""
    assert pid is not None
    total, read = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
            read += 1
    if not read:
        raise RuntimeError(f"no /proc/{pid}/task/*/schedstat to read (CONFIG_SCHED_INFO)")
    return total / 1e9


async def worker(spec: dict[str, Any]) -> None:
    """A client process (``--worker``): its share of a row's tasks, task ``i`` committing into
    ``spec["tags"][i]`` (a partition, or a raw script's hash tag). It creates its counters,
    prints ``ready``, reads the window's start (``time.monotonic()``, one clock for every
    process) from stdin, commits until the window ends, and prints its CPU and end time."""
    kind, name, url = spec["kind"], spec["name"], spec["url"]
    tasks: dict[int, str] = {int(i): tag for i, tag in spec["tags"].items()}
    total, seconds, rate = spec["total"], spec["seconds"], spec["rate"]
    if kind == "tether":
        client: Any = connect(url)
        store = Store(client, schema=app.schema, clock=system_clock)
        bump_spec = app.functions["bump"]

        async def one(i: int, request_id: int) -> None:
            outcome = await run_mutation(
                store,
                bump_spec,
                {"tenant": tasks[i], "name": f"c{i}"},
                None,
                client_id=f"bench-{name}-{i}",
                request_id=request_id,
            )
            assert outcome.error is None, outcome.error

    else:
        client = redis.asyncio.RedisCluster.from_url(url.replace("+cluster", ""))
        script = client.register_script(RAW_COMMIT)

        async def one(i: int, request_id: int) -> None:
            await script(keys=list(raw_keys(tasks[i])))

    try:
        # One command first: a cluster client's first commands discover the cluster, and
        # redis-py's loses connections started concurrently with that discovery.
        await client.ping()
        await asyncio.gather(*(one(i, 0) for i in tasks))  # counters exist before the window
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = float(line)
        stop_at = start + seconds
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        me_before = time.process_time()

        async def loop(i: int) -> None:
            n = 1
            period = total / rate if rate else 0.0  # paced: all the tasks together make rate/s
            next_at = start + period * i / total
            while time.monotonic() < stop_at:
                if period:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += period
                await one(i, n)
                n += 1

        await asyncio.gather(*(loop(i) for i in tasks))
        end = time.monotonic()
        print(json.dumps({"cpu": time.process_time() - me_before, "end": end}), flush=True)
    finally:
        await client.aclose()


async def run_workers(
    name: str,
    kind: str,
    url: str,
    tags: list[str],
    procs: int,
    seconds: float,
    rate: float | None,
    before_start: Any,
    at_start: Any,
) -> tuple[float, float, float]:
    """Run one row's ``len(tags)`` tasks over ``procs`` worker processes (task ``i`` in worker
    ``i mod procs``); ``await before_start()`` once every worker is ready, before any commit of
    the window, and ``at_start()`` when the window opens. Returns (start, end, the workers' CPU
    seconds in the window)."""
    children = []
    try:
        for w in range(procs):
            spec = {
                "kind": kind,
                "name": name.replace(" ", "-"),
                "url": url,
                "tags": {str(i): tag for i, tag in enumerate(tags) if i % procs == w},
                "total": len(tags),
                "seconds": seconds,
                "rate": rate or 0.0,
            }
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--worker",
                    json.dumps(spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    **child_options(),  # a session of its own; stopped if this process dies
                )
            )
        for child in children:
            assert child.stdout is not None
            line = await child.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"a worker of row {name!r} failed before the window")
        await before_start()
        start = time.monotonic() + 0.1
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{start!r}\n".encode())
            await child.stdin.drain()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        at_start()
        ends, cpu = [], 0.0
        for child in children:
            out, _ = await child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"a worker of row {name!r} exited {child.returncode}")
            result = json.loads(out.decode().strip().splitlines()[-1])
            ends.append(float(result["end"]))
            cpu += float(result["cpu"])
        return start, max(ends), cpu
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()


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
    before = {port: cpu_exact(pid) for port, pid in pids.items()}
    start = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    for port, pid in pids.items():
        IDLE[port] = (cpu_exact(pid) - before[port]) / elapsed


async def measure(
    name: str,
    kind: str,
    url: str,
    cluster: Cluster,
    cap: CpuCap | None,
    tags: list[str],
    procs: int,
    seconds: float,
    versions: Any,
    masters: dict[str, int],
    rate: float | None = None,
) -> Row:
    pids = cluster.pids()
    before: dict[str, int] = {}
    usec_before: dict[int, int] = {}
    cpu_before: dict[int, float] = {}
    periods_before: dict[int, tuple[int, int]] = {}
    read_at: list[float] = []

    async def before_start() -> None:
        before.update(await versions())
        usec_before.update({port: command_usec(port) for port in pids})

    def at_start() -> None:  # the masters' CPU from the window's start, not before it
        read_at.append(time.monotonic())
        periods_before.update(cap.stat() if cap else {})
        cpu_before.update({port: cpu_exact(pid) for port, pid in pids.items()})

    start, end, client_cpu = await run_workers(
        name, kind, url, tags, procs, seconds, rate, before_start, at_start
    )
    elapsed = end - start
    cpu_after = {port: cpu_exact(pid) for port, pid in pids.items()}
    periods_after = cap.stat() if cap else {}
    # The masters' CPU covers [window's start, this read], a little longer than the window
    # (the workers' exit): their busy share is taken over that time, an underestimate if any.
    cpu_window = time.monotonic() - read_at[0]
    usec_after = {port: command_usec(port) for port in pids}
    after = await versions()
    row = Row(name, seconds=elapsed, client_cpu=client_cpu, cpu_window=cpu_window)
    row.command_seconds = {p: (usec_after[p] - usec_before[p]) / 1e6 for p in pids}
    row.periods = {
        p: (ran - periods_before[p][0], throttled - periods_before[p][1])
        for p, (ran, throttled) in periods_after.items()
    }
    for port in pids:
        n = sum(after[k] - before[k] for k, m in masters.items() if m == port)
        busy = cpu_after[port] - cpu_before[port]
        if cap is None:  # under the cap the busy share is compared with the cap, idle included
            busy -= IDLE.get(port, 0.0) * elapsed
        row.per_master[port] = (n, max(busy, 0.0))
    row.commits = sum(after[k] - before[k] for k in masters)
    return row


def capacities(row: Row, seconds_of: dict[int, float]) -> tuple[dict[int, float], float, float]:
    """Computed from ``seconds_of`` (each master's CPU, or command, seconds in the row): each
    master's commits/s at 100 % of one core; the cluster's at the row's spread (the pace of the
    master with the largest share of the commits); and spread evenly over the masters (the sum).
    A master whose CPU read 0 counts as unknown: the figures are then 0."""
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


#: Under the cap, a row is the masters' throughput only if every master that took commits
#: used at least this share of its budget and the clients this share of their time at most.
MASTER_AT_CAP = 0.9
CLIENTS_BELOW = 0.8


def bounded_by_masters(row: Row, cap: CpuCap, procs: int) -> tuple[bool, float, float]:
    """Whether ``row`` measured the masters: (so, the lowest busy share of its cap among the
    masters that took commits, the clients' busy share)."""
    used = [cpu / row.cpu_window / cap.fraction for n, cpu in row.per_master.values() if n]
    lowest = min(used) if used else 0.0
    clients = row.client_cpu / row.seconds / procs if row.seconds else 0.0
    return lowest >= MASTER_AT_CAP and clients <= CLIENTS_BELOW, lowest, clients


def print_row(row: Row, cap: CpuCap | None, procs: int) -> None:
    rate = row.commits / row.seconds if row.seconds else 0.0
    client = row.client_cpu / row.commits * 1e6 if row.commits else 0.0
    client_busy = row.client_cpu / row.seconds / procs if row.seconds else 0.0
    parts = []
    for port, (n, cpu) in row.per_master.items():
        busy = cpu / row.cpu_window
        load = f"{busy / cap.fraction:.1%} of cap" if cap else f"{busy:.1%}"
        if cap and row.periods.get(port, (0, 0))[0]:
            ran, throttled = row.periods[port]
            load += f", throttled in {throttled / ran:.0%} of {ran} periods"
        if n:
            us = cpu / n * 1e6
            ex = "" if cap else f" ({row.command_seconds[port] / n * 1e6:.0f}µs)"
            parts.append(f":{port} {n} {us:.0f}µs{ex} {load}")
        else:
            parts.append(f":{port} 0 ({load})")
    print(
        f"{row.name:<16} {rate:>10,.0f} {client:>11,.0f} {client_busy:>11.1%}   " + "; ".join(parts)
    )
    if cap is None:
        # Under the cap a master batches as it would not on a core of its own: its CPU per
        # commit says nothing of a whole core's capacity, so nothing is computed from it.
        _, cpu_at, cpu_even = capacities(row, {p: c for p, (_, c) in row.per_master.items()})
        _, ex_at, ex_even = capacities(row, row.command_seconds)
        print(
            f"{'':<16} computed, a core per master: from CPU {cpu_at:,.0f}/s at this spread,"
            f" {cpu_even:,.0f}/s evenly; from command time {ex_at:,.0f}/s, {ex_even:,.0f}/s"
        )


def summarize(rounds: list[dict[str, Row]], cap: CpuCap | None, procs: int) -> None:
    """Spread over one, per kind: each round's ratio and their median, measured under the cap
    (with whether each row was bounded by the masters), computed from CPU without it."""
    for kind in ("tether", "raw"):
        ratios, computed, unbounded = [], [], 0
        for rows in rounds:
            one, spread = rows.get(f"{kind} one"), rows.get(f"{kind} spread")
            if one is None or spread is None:
                continue
            if not one.commits or not spread.commits:
                unbounded += 1  # a round without commits measured nothing: no verdict on it
                continue
            if cap is not None:
                for row in (one, spread):
                    unbounded += not bounded_by_masters(row, cap, procs)[0]
                ratios.append((spread.commits / spread.seconds) / (one.commits / one.seconds))
            else:
                cpu = {p: c for p, (_, c) in one.per_master.items()}
                one_at = capacities(one, cpu)[1]
                spread_cpu = {p: c for p, (_, c) in spread.per_master.items()}
                spread_at, spread_even = capacities(spread, spread_cpu)[1:]
                if one_at:
                    computed.append((spread_at / one_at, spread_even / one_at))
        if ratios:
            listed = ", ".join(f"{r:.2f}x" for r in ratios)
            median = statistics.median(ratios)
            bounded = "yes" if not unbounded else f"NO, {unbounded} not"
            verdict = ""
            if kind == "tether":
                ok = median >= 2.5 and not unbounded
                verdict = f"; target >= 2.5x: {'met' if ok else 'NOT met'}"
            print(
                f"{kind}: spread / one, MEASURED with the masters capped alike: {listed};"
                f" median {median:.2f}x (every row bounded by the masters: {bounded}){verdict}"
            )
        elif unbounded:
            print(f"{kind}: no round committed in both rows: nothing measured")
        for at, even in computed:
            print(
                f"{kind}: spread / one, computed from CPU (not measured): {at:.2f}x at this"
                f" spread, {even:.2f}x evenly"
            )


ROW_NAMES = [
    f"{kind}-{where}" for kind in ("tether", "raw") for where in ("one", "spread", "paced")
]


def check_rows(rows: list[str], capped: bool) -> None:
    """Refuse, before anything starts, row lists the run cannot measure."""
    seen = set()
    for name in rows:
        if name not in ROW_NAMES:
            raise SystemExit(f"--rows: unknown row {name!r}; rows are {', '.join(ROW_NAMES)}")
        if name in seen:
            raise SystemExit(f"--rows: {name} twice; use --repeat for more rounds")
        seen.add(name)
        kind, _, where = name.partition("-")
        if where == "paced":
            if capped:
                # At a third of the spread rate a capped master is saturated anyway: the row
                # would run back to back and measure nothing the one row does not.
                raise SystemExit(f"--rows: {name} needs uncapped masters (--master-cpu 0)")
            if f"{kind}-spread" not in seen:
                raise SystemExit(f"--rows: {name} needs {kind}-spread before it")


async def main(args: argparse.Namespace) -> None:
    cap = CpuCap(args.master_cpu) if args.master_cpu else None
    check_rows(args.rows, cap is not None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    cluster = Cluster(tmp)
    uncapped = "masters uncapped"
    try:
        url = cluster.start()
        if cap is not None:
            try:
                stale = cap.remove_stale()
                if stale:
                    print(f"removed cgroups an earlier run left: {', '.join(stale)}")
                for port, pid in cluster.pids().items():
                    assert pid is not None
                    cap.apply(pid, port)
            except (OSError, RuntimeError) as exc:
                cap.release()
                cap = None
                uncapped = (
                    f"masters UNCAPPED: cannot cap their CPU ({exc}; the cap needs root and a"
                    " cgroup cpu controller), so the rows measure the clients and the ratios"
                    " are computed from CPU, not measured"
                )
                check_rows(args.rows, False)
        client = connect(url)
        raw_client = redis.asyncio.RedisCluster.from_url(url.replace("+cluster", ""))
        try:
            await client.ping()
            await raw_client.ping()
            print(
                f"bench/partitions.py: C={args.clients} tasks (spread rows:"
                f" {args.spread_clients}) over {args.procs} client processes, "
                f"P={args.partitions} partitions, {args.seconds:g} s a row, {args.repeat}"
                " round(s), 3 masters, "
                + (cap.describe() if cap else uncapped)
                + f"; {describe_run()}"
            )
            spread = [f"p{i}" for i in range(args.partitions)]
            per_master: dict[int, int] = {}
            for p in spread:
                port = master_of(client, redis_keys.data_keys(p).version)
                per_master[port] = per_master.get(port, 0) + 1
            print(
                "partitions per master (spread rows): "
                + ", ".join(f":{p} {n}" for p, n in sorted(per_master.items()))
            )
            if len(per_master) < len(cluster.nodes):
                print(
                    f"WARNING: the {args.partitions} partitions land on {len(per_master)} of the"
                    f" {len(cluster.nodes)} masters: the spread rows cannot use them all"
                    " (raise --partitions)"
                )
            if cap is None:
                await measure_idle(cluster, min(args.seconds, 5.0))
                print(
                    "idle CPU per master (subtracted below): "
                    + ", ".join(f":{p} {r:.2%}" for p, r in sorted(IDLE.items()))
                )
            print(
                f"{'row':<16} {'commits/s':>10} {'client µs/c':>11} {'client busy':>11}   "
                "per master: commits, CPU µs/commit"
                + (", busy share of the cap" if cap else " (executing commands), busy")
            )
            rounds: list[dict[str, Row]] = []
            paced = any(name.endswith("-paced") for name in args.rows)
            for number in range(1, args.repeat + 1):
                rows: dict[str, Row] = {}
                # Every other round in reverse order (A B B A ...), so that a drift of the
                # machine over the run weighs on both rows alike (paced rows need their spread
                # row first: then the order stays).
                order = args.rows[::-1] if number % 2 == 0 and not paced else args.rows
                for name in order:
                    kind, _, where = name.partition("-")
                    label = f"{kind} {where}"
                    where_tags = spread if where == "spread" else ["one"]
                    tasks = args.spread_clients if where == "spread" else args.clients
                    tags = [where_tags[i % len(where_tags)] for i in range(tasks)]
                    # paced: one partition at the commit rate each master had in the spread row
                    rate = None
                    if where == "paced":
                        done = rows[f"{kind} spread"]
                        rate = done.commits / done.seconds / 3
                        if rate <= 0:
                            raise SystemExit(f"{name}: the spread row committed nothing to pace")
                    used = sorted(set(tags))
                    if kind == "tether":
                        counters = {t: redis_keys.data_keys(t).version for t in used}
                        masters = {t: master_of(client, k) for t, k in counters.items()}
                    else:
                        counters = {t: raw_keys(t)[0] for t in used}
                        masters = {t: master_of(raw_client, k) for t, k in counters.items()}

                    async def versions(counters: dict[str, str] = counters) -> dict[str, int]:
                        return {t: int(await client.get(k) or 0) for t, k in counters.items()}

                    row = await measure(
                        f"{label} #{number}",  # client ids of their own: no replays
                        kind,
                        url,
                        cluster,
                        cap,
                        tags,
                        args.procs,
                        args.seconds,
                        versions,
                        masters,
                        rate,
                    )
                    rows[label] = row
                    print_row(row, cap, args.procs)
                rounds.append(rows)
            summarize(rounds, cap, args.procs)
            if cap is not None:
                print(
                    f"a row is the masters' throughput where each master that took commits used"
                    f" >= {MASTER_AT_CAP:.0%} of its cap and the clients <= {CLIENTS_BELOW:.0%}"
                    " of their time"
                )
            print(f"load average after: {load_average()}")
        finally:
            await client.aclose()
            await raw_client.aclose()
    finally:
        try:
            cluster.stop()
        finally:
            try:
                if cap is not None:
                    left = cap.release()
                    if left:
                        print(
                            f"could not remove the cgroups {', '.join(left)}: remove them by hand"
                        )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--spread-clients",
        type=int,
        help="tasks of the spread rows (default: 3 x --clients, each master's load alone)",
    )
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--rows",
        type=lambda s: s.split(","),
        default=["tether-one", "tether-spread", "raw-one", "raw-spread"],
        help="rows in order; add tether-paced / raw-paced after the spread row to compare",
    )
    parser.add_argument(
        "--master-cpu",
        type=float,
        default=0.04,
        help="cap each master to this fraction of a core (cgroup CPU quota; root); 0: uncapped",
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of the rows, alternated (the median ratio)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds for the whole run (default: from the rows' count)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.spread_clients is None:
        arguments.spread_clients = 3 * arguments.clients
    if not 0 <= arguments.master_cpu <= 1:
        parser.error("--master-cpu: a fraction of a core, 0-1 (0: uncapped)")
    for option in ("clients", "spread_clients", "partitions", "procs", "repeat"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')}: at least 1")
    if arguments.seconds <= 0:
        parser.error("--seconds: more than 0")
    if arguments.timeout is None:
        rows = arguments.repeat * len(arguments.rows)
        arguments.timeout = 120 + rows * (arguments.seconds + 15)
    if arguments.worker:
        asyncio.run(worker(json.loads(arguments.worker)))
    else:
        run_bounded(lambda: main(arguments), arguments.timeout)
