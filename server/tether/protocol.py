"""The wire vocabulary of Tether's contract, defined once for both ends.

The server's sans-I/O core (:mod:`tether.server.realtime.core`), its HTTP auth API and the
client's core (:mod:`tether.client.core`) all import their message types, codes and close codes
from here, so the two ends cannot drift apart. ``docs/protocol.md`` documents the same tables;
change both together. Nothing here does I/O or imports any other part of Tether.

* :class:`ClientMessageType` and :class:`ServerMessageType`: the ``type`` of every ``/sync``
  frame.
* :class:`HTTPCode`, :class:`AuthErrorCode`, :class:`ErrorCode`, :class:`FunctionErrorCode`,
  :class:`MutationErrorCode`, :class:`SessionEndReason`: the codes of the HTTP API,
  ``auth_error``, ``error``, ``mutation_result`` and ``session_revoked``.
* :class:`CloseCode` and :func:`close_decision`: the WebSocket close codes and what each asks
  of a client (reconnect after a backoff, reconnect at once, or stop).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

#: The ``protocol`` of ``connect`` and ``connected``.
PROTOCOL_VERSION = 1
#: Integers on the wire (``queryId``, ``requestId``, ``authVersion``) must survive JavaScript's
#: Number.
MAX_SAFE_INT = 2**53 - 1


class ClientMessageType(StrEnum):
    """``type`` of a client → server frame on ``/sync`` (protocol §3)."""

    CONNECT = "connect"
    AUTHENTICATE = "authenticate"
    REFRESH = "refresh"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    MUTATE = "mutate"
    PING = "ping"


class ServerMessageType(StrEnum):
    """``type`` of a server → client frame on ``/sync`` (protocol §3)."""

    CONNECTED = "connected"
    AUTH_OK = "auth_ok"
    AUTH_ERROR = "auth_error"
    AUTH_EXPIRING = "auth_expiring"
    AUTH_EXPIRED = "auth_expired"
    SESSION_REVOKED = "session_revoked"
    TRANSITION = "transition"
    MUTATION_RESULT = "mutation_result"
    ERROR = "error"
    PONG = "pong"


class HTTPCode(StrEnum):
    """Error codes of the HTTP authentication API (protocol §2)."""

    INVALID_REQUEST = "invalid_request"
    EMAIL_TAKEN = "email_taken"
    INVALID_CREDENTIALS = "invalid_credentials"
    RATE_LIMITED = "rate_limited"
    REFRESH_INVALID = "refresh_invalid"
    REFRESH_REUSED = "refresh_reused"
    INVALID_TOKEN = "invalid_token"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"  # a path the API does not have
    # Browsers (§5 rule 10): a request from an Origin not in TETHER_ALLOWED_ORIGINS (a CORS
    # preflight, or a request that reads the refresh cookie), and a cookie-authenticated request
    # without the header Tether-CSRF: 1.
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    CSRF_REQUIRED = "csrf_required"


class AuthErrorCode(StrEnum):
    """Codes of the ``auth_error`` message on ``/sync`` (protocol §3)."""

    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    SESSION_REVOKED = "session_revoked"
    REFRESH_INVALID = "refresh_invalid"
    REFRESH_REUSED = "refresh_reused"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"


class ErrorCode(StrEnum):
    """Codes of the ``error`` message on ``/sync`` (protocol §3)."""

    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_CONNECTED = "not_connected"
    UNKNOWN_FUNCTION = "unknown_function"
    BAD_ARGS = "bad_args"
    DUPLICATE_QUERY_ID = "duplicate_query_id"
    LIMIT_EXCEEDED = "limit_exceeded"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class FunctionErrorCode(StrEnum):
    """Codes application functions raise; applications may add their own strings."""

    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"


class MutationErrorCode(StrEnum):
    """Codes the server itself puts in a ``mutation_result``'s ``error`` (besides the
    application's codes of :class:`FunctionErrorCode` and those of :class:`ErrorCode`)."""

    #: The server could not learn whether the mutation committed (Redis unreachable): the
    #: client re-sends the same ``requestId`` until it gets a definite answer (1.1 §5 rule 3).
    UNAVAILABLE = "unavailable"


class SessionEndReason(StrEnum):
    """Why a session ended: the ``reason`` of ``session_revoked`` and of session-ended events."""

    SIGNED_OUT = "signed_out"
    SIGNED_OUT_EVERYWHERE = "signed_out_everywhere"
    REFRESH_REUSED = "refresh_reused"
    SESSION_EXPIRED = "session_expired"
    REVOKED = "revoked"


class CloseCode(IntEnum):
    """WebSocket close codes. 4000–4499: reconnect with backoff; 4500–4999: do not."""

    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008  # sent before the accept: the upgrade is refused with HTTP 403
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # draining: reconnect at once, to any instance
    SLOW_CONSUMER = 4008
    HEARTBEAT_TIMEOUT = 4009
    RATE_LIMITED = 4429
    PROTOCOL_VIOLATION = 4500
    UNSUPPORTED_PROTOCOL = 4503


class CloseDecision(StrEnum):
    """What a close code asks of a client (protocol §3, "Close codes")."""

    #: Reconnect after a backoff: 4000–4499, and every code that says nothing more
    #: (1000, 1001, 1006 network loss, 1009, 1011, a failed handshake).
    RECONNECT = "reconnect"
    #: 1012: the instance is draining; reconnect at once, to another instance.
    RECONNECT_NOW = "reconnect_now"
    #: 4500–4999: do not reconnect until something changes; report it to the application.
    STOP = "stop"


#: Close codes in this range ask the client to reconnect with backoff …
RECONNECT_CODES = range(4000, 4500)
#: … and in this one, not to reconnect until something changes.
STOP_CODES = range(4500, 5000)


def close_decision(code: int | None) -> CloseDecision:
    """The decision for a close with ``code`` (``None``: no close frame, or no connection)."""
    if code == CloseCode.SERVICE_RESTART:
        return CloseDecision.RECONNECT_NOW
    if code is not None and code in STOP_CODES:
        return CloseDecision.STOP
    return CloseDecision.RECONNECT


#: The two kinds of application function, each with the other: a client subscribes to a query
#: and sends a mutation with ``mutate``.
_OTHER_KIND = {"query": "mutation", "mutation": "query"}


def wrong_kind_message(name: str, kind: str) -> str:
    """The ``message`` of ``unknown_function`` when ``name`` exists but is of the other kind
    (``kind`` is what it is: ``query`` or ``mutation``), e.g. ``'counter.get' is a query, not
    a mutation``. The code stays ``unknown_function``; only the text tells the two apart."""
    return f"{name!r} is a {kind}, not a {_OTHER_KIND[kind]}"


def kind_named_by(message: str) -> str | None:
    """What a :func:`wrong_kind_message` says its function is (``query`` or ``mutation``), or
    ``None`` for any other message: for a client's hint at the right call, never its logic."""
    for kind, other in _OTHER_KIND.items():
        if message.endswith(f" is a {kind}, not a {other}"):
            return kind
    return None
