"""What the ``/sync`` layer tells :mod:`tether.server.metrics` and the log, kept out of the
endpoint's code.

* :class:`FrameObserver` looks at each frame the core built for one connection (not the shared
  transitions of a fan-out, which carry no auth news): it counts auth answers and pushes, and how
  late an expiry notice went out, and logs auth changes with the connection's ids (never a
  token: the frames it logs about are named by type and code only).
* :func:`connection_collector` counts connections by state and the bytes waiting in their send
  queues when Prometheus scrapes: nothing is counted per frame or per state change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily

from tether.protocol import AuthErrorCode, ServerMessageType
from tether.server.logs import ids_of
from tether.server.metrics import Metrics
from tether.server.realtime.core import ConnectionCore, Phase, Timing

log = logging.getLogger("tether.sync")

#: The request an ``auth_error`` code answers, where the code tells it. ``rate_limited`` and
#: ``unavailable`` answer either request: they are counted under the kind ``auth``.
_ERROR_KIND = {
    AuthErrorCode.REFRESH_INVALID: "refresh",
    AuthErrorCode.REFRESH_REUSED: "refresh",
    AuthErrorCode.INVALID_TOKEN: "authenticate",
    AuthErrorCode.TOKEN_EXPIRED: "authenticate",
    AuthErrorCode.SESSION_REVOKED: "authenticate",
}


class FrameObserver:
    """Called with every frame :class:`ConnectionCore` built for one connection (a dict lookup
    for the frames it does not count)."""

    __slots__ = ("_handlers", "_metrics", "_timing")

    def __init__(self, metrics: Metrics, timing: Timing) -> None:
        self._metrics = metrics
        self._timing = timing
        handlers: dict[str, Callable[[dict[str, Any], ConnectionCore], None]] = {
            ServerMessageType.AUTH_OK: self._auth_ok,
            ServerMessageType.AUTH_ERROR: self._auth_error,
            ServerMessageType.AUTH_EXPIRING: self._expiring,
            ServerMessageType.AUTH_EXPIRED: self._expired,
            ServerMessageType.SESSION_REVOKED: self._revoked,
        }
        self._handlers = handlers

    def __call__(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        handler = self._handlers.get(frame["type"])
        if handler is not None:
            handler(frame, core)

    def _auth_ok(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        kind = "refresh" if "tokens" in frame else "authenticate"
        code = "ok" if frame["identity"] is not None else "anonymous"
        self._metrics.auth_event(kind, code)
        # In the context of the connection's own task (the auth request's): the ids are those of
        # the identity just adopted.
        log.debug("%s: %s", kind, code)

    def _auth_error(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        code = frame["code"]
        kind = _ERROR_KIND.get(code, "auth")
        self._metrics.auth_event(kind, str(code))
        log.info("%s refused: %s", kind, code)

    def _expiring(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        self._metrics.auth_event("auth_expiring", "sent")
        identity = core.identity
        if identity is None:
            return
        due = frame["expiresAt"] / 1000 - self._timing.notice_for(identity)
        # An identity adopted inside its notice window gets its notice at once: late from its
        # due time, but not late from the client's request that made it current.
        self._metrics.notice_sent(
            "auth_expiring", frame["serverTime"] / 1000 - max(due, core.last_seen)
        )

    def _expired(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        self._metrics.auth_event("auth_expired", "sent")
        log.debug("identity expired", extra=ids_of(core))
        due = frame["expiresAt"] / 1000 + self._timing.clock_leeway
        self._metrics.notice_sent("auth_expired", frame["serverTime"] / 1000 - due)

    def _revoked(self, frame: dict[str, Any], core: ConnectionCore) -> None:
        self._metrics.auth_event("session_revoked", str(frame["reason"]))
        # Decided by the session hub's task: the ids are given (the identity is gone already).
        log.info("session revoked: %s", frame["reason"], extra=ids_of(core))


class _Connection(Protocol):
    @property
    def core(self) -> ConnectionCore: ...
    @property
    def out_bytes(self) -> int: ...


def connection_collector(connections: Collection[_Connection]) -> Callable[[], Iterable[Any]]:
    """A collector of ``connections`` (the endpoint's live set) for :meth:`Metrics.add_collector`:
    connections by state, and the bytes queued for them."""

    def collect() -> Iterable[Any]:
        counts = {"connecting": 0, "anonymous": 0, "authenticated": 0}
        queued = largest = 0
        for connection in list(connections):
            core = connection.core
            if core.phase is Phase.AWAITING_CONNECT:
                counts["connecting"] += 1
            elif core.phase is Phase.OPEN:
                counts["anonymous" if core.identity is None else "authenticated"] += 1
            size = connection.out_bytes
            queued += size
            largest = max(largest, size)
        states = GaugeMetricFamily(
            "tether_connections",
            "Open /sync connections by state: connecting (no connect message yet), anonymous, "
            "authenticated",
            labels=["state"],
        )
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily(
            "tether_send_queue_bytes",
            "Characters of JSON queued for /sync clients, not yet taken by their sockets",
            value=queued,
        )
        yield GaugeMetricFamily(
            "tether_send_queue_largest_bytes",
            "The longest single connection's send queue (the limit is TETHER_SEND_QUEUE_BYTES)",
            value=largest,
        )

    return collect
