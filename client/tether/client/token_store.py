"""Where a client keeps its session: the refresh token, the current access token, and the
``retryKey`` of a refresh in progress.

A :class:`TokenStore` is a small interface (``load``, ``save``, ``locked``) with two
implementations: :class:`MemoryTokenStore` (one process) and :class:`FileTokenStore` (a JSON
file that several processes may share).

Why the lock: a refresh token may be spent once. Two processes sharing a session, whose access
tokens end at the same moment, would both refresh; the second would present a token the first
already rotated, which the server treats as theft and answers by ending the session
(``refresh_reused``). So a client renews like this, holding :meth:`TokenStore.locked`:

1. re-read the store;
2. if another process already rotated (the stored refresh token is not the one this client
   last knew, and the stored access token is still fresh), use that access token;
3. otherwise give the stored token a ``retryKey`` (saved first, so a retry after a lost answer
   sends the same one), spend it, and save the new tokens **before** using them;
4. release the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tether.client.core import DEFAULT_RENEWAL_MARGIN, renewal_due

log = logging.getLogger("tether.client")

#: File format version of :class:`FileTokenStore`.
FILE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session's tokens, as the server issued them.

    Times: ``expires_at`` (the access token's ``exp``) and ``server_time`` are milliseconds on
    the server's clock; ``received_at`` is the local wall clock (seconds) at the moment
    ``server_time`` was read, so the skew between the two clocks is known later, also in
    another process.
    """

    user_id: str
    session_id: str
    # Secrets stay out of repr(): a logged or printed session shows no token.
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: int
    server_time: int
    received_at: float
    #: The ``retryKey`` sent (or about to be sent) with ``refresh_token``; kept until the
    #: new refresh token replaces this one.
    retry_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_tokens(
        cls,
        doc: Mapping[str, Any],
        *,
        received_at: float,
        user_id: str | None = None,
        session_id: str | None = None,
        server_time: int | None = None,
    ) -> StoredSession:
        """From a token response (HTTP ``{"userId", …, "serverTime"}``) or the ``tokens`` of an
        in-band ``auth_ok`` (pass the identity and ``server_time`` from the ``auth_ok``)."""
        return cls(
            user_id=str(user_id if user_id is not None else doc["userId"]),
            session_id=str(session_id if session_id is not None else doc["sessionId"]),
            access_token=str(doc["accessToken"]),
            refresh_token=str(doc["refreshToken"]),
            expires_at=int(doc["expiresAt"]),
            server_time=int(server_time if server_time is not None else doc["serverTime"]),
            received_at=received_at,
        )

    def renewal_due(self, margin: float = DEFAULT_RENEWAL_MARGIN) -> float:
        """Local wall-clock time by which the access token should be renewed."""
        return renewal_due(self.expires_at, self.server_time, self.received_at, margin)

    def access_fresh(self, now: float, margin: float = DEFAULT_RENEWAL_MARGIN) -> bool:
        """Is the access token good for use at ``now`` (local wall clock, seconds)?"""
        return now < self.renewal_due(margin)

    def with_retry_key(self, retry_key: str | None) -> StoredSession:
        return replace(self, retry_key=retry_key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StoredSession:
        retry_key = doc.get("retry_key")
        return cls(
            user_id=str(doc["user_id"]),
            session_id=str(doc["session_id"]),
            access_token=str(doc["access_token"]),
            refresh_token=str(doc["refresh_token"]),
            expires_at=int(doc["expires_at"]),
            server_time=int(doc["server_time"]),
            received_at=float(doc["received_at"]),
            retry_key=str(retry_key) if retry_key is not None else None,
        )


class TokenStore(Protocol):
    """Keeps one :class:`StoredSession` (or none)."""

    async def load(self) -> StoredSession | None:
        """The stored session, or ``None``."""

    async def save(self, session: StoredSession | None) -> None:
        """Replace the stored session (``None``: forget it, e.g. after a sign-out)."""

    def locked(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Exclusive access for a read-renew-write cycle, against every other user of the
        same store (other clients, and for a file, other processes)."""


class MemoryTokenStore:
    """A store in memory, shared by the clients of one process that are given it."""

    def __init__(self, session: StoredSession | None = None) -> None:
        self._session = session
        self._lock = asyncio.Lock()

    async def load(self) -> StoredSession | None:
        return self._session

    async def save(self, session: StoredSession | None) -> None:
        self._session = session

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        async with self._lock:
            yield


class FileTokenStore:
    """A store in a JSON file (mode 0600) that several processes may share.

    Writes are atomic (a temporary file in the same directory, flushed to disk, then renamed
    over the old one), so a reader sees the old session or the new one, never half of one.
    :meth:`locked` takes an exclusive ``flock`` on a sibling ``<name>.lock`` file (the data
    file itself is replaced on every write, so it cannot carry the lock); the operating system
    releases it if the holder dies. Waiting for it gives up after ``lock_timeout`` seconds with
    :class:`TimeoutError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = lock_timeout
        # flock excludes other open files, including ours in this process; this lock only
        # saves the clients of one process from polling against each other.
        self._local = asyncio.Lock()

    async def load(self) -> StoredSession | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(text)
            if doc.get("session") is None:
                return None
            return StoredSession.from_json(doc["session"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("token file %s is not readable as a session; ignoring it", self.path)
            return None

    async def save(self, session: StoredSession | None) -> None:
        doc = {"format": FILE_FORMAT, "session": session.to_json() if session else None}
        await asyncio.to_thread(_write_atomically, self.path, json.dumps(doc, indent=2) + "\n")

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        async with self._local:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                async with asyncio.timeout(self.lock_timeout):
                    await _flock(fd)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


async def _flock(fd: int) -> None:
    """Take an exclusive flock without blocking the event loop (poll, 5 to 50 ms apart).

    Polling rather than a blocking call in a thread: a cancelled wait (a timeout) then leaves
    no thread behind that would take the lock later and hold it.
    """
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp creates it 0600
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk too, or a crash could bring the old file back.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
