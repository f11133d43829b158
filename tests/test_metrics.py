"""``GET /metrics``: the Prometheus metrics move with real traffic on a real server, and name no
user, session or token.

Each test drives a real server process (and a real Redis) and reads the exposition text back with
``prometheus_client``'s own parser, as Prometheus would. The one in-memory test checks what needs
two apps in one process: each has its own registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tether.server.app import create_app
from tether.server.settings import Settings, SettingsError

from tests.harness import FAST_ARGON2_ENV, RedisProcess, ServerProcess
from tests.sync_client import (
    PASSWORD,
    SyncClient,
    auth_post,
    connect_sync,
    signin,
    signup,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One read of ``/metrics``: its text and its samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: Samples = {}
        self.label_values: set[str] = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value
                self.label_values.update(sample.labels.values())

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(base_url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(base_url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def eventually(
    base_url: str, check: Callable[[Scrape], bool], timeout: float = 15.0
) -> Scrape:
    """Scrape until ``check`` holds (a push may land just after the frame the test awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await scrape(base_url)
        if check(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics did not get there in {timeout} s:\n{result.text}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def opened() -> AsyncIterator[list[SyncClient]]:
    clients: list[SyncClient] = []
    yield clients
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)


async def test_metrics_follow_auth_mutations_revocations_and_name_nobody(
    server_factory: Callable[..., ServerProcess], opened: list[SyncClient]
) -> None:
    # Short tokens: auth_expiring comes 2 s after issue, auth_expired 5 s after.
    server = server_factory(env={"TETHER_ACCESS_TTL": "4", "TETHER_CLOCK_LEEWAY": "1"})
    base, ws_url = server.base_url, server.ws_url
    secrets: set[str] = {PASSWORD}

    async def sync(**kwargs: Any) -> SyncClient:
        client = await connect_sync(ws_url, **kwargs)
        opened.append(client)
        secrets.update({client.connected["connectionId"]})
        return client

    def remember(tokens: dict[str, Any]) -> None:
        for field in ("userId", "sessionId", "accessToken", "refreshToken", "email"):
            if field in tokens:
                secrets.add(tokens[field])
        if "refreshToken" in tokens:
            secrets.add(tokens["refreshToken"].split(".")[2])  # its secret part

    # ---- a session that expires on its own: auth_expiring, then auth_expired (in the background)
    ada = await signup(base)
    remember(ada)
    expiring = await signin(base, ada["email"])
    remember(expiring)
    ws_expiry = await sync()
    await ws_expiry.send(
        {"type": "authenticate", "token": expiring["accessToken"], "authVersion": 1}
    )
    await ws_expiry.expect("auth_ok")

    async def expire() -> None:
        await ws_expiry.expect("auth_expiring", 10)
        await ws_expiry.expect("auth_expired", 10)

    expiry = asyncio.create_task(expire())

    # ---- connections by state: one authenticated (above), one anonymous, one not yet connected
    anonymous = await sync()
    bare = await connect_sync(ws_url, hello=False)
    opened.append(bare)
    states = await scrape(base)
    assert states("tether_connections", state="authenticated") == 1
    assert states("tether_connections", state="anonymous") == 1
    assert states("tether_connections", state="connecting") == 1

    # ---- authenticate, refresh in-band, the previous token again (retried), sign out (revoked)
    ws = await sync()
    await ws.send({"type": "authenticate", "token": ada["accessToken"], "authVersion": 1})
    await ws.expect("auth_ok", allow={"auth_expiring"})
    await ws.send({"type": "refresh", "refreshToken": ada["refreshToken"], "authVersion": 2})
    refreshed = await ws.expect("auth_ok", allow={"auth_expiring"})
    remember(refreshed["tokens"])
    again = await auth_post(base, "/auth/refresh", json={"refreshToken": ada["refreshToken"]})
    assert again.status_code == 200, again.text
    remember(again.json())
    assert again.json()["refreshToken"] == refreshed["tokens"]["refreshToken"]
    out = await auth_post(base, "/auth/signout", token=refreshed["tokens"]["accessToken"])
    assert out.status_code == 204
    revoked = await ws.expect("session_revoked", allow={"auth_expiring"})
    assert revoked["reason"] == "signed_out"

    # ---- a bad token
    await anonymous.send({"type": "authenticate", "token": "not-a-token", "authVersion": 1})
    assert (await anonymous.expect("auth_error"))["code"] == "invalid_token"

    # ---- refresh-token reuse: an ancestor of the current token ends the session
    bob = await signup(base)
    remember(bob)
    first = await auth_post(base, "/auth/refresh", json={"refreshToken": bob["refreshToken"]})
    remember(first.json())
    second = await auth_post(
        base, "/auth/refresh", json={"refreshToken": first.json()["refreshToken"]}
    )
    remember(second.json())
    reused = await auth_post(base, "/auth/refresh", json={"refreshToken": bob["refreshToken"]})
    assert reused.status_code == 401 and reused.json()["error"] == "refresh_reused"

    # ---- a mutation, its subscriber's transition (fan-out), and a replay of its requestId
    await anonymous.send(
        {"type": "subscribe", "queryId": 1, "name": "counter.get", "args": {"name": "m"}}
    )
    await anonymous.expect("transition")
    mutate = {"type": "mutate", "requestId": 7, "name": "counter.increment", "args": {"name": "m"}}
    await anonymous.send(mutate)
    result = await anonymous.expect("mutation_result", allow={"transition"})
    assert result["value"] == 1
    await anonymous.send(mutate)
    replay = await anonymous.expect("mutation_result", allow={"transition"})
    assert replay["value"] == 1

    # ---- a protocol violation: the server closes with 4500
    violator = await sync()
    for _ in range(21):
        await violator.send_raw("not json")
    assert await violator.wait_closed(allow={"error"}) == 4500

    await asyncio.wait_for(expiry, 15)
    m = await eventually(
        base,
        lambda m: (
            m("tether_auth_notice_lateness_seconds_count", kind="auth_expired") >= 1
            and m("tether_revocation_latency_seconds_count") >= 1
        ),
    )

    # Auth on /sync, by kind and code.
    assert m("tether_auth_events_total", kind="authenticate", code="ok") == 2
    assert m("tether_auth_events_total", kind="authenticate", code="invalid_token") == 1
    assert m("tether_auth_events_total", kind="refresh", code="ok") == 1
    assert m("tether_auth_events_total", kind="session_revoked", code="signed_out") == 1
    assert m("tether_auth_events_total", kind="auth_expiring", code="sent") >= 1
    assert m("tether_auth_events_total", kind="auth_expired", code="sent") == 1
    # The HTTP API, by route and code.
    assert m("tether_http_auth_requests_total", route="signup", code="ok") == 2
    assert m("tether_http_auth_requests_total", route="signin", code="ok") == 1
    assert m("tether_http_auth_requests_total", route="refresh", code="ok") == 3
    assert m("tether_http_auth_requests_total", route="refresh", code="refresh_reused") == 1
    assert m("tether_http_auth_requests_total", route="signout", code="ok") == 1
    # Refresh outcomes: ada's in-band one and bob's two rotated; ada's previous token came back
    # within the reuse window; bob's first token was reused.
    assert m("tether_refresh_total", outcome="rotated") == 3
    assert m("tether_refresh_total", outcome="retried") == 1
    assert m("tether_refresh_total", outcome="reused") == 1
    # Revocations: one socket told, from the session-ended event, with its latency.
    assert m("tether_revocations_delivered_total", source="event") == 1
    assert m("tether_revocation_latency_seconds_count") == 1
    assert m("tether_revocation_latency_seconds_sum") < 5
    # Expiry notices, and how late they went out (a loaded machine is late by a little, not by
    # seconds: the timer is armed for the due time).
    assert m("tether_auth_notice_lateness_seconds_count", kind="auth_expiring") >= 1
    assert m("tether_auth_notice_lateness_seconds_count", kind="auth_expired") == 1
    assert m("tether_auth_notice_lateness_seconds_sum", kind="auth_expired") < 3
    # Mutations, and the commit's fan-out to its subscriber.
    assert m("tether_mutations_total", result="committed") == 1
    assert m("tether_mutations_total", result="replayed") == 1
    assert m("tether_mutation_conflicts_total") == 0
    assert m("tether_fanout_latency_seconds_count") >= 1
    # Closes by code, and what is queued now (nothing: every client reads).
    assert m("tether_connection_closes_total", code="4500") == 1
    assert m("tether_send_queue_bytes") == 0
    # Connections now: the expired and the revoked sockets are anonymous, one never connected.
    assert m("tether_connections", state="authenticated") == 0
    assert m("tether_connections", state="connecting") == 1

    # No id, token, e-mail or password anywhere: not as a label value, not in the text at all.
    assert not (m.label_values & secrets)
    leaked = [s for s in secrets if s in m.text]
    assert not leaked, leaked


async def test_redis_errors_and_reconnects_are_counted(
    server_factory: Callable[..., ServerProcess], redis_proc: RedisProcess
) -> None:
    server = server_factory()
    before = await scrape(server.base_url)
    assert before("tether_redis_reconnects_total", component="session_hub") == 0
    # Down long enough for redis-py's own retries inside one command to give up.
    redis_proc.kill()
    await asyncio.sleep(3)
    redis_proc.restart()
    after = await eventually(
        server.base_url,
        lambda m: (
            m("tether_redis_reconnects_total", component="session_hub") >= 1
            and m("tether_redis_reconnects_total", component="commit_watch") >= 1
        ),
        timeout=30,
    )
    assert after("tether_redis_errors_total", component="session_hub") >= 1
    assert after("tether_redis_errors_total", component="commit_watch") >= 1


def _app(tmp_path: Path, name: str, **overrides: str) -> Any:
    # Redis is never reached: the client connects on first use, and these requests use none.
    env = {
        **FAST_ARGON2_ENV,
        "TETHER_REDIS_URL": "redis://127.0.0.1:1",
        "TETHER_KEYS_FILE": str(tmp_path / f"{name}-keys.json"),
        **overrides,
    }
    return create_app(Settings.load(environ=env))


async def test_each_app_counts_in_its_own_registry_and_metrics_can_be_turned_off(
    tmp_path: Path,
) -> None:
    first, second = _app(tmp_path, "a"), _app(tmp_path, "b")
    off = _app(tmp_path, "off", TETHER_METRICS="false")

    async def get(app: Any, path: str, body: str | None = None) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            if body is None:
                return await http.get(path)
            return await http.post(path, content=body)

    bad = await get(first, "/auth/signup", "[")
    assert bad.status_code == 400
    one = Scrape((await get(first, "/metrics")).text)
    other = Scrape((await get(second, "/metrics")).text)
    counted = ("tether_http_auth_requests_total", {"route": "signup", "code": "invalid_request"})
    assert one(counted[0], **counted[1]) == 1
    assert other(counted[0], **counted[1]) == 0
    assert (await get(off, "/metrics")).status_code == 404


async def test_metrics_token_is_required_when_set(tmp_path: Path) -> None:
    token = "s3cret-metrics-token_0123456789"
    app = _app(tmp_path, "guarded", TETHER_METRICS_TOKEN=token)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for headers in (
            {},
            {"Authorization": f"Bearer {token[:-1]}"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": token},
            {"Authorization": f"Basic {token}"},
        ):
            refused = await http.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"] == "invalid_token"
            assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
            assert "tether_" not in refused.text
        allowed = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert allowed.status_code == 200
    assert "tether_connections" in allowed.text
    # The token is a secret: not in the settings' repr.
    assert token not in repr(app.node.settings)


async def test_metrics_token_scheme_is_case_insensitive(tmp_path: Path) -> None:
    """RFC 7235 (and Tether's other bearer routes, auth/http.py): the scheme's case does not
    matter; the token's does."""
    token = "s3cret-metrics-token_0123456789"
    app = _app(tmp_path, "guarded", TETHER_METRICS_TOKEN=token)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for scheme in ("bearer", "BEARER"):
            allowed = await http.get("/metrics", headers={"Authorization": f"{scheme} {token}"})
            assert allowed.status_code == 200, scheme
        refused = await http.get("/metrics", headers={"Authorization": f"Bearer {token.upper()}"})
        assert refused.status_code == 401
        foreign = await http.get("/metrics", headers={"Authorization": b"Bearer \xe9" + b"x" * 30})
        assert foreign.status_code == 401


async def test_metrics_token_is_compared_as_fixed_length_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens of every length are refused, the right one passes (any scheme case), and every
    comparison is of two SHA-256 digests: ``compare_digest`` of values of different lengths
    returns at once, which would tell a prober the token's length."""
    token = "s3cret-metrics-token_0123456789"
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = _app(tmp_path, "guarded", TETHER_METRICS_TOKEN=token)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for wrong in ("", "x", token[:5], token[:-1] + "X", token * 2, "y" * 4096):
            refused = await http.get("/metrics", headers={"Authorization": f"Bearer {wrong}"})
            assert refused.status_code == 401, len(wrong)
        for scheme in ("Bearer", "bearer", "BEARER"):
            allowed = await http.get("/metrics", headers={"Authorization": f"{scheme} {token}"})
            assert allowed.status_code == 200, scheme
    assert len(compared) == 9
    assert set(compared) == {(32, 32)}


def test_settings_repr_shows_no_secret() -> None:
    """The Redis URL may carry a password: as secret as the metrics token and the key set."""
    settings = Settings.load(
        environ={
            "TETHER_REDIS_URL": "redis://:hunter2-redis-password@redis.internal:6379/0",
            "TETHER_METRICS_TOKEN": "metrics-token-0123456789",
        }
    )
    shown = repr(settings)
    assert "hunter2-redis-password" not in shown
    assert "metrics-token-0123456789" not in shown


@pytest.mark.parametrize("token", ["short-token", "has a space in it ok", 'bad"quote-0123456'])
def test_metrics_token_must_look_like_a_bearer_token(token: str) -> None:
    with pytest.raises(SettingsError, match="TETHER_METRICS_TOKEN"):
        Settings.load(environ={"TETHER_METRICS_TOKEN": token})


def test_every_metric_is_in_docs_operations(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from tests.harness import REPO_ROOT

    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    app = _app(tmp_path, "docs")
    text = generate_latest(app.node.metrics.registry).decode()
    names = {
        family.name
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # prometheus-client's own, documented as such
    }
    assert "tether_connections" in names
    assert [name for name in sorted(names) if f"`{name}" not in docs] == []
