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

* ``connect`` is the first frame of every connection, with the same ``clientId`` each time.
* ``authVersion`` grows with every ``authenticate``/``refresh`` the client ever sends, so it is
  strictly increasing on every connection.
* Subscriptions and mutations are sent only while the core is *ready* (the shell settled the
  identity first: a result computed for the wrong user is never asked for). After a reconnect
  every live subscription is sent again with its ``queryId``, and every mutation without an
  outcome is sent again with its original ``requestId``, so the server answers it with the
  original outcome instead of running it twice.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tether.client.errors import MessageTooLarge
from tether.protocol import (
    PROTOCOL_VERSION,
    ClientMessageType,
    CloseDecision,
    ServerMessageType,
    close_decision,
)

#: The server's default ``TETHER_MAX_MESSAGE_BYTES``.
DEFAULT_MAX_MESSAGE_BYTES = 65536
#: Renew an access token this long before its ``exp`` at the latest (seconds), or a quarter of
#: its lifetime when that is shorter. The server pushes ``auth_expiring`` earlier than this by
#: default (60 s, or half the lifetime), so the timer only fires when a push went missing.
DEFAULT_RENEWAL_MARGIN = 30.0


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
    | ServerError
    | Pong
    | Unrecognized
)


# --------------------------------------------------------------------------------- core


class Phase(enum.Enum):
    CLOSED = "closed"  # no socket
    OPENING = "opening"  # socket open, `connect` sent
    CONNECTED = "connected"  # `connected` received


@dataclass(slots=True)
class _Subscription:
    name: str
    args: dict[str, Any]
    sent: bool = False  # sent on the current connection


