"""The Python client under the faults of issue 11, end to end: real server processes, a real
``redis-server``, real sockets (a TCP forwarder in this process cuts or holds them).

Each test provokes one fault for real and checks what the application sees:

* Redis down during a ``mutate``: no error, the right value once Redis is back, applied once
  (contract 1.1 §5 rule 3);
* a ``mutate`` timeout: ``OutcomeUnknown`` with its ``request_id``; re-sending that id applies
  it at most once (rule 3);
* a refresh while Redis is down keeps the identity and ``whoami`` (rule 2, client and server);
* a pending mutation is never sent under another user (rule 4);
* a reconnect pipelines ``connect``, ``authenticate``, subscriptions and mutations (rule 1);
* a connection lost during an in-band refresh leaves no unretrieved task exception (item 7);
* after the server ended the identity (a sign-out here or elsewhere, ``auth_expired``) and the
  client settled as anonymous, its mutations run as anonymous (the lapsed state is ended);
* subscriptions pipelined behind a refused auth request never show the anonymous result
  (a stale first token, a reconnect during a Redis outage), and a mutation issued meanwhile
  runs as the user;
* a retry of an ``OutcomeUnknown`` under another user is refused;
* an auth request that gets no answer replaces the connection.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import pytest
from tether import OutcomeUnknown
from tether.client import (
    AuthAPI,
    AuthState,
    Backoff,
    ClientOptions,
    ConnectionState,
    ConnectionStatus,
    MemoryTokenStore,
    MutationError,
    TetherClient,
    sign_up,
)

from tests.harness import RedisProcess
from tests.test_client import (
    FAST_EXPIRY,
    PASSWORD,
    Proxy,
    Recorder,
    ServerFactory,
    Trace,
    assert_no_value,
    next_value,
    quick_backoff,
    unique_email,
    until,
)

pytestmark = pytest.mark.timeout(60)


def counter_name() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------- rule 3


async def test_redis_down_during_a_mutate_is_retried_not_raised_and_applied_once(
    server_factory: ServerFactory, redis_proc: RedisProcess
) -> None:
    server = server_factory()
    name = counter_name()
    trace = Trace()
    async with TetherClient(server.ws_url, trace=trace) as client:
        assert await client.query("counter.get", name=name) == 0
        redis_proc.stop()
        mutation = asyncio.create_task(client.mutate("counter.increment", name=name))
        await until(
            lambda: any(
                r.get("error", {}).get("code") == "unavailable"
                for r in trace.received("mutation_result")
            ),
            15,
            "an 'unavailable' answer",
        )
        await asyncio.sleep(0.5)
        assert not mutation.done()  # not raised: re-sent, waiting for a definite answer
        redis_proc.restart()
        assert await asyncio.wait_for(mutation, 20) == 1
        assert await client.query("counter.get", name=name) == 1
    sent = trace.sent("mutate")
    assert len(sent) >= 2 and all(f == sent[0] for f in sent)  # one requestId throughout


async def test_a_timed_out_mutation_is_outcome_unknown_and_its_request_id_applies_it_once(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    proxy = await Proxy(server.port).start()
    name = counter_name()
    trace = Trace()
    try:
        async with (
            TetherClient(proxy.ws_url, trace=trace) as client,
            TetherClient(server.ws_url) as observer,
        ):
            assert await client.query("counter.get", name=name) == 0
            async with observer.subscribe("counter.get", name=name) as watched:
                assert await next_value(watched) == 0
                proxy.hold = True  # it runs and commits; its answer is lost
                with pytest.raises(OutcomeUnknown) as unknown:
                    await client.mutate("counter.increment", name=name, timeout=1.0)
                error = unknown.value
                assert not isinstance(error, MutationError)
                assert error.name == "counter.increment"
                assert error.user_id is None  # anonymous
                assert error.request_id == trace.sent("mutate")[0]["requestId"]
                assert "may or may not" in str(error) and "request_id=" in str(error)
                assert await next_value(watched) == 1  # it had been applied
                proxy.hold = False
                # Re-sent with its requestId: the original outcome, not a second increment.
                again = await client.mutate(
                    "counter.increment", request_id=error.request_id, name=name
                )
                assert again == 1
                assert (
                    await client.mutate("counter.increment", request_id=error.request_id, name=name)
                    == 1
                )
                await assert_no_value(watched, 0.3)  # never 2
                # A new mutation takes a new id.
                assert await client.mutate("counter.increment", name=name) == 2
            ids = [f["requestId"] for f in trace.sent("mutate")]
            assert ids[:3] == [error.request_id] * 3 and ids[3] != error.request_id
    finally:
        await proxy.close()


async def test_mutate_with_the_request_id_of_a_pending_mutation_awaits_that_one(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    proxy = await Proxy(server.port).start()
    name = counter_name()
    trace = Trace()
    try:
        async with TetherClient(proxy.ws_url, trace=trace) as client:
            await client.wait_ready()
            proxy.hold = True
            first = asyncio.create_task(client.mutate("counter.increment", name=name))
            await until(lambda: len(trace.sent("mutate")) == 1, 5, "sent")
            request_id = trace.sent("mutate")[0]["requestId"]
            second = asyncio.create_task(
                client.mutate("counter.increment", request_id=request_id, name=name)
            )
            await asyncio.sleep(0.2)
            proxy.drop()  # the answer is lost with the connection: re-sent once, for both
            assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [1, 1]
            assert await client.query("counter.get", name=name) == 1
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- rule 2


async def test_a_refresh_while_redis_is_down_keeps_the_identity_and_whoami(
    server_factory: ServerFactory, redis_proc: RedisProcess
) -> None:
    # Six-second tokens, `auth_expiring` three seconds before exp: Redis is down from before
    # that push until well after it, and back before exp.
    server = server_factory(
        env={"TETHER_ACCESS_TTL": "6", "TETHER_EXPIRY_NOTICE": "3", "TETHER_CLOCK_LEEWAY": "1"}
    )
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    trace, recorder = Trace(), Recorder()
    async with TetherClient(
        server.ws_url,
        token_store=MemoryTokenStore(session),
        trace=trace,
        on_auth_state=recorder.on_auth,
    ) as client:
        async with client.subscribe("whoami") as sub:
            user = await next_value(sub, 10)
            assert user == {"userId": session.user_id}
            redis_proc.stop()
            await until(lambda: bool(trace.received("auth_error")), 10, "a refused refresh")
            assert {f["code"] for f in trace.received("auth_error")} == {"unavailable"}
            # The trace sees the frame before the client has acted on it.
            await until(
                lambda: client.auth_status.reason == "unavailable", 5, "the status to say so"
            )
            assert client.auth_status.state is AuthState.AUTHENTICATED
            await asyncio.sleep(0.5)
            redis_proc.restart()
            await recorder.wait_auth(
                lambda s: s.state is AuthState.AUTHENTICATED and s.reason is None, 10
            )
            await assert_no_value(sub, 0.3)  # whoami never went blank
            assert sub.latest == user
            assert await client.query("whoami") == user
    assert all(s.state is AuthState.AUTHENTICATED for s in recorder.auth), recorder.auth
    assert not trace.received("auth_expired")


# ---------------------------------------------------------------------------------- rule 4


async def test_a_pending_mutation_is_not_sent_under_the_next_user(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    api = AuthAPI(server.ws_url)
    alice, bob = unique_email(), unique_email()
    await api.sign_up(alice, PASSWORD)
    await api.sign_up(bob, PASSWORD)
    proxy = await Proxy(server.port).start()
    who = {"email": alice}

    async def fetch_token(force_refresh: bool) -> str | None:
        return (await api.sign_in(who["email"], PASSWORD)).access_token

    try:
        async with TetherClient(
            proxy.ws_url, fetch_token=fetch_token, options=quick_backoff()
        ) as client:
            await client.wait_ready()
            assert client.auth_status.state is AuthState.AUTHENTICATED
            # Offline: the mutation waits, issued under Alice.
            proxy.refuse = True
            proxy.drop()
            await until(lambda: not client._ready.is_set(), 5, "offline")
            note = asyncio.create_task(client.mutate("notes.add", text="alice's note"))
            await asyncio.sleep(0.2)
            # The identity provider now has Bob; the client reconnects as Bob.
            who["email"] = bob
            proxy.refuse = False
            with pytest.raises(MutationError) as failed:
                await asyncio.wait_for(note, 10)
            assert failed.value.code == "unauthenticated"
            assert await client.query("notes.mine") == []  # not added as Bob
        async with TetherClient(server.ws_url, email=alice, password=PASSWORD) as as_alice:
            assert await as_alice.query("notes.mine") == []  # nor as Alice: never sent
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- rule 1


async def test_a_reconnect_pipelines_auth_and_subscriptions_then_resends_mutations(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    proxy = await Proxy(server.port).start()
    name = counter_name()
    trace = Trace()
    try:
        async with TetherClient(
            proxy.ws_url,
            token_store=MemoryTokenStore(session),
            trace=trace,
            options=quick_backoff(),
        ) as client:
            async with client.subscribe("counter.get", name=name) as counter:
                assert await next_value(counter, 10) == 0
                async with client.subscribe("whoami") as whoami:
                    assert await next_value(whoami) == {"userId": session.user_id}
                    proxy.hold = True
                    mutation = asyncio.create_task(client.mutate("counter.increment", name=name))
                    await asyncio.sleep(0.3)
                    mark = len(trace.frames)
                    proxy.drop()
                    assert await asyncio.wait_for(mutation, 10) == 1
                    assert await next_value(counter) == 1  # read your writes (rule 5)
        after = trace.frames[mark:]
        first_received = next(i for i, (d, _) in enumerate(after) if d == "recv")
        kinds = [f["type"] for d, f in after[:first_received] if d == "send"]
        # The auth request and the subscriptions went out before the server said anything on
        # the new connection; the re-sent mutation only once auth_ok confirmed its user.
        assert kinds == ["connect", "authenticate", "subscribe", "subscribe"], kinds
        assert after[first_received][1]["type"] == "connected"
        auth_ok = next(
            i for i, (d, f) in enumerate(after) if d == "recv" and f["type"] == "auth_ok"
        )
        resent = next(i for i, (d, f) in enumerate(after) if d == "send" and f["type"] == "mutate")
        assert auth_ok < resent, after
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- item 7


async def test_a_connection_lost_during_an_in_band_refresh_leaves_no_unretrieved_exception(
    server_factory: ServerFactory,
) -> None:
    fast = {
        "TETHER_ACCESS_TTL": "2",
        "TETHER_EXPIRY_NOTICE": "1",
        "TETHER_CLOCK_LEEWAY": "1",
        "TETHER_AUTH_RATE": "200/60",
    }
    server = server_factory(env=fast)
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    proxy = await Proxy(server.port).start()
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    cut = asyncio.Event()

    def on_frame(direction: str, text: str) -> None:
        trace(direction, text)
        if direction == "send" and '"type":"refresh"' in text and not cut.is_set():
            cut.set()
            proxy.hold = True  # the refresh's answer never arrives ...
            loop.call_later(0.2, proxy.drop)  # ... and the connection drops while it waits

    trace = Trace()
    try:
        async with TetherClient(
            proxy.ws_url,
            token_store=MemoryTokenStore(session),
            trace=on_frame,
            options=quick_backoff(),
        ) as client:
            await client.wait_ready()
            await asyncio.wait_for(cut.wait(), 10)
            await until(lambda: len(trace.sent("connect")) >= 2, 10, "reconnected")
            await asyncio.wait_for(client.wait_ready(), 10)
            assert await client.query("whoami") == {"userId": session.user_id}
            for _ in range(3):
                gc.collect()
                await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)
        await proxy.close()
    gc.collect()
    messages = [str(c.get("message")) + " " + repr(c.get("exception")) for c in unhandled]
    assert messages == [], messages


# ---------------------------------------------------------------------------------- lapsed


class SlowToForget(MemoryTokenStore):
    """Clears the session only once ``ready`` is set: lets the server's push win the race."""

    def __init__(self, session: Any, ready: asyncio.Event) -> None:
        super().__init__(session)
        self.ready = ready

    async def save(self, session: Any) -> None:
        if session is None:
            await asyncio.wait_for(self.ready.wait(), 5)
        await super().save(session)


