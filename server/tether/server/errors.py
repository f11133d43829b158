"""The error and close-code vocabulary of Tether, defined once.

Every code that can reach a client over HTTP or the ``/sync`` socket is named here, with the
HTTP status it travels with where it has one. ``docs/protocol.md`` documents the same tables;
change both together.

Exception tree::

    CodedError                 carries a contract ``code`` and a human ``message``
    ├── HTTPError               an HTTP auth API failure: adds ``status`` and ``retry_after``
    └── FunctionError           raised by application functions (``unauthenticated`` …)
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


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
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"


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
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # draining: reconnect at once, to any instance
    SLOW_CONSUMER = 4008
    HEARTBEAT_TIMEOUT = 4009
    RATE_LIMITED = 4429
    PROTOCOL_VIOLATION = 4500
    UNSUPPORTED_PROTOCOL = 4503


class CodedError(Exception):
    """Base of Tether's errors: a contract ``code`` plus a message safe to show a client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HTTPError(CodedError):
    """A failure of the HTTP auth API, answered as ``{"error", "message"}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.retry_after = retry_after


class FunctionError(CodedError):
    """Raised by a query or mutation to fail with a code the client sees.

    Use one of :class:`FunctionErrorCode` or the application's own code string.
    """
