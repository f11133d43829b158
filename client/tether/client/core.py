"""The client side of the ``/sync`` protocol, sans I/O.

Nothing here touches a socket, a file or the event loop's clock. :class:`ClientCore` keeps the
state of one client across its connections — subscriptions, unacknowledged mutations, the
``authVersion`` counter, the identity the server confirmed — turns the application's calls into
frames (:meth:`ClientCore.data_to_send`) and the server's frames into :data:`Event`\\ s
(:meth:`ClientCore.receive`). :class:`Reconnector` decides, from a close code and the time, whether
and when to reconnect and to which URL. :func:`renewal_due` says when an access token must be
renewed. The I/O shell (:mod:`tether.client.connection`) moves frames and runs timers; the tests of
this module need no socket and no sleep.

The rules it implements (``docs/protocol.md``, ``docs/client.md``):

* ``connect`` is the first frame of every connection, with the same ``clientId`` each time;
  ``authenticate``/``refresh``, subscriptions and mutations may follow it at once, without
  waiting for ``connected`` (:meth:`ClientCore.pipeline`).
* ``authVersion`` grows with every ``authenticate``/``refresh`` the client ever sends, so it is
  strictly increasing on every connection.
* Subscriptions and mutations are sent only while the core is *ready* (the shell settled the
  identity first: a result computed for the wrong user is never asked for). After a reconnect
  every live subscription is sent again with its ``queryId``, and every mutation without an
  outcome is sent again with its original ``requestId``, so the server answers it with the
  original outcome instead of running it twice.
* A mutation belongs to the user it was issued under (contract 1.1 §5 rule 4). It is sent only
  when the connection runs as that user and no ``authenticate``/``refresh`` is awaiting its
  answer: the server runs what follows an auth request under *none* when that request fails
  (rule 1), and a write meant for a user must not run anonymous. Subscriptions, which only
  read, are pipelined behind the auth request. When the connection's identity changes or
  ends, mutations sent under the identity before may never be answered (rule 1): they are
  sent again, same ``requestId``, once the connection is that user again, and failed with
  ``unauthenticated`` when it becomes another user (:meth:`ClientCore.abandon_user_mutations`
  when the client signs out).
* After the *server* ended the identity (``auth_expired``, ``session_revoked``) the
  connection is *lapsed* (:attr:`ClientCore.lapsed`) until an auth request of ours is answered
  (other than ``unavailable``/``rate_limited``): the server answers every ``mutate`` with
  ``unauthenticated`` and runs nothing, so no mutation is sent. A client that settles as
  anonymous or signed out then sends ``authenticate`` with no token (the shell's
  ``_must_anonymize``); its anonymous mutations go out after the ``auth_ok``.
* An auth request answered with another identity than the one expected (a refused token; on a
  new connection even ``unavailable``, which has no identity to keep; another user) opens a
  *gap*: the core is :attr:`ClientCore.held` — nothing goes out — until the next auth request
  is queued or the shell settles the identity (:meth:`ClientCore.identity_settled`). What was
  pipelined behind that request ran under the wrong identity: its subscriptions move to new
  ``queryId``\\ s (``unsubscribe`` for the old ones, whose results are ignored; ``subscribe``
  with the new ones once the gap ends), so the application never sees their results, and the
  client's handle of a subscription stays the same (:meth:`ClientCore._check_pipelined`). A
  mutation issued while signing in (:attr:`Principal.UNBOUND`) is never bound in the gap.
* A mutation the caller gave up on (``OutcomeUnknown``) keeps its user for
  :data:`GIVEN_UP_RETENTION`: a retry with its ``requestId`` under another user is refused
  with ``unauthenticated`` (:meth:`ClientCore.mutate`).
* ``unavailable`` is not an outcome (rule 3): a ``mutation_result`` with that code, or an
  ``error`` ``rate_limited`` naming the ``requestId`` (the frame was dropped), sends the same
  ``requestId`` again after a jittered backoff (:class:`MutationDeferred`), until a definite
  answer comes.
* ``requestId``\\ s start at a time-based value (:func:`initial_request_id`), so a process that
  restarts with the same ``clientId`` does not reuse the ids of the one before.
"""

from __future__ import annotations

import base64
import enum
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tether.client.errors import MessageTooLarge, MutationError
from tether.protocol import (
    MAX_SAFE_INT,
    PROTOCOL_VERSION,
    AuthErrorCode,
    ClientMessageType,
    CloseDecision,
    ErrorCode,
    FunctionErrorCode,
    MutationErrorCode,
    ServerMessageType,
    close_decision,
)

#: The server's default ``TETHER_MAX_MESSAGE_BYTES``.
DEFAULT_MAX_MESSAGE_BYTES = 65536
#: Renew an access token this long before its ``exp`` at the latest (seconds), or a quarter of
#: its lifetime when that is shorter. The server pushes ``auth_expiring`` earlier than this by
#: default (60 s, or half the lifetime), so the timer only fires when a push went missing.
DEFAULT_RENEWAL_MARGIN = 30.0


#: ``auth_error`` codes after which the server keeps the connection's identity (1.1 §5 rule 2).
IDENTITY_KEEPING_AUTH_CODES = frozenset({AuthErrorCode.UNAVAILABLE, AuthErrorCode.RATE_LIMITED})
#: Answers to a ``mutate`` that are not an outcome: send the same ``requestId`` again later.
#: ``unavailable`` (a ``mutation_result``): the server could not learn whether it committed;
#: ``rate_limited`` (an ``error`` naming the ``requestId``): the frame was dropped unread.
RETRY_MUTATION_CODES = frozenset({MutationErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})
#: How many requestIds a client may take per millisecond, on average since it started,
#: before the next process with the same ``clientId`` could reuse one (see
#: :func:`initial_request_id`).
REQUEST_IDS_PER_MS = 1024
#: Seconds the client remembers the user of a mutation it stopped sending without an outcome
#: (an ``OutcomeUnknown``): the server's default ``TETHER_MUTATION_OUTCOME_TTL``, after which a
#: retry with its requestId runs afresh anyway.
GIVEN_UP_RETENTION = 15 * 60.0
#: At most this many such mutations are remembered (the oldest are forgotten first).
MAX_GIVEN_UP_MUTATIONS = 4096

