"""Sessions and refresh-token rotation, held atomically in Redis.

A session is one hash (``redis_keys.session``) holding its user, its deadlines and the hashes of
its current and previous refresh secrets. Rotation is one Lua script (``lua/session_rotate.lua``)
so every instance sees one order of events; ending a session is another
(``lua/session_end.lua``), which also publishes the session-ended event that the realtime layer
fans out. Expired sessions are ended by a sweep that any number of instances may run at once.

Session-ended event, published on ``redis_keys.SESSION_ENDED_CHANNEL`` as JSON::

    {"type": "session_ended", "sessionId": SID, "userId": UID, "reason": REASON, "at": MS}

``reason`` is one of :class:`tether.protocol.SessionEndReason`.

Session fences
--------------
Once a session has ended it writes nothing (protocol 1.1 §5 rule 6), on every instance. The
session hash lives in its own Cluster slot, the data in another, so no script can end a session
and refuse its commits in one step. Instead, a session gets a *fence*
(``redis_keys.data_session_fence``, a string in the data slot holding the end's reason) that the
data layer's ``commit.lua`` checks atomically with each commit, and the fence is written
**before** the session-end script runs: by :meth:`SessionStore.end`, :meth:`SessionStore.end_all`
(for every session id of the user), the expiry sweep (only for the sessions whose own deadline
has passed) and ``tether sessions revoke``. A mutation racing the end therefore either commits
before the fence or not at all, and a sign-out's answer, or a ``session_revoked`` push, comes
after the fence. A fence that cannot be written (a Redis error) fails the call before the
session ends: the sign-out answers 503 and can be retried; a session is never ended unfenced.

Partitions. A session may commit into any number of data partitions, each its own slot with
its own fence key (``redis_keys.data_keys(P).session_fence``). Before its first commit into a
partition P, the data layer registers P in the session's set (``redis_keys.session_partitions``,
in the session's slot), by a script (``data/lua/partition_register.lua``) that refuses once the
session is ending or ended. Ending a session first marks it *ending* atomically with reading that
set (``lua/session_ending.lua``), then fences the default partition and every registered one, then
ends it. A commit into P therefore either was registered before the mark (and P is fenced before
the end) or is refused at registration.

Two ends are decided inside the rotation script, which cannot write the fence itself: reuse (a
refresh answered ``refresh_reused``) and a refresh that finds the session past its deadline.
There :meth:`SessionStore.rotate` writes the fence right after the script and before it answers,
so the fence exists before the ``refresh_reused`` (or ``refresh_invalid``) answer. For about one
round trip to Redis in between, the script has already published the session-ended event, and a
socket on another instance may receive ``session_revoked`` while a mutation under that session
could still commit. If that fence write fails, the refresh answers ``unavailable`` and the instance
retries the fence in the background (backing off up to :data:`FENCE_RETRY_CAP` seconds) until it
is written or its lifetime has passed: nobody else may retry (the reuse may be an attacker's;
an expired session's retry answers ``refresh_invalid``).

A fence lives :attr:`SessionStore.fence_ttl_ms`: the access-token lifetime plus the clock leeway
plus :data:`FENCE_MARGIN`. After that every access token of the session has expired (an identity
ends at its ``exp`` + leeway, and no token outlives a refresh made before the end by more than
the access-token lifetime), so no caller can present the session any more.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from tether.protocol import HTTPCode, SessionEndReason
from tether.server.auth.refresh_tokens import RefreshToken, RefreshTokenCodec, hash_retry_key
from tether.server.clock import Clock, system_clock, to_ms
from tether.server.metrics import Metrics, discarded
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient, connect, load_script
from tether.server.settings import Settings

log = logging.getLogger("tether.sessions")

_T = TypeVar("_T")

#: Kept after a session's deadline so the sweep can still read it and announce its end (ms).
DEADLINE_GRACE_MS = 60_000
#: Most session lookups sent to Redis in one pipeline (see SessionStore.lookup).
LOOKUP_BATCH = 500
#: Sessions the expiry sweep looks at per pass.
SWEEP_BATCH = 200
#: Seconds a session's fence outlives the session's last access token (access-token lifetime +
#: clock leeway): for a mutation that passed its connection's identity check just before the
#: token's end and reaches Redis later, a token minted by a refresh racing the end, and clock
#: skew between the instances (a token's ``exp``) and Redis (the fence's expiry).
FENCE_MARGIN = 60
#: Seconds before the first retry of a fence write that failed after the rotation script had
#: ended the session, and the most between two retries (they go on for the fence's lifetime).
FENCE_RETRY_FIRST = 0.1
FENCE_RETRY_CAP = 5.0
#: Most sessions :meth:`SessionStore.end_all` marks, or ends, at once (a user may hold
#: thousands: one task and one script call each, all at once, would flood the instance).
END_ALL_CONCURRENCY = 16
#: Most fence writes one pipeline carries: a user's sessions times their partitions (up to
#: TETHER_MAX_SESSION_PARTITIONS each) could otherwise make one pipeline of millions.
FENCE_PIPELINE_COMMANDS = 1000


def _end_call() -> str:
    """A fresh id for one end (``session_end.lua`` keeps it in the tombstone)."""
    return secrets.token_hex(8)


async def _bounded_gather(
    items: list[str], run: Callable[[str], Awaitable[_T]], limit: int
) -> list[_T]:
    """``run(item)`` for every item, at most ``limit`` at a time; the results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: str) -> _T:
        async with gate:
            return await run(item)

    return await asyncio.gather(*(one(item) for item in items))


