"""Which live connections belong to which session, and telling them when their session ends.

Every instance keeps one :class:`SessionHub`. Connections :meth:`~SessionHub.bind` themselves to
the session of the identity they adopt; the hub subscribes to
:data:`tether.server.redis.keys.SESSION_ENDED_CHANNEL` on a Redis connection of its own and calls
``session_ended`` on every connection bound to a session that ended anywhere in the deployment
(protocol §2, last paragraph; ``session_revoked`` in §3).

Redis Pub/Sub is fire-and-forget: an event published while the subscriber is disconnected is
lost, and nothing says so. The hub therefore never trusts the stream alone. After every
successful (re)subscribe — its own reconnects, the transparent ones redis-py makes inside a read,
and the first subscribe — it re-checks every session it holds against Redis
(:meth:`SessionHub.recheck`) and ends those found inactive, exactly as if their events had come.
A connection that stops answering (a half-open TCP connection delivers nothing and raises
nothing) is detected with a PING after a quiet spell, and treated like a dropped one. An ended
session therefore stays authenticated at most until the subscription is back, plus one re-check.

On Redis Cluster the subscription goes to the node that serves the channel's slot in the hub
client's slot map. That client sends nothing else, so nothing else would ever correct the map:
after a failed subscription the hub re-reads the cluster's layout before it subscribes again, and
follows a failover to the replica that took the dead master's place.

Each binding is told at most once: a session that ended never comes back, so the hub drops its
bindings when it tells them, and an event that arrives after the re-check already reported it
finds nobody left to tell.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import RedisCluster
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from tether.protocol import SessionEndReason
from tether.server.auth.sessions import SessionStore
from tether.server.clock import Clock, system_clock
from tether.server.compat.redis import reload_layout
from tether.server.metrics import Metrics, discarded
from tether.server.redis.connection import RedisClient, connect
from tether.server.redis.keys import SESSION_ENDED_CHANNEL
from tether.server.tasks import stop_tasks

log = logging.getLogger("tether.session_hub")

#: Most ended sessions :meth:`SessionHub.recently_ended` remembers (oldest forgotten first).
RECENT_LIMIT = 100_000

# Reconnect delays (seconds): the first retry comes fast, then doubling up to the cap.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
# How long one read waits before the loop looks at the liveness clock again (seconds).
_POLL_INTERVAL = 1.0
# After this long with nothing from Redis, send a PING; without any reply this long after it,
# the connection is declared dead. Bounds how long a silently broken connection goes unnoticed.
_IDLE_PING_AFTER = 5.0
_PONG_TIMEOUT = 5.0


class SessionListener(Protocol):
    """What a live connection offers the hub. Must be hashable (identity is fine)."""

    def session_ended(self, session_id: str, reason: SessionEndReason) -> None:
        """The session ended: drop its identity. Called on the event loop; must not block."""


class SessionHub:
    """Per-instance registry of live connections by session id, and the subscriber that tells
    them when their session ends.

    Start :meth:`run` as one task; stop it with :meth:`close`. ``sessions`` is the instance's
    :class:`SessionStore`, used for the re-check on its command connection; the subscription uses
    a connection of the hub's own, opened from ``redis_url``. ``recent_ttl``: how long (seconds)
    :meth:`recently_ended` remembers an ended session. ``recheck_batch``: sessions read per round
    trip by :meth:`recheck`. ``monotonic``: the clock for ``recent_ttl`` (tests move it);
    ``clock``: the wall clock, for the revocation latency counted in ``metrics``.
    """

    def __init__(
        self,
        redis_url: str,
        sessions: SessionStore,
        *,
        recent_ttl: float = 120.0,
        recheck_batch: int = 500,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Clock = system_clock,
        metrics: Metrics | None = None,
    ) -> None:
        if recent_ttl <= 0:
            raise ValueError("recent_ttl must be positive")
        if recheck_batch < 1:
            raise ValueError("recheck_batch must be at least 1")
        self._redis: RedisClient = connect(redis_url)
        if isinstance(self._redis, RedisCluster) and not hasattr(self._redis, "pubsub"):
            # Before redis-py 8.0 the asyncio cluster client has no Pub/Sub: the subscriber would
            # fail forever and the instance never become ready.
            raise RuntimeError("Redis Cluster needs redis-py 8.0 or later (asyncio Pub/Sub)")
        self._sessions = sessions
        self._recent_ttl = recent_ttl
        self._recheck_batch = recheck_batch
        self._monotonic = monotonic
        self._clock = clock
        self._metrics = metrics or discarded()
        # Most sessions have one connection on an instance: it is stored bare, and a set is made
        # only for the second one.
        self._listeners: dict[str, SessionListener | set[SessionListener]] = {}
        # OrderedDict, not dict: dropping the oldest entry is O(1) through its linked list, where
        # a plain dict rescans the holes left at its front by earlier deletions.
        self._recent: OrderedDict[str, tuple[SessionEndReason, float]] = OrderedDict()
        self._backoff = _BACKOFF_MIN
        # On a cluster: the client has loaded the cluster's layout once (see _load_layout).
        self._layout_loaded = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        #: Set once the first subscribe succeeded and the re-check that follows it finished.
        self.ready = asyncio.Event()
        #: Called with a session id whenever the number of connections bound to it may have
        #: changed (bind, unbind, the session ended); must not block. The live-socket report
        #: (:mod:`tether.server.realtime.live_sockets`) listens here.
        self.on_change: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ registry

    def bind(self, session_id: str, listener: SessionListener) -> None:
        """Tell ``listener`` when ``session_id`` ends. Binding twice is harmless.

        The lookup that showed the session active can race with its end: right after binding,
        with no ``await`` in between, check :meth:`recently_ended` and drop the identity if it
        answers.
        """
        entry = self._listeners.get(session_id)
        if entry is None:
            self._listeners[session_id] = listener
        elif isinstance(entry, set):
            entry.add(listener)
        elif entry != listener:
            self._listeners[session_id] = {entry, listener}
        if self.on_change is not None:
            self.on_change(session_id)

    def unbind(self, session_id: str, listener: SessionListener) -> None:
        """Stop telling ``listener`` about ``session_id``. Unknown pairs are ignored (the hub
        drops a session's bindings itself when it reports the session ended)."""
        entry = self._listeners.get(session_id)
        if entry is None:
            return
        if isinstance(entry, set):
            entry.discard(listener)
            if len(entry) == 1:
                self._listeners[session_id] = next(iter(entry))
            elif not entry:
                del self._listeners[session_id]
        elif entry == listener:
            del self._listeners[session_id]
        if self.on_change is not None:
            self.on_change(session_id)

    def count(self, session_id: str) -> int:
        """How many connections are bound to ``session_id`` on this instance."""
        entry = self._listeners.get(session_id)
        if entry is None:
            return 0
        return len(entry) if isinstance(entry, set) else 1

    def counts(self) -> dict[str, int]:
        """Every bound session with its number of connections."""
        return {sid: len(e) if isinstance(e, set) else 1 for sid, e in self._listeners.items()}

    def recently_ended(self, session_id: str) -> SessionEndReason | None:
        """Why ``session_id`` ended, if the hub learned so within the last ``recent_ttl`` seconds
        (from an event or a re-check); else None, which does not prove the session active."""
        entry = self._recent.get(session_id)
        if entry is None:
            return None
        reason, seen = entry
        if self._monotonic() - seen >= self._recent_ttl:
            return None
        return reason

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Subscribe and dispatch session-ended events until :meth:`close`.

        Never gives up: connection errors (and unexpected ones, logged) lead to a reconnect after
        a capped exponential backoff, and every subscribe is followed by a re-check. Returns when
        closed; start it once per hub.
        """
        if self._closing:
            return
        if self._task is not None:
            raise RuntimeError("SessionHub.run is already running")
        self._task = asyncio.current_task()
        # On a cluster: the node of the last failed subscription, None before any failure.
        failed_node: str | None = None
        try:
            while not self._closing:
                pubsub = self._redis.pubsub()
                try:
                    if isinstance(self._redis, RedisCluster):
                        await self._load_layout(self._redis, failed_node)
                    await pubsub.subscribe(SESSION_ENDED_CHANNEL)
                    await self._listen(pubsub)
                # RedisClusterException: no node answered the layout query, or the layout left
                # the channel's slot uncovered. redis-py does not count it as a RedisError.
                except (RedisError, RedisClusterException, OSError) as exc:
                    self._metrics.redis_error("session_hub")
                    # The backoff is back at its minimum only after a subscribe worked: the
                    # first failure is worth a warning, the retries during an outage are not.
                    first = self._backoff == _BACKOFF_MIN
                    level = logging.WARNING if first else logging.DEBUG
                    log.log(level, "session-ended subscription failed: %s", type(exc).__name__)
                except Exception:
                    log.exception("session-ended subscriber failed; reconnecting")
                finally:
                    await _close_quietly(pubsub)
                # A cluster's Pub/Sub (redis-py >= 8.0: not imported, so that older redis-py
                # still runs a standalone deployment) names the node it was on.
                get_node = getattr(pubsub, "get_pubsub_node", None)
                node = get_node() if get_node is not None else None
                if node is not None:
                    failed_node = node.name
                delay = self._backoff
                self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
                # Jitter spreads the reconnects of many instances after one Redis restart.
                await asyncio.sleep(random.uniform(delay / 2, delay))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Cancelled by close(), and by nothing else: a normal end.
            if self._closing and task is not None and task.uncancel() == 0:
                return
            raise

    async def close(self) -> None:
        """Stop :meth:`run` and close the hub's Redis connection. Idempotent."""
        self._closing = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            # Our own cancellation propagates, the task's does not; bounded, as at shutdown.
            await stop_tasks([task])
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    # ------------------------------------------------------------------ re-check

    async def recheck(self) -> int:
        """Look up every bound session in Redis and report those no longer active, with the
        reason from their tombstone, exactly as their events would. Returns how many were found
        ended. Redis errors propagate; nothing is reported for a session that was not read."""
        session_ids = list(self._listeners)
        ended = 0
        for start in range(0, len(session_ids), self._recheck_batch):
            batch = session_ids[start : start + self._recheck_batch]
            found = await self._sessions.lookup_many(batch)
            gone = [sid for sid in batch if found[sid] is None]
            if not gone:
                continue
            reasons = await self._sessions.end_reasons(gone)
            for sid in gone:
                self._session_ended(sid, reasons[sid])
            ended += len(gone)
        if ended:
            log.info("re-check found %d bound sessions ended", ended)
        return ended

    # ------------------------------------------------------------------ internals

    async def _load_layout(self, cluster: RedisCluster, failed_node: str | None) -> None:
        """Make the cluster client's slot map, from which its Pub/Sub picks its node, current.

        The first time, load it (a new client loads it on its first command only, and the
        subscribe would be the first). After that, every call follows a failed subscription:
        re-read the map from the nodes the client knows, ``failed_node`` (where the subscription
        failed) asked last. After a failover the channel's slot is served by the promoted
        replica, and the client would otherwise go on trying the dead master. Raises when no
        node answers (a re-read raises ``RedisClusterException``, which is no ``RedisError``).
        """
        if not self._layout_loaded:
            await cluster.initialize()
            self._layout_loaded = True
        else:
            await reload_layout(cluster, failed_node)

    async def _listen(self, pubsub: PubSub) -> None:
        """Read the subscription until it fails (raises); never returns normally."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        ping_sent: float | None = None
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=_POLL_INTERVAL)
            now = loop.time()
            if message is None:
                if ping_sent is None:
                    if now - heard >= _IDLE_PING_AFTER:
                        await pubsub.ping()
                        ping_sent = now
                elif now - ping_sent >= _PONG_TIMEOUT:
                    raise RedisConnectionError("no reply to PING on the session-ended subscription")
                continue
            kind = message.get("type")
            if kind == "message":
                self._on_event(message.get("data"))
            elif kind == "subscribe":
                # Our first subscribe, or redis-py re-subscribing after a reconnect of its own:
                # either way, events may have been missed before this point.
                await self._on_subscribed()
            heard = loop.time()
            ping_sent = None

    async def _on_subscribed(self) -> None:
        try:
            await self.recheck()
        except RedisError:
            raise  # reconnect, which re-checks again
        except Exception:
            # A bug, not an outage: retrying would fail the same way and stop events too.
            log.exception("re-check after subscribing failed")
        self._backoff = _BACKOFF_MIN
        if not self.ready.is_set():
            log.info("subscribed to session-ended events")
            self.ready.set()
        else:
            self._metrics.redis_reconnect("session_hub")
            log.info("re-subscribed to session-ended events")

    def _on_event(self, data: object) -> None:
        parsed = _parse_event(data)
        if parsed is None:
            # Not the payload: it is not ours to print, and could be anything.
            log.warning("ignored a malformed session-ended event")
            return
        session_id, reason, ended_at = parsed
        log.debug("session %s ended: %s", session_id, reason)
        self._session_ended(session_id, reason, self._clock() if ended_at is None else ended_at)

    def _session_ended(
        self, session_id: str, reason: SessionEndReason, ended_at: float | None = None
    ) -> None:
        """Tell the listeners of ``session_id``; ``ended_at`` (seconds): when the session ended,
        from its event (None from a re-check: the end's time is not known)."""
        self._remember(session_id, reason)
        # Popped before the calls: a listener may unbind (a no-op now) or bind during its call.
        entry = self._listeners.pop(session_id, None)
        if entry is None:
            return
        if self.on_change is not None:
            self.on_change(session_id)
        listeners = entry if isinstance(entry, set) else (entry,)
        for listener in listeners:
            try:
                listener.session_ended(session_id, reason)
            except Exception:
                log.exception("a session_ended listener failed")
        metrics = self._metrics
        if ended_at is None:
            metrics.revocation_delivered(len(listeners), "recheck")
            return
        metrics.revocation_delivered(len(listeners), "event")
        latency = max(0.0, self._clock() - ended_at)
        for _ in listeners:
            metrics.revocation_latency.observe(latency)

    def _remember(self, session_id: str, reason: SessionEndReason) -> None:
        now = self._monotonic()
        if session_id not in self._recent:
            self._recent[session_id] = (reason, now)
        while self._recent:
            _, seen = next(iter(self._recent.values()))
            if now - seen < self._recent_ttl and len(self._recent) <= RECENT_LIMIT:
                break
            self._recent.popitem(last=False)


def _parse_event(data: object) -> tuple[str, SessionEndReason, float | None] | None:
    """``(session id, reason, when it ended in seconds or None)`` of a session-ended event, or
    None when it is malformed.

    An unknown reason (from a newer instance during a rolling deploy) still ends the session,
    as ``revoked``: dropping the event would leave the session authenticated.
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if not isinstance(data, str):
        return None
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "session_ended":
        return None
    session_id = event.get("sessionId")
    reason = event.get("reason")
    if not isinstance(session_id, str) or not session_id or not isinstance(reason, str):
        return None
    at = event.get("at")
    ended_at = at / 1000 if isinstance(at, int | float) and not isinstance(at, bool) else None
    try:
        return session_id, SessionEndReason(reason), ended_at
    except ValueError:
        log.warning("session-ended event with an unknown reason; treating it as revoked")
        return session_id, SessionEndReason.REVOKED, ended_at


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 8.1
    except Exception:  # the connection is being discarded; its errors change nothing
        log.debug("closing the session-ended subscription failed", exc_info=True)
