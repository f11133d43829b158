"""Fixtures for integration tests: a fresh real Redis per test, and Tether server processes.

Every process a fixture or a test starts through :mod:`tests.harness` is killed when the test
ends, whether it passed or failed.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

# Tests import the helpers as ``tests.harness`` (one name, so one process registry): make the
# repository root importable also when pytest runs as the plain ``pytest`` script.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.harness import (  # noqa: E402
    RedisClusterProcess,
    RedisProcess,
    ServerProcess,
    kill_all,
    shared_env,
)


@pytest.fixture(autouse=True)
def _kill_leftover_processes() -> Iterator[None]:
    """Kill any harness process a test started and did not stop (also when the test failed)."""
    yield
    kill_all()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A fresh ``redis-server`` (AOF on, data in ``tmp_path/redis``), stopped after the test."""
    proc = RedisProcess(tmp_path / "redis")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    return redis_proc.url


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisClusterProcess]:
    """A fresh Redis Cluster (3 masters; indirect parametrization passes more
    :class:`RedisClusterProcess` options), stopped after the test."""
    options: dict[str, Any] = getattr(request, "param", {})
    proc = RedisClusterProcess(tmp_path / "cluster", **options)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def redis_client(redis_proc: RedisProcess) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client (``decode_responses=True``) for ``redis_proc``, closed after the test."""
    client = redis_proc.client()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    """The environment every server of this test's deployment shares (see ``shared_env``)."""
    return shared_env(tmp_path)


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(
    request: pytest.FixtureRequest, tmp_path: Path, server_env: dict[str, str]
) -> Iterator[ServerFactory]:
    """Start ``ServerProcess``es (ready on return); all are stopped after the test.

    ``server_factory(*, redis_url=None, env=None, app=None, port=None, start=True)``: the Redis
    defaults to this test's ``redis_url`` fixture; ``env`` is laid over ``server_env``, so the
    servers of one test share keys and issuer. Start servers one after another, from the test's
    own thread.
    """
    servers: list[ServerProcess] = []
    numbers = itertools.count(1)

    def start_server(
        *,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        app: str | None = None,
        port: int | None = None,
        start: bool = True,
    ) -> ServerProcess:
        if redis_url is None:
            redis_url = request.getfixturevalue("redis_url")
        server = ServerProcess(
            redis_url,
            env={**server_env, **(env or {})},
            app=app,
            port=port,
            tmp_dir=tmp_path / f"server-{next(numbers)}",
        )
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield start_server
    finally:
        for server in servers:
            if server.process is not None:
                try:
                    server.stop(timeout=5.0)
                except Exception:
                    server.kill()
