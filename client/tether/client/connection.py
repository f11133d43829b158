"""The I/O shell of the client: :class:`TetherClient` and :class:`Subscription`.

:class:`TetherClient` owns one ``/sync`` connection at a time and everything around it, in one
place: the socket's reader and writer, the heartbeat, the auth keep-alive, reconnecting. The
protocol state lives in :class:`~tether.client.core.ClientCore` and the auth policy in
:class:`~tether.client.auth.AuthCore` (both pure); this module moves frames between them and the
socket, carries out the auth core's commands (store, HTTP, ``fetch_token``) and runs the timers.

Tasks, per client::

    _run                  connects, serves one connection, plans the next (Reconnector)
      └─ per connection:  _read (socket → core → events), _write (core → socket),
                          _heartbeat (ping every ~25 s, abort a silent socket),
                          _lifecycle (await `connected`, settle the identity, then keep it
                          alive until the connection ends)

Every auth operation (:meth:`TetherClient._authenticate_once`) runs in its own task, shielded
from the connection's end, and under one lock: a refresh whose answer is already on its way
still saves the new refresh token if the socket dies meanwhile, and two operations never
interleave their ``authenticate``/``refresh`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from types import TracebackType
from typing import Any, Generic, TypeAlias, TypeVar

import websockets
from tether.client.auth import (
    AuthCore,
    CallFetchToken,
    Command,
    ForgetSession,
    LoadSession,
    Retry,
    SaveSession,
    ScheduleWake,
    SendAuthenticate,
    SendRefresh,
    Settled,
    SignIn,
    Source,
    Wants,
)
from tether.client.core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MUTATION_RETRY_BACKOFF,
    DEFAULT_RENEWAL_MARGIN,
    PROTOCOL_VERSION,
    AuthExpired,
    AuthExpiring,
    AuthFailed,
    AuthOk,
    AuthState,
    AuthStatus,
    Backoff,
    ClientCore,
    Connected,
    ConnectionState,
    ConnectionStatus,
    Event,
    MutationDeferred,
    MutationDone,
    Phase,
    Pong,
    Principal,
    QueryRejected,
    QueryUpdate,
    Reconnector,
    ServerError,
    SessionRevoked,
    Unrecognized,
    User,
    token_subject,
)
from tether.client.errors import (
    AuthError,
    ClientClosed,
    MutationError,
    OutcomeUnknown,
    QueryError,
)
from tether.client.http_auth import AuthAPI
from tether.client.token_store import MemoryTokenStore, StoredSession, TokenStore
from websockets.asyncio.client import ClientConnection
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

log = logging.getLogger("tether.client")

#: ``fetch_token(force_refresh)`` → an access token, or ``None`` for "no user". May be a plain
#: function or a coroutine function.
FetchToken: TypeAlias = Callable[[bool], "str | Awaitable[str | None] | None"]
#: ``trace(direction, frame)``: ``direction`` is ``"send"`` or ``"recv"``, ``frame`` JSON text.
Trace: TypeAlias = Callable[[str, str], None]

T = TypeVar("T")


@lru_cache(maxsize=256)
def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``websockets``' own rules: ``*_proxy`` and
    ``no_proxy``), or ``None``. Read once per URL per process: ``websockets`` walks the whole
    environment on every connect otherwise, a tenth of a reconnect's CPU in a storm."""
    return get_proxy(parse_uri(url))


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Tuning of a :class:`TetherClient`; the defaults suit the server's defaults."""

    #: Seconds between ``ping`` frames. The server closes a silent client with 4009 after
    #: ``TETHER_HEARTBEAT_TIMEOUT`` (75 s), so three pings fit in its window.
    ping_interval: float = 25.0
    #: A connection on which nothing at all arrived within this many seconds of a ``ping`` is
    #: taken for dead and replaced (the ping goes out ``pong_timeout`` earlier, so pings stay
    #: ``ping_interval`` apart).
    pong_timeout: float = 10.0
    #: Seconds for the TCP + WebSocket handshake, and again for the answer to ``connect``.
    open_timeout: float = 10.0
    #: Reconnect backoff (full jitter, 100 ms doubling to 16 s by default).
    backoff: Backoff = field(default_factory=Backoff)
    #: Seconds a connection must last for the backoff to start again from its first step.
    stable_after: float = 10.0
    #: Mutations without an outcome at once; more wait for a slot (the server's default
    #: ``TETHER_MAX_PENDING_MUTATIONS`` is 64).
    max_pending_mutations: int = 64
    #: Values a subscription buffers for a slow reader; past it the oldest are dropped (values
    #: are states: the newest is always kept).
    max_buffered_values: int = 256
    #: Largest frame the client sends (the server's ``TETHER_MAX_MESSAGE_BYTES``).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Largest frame the client accepts (results are up to ``TETHER_MAX_RESULT_BYTES``).
    max_frame_bytes: int = 16 * 1024 * 1024
    #: Renew an access token at the latest this many seconds before ``exp`` (or a quarter of
    #: its lifetime), if the server's ``auth_expiring`` push did not come first.
    renewal_margin: float = DEFAULT_RENEWAL_MARGIN
    #: Seconds one HTTP auth request may take.
    http_timeout: float = 10.0
    #: Seconds an ``authenticate``/``refresh`` may wait for its answer before the connection is
    #: taken for broken and replaced (the server holds everything sent after it until it is
    #: answered, and answers within its Redis timeouts, a few seconds, even during an outage).
    auth_timeout: float = 30.0
    #: Seconds a ``mutate`` waits for a definite answer before it raises
    #: :class:`~tether.client.errors.OutcomeUnknown` (``None``: no limit; a call's own
    #: ``timeout=`` wins).
    mutation_timeout: float | None = None
    #: Backoff between re-sends of a mutation answered ``unavailable`` (outcome unknown) or
    #: dropped as ``rate_limited`` (full jitter, 100 ms doubling to 5 s by default).
    mutation_retry_backoff: Backoff = DEFAULT_MUTATION_RETRY_BACKOFF


