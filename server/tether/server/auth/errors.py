"""The authentication service's one failure, free of any transport.

:class:`AuthFailure` carries a code of the contract (:mod:`tether.protocol`) and a message safe to
show a client. Each transport renders it its own way: the HTTP API picks a status
(:func:`tether.server.auth.http.http_error`), the ``/sync`` socket an ``auth_error`` code
(:func:`auth_error_code`). Neither looks at the message.
"""

from __future__ import annotations

from tether.protocol import AuthErrorCode, HTTPCode
from tether.server.errors import CodedError

#: What the service may fail with. Credential failures are :class:`AuthErrorCode`s, so a socket
#: can pass them on as they are; the failures only the HTTP API can meet (a malformed body, a
#: taken e-mail, a wrong password) are :class:`HTTPCode`s.
FailureCode = AuthErrorCode | HTTPCode


class AuthFailure(CodedError):
    """The auth service refused a request: ``code`` says why, ``retry_after`` (seconds, for
    ``rate_limited``) says when to try again."""

    code: FailureCode

    def __init__(self, code: FailureCode, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


def auth_error_code(failure: AuthFailure) -> AuthErrorCode:
    """The ``auth_error`` code a socket answers ``failure`` with.

    A failure that has no ``auth_error`` code of its own (a malformed ``retryKey`` is
    ``invalid_request`` over HTTP) is ``invalid_token``: the request's credentials were not
    accepted.
    """
    code = failure.code
    return code if isinstance(code, AuthErrorCode) else AuthErrorCode.INVALID_TOKEN
