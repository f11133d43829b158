"""The HTTP authentication API (protocol §2) against real server processes and a real Redis.

Client addresses: Linux routes all of 127.0.0.0/8 to the loopback interface, so a client bound to
127.0.0.N reaches the server on 127.0.0.1 from a distinct address. The per-address and
per-account limits are tested with real, different source addresses that way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio
from tether.server.redis import keys as redis_keys
from tether.server.settings import Settings, SettingsError

from tests.harness import REPO_ROOT, TEST_ISSUER, RedisProcess, ServerProcess

ServerFactory = Callable[..., ServerProcess]

PASSWORD = "correct horse battery staple"
TOKEN_FIELDS = {"userId", "sessionId", "accessToken", "refreshToken", "expiresAt", "serverTime"}
#: Sign-ups from 127.0.0.1 are limited per address; tests sign up more than the default allows.
MANY_SIGNUPS = {"TETHER_SIGNUP_LIMIT_ADDRESS": "1000/60"}


def new_email() -> str:
    return f"user-{secrets.token_hex(6)}@example.com"


def client_for(server: ServerProcess, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """An HTTP client whose connections come from ``address`` (any of 127.0.0.0/8)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=server.base_url, transport=transport, timeout=15.0)


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(env=MANY_SIGNUPS)


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(server) as client:
        yield client


