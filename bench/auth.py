"""Authentication throughput and latency, with a bare Redis baseline measured in the same run.

    .venv/bin/python bench/auth.py [--duration 3] [--rounds 6] [--round-seconds 1]
                                   [--http-concurrency 16] [--signins 40]

Linux only (CPU times come from ``/proc``).

Prints:

* refresh rotations/s through ``POST /auth/refresh`` of a real server process (httpx.AsyncClient,
  1 and N requests in flight, each on its own session and connection, so neither the per-session
  limit nor the client's connection pool is what is measured);
* rotations/s through ``SessionStore.rotate`` directly, 1 and 16 in flight;
* the baseline: ``EVALSHA`` of a trivial one-key Lua script from redis-py, 1 and 16 in flight, on
  the same Redis with the same client settings (``tether.server.redis.connection.connect``);
* store / baseline (target: at least 60 %), from the best rounds, and beside it the median of
  the per-pair ratios (each store round against the baseline round just before it);
* sign-in latency p50/p99 with the default argon2id parameters (t=3, 64 MiB, p=4).

Store and baseline alternate for ``--rounds`` rounds of ``--round-seconds`` each and the best
round of each is kept: the machines are shared and noisy, and the best round is the least
disturbed one. Many short rounds find an undisturbed one more often than a few long ones (two
rounds of 3 s, the old default, moved the 1-in-flight ratio by over 20 points between runs).
Each row also shows the CPU milliseconds per call of the client (this process), the server and
Redis, read from ``/proc``: unlike calls/s, they hardly change with what else runs on the
machine. Everything runs on one redis-server started here (append-only file on, as the embedded
one), finished in about a minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from common import TetherServer, cpu_seconds, load_average, percentile, redis_server
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.sessions import SessionStore

# Importing common (above) put the repository root on sys.path.
from tether.server.redis.connection import RedisClient, connect
from tether.server.settings import Settings

TRIVIAL_SCRIPT = "return redis.call('INCR', KEYS[1])"
PASSWORD = "bench password 0123456789"

#: The server under test: default argon2id, limits that do not throttle the benchmark itself.
SERVER_ENV = {
    "TETHER_ARGON2_TIME_COST": "3",
    "TETHER_ARGON2_MEMORY_KIB": "65536",
    "TETHER_ARGON2_PARALLELISM": "4",
    "TETHER_REFRESH_LIMIT_SESSION": "100000000/60",
    "TETHER_SIGNUP_LIMIT_ADDRESS": "100000000/60",
    "TETHER_SIGNIN_LIMIT_ADDRESS": "100000000/60",
    "TETHER_SIGNIN_LIMIT_ACCOUNT": "100000000/60",
    "TETHER_LOG_LEVEL": "warning",
}


@dataclass
class Measurement:
    """Calls per second, and CPU milliseconds per call of this process and of others (by name).

    CPU per call does not depend on what else runs on the machine; the rate does.
    """

    rate: float
    cpu_ms: dict[str, float] = field(default_factory=dict)


async def run_for(
    duration: float,
    workers: list[Callable[[], Awaitable[None]]],
    pids: dict[str, int] | None = None,
) -> Measurement:
    """Run each worker in a loop for ``duration`` seconds; measure rate and CPU per call."""
    pids = pids or {}
    done = 0
    stop_at = time.perf_counter() + duration

    async def loop(step: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await step()
            done += 1

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own_before = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in workers))
    elapsed = time.perf_counter() - start
    calls = max(done, 1)
    cpu_ms = {"client": (time.process_time() - own_before) * 1000 / calls}
    for name, pid in pids.items():
        cpu_ms[name] = (cpu_seconds(pid) - cpu_before[name]) * 1000 / calls
    return Measurement(done / elapsed, cpu_ms)


def best(a: Measurement | None, b: Measurement) -> Measurement:
    return b if a is None or b.rate > a.rate else a


# ---------------------------------------------------------------------------------- direct


async def store_workers(store: SessionStore, n: int) -> list[Callable[[], Awaitable[None]]]:
    """``n`` rotation loops, each on its own session (one rotation in flight per session)."""
    workers = []
    for i in range(n):
        grant = await store.create(f"bench-user-{i}")
        token = [grant.refresh_token]

        async def step(token: list[str] = token) -> None:
            token[0] = (await store.rotate(token[0])).refresh_token

        workers.append(step)
    return workers


def baseline_workers(redis: RedisClient, n: int) -> list[Callable[[], Awaitable[None]]]:
    script = redis.register_script(TRIVIAL_SCRIPT)
    workers = []
    for i in range(n):
        key = f"bench:{{baseline-{i}}}"

        async def step(key: str = key) -> None:
            await script(keys=[key])

        workers.append(step)
    return workers


@dataclass
class Direct:
    """The best store and baseline rounds, and the ratio of each store round to the baseline
    round run just before it."""

    store: Measurement
    baseline: Measurement
    paired: list[float]

    @property
    def ratio(self) -> float:
        return self.store.rate / self.baseline.rate


async def bench_direct(
    redis_url: str, redis_pid: int, duration: float, rounds: int
) -> dict[int, Direct]:
    settings = Settings.load(
        {"argon2_time_cost": 2, "argon2_memory_kib": 19456, "argon2_parallelism": 1},
        environ={},
    )
    redis = connect(redis_url)
    pids = {"redis": redis_pid}
    try:
        store = SessionStore(redis, RefreshTokenCodec(secrets.token_bytes(32)), settings)
        results: dict[int, Direct] = {}
        for n in (1, 16):
            store_w = await store_workers(store, n)
            base_w = baseline_workers(redis, n)
            # Warm up: scripts loaded, connections in the pool.
            await run_for(0.3, store_w)
            await run_for(0.3, base_w)
            best_store = best_base = None
            paired = []
            for _ in range(rounds):
                base_m = await run_for(duration, base_w, pids)
                store_m = await run_for(duration, store_w, pids)
                best_base, best_store = best(best_base, base_m), best(best_store, store_m)
                paired.append(store_m.rate / base_m.rate)
            assert best_store is not None and best_base is not None
            results[n] = Direct(best_store, best_base, paired)
        return results
    finally:
        await redis.aclose()


# ---------------------------------------------------------------------------------- HTTP


async def bench_http_refresh(
    base_url: str, concurrency: int, duration: float, pids: dict[str, int]
) -> Measurement:
    # One client (one keep-alive connection) per request in flight: a single httpx client
    # sharing a 16-connection pool spends more CPU in its pool than the server spends on the
    # request (measured here: 7 ms vs 3 ms per call, p90 latency 0.7 s), which would make this
    # a benchmark of httpcore.
    clients = [httpx.AsyncClient(base_url=base_url, timeout=30) for _ in range(concurrency)]
    try:
        tokens: list[str] = []
        for http in clients:
            email = f"bench-{secrets.token_hex(6)}@example.com"
            resp = await http.post("/auth/signup", json={"email": email, "password": PASSWORD})
            resp.raise_for_status()
            tokens.append(resp.json()["refreshToken"])

        def worker(i: int) -> Callable[[], Awaitable[None]]:
            async def step() -> None:
                resp = await clients[i].post("/auth/refresh", json={"refreshToken": tokens[i]})
                if resp.status_code != 200:
                    raise RuntimeError(f"refresh answered {resp.status_code}: {resp.text}")
                tokens[i] = resp.json()["refreshToken"]

            return step

        workers = [worker(i) for i in range(concurrency)]
        await run_for(0.5, workers)  # warm up
        return await run_for(duration, workers, pids)
    finally:
        for http in clients:
            await http.aclose()


async def bench_signin_latency(
    base_url: str, samples: int, server_pid: int
) -> tuple[float, float, float]:
    """(p50, p99, server CPU) in seconds, of sequential sign-ins."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        email = f"bench-{secrets.token_hex(6)}@example.com"
        resp = await http.post("/auth/signup", json={"email": email, "password": PASSWORD})
        resp.raise_for_status()
        timings = []
        cpu = 0.0
        for i in range(samples + 2):
            cpu_before = cpu_seconds(server_pid)
            start = time.perf_counter()
            resp = await http.post("/auth/signin", json={"email": email, "password": PASSWORD})
            timings.append(time.perf_counter() - start)
            resp.raise_for_status()
            if i >= 2:
                cpu += cpu_seconds(server_pid) - cpu_before
        timings = sorted(timings[2:])  # the first two warm up the connection and thread pool
        p50 = statistics.median(timings)
        p99 = percentile(timings, 99)
        return p50, p99, cpu / samples


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds per HTTP refresh measurement"
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating store/baseline rounds")
    parser.add_argument(
        "--round-seconds", type=float, default=1.0, help="seconds per store or baseline round"
    )
    parser.add_argument("--http-concurrency", type=int, default=16)
    parser.add_argument("--signins", type=int, default=40, help="sign-in latency samples")
    args = parser.parse_args()

    started = time.perf_counter()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load_average()}")
    redis_proc = redis_server(Path(tempfile.mkdtemp(prefix="tether-bench-redis-")))
    redis_proc.start()
    assert redis_proc.pid is not None
    server: TetherServer | None = None
    http: dict[int, Measurement] = {}
    try:
        direct = asyncio.run(
            bench_direct(redis_proc.url, redis_proc.pid, args.round_seconds, args.rounds)
        )
        server = TetherServer(redis_proc.url, env=SERVER_ENV).start()
        assert server.pid is not None
        pids = {"server": server.pid, "redis": redis_proc.pid}
        for n in sorted({1, args.http_concurrency}):
            http[n] = asyncio.run(bench_http_refresh(server.base_url, n, args.duration, pids))
        p50, p99, signin_cpu = asyncio.run(
            bench_signin_latency(server.base_url, args.signins, server.pid)
        )
    finally:
        if server is not None:
            server.stop()
        redis_proc.stop()

    print(
        f"redis-server {redis_proc.url}, AOF on; HTTP {args.duration:g} s per run; store and"
        f" baseline {args.rounds} alternating rounds of {args.round_seconds:g} s"
    )
    print()
    header = f"{'measurement':<50} {'calls/s':>8} {'CPU ms per call':>27}"
    print(header)
    print("-" * len(header))

    def row(label: str, m: Measurement) -> None:
        cpu = ", ".join(f"{name} {ms:.3f}" for name, ms in m.cpu_ms.items())
        print(f"{label:<50} {m.rate:>8,.0f}   {cpu}")

    for n, m in http.items():
        row(f"POST /auth/refresh, {n} in flight (httpx client)", m)
    for n, d in direct.items():
        row(f"SessionStore.rotate, {n} in flight (best of {args.rounds})", d.store)
        row(f"baseline: EVALSHA trivial 1-key script, {n} in fl.", d.baseline)
    print()
    for n, d in direct.items():
        verdict = "meets" if d.ratio >= 0.6 else "BELOW"
        print(
            f"store / baseline, {n:>2} in flight: {d.ratio:6.1%}  ({verdict} the 60 % target);"
            f" median of the {len(d.paired)} paired rounds {statistics.median(d.paired):.1%}"
        )
    print()
    print(
        f"sign-in, default argon2id (t=3, 64 MiB, p=4), {args.signins} sequential: "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; server CPU {signin_cpu * 1000:.0f} ms"
        " per sign-in"
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
