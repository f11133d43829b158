"""The ``/sync`` WebSocket endpoint: the I/O shell around :mod:`tether.server.realtime.core`.

A raw ASGI app (no Starlette ``WebSocket`` wrapper: idle connections must stay lean). Each
socket is owned by one :class:`Connection`, which moves frames between the socket and its
:class:`~tether.server.realtime.core.ConnectionCore`, runs the actions the core returns, and
releases everything in one ``finally``. Deadlines of every connection share one
:class:`~tether.server.realtime.timers.DeadlineQueue`; revocations arrive through the
:class:`~tether.server.realtime.session_hub.SessionHub`.

Outgoing frames go through a per-connection queue bounded in bytes
(``TETHER_SEND_QUEUE_BYTES``): a client that does not read is closed with 4008 instead of
growing the server's memory. Frames are written inline while the socket takes them; a writer task
exists only while a send has to wait for the socket to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from redis.exceptions import RedisError

from tether.protocol import (
    AuthErrorCode,
    CloseCode,
    ErrorCode,
    FunctionErrorCode,
    MutationErrorCode,
)
from tether.server.auth.errors import AuthFailure, auth_error_code
from tether.server.auth.service import AuthService
from tether.server.auth.tokens import TokenError
from tether.server.clock import Clock
from tether.server.compat.uvicorn import transport_of
from tether.server.data.caller import Caller
from tether.server.data.engine import QueryEngine, QueryEvaluation
from tether.server.data.functions import App
from tether.server.data.live import (
    Evaluation,
    PartitionFollowers,
    Registration,
    SubscriptionManager,
)
from tether.server.data.read_cache import ReadCache
from tether.server.data.store import IDENTITY_ENDED, RequestIdReused
from tether.server.errors import FunctionError
from tether.server.logs import bind_connection
from tether.server.metrics import Metrics, discarded
from tether.server.origins import origin_allowed
from tether.server.realtime.core import (
    Action,
    BadMessage,
    BindSession,
    Close,
    ConnectionCore,
    DropQuery,
    Identity,
    Limits,
    QueryResult,
    RotateRefresh,
    RunMutation,
    RunQueries,
    Send,
    Timing,
    UnbindSession,
    VerifyToken,
    encode_frame,
)
from tether.server.realtime.eager import start_eagerly
from tether.server.realtime.observe import FrameObserver
from tether.server.realtime.session_hub import SessionHub
from tether.server.realtime.timers import DeadlineQueue
from tether.server.settings import Settings

log = logging.getLogger("tether.sync")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
SendFn = Callable[[Message], Awaitable[None]]

#: Seconds a committed mutation waits for its transition to be delivered (read your writes)
#: before it is answered ``unavailable`` (a replay then returns the stored outcome).
DELIVERY_TIMEOUT = 10.0

#: Seconds a close frame may wait behind a client that stopped reading before we give up.
CLOSE_TIMEOUT = 2.0
#: The reason of the 1012 close a draining instance sends: not part of the contract (clients act
#: on the code), but it tells a reader of the frame that Tether closed it, not the ASGI server.
DRAIN_REASON = "tether is draining"


def release_socket_later(send: SendFn, delay: float) -> None:
    """Abort the connection's TCP socket ``delay`` seconds from now unless its close handshake
    has completed by then (contract §5 rule 9).

    An ASGI app can end a WebSocket only by sending a close frame. A client that stopped
    reading never answers it: with small socket buffers the frame waits behind data the client
    does not take, with large ones (tens of MB on loopback) it sits unread in the client's
    kernel while the server's own buffer reads empty. Either way the graceful close never
    completes, and TCP keeps the connection (zero-window probes answered by the client's
    kernel) for as long as the client likes, with the buffer, the socket and the protocol
    object. So the rule is the handshake's outcome, not the buffer: a socket that is not closed
    ``delay`` seconds after the connection ended is aborted. A client that reads, but too slowly
    to take what was queued within the grace, is cut off too (without its close code).

    uvicorn, which ``tether serve`` runs, lets us reach the socket's transport from ``send``
    (:func:`~tether.server.compat.uvicorn.transport_of`); another server without one is left to
    close as it does.
    """
    transport = transport_of(send)
    if transport is None:
        return
    if transport.is_closing() and transport.get_write_buffer_size() == 0:
        return  # gone already (the client left): nothing to keep alive for the check

    def abort_unless_closed() -> None:
        if transport.is_closing() and transport.get_write_buffer_size() == 0:
            return  # the handshake completed (or the client left) within the grace
        log.info("aborted a connection whose close handshake did not complete in time")
        transport.abort()

    asyncio.get_running_loop().call_later(delay, abort_unless_closed)


def _over_limit(frame: str | bytes, limit: int) -> bool:
    """Is ``frame`` over ``limit`` bytes (UTF-8 for text)? Encodes only when it could be."""
    if len(frame) > limit:
        return True
    if isinstance(frame, str) and len(frame) * 4 > limit:
        return len(frame.encode("utf-8", "surrogatepass")) > limit
    return False


class Connection:
    """One ``/sync`` socket from accept to close. Closing is idempotent."""

    __slots__ = (
        "closing",
        "core",
        "draining",
        "endpoint",
        "out",
        "out_bytes",
        "partitioned",
        "regs",
        "scheduled_deadline",
        "send",
        "sent",
        "stall_check",
        "tasks",
        "writer",
    )

    def __init__(self, endpoint: SyncEndpoint, send: SendFn, core: ConnectionCore) -> None:
        self.endpoint = endpoint
        self.send = send
        self.core = core
        # Frames not yet handed to the socket; created when needed, dropped when empty (an idle
        # connection keeps no queue: most frames go out inline).
        self.out: deque[str | tuple[int, str]] | None = None
        self.out_bytes = 0
        self.writer: asyncio.Task[None] | None = None
        # Frames the socket has taken (see _check_stalled), and the pending check.
        self.sent = 0
        self.stall_check: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] | None = None
        self.scheduled_deadline: float | None = None
        self.regs: dict[int, Registration] | None = None
        self.closing = False
        self.draining = False  # the writer is running inline (see _start_writer)
        # Has used a named data partition: its versions mix partitions' (see run_mutation).
        self.partitioned = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self, receive: Receive) -> None:
        endpoint = self.endpoint
        endpoint.connections.add(self)
        try:
            self.reschedule()
            # The message is handled in a method of its own: no local of this frame keeps the
            # last message (and its frame text) alive while the socket idles.
            while not self.closing and self._on_message(await receive()):
                pass
            if self.closing and self.writer is not None:
                # Let queued frames and the close frame go out, but not forever.
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # task's own cancellation when the writer ends in the same turn.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await asyncio.shield(self.writer)
        finally:
            self.closing = True
            endpoint.connections.discard(self)
            if endpoint.drained is not None and not endpoint.connections:
                endpoint.drained.set()
            endpoint.timers.schedule(self, None)
            self.execute(self.core.close())
            for reg in (self.regs or {}).values():
                endpoint.detach(reg)
            self.regs = None
            for task in list(self.tasks or ()):
                task.cancel()
            if self.writer is not None:
                self.writer.cancel()
            if self.stall_check is not None:
                self.stall_check.cancel()
                self.stall_check = None

    def _on_message(self, message: Message) -> bool:
        """Handle one ASGI message; False once the receive loop must end."""
        kind = message["type"]
        if kind == "websocket.disconnect":
            return False
        if kind != "websocket.receive":
            return True
        text = message.get("text")
        frame: str | bytes = text if text is not None else (message.get("bytes") or b"")
        endpoint = self.endpoint
        if _over_limit(frame, endpoint.settings.max_message_bytes):
            self.close_now(CloseCode.MESSAGE_TOO_BIG, "frame too large")
            return False
        self.execute(self.core.receive(frame, endpoint.clock()))
        return True

    def reschedule(self) -> None:
        self.endpoint.timers.schedule(self, self.core.next_deadline())

    def transport_closing(self) -> bool:
        """Is the ASGI server closing this socket (when it lets us see its transport)?"""
        transport = transport_of(self.send)
        return transport is not None and transport.is_closing()

    def end_unseen(self) -> None:
        """The ASGI server ended the socket without telling the receive loop: end the
        connection here, and arm the abort of a socket that does not finish closing."""
        self._begin_closing()

    def on_deadline(self, now: float) -> None:
        self.execute(self.core.on_timer(now))

    def session_ended(self, session_id: str, reason: Any) -> None:
        self.execute(self.core.session_ended(session_id, reason, self.endpoint.clock()))

    # ------------------------------------------------------------------ actions

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                text = action.text
                if text is None:
                    self.endpoint.observe(action.frame, self.core)
                self.enqueue(text if text is not None else encode_frame(action.frame))
            elif isinstance(action, Close):
                self.close_soon(action.code, action.reason)
            elif isinstance(action, BindSession):
                self.endpoint.hub.bind(action.session_id, self)
            elif isinstance(action, UnbindSession):
                self.endpoint.hub.unbind(action.session_id, self)
            elif isinstance(action, VerifyToken | RotateRefresh):
                self.spawn(self.authenticate(action))
            elif isinstance(action, RunQueries):
                self.run_queries(action)
            elif isinstance(action, DropQuery):
                self.drop_query(action.query_id)
            elif isinstance(action, RunMutation):
                self.spawn(self.run_mutation(action))
        if not self.closing:
            self.reschedule()

    def spawn(self, coro: Awaitable[None]) -> None:
        if self.closing:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        if self.tasks is None:
            self.tasks = set()
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self.tasks is not None:
            self.tasks.discard(task)
            if not self.tasks:
                self.tasks = None
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ sending

    def enqueue(self, text: str) -> None:
        if self.closing:
            return
        if self.out is None and self._writer_idle():
            self._start_writer(text)  # nothing waits: this frame goes out now, unqueued
            return
        # The client is behind when what it has not taken yet is over the limit; a single
        # large frame onto a short queue is not a slow consumer (memory stays bounded by the
        # limit plus one frame).
        if self.out_bytes > self.endpoint.settings.send_queue_bytes:
            self.close_now(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        self._queue().append(text)
        self.out_bytes += len(text)
        self._start_writer()

    def _queue(self) -> deque[str | tuple[int, str]]:
        out = self.out
        if out is None:
            out = self.out = deque()
        return out

    def _writer_idle(self) -> bool:
        return not self.draining and (self.writer is None or self.writer.done())

    def _start_writer(self, first: str | None = None) -> None:
        """Send ``first`` (if given), then what is queued, unless a writer is at it already."""
        if not self._writer_idle():
            return  # the running writer takes what was queued
        # The queue is drained inline, in the caller (a fan-out writes into thousands of sockets
        # that nearly all take a frame at once); a task takes over only when a send has to wait
        # for the transport to drain.
        self.draining = True
        try:
            task = start_eagerly(self._drain(first))
        finally:
            self.draining = False
        if task is not None:
            self.writer = task
            task.add_done_callback(self._writer_done)
            if self.stall_check is None:
                self._watch_writer()

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        # Idle connections keep no finished task (or its frame) alive.
        if self.writer is task:
            self.writer = None

    def _watch_writer(self) -> None:
        self.stall_check = asyncio.get_running_loop().call_later(
            self.endpoint.settings.send_timeout, self._check_stalled, self.sent
        )

    def _check_stalled(self, sent: int) -> None:
        """A send had to wait ``TETHER_SEND_TIMEOUT`` ago, when the socket had taken ``sent``
        frames: if it still waits and has taken none since, the client is a slow consumer.

        The send queue's byte limit does not catch a client that stopped reading but keeps the
        queue short (one that only sends pings: each pong waits behind what it did not
        take), nor one whose next frame is simply large: this does, whatever the frames' size.
        The 4008 close then arms the abort after the close grace (contract §5 rule 9).
        """
        self.stall_check = None
        if self.closing or self.writer is None or self.writer.done():
            return  # drained meanwhile (a later wait arms a new check), or closing already
        if self.sent != sent:
            self._watch_writer()  # it took something: measure the frame it waits on now
            return
        log.info(
            "closed a slow consumer: it took nothing for %d s", self.endpoint.settings.send_timeout
        )
        self.close_now(CloseCode.SLOW_CONSUMER, "slow consumer")

    async def _drain(self, first: str | None) -> None:
        try:
            if first is not None:
                await self.send({"type": "websocket.send", "text": first})
                self.sent += 1
            while self.out:
                item = self.out.popleft()
                if isinstance(item, tuple):
                    code, reason = item
                    await self.send({"type": "websocket.close", "code": code, "reason": reason})
                    self.out = None
                    return
                self.out_bytes -= len(item)
                await self.send({"type": "websocket.send", "text": item})
                self.sent += 1
            self.out = None
        except Exception:
            # The client went away (the receive loop sees the disconnect), or the ASGI server
            # closed the socket on its own (uvicorn's keepalive ping timed out) without telling
            # the receive loop, which may then wait on a socket that never drains: arm the abort.
            self.out = None
            if not self.closing:
                self._begin_closing()

    def close_soon(self, code: int, reason: str) -> None:
        """Close after the frames already queued (protocol errors, heartbeat)."""
        if self.closing:
            return
        self.endpoint.metrics.closed(code)
        self._begin_closing()
        self._queue().append((code, reason))
        self._start_writer()

    def close_now(self, code: int, reason: str) -> None:
        """Close without sending what is queued (slow consumer, oversize frame)."""
        self.endpoint.metrics.closed(code)
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        self.out = deque([(code, reason)])
        self.out_bytes = 0
        if not self.closing:
            self._begin_closing()
        self._start_writer()

    def _begin_closing(self) -> None:
        # A close decided outside the receive loop (a delivery to a slow consumer, a timer)
        # leaves that loop waiting in receive(), which returns only when the client answers
        # the close frame or the socket goes: a client that never reads would hold the
        # connection for ever. So the abort after the grace is armed here, from the decision,
        # and not only when the loop ends (the ASGI call's ``finally`` arms it again; the
        # second check finds the socket closed and does nothing).
        self.closing = True
        release_socket_later(self.send, CLOSE_TIMEOUT + self.endpoint.settings.close_grace)

    # ------------------------------------------------------------------ work

    async def authenticate(self, action: VerifyToken | RotateRefresh) -> None:
        endpoint, core = self.endpoint, self.core
        tokens: dict[str, Any] | None = None
        try:
            if isinstance(action, VerifyToken):
                claims = await endpoint.auth.verify_access(action.token)
            else:
                pair = await endpoint.auth.refresh(action.refresh_token, action.retry_key)
                # Read back the identity of the token just minted (its iat, exp).
                claims = endpoint.auth.tokens.verify(pair.access_token, now=endpoint.clock())
                tokens = {
                    "accessToken": pair.access_token,
                    "refreshToken": pair.refresh_token,
                    "expiresAt": pair.expires_at,
                }
            # The session may have ended between the lookup and now: the hub remembers.
            if endpoint.hub.recently_ended(claims.session_id) is not None:
                raise AuthFailure(AuthErrorCode.SESSION_REVOKED, "the session has ended")
        except AuthFailure as exc:
            self.execute(
                core.auth_failed(action.auth_version, auth_error_code(exc), exc.message, self.now())
            )
            return
        except TokenError as exc:  # only from reading back a token the service just minted
            self.execute(core.auth_failed(action.auth_version, exc.code, exc.message, self.now()))
            return
        except Exception:
            # Never leave the request in flight: later auth requests would queue forever.
            log.exception("authentication failed unexpectedly")
            self.execute(
                core.auth_failed(
                    action.auth_version,
                    AuthErrorCode.UNAVAILABLE,
                    "authentication failed on the server; retry shortly",
                    self.now(),
                )
            )
            return
        identity = Identity(
            claims.user_id, claims.session_id, float(claims.issued_at), float(claims.expires_at)
        )
        self.execute(core.auth_succeeded(action.auth_version, identity, self.now(), tokens))

    def now(self) -> float:
        return self.endpoint.clock()

    def _identity_usable(self, identity: Identity | None) -> bool:
        """Check at use: an identity past exp + leeway, or whose session ended, runs nothing."""
        if identity is None:
            return True
        endpoint = self.endpoint
        if not identity.usable(self.now(), endpoint.settings.clock_leeway):
            self.execute(self.core.on_timer(self.now()))
            return False
        reason = endpoint.hub.recently_ended(identity.session_id)
        if reason is not None:
            self.execute(self.core.session_ended(identity.session_id, reason, self.now()))
            return False
        return True

    # ------------------------------------------------------------------ queries

    def run_queries(self, action: RunQueries) -> None:
        """Attach the subscriptions to the instance's shared live queries."""
        endpoint = self.endpoint
        serials = action.serials or (0,) * len(action.queries)
        regs = []
        partitioned: dict[str, list[Registration]] = {}
        if self.regs is None:
            self.regs = {}
        replaced: set[str] = set()  # partitions released once the new regs are attached
        for (qid, name, args), serial in zip(action.queries, serials, strict=True):
            old = self.regs.pop(qid, None)
            if old is not None:
                endpoint.detach(old, release=False)
                if old.partition is not None:
                    replaced.add(old.partition)
            reg = Registration(self, qid, serial, action.generation, name, args, action.identity)
            reg.partition = partition = endpoint.engine.partition_of(name, args)
            self.regs[qid] = reg
            if partition is None:
                regs.append(reg)
            else:
                partitioned.setdefault(partition, []).append(reg)
                self.partitioned = True
        if regs:
            endpoint.subscriptions.attach(regs)
        refused: list[tuple[Registration, Evaluation]] = []
        # The partitions this connection's other subscriptions already span: each follower is
        # a Redis connection of the instance, so one socket may not claim many of them.
        spanned = {
            r.partition
            for r in self.regs.values()
            if r.partition is not None and not r.detached and r.partition not in partitioned
        }
        cap = endpoint.settings.max_connection_partitions
        for partition, group in partitioned.items():
            if partition not in spanned and len(spanned) >= cap:
                for reg in group:
                    reg.detached = True
                    refused.append((reg, endpoint.too_many_connection_partitions))
                continue
            spanned.add(partition)
            manager = endpoint.partitions.manager(partition)
            if manager is not None:
                manager.attach(group)
                continue
            for reg in group:
                reg.detached = True  # followed by no manager: its one result is the refusal
                refused.append((reg, endpoint.too_many_partitions))
        if refused:
            asyncio.get_running_loop().call_soon(self.deliver, 0, refused)
        for partition in replaced:
            endpoint.partitions.release(partition)

    def drop_query(self, query_id: int) -> None:
        reg = self.regs.pop(query_id, None) if self.regs else None
        if reg is not None:
            self.endpoint.detach(reg)
        core = self.core
        if core.held_results and not self.closing:
            # A mutation's result may have been held for this subscription's first result
            # (rule 5), above the connection's version: nothing would deliver it now. The
            # instance's subscriptions are delivered at ``processed``, at or past every held
            # result's version (run_mutation waited for it before the result was held).
            self.execute(core.advance_version(self.endpoint.subscriptions.processed, self.now()))

    def deliver(
        self,
        version: int,
        updates: list[tuple[Registration, Evaluation]],
        shared: dict[tuple[Any, ...], Send] | None = None,
    ) -> None:
        regs = self.regs
        if regs is None:
            return
        results = []
        for reg, ev in updates:
            if regs.get(reg.query_id) is not reg:
                continue
            error = ev.error
            reads_identity = ev.reads_identity
            results.append(
                QueryResult(
                    reg.query_id,
                    ev.value_json if error is None else None,
                    error,
                    reads_identity,
                    reg.serial,
                    # A result that read no identity is valid under any identity.
                    reg.generation if reads_identity else None,
                )
            )
        if not results:
            return
        core = self.core
        actions = core.queries_done(core.generation, version, results, self.now(), shared)
        if len(actions) == 1:
            action = actions[0]
            if isinstance(action, Send) and action.text is not None:
                # Only the shared transition, and no timer fired: the connection's deadlines are
                # unchanged, so there is nothing to reschedule (the common fan-out case).
                self.enqueue(action.text)
                return
        self.execute(actions)

    def current_identity(self) -> Identity | None:
        return self.core.identity

    def current_generation(self) -> int:
        return self.core.generation

    def identity_ended(self) -> None:
        self._identity_usable(self.core.identity)

    # ------------------------------------------------------------------ mutations

    def _still_usable(self, action: RunMutation) -> bool:
        """May the mutation ``action`` still act (commit, be answered)? Its identity has not
        been replaced by another principal (same generation), and the connection's identity
        now — which a same-session refresh may have extended past ``action.identity``'s
        ``exp`` — is not past exp + leeway and its session has not ended."""
        if self.core.generation != action.generation:
            return False  # the identity it ran under has ended: its answer is dropped anyway
        return self._identity_usable(self.core.identity)

    async def run_mutation(self, action: RunMutation) -> None:
        core = self.core
        if not self._still_usable(action):
            self._mutation_failed(action, FunctionErrorCode.UNAUTHENTICATED, IDENTITY_ENDED)
            return
        try:
            outcome = await self.endpoint.engine.run_mutation(
                action.name,
                action.args,
                action.identity,
                client_id=core.client_id or "",
                request_id=action.request_id,
                # Asked again before each commit attempt: a conflict's retries take time, and
                # the session may end meanwhile.
                authorized=lambda: self._still_usable(action),
            )
            if outcome.error == (
                FunctionErrorCode.UNAUTHENTICATED,
                IDENTITY_ENDED,
            ) and self._still_usable(action):
                # The store found the session's fence while this instance knows of no end: the
                # end's event has not reached us yet, or the expiry sweep fenced a session that
                # a refresh kept alive and is lifting the fence. Not a definite answer: the
                # client re-sends (and meets session_revoked, or a commit).
                self._mutation_failed(
                    action,
                    MutationErrorCode.UNAVAILABLE,
                    "the session's end could not be confirmed; re-send with the same requestId",
                )
                return
            version = outcome.version
            if version is not None and outcome.error is None and outcome.partition is not None:
                # A partition's version: read your writes in that partition (its subscriptions
                # here are delivered at >= it), and the result carries the connection's version
                # after that delivery, so versions only grow on the connection.
                partitions = self.endpoint.partitions
                manager = partitions.get(outcome.partition)
                processed = version
                if manager is not None:
                    manager.notify_commit(version, outcome.written_keys, outcome.written_values)
                if manager is not None and core.subscriptions:
                    # (With no subscription, nothing to wait for: as in the default partition
                    # below.)
                    try:
                        async with asyncio.timeout(DELIVERY_TIMEOUT):
                            processed = await manager.wait_processed(version)
                    finally:
                        # Also when the wait ends otherwise (the socket closed: cancelled; the
                        # timeout): the wait may have been all that still held the follower.
                        partitions.release(outcome.partition)
                self.execute(core.advance_version(processed, self.now()))
                self.partitioned = True
                version = core.version
            elif version is not None and outcome.error is None:
                # Read your writes: every subscription of this connection is delivered at a
                # version >= the commit's before the mutation's result goes out.
                manager = self.endpoint.subscriptions
                manager.notify_commit(version, outcome.written_keys, outcome.written_values)
                if core.subscriptions:
                    async with asyncio.timeout(DELIVERY_TIMEOUT):
                        processed = await manager.wait_processed(version)
                else:
                    # No subscription to deliver first: the result goes out now, not after this
                    # instance's pump has processed the commit (a writer's round trip shrinks by
                    # that pump cycle). A subscription made from now on is still delivered at
                    # >= version: notify_commit has the pump read up to it before it delivers
                    # anything (SubscriptionManager._cycle); a resync or a gap that reads an
                    # older version meanwhile re-evaluates every entry at a snapshot taken after
                    # the commit, which raises the target again. The connection's version is now
                    # ``version``, so its versions still only grow.
                    processed = version
                self.execute(core.advance_version(processed, self.now()))
                if self.partitioned:
                    # The connection's version may be another partition's: never go below it.
                    version = max(version, core.version)
        except RequestIdReused as exc:
            # Rule 4: the requestId holds another function's outcome; nothing was written.
            refusal = BadMessage(ErrorCode.BAD_MESSAGE, str(exc), request_id=action.request_id)
            self.execute(core.mutation_refused(action.generation, refusal))
            return
        except (RedisError, TimeoutError):
            # Whether it committed is unknown; re-sending the same requestId is always safe.
            self._mutation_failed(
                action,
                MutationErrorCode.UNAVAILABLE,
                "the data store is unreachable; re-send with the same requestId",
            )
            return
        except Exception:
            # Always answer, or the requestId waits forever and its slot is never freed.
            log.exception("mutation %s failed unexpectedly", action.name)
            self._mutation_failed(action, ErrorCode.INTERNAL, "the mutation failed on the server")
            return
        self.execute(
            core.mutation_done(
                action.generation,
                action.request_id,
                self.now(),
                value_json=outcome.value_json,
                version=version,
                error=outcome.error,
            )
        )

    def _mutation_failed(self, action: RunMutation, code: str, message: str) -> None:
        self.execute(
            self.core.mutation_done(
                action.generation, action.request_id, self.now(), error=(code, message)
            )
        )


