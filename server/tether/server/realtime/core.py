"""The ``/sync`` protocol, sans I/O: parse client frames, run the per-connection state machine.

Nothing here touches a socket, Redis or the event loop's clock. :class:`ConnectionCore` takes
parsed messages, results of work the shell did for it, and the time (``now``, seconds since the
epoch), and returns :data:`Action`\\ s for the shell (``tether.server.realtime.endpoint``) to carry
out: frames to send, a close, token checks, function runs, session (un)binding, and the next
deadline. Tests of the protocol drive it directly with a fake clock: no socket, no sleep.

Identity rules (protocol §3, "Guarantees"):

* ``authenticate``/``refresh`` requests are processed one at a time in the order received, and
  their ``authVersion`` must grow, so an answer can never overwrite a newer identity.
* Messages take effect in the order sent (contract §5 rule 1): a ``subscribe``, ``unsubscribe``
  or ``mutate`` that arrives while an auth request is being answered is *held* and dispatched
  after that answer, under the identity it established (or none). A client may pipeline
  ``connect``, ``authenticate``, its subscriptions and its re-sent mutations.
* Every identity has a *generation*. Work started under one generation whose result arrives
  under another is dropped: no result computed under an ended identity is sent, a
  ``mutation_result`` included.
* An ``auth_error`` ``unavailable`` or ``rate_limited`` keeps the current identity (rule 2): a
  Redis blip during a routine refresh blanks nothing.
* A successful ``mutation_result`` at version v waits until every subscription of the connection
  has had a result under the current identity and the connection is at version >= v (rule 5:
  read your writes, for replayed outcomes too).
* An identity the *server* ended (``auth_expired``, ``session_revoked``) leaves the connection
  *lapsed* until the client next authenticates: a ``mutate`` then is answered
  ``unauthenticated`` and runs nothing. It was sent for the identity that ended (a client
  woken from a freeze, or racing its token's expiry, has not read the push yet); run as
  anonymous it would apply a user's write as nobody, and again as the user when re-sent (its
  outcome is keyed by user). Queries still run, as anonymous.
* ``exp + leeway`` is checked whenever something is about to run or be sent (:meth:`_tick`),
  not only when the timer fires.
* A refresh that keeps user and session only moves the deadlines: same generation, no re-run.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tether.protocol import (
    MAX_SAFE_INT,
    PROTOCOL_VERSION,
    AuthErrorCode,
    ClientMessageType,
    CloseCode,
    ErrorCode,
    FunctionErrorCode,
    MutationErrorCode,
    ServerMessageType,
    SessionEndReason,
)
from tether.server.json_input import JSONInputError, parse_client_json

#: ``auth_error`` codes that leave the connection's identity in place (contract §5 rule 2).
TRANSIENT_AUTH_ERRORS = frozenset({AuthErrorCode.UNAVAILABLE, AuthErrorCode.RATE_LIMITED})

#: The answer to a ``mutate`` on a lapsed connection (see the module docstring).
LAPSED_MESSAGE = "the identity has ended; authenticate again (nothing ran)"

#: The answer to a ``mutate`` held behind an auth request that failed transiently.
UNDECIDED_MESSAGE = (
    "the authentication sent before this mutation could not be completed; nothing ran:"
    " re-send with the same requestId"
)


def _undecided_result(request_id: int) -> Send:
    return Send(
        {
            "type": ServerMessageType.MUTATION_RESULT,
            "requestId": request_id,
            "error": {"code": MutationErrorCode.UNAVAILABLE.value, "message": UNDECIDED_MESSAGE},
        }
    )


#: Upper bounds (characters) of what a ``transition`` adds around its results: the frame's own
#: fields, and each update's ``queryId`` and key (a value's, or an error's ``code``/``message``
#: keys, which its text in :attr:`_Subscription.last_value` leaves out). With them, the sum a
#: connection's results are held to bounds every transition it can receive (contract §5 rule 9).
TRANSITION_ENVELOPE = 64
UPDATE_ENVELOPE = 64
#: Upper bound (characters) of what a ``mutation_result`` adds around its value: a result is
#: held to the send limit less this, so no ``mutation_result`` is over the send limit either.
RESULT_ENVELOPE = 128

#: ``connect`` must arrive within this many seconds of the upgrade (contract).
CONNECT_TIMEOUT = 10.0
MAX_CLIENT_ID_CHARS = 128
MAX_NAME_CHARS = 128
MAX_TOKEN_CHARS = 8192


# --------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol: int


@dataclass(frozen=True, slots=True)
class Authenticate:
    token: str | None
    auth_version: int


@dataclass(frozen=True, slots=True)
class Refresh:
    refresh_token: str
    auth_version: int
    retry_key: str | None


@dataclass(frozen=True, slots=True)
class Subscribe:
    query_id: int
    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    query_id: int


@dataclass(frozen=True, slots=True)
class Mutate:
    request_id: int
    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientMessage: TypeAlias = (
    Connect | Authenticate | Refresh | Subscribe | Unsubscribe | Mutate | Ping
)


class BadMessage(Exception):
    """A frame the contract rejects with an ``error`` message; the connection stays open."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        query_id: int | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.query_id = query_id
        self.request_id = request_id

    def to_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "type": ServerMessageType.ERROR,
            "code": self.code.value,
            "message": self.message,
        }
        if self.query_id is not None:
            frame["queryId"] = self.query_id
        if self.request_id is not None:
            frame["requestId"] = self.request_id
        return frame


