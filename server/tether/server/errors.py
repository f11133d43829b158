"""The server's exceptions. The codes they carry are the contract's, named in
:mod:`tether.protocol`.

Exception tree::

    CodedError                 carries a contract ``code`` and a human ``message``
    ├── HTTPError               an HTTP auth API failure: adds ``status`` and ``retry_after``
    └── FunctionError           raised by application functions (``unauthenticated`` …)
        └── MisuseError         the data layer refused what the application asked (``invalid``)
"""

from __future__ import annotations


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


class MisuseError(FunctionError):
    """The application used the data layer in a way it cannot: a table or index it did not
    declare, ``equals`` that are not the index's fields, a write in a query, a document that is
    not an object of JSON values.

    The caller sees ``invalid`` as for any :class:`FunctionError`; unlike the application's own
    errors, this one is a bug in the application, so the function runner logs it (WARNING,
    logger ``tether.functions``) with the function's name.
    """

    def __init__(self, message: str) -> None:
        super().__init__("invalid", message)