class SyncEndpoint:
    """The raw ASGI app serving ``/sync`` for one instance."""

    def __init__(
        self,
        settings: Settings,
        auth: AuthService,
        hub: SessionHub,
        application: App,
        engine: QueryEngine,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics = metrics or discarded()
        self.auth = auth
        self.hub = hub
        self.application = application
        self.engine = engine
        self.clock = clock
        self.subscriptions = SubscriptionManager(
            engine,
            clock=clock,
            identity_usable=self.identity_usable,
            metrics=metrics,
            read_cache=ReadCache(engine.store.partition, max_bytes=settings.read_cache_bytes),
            known_values=settings.read_cache_pending_commits,
        )
        #: The live queries of the named data partitions (the default's: ``subscriptions``).
        self.partitions = PartitionFollowers(
            engine,
            clock=clock,
            identity_usable=self.identity_usable,
            metrics=metrics,
            limit=settings.max_followed_partitions,
            read_cache_bytes=settings.read_cache_bytes,
            known_values=settings.read_cache_pending_commits,
        )
        #: The result of a subscription that would make one connection span more partitions
        #: than TETHER_MAX_CONNECTION_PARTITIONS.
        self.too_many_connection_partitions = QueryEvaluation(
            None,
            (
                ErrorCode.LIMIT_EXCEEDED,
                f"this connection's subscriptions span {settings.max_connection_partitions} data"
                " partitions, the most they may (TETHER_MAX_CONNECTION_PARTITIONS); unsubscribe"
                " from one first",
            ),
            frozenset(),
            0,
            False,
        )
        #: The result of a subscription into a partition past that limit.
        self.too_many_partitions = QueryEvaluation(
            None,
            (
                ErrorCode.LIMIT_EXCEEDED,
                f"this instance follows {settings.max_followed_partitions} data partitions, the"
                " most it may (TETHER_MAX_FOLLOWED_PARTITIONS); try again later",
            ),
            frozenset(),
            0,
            False,
        )
        self.timers = DeadlineQueue(clock)
        self.connections: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None  # see _sweep_sockets
        #: Set once :meth:`drain` has begun, and then once the last connection has ended.
        self.drained: asyncio.Event | None = None
        self.timing = Timing(float(settings.expiry_notice), float(settings.clock_leeway))
        self.observe = FrameObserver(metrics, self.timing)
        self.limits = Limits(
            max_subscriptions=settings.max_subscriptions,
            max_pending_mutations=settings.max_pending_mutations,
            # What a reconnecting client pipelines behind its authenticate (rule 1): all its
            # subscriptions and pending mutations, within one send queue's bytes.
            max_held_messages=settings.max_subscriptions + settings.max_pending_mutations,
            max_held_bytes=max(settings.send_queue_bytes, settings.max_message_bytes),
            message_rate=(settings.message_rate.count, float(settings.message_rate.seconds)),
            auth_rate=(settings.auth_rate.count, float(settings.auth_rate.seconds)),
            heartbeat_timeout=float(settings.heartbeat_timeout),
            max_result_chars=settings.effective_max_connection_result_bytes,
            max_json_depth=settings.max_json_depth,
        )

    # ------------------------------------------------------------------ functions

    def identity_usable(self, identity: Caller) -> bool:
        """Check at use, for the live queries: not past exp + leeway, session not ended.

        The live queries hand back the identities this layer gave them; anything else is
        never usable."""
        if not isinstance(identity, Identity):
            return False
        if not identity.usable(self.clock(), self.settings.clock_leeway):
            return False
        return self.hub.recently_ended(identity.session_id) is None

    def detach(self, reg: Registration, *, release: bool = True) -> None:
        """End a subscription, in the manager of its partition (see
        :meth:`PartitionFollowers.detach` for ``release``)."""
        if reg.partition is None:
            self.subscriptions.detach(reg)
        else:
            self.partitions.detach(reg, release=release)

    def resolve(self, kind: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """The core's resolver: the engine's one validation, its failure as a wire error."""
        try:
            return self.engine.resolve(kind, name, args)
        except FunctionError as exc:
            raise BadMessage(ErrorCode(exc.code), exc.message) from None

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: SendFn) -> None:
        if scope["type"] != "websocket":
            return
        # Not kept in a local: this frame lives as long as the socket.
        if (await receive())["type"] != "websocket.connect":
            return
        if not self._origin_ok(scope):
            # A close before the accept is refused by the ASGI server: HTTP 403.
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        await send({"type": "websocket.accept"})
        try:
            if self.drained is not None:
                # Got through while the instance drains (the ASGI server may still accept):
                # send it where the others went.
                close = {"type": "websocket.close", "code": CloseCode.SERVICE_RESTART}
                await send({**close, "reason": DRAIN_REASON})
                return
            core = ConnectionCore(
                connection_id=secrets.token_urlsafe(9),
                now=self.clock(),
                timing=self.timing,
                limits=self.limits,
                resolve=self.resolve,
            )
            if self._sweep is None:
                self._schedule_sweep()
            bind_connection(core)  # the log lines of this socket's tasks carry its ids
            await Connection(self, send, core).run(receive)
        finally:
            release_socket_later(send, self.settings.close_grace)

    def _origin_ok(self, scope: Scope) -> bool:
        # A method of its own so the headers are not kept alive for the socket's life.
        origin = host = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        if origin is None:
            return True  # not a browser: nothing to check
        return origin_allowed(origin, host, self.settings.origin_rules)

    async def drain(self, drain_timeout: float) -> int:
        """Close every socket with 1012 (reconnect at once, elsewhere) and wait up to
        ``drain_timeout`` seconds for them to end; return how many are still open then.

        Each close goes out behind the frames already queued for its socket and ends when the
        client answers it. A socket accepted from now on is closed with 1012 at once. What is
        still open after ``drain_timeout`` is left to the ASGI server's shutdown.
        """
        if self.drained is None:
            self.drained = asyncio.Event()
        if not self.connections:
            self.drained.set()
        for connection in list(self.connections):
            connection.close_soon(CloseCode.SERVICE_RESTART, DRAIN_REASON)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                await self.drained.wait()
        left = len(self.connections)
        if left:
            log.warning("drain timeout: %d socket(s) still open after %.1f s", left, drain_timeout)
        return left

    def close(self) -> None:
        self.timers.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _schedule_sweep(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(
            self.settings.ping_interval, self._sweep_sockets
        )

    def _sweep_sockets(self) -> None:
        """Every ``TETHER_PING_INTERVAL`` while sockets are open: arm the abort of each whose
        ASGI server is closing it on its own.

        uvicorn drops a connection whose WebSocket ping went unanswered by closing its
        transport, without telling the app; with bytes still buffered for a client that stopped
        reading, that close never completes, and the app's receive waits on (the client's
        frames are no longer read, so only the heartbeat would end it). Seen from here, the
        connection has ended: its socket goes after the close grace (contract §5 rule 9).
        """
        self._sweep = None
        for connection in list(self.connections):
            if not connection.closing and connection.transport_closing():
                log.info("the ASGI server is closing a socket on its own (unanswered ping)")
                connection.end_unseen()
        if self.connections:
            self._schedule_sweep()
