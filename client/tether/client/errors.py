"""The exceptions the client raises, and the codes it classifies.

Exception tree::

    TetherError                carries the contract ``code`` and a human ``message``
    ├── QueryError             a query failed: its function raised, or the server refused the
    │                          ``subscribe`` (``unknown_function``, ``bad_args`` …)
    ├── MutationError          a mutation failed, or the server refused the ``mutate``
    ├── OutcomeUnknown         a mutation's ``timeout`` passed without a definite answer: it
    │                          may or may not have been applied; ``request_id`` re-sends it
    ├── AuthError              the HTTP auth API refused a request (``invalid_credentials``,
    │                          ``email_taken``, ``refresh_reused`` …); adds ``status``
    ├── ClientClosed           the client stopped: closed by the application, or the server
    │                          closed with a 45xx code (``code`` is then the close code)
    └── MessageTooLarge        a frame the client would send is over the server's limit

Codes are strings, exactly as on the wire (see ``docs/protocol.md``): the client does not
invent its own, so an application can compare ``exc.code`` against the server's tables. The
exceptions that are the client's own say so with a code no server sends: ``closed`` /
``close_NNNN``, ``message_too_large``, ``outcome_unknown``.
"""

from __future__ import annotations

from enum import StrEnum


class TetherError(Exception):
    """Base of the client's errors: a contract ``code`` and a ``message``."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class QueryError(TetherError):
    """A query's result is an error (``unauthenticated``, ``internal``, an application code),
    or the server refused the subscription (``unknown_function``, ``bad_args``,
    ``limit_exceeded``)."""


class MutationError(TetherError):
    """A mutation failed with ``code``, or the server refused it before running it."""


class OutcomeUnknown(TetherError):
    """A mutation got no definite answer within its ``timeout``: it may or may not have been
    applied, and the client stopped sending it.

    Not a :class:`MutationError` (which is a definite failure: nothing was applied). Re-send it
    with the same ``request_id`` and the same arguments,
    ``await client.mutate(exc.name, request_id=exc.request_id, **args)``: the server answers with
    its outcome if it was applied, and runs it otherwise, so it is applied at most once (within
    the server's outcome retention, 15 minutes by default, and with the same user).

    ``user_id`` is the user it was sent as (``None``: anonymous, or never sent). A retry with
    its ``request_id`` belongs to that user: the client that raised this refuses it with
    ``MutationError("unauthenticated")`` once it runs as another user (or anonymous).
    """

    def __init__(
        self,
        request_id: int,
        name: str,
        timeout: float | None = None,
        *,
        user_id: str | None = None,
    ) -> None:
        within = f" within {timeout:g} s" if timeout is not None else ""
        super().__init__(
            "outcome_unknown",
            f"mutation {name!r} (requestId {request_id}) got no definite answer{within}: it may "
            f"or may not have been applied. To apply it at most once, re-send it with "
            f"mutate({name!r}, request_id={request_id}, <the same arguments>)",
        )
        self.request_id = request_id
        self.name = name
        self.timeout = timeout
        self.user_id = user_id


class AuthError(TetherError):
    """The HTTP authentication API answered with an error.

    ``status`` is the HTTP status (0 when the server could not be reached);
    ``retry_after`` the seconds of a ``Retry-After`` header, when there was one.
    """

    def __init__(
        self, code: str, message: str = "", *, status: int = 0, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """True when retrying later may succeed (an outage, a rate limit, no connection)."""
        return classify_auth_code(self.code) is AuthErrorKind.RETRY


class ClientClosed(TetherError):
    """The client no longer runs operations.

    ``close_code`` is the WebSocket close code that stopped it (4500–4999: the server said
    not to reconnect, e.g. 4503 for an unsupported protocol version), or ``None`` when the
    application closed the client.
    """

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__("closed" if close_code is None else f"close_{close_code}", message)
        self.close_code = close_code


class MessageTooLarge(TetherError):
    """The frame is larger than ``max_message_bytes``; the server would close the connection
    with 1009, and a replay after reconnecting would close it again."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("message_too_large", f"{size} bytes, the limit is {limit}")
        self.size = size
        self.limit = limit


class AuthErrorKind(StrEnum):
    """What a failed authentication means for the client."""

    #: The server could not decide now (``unavailable``, ``rate_limited``, no connection):
    #: retry with backoff. Never a sign-out.
    RETRY = "retry"
    #: This access token is not good (``token_expired``, ``invalid_token``): get a new one
    #: (refresh, or ``fetch_token(force_refresh=True)``) and try again.
    RENEW = "renew"
    #: The session is over (``session_revoked``, ``refresh_invalid``, ``refresh_reused``,
    #: ``invalid_credentials``): the client is signed out.
    SIGNED_OUT = "signed_out"


_AUTH_KINDS = {
    "unavailable": AuthErrorKind.RETRY,
    "rate_limited": AuthErrorKind.RETRY,
    "network": AuthErrorKind.RETRY,
    "token_expired": AuthErrorKind.RENEW,
    "invalid_token": AuthErrorKind.RENEW,
    "session_revoked": AuthErrorKind.SIGNED_OUT,
    "refresh_invalid": AuthErrorKind.SIGNED_OUT,
    "refresh_reused": AuthErrorKind.SIGNED_OUT,
    "invalid_credentials": AuthErrorKind.SIGNED_OUT,
}


def classify_auth_code(code: str) -> AuthErrorKind:
    """The meaning of an ``auth_error`` code or an HTTP auth error code.

    A code the client does not know is treated as :attr:`AuthErrorKind.RETRY`: signing the
    user out on a code from a newer server would be the surprise this client exists to avoid.
    """
    return _AUTH_KINDS.get(code, AuthErrorKind.RETRY)
