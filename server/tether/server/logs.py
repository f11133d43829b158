"""Log output of ``tether serve``: text or one JSON object per line (``TETHER_LOG_FORMAT``), with
the ids of the connection or request a line was logged for, and never a token.

Whose line it is travels in a context variable: the ``/sync`` endpoint binds each socket's
:class:`~tether.server.realtime.core.ConnectionCore` (:func:`bind_connection`) in the socket's
task, so every line logged there, or in a task it started, names the connection, and the user and
session it holds *at the time of the line*. The HTTP auth routes bind a
:class:`RequestSubject` (:func:`begin_request`), which the auth service fills in
(:func:`note_identity`) as soon as it knows who is asking. Lines logged elsewhere (the fan-out
pump, the session hub) carry no ids.

Tokens are never logged on purpose; as a second line of defence every message and traceback is
passed through :func:`redact`, which replaces anything shaped like a JWT or a refresh token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from typing import Any, Protocol

LOG_FORMATS = ("text", "json")

#: Anything shaped like a JWT (three base64url segments, the first a JSON header) or a Tether
#: refresh token (``rt1.<sid>.<secret>.<tag>``).
_SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    r"|rt1\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)
#: The value of a JSON field that holds a secret, whole or cut short: the WebSocket library's
#: debug lines show frames abridged (``"token": "eyJhbGciOiJF...Zgg"``), which no token-shaped
#: pattern matches.
_SECRET_FIELD = re.compile(
    r'("(?:token|accessToken|refreshToken|retryKey|password)"\s*:\s*)"[^"]*"?'
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with every token-shaped run, and the value of every JSON field named like a
    secret, replaced by ``[redacted]``."""
    if "eyJ" in text or "rt1." in text:
        text = _SECRET.sub(REDACTED, text)
    if '"' in text:
        text = _SECRET_FIELD.sub(r'\1"' + REDACTED + '"', text)
    return text


# ---------------------------------------------------------------------------------- context


class _Ids(Protocol):
    @property
    def user_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...


class LogSubject(Protocol):
    """Whose log lines these are: a connection (its core) or an HTTP request."""

    @property
    def connection_id(self) -> str | None: ...
    @property
    def identity(self) -> _Ids | None: ...


class _RequestIdentity:
    __slots__ = ("session_id", "user_id")

    def __init__(self, user_id: str, session_id: str) -> None:
        self.user_id = user_id
        self.session_id = session_id


class RequestSubject:
    """An HTTP request's ids, filled in by :func:`note_identity` once known."""

    __slots__ = ("identity",)
    connection_id = None

    def __init__(self) -> None:
        self.identity: _RequestIdentity | None = None


_subject: ContextVar[LogSubject | None] = ContextVar("tether_log_subject", default=None)


def bind_connection(subject: LogSubject) -> None:
    """Lines logged from now on in this task (and tasks it starts) carry ``subject``'s ids."""
    _subject.set(subject)


def begin_request() -> RequestSubject:
    """Start an HTTP request's log context (in the request's own task)."""
    subject = RequestSubject()
    _subject.set(subject)
    return subject


def note_identity(user_id: str, session_id: str) -> None:
    """The HTTP request being served acts for this user and session (a no-op elsewhere)."""
    subject = _subject.get()
    if isinstance(subject, RequestSubject):
        subject.identity = _RequestIdentity(user_id, session_id)


def ids_of(subject: LogSubject) -> dict[str, str | None]:
    """``subject``'s ids as ``extra`` for a line logged outside its context (a push decided by
    another task: a revocation, a timer)."""
    identity = subject.identity
    return {
        "connection_id": subject.connection_id,
        "user_id": None if identity is None else identity.user_id,
        "session_id": None if identity is None else identity.session_id,
    }


class ContextFilter(logging.Filter):
    """Sets ``connection_id``, ``session_id`` and ``user_id`` on each record (``None`` when the
    line belongs to no connection or request), unless the line was given them (:func:`ids_of`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "connection_id" in record.__dict__:
            return True  # given by the caller
        subject = _subject.get()
        identity = None if subject is None else subject.identity
        record.connection_id = None if subject is None else subject.connection_id
        record.user_id = None if identity is None else identity.user_id
        record.session_id = None if identity is None else identity.session_id
        return True


# ---------------------------------------------------------------------------------- formats


def _ids(record: logging.LogRecord) -> dict[str, str]:
    ids = {}
    for field, key in (("connection_id", "connection"), ("session_id", "session")):
        value = getattr(record, field, None)
        if value is not None:
            ids[key] = value
    user = getattr(record, "user_id", None)
    if user is not None:
        ids["user"] = user
    return ids


class TextFormatter(logging.Formatter):
    """``LEVEL:     logger: message [connection=… session=… user=…]``, redacted."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s:     %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _ids(record)
        if ids:
            suffix = " ".join(f"{key}={value}" for key, value in ids.items())
            first, newline, rest = text.partition("\n")
            text = f"{first} [{suffix}]{newline}{rest}"
        return redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``,
    ``message``, the ids when known, ``exception`` (the traceback) when there is one, and for
    uvicorn's access lines ``client``, ``method``, ``path``, ``status``."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        doc: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        doc.update(_ids(record))
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            args = record.args
            if len(args) == 5:  # uvicorn's '%s - "%s %s HTTP/%s" %d'
                client, method, path, _, status = args
                doc.update(client=str(client), method=str(method), path=redact(str(path)))
                doc["status"] = status
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(log_format: str, level: str) -> None:
    """Set up the root logger for ``tether serve``: one handler, in ``log_format``, at ``level``.

    uvicorn is then run with ``log_config=None``: it installs no handlers of its own, and its
    lines (the access log included) propagate here, so they too are JSON in ``json`` mode, carry
    the ids, and pass through :func:`redact` (its debug lines show WebSocket frames).
    """
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
