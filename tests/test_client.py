"""The Python client end to end: real server processes, a real ``redis-server``, real sockets.

What the client must make invisible (``docs/client.md``): token expiry, a lost instance, a
draining instance, a Redis outage, another process sharing the session. Each test provokes one
of them for real and checks what the application sees (values, auth states, connection
states) and, through the client's ``trace`` hook, what went over the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tether.client import (
    AuthAPI,
    AuthState,
    AuthStatus,
    Backoff,
    ClientClosed,
    ClientOptions,
    ConnectionState,
    ConnectionStatus,
    FileTokenStore,
    MemoryTokenStore,
    MutationError,
    QueryError,
    Subscription,
    TetherClient,
    sign_up,
)

from tests.harness import REPO_ROOT, RedisProcess, ServerProcess

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery"
#: Two-second access tokens: ``auth_expiring`` one second before exp, the identity ends one
#: second after it. A refresh a second is more than the default 20 auth messages a minute.
FAST_EXPIRY = {
    "TETHER_ACCESS_TTL": "2",
    "TETHER_EXPIRY_NOTICE": "1",
    "TETHER_CLOCK_LEEWAY": "1",
    "TETHER_AUTH_RATE": "200/60",
}

ServerFactory = Callable[..., ServerProcess]


# ---------------------------------------------------------------------------------- helpers


def unique_email() -> str:
    return f"client-{uuid.uuid4().hex[:12]}@example.com"


class Trace:
    """The ``trace`` hook: every frame sent and received, parsed, in order."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, direction: str, text: str) -> None:
        self.frames.append((direction, json.loads(text)))

    def sent(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        return [f for d, f in self.frames[since:] if d == "send" and f["type"] == kind]

    def received(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        return [f for d, f in self.frames[since:] if d == "recv" and f["type"] == kind]


class Recorder:
    """Collects auth and connection states from the callbacks."""

    def __init__(self) -> None:
        self.auth: list[AuthStatus] = []
        self.connection: list[ConnectionStatus] = []

    def on_auth(self, status: AuthStatus) -> None:
        self.auth.append(status)

    def on_connection(self, status: ConnectionStatus) -> None:
        self.connection.append(status)

    async def wait_auth(
        self, check: Callable[[AuthStatus], bool], timeout: float, since: int = 0
    ) -> int:
        """Index of the first auth state from ``since`` on that passes ``check``."""
        return await _wait_in(self.auth, check, timeout, since, "auth state")

    async def wait_connection(
        self, check: Callable[[ConnectionStatus], bool], timeout: float, since: int = 0
    ) -> int:
        return await _wait_in(self.connection, check, timeout, since, "connection state")


async def _wait_in(
    items: list[Any], check: Callable[[Any], bool], timeout: float, since: int, what: str
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        for index in range(since, len(items)):
            if check(items[index]):
                return index
        if time.monotonic() > deadline:
            raise AssertionError(f"no such {what} within {timeout} s; saw {items[since:]}")
        await asyncio.sleep(0.01)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def next_value(sub: Subscription, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(sub.__anext__(), timeout)


async def assert_no_value(sub: Subscription, wait: float = 0.1) -> None:
    """No value is buffered, and none arrives within ``wait`` seconds."""
    with pytest.raises(TimeoutError):
        value = await asyncio.wait_for(sub.__anext__(), wait)
        raise AssertionError(f"unexpected value {value!r}")


def quick_backoff() -> ClientOptions:
    """Reconnect within 50 ms: the tests measure the client's decisions, not the waiting."""
    return ClientOptions(backoff=Backoff(initial=0.05, maximum=0.05))


class Proxy:
    """A TCP forwarder to a server, for cutting one direction of a live connection.

    While :attr:`hold` is set, bytes from the server are dropped: a request still reaches the
    server and runs, but its answer never reaches the client. :meth:`drop` aborts every
    connection; while :attr:`refuse` is set, new ones are closed at once.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold = False
        self.refuse = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def ws_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/sync"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_server: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if from_server and self.hold:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def drop(self) -> None:
        """Abort every connection (an RST both ways); stop holding."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self.hold = False

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


# ---------------------------------------------------------------------------------- basics


async def test_query_subscribe_mutate_and_errors_with_their_codes(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    trace = Trace()
    async with TetherClient(server.ws_url, trace=trace) as client:
        assert client.auth_status == AuthStatus(AuthState.ANONYMOUS)
        assert await client.query("whoami") is None
        with pytest.raises(QueryError) as query_error:
            await client.query("no.such.query")
        assert query_error.value.code == "unknown_function"
        with pytest.raises(QueryError) as bad_args:
            await client.query("whoami", surprise=1)
        assert bad_args.value.code == "bad_args"
        with pytest.raises(QueryError) as unauthenticated:
            await client.query("notes.mine")
        assert unauthenticated.value.code == "unauthenticated"
        with pytest.raises(MutationError) as mutation_error:
            await client.mutate("no.such.mutation")
        assert mutation_error.value.code == "unknown_function"
        with pytest.raises(MutationError) as anonymous_send:
            await client.mutate("messages.send", channel="c", body="hi")
        assert anonymous_send.value.code == "unauthenticated"

        async with client.subscribe("whoami") as sub:
            assert await next_value(sub) is None
            status = await client.sign_in(email, PASSWORD)
            assert status.state is AuthState.AUTHENTICATED
            # A change of user re-runs the query: the subscription sees it.
            assert await next_value(sub) == {"userId": status.user_id}
            await client.sign_out()
            assert await next_value(sub) is None
            assert client.auth_status == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out")
        unsubscribe = {"type": "unsubscribe", "queryId": sub.query_id}
        await until(lambda: unsubscribe in trace.sent("unsubscribe"), 2, "unsubscribed on exit")


class UnwritableStore(MemoryTokenStore):
    """A token store whose disk is full: every save fails."""

    async def save(self, session: Any) -> None:
        raise OSError(28, "No space left on device")


async def test_sign_in_whose_session_cannot_be_saved_raises_to_its_caller(
    server_factory: ServerFactory,
) -> None:
    # The session exists only in memory until it is saved: the caller must hear that the save
    # failed, not get a normal return while the client quietly stays anonymous.
    server = server_factory()
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    async with TetherClient(server.ws_url, token_store=UnwritableStore()) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        with pytest.raises(OSError, match="No space left"):
            await client.sign_in(email, PASSWORD)
        assert client.auth_status.state is not AuthState.AUTHENTICATED
        assert await client.query("whoami") is None


async def test_wrong_password_is_reported_as_signed_out_not_retried(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    recorder = Recorder()
    async with TetherClient(
        server.ws_url, email=email, password="not the password", on_auth_state=recorder.on_auth
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        assert client.auth_status == AuthStatus(AuthState.SIGNED_OUT, reason="invalid_credentials")
        assert await client.query("whoami") is None  # usable, as anonymous


# ---------------------------------------------------------------------------------- keep-alive


async def test_stays_authenticated_for_ten_token_lifetimes_without_a_gap(
    server_factory: ServerFactory,
) -> None:
    a = server_factory(env=FAST_EXPIRY)
    b = server_factory(env=FAST_EXPIRY)
    email = unique_email()
    await sign_up(a.ws_url, email, PASSWORD)
    trace, recorder = Trace(), Recorder()
    changes: list[Any] = []
    probes: list[Any] = []
    async with TetherClient(
        b.ws_url,  # tokens minted by A over HTTP, renewed in-band on B
        http_url=a.base_url,
        email=email,
        password=PASSWORD,
        trace=trace,
        on_auth_state=recorder.on_auth,
    ) as client:
        async with client.subscribe("whoami") as sub:
            first = await next_value(sub, 10)
            user = {"userId": client.auth_status.user_id}
            assert first == user
            mark = len(recorder.auth)
            first_ok = trace.received("auth_ok")[0]

            async def collect() -> None:
                async for value in sub:
                    changes.append(value)

            collector = asyncio.create_task(collect())
            ten_lifetimes = first_ok["expiresAt"] + 9 * 2000  # 10 × 2 s from the first iat
            while int(time.time() * 1000) < ten_lifetimes + 1000:
                # A fresh evaluation, under whatever identity the connection holds right now.
                probes.append(await client.query("whoami"))
                await asyncio.sleep(0.2)
            collector.cancel()

    assert changes == []  # the subscription never changed: never anonymous, nothing re-sent
    assert probes and all(p == user for p in probes), [p for p in probes if p != user]
    assert recorder.auth[mark:] == []  # AUTHENTICATED throughout; renewals are invisible
    assert trace.received("auth_expired") == []
    assert trace.received("auth_error") == []
    oks = trace.received("auth_ok")
    assert len(oks) >= 10
    assert all(ok["identity"] == oks[0]["identity"] for ok in oks)
    expiries = [ok["expiresAt"] for ok in oks]
    assert expiries == sorted(expiries)
    # Every in-band refresh carried the previous answer's refresh token, and a retry key.
    refreshes = trace.sent("refresh")
    assert len(refreshes) == len(oks) - 1
    minted = [ok["tokens"]["refreshToken"] for ok in oks[1:]]
    assert [r["refreshToken"] for r in refreshes[1:]] == minted[:-1]
    assert all(16 <= len(r["retryKey"]) <= 128 for r in refreshes)
    versions = [f["authVersion"] for f in trace.sent("authenticate") + refreshes]
    assert versions == sorted(set(versions))


async def test_renewal_timer_renews_on_time_when_no_expiry_push_comes(
    server_factory: ServerFactory,
) -> None:
    # TETHER_EXPIRY_NOTICE=0: the server would push auth_expiring only at exp itself, too late
    # for a gapless renewal. The client's own timer (exp − lifetime/4, skew-corrected) must act.
    server = server_factory(env={**FAST_EXPIRY, "TETHER_EXPIRY_NOTICE": "0"})
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    trace, recorder = Trace(), Recorder()
    async with TetherClient(
        server.ws_url, email=email, password=PASSWORD, trace=trace, on_auth_state=recorder.on_auth
    ) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            mark = len(recorder.auth)
            await asyncio.sleep(4.5)  # over two lifetimes
            await assert_no_value(sub)
            assert await client.query("whoami") == user
    assert recorder.auth[mark:] == []
    assert trace.received("auth_expiring") == []  # every renewal came before exp
    assert trace.received("auth_expired") == []
    assert len(trace.sent("refresh")) >= 2


async def test_fetch_token_callback_is_asked_to_force_a_new_token_before_expiry(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env=FAST_EXPIRY)
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    api = AuthAPI(server.ws_url)
    calls: list[bool] = []

    async def fetch_token(force_refresh: bool) -> str | None:
        calls.append(force_refresh)
        return (await api.sign_in(email, PASSWORD)).access_token

    trace = Trace()
    async with TetherClient(server.ws_url, fetch_token=fetch_token, trace=trace) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            assert user is not None
            await asyncio.sleep(4.5)  # two lifetimes
            assert await client.query("whoami") == user
            await assert_no_value(sub)
    assert calls[0] is False and calls.count(True) >= 2
    assert trace.received("auth_expired") == [] and trace.received("auth_error") == []
    assert trace.sent("refresh") == []  # an outside provider: authenticate only


async def test_reauthenticate_takes_a_new_user_from_fetch_token(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    signed_in = asyncio.Event()

    async def fetch_token(force_refresh: bool) -> str | None:
        if not signed_in.is_set():
            return None  # the identity provider has no user yet
        return (await AuthAPI(server.ws_url).sign_in(email, PASSWORD)).access_token

    async with TetherClient(server.ws_url, fetch_token=fetch_token) as client:
        async with client.subscribe("whoami") as sub:
            assert await next_value(sub, 10) is None
            assert client.auth_status == AuthStatus(AuthState.ANONYMOUS)
            signed_in.set()
            status = await client.reauthenticate()
            assert status.state is AuthState.AUTHENTICATED
            assert await next_value(sub) == {"userId": status.user_id}


async def test_tokens_are_saved_before_they_are_spent(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(env=FAST_EXPIRY)
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    path = tmp_path / "session.json"
    store = FileTokenStore(path)
    await store.save(session)
    on_disk_when_spent: list[dict[str, Any]] = []

    def trace(direction: str, text: str) -> None:
        frame = json.loads(text)
        if direction == "send" and frame["type"] == "refresh":
            stored = json.loads(path.read_text())["session"]
            on_disk_when_spent.append({"frame": frame, "stored": stored})

    async with TetherClient(server.ws_url, token_store=store, trace=trace) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        await until(lambda: len(on_disk_when_spent) >= 3, 8, "three refreshes")
    for spent in on_disk_when_spent:
        # The token being spent, and its retry key, were on disk before the frame left.
        assert spent["stored"]["refresh_token"] == spent["frame"]["refreshToken"]
        assert spent["stored"]["retry_key"] == spent["frame"]["retryKey"]
    final = await store.load()
    assert final is not None and final.session_id == session.session_id


# ---------------------------------------------------------------------------------- failover


async def test_killing_one_of_two_servers_moves_the_client_to_the_other(
    server_factory: ServerFactory,
) -> None:
    a, b = server_factory(), server_factory()
    email = unique_email()
    await sign_up(a.ws_url, email, PASSWORD)
    trace, recorder = Trace(), Recorder()
    store = MemoryTokenStore()
    async with TetherClient(
        [a.ws_url, b.ws_url],
        email=email,
        password=PASSWORD,
        token_store=store,
        trace=trace,
        on_auth_state=recorder.on_auth,
        on_connection_state=recorder.on_connection,
    ) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            await asyncio.wait_for(client.wait_ready(), 5)
            assert client.connection_status.url == a.ws_url
            mark, auth_mark = len(trace.frames), len(recorder.auth)

            a.kill()  # SIGKILL: no close frame, no drain
            await recorder.wait_connection(
                lambda s: s.state is ConnectionState.CONNECTED and s.url == b.ws_url, 10
            )
            # On B: the same clientId, the identity first, then the same queryId again.
            after = [f for d, f in trace.frames[mark:] if d == "send"]
            kinds = [f["type"] for f in after]
            assert kinds[:3] == ["connect", "authenticate", "subscribe"], kinds
            assert after[0]["clientId"] == client.client_id
            assert after[2]["queryId"] == sub.query_id
            await until(
                lambda: any(
                    u == {"queryId": sub.query_id, "value": user}
                    for t in trace.received("transition", mark)
                    for u in t["updates"]
                ),
                5,
                "B's result for the resubscribed query",
            )
            assert await client.query("whoami") == user
            assert recorder.auth[auth_mark:] == []  # the user noticed nothing

            # The subscription is live on B: a sign-out reaches it. (The HTTP call fails
            # over to B as well: A is dead.)
            stored = await store.load()
            assert stored is not None
            await client.api.sign_out(stored.access_token)
            assert await next_value(sub) is None


async def test_mutation_in_flight_when_its_server_dies_is_applied_exactly_once(
    server_factory: ServerFactory,
) -> None:
    a, b = server_factory(), server_factory()
    email = unique_email()
    await sign_up(a.ws_url, email, PASSWORD)
    proxy = await Proxy(a.port).start()
    counter = f"c-{uuid.uuid4().hex[:8]}"
    trace = Trace()
    try:
        async with (
            TetherClient(
                [proxy.ws_url, b.ws_url],
                email=email,
                password=PASSWORD,
                trace=trace,
                options=quick_backoff(),
            ) as client,
            TetherClient(b.ws_url) as observer,
        ):
            assert await client.query("counter.get", name=counter) == 0
            async with observer.subscribe("counter.get", name=counter) as watched:
                assert await next_value(watched) == 0
                proxy.hold = True  # A runs the mutation; its answer is lost on the way
                mutation = asyncio.create_task(client.mutate("counter.increment", name=counter))
                assert await next_value(watched) == 1  # applied (seen through B)
                assert not mutation.done()
                a.kill()
                assert await asyncio.wait_for(mutation, 10) == 1  # the original outcome
                await asyncio.sleep(0.5)
                assert await client.query("counter.get", name=counter) == 1
                assert await observer.query("counter.get", name=counter) == 1
                await assert_no_value(watched)  # never 2, not even briefly
            sent = trace.sent("mutate")
            assert len(sent) == 2 and sent[0] == sent[1]  # replayed with its requestId
    finally:
        await proxy.close()


async def test_subscription_resumes_with_correct_values_after_failover(
    server_factory: ServerFactory,
) -> None:
    a, b = server_factory(), server_factory()
    counter = f"c-{uuid.uuid4().hex[:8]}"
    async with (
        TetherClient([a.ws_url, b.ws_url], options=quick_backoff()) as client,
        TetherClient(b.ws_url) as writer,
    ):
        async with client.subscribe("counter.get", name=counter) as sub:
            assert await next_value(sub) == 0
            await writer.mutate("counter.increment", name=counter)
            assert await next_value(sub) == 1
            a.kill()
            # Changes made while the client is between servers are not lost.
            await writer.mutate("counter.increment", name=counter, by=10)
            assert await next_value(sub, 10) == 11
            await writer.mutate("counter.increment", name=counter)
            assert await next_value(sub) == 12


async def test_sigterm_1012_reconnects_at_once_to_another_url(
    server_factory: ServerFactory,
) -> None:
    env = {"TETHER_DRAIN_TIMEOUT": "2"}
    a, b = server_factory(env=env), server_factory(env=env)
    email = unique_email()
    await sign_up(a.ws_url, email, PASSWORD)
    recorder = Recorder()
    # A slow backoff: only a reconnect that skips it can be fast.
    options = ClientOptions(backoff=Backoff(initial=8.0, maximum=8.0))
    async with TetherClient(
        [a.ws_url, b.ws_url],
        email=email,
        password=PASSWORD,
        options=options,
        on_connection_state=recorder.on_connection,
        on_auth_state=recorder.on_auth,
    ) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            await asyncio.wait_for(client.wait_ready(), 5)
            mark, auth_mark = len(recorder.connection), len(recorder.auth)
            stopping = asyncio.create_task(a.astop(signal.SIGTERM))
            closed = await recorder.wait_connection(
                lambda s: s.state is ConnectionState.RECONNECTING, 10, mark
            )
            closed_at = time.monotonic()
            assert recorder.connection[closed].close_code == 1012
            assert recorder.connection[closed].retry_in == 0.0
            await recorder.wait_connection(
                lambda s: s.state is ConnectionState.CONNECTED and s.url == b.ws_url, 5, closed
            )
            assert time.monotonic() - closed_at < 2.0
            assert await stopping == 0
            assert await client.query("whoami") == user
            assert recorder.auth[auth_mark:] == []


# ---------------------------------------------------------------------------------- heartbeat


async def test_pings_keep_a_quiet_connection_open_past_the_heartbeat_timeout(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={"TETHER_HEARTBEAT_TIMEOUT": "2"})
    trace, recorder = Trace(), Recorder()
    options = ClientOptions(ping_interval=0.5, pong_timeout=0.25)
    async with TetherClient(
        server.ws_url, trace=trace, options=options, on_connection_state=recorder.on_connection
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        mark = len(recorder.connection)
        await asyncio.sleep(5)  # idle: nothing but pings, for over twice the server's timeout
        assert recorder.connection[mark:] == []  # never closed (4009), never reconnected
        assert len(trace.sent("ping")) >= 8
        assert len(trace.received("pong")) >= 8


async def test_a_connection_whose_pings_go_unanswered_is_replaced(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    proxy = await Proxy(server.port).start()
    recorder = Recorder()
    options = ClientOptions(ping_interval=0.5, pong_timeout=0.25, backoff=Backoff(0.05, 0.05))
    try:
        async with TetherClient(
            [proxy.ws_url, server.ws_url],
            options=options,
            on_connection_state=recorder.on_connection,
        ) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
            mark = len(recorder.connection)
            proxy.hold = True  # the network eats everything from the server; TCP stays up
            lost = await recorder.wait_connection(
                lambda s: s.state is ConnectionState.RECONNECTING, 3, mark
            )
            assert recorder.connection[lost].close_code is None  # no close frame: a dead peer
            await recorder.wait_connection(
                lambda s: s.state is ConnectionState.CONNECTED and s.url == server.ws_url, 5, lost
            )
            assert await client.query("whoami") is None
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- close codes


async def test_rate_limit_close_4429_reconnects(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TETHER_MESSAGE_RATE": "20/10"})
    recorder = Recorder()
    async with TetherClient(
        server.ws_url, on_connection_state=recorder.on_connection, options=quick_backoff()
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        mark = len(recorder.connection)
        # Flood: past 20 messages in the window each one is refused, then the server closes.
        results = await asyncio.wait_for(
            asyncio.gather(*(client.ping() for _ in range(80)), return_exceptions=True), 10
        )
        assert any(isinstance(r, ConnectionError) for r in results)
        closed = await recorder.wait_connection(
            lambda s: s.state is ConnectionState.RECONNECTING, 5, mark
        )
        assert recorder.connection[closed].close_code == 4429
        await recorder.wait_connection(lambda s: s.state is ConnectionState.CONNECTED, 5, closed)
        assert await client.query("whoami") is None  # working again


async def test_unsupported_protocol_4503_stops_and_reports(server_factory: ServerFactory) -> None:
    server = server_factory()
    trace, recorder = Trace(), Recorder()
    async with TetherClient(
        server.ws_url,
        protocol=2,
        trace=trace,
        on_connection_state=recorder.on_connection,
        options=quick_backoff(),
    ) as client:
        with pytest.raises(ClientClosed) as closed:
            await asyncio.wait_for(client.query("whoami"), 10)
        assert closed.value.close_code == 4503
        assert client.connection_status.state is ConnectionState.STOPPED
        assert client.connection_status.close_code == 4503
        await asyncio.sleep(0.5)  # a reconnecting client would have tried again by now
        assert len(trace.sent("connect")) == 1
        with pytest.raises(ClientClosed):
            await client.mutate("counter.increment", name="x")
    assert [s.state for s in recorder.connection][-1] is ConnectionState.STOPPED


# ---------------------------------------------------------------------------------- sessions


async def test_sign_out_elsewhere_moves_the_client_to_signed_out(
    server_factory: ServerFactory,
) -> None:
    a, b = server_factory(), server_factory()
    session = await sign_up(a.ws_url, unique_email(), PASSWORD)
    store = MemoryTokenStore(session)
    async with TetherClient(b.ws_url, token_store=store) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        states: list[AuthStatus] = []

        async def watch() -> AuthStatus:
            async for status in client.auth_states():
                states.append(status)
                if status.state is AuthState.SIGNED_OUT:
                    return status
            raise AssertionError("the iterator ended")

        watcher = asyncio.create_task(watch())
        async with client.subscribe("whoami") as sub:
            assert await next_value(sub) == {"userId": session.user_id}
            # Another device signs the session out, through the other instance.
            await AuthAPI(a.ws_url).sign_out(session.access_token)
            final = await asyncio.wait_for(watcher, 5)
            assert final == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out")
            assert [s.state for s in states] == [AuthState.AUTHENTICATED, AuthState.SIGNED_OUT]
            assert await next_value(sub) is None
        for _ in range(500):  # the stored session is forgotten (in the background)
            if await store.load() is None:
                break
            await asyncio.sleep(0.01)
        assert await store.load() is None
        assert await client.query("whoami") is None


async def test_redis_outage_is_reported_retried_and_survived_without_sign_out(
    server_factory: ServerFactory, redis_proc: RedisProcess
) -> None:
    server = server_factory(env=FAST_EXPIRY)
    email = unique_email()
    await sign_up(server.ws_url, email, PASSWORD)
    trace, recorder = Trace(), Recorder()
    async with TetherClient(
        server.ws_url,
        email=email,
        password=PASSWORD,
        trace=trace,
        on_auth_state=recorder.on_auth,
    ) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            await asyncio.wait_for(client.wait_ready(), 5)
            mark = len(recorder.auth)

            redis_proc.stop()
            # The next renewal (within a second) fails with `unavailable`: reported, retried.
            # (AUTHENTICATED while the identity lasts, contract 1.1 §5 rule 2; REFRESHING once
            # it expired during the outage.)
            outage = await recorder.wait_auth(lambda s: s.reason == "unavailable", 5, mark)
            await asyncio.sleep(3)
            redis_proc.restart()
            await recorder.wait_auth(
                lambda s: s.state is AuthState.AUTHENTICATED and s.reason is None, 20, outage
            )
            assert await client.query("whoami") == user
            # The subscription may have been anonymous during the outage; it is the user again.
            await until(lambda: sub.latest == user, 5, "whoami back to the user")

    assert AuthState.SIGNED_OUT not in [s.state for s in recorder.auth]
    codes = {f["code"] for f in trace.received("auth_error")}
    assert codes == {"unavailable"}, codes
    assert len(trace.received("auth_error")) >= 2  # retried, not given up


async def test_two_processes_sharing_a_token_file_refresh_together_without_sign_out(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # No reuse window: presenting a rotated refresh token again ends the session at once, so
    # only the file lock keeps these two processes from spending the same token.
    env = {**FAST_EXPIRY, "TETHER_REFRESH_REUSE_WINDOW": "0"}
    a, b = server_factory(env=env), server_factory(env=env)
    session = await sign_up(a.ws_url, unique_email(), PASSWORD)
    token_file = tmp_path / "session.json"
    store = FileTokenStore(token_file)
    await store.save(session)

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    child_env["PYTHONUNBUFFERED"] = "1"
    command = [
        sys.executable,
        "-m",
        "tether.client",
        "watch",
        "whoami",
        "--token-file",
        str(token_file),
    ]
    watchers = [
        await asyncio.create_subprocess_exec(
            *command,
            "--url",
            url,
            cwd=REPO_ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for url in (a.ws_url, b.ws_url)
    ]
    try:
        # Four lifetimes of the shared token: both get auth_expiring at the same instant.
        await asyncio.sleep(8)
        for proc in watchers:
            proc.send_signal(signal.SIGTERM)
        outputs = [await asyncio.wait_for(proc.communicate(), 10) for proc in watchers]
    finally:
        for proc in watchers:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for proc, (out, err) in zip(watchers, outputs, strict=True):
        log = err.decode()
        assert proc.returncode == 0, log
        lines = out.decode().splitlines()
        assert lines == [json.dumps({"userId": session.user_id})], (lines, log)
        assert "signed_out" not in log and "refreshing" not in log, log

    # The session is alive: its current refresh token still rotates.
    final = await store.load()
    assert final is not None and final.session_id == session.session_id
    assert final.refresh_token != session.refresh_token  # they did refresh
    renewed = await AuthAPI(a.ws_url).refresh(final.refresh_token, final.retry_key)
    assert renewed.session_id == session.session_id


# ---------------------------------------------------------------------------------- CLI


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> Any:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tether.client", *args],
        cwd=REPO_ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_cli_login_call_and_watch(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory()
    token_file = str(tmp_path / "cli" / "session.json")
    email = unique_email()
    common = ("--url", server.ws_url, "--token-file", token_file)

    login = await asyncio.to_thread(
        run_cli, "login", "--signup", "--email", email, *common, env={"TETHER_PASSWORD": PASSWORD}
    )
    assert login.returncode == 0, login.stderr
    assert "signed in as" in login.stdout
    stored = await FileTokenStore(token_file).load()
    assert stored is not None

    wrong = await asyncio.to_thread(
        run_cli, "login", "--email", email, *common, env={"TETHER_PASSWORD": "wrong password"}
    )
    assert wrong.returncode == 1 and "invalid_credentials" in wrong.stderr

    call = await asyncio.to_thread(run_cli, "call", "no.such", *common)
    assert call.returncode == 1 and "unknown_function" in call.stderr
    bad = await asyncio.to_thread(run_cli, "call", "counter.increment", "--args", "[1]", *common)
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    send = await asyncio.to_thread(
        run_cli, "call", "messages.send", "--args", '{"channel": "c", "body": ""}', *common
    )
    # The user is signed in (from the token file): the body is checked, not the caller.
    assert send.returncode == 1 and "invalid" in send.stderr, send.stderr

    watch = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tether.client", "watch", "whoami", *common),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watch.stdout is not None
        line = await asyncio.wait_for(watch.stdout.readline(), 15)
        assert json.loads(line) == {"userId": stored.user_id}
        watch.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(watch.communicate(), 10)
        assert watch.returncode == 0, err.decode()
        assert f"auth: authenticated as {stored.user_id}" in err.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            watch.kill()


def test_cli_commands_register_on_a_tether_parser() -> None:
    import argparse

    from tether.client.cli import add_client_commands

    parser = argparse.ArgumentParser(prog="tether")
    commands = parser.add_subparsers(dest="command", required=True)
    add_client_commands(commands)
    args = parser.parse_args(["watch", "counter.get", "--args", '{"name": "a"}'])
    assert (args.command, args.name, args.function_args) == (
        "watch",
        "counter.get",
        '{"name": "a"}',
    )
    assert args.url is None and str(args.token_file).endswith("session.json")
    assert callable(args.run)
    args = parser.parse_args(["call", "x", "--url", "ws://h1/sync", "--url", "ws://h2/sync"])
    assert args.url == ["ws://h1/sync", "ws://h2/sync"]
    assert parser.parse_args(["login", "--email", "e@x.io"]).email == "e@x.io"


# ---------------------------------------------------------------------------------- docs


def runnable_examples() -> list[str]:
    """The Python blocks of ``docs/client.md`` marked ``<!-- runnable -->``."""
    text = (REPO_ROOT / "docs" / "client.md").read_text()
    blocks = []
    for part in text.split("<!-- runnable -->")[1:]:
        body = part.split("```python\n", 1)[1].split("\n```", 1)[0]
        blocks.append(body + "\n")
    return blocks


@pytest.mark.parametrize("index", range(len(runnable_examples())))
async def test_docs_examples_run(server_factory: ServerFactory, index: int) -> None:
    source = runnable_examples()[index]
    if "ws://127.0.0.1:8000/sync" in source:
        source = source.replace("ws://127.0.0.1:8000/sync", server_factory().ws_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        source,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.strip(), "the example printed nothing"


# ---------------------------------------------------------------------------------- proxies


class ConnectProxy:
    """An HTTP proxy that only does ``CONNECT`` (what ``websockets`` asks of one): a real TCP
    relay on a free port, recording the targets it was asked for."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_the_environments_proxy_is_used_and_read_once_per_url(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.client import connection as client_connection

    server = server_factory()
    proxy = ConnectProxy()
    proxy_url = await proxy.start()
    monkeypatch.setenv("ws_proxy", proxy_url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client_connection._proxy_for.cache_clear()
    target = server.ws_url.split("//", 1)[1].split("/", 1)[0]
    try:
        async with TetherClient(server.ws_url) as client:
            assert await client.query("whoami") is None
        assert proxy.targets == [target]  # through the proxy the environment names
        # Read once per URL: a second client (or a reconnect) does not read it again.
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        async with TetherClient(server.ws_url) as client:
            assert await client.query("whoami") is None
        assert proxy.targets == [target, target]
        # A process that starts with no_proxy for the host goes direct.
        client_connection._proxy_for.cache_clear()
        async with TetherClient(server.ws_url) as client:
            assert await client.query("whoami") is None
        assert proxy.targets == [target, target]
    finally:
        client_connection._proxy_for.cache_clear()
        await proxy.aclose()