_PING_FRAME = json.dumps({"type": ClientMessageType.PING}, separators=(",", ":"))


# --------------------------------------------------------------------------------- reconnecting


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits a uniformly random time in
    ``[0, min(maximum, initial * 2**n)]`` — 100 ms, 200 ms, 400 ms … up to 16 s.

    Full jitter (not "equal" jitter) spreads a crowd of clients that lost the same instance
    over the whole window, so they do not arrive at the next one together.
    """

    initial: float = 0.1
    maximum: float = 16.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait of attempt ``attempt`` (0-based)."""
        if attempt >= 64:  # 2**64 * initial is past any maximum; avoid a huge float
            return self.maximum
        return min(self.maximum, self.initial * 2.0**attempt)

    def delay(self, attempt: int, rand: float) -> float:
        """The wait of attempt ``attempt`` for a uniform ``rand`` in ``[0, 1)``."""
        return rand * self.ceiling(attempt)


#: The backoff between re-sends of a mutation whose outcome is unknown (100 ms doubling to 5 s,
#: full jitter): long enough not to hammer a server whose Redis is down, short enough that the
#: application hears soon after it is back.
DEFAULT_MUTATION_RETRY_BACKOFF = Backoff(initial=0.1, maximum=5.0)


def initial_request_id(now: float) -> int:
    """The first ``requestId`` of a client started at ``now`` (seconds since the epoch).

    Outcomes live on the server for a while (15 minutes) keyed by ``clientId`` and
    ``requestId``: a process that restarts with the same ``clientId`` must not reuse an id of
    the process before, or it would be answered with that one's outcome. Starting from
    milliseconds since the epoch × :data:`REQUEST_IDS_PER_MS` keeps every new process above the
    ids of the earlier ones as long as none took more than that many ids per millisecond on
    average; the value stays below 2**53 (JSON's exact integers) until the year 2248.
    """
    return min(int(now * 1000) * REQUEST_IDS_PER_MS, MAX_SAFE_INT - 2**32)


@dataclass(frozen=True, slots=True)
class ReconnectPlan:
    """Reconnect to ``url_index`` after ``delay`` seconds, or stop (:attr:`stop`)."""

    decision: CloseDecision
    delay: float
    url_index: int
    close_code: int | None

    @property
    def stop(self) -> bool:
        return self.decision is CloseDecision.STOP