async def sign_up(
    http: httpx.AsyncClient, email: str | None = None, password: str = PASSWORD
) -> dict[str, Any]:
    resp = await http.post(
        "/auth/signup", json={"email": email or new_email(), "password": password}
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def sign_in(http: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await http.post("/auth/signin", json={"email": email, "password": password})


async def refresh(
    http: httpx.AsyncClient, token: object, retry_key: str | None = None
) -> httpx.Response:
    body: dict[str, object] = {"refreshToken": token}
    if retry_key is not None:
        body["retryKey"] = retry_key
    return await http.post("/auth/refresh", json=body)


def bearer(pair: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {pair['accessToken']}"}


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]


def assert_token_pair(body: dict[str, Any]) -> None:
    assert set(body) == TOKEN_FIELDS
    for name in ("userId", "sessionId", "accessToken", "refreshToken"):
        assert isinstance(body[name], str) and body[name], name
    for name in ("expiresAt", "serverTime"):
        value = body[name]
        assert type(value) is int, name
        # Milliseconds since the epoch: 13 digits until the year 2286.
        assert 10**12 < value < 10**13, (name, value)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secret_of(refresh_token: str) -> str:
    return refresh_token.split(".")[2]


class SessionEvents:
    """Session-ended events from a real subscription; :meth:`drain` reads up to a sentinel it
    publishes itself, so "nothing was announced" needs no sleep."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self._n = 0

    async def __aenter__(self) -> SessionEvents:
        await self.pubsub.subscribe(redis_keys.SESSION_ENDED_CHANNEL)
        async with asyncio.timeout(5):
            while (msg := await self.pubsub.get_message(timeout=1.0)) is None or msg[
                "type"
            ] != "subscribe":
                pass
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def drain(self) -> list[dict[str, Any]]:
        self._n += 1
        sentinel = json.dumps({"type": "test-sentinel", "n": self._n})
        await self.client.publish(redis_keys.SESSION_ENDED_CHANNEL, sentinel)
        events = []
        async with asyncio.timeout(5):
            while True:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                if msg["data"] == sentinel:
                    return events
                events.append(json.loads(msg["data"]))


# ----------------------------------------------------------------------------- sign-up


async def test_signup_answers_201_with_tokens_then_409_for_the_same_email_in_any_case(
    http: httpx.AsyncClient,
) -> None:
    email = new_email()
    before = int(time.time() * 1000)
    resp = await http.post("/auth/signup", json={"email": email, "password": PASSWORD})
    after = int(time.time() * 1000)

    assert resp.status_code == 201
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert_token_pair(body)
    assert before - 1000 <= body["serverTime"] <= after + 1000
    # Default TETHER_ACCESS_TTL: one hour (expiresAt is whole seconds, in ms).
    assert abs(body["expiresAt"] - (body["serverTime"] + 3_600_000)) <= 2000
    assert body["refreshToken"].startswith("rt1.")
    # The tokens work: the refresh token rotates, and the pair belongs to the same session.
    rotated = await refresh(http, body["refreshToken"])
    assert rotated.status_code == 200
    assert (rotated.json()["userId"], rotated.json()["sessionId"]) == (
        body["userId"],
        body["sessionId"],
    )

    # The same address again, in any case: 409, and the first account is left as it was.
    for variant in (email, email.upper(), f"  {email.capitalize()} "):
        resp = await http.post("/auth/signup", json={"email": variant, "password": "other-pass-1"})
        assert_error(resp, 409, "email_taken")
    assert (await sign_in(http, email)).status_code == 200
    assert (await sign_in(http, email, "other-pass-1")).status_code == 401


async def test_bad_requests_answer_json_errors(http: httpx.AsyncClient) -> None:
    for path in ("/nope", "/auth/nope", "/auth/signup/extra"):
        assert_error(await http.get(path), 404, "not_found")
        assert_error(await http.post(path, json={}), 404, "not_found")

    bad_json_bodies = {
        "not JSON": b"email=a@example.com&password=12345678",
        "invalid UTF-8": b'{"email": "\xff\xfe"}',
        "empty body": b"",
        "JSON array": json.dumps([{"email": new_email(), "password": PASSWORD}]).encode(),
        "JSON string": b'"hello"',
        "JSON null": b"null",
    }
    for name, content in bad_json_bodies.items():
        resp = await http.post(
            "/auth/signup", content=content, headers={"content-type": "application/json"}
        )
        assert_error(resp, 400, "invalid_request")
        assert name

    bad_fields: list[dict[str, object]] = [
        {"email": "not-an-email", "password": PASSWORD},
        {"email": "a@b", "password": PASSWORD},
        {"email": "two@at@example.com", "password": PASSWORD},
        {"email": "sp ace@example.com", "password": PASSWORD},
        {"email": "", "password": PASSWORD},
        {"email": 42, "password": PASSWORD},
        {"email": ["a@example.com"], "password": PASSWORD},
        {"email": "x" * 250 + "@example.com", "password": PASSWORD},
        {"password": PASSWORD},
        {"email": new_email(), "password": "seven77"},  # 7 characters
        {"email": new_email(), "password": "p" * 257},
        {"email": new_email(), "password": 12345678},
        {"email": new_email(), "password": None},
        {"email": new_email()},
    ]
    for body in bad_fields:
        resp = await http.post("/auth/signup", json=body)
        assert_error(resp, 400, "invalid_request")

    # The boundaries themselves are accepted.
    await sign_up(http, password="p" * 8)
    await sign_up(http, password="p" * 256)


async def test_oversized_password_is_refused_without_hashing(
    server_factory: ServerFactory,
) -> None:
    # argon2 well above the OWASP minimum, so one hash costs clearly more than a refusal.
    server = server_factory(env={**MANY_SIGNUPS, "TETHER_ARGON2_TIME_COST": "16"})
    megabyte = json.dumps({"email": new_email(), "password": "x" * (1 << 20)}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(megabyte), 65536):
            yield megabyte[i : i + 65536]

    async with client_for(server) as http:
        await sign_up(http)  # warm up: connection, thread pool
        normal = []
        for _ in range(2):
            start = time.perf_counter()
            await sign_up(http)
            normal.append(time.perf_counter() - start)

        refused = []
        for _ in range(3):
            start = time.perf_counter()
            resp = await http.post(
                "/auth/signup", content=megabyte, headers={"content-type": "application/json"}
            )
            refused.append(time.perf_counter() - start)
            assert_error(resp, 400, "invalid_request")
        # Without a Content-Length (chunked), the body is cut off while it is read.
        resp = await http.post(
            "/auth/signup", content=chunked(), headers={"content-type": "application/json"}
        )
        assert_error(resp, 400, "invalid_request")
        assert "content-length" not in resp.request.headers

    # Relative, not absolute: one hash takes 70 ms on one day of this machine and 200 on another.
    assert max(refused) * 4 < min(normal), (refused, normal)


#: Bodies that once reached the server's code as something other than a clean 400 (a 500 with a
#: RecursionError or UnicodeEncodeError traceback, or an account for a NUL-bearing address).
HOSTILE_BODIES: dict[str, bytes] = {
    "nested arrays, unclosed": b"[" * 5000,
    "nested arrays, closed": b"[" * 5000 + b"]" * 5000,
    "nested under a field": b'{"email":' + b"[" * 3000 + b"]" * 3000 + b"}",
    "nested just past the limit": b'{"email":' + b"[" * 64 + b"]" * 64 + b"}",
    "a 5000-digit number": b'{"email": ' + b"9" * 5000 + b"}",
    "NaN": b'{"email": NaN, "password": "12345678"}',
    "lone surrogate in the e-mail": b'{"email": "\\ud800@example.com", "password": "12345678"}',
    "lone surrogate in the password": b'{"email": "s@example.com", "password": "\\udfffxxxxxxxx"}',
    "lone surrogate in the retry key": b'{"refreshToken": "rt1.a.b.c", "retryKey": "'
    + b"\\udc00" * 16
    + b'"}',
    "UTF-16": '{"email": "u@example.com", "password": "12345678"}'.encode("utf-16"),
    "a JSON number": b"12",
}


async def test_hostile_bodies_answer_400_invalid_request_and_log_no_traceback(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        for path in ("/auth/signup", "/auth/signin", "/auth/refresh"):
            for name, content in HOSTILE_BODIES.items():
                resp = await http.post(
                    path, content=content, headers={"content-type": "application/json"}
                )
                assert resp.status_code == 400, (path, name, resp.text)
                assert_error(resp, 400, "invalid_request")
        # A NUL (or any control character) does not make an e-mail address.
        for email in ("nul\x00@example.com", "esc\x1b@example.com", "del@exa\x7fmple.com"):
            resp = await http.post("/auth/signup", json={"email": email, "password": PASSWORD})
            assert_error(resp, 400, "invalid_request")
        # Nesting up to the limit is accepted (and then judged on its fields).
        at_limit = b'{"email":' + b"[" * 63 + b"]" * 63 + b"}"
        resp = await http.post(
            "/auth/signup", content=at_limit, headers={"content-type": "application/json"}
        )
        assert resp.json()["message"] == "email must be a string"
    await server.astop()
    log = server.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


async def test_a_client_that_disconnects_mid_body_is_not_logged(server: ServerProcess) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    heads = [
        b"Content-Length: 100\r\n\r\n" + b'{"email":',
        b"Transfer-Encoding: chunked\r\n\r\n" + b'5\r\n{"ema\r\n',
    ]
    for head in heads:
        for path in (b"/auth/signin", b"/auth/refresh"):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST " + path + b" HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\n" + head
            )
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    async with client_for(server) as http:  # the server is still well
        assert (await http.get("/healthz")).status_code == 200
    # Stopping waits for every request in flight: the aborted ones have been handled.
    await server.astop()
    log = server.log_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


# ----------------------------------------------------------------------------- sign-in


async def test_signin_unknown_email_and_wrong_password_are_indistinguishable(
    http: httpx.AsyncClient,
) -> None:
    email = new_email()
    signed_up = await sign_up(http, email)
    wrong = await sign_in(http, email, "not the password")
    unknown = await sign_in(http, new_email(), "not the password")
    malformed = await sign_in(http, "not-an-email", "x")

    assert_error(wrong, 401, "invalid_credentials")
    for other in (unknown, malformed):
        assert other.status_code == wrong.status_code
        assert other.content == wrong.content
        assert other.headers.get("content-type") == wrong.headers.get("content-type")
        assert other.headers.get("retry-after") is None

    ok = await sign_in(http, email.upper())
    assert ok.status_code == 200
    pair = ok.json()
    assert_token_pair(pair)
    assert pair["userId"] == signed_up["userId"]
    assert pair["sessionId"] != signed_up["sessionId"]


async def test_signin_answers_an_unknown_email_as_slowly_as_a_wrong_password(
    server_factory: ServerFactory,
) -> None:
    # t=12: one hash ~100 ms on a fast day of this machine, clearly above the 50 ms floor below.
    server = server_factory(env={"TETHER_ARGON2_TIME_COST": "12"})
    async with client_for(server) as http:
        email = new_email()
        await sign_up(http, email)
        timings: dict[str, list[float]] = {"wrong": [], "unknown": []}
        for _ in range(3):
            for kind, address in (("wrong", email), ("unknown", new_email())):
                start = time.perf_counter()
                resp = await sign_in(http, address, "not the password")
                timings[kind].append(time.perf_counter() - start)
                assert resp.status_code == 401
    wrong, unknown = min(timings["wrong"]), min(timings["unknown"])
    assert unknown > 0.05, timings  # a hash was computed for the unknown address too
    assert 0.5 < unknown / wrong < 2.0, timings


ACCOUNT_LIMIT_ENV = {
    "TETHER_SIGNIN_LIMIT_ACCOUNT": "3/60",
    "TETHER_SIGNIN_LIMIT_ADDRESS": "1000/60",
}


async def test_signin_account_limit_refuses_the_fourth_wrong_attempt(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={**MANY_SIGNUPS, **ACCOUNT_LIMIT_ENV})
    async with client_for(server) as http:
        email = new_email()
        await sign_up(http, email)
        for n in range(1, 4):
            async with client_for(server, f"127.0.1.{n}") as attacker:
                assert (await sign_in(attacker, email, f"guess-{n}-wrong")).status_code == 401
        async with client_for(server, "127.0.1.4") as attacker:
            fourth = await sign_in(attacker, email, "guess-4-wrong")
        assert_error(fourth, 429, "rate_limited")


async def test_signin_account_limit_holds_across_addresses_and_blocks_the_right_password(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={**MANY_SIGNUPS, **ACCOUNT_LIMIT_ENV})
    async with client_for(server) as http:
        email, bystander = new_email(), new_email()
        await sign_up(http, email)
        await sign_up(http, bystander)

        # Every guess from a different address: the count is per account, not per address.
        answers = []
        for n in range(1, 8):
            async with client_for(server, f"127.0.2.{n}") as attacker:
                resp = await sign_in(attacker, email, f"guess-{n}-wrong")
            answers.append(resp)
            if resp.status_code == 429:
                break
        statuses = [r.status_code for r in answers]
        assert statuses[-1] == 429, statuses
        assert statuses[:3] == [401, 401, 401], statuses  # the limit allows three attempts
        blocked = answers[-1]
        assert_error(blocked, 429, "rate_limited")
        assert 1 <= int(blocked.headers["retry-after"]) <= 60

        # While blocked, the right password from a fresh address is refused too...
        async with client_for(server, "127.0.2.200") as owner:
            resp = await sign_in(owner, email)
        assert_error(resp, 429, "rate_limited")
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        # ...and another account on the same addresses is not affected.
        assert (await sign_in(http, bystander)).status_code == 200


async def test_signin_account_limit_holds_against_concurrent_guesses(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={**MANY_SIGNUPS, **ACCOUNT_LIMIT_ENV})
    async with client_for(server) as http:
        email = new_email()
        await sign_up(http, email)
    attackers = [client_for(server, f"127.0.3.{n}") for n in range(1, 13)]
    try:
        answers = await asyncio.gather(
            *(sign_in(c, email, f"guess-{i}-wrong") for i, c in enumerate(attackers))
        )
    finally:
        for c in attackers:
            await c.aclose()
    verified = [r for r in answers if r.status_code == 401]
    assert {r.status_code for r in answers} <= {401, 429}
    assert len(verified) <= 3, f"{len(verified)} of 12 guesses were checked"


async def test_signin_address_limit(server_factory: ServerFactory) -> None:
    server = server_factory(
        env={
            **MANY_SIGNUPS,
            "TETHER_SIGNIN_LIMIT_ADDRESS": "3/60",
            "TETHER_SIGNIN_LIMIT_ACCOUNT": "1000/60",
        }
    )
    async with client_for(server) as http:
        email = new_email()
        await sign_up(http, email)
    async with client_for(server, "127.0.4.1") as crowded:
        # Three attempts on three accounts (one of them successful) use up the address.
        assert (await sign_in(crowded, new_email(), "wrong-password")).status_code == 401
        assert (await sign_in(crowded, email)).status_code == 200
        assert (await sign_in(crowded, new_email(), "wrong-password")).status_code == 401
        blocked = await sign_in(crowded, email)
        assert_error(blocked, 429, "rate_limited")
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
    async with client_for(server, "127.0.4.2") as elsewhere:
        assert (await sign_in(elsewhere, email)).status_code == 200


ADDRESS_LIMIT_ENV = {
    **MANY_SIGNUPS,
    "TETHER_SIGNIN_LIMIT_ADDRESS": "2/60",
    "TETHER_SIGNIN_LIMIT_ACCOUNT": "1000/60",
}


async def sign_in_as(http: httpx.AsyncClient, email: str, forwarded_for: str) -> httpx.Response:
    return await http.post(
        "/auth/signin",
        json={"email": email, "password": PASSWORD},
        headers={"X-Forwarded-For": forwarded_for},
    )


async def test_behind_a_trusted_proxy_the_address_limit_counts_each_forwarded_client(
    server_factory: ServerFactory,
) -> None:
    """Behind a load balancer every request comes from the proxy: with the proxy trusted, the
    client named in X-Forwarded-For is the one counted, so one client's guesses do not lock
    every other client out."""
    server = server_factory(env={**ADDRESS_LIMIT_ENV, "TETHER_TRUSTED_PROXIES": "127.0.5.1"})
    async with client_for(server) as http:
        email = new_email()
        await sign_up(http, email)
    async with client_for(server, "127.0.5.1") as proxy:
        # What nginx's $proxy_add_x_forwarded_for sends: the client's own header, then the
        # address nginx saw. The address the proxy appended is the one that counts.
        assert (await sign_in_as(proxy, email, "198.51.100.1, 203.0.113.7")).status_code == 200
        assert (await sign_in_as(proxy, email, "198.51.100.2, 203.0.113.7")).status_code == 200
        assert_error(await sign_in_as(proxy, email, "203.0.113.7"), 429, "rate_limited")
        assert (await sign_in_as(proxy, email, "203.0.113.8")).status_code == 200


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    server_factory: ServerFactory,
) -> None:
    """A client that writes its own X-Forwarded-For does not escape the per-address limit,
    whether no proxy is trusted (the default) or another address is."""
    trusting_another = {**ADDRESS_LIMIT_ENV, "TETHER_TRUSTED_PROXIES": "127.0.6.9"}
    # One Redis for both servers: each spoofer comes from an address of its own.
    for env, address in ((ADDRESS_LIMIT_ENV, "127.0.6.1"), (trusting_another, "127.0.6.2")):
        server = server_factory(env=env)
        async with client_for(server) as http:
            email = new_email()
            await sign_up(http, email)
        async with client_for(server, address) as spoofer:
            assert (await sign_in_as(spoofer, email, "203.0.113.1")).status_code == 200
            assert (await sign_in_as(spoofer, email, "203.0.113.2")).status_code == 200
            assert_error(await sign_in_as(spoofer, email, "203.0.113.3"), 429, "rate_limited")


def test_a_trusted_proxy_must_be_an_address_or_a_network() -> None:
    with pytest.raises(SettingsError, match="TETHER_TRUSTED_PROXIES"):
        Settings.load(environ={"TETHER_TRUSTED_PROXIES": "10.0.0.1,nginx"})
    loaded = Settings.load(environ={"TETHER_TRUSTED_PROXIES": "10.0.0.0/8, ::1,*"})
    assert loaded.trusted_proxies == ("10.0.0.0/8", "::1", "*")


# ----------------------------------------------------------------------------- refresh


async def test_fifty_concurrent_refreshes_on_two_instances_converge(
    server_factory: ServerFactory, redis_client: redis.asyncio.Redis
) -> None:
    one, two = server_factory(), server_factory()
    async with client_for(one) as a, client_for(two) as b, SessionEvents(redis_client) as events:
        pair = await sign_up(a)
        original = pair["refreshToken"]
        answers = await asyncio.gather(*(refresh(a if i % 2 else b, original) for i in range(50)))

        assert [r.status_code for r in answers] == [200] * 50, {r.text for r in answers}
        bodies = [r.json() for r in answers]
        new_tokens = {body["refreshToken"] for body in bodies}
        assert len(new_tokens) == 1
        [new] = new_tokens
        assert new != original
        assert {(body["userId"], body["sessionId"]) for body in bodies} == {
            (pair["userId"], pair["sessionId"])
        }
        # One rotation: the original is the previous token, the new one the current.
        stored = await redis_client.hgetall(redis_keys.session(pair["sessionId"]))
        assert stored["state"] == "active"
        assert stored["prev"] == sha256(secret_of(original))
        assert stored["cur"] == sha256(secret_of(new))
        assert await events.drain() == []

        # The new token rotates once; after that the original is a grandparent: reuse.
        newer = await refresh(b, new)
        assert newer.status_code == 200
        assert newer.json()["refreshToken"] not in (original, new)
        assert_error(await refresh(a, original), 401, "refresh_reused")
        [event] = await events.drain()
        assert event["reason"] == "refresh_reused"
        assert event["sessionId"] == pair["sessionId"]
        assert_error(await refresh(a, newer.json()["refreshToken"]), 401, "refresh_invalid")


async def test_refresh_retry_key_and_reuse_over_http(server_factory: ServerFactory) -> None:
    # Window 0: only the retryKey lets the previous token converge.
    server = server_factory(env={"TETHER_REFRESH_REUSE_WINDOW": "0"})
    async with client_for(server) as http:
        pair = await sign_up(http)
        retry_key = secrets.token_urlsafe(24)
        first = await refresh(http, pair["refreshToken"], retry_key)
        assert first.status_code == 200
        await asyncio.sleep(0.01)
        again = await refresh(http, pair["refreshToken"], retry_key)
        assert again.status_code == 200
        assert again.json()["refreshToken"] == first.json()["refreshToken"]

        assert_error(await refresh(http, pair["refreshToken"]), 401, "refresh_reused")
        assert_error(await refresh(http, first.json()["refreshToken"]), 401, "refresh_invalid")


async def test_refresh_is_rate_limited_per_session(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TETHER_REFRESH_LIMIT_SESSION": "3/60"})
    async with client_for(server) as http:
        pair, other = await sign_up(http), await sign_up(http)
        token = pair["refreshToken"]
        for _ in range(3):
            resp = await refresh(http, token)
            assert resp.status_code == 200
            token = resp.json()["refreshToken"]
        limited = await refresh(http, token)
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert (await refresh(http, other["refreshToken"])).status_code == 200


# ----------------------------------------------------------------------------- sign-out


async def test_sign_out_ends_the_session_and_sign_out_all_every_session_of_the_user(
    http: httpx.AsyncClient,
) -> None:
    email = new_email()
    pair = await sign_up(http, email)
    second = await refresh(http, pair["refreshToken"])  # same session, new pair
    assert second.status_code == 200
    other_sessions = [(await sign_in(http, email)).json() for _ in range(2)]
    bystander = await sign_up(http)

    resp = await http.post("/auth/signout", headers=bearer(pair))
    assert resp.status_code == 204
    assert resp.content == b""

    for ended in (pair, second.json()):
        assert_error(await http.post("/auth/signout", headers=bearer(ended)), 401, "invalid_token")
        assert_error(await refresh(http, ended["refreshToken"]), 401, "refresh_invalid")
    # Only that session ended.
    refreshed = await refresh(http, other_sessions[0]["refreshToken"])
    assert refreshed.status_code == 200
    other_sessions[0] = refreshed.json()

    resp = await http.post("/auth/signout-all", headers=bearer(other_sessions[1]))
    assert resp.status_code == 204
    for ended in other_sessions:
        assert_error(await refresh(http, ended["refreshToken"]), 401, "refresh_invalid")
        assert_error(await http.post("/auth/signout", headers=bearer(ended)), 401, "invalid_token")
        assert_error(
            await http.post("/auth/signout-all", headers=bearer(ended)), 401, "invalid_token"
        )
    # Another user's session is untouched, and the user can sign in again.
    assert (await refresh(http, bystander["refreshToken"])).status_code == 200
    assert (await http.post("/auth/signout", headers=bearer(bystander))).status_code == 204
    assert (await sign_in(http, email)).status_code == 200


async def test_malformed_refresh_and_bearer_tokens_are_refused_and_change_nothing(
    http: httpx.AsyncClient,
) -> None:
    pair = await sign_up(http)
    token = pair["refreshToken"]
    for bad in (None, 42, "", "rt1.a.b.c", token[:-2] + "AA", token + "x"):
        assert_error(await refresh(http, bad), 401, "refresh_invalid")
    for bad_key in ("short", "k" * 129, 12345):
        resp = await http.post("/auth/refresh", json={"refreshToken": token, "retryKey": bad_key})
        assert_error(resp, 400, "invalid_request")
    assert_error(await http.post("/auth/refresh", content=b"[]"), 400, "invalid_request")

    access = pair["accessToken"]
    header, payload, signature = access.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for headers in (
        {},
        {"Authorization": access},
        {"Authorization": "Basic " + access},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": f"Bearer {header}.{forged_payload}.{signature}"},
        {"Authorization": f"Bearer {token}"},
    ):
        for path in ("/auth/signout", "/auth/signout-all"):
            assert_error(await http.post(path, headers=headers), 401, "invalid_token")

    # None of that touched the session: both of its tokens still work.
    assert (await refresh(http, token)).status_code == 200
    assert (await http.post("/auth/signout", headers=bearer(pair))).status_code == 204


# ----------------------------------------------------------------------------- Redis outage


async def wait_ready(http: httpx.AsyncClient, want: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (resp := await http.get("/readyz")).status_code != want:
        assert time.monotonic() < deadline, f"/readyz stayed {resp.status_code}"
        await asyncio.sleep(0.1)


async def test_redis_outage_answers_503_and_recovers_with_the_same_token(
    redis_proc: RedisProcess, server_factory: ServerFactory
) -> None:
    server = server_factory()
    async with client_for(server) as http:
        email = new_email()
        pair = await sign_up(http, email)
        token = pair["refreshToken"]

        await asyncio.to_thread(redis_proc.stop)

        assert_error(await refresh(http, token), 503, "unavailable")
        assert_error(await http.post("/auth/signout", headers=bearer(pair)), 503, "unavailable")
        assert_error(await sign_in(http, email), 503, "unavailable")
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200

        await asyncio.to_thread(redis_proc.restart)
        await wait_ready(http, 200)

        # The outage signed nobody out: the same refresh token rotates, once.
        resp = await refresh(http, token)
        assert resp.status_code == 200, resp.text
        assert resp.json()["sessionId"] == pair["sessionId"]
        assert (await refresh(http, resp.json()["refreshToken"])).status_code == 200
    assert server.returncode is None


# ----------------------------------------------------------------------------- admin CLI


def run_revoke(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "tether", "sessions", "revoke", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_cli_revoke_ends_a_session_or_all_of_a_users(
    http: httpx.AsyncClient, redis_url: str
) -> None:
    email = new_email()
    one = await sign_up(http, email)
    resp = await sign_in(http, email)
    two = resp.json()
    bystander = await sign_up(http)

    result = await asyncio.to_thread(
        run_revoke, "--session", one["sessionId"], "--redis-url", redis_url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ended 1 session(s)"
    assert_error(await refresh(http, one["refreshToken"]), 401, "refresh_invalid")
    assert_error(await http.post("/auth/signout", headers=bearer(one)), 401, "invalid_token")
    resp = await refresh(http, two["refreshToken"])
    assert resp.status_code == 200
    two = resp.json()

    third = (await sign_in(http, email)).json()
    result = await asyncio.to_thread(run_revoke, "--user", one["userId"], "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ended 2 session(s)"
    for pair in (two, third):
        assert_error(await refresh(http, pair["refreshToken"]), 401, "refresh_invalid")
    assert (await refresh(http, bystander["refreshToken"])).status_code == 200


# ----------------------------------------------------------------------------- discovery


async def test_jwks_and_openid_configuration_verify_an_issued_token(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    config_resp = await http.get("/.well-known/openid-configuration")
    assert config_resp.status_code == 200
    config = config_resp.json()
    assert config["issuer"] == TEST_ISSUER
    assert config["jwks_uri"] == server.base_url + "/.well-known/jwks.json"

    jwks_resp = await http.get(config["jwks_uri"])
    assert jwks_resp.status_code == 200
    jwks = jwks_resp.json()
    assert set(jwks) == {"keys"} and jwks["keys"]
    for jwk in jwks["keys"]:
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256"
        assert {"x", "y", "kid"} <= set(jwk)
        assert "d" not in jwk  # no private key material

    pair = await sign_up(http)
    access = pair["accessToken"]
    header = jwt.get_unverified_header(access)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    [jwk] = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    key = jwt.PyJWK(jwk)
    claims = jwt.decode(
        access, key, algorithms=["ES256"], audience="tether", issuer=config["issuer"]
    )
    assert claims["sub"] == pair["userId"]
    assert claims["sid"] == pair["sessionId"]
    assert claims["exp"] * 1000 == pair["expiresAt"]
    assert {"iss", "aud", "sub", "sid", "iat", "exp", "jti"} <= set(claims)

    # The key really is the one that signed it: a changed payload fails verification.
    head, payload, sig = access.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            f"{head}.{forged}.{sig}", key, algorithms=["ES256"], audience="tether",
            issuer=config["issuer"],
        )  # fmt: skip


# ----------------------------------------------------------------------------- logs


async def test_logs_hold_no_token_password_or_secret(
    server_factory: ServerFactory, server_env: dict[str, str]
) -> None:
    server = server_factory(env={**MANY_SIGNUPS, "TETHER_LOG_LEVEL": "debug"})
    retry_key = secrets.token_urlsafe(24)
    wrong_password = "a-wrong-password-" + secrets.token_hex(4)
    pairs: list[dict[str, Any]] = []
    async with client_for(server) as http:
        email = new_email()
        pairs.append(await sign_up(http, email))
        assert (await sign_in(http, email, wrong_password)).status_code == 401
        pairs.append((await sign_in(http, email)).json())
        rotated = await refresh(http, pairs[0]["refreshToken"], retry_key)
        pairs.append(rotated.json())
        pairs.append((await refresh(http, pairs[2]["refreshToken"])).json())
        # Reuse is logged as a warning: it must name the session, not the token.
        assert (await refresh(http, pairs[0]["refreshToken"])).status_code == 401
        forged = pairs[1]["refreshToken"][:-4] + "AAAA"
        assert (await refresh(http, forged)).status_code == 401
        assert (await http.post("/auth/signout", headers=bearer(pairs[1]))).status_code == 204
        third = (await sign_in(http, email)).json()
        pairs.append(third)
        assert (await http.post("/auth/signout-all", headers=bearer(third))).status_code == 204
    await server.astop()
    log = server.log_text()

    key_file = json.loads(open(server_env["TETHER_KEYS_FILE"]).read())
    mac_key = base64.urlsafe_b64decode(key_file["refreshSecret"])
    needles = {
        "password": PASSWORD,
        "wrong password": wrong_password,
        "retry key": retry_key,
        "forged token": forged,
        "refreshSecret": key_file["refreshSecret"].rstrip("="),
        "refreshSecret (hex)": mac_key.hex(),
    }
    for entry in key_file["keys"]:
        pem_body = "".join(entry["privateKey"].splitlines()[1:-1])
        needles[f"private key {entry['kid']}"] = pem_body[:40]
    for i, pair in enumerate(pairs):
        needles[f"access token {i}"] = pair["accessToken"]
        needles[f"access signature {i}"] = pair["accessToken"].rsplit(".", 1)[1]
        needles[f"refresh token {i}"] = pair["refreshToken"]
        needles[f"refresh secret {i}"] = secret_of(pair["refreshToken"])
        needles[f"refresh tag {i}"] = pair["refreshToken"].rsplit(".", 1)[1]
    for label, needle in needles.items():
        assert needle not in log, f"the server log holds the {label}"
    # Not vacuous: the log did record these flows.
    assert "signed up" in log and "reuse" in log and "POST /auth/refresh" in log
