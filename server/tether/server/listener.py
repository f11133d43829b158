"""The accept loop: takes connections off listening sockets, and backs off when the process is
out of file descriptors instead of retrying at once.

asyncio's own server (``loop.create_server``) handles ``EMFILE`` on accept by logging it with a
traceback and retrying after a second, but on CPython 3.11 it goes on calling ``accept()`` up to
``backlog`` times in the same tick, logging each failure (uvicorn's backlog is 2048): with
1,050 idle sockets and ``ulimit -n 1024`` that wrote 169,418 lines in 40 s (issue 13). Here
one failure stops accepting for a delay that doubles while the shortage lasts (from
:data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`), one warning says so, and accepting resumes by
itself once descriptors are free. Connections that arrive meanwhile wait in the kernel's
backlog; none is dropped by us.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger("tether.server.listener")

#: Errors of accept() that mean the process or the system is out of a resource, not that this
#: one connection failed: retrying at once would fail again.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Errors of accept() that concern only the connection being accepted (reset before it was
#: taken, refused by a firewall rule): the next accept() is tried at once.
ONE_CONNECTION_FAILED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})

#: First pause after an accept() failed for want of resources, seconds; doubled per failure.
BACKOFF_MIN = 0.05
#: Longest pause, seconds: how late accepting may resume once descriptors are free again.
BACKOFF_MAX = 1.0


class Listener:
    """Accepts on ``sockets`` (bound and listening) and hands each connection, as a transport,
    to a protocol from ``protocol_factory``.

    Duck-types the part of :class:`asyncio.Server` that uvicorn's shutdown uses: :meth:`close`
    (idempotent) and :meth:`wait_closed`. Owns the sockets: closing the listener closes them.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self.sockets = sockets
        self._protocol_factory = protocol_factory
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        for sock in self.sockets:
            sock.setblocking(False)
            self._tasks.append(asyncio.ensure_future(self._accept_forever(sock)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in ONE_CONNECTION_FAILED:
                    continue  # that connection is gone; the next may be fine
                if exc.errno in OUT_OF_RESOURCES:
                    logger.warning(
                        "out of file descriptors or memory (%s): not accepting connections for "
                        "%.2f s; raise the open-file limit (ulimit -n) or lower "
                        "TETHER_MAX_CONNECTIONS_PER_ADDRESS",
                        exc.strerror or exc,
                        delay,
                    )
                else:
                    logger.error("accept() failed: %s; retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except Exception:
                # Whatever it is, the loop must outlive it: a dead accept loop is a server that
                # answers nothing while looking healthy from inside.
                logger.exception("accept() failed; retrying in %.2f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            # Set up in a task of its own, as asyncio does: the next accept need not wait for
            # this connection's protocol to start.
            task = loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol_factory, conn)
        except Exception:
            # The protocol failed in connection_made: the peer gets a closed socket and the
            # other connections go on.
            logger.exception("could not set up an accepted connection")
            conn.close()
