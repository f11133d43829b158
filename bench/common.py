"""What the benchmark scripts share: this process and its children, a Tether deployment on
processes of our own, and the small pieces of the runs and the tables.

Not a benchmark. The scripts import it as ``common`` (``bench/`` is the directory of the script
run, so it is on ``sys.path``); importing it puts the repository root on ``sys.path`` too.
Benchmarks import nothing from ``tests/``: the processes they measure are started here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
from tether.server.redis.embedded import (  # noqa: E402
    EmbeddedRedis,
    die_with_parent_preexec,
    find_redis_server,
    free_loopback_port,
)

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

T = TypeVar("T")


# ------------------------------------------------------------------------------ this process


def now() -> float:
    return time.monotonic()


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def describe_run() -> str:
    """Python, CPUs and the commit measured (``+ local changes`` when ``server/`` is dirty)."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "server")
        tree = f"commit {commit}" + (" + local changes in server/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        tree = "commit unknown"
    return f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {tree}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``"0.52 0.61 0.70"`` (``"?"`` if the OS has none)."""
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def cpu_seconds(pid: int | None, *, missing_ok: bool = False) -> float:
    """User + system CPU seconds process ``pid`` has used so far (``/proc/PID/stat``).

    A process that is gone, or no ``pid`` at all, is an error; with ``missing_ok`` it counts
    0.0 instead (for sums over processes that may be absent, such as a ``redis-server`` that
    ``--redis-url`` names and this run did not start).
    """
    if pid is None:
        if missing_ok:
            return 0.0
        raise ValueError("cpu_seconds: no pid")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if missing_ok:
            return 0.0
        raise
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Keep the load generator's own garbage collector out of the measurement.

    With thousands of connections a full collection in this process takes hundreds of
    milliseconds, during which nothing is received or time-stamped: that pause would be
    charged to the server. Collect once, freeze what survives, and collect nothing until the
    block ends (the block must not allocate without bound).
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` (process cleanup) runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bounded(make: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run the benchmark coroutine ``make()`` for at most ``timeout`` seconds. Ctrl-C, SIGTERM
    and the time limit unwind through every ``finally``, which stop the processes started.

    Only the time limit itself is reported as such: a ``TimeoutError`` from within the run
    (a wait of the benchmark's own) propagates with its traceback.
    """
    limit: asyncio.Timeout | None = None

    async def bounded() -> T:
        nonlocal limit
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM cancels the run like Ctrl-C does (asyncio.run's own SIGINT handling).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with asyncio.timeout(timeout) as limit:
            return await make()

    try:
        with terminate_as_interrupt():
            return asyncio.run(bounded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the processes this benchmark started are stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except TimeoutError:
        if limit is None or not limit.expired():
            raise
        print(f"gave up after {timeout:.0f} s (--timeout); processes stopped", file=sys.stderr)
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------ child processes


def child_options() -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` or ``asyncio.create_subprocess_exec`` of a
    benchmark's child process: run from the repository root, in a session of its own (Ctrl-C
    on the terminal reaches only the benchmark, which stops its children), and sent SIGTERM if
    the benchmark dies without stopping it."""
    return {
        "cwd": REPO_ROOT,
        "start_new_session": True,
        "preexec_fn": die_with_parent_preexec(signal.SIGTERM),
    }


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; safe to call again."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class ChildServer:
    """A baseline server run as a process of its own: ``SCRIPT --serve KIND --port P [EXTRA]``,
    ``script`` being the benchmark script that implements ``--serve KIND``."""

    def __init__(self, kind: str, *, script: str, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.port = free_loopback_port()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [sys.executable, script, "--serve", kind, "--port", str(self.port), *extra],
            stdin=subprocess.DEVNULL,
            **child_options(),
        )
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)


async def serve_websockets(
    handler: Callable[[ServerConnection], Awaitable[None]], port: int, *, backlog: int
) -> None:
    """Serve ``handler`` on 127.0.0.1:``port`` with the ``websockets`` asyncio server,
    compression off (every baseline's setting), until cancelled. ``backlog`` is the listen
    queue (asyncio's default is 100)."""
    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", port, compression=None, backlog=backlog) as server:
        await server.serve_forever()


# ------------------------------------------------------------------------------ Tether and Redis

#: argon2id at the OWASP minimum (the test suite's setting): the sign-ups that set up a run stay
#: fast. A benchmark that measures password hashing sets its own (bench/auth.py).
FAST_ARGON2_ENV = {
    "TETHER_ARGON2_TIME_COST": "2",
    "TETHER_ARGON2_MEMORY_KIB": "19456",
    "TETHER_ARGON2_PARALLELISM": "1",
}
BENCH_ISSUER = "https://tether.bench"
#: Every load generator connects from loopback addresses: thousands of sockets from one address,
#: which the production default (256 per address) would refuse. Benchmarks measure the server,
#: not that guard.
UNCAPPED_ENV = {"TETHER_MAX_CONNECTIONS_PER_ADDRESS": "0"}


def redis_server(data_dir: Path) -> EmbeddedRedis:
    """A ``redis-server`` with its data in ``data_dir``, AOF on as in production: the product's
    own :class:`EmbeddedRedis` (``start()`` returns its URL, ``stop()`` ends it in order)."""
    return EmbeddedRedis(data_dir, appendonly=True, private=False)


def find_redis_cli() -> str:
    """The ``redis-cli`` beside the ``redis-server`` in use, else the one on ``PATH``."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path is None:
        raise RuntimeError("no redis-cli found (make install provides one)")
    return on_path


def cluster_node_port() -> int:
    """A free loopback port whose cluster bus port (the port + 10,000) is a valid port too."""
    port = free_loopback_port()
    while port > 55535:
        port = free_loopback_port()
    return port


def cluster_node(data_dir: Path, port: int, *extra_args: str) -> EmbeddedRedis:
    """A cluster-enabled ``redis-server`` on ``port`` with AOF on, its data and its cluster
    config file under ``data_dir``, plus ``extra_args``."""
    conf = (data_dir / f"nodes-{port}.conf").resolve()
    return EmbeddedRedis(
        data_dir / str(port),
        port=port,
        appendonly=True,
        private=False,
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", str(conf), *extra_args],
    )


def start_cluster(
    nodes: list[EmbeddedRedis],
    count: int,
    make_node: Callable[[int], EmbeddedRedis],
    *,
    replicas: int,
    node_ok: Callable[[int], bool],
    timeout: float = 60.0,
) -> str:
    """Start ``count`` cluster-enabled nodes, ``make_node(port)`` each on a port from
    :func:`cluster_node_port` (appended to ``nodes`` as they start: the caller stops them, also
    after a failure), join them with ``redis-cli --cluster create`` (``replicas`` per master),
    wait until ``node_ok(port)`` holds for every node, and return the ``redis+cluster://`` URL."""
    for _ in range(count):
        node = make_node(cluster_node_port())
        node.start()  # before the next port is picked: it cannot be picked twice
        nodes.append(node)
    subprocess.run(
        [
            find_redis_cli(),
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in nodes),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    for node in nodes:
        while not node_ok(node.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node :{node.port} never became ok")
            time.sleep(0.1)
    return f"redis+cluster://127.0.0.1:{nodes[0].port}/0"


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready; the message ends with its log."""


class TetherServer:
    """``python -m tether serve`` on a free port of 127.0.0.1, as a benchmark's child process.

    ``env`` is laid over a clean environment: the caller's ``TETHER_*`` variables are dropped,
    then :data:`FAST_ARGON2_ENV` and :data:`UNCAPPED_ENV`, a private data directory and key file
    in ``tmp_dir`` (default: a new temporary directory, which also holds ``server.log``) apply,
    then ``env``.
    """

    def __init__(
        self, redis_url: str, *, env: dict[str, str] | None = None, tmp_dir: Path | None = None
    ) -> None:
        self.redis_url = redis_url
        self.port = free_loopback_port()
        self.tmp_dir = tmp_dir if tmp_dir is not None else Path(tempfile.mkdtemp(prefix="tether-"))
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.tmp_dir / "server.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        self.env.update(FAST_ARGON2_ENV)
        self.env.update(UNCAPPED_ENV)
        self.env["TETHER_DATA_DIR"] = str(self.tmp_dir / "data")
        self.env["TETHER_KEYS_FILE"] = str(self.tmp_dir / "keys.json")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/sync"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, ``None`` while it runs."""
        return self.process.poll() if self.process is not None else None

    def start(self, timeout: float = 20.0) -> TetherServer:
        """Start the process and wait until ``GET /readyz`` answers 200. A port taken in the
        meantime is retried with another; :class:`ServerStartError` (with the log) otherwise."""
        deadline = time.monotonic() + timeout
        for _ in range(3):
            self._spawn()
            if self._wait_ready(deadline):
                return self
            if "address already in use" not in self.log_text():
                break
            stop_process(self.process)
            self.port = free_loopback_port()
        self.kill()
        raise ServerStartError(
            f"server on port {self.port} did not become ready; log:\n{self.log_text()}"
        )

    async def astart(self, timeout: float = 20.0) -> TetherServer:
        """:meth:`start` without blocking the event loop, and on the same port every time
        (a restart keeps the address a load balancer in front of it knows): a port still held
        by the process before is tried again until ``timeout``. Call it from the main thread,
        as :meth:`start` (see ``die_with_parent_preexec``)."""
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            if await self._await_ready(deadline):
                return self
            stop_process(self.process, 1.0)
            in_use = "address already in use" in self.log_text()[-2000:]
            if not in_use or time.monotonic() > deadline:
                raise ServerStartError(
                    f"server on port {self.port} did not become ready; log:\n{self.log_text()}"
                )
            await asyncio.sleep(0.2)

    async def _await_ready(self, deadline: float) -> bool:
        assert self.process is not None
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.base_url + "/readyz")).status_code == 200:
                        return True
                await asyncio.sleep(0.05)
        return False

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "tether", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--redis-url", self.redis_url]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **child_options(),
            )

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        with httpx.Client(timeout=1.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.base_url + "/readyz").status_code == 200:
                        return True
                time.sleep(0.05)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the server drains), then SIGKILL its process group after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Deployment:
    """Tether server processes (``python -m tether serve``) on a ``redis-server`` the caller
    owns, sharing one key file and issuer; :meth:`close` stops the servers.

    :class:`DeploymentWithRedis` starts and stops a ``redis-server`` of its own.
    """

    def __init__(self, redis_url: str | None, env: dict[str, str]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
        self.redis_url = redis_url
        # One key file and one issuer: a token minted by one instance verifies on the others.
        shared = {"TETHER_KEYS_FILE": str(self.tmp / "keys.json"), "TETHER_ISSUER": BENCH_ISSUER}
        self.env = {**shared, **env}
        self.servers: list[TetherServer] = []

    def start_server(self, env: dict[str, str] | None = None) -> TetherServer:
        """Start one more server; ``env`` is laid over the deployment's for this one only."""
        if self.redis_url is None:
            raise RuntimeError("no redis-server for the deployment yet")
        tmp_dir = self.tmp / f"server{len(self.servers)}"
        server = TetherServer(self.redis_url, env={**self.env, **(env or {})}, tmp_dir=tmp_dir)
        self.servers.append(server)
        return server.start()

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every server's log (for a failed run)."""
        out = []
        for i, server in enumerate(self.servers):
            tail = server.log_text().splitlines()[-lines:]
            out.append(f"--- tether server {i} log (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    def stop_servers(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop(timeout=15)

    def close(self) -> None:
        self.stop_servers()
        shutil.rmtree(self.tmp, ignore_errors=True)


class DeploymentWithRedis(Deployment):
    """A :class:`Deployment` on a ``redis-server`` of its own: :meth:`start_redis` (before the
    first server) starts it, :meth:`close` stops it after the servers."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(None, env)
        self.redis = redis_server(self.tmp / "redis")

    def start_redis(self) -> str:
        self.redis_url = self.redis.start()
        return self.redis_url

    def close(self) -> None:
        self.stop_servers()
        with contextlib.suppress(Exception):
            self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def redis_unless_given(args: argparse.Namespace, prefix: str) -> Iterator[None]:
    """Unless ``--redis-url`` named one, start a ``redis-server`` (data in a new temporary
    directory named ``prefix...``) and set ``args.redis_url`` and ``args.redis_pid`` to it; on
    leaving the block, stop it and remove its data."""
    if args.redis_url is not None:
        yield
        return
    redis = redis_server(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        args.redis_url = redis.start()
        args.redis_pid = redis.pid
        print(f"redis-server on {args.redis_url}", flush=True)
        yield
    finally:
        redis.stop()
        shutil.rmtree(redis.data_dir, ignore_errors=True)


async def sign_up(base_url: str, count: int) -> list[str]:
    """Sign up ``count`` users; return their access tokens."""
    tokens = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False) as http:
        for _ in range(count):
            email = f"bench-{uuid.uuid4().hex[:12]}@example.com"
            resp = await http.post("/auth/signup", json={"email": email, "password": "bench-pw-1"})
            resp.raise_for_status()
            tokens.append(resp.json()["accessToken"])
    return tokens


# ------------------------------------------------------------------------------ figures and tables


def percentile(values: Sequence[float], q: float, *, nearest_rank: bool = False) -> float:
    """Percentile ``q`` (0-100) of ``values``, one of the values (no interpolation); NaN if
    there are none.

    Two definitions are in use, and the published figures depend on which: by default the
    value at index ``round(q / 100 * (n - 1))`` of the sorted values; with ``nearest_rank``
    the value of rank ``ceil(q / 100 * n)`` (at least 1), so that with fewer than 100 samples
    p99 is the largest.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    if nearest_rank:
        return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated command-line value: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def print_header(header: str) -> None:
    """Print a Markdown table's header row and the rule under it."""
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