async def test_after_sign_out_an_anonymous_mutation_runs_though_the_push_came_first(
    server_factory: ServerFactory,
) -> None:
    """sign_out: the session_revoked push arrives before the client turns anonymous. The server
    is then lapsed (it answers every mutate `unauthenticated`) until the client says
    `authenticate {token: null}`; the client must say it."""
    server = server_factory()
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    revoked = asyncio.Event()
    trace = Trace()

    def on_frame(direction: str, text: str) -> None:
        trace(direction, text)
        if direction == "recv" and '"type":"session_revoked"' in text:
            revoked.set()

    name = counter_name()
    async with TetherClient(
        server.ws_url, token_store=SlowToForget(session, revoked), trace=on_frame
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        await client.sign_out()
        assert trace.received("session_revoked")
        assert client.auth_status.state is AuthState.SIGNED_OUT
        assert await asyncio.wait_for(client.mutate("counter.increment", name=name), 10) == 1
        assert await client.query("whoami") is None
    anonymous = [f for f in trace.sent("authenticate") if f["token"] is None]
    assert len(anonymous) == 1, trace.sent("authenticate")


async def test_after_a_sign_out_elsewhere_an_anonymous_mutation_runs(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    recorder = Recorder()
    name = counter_name()
    async with TetherClient(
        server.ws_url, token_store=MemoryTokenStore(session), on_auth_state=recorder.on_auth
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        await AuthAPI(server.ws_url).sign_out(session.access_token)  # another device
        await recorder.wait_auth(lambda s: s.state is AuthState.SIGNED_OUT, 5)
        assert await asyncio.wait_for(client.mutate("counter.increment", name=name), 10) == 1


async def test_fetch_token_without_a_user_after_auth_expired_then_mutations_run_anonymous(
    server_factory: ServerFactory,
) -> None:
    """The renewal's fetch_token takes past the token's expiry (auth_expired: lapsed), then
    says there is no user any more: the client settles as anonymous, and its mutations run."""
    server = server_factory(env=FAST_EXPIRY)
    api = AuthAPI(server.ws_url)
    email = unique_email()
    await api.sign_up(email, PASSWORD)
    trace, recorder = Trace(), Recorder()
    calls = 0

    async def fetch_token(force_refresh: bool) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            return (await api.sign_in(email, PASSWORD)).access_token
        await asyncio.sleep(3.5)  # past exp + leeway
        return None

    name = counter_name()
    async with TetherClient(
        server.ws_url, fetch_token=fetch_token, trace=trace, on_auth_state=recorder.on_auth
    ) as client:
        await asyncio.wait_for(client.wait_ready(), 10)
        await until(lambda: bool(trace.received("auth_expired")), 10, "auth_expired")
        await recorder.wait_auth(lambda s: s.state is AuthState.ANONYMOUS, 10)
        assert await asyncio.wait_for(client.mutate("counter.increment", name=name), 10) == 1


# ---------------------------------------------------------------------------------- pipelined


class FixedBackoff(Backoff):
    """No jitter: every wait is the ceiling."""

    def delay(self, attempt: int, rand: float) -> float:
        return self.ceiling(attempt)


def broken(token: str) -> str:
    """The same claims (its user), a signature that does not verify: ``invalid_token``."""
    head, claims, signature = token.split(".")
    return f"{head}.{claims}.{signature[::-1]}"


async def test_a_refused_first_token_shows_no_anonymous_result_and_runs_no_anonymous_write(
    server_factory: ServerFactory,
) -> None:
    """fetch_token's first token is refused; the client asks for a new one (which takes a
    while). The subscription pipelined behind the refused token ran as anonymous: its result
    never reaches the application. A mutation issued while signing in waits for the user."""
    server = server_factory()
    api = AuthAPI(server.ws_url)
    email = unique_email()
    session = await api.sign_up(email, PASSWORD)
    calls = 0

    async def fetch_token(force_refresh: bool) -> str | None:
        nonlocal calls
        calls += 1
        token = (await api.sign_in(email, PASSWORD)).access_token
        if calls == 1:
            return broken(token)
        await asyncio.sleep(0.5)  # the gap: the first token refused, no other one yet
        return token

    trace = Trace()
    async with TetherClient(server.ws_url, fetch_token=fetch_token, trace=trace) as client:
        async with client.subscribe("whoami") as whoami:
            note = asyncio.create_task(client.mutate("notes.add", text="mine"))
            assert await next_value(whoami, 10) == {"userId": session.user_id}
            assert await asyncio.wait_for(note, 10)  # not `unauthenticated`: ran as the user
            await assert_no_value(whoami, 0.3)
            assert [n["text"] for n in await client.query("notes.mine")] == ["mine"]
    assert {f["code"] for f in trace.received("auth_error")} == {"invalid_token"}


async def test_a_reconnect_during_a_redis_outage_never_blanks_whoami(
    server_factory: ServerFactory, redis_proc: RedisProcess
) -> None:
    """The new connection's auth request is answered `unavailable` (no identity to keep on a
    new connection): the subscriptions pipelined behind it run anonymous once Redis is back,
    before the client's next attempt. The application must keep seeing the user, as rule 2
    promises on a live connection."""
    server = server_factory()
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    proxy = await Proxy(server.port).start()
    loop = asyncio.get_running_loop()
    trace = Trace()
    restarted: list[asyncio.Future[None]] = []

    def on_frame(direction: str, text: str) -> None:
        trace(direction, text)
        if direction == "recv" and '"code":"unavailable"' in text and not restarted:
            # Redis is back just after the refusal: the server runs the held subscription.
            restarted.append(loop.run_in_executor(None, redis_proc.restart))

    # The next attempt comes 1.5 s after the refusal, not at a random time.
    options = ClientOptions(backoff=FixedBackoff(initial=1.5, maximum=1.5))
    try:
        async with TetherClient(
            proxy.ws_url, token_store=MemoryTokenStore(session), trace=on_frame, options=options
        ) as client:
            async with client.subscribe("whoami") as whoami:
                user = await next_value(whoami, 10)
                assert user == {"userId": session.user_id}
                redis_proc.stop()
                mark = len(trace.frames)
                proxy.drop()
                await until(lambda: bool(restarted), 15, "an unavailable")
                await restarted[0]
                await until(lambda: bool(trace.received("auth_ok", mark)), 20, "auth_ok")
                await asyncio.wait_for(client.wait_ready(), 10)
                assert await client.query("whoami") == user
                await assert_no_value(whoami, 0.3)  # never null, never repeated
                assert whoami.latest == user
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- rule 4


async def test_a_retry_of_an_unknown_outcome_under_another_user_is_refused(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    proxy = await Proxy(server.port).start()
    try:
        async with TetherClient(
            proxy.ws_url, token_store=MemoryTokenStore(session), options=quick_backoff()
        ) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
            proxy.hold = True  # it runs as the user; its answer is lost
            with pytest.raises(OutcomeUnknown) as unknown:
                await client.mutate("notes.add", text="once", timeout=1.0)
            assert unknown.value.user_id == session.user_id
            proxy.drop()
            await asyncio.wait_for(client.wait_ready(), 10)
            await client.sign_out()
            with pytest.raises(MutationError) as refused:
                await asyncio.wait_for(
                    client.mutate("notes.add", request_id=unknown.value.request_id, text="once"),
                    5,
                )
            assert refused.value.code == "unauthenticated"
    finally:
        await proxy.close()


# ---------------------------------------------------------------------------------- auth timeout


async def test_an_auth_request_without_an_answer_replaces_the_connection(
    server_factory: ServerFactory,
) -> None:
    """The server never answers a refresh (a frame dropped by a server bug): everything sent
    after it would wait behind it. The client gives up on the connection after auth_timeout."""
    server = server_factory(env=FAST_EXPIRY)
    session = await sign_up(server.ws_url, unique_email(), PASSWORD)
    proxy = await Proxy(server.port).start()
    trace = Trace()

    def on_frame(direction: str, text: str) -> None:
        trace(direction, text)
        if direction == "send" and '"type":"refresh"' in text and len(trace.sent("connect")) == 1:
            proxy.hold = True  # no answer, nor anything else, on this connection

    def on_connection(status: ConnectionStatus) -> None:
        if status.state is ConnectionState.RECONNECTING:
            proxy.hold = False  # the client dropped the connection: let the next one through

    options = ClientOptions(backoff=Backoff(0.05, 0.05), auth_timeout=1.0)
    try:
        async with TetherClient(
            proxy.ws_url,
            token_store=MemoryTokenStore(session),
            trace=on_frame,
            on_connection_state=on_connection,
            options=options,
        ) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
            await until(lambda: proxy.hold, 10, "a refresh held")
            await until(lambda: len(trace.sent("connect")) == 2, 4, "a new connection")
            await asyncio.wait_for(client.wait_ready(), 10)
            assert await client.query("whoami") == {"userId": session.user_id}
    finally:
        await proxy.close()