@dataclass(slots=True)
class _Mutation:
    name: str
    args: dict[str, Any]
    sent: bool = False


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ClientCore:
    """The protocol state of one client, across all of its connections.

    Calls return identifiers or events; frames to send accumulate until the shell takes them
    with :meth:`data_to_send`, in order. Frames are encoded when created, so a frame over
    ``max_message_bytes`` fails the call that made it
    (:class:`~tether.client.errors.MessageTooLarge`) instead of closing the connection with 1009
    later (and again after every replay).
    """

    def __init__(
        self,
        client_id: str,
        *,
        protocol: int = PROTOCOL_VERSION,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if not 1 <= len(client_id) <= 128:
            raise ValueError("client_id must be 1 to 128 characters")
        self.client_id = client_id
        self.protocol = protocol
        self.max_message_bytes = max_message_bytes
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
        #: The highest ``version`` seen in a ``transition`` or ``mutation_result``.
        self.version = 0
        self.subscriptions: dict[int, _Subscription] = {}
        self.mutations: dict[int, _Mutation] = {}
        self._next_query_id = 1
        self._next_request_id = 1
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
        self._outbox.clear()
        for sub in self.subscriptions.values():
            sub.sent = False
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
            self._flush()

    def _flush(self) -> None:
        for query_id, sub in self.subscriptions.items():
            if not sub.sent:
                self._send_subscribe(query_id, sub)
        for request_id, mutation in self.mutations.items():
            if not mutation.sent:
                self._send_mutate(request_id, mutation)

    # ------------------------------------------------------------------ auth

    def _auth_frame(self, frame: dict[str, Any], kind: str) -> int:
        if self.phase is not Phase.CONNECTED:
            raise RuntimeError("not connected")
        version = self.auth_version + 1
        text = self._encode({**frame, "authVersion": version})
        self.auth_version = version
        self.pending_auth[version] = kind
        self._outbox.append(text)
        return version

    def authenticate(self, token: str | None) -> int:
        """Queue ``authenticate`` (``None``: become anonymous); returns its authVersion."""
        return self._auth_frame(
            {"type": ClientMessageType.AUTHENTICATE, "token": token}, "authenticate"
        )

    def refresh(self, refresh_token: str, retry_key: str | None = None) -> int:
        """Queue an in-band ``refresh``; returns its authVersion."""
        frame: dict[str, Any] = {"type": ClientMessageType.REFRESH, "refreshToken": refresh_token}
        if retry_key is not None:
            frame["retryKey"] = retry_key
        return self._auth_frame(frame, "refresh")

    # ------------------------------------------------------------------ functions

    def subscribe(self, name: str, args: dict[str, Any]) -> int:
        """Add a subscription; returns its ``queryId``. Sent now if ready, else when ready."""
        query_id = self._next_query_id
        sub = _Subscription(name, dict(args))
        frame = self._encode(
            {"type": ClientMessageType.SUBSCRIBE, "queryId": query_id, "name": name, "args": args}
        )
        self._next_query_id += 1
        self.subscriptions[query_id] = sub
        if self.ready:
            self._outbox.append(frame)
            sub.sent = True
        return query_id

    def _send_subscribe(self, query_id: int, sub: _Subscription) -> None:
        frame = {
            "type": ClientMessageType.SUBSCRIBE,
            "queryId": query_id,
            "name": sub.name,
            "args": sub.args,
        }
        self._outbox.append(self._encode(frame))
        sub.sent = True

    def unsubscribe(self, query_id: int) -> None:
        """Drop a subscription; ``unsubscribe`` is sent only if the server has it."""
        sub = self.subscriptions.pop(query_id, None)
        if sub is not None and sub.sent and self.phase is Phase.CONNECTED:
            self._outbox.append(
                self._encode({"type": ClientMessageType.UNSUBSCRIBE, "queryId": query_id})
            )

    def mutate(self, name: str, args: dict[str, Any]) -> int:
        """Add a mutation; returns its ``requestId`` (unique for this ``clientId``)."""
        request_id = self._next_request_id
        mutation = _Mutation(name, dict(args))
        frame = self._encode(
            {"type": ClientMessageType.MUTATE, "requestId": request_id, "name": name, "args": args}
        )
        self._next_request_id += 1
        self.mutations[request_id] = mutation
        if self.ready:
            self._outbox.append(frame)
            mutation.sent = True
        return request_id

    def _send_mutate(self, request_id: int, mutation: _Mutation) -> None:
        frame = {
            "type": ClientMessageType.MUTATE,
            "requestId": request_id,
            "name": mutation.name,
            "args": mutation.args,
        }
        self._outbox.append(self._encode(frame))
        mutation.sent = True

    def forget_mutation(self, request_id: int) -> None:
        """Stop tracking a mutation (its caller gave up); it is not replayed any more."""
        self.mutations.pop(request_id, None)

    def ping(self) -> None:
        """Queue ``ping`` (the heartbeat the server's timeout counts)."""
        if self.phase is Phase.CLOSED:
            raise RuntimeError("not connected")
        self._outbox.append(_PING_FRAME)

    # ------------------------------------------------------------------ receiving

    def receive(self, text: str | bytes) -> list[Event]:
        """One frame from the server; returns what it means for the application."""
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
        self.identity = identity
        self.identity_expires_at = expires_at if identity is not None else None
        tokens = frame.get("tokens")
        return [
            AuthOk(
                version,
                identity,
                expires_at,
                _int(frame.get("serverTime")) or 0,
                tokens if isinstance(tokens, dict) else None,
            )
        ]

    def _on_auth_error(self, frame: dict[str, Any]) -> list[Event]:
        version = _int(frame.get("authVersion")) or 0
        self.pending_auth.pop(version, None)
        self.identity = None  # "the connection is now anonymous"
        self.identity_expires_at = None
        return [AuthFailed(version, str(frame.get("code")), str(frame.get("message", "")))]

    def _on_auth_expiring(self, frame: dict[str, Any]) -> list[Event]:
        expires_at = _int(frame.get("expiresAt"))
        if expires_at is None or self.identity is None or expires_at != self.identity_expires_at:
            return []  # about an identity the connection no longer holds
        return [AuthExpiring(expires_at, _int(frame.get("serverTime")) or 0)]

    def _on_auth_expired(self, frame: dict[str, Any]) -> list[Event]:
        expires_at = _int(frame.get("expiresAt")) or 0
        self.identity = None
        self.identity_expires_at = None
        return [AuthExpired(expires_at, _int(frame.get("serverTime")) or 0)]

    def _on_session_revoked(self, frame: dict[str, Any]) -> list[Event]:
        self.identity = None
        self.identity_expires_at = None
        return [SessionRevoked(str(frame.get("reason", "revoked")))]

    def _on_transition(self, frame: dict[str, Any]) -> list[Event]:
        version = _int(frame.get("version")) or 0
        self.version = max(self.version, version)
        events: list[Event] = []
        updates = frame.get("updates")
        for update in updates if isinstance(updates, list) else ():
            if not isinstance(update, dict):
                continue
            query_id = _int(update.get("queryId"))
            if query_id is None or query_id not in self.subscriptions:
                continue  # unsubscribed meanwhile
            error = update.get("error")
            if isinstance(error, dict):
                pair = (str(error.get("code")), str(error.get("message", "")))
                events.append(QueryUpdate(query_id, version, error=pair))
            else:
                events.append(QueryUpdate(query_id, version, value=update.get("value")))
        return events

    def _on_mutation_result(self, frame: dict[str, Any]) -> list[Event]:
        request_id = _int(frame.get("requestId"))
        if request_id is None or self.mutations.pop(request_id, None) is None:
            return []  # a duplicate answer, or one the caller gave up on
        error = frame.get("error")
        if isinstance(error, dict):
            pair = (str(error.get("code")), str(error.get("message", "")))
            return [MutationDone(request_id, error=pair)]
        version = _int(frame.get("version"))
        if version is not None:
            self.version = max(self.version, version)
        return [MutationDone(request_id, value=frame.get("value"), version=version)]

    def _on_error(self, frame: dict[str, Any]) -> list[Event]:
        code, message = str(frame.get("code")), str(frame.get("message", ""))
        query_id, request_id = _int(frame.get("queryId")), _int(frame.get("requestId"))
        if query_id is not None and self.subscriptions.pop(query_id, None) is not None:
            return [QueryRejected(query_id, code, message)]
        if request_id is not None and self.mutations.pop(request_id, None) is not None:
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
    "PROTOCOL_VERSION",
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
    "MutationDone",
    "Pong",
    "QueryRejected",
    "QueryUpdate",
    "ReconnectPlan",
    "Reconnector",
    "ServerError",
    "SessionRevoked",
    "Unrecognized",
    "close_decision",
    "renewal_due",
]