class _Outcome(enum.Enum):
    DONE = "done"  # the identity is settled: authenticated, anonymous or signed out
    RETRY = "retry"  # a passing failure: try again after a backoff


class _ConnectionLost(Exception):
    """The connection an auth operation used is gone; the next connection starts over."""


@dataclass(slots=True)
class _PendingMutation:
    """A mutation without an outcome, and how many ``mutate`` calls await it."""

    name: str
    future: asyncio.Future[MutationDone]
    waiters: int = 0


_END = object()


class _Watch(Generic[T]):
    """One reader of a stream of states: bounded, keeps the newest."""

    def __init__(self, first: T, maxlen: int = 64) -> None:
        self.items: deque[object] = deque([first], maxlen=maxlen)
        self.event = asyncio.Event()
        self.event.set()

    def push(self, item: object) -> None:
        self.items.append(item)
        self.event.set()

    async def next(self) -> T | None:
        while not self.items:
            self.event.clear()
            await self.event.wait()
        item = self.items.popleft()
        return None if item is _END else item  # type: ignore[return-value]


# --------------------------------------------------------------------------------- subscription


class Subscription:
    """A live query: ``async with client.subscribe(name, **args) as sub`` then
    ``async for value in sub``.

    Iteration yields each new value of the query, starting with the current one; a value equal
    to the previous one (as after a reconnect) is not repeated. When the query's result is an
    error, ``__anext__`` raises :class:`~tether.client.errors.QueryError` with its code; the
    subscription stays live, so iterating again continues with later results. If the server
    refused the subscription itself (``unknown_function``, ``bad_args``) the error is final.
    When the client stops, iteration raises :class:`~tether.client.errors.ClientClosed`; after
    :meth:`close`, iteration ends.
    """

    def __init__(self, client: TetherClient, name: str, args: dict[str, Any]) -> None:
        self._client = client
        self.name = name
        self.args = args
        #: The client's id of the subscription, once started: its ``queryId`` on the wire,
        #: unless a refused auth request moved it to a new one (see ``tether.client.core``).
        self.query_id: int | None = None
        self._items: deque[tuple[Any, QueryError | None]] = deque(
            maxlen=client.options.max_buffered_values
        )
        self._event = asyncio.Event()
        self._last: tuple[Any, QueryError | None] | None = None
        self._end: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Subscription:
        """Send the subscription (now, or once connected). Idempotent."""
        if self.query_id is None and self._end is None:
            self.query_id = self._client._register(self)
        return self

    async def close(self) -> None:
        """Unsubscribe; iteration ends. Idempotent."""
        if self.query_id is not None:
            self._client._unregister(self.query_id)
        self._finish(StopAsyncIteration())

    async def __aenter__(self) -> Subscription:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ values

    @property
    def latest(self) -> Any:
        """The newest value received (``None`` before the first, or after an error)."""
        return None if self._last is None or self._last[1] is not None else self._last[0]

    def __aiter__(self) -> Subscription:
        return self.start()

    async def __anext__(self) -> Any:
        while True:
            if self._items:
                value, error = self._items.popleft()
                if error is not None:
                    raise error
                return value
            if self._end is not None:
                if isinstance(self._end, StopAsyncIteration):
                    raise StopAsyncIteration
                raise self._end
            self._event.clear()
            await self._event.wait()

    # ------------------------------------------------------------------ from the client

    def _push(self, value: Any, error: QueryError | None) -> None:
        item = (value, error)
        if self._last is not None and _same_item(self._last, item):
            return
        self._last = item
        self._items.append(item)
        self._event.set()

    def _finish(self, end: BaseException) -> None:
        if self._end is None:
            self._end = end
        self._event.set()


def _same_item(a: tuple[Any, QueryError | None], b: tuple[Any, QueryError | None]) -> bool:
    if a[1] is not None or b[1] is not None:
        return (
            a[1] is not None
            and b[1] is not None
            and (a[1].code, a[1].message) == (b[1].code, b[1].message)
        )
    return bool(a[0] == b[0]) and type(a[0]) is type(b[0])


# --------------------------------------------------------------------------------- client