def _int_field(doc: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SAFE_INT:
        raise BadMessage(ErrorCode.BAD_MESSAGE, f"{name} must be a non-negative integer")
    return value


def _str_field(doc: dict[str, Any], name: str, max_chars: int, *, nullable: bool = False) -> Any:
    value = doc.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise BadMessage(
            ErrorCode.BAD_MESSAGE, f"{name} must be a string of 1 to {max_chars} characters"
        )
    return value


def _args_field(doc: dict[str, Any], **ids: int | None) -> dict[str, Any]:
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise BadMessage(ErrorCode.BAD_MESSAGE, "args must be an object", **ids)
    return args


def parse_client_message(frame: str | bytes, *, max_depth: int = 64) -> ClientMessage:
    """Parse one frame; raise :class:`BadMessage` (``bad_message`` or ``unknown_type``).

    The frame must be strict JSON nested at most ``max_depth`` deep (the frame's own object is
    one level; see :func:`tether.server.json_input.parse_client_json`).
    """
    if not isinstance(frame, str):
        raise BadMessage(ErrorCode.BAD_MESSAGE, "frames must be text frames holding JSON")
    try:
        doc = parse_client_json(frame, max_depth=max_depth)
    except JSONInputError as exc:
        raise BadMessage(ErrorCode.BAD_MESSAGE, f"the frame {exc}") from None
    if not isinstance(doc, dict):
        raise BadMessage(ErrorCode.BAD_MESSAGE, "the frame is not a JSON object")
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise BadMessage(ErrorCode.BAD_MESSAGE, "the frame has no string field 'type'")
    if kind == ClientMessageType.CONNECT:
        protocol = _int_field(doc, "protocol")
        assert protocol is not None
        return Connect(_str_field(doc, "clientId", MAX_CLIENT_ID_CHARS), protocol)
    if kind == ClientMessageType.AUTHENTICATE:
        if "token" not in doc:
            raise BadMessage(ErrorCode.BAD_MESSAGE, "token is required (null for anonymous)")
        version = _int_field(doc, "authVersion")
        assert version is not None
        return Authenticate(_str_field(doc, "token", MAX_TOKEN_CHARS, nullable=True), version)
    if kind == ClientMessageType.REFRESH:
        version = _int_field(doc, "authVersion")
        assert version is not None
        return Refresh(
            _str_field(doc, "refreshToken", MAX_TOKEN_CHARS),
            version,
            _str_field(doc, "retryKey", MAX_TOKEN_CHARS, nullable=True),
        )
    if kind == ClientMessageType.SUBSCRIBE:
        query_id = _int_field(doc, "queryId")
        assert query_id is not None
        try:
            name = _str_field(doc, "name", MAX_NAME_CHARS)
        except BadMessage as exc:
            raise BadMessage(exc.code, exc.message, query_id=query_id) from None
        return Subscribe(query_id, name, _args_field(doc, query_id=query_id))
    if kind == ClientMessageType.UNSUBSCRIBE:
        query_id = _int_field(doc, "queryId")
        assert query_id is not None
        return Unsubscribe(query_id)
    if kind == ClientMessageType.MUTATE:
        request_id = _int_field(doc, "requestId")
        assert request_id is not None
        try:
            name = _str_field(doc, "name", MAX_NAME_CHARS)
        except BadMessage as exc:
            raise BadMessage(exc.code, exc.message, request_id=request_id) from None
        return Mutate(request_id, name, _args_field(doc, request_id=request_id))
    if kind == ClientMessageType.PING:
        return Ping()
    raise BadMessage(ErrorCode.UNKNOWN_TYPE, "unknown message type")


def _rate_limited(message: ClientMessage | None) -> BadMessage:
    """The ``rate_limited`` error for a dropped frame (``message``, or ``None`` when it does not
    parse), naming its queryId/requestId if it has one, so the client knows which request will
    get no other answer."""
    error = BadMessage(ErrorCode.RATE_LIMITED, "too many messages; this one was dropped")
    if isinstance(message, Subscribe):
        error.query_id = message.query_id
    elif isinstance(message, Mutate):
        error.request_id = message.request_id
    return error


# --------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` (a JSON-ready dict) to the client.

    ``text``, when given, is ``frame`` already encoded (:func:`encode_frame`): a transition that
    many connections receive identically is encoded once and shared.
    """

    frame: dict[str, Any]
    text: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Check an access token and its session; answer with ``auth_succeeded``/``auth_failed``."""

    auth_version: int
    token: str


@dataclass(frozen=True, slots=True)
class RotateRefresh:
    """Rotate a refresh token; answer with ``auth_succeeded`` (with tokens) or ``auth_failed``."""

    auth_version: int
    refresh_token: str
    retry_key: str | None


@dataclass(frozen=True, slots=True)
class RunQueries:
    """Evaluate these subscriptions under ``identity`` (generation ``generation``) and answer
    with :meth:`ConnectionCore.queries_done`."""

    generation: int
    identity: Identity | None
    queries: tuple[tuple[int, str, dict[str, Any]], ...]
    #: One per query: hand it back in :attr:`QueryResult.serial` so a result is never taken
    #: for a later subscription that reuses the same ``queryId``.
    serials: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class RunMutation:
    generation: int
    identity: Identity | None
    request_id: int
    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DropQuery:
    """The client unsubscribed ``query_id``: stop evaluating it for this connection."""

    query_id: int


@dataclass(frozen=True, slots=True)
class BindSession:
    session_id: str


@dataclass(frozen=True, slots=True)
class UnbindSession:
    session_id: str


Action: TypeAlias = (
    Send
    | Close
    | VerifyToken
    | RotateRefresh
    | RunQueries
    | RunMutation
    | DropQuery
    | BindSession
    | UnbindSession
)


# --------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    session_id: str
    issued_at: float  # seconds (JWT iat)
    expires_at: float  # seconds (JWT exp)

    def usable_until(self, leeway: float) -> float:
        """The instant (seconds) this identity ends: its ``exp`` plus the clock ``leeway``."""
        return self.expires_at + leeway

    def usable(self, now: float, leeway: float) -> bool:
        """May this identity still run or see anything at ``now``? (Not past ``exp + leeway``;
        whether its session ended is the caller's to check.)"""
        return now < self.usable_until(leeway)

    def same_principal(self, other: Identity | None) -> bool:
        return (
            other is not None
            and other.user_id == self.user_id
            and other.session_id == self.session_id
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits; each breach has a named code (see ``docs/protocol.md``)."""

    max_subscriptions: int = 256
    max_pending_auth: int = 4
    max_pending_mutations: int = 64
    #: Messages held while an auth request is answered (rule 1): count and frame bytes. A
    #: reconnecting client sends at most its subscriptions and its pending mutations.
    max_held_messages: int = 256 + 64
    max_held_bytes: int = 1 << 20
    message_rate: tuple[int, float] = (200, 10.0)  # messages per window (seconds)
    auth_rate: tuple[int, float] = (20, 60.0)  # authenticate + refresh per window
    max_rate_violations: int = 20  # rate-limited messages before closing with 4429
    max_bad_messages: int = 20  # malformed messages before closing with 4500
    heartbeat_timeout: float = 75.0  # no frame from the client for this long → 4009
    #: The connection's current results together, as a transition carrying all of them would
    #: encode them (characters of JSON text, the send queue's unit). At most the send limit: no
    #: transition is then larger than it (contract §5 rule 9). A result that would take the
    #: total past it is refused with ``limit_exceeded`` and its subscription ends.
    max_result_chars: int = 1 << 20
    max_json_depth: int = 64  # a frame nested deeper is bad_message


@dataclass(frozen=True, slots=True)
class Timing:
    """Auth timing settings (seconds)."""

    expiry_notice: float = 60.0
    clock_leeway: float = 5.0

    def notice_for(self, identity: Identity) -> float:
        lifetime = max(identity.expires_at - identity.issued_at, 0.0)
        return min(self.expiry_notice, lifetime / 2)


class Phase(enum.Enum):
    AWAITING_CONNECT = "awaiting_connect"
    OPEN = "open"
    CLOSED = "closed"


class _Window:
    """A fixed-window counter: ``count`` events per ``seconds``."""

    __slots__ = ("count", "limit", "seconds", "started")

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit, self.seconds = limit, seconds
        self.started, self.count = 0.0, 0

    def allow(self, now: float) -> bool:
        if now - self.started >= self.seconds:
            self.started, self.count = now, 0
        self.count += 1
        return self.count <= self.limit


@dataclass(slots=True)
class _Subscription:
    name: str
    args: dict[str, Any]
    serial: int
    reads_identity: bool = True  # until its first result says otherwise
    last_value: str | None = None  # the JSON text last sent, to send only real changes
    #: Has it had a result under the current identity generation? (False from subscribe, and
    #: again when an identity change re-runs it.) A mutation's result waits for every
    #: subscription to be fresh (rule 5).
    fresh: bool = False
    #: What ``last_value`` takes of the connection's result budget: its length plus
    #: :data:`UPDATE_ENVELOPE` (0 before the first result).
    size: int = 0


@dataclass(frozen=True, slots=True)
class _RateLimited:
    """A queued auth request that will be refused with ``rate_limited`` in its turn."""

    auth_version: int


AuthRequest: TypeAlias = Authenticate | Refresh


@dataclass(frozen=True, slots=True)
class _HeldCall:
    """A ``subscribe``/``unsubscribe``/``mutate`` held behind an auth request (rule 1)."""

    message: Subscribe | Unsubscribe | Mutate
    size: int  # the frame's length, counted against ``Limits.max_held_bytes``


_Held: TypeAlias = AuthRequest | _RateLimited | _HeldCall


@dataclass(frozen=True, slots=True)
class _HeldResult:
    """A successful ``mutation_result`` waiting until the connection has seen ``version``
    (results of an identity that ended are dropped with it, so all are the current one's)."""

    version: int
    send: Send


@dataclass(slots=True)
class QueryResult:
    """One evaluated subscription: ``value_json`` (JSON text) or an ``error`` (code, message)."""

    query_id: int
    value_json: str | None = None
    error: tuple[str, str] | None = None
    reads_identity: bool = True
    serial: int | None = None  # from RunQueries.serials; None skips the check
    #: The identity generation it was computed under; None for a result that read no identity
    #: (valid under any). A result from another generation than the current one is dropped.
    generation: int | None = None


#: ``resolve(kind, name, args)`` returns the arguments to run ``name`` with (the one validation
#: of a call: what the core keeps and hands on in :class:`RunQueries` and :class:`RunMutation`),
#: or raises :class:`BadMessage` (``unknown_function`` when ``name`` is not a function of that
#: kind, ``bad_args`` when ``args`` do not fit it); pure, no I/O.
Resolver: TypeAlias = Callable[[str, str, dict[str, Any]], dict[str, Any]]


class ConnectionCore:
    """The state of one ``/sync`` connection. Every method returns the actions to run."""

    __slots__ = (
        "_auths",
        "_messages",
        "_resolve",
        "auth_in_flight",
        "bad_messages",
        "client_id",
        "connection_id",
        "expiring_sent",
        "generation",
        "held",
        "held_auths",
        "held_bytes",
        "held_results",
        "held_undecided",
        "identity",
        "lapsed",
        "last_seen",
        "limits",
        "max_auth_version",
        "mutations_in_flight",
        "opened_at",
        "phase",
        "rate_violations",
        "result_chars",
        "serials",
        "subscriptions",
        "timing",
        "version",
    )

    def __init__(
        self,
        *,
        connection_id: str,
        now: float,
        timing: Timing,
        limits: Limits,
        resolve: Resolver,
    ) -> None:
        """``resolve`` checks a call before it is queued (see :data:`Resolver`)."""
        self.connection_id = connection_id
        self.timing = timing
        self.limits = limits
        self._resolve = resolve
        self.mutations_in_flight = 0
        self.phase = Phase.AWAITING_CONNECT
        self.opened_at = now
        self.last_seen = now
        self.client_id: str | None = None
        self.identity: Identity | None = None
        self.lapsed = False  # the server ended the identity; the client has not re-authenticated
        self.generation = 0
        self.expiring_sent = False
        self.max_auth_version = -1
        self.auth_in_flight: AuthRequest | None = None
        # Messages waiting for the auth request in flight, in the order received (rule 1);
        # created when needed, dropped when empty. ``held_auths`` counts the auth requests in
        # it, ``held_bytes`` the frame bytes of the others.
        self.held: deque[_Held] | None = None
        self.held_auths = 0
        self.held_bytes = 0
        # Successful mutation results waiting for the subscriptions to catch up (rule 5).
        self.held_results: list[_HeldResult] | None = None
        # The auth request before the held messages now being released failed transiently:
        # who they were meant to run as is undecided (see _release_held).
        self.held_undecided = False
        self.subscriptions: dict[int, _Subscription] = {}
        #: The sum of the subscriptions' ``size``: what a transition carrying every current
        #: result would take, less :data:`TRANSITION_ENVELOPE` (see ``Limits.max_result_chars``).
        self.result_chars = 0
        self.serials = 0
        self.version = 0  # the highest version sent in a transition
        self.bad_messages = 0
        self.rate_violations = 0
        self._messages = _Window(*limits.message_rate)
        self._auths = _Window(*limits.auth_rate)

    # ------------------------------------------------------------------ helpers

    def _error(self, exc: BadMessage) -> list[Action]:
        return [Send(exc.to_frame())]

    def _close(self, code: CloseCode, reason: str) -> list[Action]:
        self.phase = Phase.CLOSED
        return [Close(int(code), reason)]

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run next (seconds), or ``None``."""
        if self.phase is Phase.CLOSED:
            return None
        if self.phase is Phase.AWAITING_CONNECT:
            return self.opened_at + CONNECT_TIMEOUT
        deadline = self.last_seen + self.limits.heartbeat_timeout
        ident = self.identity
        if ident is not None:
            if not self.expiring_sent:
                deadline = min(deadline, ident.expires_at - self.timing.notice_for(ident))
            deadline = min(deadline, ident.usable_until(self.timing.clock_leeway))
        return deadline

    def _set_identity(self, identity: Identity | None, now: float) -> list[Action]:
        """Adopt ``identity``; return binding changes and re-runs it causes (no auth frames)."""
        old = self.identity
        actions: list[Action] = []
        self.identity = identity
        self.expiring_sent = False
        if identity is not None and identity.same_principal(old):
            return actions  # same user and session: deadlines move, nothing else
        if identity is None and old is None:
            return actions  # anonymous stays anonymous: nothing to re-run
        self.generation += 1
        # Results computed under the identity that ended are never sent (rule 1).
        self._drop_held_results()
        if old is not None:
            actions.append(UnbindSession(old.session_id))
        if identity is not None:
            actions.append(BindSession(identity.session_id))
        rerun = [(qid, sub) for qid, sub in self.subscriptions.items() if sub.reads_identity]
        for _, sub in rerun:
            sub.fresh = False  # its result is the old identity's until the re-run answers
        if rerun:
            actions.append(
                RunQueries(
                    self.generation,
                    identity,
                    tuple((qid, sub.name, sub.args) for qid, sub in rerun),
                    tuple(sub.serial for _, sub in rerun),
                )
            )
        return actions

    def _tick(self, now: float) -> list[Action]:
        """Fire whatever is due: expiry pushes and deadlines. Called before any work runs."""
        ident = self.identity
        if ident is None or self.phase is not Phase.OPEN:
            return []
        actions: list[Action] = []
        server_time = int(now * 1000)
        expires_ms = int(ident.expires_at * 1000)
        if not ident.usable(now, self.timing.clock_leeway):
            actions.append(
                Send(
                    {
                        "type": ServerMessageType.AUTH_EXPIRED,
                        "expiresAt": expires_ms,
                        "serverTime": server_time,
                    }
                )
            )
            actions.extend(self._set_identity(None, now))
            self.lapsed = True
        elif not self.expiring_sent and now >= ident.expires_at - self.timing.notice_for(ident):
            self.expiring_sent = True
            actions.append(
                Send(
                    {
                        "type": ServerMessageType.AUTH_EXPIRING,
                        "expiresAt": expires_ms,
                        "serverTime": server_time,
                    }
                )
            )
        return actions

    # ------------------------------------------------------------------ inputs

    def on_timer(self, now: float) -> list[Action]:
        """The deadline from :meth:`next_deadline` (or a later time) has come."""
        if self.phase is Phase.AWAITING_CONNECT and now >= self.opened_at + CONNECT_TIMEOUT:
            return self._close(CloseCode.PROTOCOL_VIOLATION, "no connect message in time")
        if self.phase is Phase.OPEN and now >= self.last_seen + self.limits.heartbeat_timeout:
            return self._close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        return self._tick(now)

    def receive(self, frame: str | bytes, now: float) -> list[Action]:
        """A frame arrived from the client."""
        if self.phase is Phase.CLOSED:
            return []
        self.last_seen = now
        depth = self.limits.max_json_depth
        if not self._messages.allow(now):
            self.rate_violations += 1
            if self.rate_violations > self.limits.max_rate_violations:
                return self._close(CloseCode.RATE_LIMITED, "too many messages")
            try:
                dropped: ClientMessage | None = parse_client_message(frame, max_depth=depth)
            except BadMessage:
                dropped = None
            if isinstance(dropped, Authenticate | Refresh) and self.phase is Phase.OPEN:
                # Every auth request gets exactly one answer, in its turn: a client waits for
                # it (and what it sent behind it waits in ``held``).
                return self._tick(now) + self._on_auth_request(dropped, now, limited=True)
            return [Send(_rate_limited(dropped).to_frame())]
        try:
            message = parse_client_message(frame, max_depth=depth)
        except BadMessage as exc:
            self.bad_messages += 1
            if self.bad_messages > self.limits.max_bad_messages:
                return self._close(CloseCode.PROTOCOL_VIOLATION, "too many malformed messages")
            return self._error(exc)
        actions = self._tick(now)
        if self.phase is Phase.AWAITING_CONNECT:
            if now >= self.opened_at + CONNECT_TIMEOUT:
                return self._close(CloseCode.PROTOCOL_VIOLATION, "no connect message in time")
            return actions + self._on_first(message, now)
        return actions + self._dispatch(message, now, len(frame))

    def _on_first(self, message: ClientMessage, now: float) -> list[Action]:
        if not isinstance(message, Connect):
            return self._error(
                BadMessage(ErrorCode.NOT_CONNECTED, "the first message must be connect")
            )
        if message.protocol != PROTOCOL_VERSION:
            return self._close(CloseCode.UNSUPPORTED_PROTOCOL, "unsupported protocol version")
        self.phase = Phase.OPEN
        self.client_id = message.client_id
        return [
            Send(
                {
                    "type": ServerMessageType.CONNECTED,
                    "connectionId": self.connection_id,
                    "serverTime": int(now * 1000),
                    "protocol": PROTOCOL_VERSION,
                }
            )
        ]

    def _dispatch(self, message: ClientMessage, now: float, size: int = 0) -> list[Action]:
        if isinstance(message, Ping):
            return [Send({"type": ServerMessageType.PONG, "serverTime": int(now * 1000)})]
        if isinstance(message, Authenticate | Refresh):
            return self._on_auth_request(message, now)
        if isinstance(message, Subscribe | Unsubscribe | Mutate):
            if self.auth_in_flight is not None or self.held:
                return self._hold(message, size)
            return self._run_call(message)
        # A second connect: the connection is already open.
        return self._error(BadMessage(ErrorCode.BAD_MESSAGE, "already connected"))

    def _run_call(self, message: Subscribe | Unsubscribe | Mutate) -> list[Action]:
        if isinstance(message, Subscribe):
            return self._on_subscribe(message)
        if isinstance(message, Mutate):
            return self._on_mutate(message)
        sub = self.subscriptions.pop(message.query_id, None)
        if sub is None:
            return []
        self.result_chars -= sub.size
        actions: list[Action] = [DropQuery(message.query_id)]
        if not sub.fresh:
            actions.extend(self._release_results())  # it was what a result waited for
        return actions

    def _hold(self, message: Subscribe | Unsubscribe | Mutate, size: int) -> list[Action]:
        """Keep ``message`` until the auth requests before it are answered (rule 1)."""
        held = self.held
        if held is None:
            held = self.held = deque()
        limits = self.limits
        if (
            len(held) - self.held_auths >= limits.max_held_messages
            or self.held_bytes + size > limits.max_held_bytes
        ):
            return self._error(
                BadMessage(
                    ErrorCode.LIMIT_EXCEEDED,
                    "too many messages waiting for an authentication to be answered",
                    query_id=message.query_id if isinstance(message, Subscribe) else None,
                    request_id=message.request_id if isinstance(message, Mutate) else None,
                )
            )
        held.append(_HeldCall(message, size))
        self.held_bytes += size
        return []

    # ------------------------------------------------------------------ auth

    def _on_auth_request(
        self, message: AuthRequest, now: float, *, limited: bool = False
    ) -> list[Action]:
        """Queue an auth request; ``limited``: it broke the message rate (counted already) and
        is answered ``rate_limited`` in its turn."""
        version = message.auth_version
        if version <= self.max_auth_version:
            return self._error(
                BadMessage(
                    ErrorCode.BAD_MESSAGE,
                    "authVersion must be larger than any sent before on this connection",
                )
            )
        self.max_auth_version = version
        held = self.held
        if held is None:
            held = self.held = deque()
        if limited or not self._auths.allow(now) or self.held_auths >= self.limits.max_pending_auth:
            if not limited:
                self.rate_violations += 1
                if self.rate_violations > self.limits.max_rate_violations:
                    return self._close(CloseCode.RATE_LIMITED, "too many authentication attempts")
            # Answered in its turn, after the requests before it: answers stay in order.
            held.append(_RateLimited(version))
        else:
            held.append(message)
        self.held_auths += 1
        return self._release_held(now)

    def _release_held(self, now: float) -> list[Action]:
        """Dispatch held messages in order until one is an auth request that needs I/O."""
        actions: list[Action] = []
        held = self.held
        while self.auth_in_flight is None and held and self.phase is Phase.OPEN:
            item = held.popleft()
            if isinstance(item, _HeldCall):
                self.held_bytes -= item.size
                message = item.message
                if self.held_undecided and isinstance(message, Mutate):
                    # The identity it was sent for could not be established (rule 2 keeps the
                    # old one): running it as the old identity would write as the previous
                    # user (issue 11, item 4). Nothing runs; the client re-sends (rule 3).
                    actions.append(_undecided_result(message.request_id))
                else:
                    actions.extend(self._run_call(message))
                continue
            self.held_auths -= 1
            self.held_undecided = False
            if isinstance(item, _RateLimited):
                actions.extend(
                    self._auth_failure(
                        item.auth_version,
                        AuthErrorCode.RATE_LIMITED,
                        "too many authentication attempts",
                        now,
                    )
                )
            elif isinstance(item, Refresh):
                self.auth_in_flight = item
                actions.append(RotateRefresh(item.auth_version, item.refresh_token, item.retry_key))
            elif item.token is None:
                # Becoming anonymous needs no I/O: answer at once (rule 8: identity and
                # expiresAt are null).
                actions.append(
                    Send(
                        {
                            "type": ServerMessageType.AUTH_OK,
                            "authVersion": item.auth_version,
                            "identity": None,
                            "expiresAt": None,
                            "serverTime": int(now * 1000),
                        }
                    )
                )
                actions.extend(self._set_identity(None, now))
                self.lapsed = False  # anonymous by the client's choice
            else:
                self.auth_in_flight = item
                actions.append(VerifyToken(item.auth_version, item.token))
        if not held:
            self.held = None
            self.held_undecided = False
        return actions

    def auth_succeeded(
        self,
        auth_version: int,
        identity: Identity,
        now: float,
        tokens: dict[str, Any] | None = None,
    ) -> list[Action]:
        """The shell verified the token (or rotated the refresh token) for ``auth_version``."""
        if self.auth_in_flight is None or self.auth_in_flight.auth_version != auth_version:
            return []
        self.auth_in_flight = None
        if self.phase is Phase.CLOSED:
            return []
        if not identity.usable(now, self.timing.clock_leeway):
            return self._auth_failure(
                auth_version, AuthErrorCode.TOKEN_EXPIRED, "the token has expired", now
            ) + self._release_held(now)
        frame: dict[str, Any] = {
            "type": ServerMessageType.AUTH_OK,
            "authVersion": auth_version,
            "identity": {"userId": identity.user_id, "sessionId": identity.session_id},
            "expiresAt": int(identity.expires_at * 1000),
            "serverTime": int(now * 1000),
        }
        if tokens is not None:
            frame["tokens"] = tokens
        self.lapsed = False
        actions: list[Action] = [Send(frame), *self._set_identity(identity, now)]
        actions.extend(self._tick(now))  # an identity adopted inside its notice window
        return actions + self._release_held(now)

    def auth_failed(
        self, auth_version: int, code: AuthErrorCode, message: str, now: float
    ) -> list[Action]:
        """The shell refused the request ``auth_version``; the connection becomes anonymous."""
        if self.auth_in_flight is None or self.auth_in_flight.auth_version != auth_version:
            return []
        self.auth_in_flight = None
        if self.phase is Phase.CLOSED:
            return []
        return self._auth_failure(auth_version, code, message, now) + self._release_held(now)

    def _auth_failure(
        self, auth_version: int, code: AuthErrorCode, message: str, now: float
    ) -> list[Action]:
        frame = {
            "type": ServerMessageType.AUTH_ERROR,
            "authVersion": auth_version,
            "code": code.value,
            "message": message,
        }
        if code in TRANSIENT_AUTH_ERRORS:
            # Rule 2: the server could not decide now. The identity held stays (it still ends
            # at exp + leeway or on revocation): a Redis blip during a routine refresh must not
            # blank identity-dependent results.
            self.held_undecided = True
            return [Send(frame)]
        self.lapsed = False  # the client's own request failed: what follows runs under none
        return [Send(frame), *self._set_identity(None, now)]

    def session_ended(self, session_id: str, reason: SessionEndReason, now: float) -> list[Action]:
        """The session ``session_id`` ended somewhere in the deployment."""
        if self.identity is None or self.identity.session_id != session_id:
            return []
        if self.phase is not Phase.OPEN:
            return []
        actions: list[Action] = [
            Send({"type": ServerMessageType.SESSION_REVOKED, "reason": reason.value}),
            *self._set_identity(None, now),
        ]
        self.lapsed = True
        return actions

    # ------------------------------------------------------------------ functions

    def _on_subscribe(self, message: Subscribe) -> list[Action]:
        qid = message.query_id
        if qid in self.subscriptions:
            return self._error(
                BadMessage(ErrorCode.DUPLICATE_QUERY_ID, "queryId in use", query_id=qid)
            )
        if len(self.subscriptions) >= self.limits.max_subscriptions:
            return self._error(
                BadMessage(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"at most {self.limits.max_subscriptions} subscriptions per connection",
                    query_id=qid,
                )
            )
        try:
            args = self._resolve("query", message.name, message.args)
        except BadMessage as exc:
            exc.query_id = qid
            return self._error(exc)
        self.serials += 1
        self.subscriptions[qid] = _Subscription(message.name, args, self.serials)
        return [
            RunQueries(
                self.generation,
                self.identity,
                ((qid, message.name, args),),
                (self.serials,),
            )
        ]

    def _on_mutate(self, message: Mutate) -> list[Action]:
        if self.lapsed:
            return [
                Send(
                    {
                        "type": ServerMessageType.MUTATION_RESULT,
                        "requestId": message.request_id,
                        "error": {
                            "code": FunctionErrorCode.UNAUTHENTICATED.value,
                            "message": LAPSED_MESSAGE,
                        },
                    }
                )
            ]
        try:
            args = self._resolve("mutation", message.name, message.args)
        except BadMessage as exc:
            exc.request_id = message.request_id
            return self._error(exc)
        if self.mutations_in_flight >= self.limits.max_pending_mutations:
            return self._error(
                BadMessage(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"at most {self.limits.max_pending_mutations} mutations in flight",
                    request_id=message.request_id,
                )
            )
        self.mutations_in_flight += 1
        return [RunMutation(self.generation, self.identity, message.request_id, message.name, args)]

    def queries_done(
        self,
        generation: int,
        version: int,
        results: list[QueryResult],
        now: float,
        shared: dict[tuple[Any, ...], Send] | None = None,
    ) -> list[Action]:
        """Results of a :class:`RunQueries`. Sent as one ``transition`` if anything changed.

        ``shared`` is a dict the caller keeps for one delivery to many connections: connections
        that receive the same transition (same version, query ids and results) get the same
        :class:`Send`, built and encoded once (its ``text`` set).
        """
        actions = self._tick(now)
        if generation != self.generation or self.phase is not Phase.OPEN:
            return actions  # computed under an identity that has since ended or changed
        candidates: list[tuple[int, _Subscription, str, tuple[str, str] | None]] = []
        for result in results:
            sub = self.subscriptions.get(result.query_id)
            if sub is None or (result.serial is not None and result.serial != sub.serial):
                continue  # unsubscribed meanwhile (perhaps resubscribed under the same id)
            if result.generation is not None and result.generation != self.generation:
                continue  # computed under an identity this connection no longer has
            sub.reads_identity = result.reads_identity
            sub.fresh = True
            if result.error is not None:
                # A NUL cannot start JSON text, so an error never compares equal to a value.
                text = "\x00" + json.dumps(result.error)
            else:
                assert result.value_json is not None
                text = result.value_json
            if text == sub.last_value:
                continue
            candidates.append((result.query_id, sub, text, result.error))
        changed, refused = self._fit(candidates)
        for query_id, first in refused:
            # Before the transition: the client ends the subscription before it applies a
            # version at which the server no longer holds it.
            actions.append(Send(_over_budget(query_id, first, self.limits.max_result_chars)))
            actions.append(DropQuery(query_id))
        if not changed:
            if self.held_results and version > self.version and self._all_fresh():
                # Nothing changed, but the last subscription a held result waited for is now
                # current at ``version`` (every one of this delivery's entries is valid there):
                # say so, as advance_version would have had the subscription been fresh then.
                self.version = version
                actions.append(
                    Send({"type": ServerMessageType.TRANSITION, "version": version, "updates": []})
                )
            if self.held_results:
                actions.extend(self._release_results())
            return actions
        self.version = version = max(self.version, version)
        if shared is None:
            actions.append(Send(_transition(version, changed)))
            if self.held_results:
                actions.extend(self._release_results())
            return actions
        if len(changed) == 1:
            key: tuple[Any, ...] = (version, changed[0][0], changed[0][1])
        else:
            key = (version, *[(query_id, text) for query_id, text, _ in changed])
        send = shared.get(key)
        if send is None:
            frame = _transition(version, changed)
            send = shared[key] = Send(frame, encode_frame(frame))
        actions.append(send)
        if self.held_results:
            actions.extend(self._release_results())
        return actions

    def _fit(
        self, candidates: list[tuple[int, _Subscription, str, tuple[str, str] | None]]
    ) -> tuple[list[tuple[int, str, tuple[str, str] | None]], list[tuple[int, bool]]]:
        """Apply the new results that fit the connection's result budget; end the
        subscriptions of those that do not (contract §5 rule 9).

        Returns the changes to send (``(queryId, text, error)``, in the order given) and the
        refused ``(queryId, first)`` (``first``: it had no result yet, so the ``subscribe``
        itself is refused). Results that shrink are counted first, so what they free makes
        room; then those that grow, in the order given, each while the total still fits. A
        refused subscription is removed here; the caller tells the client and the shell.
        """
        budget = self.limits.max_result_chars - TRANSITION_ENVELOPE
        if len(candidates) == 1:  # a fan-out's common case, on every connection: no lists
            query_id, sub, text, error = candidates[0]
            size = len(text) + UPDATE_ENVELOPE
            if self.result_chars + size - sub.size <= budget:
                self.result_chars += size - sub.size
                sub.last_value, sub.size = text, size
                return [(query_id, text, error)], []
        sizes = [len(text) + UPDATE_ENVELOPE for _, _, text, _ in candidates]
        olds = [sub.size for _, sub, _, _ in candidates]
        total = self.result_chars + sum(sizes) - sum(olds)
        accepted = [True] * len(candidates)
        refused: list[tuple[int, bool]] = []
        if total > budget:  # rare: every result fits in the common case
            # Count what shrinks first, then let what grows in while it fits.
            total = self.result_chars
            for i, (size, old) in enumerate(zip(sizes, olds, strict=True)):
                if size <= old:
                    total += size - old
                else:
                    accepted[i] = False
            for i, (query_id, sub, _, _) in enumerate(candidates):
                if accepted[i]:
                    continue
                if total + sizes[i] - olds[i] <= budget:
                    accepted[i] = True
                    total += sizes[i] - olds[i]
                else:
                    total -= olds[i]  # it ends: what it held is freed
                    del self.subscriptions[query_id]
                    refused.append((query_id, sub.last_value is None))
        self.result_chars = total
        changed: list[tuple[int, str, tuple[str, str] | None]] = []
        for (query_id, sub, text, error), size, ok in zip(candidates, sizes, accepted, strict=True):
            if ok:
                sub.last_value, sub.size = text, size
                changed.append((query_id, text, error))
        return changed, refused

    def _all_fresh(self) -> bool:
        return all(sub.fresh for sub in self.subscriptions.values())

    def advance_version(self, version: int, now: float) -> list[Action]:
        """Every subscription of this instance is delivered at ``version``: tell the client
        that all its subscriptions are current there (an empty ``transition``), if it has not
        seen that version yet (read your writes).

        Only when each of its subscriptions has had a result under the current identity: one
        still waiting for its first result (or for an identity change's re-run) is not current
        at any version yet, and its result, when it comes, carries a version >= ``version``.
        """
        actions = self._tick(now)
        if self.phase is not Phase.OPEN or version <= self.version or not self._all_fresh():
            return actions
        self.version = version
        if not self.subscriptions:
            # No subscription to say it of: the version rides on the mutation's result alone
            # (read your writes holds for every subscription the connection holds: none).
            if self.held_results:
                actions.extend(self._release_results())
            return actions
        actions.append(
            Send({"type": ServerMessageType.TRANSITION, "version": version, "updates": []})
        )
        if self.held_results:
            actions.extend(self._release_results())
        return actions

    def mutation_done(
        self,
        generation: int,
        request_id: int,
        now: float,
        *,
        value_json: str | None = None,
        version: int | None = None,
        error: tuple[str, str] | None = None,
    ) -> list[Action]:
        """The outcome of a :class:`RunMutation` started under identity ``generation``.

        Dropped when that identity has ended since (rule 1): the client re-sends the
        ``requestId`` once it holds the same user again, and gets the stored outcome. A success
        at version v is sent only once every subscription has had a result under this identity
        and the connection is at version >= v (rule 5); until then it is held.
        """
        actions = self._tick(now)
        if self.phase is not Phase.OPEN or generation != self.generation:
            self.mutations_in_flight = max(0, self.mutations_in_flight - 1)
            return actions
        frame: dict[str, Any] = {"type": ServerMessageType.MUTATION_RESULT, "requestId": request_id}
        if error is not None:
            frame["error"] = {"code": error[0], "message": error[1]}
            self.mutations_in_flight = max(0, self.mutations_in_flight - 1)
            actions.append(Send(frame))
            return actions
        frame["value"] = Raw(value_json if value_json is not None else "null")
        at = version if version is not None else self.version
        frame["version"] = at
        if at <= self.version and self._all_fresh():
            self.mutations_in_flight = max(0, self.mutations_in_flight - 1)
            actions.append(Send(frame))
            return actions
        # Still counted in flight: held results are bounded by max_pending_mutations.
        if self.held_results is None:
            self.held_results = []
        self.held_results.append(_HeldResult(at, Send(frame)))
        return actions

    def mutation_refused(self, generation: int, error: BadMessage) -> list[Action]:
        """A :class:`RunMutation` ran nothing and is answered with an ``error`` frame (its
        ``requestId`` is taken by another function: rule 4)."""
        self.mutations_in_flight = max(0, self.mutations_in_flight - 1)
        if self.phase is not Phase.OPEN or generation != self.generation:
            return []
        return self._error(error)

    def _release_results(self) -> list[Action]:
        """Send the held mutation results the connection has caught up with (rule 5)."""
        held = self.held_results
        if not held or not self._all_fresh():
            return []
        ready = [r for r in held if r.version <= self.version]
        if not ready:
            return []
        still = [r for r in held if r.version > self.version]
        self.held_results = still or None
        self.mutations_in_flight = max(0, self.mutations_in_flight - len(ready))
        return [r.send for r in ready]

    def _drop_held_results(self) -> None:
        if self.held_results:
            self.mutations_in_flight = max(0, self.mutations_in_flight - len(self.held_results))
            self.held_results = None

    def close(self) -> list[Action]:
        """The socket is gone: release what the connection holds."""
        if self.phase is Phase.CLOSED and self.identity is None:
            return []
        actions: list[Action] = []
        if self.identity is not None:
            actions.append(UnbindSession(self.identity.session_id))
            self.identity = None
        self.phase = Phase.CLOSED
        self.subscriptions.clear()
        self.result_chars = 0
        self.held = None
        self.held_auths = self.held_bytes = 0
        self._drop_held_results()
        return actions


def _over_budget(query_id: int, first: bool, limit: int) -> dict[str, Any]:
    """The ``error`` ending a subscription whose result does not fit the connection's budget."""
    if first:
        message = (
            f"the result would take this connection's results past {limit} characters"
            " (TETHER_MAX_CONNECTION_RESULT_BYTES); nothing is held"
        )
    else:
        message = (
            f"the result grew past what this connection may hold ({limit} characters,"
            " TETHER_MAX_CONNECTION_RESULT_BYTES); the subscription has ended"
        )
    return BadMessage(ErrorCode.LIMIT_EXCEEDED, message, query_id=query_id).to_frame()


def _transition(
    version: int, changed: list[tuple[int, str, tuple[str, str] | None]]
) -> dict[str, Any]:
    updates: list[dict[str, Any]] = []
    for query_id, text, error in changed:
        if error is not None:
            code, message = error
            updates.append({"queryId": query_id, "error": {"code": code, "message": message}})
        else:
            updates.append({"queryId": query_id, "value": Raw(text)})
    return {"type": ServerMessageType.TRANSITION, "version": version, "updates": updates}


@dataclass(frozen=True, slots=True)
class Raw:
    """Already-encoded JSON text, spliced into a frame as is: a result shared by many
    subscribers is serialised once, not once per connection."""

    text: str


def encode_frame(frame: Any) -> str:
    """Serialise a server frame to compact JSON, splicing in :class:`Raw` values."""
    if type(frame) is dict and frame.get("type") in _PLAIN_FRAMES:
        return _SCALAR.encode(frame)  # no Raw inside: the C encoder does it whole, ~5x faster
    out: list[str] = []
    _write(frame, out)
    return "".join(out)


#: One encoder for every scalar: ``json.dumps`` with non-default options builds a new encoder
#: per call, which was the largest single cost of a fan-out (bench/fanout.py, py-spy).
_SCALAR = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


#: Frames that never hold a :class:`Raw` value (results go in transitions and
#: mutation_results only): every connection gets a ``connected`` and an ``auth_ok``.
_PLAIN_FRAMES = frozenset(
    {
        ServerMessageType.CONNECTED,
        ServerMessageType.AUTH_OK,
        ServerMessageType.AUTH_ERROR,
        ServerMessageType.AUTH_EXPIRING,
        ServerMessageType.AUTH_EXPIRED,
        ServerMessageType.SESSION_REVOKED,
        ServerMessageType.PONG,
        ServerMessageType.ERROR,
    }
)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, Raw):
        out.append(value.text)
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_SCALAR.encode(str(key)))
            out.append(":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        out.append(_SCALAR.encode(value))