class Reconnector:
    """Which URL to connect to next, and after how long.

    Every new attempt moves to the next URL (round robin): after a failure the client fails
    over, and a 1012 asks for "another instance" explicitly. The backoff attempt counter goes
    back to zero once a connection has stayed up ``stable_after`` seconds, so a server that
    accepts and then closes at once (a rate limit, a crash loop) still meets a growing backoff.
    """

    def __init__(
        self,
        url_count: int,
        backoff: Backoff | None = None,
        *,
        stable_after: float = 10.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if url_count < 1:
            raise ValueError("at least one URL is needed")
        self.url_count = url_count
        self.backoff = backoff if backoff is not None else Backoff()
        self.stable_after = stable_after
        self._rand = rand
        self.attempt = 0
        self.url_index = 0
        self._connected_at: float | None = None

    def connected(self, now: float) -> None:
        """The server answered ``connect`` at ``now`` (seconds, any monotonic clock)."""
        self._connected_at = now

    def plan(self, close_code: int | None, now: float) -> ReconnectPlan:
        """The connection closed with ``close_code`` (``None``: it could not be opened, or
        closed without a close frame) at ``now``. Advances to the next URL."""
        if self._connected_at is not None and now - self._connected_at >= self.stable_after:
            self.attempt = 0
        self._connected_at = None
        decision = close_decision(close_code)
        self.url_index = (self.url_index + 1) % self.url_count
        if decision is CloseDecision.STOP:
            delay = 0.0
        elif decision is CloseDecision.RECONNECT_NOW:
            delay = 0.0
        else:
            delay = self.backoff.delay(self.attempt, self._rand())
            self.attempt += 1
        return ReconnectPlan(decision, delay, self.url_index, close_code)


# --------------------------------------------------------------------------------- time


def renewal_due(
    expires_at_ms: int,
    server_time_ms: int,
    received_at: float,
    margin: float = DEFAULT_RENEWAL_MARGIN,
) -> float:
    """When (local wall-clock seconds) to renew an access token at the latest.

    ``expires_at_ms`` is its ``exp`` and ``server_time_ms`` the server's clock when the client
    received it, at local time ``received_at`` (seconds since the epoch). The server's clock
    may differ from ours: the deadline is moved by that skew, so the renewal is on time by the
    server's clock, which is the one that ends the identity. The renewal comes
    ``min(margin, lifetime / 4)`` before ``exp``.
    """
    lifetime = max(expires_at_ms - server_time_ms, 0) / 1000
    skew = server_time_ms / 1000 - received_at
    return expires_at_ms / 1000 - skew - min(margin, lifetime / 4)


# --------------------------------------------------------------------------------- states


class AuthState(enum.StrEnum):
    """The session as the application sees it.

    Routine renewals are invisible: a client whose token is renewed on time stays
    ``AUTHENTICATED`` throughout.
    """

    #: No credentials: the connection runs functions as an anonymous caller.
    ANONYMOUS = "anonymous"
    #: The server confirmed the identity (``auth_ok``), and it has not ended since.
    AUTHENTICATED = "authenticated"
    #: Credentials are held, but the server does not (or not yet) hold a confirmed identity:
    #: signing in at start, or renewing after the identity lapsed or a renewal failed for a
    #: passing reason (``reason`` says which, e.g. ``unavailable``). Never a sign-out.
    REFRESHING = "refreshing"
    #: The session ended (``refresh_invalid``, ``refresh_reused``, ``session_revoked``, a
    #: sign-out): the client runs as anonymous until the application signs in again.
    SIGNED_OUT = "signed_out"


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """One auth state with its details; ``reason`` is a wire code or a session-end reason."""

    state: AuthState
    user_id: str | None = None
    session_id: str | None = None
    reason: str | None = None


class ConnectionState(enum.StrEnum):
    """The socket as the application sees it."""

    CONNECTING = "connecting"
    #: ``connected`` arrived and the identity is settled: operations flow.
    CONNECTED = "connected"
    #: Lost, waiting ``retry_in`` seconds before the next attempt.
    RECONNECTING = "reconnecting"
    #: Stopped for good: closed by the application, or a 45xx close code.
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """One connection state; ``close_code``/``error`` say why the last connection ended."""

    state: ConnectionState
    url: str | None = None
    close_code: int | None = None
    error: str | None = None
    retry_in: float | None = None


# --------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Identity:
    """The identity the server confirmed for this connection."""

    user_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class Connected:
    connection_id: str
    server_time: int
    protocol: int


@dataclass(frozen=True, slots=True)
class AuthOk:
    auth_version: int
    identity: Identity | None
    expires_at: int | None
    server_time: int
    #: ``{"accessToken", "refreshToken", "expiresAt"}`` when the server minted tokens.
    tokens: dict[str, Any] | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthFailed:
    auth_version: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class AuthExpiring:
    """The identity the client holds ends soon (pushes about an older identity are dropped)."""

    expires_at: int
    server_time: int


@dataclass(frozen=True, slots=True)
class AuthExpired:
    expires_at: int
    server_time: int


@dataclass(frozen=True, slots=True)
class SessionRevoked:
    reason: str


@dataclass(frozen=True, slots=True)
class QueryUpdate:
    """A new result for a live subscription: ``value``, or ``error`` (code, message)."""

    query_id: int
    version: int
    value: Any = None
    error: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class QueryRejected:
    """The server refused the ``subscribe`` itself; the subscription is gone."""

    query_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class MutationDone:
    """The outcome of a mutation: ``value`` and ``version``, or ``error`` (code, message)."""

    request_id: int
    value: Any = None
    version: int | None = None
    error: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class MutationDeferred:
    """No outcome yet (``code``: ``unavailable`` or ``rate_limited``): the mutation is sent
    again, same ``requestId``, in ``retry_in`` seconds or on the next connection."""

    request_id: int
    code: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame that names no live query or mutation of this client."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    server_time: int


@dataclass(frozen=True, slots=True)
class Unrecognized:
    """A frame that is not a server message this client knows (it is ignored)."""

    text: str


Event: TypeAlias = (
    Connected
    | AuthOk
    | AuthFailed
    | AuthExpiring
    | AuthExpired
    | SessionRevoked
    | QueryUpdate
    | QueryRejected
    | MutationDone
    | MutationDeferred
    | ServerError
    | Pong
    | Unrecognized
)


# --------------------------------------------------------------------------------- core


class Phase(enum.Enum):
    CLOSED = "closed"  # no socket
    OPENING = "opening"  # socket open, `connect` sent
    CONNECTED = "connected"  # `connected` received


class Principal(enum.Enum):
    """Users that are not a user id (``None`` is the anonymous caller)."""

    #: A mutation issued while the client did not know its user yet (signing in at start): it
    #: belongs to the user the connection runs as when it is first sent, and fails in
    #: :meth:`ClientCore.abandon_user_mutations` if the client ends up with no user first.
    UNBOUND = "unbound"
    #: The user an ``authenticate`` will establish is not known before its answer (a token
    #: that is not a JWT naming its ``sub``): mutations wait for the answer.
    UNKNOWN = "unknown"


#: Who a mutation belongs to, or what an auth request is expected to establish: a user id,
#: ``None`` (anonymous), or a :class:`Principal`.
User: TypeAlias = str | Principal | None


def token_subject(token: str) -> str | Principal:
    """The ``sub`` (user id) an access JWT names, read without checking anything (the server
    checks): the user an ``authenticate`` with it establishes if it is accepted.
    :attr:`Principal.UNKNOWN` when ``token`` is not a JWT with a string ``sub``."""
    parts = token.split(".")
    if len(parts) != 3:
        return Principal.UNKNOWN
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return Principal.UNKNOWN
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else Principal.UNKNOWN


#: The message of the ``unauthenticated`` failure of a mutation whose user is gone.
USER_CHANGED_MESSAGE = (
    "the client's user changed (or signed out) before this mutation had an outcome; it was not "
    "sent under the new identity (if it had been sent before, it may have been applied)"
)


@dataclass(slots=True)
class _Subscription:
    name: str
    args: dict[str, Any]
    #: Its ``queryId`` on the wire: the handle the application knows it by, until a failed
    #: auth request moves it to a new one (:meth:`ClientCore._check_pipelined`).
    wire: int
    sent: bool = False  # sent on the current connection
    #: The auth request it was sent behind, while that request awaits its answer: it runs
    #: under the identity that request establishes (rule 1).
    behind: int | None = None


@dataclass(slots=True)
class _Mutation:
    name: str
    frame: str
    user: User
    sent: bool = False  # sent on the current connection, under its current identity
    #: ``auth_version`` when it was last sent: it runs under what that auth request
    #: established (contract 1.1 §5 rule 1).
    epoch: int = 0
    #: Answers without an outcome so far (``unavailable``): the backoff's attempt number.
    attempt: int = 0
    #: Not sent again before this time (``clock``), after an answer without an outcome.
    retry_at: float | None = None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _principal(identity: Identity | None) -> tuple[str, str] | None:
    return None if identity is None else (identity.user_id, identity.session_id)


class ClientCore:
    """The protocol state of one client, across all of its connections.

    Calls return identifiers or events; frames to send accumulate until the shell takes them
    with :meth:`data_to_send`, in order. Frames are encoded when created, so a frame over
    ``max_message_bytes`` fails the call that made it
    (:class:`~tether.client.errors.MessageTooLarge`) instead of closing the connection with 1009
    later (and again after every replay).

    ``clock`` (monotonic seconds) and ``rand`` time the re-sends of mutations answered without
    an outcome (``retry_backoff``); the shell calls :meth:`flush` at :meth:`next_retry_at`, and
    after handling each received frame. ``first_request_id`` defaults to
    :func:`initial_request_id` of the wall clock.
    """

    def __init__(
        self,
        client_id: str,
        *,
        protocol: int = PROTOCOL_VERSION,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        retry_backoff: Backoff = DEFAULT_MUTATION_RETRY_BACKOFF,
        first_request_id: int | None = None,
    ) -> None:
        if not 1 <= len(client_id) <= 128:
            raise ValueError("client_id must be 1 to 128 characters")
        self.client_id = client_id
        self.protocol = protocol
        self.max_message_bytes = max_message_bytes
        self.retry_backoff = retry_backoff
        self._clock = clock
        self._rand = rand
        self.phase = Phase.CLOSED
        self.ready = False
        self.connection_id: str | None = None
        #: The last authVersion sent; the next one is larger, on any connection.
        self.auth_version = 0
        #: authVersion → "authenticate" or "refresh", for requests not yet answered.
        self.pending_auth: dict[int, str] = {}
        #: The identity the server confirmed on this connection, and its ``exp`` (ms).
        self.identity: Identity | None = None
        self.identity_expires_at: int | None = None
        #: The user the server runs the next frame under: the confirmed identity's, or what
        #: the last auth request sent is expected to establish (rule 1).
        self.presumed_user: User = None
        #: authVersion → the user that request is expected to establish, while unanswered.
        self._expects: dict[int, User] = {}
        #: The server ended the identity (``auth_expired``, ``session_revoked``) and no auth
        #: request of ours has been answered since: the server answers every ``mutate`` with
        #: ``unauthenticated`` and runs nothing (docs/protocol.md, 1.1 rule 1). Mutations wait;
        #: a client that settles as anonymous sends ``authenticate`` with no token to end it.
        self.lapsed = False
        #: A request that subscriptions were pipelined behind failed: nothing more goes out
        #: until the next auth request is queued (what follows it runs under its answer) or
        #: the shell says the identity settled (:meth:`identity_settled`).
        self.held = False
        #: The highest ``version`` seen in a ``transition`` or ``mutation_result``.
        self.version = 0
        self.subscriptions: dict[int, _Subscription] = {}
        #: ``queryId`` on the wire → the subscription's handle (its key in ``subscriptions``).
        self._wire: dict[int, int] = {}
        self.mutations: dict[int, _Mutation] = {}
        #: requestId → (the user it was issued under, when its caller gave up) for mutations
        #: the client stopped sending without an outcome (:meth:`forget_mutation`), so that a
        #: retry with that id is never sent as another user (:meth:`mutate`).
        self._given_up: dict[int, tuple[User, float]] = {}
        self._next_query_id = 1
        self._next_request_id = (
            first_request_id if first_request_id is not None else initial_request_id(time.time())
        )
        self._outbox: list[str] = []

    # ------------------------------------------------------------------ frames

    def _encode(self, frame: dict[str, Any]) -> str:
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
        if size > self.max_message_bytes:
            raise MessageTooLarge(size, self.max_message_bytes)
        return text

    def data_to_send(self) -> list[str]:
        """Frames to send, in order (JSON text); the outbox is empty afterwards."""
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------------ connection

    def connection_opened(self) -> None:
        """A socket is open: queue ``connect``."""
        self.phase = Phase.OPENING
        self.ready = False
        self.held = False
        self.lapsed = False
        self.presumed_user = None  # a new connection is anonymous
        self._outbox = [
            self._encode(
                {
                    "type": ClientMessageType.CONNECT,
                    "clientId": self.client_id,
                    "protocol": self.protocol,
                }
            )
        ]

    def connection_lost(self) -> list[int]:
        """The socket is gone. Returns the authVersions that will never be answered.

        Subscriptions and unacknowledged mutations are kept, marked unsent: they go out again
        once the next connection is ready.
        """
        self.phase = Phase.CLOSED
        self.ready = False
        self.connection_id = None
        self.identity = None
        self.identity_expires_at = None
        self.presumed_user = None
        self.lapsed = False
        self.held = False
        self._expects.clear()
        self._outbox.clear()
        for sub in self.subscriptions.values():
            sub.sent = False
            sub.behind = None
        for mutation in self.mutations.values():
            mutation.sent = False
        lost = list(self.pending_auth)
        self.pending_auth.clear()
        return lost

    def set_ready(self, ready: bool) -> None:
        """Let subscriptions and mutations flow (``True``) or hold new ones (``False``).

        Becoming ready sends every subscription and mutation not yet sent on this connection:
        after a reconnect, that is all of them (mutations with their original ``requestId``).
        Holding keeps what was already sent; the server still runs those.
        """
        if ready and self.phase is not Phase.CONNECTED:
            raise RuntimeError("not connected")
        self.ready = ready
        if ready:
            self.flush()

    def pipeline(self) -> None:
        """Send subscriptions and mutations now, before ``connected`` and before the answer to
        the auth request just queued: the server runs what follows an ``authenticate`` or
        ``refresh`` under the identity it establishes (contract 1.1 §5 rule 1), so a new
        connection needs no round trip before its subscriptions. Mutations wait for the auth
        request's answer (see :meth:`_send_mutations`)."""
        if self.phase is Phase.CLOSED:
            raise RuntimeError("not connected")
        self.ready = True
        self.held = False
        self.flush()

    def identity_settled(self) -> None:
        """The shell settled the identity (an auth operation ended without a new request):
        what a failed auth request held (:attr:`held`) may go out now."""
        self.held = False
        self.flush()

    def flush(self) -> None:
        """While ready (and not :attr:`held`), send what is due: subscriptions not sent on
        this connection, and mutations not sent under its identity whose user is the
        connection's and whose retry time (if any) has come. A mutation of another user waits
        (its user may come back) until it is failed: by an ``auth_ok`` for another user, or
        :meth:`abandon_user_mutations`."""
        if not self.ready or self.held:
            return
        for sub in self.subscriptions.values():
            if not sub.sent:
                self._send_subscribe(sub)
        self._send_mutations()

    def _send_mutations(self) -> None:
        presumed = self.presumed_user
        if presumed is Principal.UNKNOWN or self.pending_auth or self.lapsed:
            # An auth request's answer will say who runs them: one that fails leaves the
            # connection anonymous, and what was pipelined behind it would run anonymous.
            # A lapsed connection runs no mutation at all.
            return
        now = self._clock()
        for mutation in self.mutations.values():
            if mutation.sent or (mutation.retry_at is not None and now < mutation.retry_at):
                continue
            if mutation.user is Principal.UNBOUND:
                # Never in the gap after a refused auth request (the core is held then): a
                # mutation issued while signing in is not run as the anonymous caller of the
                # gap. If the client ends up with no user, abandon_user_mutations fails it.
                mutation.user = presumed
            if mutation.user != presumed:
                continue
            self._outbox.append(mutation.frame)
            mutation.sent = True
            mutation.epoch = self.auth_version
            mutation.retry_at = None

    def next_retry_at(self) -> float | None:
        """The earliest time (``clock``) at which a mutation waiting after an answer without
        an outcome may be sent again; ``None`` if none waits."""
        times = [
            m.retry_at for m in self.mutations.values() if not m.sent and m.retry_at is not None
        ]
        return min(times, default=None)

    # ------------------------------------------------------------------ auth

    def _auth_frame(self, frame: dict[str, Any], kind: str, user: User) -> int:
        if self.phase is Phase.CLOSED:
            raise RuntimeError("not connected")
        version = self.auth_version + 1
        text = self._encode({**frame, "authVersion": version})
        self.auth_version = version
        self.pending_auth[version] = kind
        self._expects[version] = user
        self.presumed_user = user
        self._outbox.append(text)
        # What a failed request held goes out behind this one, under its answer.
        self.held = False
        self.flush()
        return version

    def authenticate(self, token: str | None, *, user: User = Principal.UNKNOWN) -> int:
        """Queue ``authenticate`` (``None``: become anonymous); returns its authVersion.
        ``user``: the user the token names, if the caller knows it."""
        return self._auth_frame(
            {"type": ClientMessageType.AUTHENTICATE, "token": token},
            "authenticate",
            None if token is None else user,
        )

    def refresh(
        self, refresh_token: str, retry_key: str | None = None, *, user: User = Principal.UNKNOWN
    ) -> int:
        """Queue an in-band ``refresh``; returns its authVersion. ``user``: the session's."""
        frame: dict[str, Any] = {"type": ClientMessageType.REFRESH, "refreshToken": refresh_token}
        if retry_key is not None:
            frame["retryKey"] = retry_key
        return self._auth_frame(frame, "refresh", user)

    # ------------------------------------------------------------------ functions

    def subscribe(self, name: str, args: dict[str, Any]) -> int:
        """Add a subscription; returns its handle, which is also its first ``queryId`` (see
        :meth:`_check_pipelined`). Sent now if ready, else when ready."""
        query_id = self._next_query_id
        sub = _Subscription(name, dict(args), query_id)
        self._encode(
            {"type": ClientMessageType.SUBSCRIBE, "queryId": query_id, "name": name, "args": args}
        )  # too large: fail here, before anything is kept
        self._next_query_id += 1
        self.subscriptions[query_id] = sub
        self._wire[query_id] = query_id
        if self.ready and not self.held:
            self._send_subscribe(sub)
        return query_id

    def _send_subscribe(self, sub: _Subscription) -> None:
        frame = {
            "type": ClientMessageType.SUBSCRIBE,
            "queryId": sub.wire,
            "name": sub.name,
            "args": sub.args,
        }
        self._outbox.append(self._encode(frame))
        sub.sent = True
        sub.behind = self.auth_version if self.auth_version in self.pending_auth else None

    def _send_unsubscribe(self, wire: int) -> None:
        self._outbox.append(self._encode({"type": ClientMessageType.UNSUBSCRIBE, "queryId": wire}))

    def unsubscribe(self, query_id: int) -> None:
        """Drop a subscription (by its handle); ``unsubscribe`` is sent only if the server
        has it."""
        sub = self.subscriptions.pop(query_id, None)
        if sub is None:
            return
        self._wire.pop(sub.wire, None)
        if sub.sent and self.phase is not Phase.CLOSED:
            self._send_unsubscribe(sub.wire)

    def new_request_id(self) -> int:
        """Take the next ``requestId`` (unique for this ``clientId``, see
        :func:`initial_request_id`)."""
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    def mutate(
        self,
        name: str,
        args: dict[str, Any],
        *,
        user: User = Principal.UNBOUND,
        request_id: int | None = None,
    ) -> int:
        """Add a mutation issued under ``user``; returns its ``requestId``. Sent now if ready
        and the connection runs as ``user``, else when it does.

        ``request_id``: send it with this id (an earlier one whose outcome the caller did not
        learn); if that id is still pending here, nothing is added (a ``ValueError`` if it is
        pending under another function name). If the client gave that id up (see
        :meth:`forget_mutation`) under a user, it belongs to that user still: a
        :class:`~tether.client.errors.MutationError` ``unauthenticated`` if ``user`` is another
        (a user id or ``None``), else it waits for that user like any mutation.
        """
        if request_id is not None:
            if _int(request_id) is None or not 0 <= request_id <= MAX_SAFE_INT:
                raise ValueError(f"request_id must be an integer in [0, 2**53 - 1]: {request_id!r}")
            pending = self.mutations.get(request_id)
            if pending is not None:
                if pending.name != name:
                    raise ValueError(
                        f"requestId {request_id} is pending for {pending.name!r}, not {name!r}"
                    )
                return request_id
            issued_under = self.given_up_user(request_id)
            if issued_under is not Principal.UNBOUND:
                if user is not Principal.UNBOUND and user != issued_under:
                    raise MutationError(
                        FunctionErrorCode.UNAUTHENTICATED,
                        f"requestId {request_id} was issued under another user (or anonymous) "
                        "than the client's now; it may have been applied under that one and is "
                        "not sent under this one",
                    )
                user = issued_under
        rid = request_id if request_id is not None else self._next_request_id
        frame = self._encode(
            {"type": ClientMessageType.MUTATE, "requestId": rid, "name": name, "args": args}
        )
        if request_id is None:
            self._next_request_id += 1
        self.mutations[rid] = _Mutation(name, frame, user)
        if self.ready:
            self._send_mutations()
        return rid

    def forget_mutation(self, request_id: int) -> User:
        """Stop tracking a mutation (its caller gave up); it is not sent again. Returns the
        user it belonged to (:attr:`Principal.UNBOUND`: never sent), which a retry with its
        ``requestId`` keeps (:meth:`mutate`) for :data:`GIVEN_UP_RETENTION` seconds."""
        mutation = self.mutations.pop(request_id, None)
        if mutation is None:
            return self.given_up_user(request_id)
        given_up = self._given_up
        given_up.pop(request_id, None)
        given_up[request_id] = (mutation.user, self._clock())
        while len(given_up) > MAX_GIVEN_UP_MUTATIONS:
            del given_up[next(iter(given_up))]
        return mutation.user

    def given_up_user(self, request_id: int) -> User:
        """The user a mutation given up within :data:`GIVEN_UP_RETENTION` belonged to;
        :attr:`Principal.UNBOUND` if none is remembered (or it was never sent)."""
        now = self._clock()
        given_up = self._given_up
        while given_up:  # oldest first: drop what the server has forgotten too
            oldest = next(iter(given_up))
            if now - given_up[oldest][1] < GIVEN_UP_RETENTION:
                break
            del given_up[oldest]
        entry = given_up.get(request_id)
        return Principal.UNBOUND if entry is None else entry[0]

    def abandon_user_mutations(self) -> list[Event]:
        """The client signed out (or its source has no user any more): fail every pending
        mutation issued under a user (or before the user was known) with ``unauthenticated``;
        none is ever sent under another identity."""
        events: list[Event] = []
        for request_id, mutation in list(self.mutations.items()):
            if mutation.user is not None:
                del self.mutations[request_id]
                events.append(
                    MutationDone(
                        request_id, error=(FunctionErrorCode.UNAUTHENTICATED, USER_CHANGED_MESSAGE)
                    )
                )
        return events

    def ping(self) -> None:
        """Queue ``ping`` (the heartbeat the server's timeout counts)."""
        if self.phase is Phase.CLOSED:
            raise RuntimeError("not connected")
        self._outbox.append(_PING_FRAME)

    def validate(self) -> None:
        """Raise ``AssertionError`` if the state breaks an invariant (for tests)."""
        for request_id, mutation in self.mutations.items():
            assert 0 <= request_id <= MAX_SAFE_INT
            if mutation.sent:
                assert self.phase is not Phase.CLOSED, "sent on no connection"
                assert mutation.retry_at is None, "sent while waiting to retry"
                assert mutation.user is not Principal.UNBOUND, "sent before its user was bound"
                assert mutation.epoch <= self.auth_version
        if self.phase is Phase.CLOSED:
            assert self.identity is None and not self.pending_auth and not self.ready
            assert not self.lapsed and not self.held
        if self.identity is None:
            assert self.identity_expires_at is None
        if self.lapsed:
            assert self.identity is None, "lapsed while holding an identity"
        assert set(self._expects) == set(self.pending_auth)
        assert {sub.wire: h for h, sub in self.subscriptions.items()} == self._wire
        for sub in self.subscriptions.values():
            if sub.behind is not None:
                assert sub.sent and sub.behind in self.pending_auth, "behind an answered request"
        if not self.pending_auth and self.presumed_user is not Principal.UNKNOWN:
            held = self.identity.user_id if self.identity is not None else None
            assert self.presumed_user == held, (self.presumed_user, held)

    # ------------------------------------------------------------------ identity changes

    def _resend_sent_before(self, boundary: int) -> None:
        """The identity mutations sent before auth request ``boundary`` ran under has ended:
        their results may never come (rule 1). They go out again, same ``requestId``, when the
        connection is their user again."""
        for mutation in self.mutations.values():
            if mutation.sent and mutation.epoch < boundary:
                mutation.sent = False

    def _fail_other_users(self, user: str | None, boundary: int) -> list[Event]:
        """The connection now runs as ``user`` (auth request ``boundary``): fail the pending
        mutations of other users, except those sent after the request (they run as ``user``
        and are answered)."""
        events: list[Event] = []
        for request_id, mutation in list(self.mutations.items()):
            if mutation.user is Principal.UNBOUND or mutation.user == user:
                continue
            if mutation.sent and mutation.epoch >= boundary:
                continue
            del self.mutations[request_id]
            events.append(
                MutationDone(
                    request_id, error=(FunctionErrorCode.UNAUTHENTICATED, USER_CHANGED_MESSAGE)
                )
            )
        return events

    def _check_pipelined(self, version: int) -> None:
        """Auth request ``version`` was answered (the connection's identity is now what it
        established). If that is not the identity expected (the request failed — on a new
        connection even ``unavailable`` leaves no identity — or named another user), the
        client is in a gap: the shell will try another credential, or settle as anonymous or
        signed out. Nothing goes out in the gap (:attr:`held`, until the next auth request is
        queued or the shell calls :meth:`identity_settled`): a subscription or a mutation
        issued while signing in must not run as the gap's anonymous caller.

        Subscriptions pipelined behind the request ran under that identity: their results must
        not reach the application. Each moves to a new ``queryId``: ``unsubscribe`` goes out for
        the old one, whose results (computed after the answer, so arriving after it) are
        ignored, and a ``subscribe`` with the new one goes out once the gap ends. (Resuming the
        old ``queryId`` would not do: the server sends a result only when it changes, and the
        client could not tell a late result of the old run from the first of the new one.)"""
        expected = self._expects.pop(version, Principal.UNKNOWN)
        behind = [sub for sub in self.subscriptions.values() if sub.behind == version]
        for sub in behind:
            sub.behind = None
        actual = self.identity.user_id if self.identity is not None else None
        if expected is Principal.UNKNOWN or expected is Principal.UNBOUND:
            as_expected = actual is not None
        else:
            as_expected = actual == expected
        if as_expected:
            return
        if version == self.auth_version:
            self.held = True  # else a newer request went out already: what follows runs under it
        for sub in behind:
            handle = self._wire.pop(sub.wire)
            self._send_unsubscribe(sub.wire)
            sub.wire = self._next_query_id
            self._next_query_id += 1
            self._wire[sub.wire] = handle
            sub.sent = False

    def _defer(self, request_id: int, mutation: _Mutation, code: str) -> list[Event]:
        if not mutation.sent:
            return []  # already due to be sent again (a newer identity, a reconnect)
        delay = self.retry_backoff.delay(mutation.attempt, self._rand())
        mutation.attempt += 1
        mutation.sent = False
        mutation.retry_at = self._clock() + delay
        return [MutationDeferred(request_id, code, delay)]

    # ------------------------------------------------------------------ receiving

    def receive(self, text: str | bytes) -> list[Event]:
        """One frame from the server; returns what it means for the application.

        Nothing is sent from here: the shell calls :meth:`flush` once it has handled the
        events (and updated the readiness they may change)."""
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            return [Unrecognized(str(text)[:200])]
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return [Unrecognized(str(text)[:200])]
        handler = _HANDLERS.get(frame["type"])
        if handler is None:
            return [Unrecognized(str(text)[:200])]
        return handler(self, frame)

    def _on_connected(self, frame: dict[str, Any]) -> list[Event]:
        self.phase = Phase.CONNECTED
        self.connection_id = str(frame.get("connectionId", ""))
        return [
            Connected(
                self.connection_id,
                _int(frame.get("serverTime")) or 0,
                _int(frame.get("protocol")) or 0,
            )
        ]

    def _on_auth_ok(self, frame: dict[str, Any]) -> list[Event]:
        version = _int(frame.get("authVersion")) or 0
        self.pending_auth.pop(version, None)
        raw = frame.get("identity")
        identity = (
            Identity(str(raw.get("userId")), str(raw.get("sessionId")))
            if isinstance(raw, dict)
            else None
        )
        expires_at = _int(frame.get("expiresAt"))
        old = self.identity
        self.identity = identity
        self.identity_expires_at = expires_at if identity is not None else None
        self.lapsed = False
        if _principal(old) != _principal(identity):
            self._resend_sent_before(version)
        self._check_pipelined(version)
        tokens = frame.get("tokens")
        events: list[Event] = [
            AuthOk(
                version,
                identity,
                expires_at,
                _int(frame.get("serverTime")) or 0,
                tokens if isinstance(tokens, dict) else None,
            )
        ]
        if version == self.auth_version:  # the newest request: what later frames run under
            user = identity.user_id if identity is not None else None
            self.presumed_user = user
            events += self._fail_other_users(user, version)
        return events

    def _on_auth_error(self, frame: dict[str, Any]) -> list[Event]:
        version = _int(frame.get("authVersion")) or 0
        self.pending_auth.pop(version, None)
        code = str(frame.get("code"))
        if code not in IDENTITY_KEEPING_AUTH_CODES:
            # "the connection is now anonymous"; unavailable/rate_limited keep it (rule 2)
            if self.identity is not None:
                self._resend_sent_before(version)
            self.identity = None
            self.identity_expires_at = None
            self.lapsed = False  # our own request failed: the server runs what follows as none
        if version == self.auth_version:
            self.presumed_user = self.identity.user_id if self.identity is not None else None
        self._check_pipelined(version)
        return [AuthFailed(version, code, str(frame.get("message", "")))]

    def _identity_ended(self) -> None:
        """A push ended the identity: what was sent before any pending auth request ran under
        it; what was sent after runs under that request's answer."""
        if self.identity is not None:
            boundary = min(self.pending_auth, default=self.auth_version + 1)
            self._resend_sent_before(boundary)
        self.identity = None
        self.identity_expires_at = None
        self.lapsed = True
        if not self.pending_auth:
            self.presumed_user = None

    def _on_auth_expiring(self, frame: dict[str, Any]) -> list[Event]:
        expires_at = _int(frame.get("expiresAt"))
        if expires_at is None or self.identity is None or expires_at != self.identity_expires_at:
            return []  # about an identity the connection no longer holds
        return [AuthExpiring(expires_at, _int(frame.get("serverTime")) or 0)]

    def _on_auth_expired(self, frame: dict[str, Any]) -> list[Event]:
        expires_at = _int(frame.get("expiresAt")) or 0
        self._identity_ended()
        return [AuthExpired(expires_at, _int(frame.get("serverTime")) or 0)]

    def _on_session_revoked(self, frame: dict[str, Any]) -> list[Event]:
        self._identity_ended()
        return [SessionRevoked(str(frame.get("reason", "revoked")))]

    def _on_transition(self, frame: dict[str, Any]) -> list[Event]:
        version = _int(frame.get("version")) or 0
        self.version = max(self.version, version)
        events: list[Event] = []
        updates = frame.get("updates")
        for update in updates if isinstance(updates, list) else ():
            if not isinstance(update, dict):
                continue
            wire = _int(update.get("queryId"))
            query_id = self._wire.get(wire) if wire is not None else None
            if query_id is None:
                continue  # unsubscribed meanwhile, or moved (see _check_pipelined)
            error = update.get("error")
            if isinstance(error, dict):
                pair = (str(error.get("code")), str(error.get("message", "")))
                events.append(QueryUpdate(query_id, version, error=pair))
            else:
                events.append(QueryUpdate(query_id, version, value=update.get("value")))
        return events

    def _on_mutation_result(self, frame: dict[str, Any]) -> list[Event]:
        request_id = _int(frame.get("requestId"))
        mutation = self.mutations.get(request_id) if request_id is not None else None
        if request_id is None or mutation is None:
            return []  # a duplicate answer, or one the caller gave up on
        error = frame.get("error")
        if isinstance(error, dict):
            pair = (str(error.get("code")), str(error.get("message", "")))
            if pair[0] in RETRY_MUTATION_CODES:
                return self._defer(request_id, mutation, pair[0])
            if (
                pair[0] == FunctionErrorCode.UNAUTHENTICATED
                and isinstance(mutation.user, str)
                and self.identity is None
            ):
                # Sent for its user, answered while the connection has no identity: the
                # server ended the identity before it ran (a freeze, a race with the token's
                # expiry) and ran nothing (a lapsed connection), or ran it as nobody and the
                # function refused. Either way nothing was written for its user: it goes out
                # again, same requestId, once the connection is that user again (or fails
                # when another user signs in or the client signs out).
                mutation.sent = False
                return []
            del self.mutations[request_id]
            return [MutationDone(request_id, error=pair)]
        del self.mutations[request_id]
        version = _int(frame.get("version"))
        if version is not None:
            self.version = max(self.version, version)
        return [MutationDone(request_id, value=frame.get("value"), version=version)]

    def _on_error(self, frame: dict[str, Any]) -> list[Event]:
        code, message = str(frame.get("code")), str(frame.get("message", ""))
        wire, request_id = _int(frame.get("queryId")), _int(frame.get("requestId"))
        query_id = self._wire.pop(wire, None) if wire is not None else None
        if query_id is not None:
            del self.subscriptions[query_id]
            return [QueryRejected(query_id, code, message)]
        mutation = self.mutations.get(request_id) if request_id is not None else None
        if request_id is not None and mutation is not None:
            if code in RETRY_MUTATION_CODES:
                return self._defer(request_id, mutation, code)
            del self.mutations[request_id]
            return [MutationDone(request_id, error=(code, message))]
        return [ServerError(code, message)]

    def _on_pong(self, frame: dict[str, Any]) -> list[Event]:
        return [Pong(_int(frame.get("serverTime")) or 0)]


_HANDLERS: dict[str, Callable[[ClientCore, dict[str, Any]], list[Event]]] = {
    ServerMessageType.CONNECTED: ClientCore._on_connected,
    ServerMessageType.AUTH_OK: ClientCore._on_auth_ok,
    ServerMessageType.AUTH_ERROR: ClientCore._on_auth_error,
    ServerMessageType.AUTH_EXPIRING: ClientCore._on_auth_expiring,
    ServerMessageType.AUTH_EXPIRED: ClientCore._on_auth_expired,
    ServerMessageType.SESSION_REVOKED: ClientCore._on_session_revoked,
    ServerMessageType.TRANSITION: ClientCore._on_transition,
    ServerMessageType.MUTATION_RESULT: ClientCore._on_mutation_result,
    ServerMessageType.ERROR: ClientCore._on_error,
    ServerMessageType.PONG: ClientCore._on_pong,
}

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MUTATION_RETRY_BACKOFF",
    "IDENTITY_KEEPING_AUTH_CODES",
    "PROTOCOL_VERSION",
    "REQUEST_IDS_PER_MS",
    "RETRY_MUTATION_CODES",
    "USER_CHANGED_MESSAGE",
    "AuthExpired",
    "AuthExpiring",
    "AuthFailed",
    "AuthOk",
    "AuthState",
    "AuthStatus",
    "Backoff",
    "ClientCore",
    "CloseDecision",
    "Connected",
    "ConnectionState",
    "ConnectionStatus",
    "Event",
    "Identity",
    "MutationDeferred",
    "MutationDone",
    "Pong",
    "Principal",
    "QueryRejected",
    "QueryUpdate",
    "ReconnectPlan",
    "Reconnector",
    "ServerError",
    "SessionRevoked",
    "Unrecognized",
    "User",
    "close_decision",
    "initial_request_id",
    "renewal_due",
    "token_subject",
]