class TetherClient:
    """A Tether client: one ``/sync`` connection, kept alive, with its session.

    ``url`` is the server's ``/sync`` URL, or a list of them to fail over between (the
    instances of one deployment). The HTTP auth API is found at the same hosts, or at
    ``http_url``.

    Authentication, one source per client (none: anonymous):

    * ``email`` and ``password``: signs in over HTTP when ``token_store`` holds no session,
      then keeps the session in ``token_store`` (default: in memory);
    * ``token_store`` alone: the session stored there (see :mod:`tether.client.token_store`);
    * ``fetch_token(force_refresh)``: an outside identity provider's access tokens.

    Use it as an async context manager; operations wait while the client (re)connects::

        async with TetherClient("ws://127.0.0.1:8000/sync", email=..., password=...) as c:
            print(await c.query("whoami"))
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        http_url: str | Sequence[str] | None = None,
        email: str | None = None,
        password: str | None = None,
        token_store: TokenStore | None = None,
        fetch_token: FetchToken | None = None,
        client_id: str | None = None,
        protocol: int = PROTOCOL_VERSION,
        on_auth_state: Callable[[AuthStatus], None] | None = None,
        on_connection_state: Callable[[ConnectionStatus], None] | None = None,
        trace: Trace | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one URL is needed")
        for u in self.urls:
            try:
                parse_uri(u)
            except websockets.InvalidURI as exc:
                raise ValueError(f"not a ws:// or wss:// URL: {u!r}") from exc
        if (email is None) != (password is None):
            raise ValueError("email and password go together")
        if fetch_token is not None and (email is not None or token_store is not None):
            raise ValueError("fetch_token cannot be combined with email/password or token_store")
        self.options = options if options is not None else ClientOptions()
        self.client_id = client_id if client_id is not None else secrets.token_urlsafe(16)
        self.api = AuthAPI(http_url if http_url is not None else self.urls)
        self._email, self._password = email, password
        self._fetch_token = fetch_token
        uses_store = email is not None or token_store is not None
        self._store: TokenStore | None = (
            (token_store if token_store is not None else MemoryTokenStore()) if uses_store else None
        )
        self._on_auth_state = on_auth_state
        self._on_connection_state = on_connection_state
        self._trace = trace

        opts = self.options
        self._rand = random.Random()
        self._core = ClientCore(
            self.client_id,
            protocol=protocol,
            max_message_bytes=opts.max_message_bytes,
            clock=time.monotonic,
            rand=self._rand.random,
            retry_backoff=opts.mutation_retry_backoff,
        )
        self._reconnector = Reconnector(
            len(self.urls), opts.backoff, stable_after=opts.stable_after
        )

        # Session keeping: the policy is the pure AuthCore's; this shell carries out its
        # commands, with the wall clock read here only.
        self._clock: Callable[[], float] = time.time
        source = Source.FETCH if fetch_token is not None else Source.NONE
        self._auth = AuthCore(
            Source.STORE if uses_store else source,
            can_sign_in=email is not None,
            renewal_margin=opts.renewal_margin,
        )
        self._auth_status = self._auth.status
        self._connection_status = ConnectionStatus(ConnectionState.CONNECTING, self.urls[0])

        # Per connection.
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._established = False
        self._connected = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._renew = asyncio.Event()
        self._last_received = 0.0
        self._pongs: deque[asyncio.Future[float] | None] = deque(maxlen=1024)

        # Operations.
        self._subscriptions: dict[int, Subscription] = {}
        self._mutations: dict[int, _PendingMutation] = {}
        self._auth_waiters: dict[int, asyncio.Future[AuthOk | AuthFailed]] = {}
        self._mutation_slots = asyncio.Semaphore(opts.max_pending_mutations)
        self._auth_lock = asyncio.Lock()
        self._auth_tasks: set[asyncio.Task[_Outcome]] = set()
        self._ready = asyncio.Event()
        self._auth_watches: set[_Watch[AuthStatus]] = set()
        self._connection_watches: set[_Watch[ConnectionStatus]] = set()

        self._runner: asyncio.Task[None] | None = None
        self._closed: ClientClosed | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TetherClient:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (``async with`` does this). Idempotent."""
        if self._runner is None and self._closed is None:
            self._runner = asyncio.create_task(self._run(), name="tether-client")

    async def close(self) -> None:
        """Close the connection and stop; pending operations raise ``ClientClosed``.
        Idempotent."""
        self._stop(ClientClosed("the client was closed"))
        ws = self._ws
        if ws is not None:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # of the caller when the close ends in the same turn.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await ws.close()
        tasks: list[asyncio.Task[Any]] = list(self._auth_tasks)
        if self._runner is not None:
            tasks.append(self._runner)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait_ready(self) -> None:
        """Wait until connected with the identity settled; raises ``ClientClosed`` if the
        client stops. Bound the wait with ``asyncio.timeout``."""
        self.start()
        while not self._ready.is_set():
            self._check_open()
            await self._ready.wait()
        self._check_open()

    @property
    def auth_status(self) -> AuthStatus:
        """The current auth state."""
        return self._auth_status

    @property
    def connection_status(self) -> ConnectionStatus:
        """The current connection state."""
        return self._connection_status

    async def auth_states(self) -> AsyncIterator[AuthStatus]:
        """The current auth state, then every change, until the client closes.

        A reader that falls more than 64 changes behind loses the oldest ones.
        """
        watch = _Watch(self._auth_status)
        if self._closed is not None:
            watch.push(_END)
        self._auth_watches.add(watch)
        try:
            while (status := await watch.next()) is not None:
                yield status
        finally:
            self._auth_watches.discard(watch)

    async def connection_states(self) -> AsyncIterator[ConnectionStatus]:
        """The current connection state, then every change, until the client closes."""
        watch = _Watch(self._connection_status)
        if self._closed is not None:
            watch.push(_END)
        self._connection_watches.add(watch)
        try:
            while (status := await watch.next()) is not None:
                yield status
        finally:
            self._connection_watches.discard(watch)

    # ------------------------------------------------------------------ operations

    async def query(self, name: str, /, **args: Any) -> Any:
        """The current result of query ``name`` (subscribe, first value, unsubscribe).

        Raises :class:`~tether.client.errors.QueryError` with the result's error code.
        """
        async with self.subscribe(name, **args) as sub:
            return await sub.__anext__()

    def subscribe(self, name: str, /, **args: Any) -> Subscription:
        """A live query; see :class:`Subscription`. Nothing is sent until it is entered
        (``async with``) or iterated."""
        self._check_open()
        return Subscription(self, name, args)

    async def mutate(
        self,
        name: str,
        /,
        *,
        request_id: int | None = None,
        # A parameter, not only asyncio.timeout around the call: on expiry the client must stop
        # re-sending and report the requestId (OutcomeUnknown), which a cancellation cannot.
        timeout: float | None = None,  # noqa: ASYNC109
        **args: Any,
    ) -> Any:
        """Run mutation ``name`` with ``args`` exactly once; its result.

        Sent once connected, under the user the client is signed in as now. Until a definite
        answer comes it is sent again with the same ``requestId``, which the server answers
        with the original outcome instead of running it twice: after a lost connection, after
        ``unavailable`` (the server could not tell whether it committed: never raised) or
        ``rate_limited``, with a jittered backoff (``mutation_retry_backoff``). If the user
        changes or signs out first, it is not sent under the new identity: it fails with
        ``unauthenticated``.

        ``timeout`` (seconds; default ``ClientOptions.mutation_timeout``, ``None``: no limit):
        when it passes without a definite answer, the client stops sending it and raises
        :class:`~tether.client.errors.OutcomeUnknown` with its ``request_id``.
        ``request_id``: send it with that id instead of a new one, to re-send a mutation whose
        outcome is unknown (same name and arguments); if it is still pending in this client,
        this awaits the same mutation. (Cancelling the call also stops the re-sends: the
        mutation then ran once or not at all.)

        Raises :class:`~tether.client.errors.MutationError` for a definite failure.
        """
        self._check_open()
        self.start()
        if timeout is None:
            timeout = self.options.mutation_timeout
        if request_id is None:
            request_id = self._core.new_request_id()
        try:
            async with asyncio.timeout(timeout):
                done = await self._await_mutation(request_id, name, args)
        except TimeoutError:
            user = self._core.given_up_user(request_id)
            raise OutcomeUnknown(
                request_id, name, timeout, user_id=user if isinstance(user, str) else None
            ) from None
        if done.error is not None:
            raise MutationError(*done.error)
        return done.value

    async def _await_mutation(
        self, request_id: int, name: str, args: dict[str, Any]
    ) -> MutationDone:
        pending = self._mutations.get(request_id)
        if pending is None:
            await self._mutation_slots.acquire()
            pending = self._mutations.get(request_id)  # another caller's, while we waited
            if pending is not None:
                self._mutation_slots.release()
            else:
                try:
                    self._check_open()
                    self._core.mutate(name, args, user=self._mutation_user(), request_id=request_id)
                except BaseException:
                    self._mutation_slots.release()
                    raise
                future: asyncio.Future[MutationDone] = asyncio.get_running_loop().create_future()
                future.add_done_callback(lambda _: self._mutation_slots.release())
                pending = self._mutations[request_id] = _PendingMutation(name, future)
                self._wake_writer.set()
        if pending.name != name:
            raise ValueError(
                f"requestId {request_id} is pending for {pending.name!r}, not {name!r}"
            )
        pending.waiters += 1
        try:
            return await asyncio.shield(pending.future)
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.future.done():
                # Every caller gave up (a timeout, a cancellation): stop sending it.
                if self._mutations.get(request_id) is pending:
                    del self._mutations[request_id]
                self._core.forget_mutation(request_id)
                pending.future.cancel()

    def _mutation_user(self) -> User:
        """The user a mutation issued now belongs to (contract 1.1 §5 rule 4)."""
        auth = self._auth
        if auth.wants is not Wants.IDENTITY:
            return None  # anonymous, or signed out
        status = self.auth_status
        if status.state is AuthState.AUTHENTICATED and status.user_id is not None:
            return status.user_id
        if auth.session is not None:
            return auth.session.user_id
        return Principal.UNBOUND  # signing in: the user it is first sent under

    async def ping(self) -> float:
        """Round trip of a ``ping`` on the current connection, in seconds (waits for a
        connection; raises ``ConnectionError`` if it is lost before the ``pong``)."""
        self._check_open()
        self.start()
        while self._core.phase is not Phase.CONNECTED:
            self._check_open()
            await self._connected.wait()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        started = loop.time()
        self._core.ping()
        self._pongs.append(future)
        self._wake_writer.set()
        await future
        return loop.time() - started

    # ------------------------------------------------------------------ auth API

    async def sign_in(self, email: str, password: str) -> AuthStatus:
        """Sign in over HTTP, store the session, and authenticate the connection with it.

        Raises :class:`~tether.client.errors.AuthError` (``invalid_credentials`` …).
        """
        return await self._adopt(await self.api.sign_in(email, password))

    async def sign_up(self, email: str, password: str) -> AuthStatus:
        """Create an account over HTTP and continue as that user (see :meth:`sign_in`)."""
        return await self._adopt(await self.api.sign_up(email, password))

    async def sign_out(self, *, everywhere: bool = False) -> None:
        """End the session on the server (``everywhere``: every session of the user), forget
        the stored tokens, and continue as anonymous."""
        if self._store is None:
            raise RuntimeError("sign_out needs a session from email/password or a token store")
        async with self._auth_lock, self._store.locked():
            stored = await self._store.load()
            if stored is not None:
                renew = self._auth.before_sign_out(stored, self._clock())
                if renew is not None:
                    with contextlib.suppress(AuthError):
                        stored = await self.api.refresh(
                            renew.session.refresh_token, renew.session.retry_key
                        )
                try:
                    await self.api.sign_out(stored.access_token, everywhere=everywhere)
                except AuthError as exc:
                    if exc.transient:
                        raise
                await self._store.save(None)
            self._auth.signed_out()
            self._publish_auth()
        await self._become_anonymous()

    async def reauthenticate(self) -> AuthStatus:
        """Take the identity from the auth source again, now.

        For when the application knows it changed: ``fetch_token`` has a (different) user, or
        another process signed in to the shared token file. Also ends a ``SIGNED_OUT`` state
        if the source has a session. Returns the auth state once settled (or, while
        disconnected, at once: the next connection does it).
        """
        self._auth.reauthenticate()
        if self._core.phase is Phase.CONNECTED and self._established:
            with contextlib.suppress(_ConnectionLost):
                if await self._run_auth(renew=False) is _Outcome.RETRY:
                    self._renew.set()  # the keep-alive retries with backoff
        return self._auth_status

    async def _adopt(self, session: StoredSession) -> AuthStatus:
        async with self._auth_lock:
            connected = self._core.phase is Phase.CONNECTED and self._established
            command: Command = self._auth.adopt(session, connected=connected)
            if self._store is None:
                self._store = MemoryTokenStore()
            # The save is the caller's to see fail (the session exists only in memory until
            # it is saved): it is not one of the operation's passing failures.
            store = self._token_store()
            try:
                async with store.locked():
                    await store.save(session)
            except BaseException:
                self._auth.abandon()
                self._publish_auth()
                raise
            command = self._auth.saved(self._clock())
            with contextlib.suppress(_ConnectionLost):
                if await self._perform(command, self._generation) is _Outcome.RETRY:
                    self._renew.set()  # the keep-alive retries with backoff
        return self._auth_status

    async def _become_anonymous(self) -> None:
        if self._core.phase is Phase.CONNECTED:
            with contextlib.suppress(_ConnectionLost):
                if not await self._anonymize(self._generation):
                    self._renew.set()  # refused (rate_limited): the keep-alive retries
        self._auth.recheck_gate()
        self._update_gate()

    def _must_anonymize(self) -> bool:
        """The client wants no identity (anonymous, signed out) but the connection holds one,
        or is *lapsed*: the server ended the identity (``auth_expired``, ``session_revoked``)
        and answers every ``mutate`` with ``unauthenticated`` until an auth request of ours is
        answered. Either way, ``authenticate`` with no token is due."""
        return (
            self._core.phase is not Phase.CLOSED
            and self._auth.wants is not Wants.IDENTITY
            and (self._auth.holds_identity or self._core.lapsed)
        )

    async def _anonymize(self, gen: int) -> bool:
        """Send ``authenticate`` with no token on connection ``gen`` if it is due (under the
        auth lock); whether the connection is now anonymous and not lapsed. Mutations wait for
        the answer (the core sends none behind an unanswered auth request)."""
        async with self._auth_lock:
            if gen != self._generation:
                raise _ConnectionLost()
            if not self._must_anonymize():
                return True
            answer = await self._send_auth(gen, partial(self._core.authenticate, None))
            self._auth.recheck_gate()
            self._core.identity_settled()
            self._publish_auth()
            return isinstance(answer, AuthOk)

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._closed is None:
                url = self.urls[self._reconnector.url_index]
                self._set_connection(ConnectionStatus(ConnectionState.CONNECTING, url))
                code, error = await self._connect_once(url)
                if self._closed is not None:
                    return
                plan = self._reconnector.plan(code, loop.time())
                if plan.stop:
                    reason = f"the server closed the connection with {code}"
                    if error:
                        reason += f" ({error})"
                    log.warning("%s; not reconnecting", reason)
                    self._stop(ClientClosed(reason, code), url=url, error=error)
                    return
                log.info(
                    "connection to %s ended (code %s%s); reconnecting in %.2f s",
                    url,
                    code,
                    f", {error}" if error else "",
                    plan.delay,
                )
                self._set_connection(
                    ConnectionStatus(ConnectionState.RECONNECTING, url, code, error, plan.delay)
                )
                if plan.delay > 0:
                    await asyncio.sleep(plan.delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: stop loudly rather than spin
            log.exception("tether client failed")
            self._stop(ClientClosed(f"internal error: {exc!r}"))

    async def _connect_once(self, url: str) -> tuple[int | None, str | None]:
        """Serve one connection to ``url``; the close code (``None``: none received) and a
        description of what went wrong, if anything."""
        opts = self.options
        try:
            ws = await websockets.connect(
                url,
                proxy=_proxy_for(url),
                open_timeout=opts.open_timeout,
                ping_interval=None,  # the server counts our `ping` frames, not WebSocket pings
                compression=None,
                max_size=opts.max_frame_bytes,
                close_timeout=2,
                user_agent_header="tether-client",
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        self._ws = ws
        self._generation += 1
        self._established = False
        self._connected.clear()
        self._renew.clear()
        self._last_received = asyncio.get_running_loop().time()
        self._core.connection_opened()
        self._wake_writer.set()
        tasks = [
            asyncio.create_task(self._write(ws), name="tether-write"),
            asyncio.create_task(self._heartbeat(ws), name="tether-heartbeat"),
            asyncio.create_task(self._lifecycle(ws), name="tether-lifecycle"),
        ]
        error: str | None = None
        try:
            error = await self._read(ws)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._lost()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await ws.wait_closed()
            self._ws = None
        close = ws.protocol.close_rcvd
        if close is None:
            return None, error or "the connection was lost"
        return close.code, close.reason or error

    async def _read(self, ws: ClientConnection) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            async for data in ws:
                self._last_received = loop.time()
                text = data if isinstance(data, str) else data.decode(errors="replace")
                if self._trace is not None:
                    self._trace("recv", text)
                for event in self._core.receive(text):
                    self._handle(event)
                self._core.flush()  # what the frame made due (an identity back, a retry)
                self._wake_writer.set()
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # a failing callback must not kill the client
            log.exception("error while handling a frame")
            await ws.close(1011)
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _write(self, ws: ClientConnection) -> None:
        core = self._core
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                retry_at = core.next_retry_at()
                if retry_at is None:
                    await self._wake_writer.wait()  # no timer to arm: the common case
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, retry_at - time.monotonic())):
                            await self._wake_writer.wait()
                self._wake_writer.clear()
                if retry_at is not None:
                    core.flush()  # mutations whose retry time came
                for text in core.data_to_send():
                    if self._trace is not None:
                        self._trace("send", text)
                    await ws.send(text)

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """``ping`` every ``ping_interval``; drop the connection if nothing at all arrives
        within ``pong_timeout`` of one (a dead peer or network, which TCP may not notice for
        many minutes)."""
        opts = self.options
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, opts.ping_interval - opts.pong_timeout))
            if self._core.phase is Phase.CLOSED:
                return
            sent_at = loop.time()
            self._core.ping()
            self._pongs.append(None)
            self._wake_writer.set()
            await asyncio.sleep(opts.pong_timeout)
            if self._last_received < sent_at:
                log.warning("no answer to ping within %.0f s; reconnecting", opts.pong_timeout)
                ws.transport.abort()
                return

    async def _lifecycle(self, ws: ClientConnection) -> None:
        """Settle the identity (pipelined behind ``connect``: no wait for ``connected``), then
        open the gate and keep the identity alive. No ``connected`` within ``open_timeout``
        drops the connection."""
        generation = self._generation
        settle = asyncio.create_task(self._settle(generation), name="tether-settle")
        try:
            try:
                async with asyncio.timeout(self.options.open_timeout):
                    await self._connected.wait()
            except TimeoutError:
                log.warning("no answer to connect within %.0f s", self.options.open_timeout)
                ws.transport.abort()
                return
            await settle
            if generation != self._generation:
                return
            self._established = True
            self._auth.recheck_gate()
            self._update_gate()
            status = self._connection_status
            self._set_connection(ConnectionStatus(ConnectionState.CONNECTED, status.url))
            await self._keep_alive()
        except _ConnectionLost:
            return
        finally:
            if not settle.done():
                settle.cancel()
                with contextlib.suppress(asyncio.CancelledError, _ConnectionLost):
                    await settle

    async def _settle(self, generation: int) -> None:
        """Settle the identity on connection ``generation``, retrying passing failures with
        backoff (holding new work meanwhile); then let work flow if the gate is open."""
        attempt = 0
        while await self._run_auth(renew=False) is _Outcome.RETRY:
            self._core.set_ready(False)  # the identity expected is missing: hold new work
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
        core = self._core
        if (
            generation == self._generation
            and core.phase is not Phase.CLOSED
            and self._auth.recheck_gate()
        ):
            core.pipeline()  # also when no auth frame was needed (anonymous)
            self._wake_writer.set()

    def _lost(self) -> None:
        """The socket is gone: fail what waited on it; the core keeps the rest for later."""
        self._established = False
        self._ready.clear()
        self._connected.clear()
        for version in self._core.connection_lost():
            waiter = self._auth_waiters.pop(version, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(_ConnectionLost())
        for pong in self._pongs:
            if pong is not None and not pong.done():
                pong.set_exception(ConnectionError("the connection was lost"))
        self._pongs.clear()
        self._auth.connection_lost()

    def _backoff(self, attempt: int) -> float:
        return self.options.backoff.delay(attempt, self._rand.random())

    # ------------------------------------------------------------------ events

    def _handle(self, event: Event) -> None:
        if isinstance(event, QueryUpdate):
            sub = self._subscriptions.get(event.query_id)
            if sub is not None:
                error = QueryError(*event.error) if event.error is not None else None
                sub._push(event.value, error)
        elif isinstance(event, MutationDone):
            pending = self._mutations.pop(event.request_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(event)
        elif isinstance(event, MutationDeferred):
            log.info(
                "mutation %d: %s, no outcome yet; sending it again in %.2f s",
                event.request_id,
                event.code,
                event.retry_in,
            )
        elif isinstance(event, AuthOk | AuthFailed):
            self._auth.observe(event, self._clock())
            self._publish_auth()
            if isinstance(event, AuthOk):
                self._renew.set()  # wake the keep-alive: it schedules the timer for the new exp
            waiter = self._auth_waiters.pop(event.auth_version, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)
            else:
                # Its waiter was cancelled (the client closed mid-refresh). Log no token.
                log.debug(
                    "an auth answer nobody waited for: %s authVersion=%d",
                    type(event).__name__,
                    event.auth_version,
                )
        elif isinstance(event, AuthExpiring):
            self._auth.observe(event, self._clock())
            self._renew.set()
        elif isinstance(event, AuthExpired):
            log.info("the server ended the identity at its expiry; renewing")
            self._auth.observe(event, self._clock())
            self._publish_auth()
            self._renew.set()
        elif isinstance(event, SessionRevoked):
            before = self._auth.status
            forget = self._auth.observe(event, self._clock())
            if self._auth.status != before:
                log.info("the session ended: %s", event.reason)
            if forget is not None:
                task = asyncio.create_task(self._forget_session(forget.session))
                task.add_done_callback(_log_failure)
            self._publish_auth()
            self._renew.set()  # the keep-alive ends the lapsed state (_must_anonymize)
        elif isinstance(event, QueryRejected):
            sub = self._subscriptions.pop(event.query_id, None)
            if sub is not None:
                sub._finish(QueryError(event.code, event.message))
        elif isinstance(event, Connected):
            self._reconnector.connected(asyncio.get_running_loop().time())
            self._connected.set()
        elif isinstance(event, Pong):
            if self._pongs:
                pong = self._pongs.popleft()
                if pong is not None and not pong.done():
                    pong.set_result(event.server_time)
        elif isinstance(event, ServerError):
            log.warning("server error: %s: %s", event.code, event.message)
        elif isinstance(event, Unrecognized):
            log.debug("ignored frame: %s", event.text)

    # ------------------------------------------------------------------ auth

    async def _run_auth(self, *, renew: bool) -> _Outcome:
        """One auth operation in its own task, shielded from the connection's end."""
        task = asyncio.create_task(self._authenticate_once(renew=renew, gen=self._generation))
        self._auth_tasks.add(task)
        task.add_done_callback(self._auth_task_done)
        return await asyncio.shield(task)

    def _auth_task_done(self, task: asyncio.Task[_Outcome]) -> None:
        """Retrieve the outcome of an auth task. Its caller may be gone (the connection ended
        and cancelled it, past the shield) when the task then fails with ``_ConnectionLost``:
        without this, asyncio logs "Task exception was never retrieved" at ERROR."""
        self._auth_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, _ConnectionLost):
            log.warning("an auth operation failed: %r", exc)

    async def _authenticate_once(self, *, renew: bool, gen: int) -> _Outcome:
        async with self._auth_lock:
            if gen != self._generation:
                raise _ConnectionLost()
            return await self._perform(self._auth.begin(renew=renew, now=self._clock()), gen)

    async def _perform(self, command: Command, gen: int) -> _Outcome:
        """Carry out the commands of one :class:`AuthCore` operation on connection ``gen``,
        handing each result back, until it settles or asks for a retry. Called under the auth
        lock. Raises ``_ConnectionLost`` if the connection ends while an answer is awaited."""
        auth = self._auth
        try:
            async with contextlib.AsyncExitStack() as store_lock:
                holds_store_lock = False
                while True:
                    self._publish_auth()
                    if isinstance(command, Settled):
                        # What a refused auth request held (the core's gap) may go out now,
                        # under the identity settled (mutations of a user no longer wanted
                        # were failed by _publish_auth first).
                        self._core.identity_settled()
                        self._wake_writer.set()
                        return _Outcome.DONE
                    if isinstance(command, Retry):
                        return _Outcome.RETRY
                    if isinstance(command, SendAuthenticate):
                        user = self._presented_user(command.token)
                        answer = await self._send_auth(
                            gen, partial(self._core.authenticate, command.token, user=user)
                        )
                        command = auth.answered(answer, self._clock())
                    elif isinstance(command, SendRefresh):
                        refresh = partial(
                            self._core.refresh,
                            command.refresh_token,
                            command.retry_key,
                            user=self._presented_user(None, refresh=True),
                        )
                        answer = await self._send_auth(gen, refresh)
                        command = auth.answered(answer, self._clock())
                    elif isinstance(command, CallFetchToken):
                        command = await self._fetch(command.force)
                    elif isinstance(command, LoadSession):
                        command = auth.loaded(await self._token_store().load(), self._clock())
                    elif isinstance(command, SignIn):
                        command = await self._sign_in()
                    elif isinstance(command, SaveSession):
                        store = self._token_store()
                        if holds_store_lock:
                            await store.save(command.session)
                        else:
                            async with store.locked():
                                await store.save(command.session)
                        command = auth.saved(self._clock())
                    elif isinstance(command, ForgetSession):
                        await self._forget_session(command.session)
                        command = auth.saved(self._clock())
                    else:  # RefreshInBand: the read-renew-write cycle of token_store's docstring
                        store = self._token_store()
                        try:
                            await store_lock.enter_async_context(store.locked())
                        except TimeoutError:
                            log.warning("the token store stayed locked; retrying")
                            command = auth.lock_timed_out()
                            continue
                        holds_store_lock = True
                        command = auth.refresh_loaded(await store.load(), self._clock())
        except (_ConnectionLost, asyncio.CancelledError):
            auth.abandon()
            raise
        except Exception as exc:  # a store that cannot be written, a bug: retry, never sign out
            log.exception("authentication failed unexpectedly")
            auth.failed(f"error: {type(exc).__name__}")
            self._publish_auth()
            return _Outcome.RETRY

    def _presented_user(self, token: str | None, *, refresh: bool = False) -> User:
        """The user an ``authenticate`` with ``token`` (or a ``refresh``) will establish if it
        succeeds: later frames run as that user (rule 1), so mutations of that user may follow
        it at once."""
        session = self._auth.session
        if self._auth.source is Source.STORE and session is not None:
            return session.user_id
        if refresh or token is None:
            return Principal.UNKNOWN if refresh else None
        return token_subject(token)

    async def _fetch(self, force: bool) -> Command:
        assert self._fetch_token is not None
        try:
            fetched = self._fetch_token(force)
            token = await fetched if inspect.isawaitable(fetched) else fetched
        except Exception as exc:
            log.warning("fetch_token failed: %r", exc)
            return self._auth.fetch_failed()
        return self._auth.fetched(None if token is None else str(token))

    async def _sign_in(self) -> Command:
        assert self._email is not None and self._password is not None
        try:
            session = await self.api.sign_in(self._email, self._password)
        except AuthError as exc:
            if not exc.transient:
                log.warning("sign-in failed: %s", exc.code)
            return self._auth.sign_in_failed(exc.code)
        return self._auth.signed_in(session)

    def _token_store(self) -> TokenStore:
        assert self._store is not None
        return self._store

    async def _send_auth(self, gen: int, make: Callable[[], int]) -> AuthOk | AuthFailed:
        """Send one auth frame on connection ``gen`` and wait for its answer. While the
        connection is being set up, its subscriptions follow the frame at once (pipelined: they
        run under the identity it establishes); mutations wait for the answer."""
        if gen != self._generation or self._core.phase is Phase.CLOSED:
            raise _ConnectionLost()
        version = make()
        if not self._established:
            self._core.pipeline()
        waiter: asyncio.Future[AuthOk | AuthFailed] = asyncio.get_running_loop().create_future()
        self._auth_waiters[version] = waiter
        self._wake_writer.set()
        try:
            async with asyncio.timeout(self.options.auth_timeout):
                return await waiter
        except TimeoutError:
            # No answer: everything sent after the request waits behind it on the server
            # (rule 1). Replace the connection rather than wait forever.
            self._auth_waiters.pop(version, None)
            log.warning(
                "no answer to authVersion %d within %.0f s; reconnecting",
                version,
                self.options.auth_timeout,
            )
            ws = self._ws
            if gen == self._generation and ws is not None:
                ws.transport.abort()
            raise _ConnectionLost() from None

    async def _keep_alive(self) -> None:
        """Renew the identity on ``auth_expiring``, on the timer, and after it lapsed."""
        attempt = 0
        while True:
            if self._must_anonymize():
                if await self._anonymize(self._generation):
                    attempt = 0
                else:
                    await asyncio.sleep(self._backoff(attempt))
                    attempt += 1
                continue
            step = self._auth.keep_alive(self._clock())
            if isinstance(step, ScheduleWake):
                timeout = None if step.at is None else max(0.0, step.at - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._renew.wait()
                self._renew.clear()
                continue
            outcome = await self._run_auth(renew=True)
            if outcome is _Outcome.RETRY or self._auth.renewal_due(self._clock()):
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
            else:
                attempt = 0

    def _publish_auth(self) -> None:
        """Tell the application the core's auth state; apply its gate. Once the client wants
        no user (signed out, or its source has none), mutations issued under a user fail."""
        self._set_auth(self._auth.status)
        if self._auth.wants is not Wants.IDENTITY and self._mutations:
            for event in self._core.abandon_user_mutations():
                self._handle(event)
        self._update_gate()
        if self._must_anonymize():
            self._renew.set()  # the keep-alive sends authenticate(null), whoever settled

    async def _forget_session(self, session: StoredSession) -> None:
        """Clear the store if it still holds ``session`` (a newer sign-in stays)."""
        store = self._store
        if store is None:
            return
        async with store.locked():
            stored = await store.load()
            if stored is not None and stored.session_id == session.session_id:
                await store.save(None)

    def _update_gate(self) -> None:
        """Hold new subscriptions and mutations while the auth core's gate is closed."""
        core = self._core
        if core.phase is not Phase.CONNECTED or not self._established:
            return
        want = self._auth.gate_open
        if want != core.ready:
            core.set_ready(want)
            self._wake_writer.set()
        if want:
            self._ready.set()
        else:
            self._ready.clear()

    # ------------------------------------------------------------------ registry

    def _register(self, sub: Subscription) -> int:
        self._check_open()
        self.start()
        query_id = self._core.subscribe(sub.name, sub.args)
        self._subscriptions[query_id] = sub
        self._wake_writer.set()
        return query_id

    def _unregister(self, query_id: int) -> None:
        if self._subscriptions.pop(query_id, None) is not None:
            self._core.unsubscribe(query_id)
            self._wake_writer.set()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _stop(
        self, reason: ClientClosed, *, url: str | None = None, error: str | None = None
    ) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        for pending in self._mutations.values():
            if not pending.future.done():
                pending.future.set_exception(reason)
        self._mutations.clear()
        for sub in list(self._subscriptions.values()):
            sub._finish(reason)
        self._subscriptions.clear()
        self._ready.set()  # wake wait_ready(), which raises
        self._connected.set()
        self._set_connection(
            ConnectionStatus(
                ConnectionState.STOPPED,
                url or self._connection_status.url,
                reason.close_code,
                error,
            )
        )
        for auth_watch in self._auth_watches:
            auth_watch.push(_END)
        for connection_watch in self._connection_watches:
            connection_watch.push(_END)

    # ------------------------------------------------------------------ reporting

    def _set_auth(self, status: AuthStatus) -> None:
        if status == self._auth_status:
            return
        self._auth_status = status
        log.info("auth state: %s%s", status.state, f" ({status.reason})" if status.reason else "")
        for watch in self._auth_watches:
            watch.push(status)
        if self._on_auth_state is not None:
            try:
                self._on_auth_state(status)
            except Exception:
                log.exception("on_auth_state callback failed")

    def _set_connection(self, status: ConnectionStatus) -> None:
        if status == self._connection_status:
            return
        self._connection_status = status
        for watch in self._connection_watches:
            watch.push(status)
        if self._on_connection_state is not None:
            try:
                self._on_connection_state(status)
            except Exception:
                log.exception("on_connection_state callback failed")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task failed: %r", task.exception())