#: The rotation script's answers as the metric's outcomes ('current': the previous token again,
#: within the reuse window or with its retryKey).
_REFRESH_OUTCOMES = {
    "rotated": "rotated",
    "current": "retried",
    "reused": "reused",
    "expired": "expired",
    "invalid": "invalid",
}


class RefreshRejected(Exception):
    """A refresh token was refused: ``code`` is ``refresh_invalid`` or ``refresh_reused``."""

    def __init__(self, code: HTTPCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SessionGrant:
    """What sign-in and refresh hand out, before an access token is minted for it."""

    user_id: str
    session_id: str
    refresh_token: str
    deadline_ms: int  # when the session ends unless refreshed (inactivity) or at all (absolute)


@dataclass(frozen=True)
class SessionInfo:
    user_id: str
    deadline_ms: int


@dataclass(frozen=True)
class TokenHolder:
    """Whose token a refresh token is (:meth:`SessionStore.token_holder`)."""

    user_id: str
    #: The token is the session's current or previous one (not an older one: reuse).
    recent: bool


class _LookupBatch:
    """The session lookups asked for in one turn of ``loop``, by session id."""

    __slots__ = ("loop", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters: dict[str, list[asyncio.Future[SessionInfo | None]]] = {}


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


class SessionStore:
    def __init__(
        self,
        redis: RedisClient,
        codec: RefreshTokenCodec,
        settings: Settings,
        clock: Clock = system_clock,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.codec = codec
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or discarded()
        # Session lookups waiting for the end of this event-loop turn (see lookup).
        self._batch: _LookupBatch | None = None
        self._answering: set[asyncio.Task[None]] = set()
        # Fences of sessions the rotation script ended, retried after a failed write: one
        # retry per session, however many requests replay its token meanwhile.
        self._refencing: dict[str, asyncio.Task[None]] = {}
        self._rotate = load_script(redis, "tether.server.auth", "session_rotate")
        self._end = load_script(redis, "tether.server.auth", "session_end")
        self._release_fence = load_script(redis, "tether.server.auth", "fence_release")
        self._ending = load_script(redis, "tether.server.auth", "session_ending")
        # The rotation script's constant settings, as its one ARGV[3] (settings are immutable).
        self._rotate_settings = (
            f"{settings.refresh_reuse_window * 1000} {self._tombstone_ms}"
            f" {DEADLINE_GRACE_MS} {redis_keys.SESSION_ENDED_CHANNEL}"
        ).encode()

    @property
    def _tombstone_ms(self) -> int:
        # A tombstone outlives every access token of the session it replaces.
        return (self.settings.access_ttl + self.settings.clock_leeway) * 1000

    @property
    def fence_ttl_ms(self) -> int:
        """How long an ended session's fence lives (ms): see the module's docstring."""
        return (self.settings.access_ttl + self.settings.clock_leeway + FENCE_MARGIN) * 1000

    async def _begin_ending(self, session_id: str, value: str, *, nx: bool = False) -> list[str]:
        """Mark the session as ending (no data partition registers with it any more) and
        return the partitions registered before: each needs the session's fence too. With
        ``nx`` an existing mark stays (the sweep lifts only a mark of its own)."""
        reply = await self._ending(
            keys=[
                redis_keys.session_partitions(session_id),
                redis_keys.session_ending(session_id),
            ],
            args=[self.fence_ttl_ms, value, "nx" if nx else ""],
        )
        return sorted(str(p) for p in reply)

    async def _fence(self, session_ids: list[str], reason: SessionEndReason) -> None:
        """Write the fences of ``session_ids``: in the default data partition and in every
        partition each session registered (see the module's docstring). Redis errors
        propagate: the caller must not end a session whose fence is missing."""
        if not session_ids:
            return
        marked = await _bounded_gather(
            session_ids, lambda sid: self._begin_ending(sid, reason.value), END_ALL_CONCURRENCY
        )
        fences = [
            fence
            for sid, partitions in zip(session_ids, marked, strict=True)
            for fence in (
                redis_keys.data_session_fence(sid),
                *(redis_keys.data_keys(p).session_fence(sid) for p in partitions),
            )
        ]
        for start in range(0, len(fences), FENCE_PIPELINE_COMMANDS):
            async with self.redis.pipeline(transaction=False) as pipe:
                for fence in fences[start : start + FENCE_PIPELINE_COMMANDS]:
                    pipe.set(fence, reason.value, px=self.fence_ttl_ms)
                await pipe.execute()

    async def create(self, user_id: str) -> SessionGrant:
        """Start a session for ``user_id`` and mint its first refresh token."""
        now = to_ms(self.clock())
        sid = new_session_id()
        token = self.codec.mint(sid)
        absolute = now + self.settings.session_ttl * 1000
        inactive = self.settings.session_inactive_ttl * 1000
        deadline = min(absolute, now + inactive)
        key = redis_keys.session(sid)
        user_sessions = redis_keys.user_sessions(user_id)
        # The session hash is written atomically on its own; the indexes live in other slots and
        # are written after it. A crash in between leaves a session the sweep still expires.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                key,
                mapping={
                    "state": "active",
                    "uid": user_id,
                    "created": now,
                    "abs": absolute,
                    "last": now,
                    "inactive": inactive,
                    "cur": token.secret_hash,
                    "prev": "",
                    "rotated": 0,
                    "retry": "",
                },
            )
            pipe.pexpireat(key, deadline + DEADLINE_GRACE_MS)
            pipe.zadd(redis_keys.SESSION_DEADLINES, {sid: deadline})
            pipe.sadd(user_sessions, sid)
            pipe.pexpire(user_sessions, self.settings.session_ttl * 1000 + DEADLINE_GRACE_MS)
            await pipe.execute()
        return SessionGrant(user_id, sid, token.token, deadline)

    async def rotate(self, raw_token: object, retry_key: str | None = None) -> SessionGrant:
        """Apply the rotation rules to ``raw_token``; return the (new or current) grant.

        Raises :class:`RefreshRejected`; Redis errors propagate (the caller answers
        ``unavailable``: an outage never ends a session). When the script ended the session
        (reuse, or a token presented past the deadline), the session's fence is written before
        the refusal is raised (see the module's docstring).
        """
        token = self.codec.parse(raw_token)
        if token is None:
            # Forged or malformed: refused before Redis is touched.
            self.metrics.refresh_outcome("invalid")
            raise RefreshRejected(HTTPCode.REFRESH_INVALID, "the refresh token is not valid")
        successor = self.codec.successor(token)
        sid = token.session_id
        hashes = token.secret_hash + successor.secret_hash
        if retry_key:
            hashes += hash_retry_key(retry_key)
        reply: str = await self._rotate(
            keys=[redis_keys.session(sid)],
            args=[to_ms(self.clock()), hashes, self._rotate_settings],
        )
        # 'rotated DEADLINE USERID' | 'current DEADLINE USERID' | 'reused' | 'expired' | 'invalid'
        outcome, _, rest = reply.partition(" ")
        self.metrics.refresh_outcome(_REFRESH_OUTCOMES.get(outcome, "invalid"))
        if outcome == "rotated" or outcome == "current":
            deadline, _, user_id = rest.partition(" ")
            return SessionGrant(user_id, sid, successor.token, int(deadline))
        if outcome == "expired":
            await self._fence_after_end(sid, SessionEndReason.SESSION_EXPIRED)
        elif outcome == "reused":
            await self._fence_after_end(sid, SessionEndReason.REFRESH_REUSED)
            raise RefreshRejected(
                HTTPCode.REFRESH_REUSED,
                "this refresh token was already used; the session has been ended",
            )
        raise RefreshRejected(HTTPCode.REFRESH_INVALID, "the refresh token is not valid")

    async def _fence_after_end(self, session_id: str, reason: SessionEndReason) -> None:
        """Fence a session the rotation script has already ended. If Redis refuses now, the
        error propagates (the refresh answers ``unavailable``) and the fence is retried in the
        background until it is written or would have expired: nobody may be left to retry
        (an attacker's reuse, an expired session's client)."""
        try:
            await self._fence([session_id], reason)
        except RedisError:
            if session_id not in self._refencing:
                task = asyncio.get_running_loop().create_task(
                    self._fence_until_written(session_id, reason)
                )
                self._refencing[session_id] = task
                task.add_done_callback(lambda _: self._refencing.pop(session_id, None))
            raise

    async def _fence_until_written(self, session_id: str, reason: SessionEndReason) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.fence_ttl_ms / 1000
        delay = FENCE_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self._fence([session_id], reason)
            except RedisError as exc:
                if loop.time() + delay > give_up:
                    log.error(
                        "an ended session's fence could not be written before it would have "
                        "expired; giving up: %s",
                        type(exc).__name__,
                    )
                    return
                delay = min(delay * 2, FENCE_RETRY_CAP)
                continue
            log.info("an ended session's fence was written on a retry")
            return

    async def aclose(self) -> None:
        """Stop the background fence retries (see :meth:`rotate`)."""
        tasks = list(self._refencing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def end(self, session_id: str, reason: SessionEndReason) -> bool:
        """End one session; True if this call ended it (it was active).

        Its fence is written first (also when it had already ended: ending is idempotent), so
        no mutation under it commits once this returns; Redis errors propagate, the session
        maybe not ended yet (retry)."""
        await self._fence([session_id], reason)
        ended = await self._end_fenced(session_id, reason, _end_call())
        if ended:
            await self._unindex([session_id])
        return ended

    async def _end_fenced(self, session_id: str, reason: SessionEndReason, call: str) -> bool:
        """Run the session-end script for a session whose fence has been written; True if it
        was active and ``call`` (the id of the caller's end, :func:`_end_call`) ended it, also
        when the script's reply was lost and redis-py sent it again."""
        reply = await self._end(
            keys=[redis_keys.session(session_id)],
            args=[
                session_id,
                reason.value,
                to_ms(self.clock()),
                self._tombstone_ms,
                redis_keys.SESSION_ENDED_CHANNEL,
                "0",
                call,
            ],
        )
        return int(reply[0]) == 1

    async def _unindex(self, session_ids: list[str]) -> None:
        """Drop ended sessions' deadline entries, best effort: the sessions have ended and been
        announced; an entry left (its Cluster node down) is dropped by the first sweep that
        meets it."""
        try:
            await self.redis.zrem(redis_keys.SESSION_DEADLINES, *session_ids)
        except RedisError as exc:
            log.warning("sessions ended; their deadline entries stay: %s", type(exc).__name__)

    async def end_all(self, user_id: str, reason: SessionEndReason) -> int:
        """End every session of ``user_id``; return how many this call ended.

        The count is of the user's sessions that were active when this call's end script
        reached them and that it ended: a session another call ended first (a concurrent
        sign-out, the sweep, an earlier ``end_all``) is not counted, and one whose script
        reply was lost and sent again by redis-py is (the script recognises the call's id in
        the tombstone). So two calls racing count each session once between them.

        Every session id of the user is fenced first, then each is ended; the sessions are
        marked and ended concurrently, at most :data:`END_ALL_CONCURRENCY` at a time. Redis
        errors propagate (retry: ending is idempotent)."""
        index = redis_keys.user_sessions(user_id)
        sids = [str(sid) for sid in await self.redis.smembers(index)]
        await self._fence(sids, reason)
        call = _end_call()
        outcomes = await _bounded_gather(
            sids, lambda sid: self._end_fenced(sid, reason, call), END_ALL_CONCURRENCY
        )
        ended = [sid for sid, was_active in zip(sids, outcomes, strict=True) if was_active]
        if ended:
            await self._unindex(ended)
        if sids:
            await self.redis.srem(index, *sids)
        return len(ended)

    async def token_holder(self, token: RefreshToken) -> TokenHolder | None:
        """The user of ``token``'s session if that session is active now, else ``None``.

        Reads only: a sign-out from the refresh cookie uses it to learn the user, without
        rotating the token (the rotation rules are the refresh's alone)."""
        now = to_ms(self.clock())
        fields: list[Any] = await self.redis.hmget(
            redis_keys.session(token.session_id),
            ["state", "uid", "abs", "last", "inactive", "cur", "prev"],
        )
        state, uid, absolute, last, inactive, cur, prev = fields
        if state != "active" or now >= min(int(absolute), int(last) + int(inactive)):
            return None
        return TokenHolder(str(uid), token.secret_hash in (cur, prev))

    async def lookup(self, session_id: str) -> SessionInfo | None:
        """The session if it is active now, else ``None``.

        The lookups asked for in one turn of the event loop go to Redis together, after it:
        every ``authenticate`` takes this path, and under a reconnect storm thousands arrive
        at once; one pipeline for all of them costs a fraction of one command each.
        """
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or batch.loop is not loop:
            batch = self._batch = _LookupBatch(loop)
            # The task's first step runs after every callback already queued in this turn:
            # the lookups they ask for join the batch before it is sent.
            task = loop.create_task(self._send_batch(batch))
            # Held until done: the loop keeps only weak references to tasks.
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        waiter: asyncio.Future[SessionInfo | None] = loop.create_future()
        batch.waiters.setdefault(session_id, []).append(waiter)
        return await waiter

    async def _send_batch(self, batch: _LookupBatch) -> None:
        if self._batch is batch:
            self._batch = None
        sids = list(batch.waiters)
        if len(sids) <= LOOKUP_BATCH:
            await self._answer(sids, batch.waiters)  # no task of its own: one hop fewer
            return
        chunks = [sids[i : i + LOOKUP_BATCH] for i in range(0, len(sids), LOOKUP_BATCH)]
        await asyncio.gather(*(self._answer(chunk, batch.waiters) for chunk in chunks))

    async def _answer(
        self, sids: list[str], waiters: dict[str, list[asyncio.Future[SessionInfo | None]]]
    ) -> None:
        try:
            found = await self.lookup_many(sids)
        except Exception as exc:
            if len(sids) > 1:
                # One session's node may be down (a Cluster failover) while the others are up:
                # each lookup on its own then, so that only those on that node fail.
                await asyncio.gather(*(self._answer([sid], waiters) for sid in sids))
                return
            for waiter in waiters[sids[0]]:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for sid in sids:
            for waiter in waiters[sid]:
                if not waiter.done():  # the caller may have been cancelled (its socket went)
                    waiter.set_result(found[sid])

    async def lookup_many(self, session_ids: list[str]) -> dict[str, SessionInfo | None]:
        """Batch form of :meth:`lookup`: one round trip per Redis node."""
        now = to_ms(self.clock())
        fields = ["state", "uid", "abs", "last", "inactive"]
        if len(session_ids) == 1:
            # One command, without a pipeline's overhead (about a quarter of its CPU).
            rows: list[Any] = [await self.redis.hmget(redis_keys.session(session_ids[0]), fields)]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hmget(redis_keys.session(sid), fields)
                rows = await pipe.execute()
        result: dict[str, SessionInfo | None] = {}
        for sid, (state, uid, absolute, last, inactive) in zip(session_ids, rows, strict=True):
            info = None
            if state == "active":
                deadline = min(int(absolute), int(last) + int(inactive))
                if now < deadline:
                    info = SessionInfo(uid, deadline)
            result[sid] = info
        return result

    async def end_reasons(self, session_ids: list[str]) -> dict[str, SessionEndReason]:
        """Why each of ``session_ids`` ended, read from its tombstone.

        A session with no tombstone left (its key expired) counts as ``session_expired``.
        Call it only for sessions :meth:`lookup_many` found inactive.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hget(redis_keys.session(sid), "reason")
            rows = await pipe.execute()
        result = {}
        for sid, reason in zip(session_ids, rows, strict=True):
            try:
                result[sid] = SessionEndReason(reason)
            except ValueError:
                result[sid] = SessionEndReason.SESSION_EXPIRED
        return result

    async def sweep_expired(self) -> int:
        """End sessions whose deadline passed (announcing ``session_expired``); return how many.

        Safe to run on every instance at once: ending is atomic and announces once. The
        deadline index lags refreshes, so each indexed session's own deadline is read first,
        and only those past it are fenced before the script ends them. Redis errors propagate
        (the sessions not yet ended are taken up by the next pass).
        """
        now = to_ms(self.clock())
        due = [
            str(sid)
            for sid in await self.redis.zrangebyscore(
                redis_keys.SESSION_DEADLINES, "-inf", now, start=0, num=SWEEP_BATCH
            )
        ]
        if not due:
            return 0
        fenced = await self._fence_expired(due, now)
        ended = 0
        call = _end_call()
        for sid in due:
            reply = await self._end(
                keys=[redis_keys.session(sid)],
                args=[
                    sid,
                    SessionEndReason.SESSION_EXPIRED.value,
                    now,
                    self._tombstone_ms,
                    redis_keys.SESSION_ENDED_CHANNEL,
                    "1",
                    call,
                ],
            )
            if int(reply[0]) == 0:
                if sid in fenced:
                    # Refreshed between the read and the script (an instance whose clock lags
                    # saw it alive): lift the fences and the ending mark, unless someone else's
                    # replaced them.
                    value, partitions = fenced[sid]
                    for key in [
                        redis_keys.data_session_fence(sid),
                        *(redis_keys.data_keys(p).session_fence(sid) for p in partitions),
                        redis_keys.session_ending(sid),
                    ]:
                        await self._release_fence(keys=[key], args=[value])
                # Refreshed since it was indexed: move it to its new deadline.
                await self.redis.zadd(redis_keys.SESSION_DEADLINES, {sid: int(reply[1])})
            else:
                ended += int(reply[0]) == 1
                await self.redis.zrem(redis_keys.SESSION_DEADLINES, sid)
        return ended

    async def _fence_expired(
        self, session_ids: list[str], now: int
    ) -> dict[str, tuple[str, list[str]]]:
        """Fence those of ``session_ids`` that are active and past their own deadline at
        ``now``, in the default partition and every partition each registered; return the
        fence value this sweep wrote for each and its partitions (a fence or mark that already
        exists is left as it is: lifting compares the value, so only what this sweep wrote is
        ever lifted by it)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hmget(redis_keys.session(sid), ["state", "abs", "last", "inactive"])
            rows = await pipe.execute()
        expired = [
            sid
            for sid, (state, absolute, last, inactive) in zip(session_ids, rows, strict=True)
            if state == "active" and now >= min(int(absolute), int(last) + int(inactive))
        ]
        if not expired:
            return {}
        values = {
            sid: f"{SessionEndReason.SESSION_EXPIRED.value} {secrets.token_urlsafe(9)}"
            for sid in expired
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid, value in values.items():
                pipe.set(redis_keys.data_session_fence(sid), value, px=self.fence_ttl_ms, nx=True)
            await pipe.execute()  # the default fence exists now: this sweep's or another end's
        # Every expired session is marked and fenced in its partitions, also one whose default
        # fence was there already: that one may be another sweep's, still on its way to the
        # partitions, while this sweep's end script would end the session now. Each write is
        # NX with this sweep's own value, so lifting (by value) takes back only what it wrote.
        result: dict[str, tuple[str, list[str]]] = {}
        for sid in expired:
            value = values[sid]
            partitions = await self._begin_ending(sid, value, nx=True)
            for partition in partitions:
                fence = redis_keys.data_keys(partition).session_fence(sid)
                await self.redis.set(fence, value, px=self.fence_ttl_ms, nx=True)
            result[sid] = (value, partitions)
        return result


async def revoke_from_cli(redis_url: str, *, user_id: str | None, session_id: str | None) -> int:
    """``tether sessions revoke``: end sessions as an administrator; return how many ended.

    Each session is fenced before it ends (:meth:`SessionStore.end`), with the fence lifetime of
    the settings this process loads (``TETHER_ACCESS_TTL``, ``TETHER_CLOCK_LEEWAY``): run it with
    the deployment's settings."""
    redis = connect(redis_url)
    try:
        # The codec is not needed to end sessions: no token is minted or parsed.
        store = SessionStore(redis, RefreshTokenCodec(b"\0" * 32), Settings.load())
        if session_id is not None:
            return int(await store.end(session_id, SessionEndReason.REVOKED))
        if user_id is not None:
            return await store.end_all(user_id, SessionEndReason.REVOKED)
        raise ValueError("give a user id or a session id")
    finally:
        await redis.aclose()
