"""Live queries: one evaluation per distinct subscription, re-run only when a commit touches
what it read, delivered as consistent, versioned transitions.

Each instance runs one :class:`SubscriptionManager`. Subscriptions with the same function and
arguments share one :class:`_Entry` — across identities when the query does not read
``ctx.auth`` (a *free* entry), per ``(user, session)`` when it does — and so one evaluation and
one serialised payload, however many sockets hold them.

Consistency. Commits carry a global version and the keys they wrote (the store's commit
stream). An entry's value is valid from its evaluation's snapshot version onwards until a later
commit writes a key in its read set. The manager's *pump* repeats, until nothing is dirty:
apply every commit up to the newest one known and mark the entries it touches; re-evaluate the
dirty ones; if an evaluation saw a snapshot newer than the commits applied so far, apply those
commits too. Commits are known without reading the stream back: the watcher hands over what
its blocking read returned, and the instance that committed hands over its own commit; the pump
reads the stream only for versions it was not given. When a
round marks nothing, every entry is valid at the last version read, ``P``, and the changed
results go out as transitions at version ``P``. A connection therefore never receives a
transition unless all of its subscriptions equal their query's result at that version; and
``P`` only grows. An instance that missed commits (the stream was trimmed, Redis restarted or
the connection dropped) re-evaluates everything before delivering again.

Re-evaluations read through the manager's :class:`~tether.server.data.read_cache.ReadCache`,
which follows the same commits in the same order (``_apply``) and starts over with every gap or
resync: a query whose reads it holds re-runs at ``fetched`` without a Redis round trip, from the
new values the commits' stream entries carry (or this instance's own commit, handed over by
:meth:`SubscriptionManager.notify_commit`). First evaluations read through it too: a result at
``fetched`` is as valid as one at a newer snapshot, and the manager delivers at ``fetched`` or
later either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from tether.server.clock import Clock
from tether.server.data.caller import Caller
from tether.server.data.read_cache import ReadCache
from tether.server.data.store import CommitValues
from tether.server.metrics import Metrics, discarded
from tether.server.tasks import stop_tasks

log = logging.getLogger("tether.subscriptions")

#: Evaluations run at once by the pump.
EVALUATION_CONCURRENCY = 32
#: Rounds of (read commits → re-evaluate) before a cycle gives up converging and starts over.
MAX_ROUNDS = 10
#: Commits read per stream read.
COMMIT_BATCH = 10_000
#: Commits the watcher hands over with the documents they wrote (for the read cache) while the
#: pump has not applied them: past it, with their keys only (their documents leave the cache), so
#: a pump far behind holds at most this many entries' values (each up to
#: ``TETHER_COMMIT_VALUES_BYTES``). The default of ``TETHER_READ_CACHE_PENDING_COMMITS``.
KNOWN_VALUES = 256
#: How long the stream watcher blocks in one read (ms).
WATCH_BLOCK_MS = 2000
#: The longest the pump waits for the watcher to hand over a commit it has not read yet, before
#: it reads the stream itself (s). The watcher's blocking read returns as soon as the commit is
#: in the stream, and a failing watcher wakes the pump at once: this bounds only a hung one.
WATCHER_WAIT = WATCH_BLOCK_MS / 1000 + 1


#: One delivery's cache, made by the manager for all the subscribers it delivers one round to,
#: and opaque to it: a subscriber keeps there what it builds from the results (for the realtime
#: layer, an encoded frame), so that identical deliveries are built once. Typed ``Any`` because
#: what is kept there is the subscriber's business, not the data layer's.
SharedDeliveries = dict[tuple[Any, ...], Any]


class Evaluation(Protocol):
    """What evaluating a query yields (see :meth:`Engine.evaluate`)."""

    @property
    def value_json(self) -> str | None: ...
    @property
    def error(self) -> tuple[str, str] | None: ...
    @property
    def read_set(self) -> frozenset[str]: ...
    @property
    def version(self) -> int | None: ...  # the snapshot the reads saw
    @property
    def reads_identity(self) -> bool: ...


class Commit(Protocol):
    @property
    def version(self) -> int: ...
    @property
    def written_keys(self) -> frozenset[str]: ...
    @property
    def committed_at(self) -> float | None: ...  # seconds since the epoch, if known
    @property
    def values(self) -> CommitValues | None: ...  # the documents written, if the entry has them


class CommitBatch(Protocol):
    @property
    def commits(self) -> tuple[Commit, ...]: ...  # after the position asked for, in order
    @property
    def gap(self) -> bool: ...  # commits were missed: re-evaluate everything
    @property
    def version(self) -> int: ...  # the global version seen


class Engine(Protocol):
    """The data layer as the manager needs it."""

    async def evaluate(
        self, name: str, args: dict[str, Any], identity: Caller | None, cache: ReadCache | None
    ) -> Evaluation: ...

    async def read_commits(
        self, after: int, *, block_ms: int | None, count: int
    ) -> CommitBatch: ...

    async def version(self) -> int: ...


class Subscriber(Protocol):
    """A connection, as the manager sees it."""

    def deliver(
        self,
        version: int,
        updates: list[tuple[Registration, Evaluation]],
        shared: SharedDeliveries | None = None,
    ) -> None:
        """Send these results (all valid at ``version``) in one transition."""

    def identity_ended(self) -> None:
        """An identity this connection subscribed under can no longer be used: re-check it."""

    def current_identity(self) -> Caller | None:
        """The identity the connection holds now."""

    def current_generation(self) -> int:
        """The generation of that identity (see
        :class:`tether.server.realtime.core.ConnectionCore`)."""


Principal = tuple[str, str]  # (user id, session id)
EntryKey = tuple[str, str, Principal | None]


@dataclass(eq=False, slots=True)
class Registration:
    """One ``queryId`` of one connection, attached to a shared entry."""

    subscriber: Subscriber
    query_id: int
    serial: int
    generation: int
    name: str
    args: dict[str, Any]
    identity: Caller | None
    entry: _Entry | None = None
    detached: bool = False
    #: The data partition the query reads (``None``: the default), which manager holds it.
    partition: str | None = None


@dataclass(eq=False, slots=True)
class _Entry:
    key: EntryKey
    name: str
    args: dict[str, Any]
    regs: set[Registration] = field(default_factory=set)
    value: Evaluation | None = None
    text: str | None = None  # what was last delivered, to send only real changes
    valid_at: int = -1

    @property
    def free(self) -> bool:
        return self.key[2] is None

    def identity(self) -> tuple[bool, Caller | None]:
        """``(usable, identity)`` to evaluate under.

        Free and anonymous entries run without an identity. A bound entry runs under the
        newest identity that a subscriber holds *now* for the entry's (user, session) — a
        same-session refresh moves it forward without re-attaching. If no subscriber holds it
        any more, it has been replaced everywhere: ``usable`` is False.
        """
        principal = self.key[2]
        if principal is None or principal == ANONYMOUS:
            return True, None
        best: Caller | None = None
        for reg in self.regs:
            current = reg.subscriber.current_identity()
            if (
                current is not None
                and (current.user_id, current.session_id) == principal
                and (best is None or current.expires_at > best.expires_at)
            ):
                best = current
        return best is not None, best


def _args_key(args: dict[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: The principal of anonymous subscribers (distinct from ``None``, which marks a free entry).
ANONYMOUS: Principal = ("", "")


def _principal(identity: Caller | None) -> Principal:
    return (identity.user_id, identity.session_id) if identity is not None else ANONYMOUS


def _result_text(ev: Evaluation) -> str:
    if ev.error is not None:
        return "\x00" + json.dumps(ev.error)
    return ev.value_json or "null"


class SubscriptionManager:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock,
        identity_usable: Callable[[Caller], bool],
        metrics: Metrics | None = None,
        read_cache: ReadCache | None = None,
        known_values: int = KNOWN_VALUES,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.identity_usable = identity_usable
        self.metrics = metrics or discarded()
        #: What this manager's evaluations read, valid at ``fetched`` (None: every read goes to
        #: Redis). Of the partition the engine follows.
        self.read_cache = read_cache
        #: Commits handed over with their documents at most, not yet applied
        #: (``TETHER_READ_CACHE_PENDING_COMMITS``; see :data:`KNOWN_VALUES`).
        self.known_values = known_values
        # When each commit not yet delivered was made (version -> seconds), for the fan-out
        # latency: a commit of this instance from its reply, another's from the stream.
        self._commit_times: dict[int, float] = {}
        self.entries: dict[EntryKey, _Entry] = {}
        self._by_key: dict[str, set[_Entry]] = {}
        self._free_names: set[tuple[str, str]] = set()  # (name, args) known not to read auth
        self.fetched = 0  # every commit up to this version has been applied to dirtiness
        self.processed = -1  # every entry is valid at this version and was delivered
        # Commits known before the pump reads them from the stream: those the watcher read and
        # those made on this instance (version -> keys written, and the documents' new state
        # when the commit carried it). Applied in version order.
        self._known: dict[int, tuple[frozenset[str], CommitValues | None]] = {}
        self._needed = 0  # a version known to exist: the pump reads up to it before delivering
        # The watcher's position (every commit up to it was handed over, or dropped from
        # `_known` past its bound), whether its reads succeed, and an event set when it hands
        # over more: the pump waits for it rather than read a commit the watcher is about to.
        self._watched = 0
        self._watch_ok = True
        self._handed = asyncio.Event()
        self._wake = asyncio.Event()
        self._dirty: set[_Entry] = set()
        self._changed: set[_Entry] = set()
        self._fresh: set[Registration] = set()
        self._pending: list[Registration] = []
        self._waiters: list[tuple[int, asyncio.Future[int]]] = []
        self._waited = 0  # the highest version a waiter wants (0: none)
        self._resync = True

    # ------------------------------------------------------------------ registrations

    def attach(self, regs: list[Registration]) -> None:
        """Queue these registrations; their first results go out in one transition."""
        self._pending.extend(regs)
        self._wake.set()

    def detach(self, reg: Registration) -> None:
        reg.detached = True
        entry = reg.entry
        reg.entry = None
        if entry is None:
            return
        entry.regs.discard(reg)
        self._fresh.discard(reg)
        if not entry.regs:
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            if entry.free:
                # Client-chosen args must not accumulate: forget it with its last subscriber.
                self._free_names.discard((entry.key[0], entry.key[1]))
        self._dirty.discard(entry)
        self._changed.discard(entry)
        if entry.value is not None:
            for key in entry.value.read_set:
                holders = self._by_key.get(key)
                if holders is not None:
                    holders.discard(entry)
                    if not holders:
                        del self._by_key[key]

    def _place(self, reg: Registration) -> None:
        name_args = (reg.name, _args_key(reg.args))
        key: EntryKey
        if name_args in self._free_names:
            key = (*name_args, None)
        else:
            key = (*name_args, _principal(reg.identity))
        entry = self.entries.get(key)
        if entry is None:
            entry = _Entry(key, reg.name, reg.args)
            self.entries[key] = entry
            self._dirty.add(entry)
        entry.regs.add(reg)
        reg.entry = entry
        self._fresh.add(reg)

    def _index(self, entry: _Entry, old: frozenset[str], new: frozenset[str]) -> None:
        for key in old - new:
            holders = self._by_key.get(key)
            if holders is not None:
                holders.discard(entry)
                if not holders:
                    del self._by_key[key]
        for key in new - old:
            self._by_key.setdefault(key, set()).add(entry)

    # ------------------------------------------------------------------ waiting

    def notify_commit(
        self,
        version: int,
        written_keys: frozenset[str] = frozenset(),
        written_values: CommitValues | None = None,
    ) -> None:
        """A commit was made on this instance at ``version``, writing ``written_keys`` and
        ``written_values`` (what its stream entry holds): process it now, without waiting for
        the stream or reading it back. With no keys, the pump reads the stream up to
        ``version``."""
        if written_keys and version > self.fetched:
            handed = self._known.get(version)
            if handed is None or handed[1] is None:  # else the watcher handed it over already
                self._known[version] = (written_keys, written_values)
        self._commit_made(version, self.clock())
        self._needed = max(self._needed, version)
        self._wake.set()

    async def wait_processed(self, version: int) -> int:
        """Wait until every subscription on this instance is delivered at ≥ ``version``."""
        if self.processed >= version:
            return self.processed
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((version, future))
        self._waited = max(self._waited, version)
        self._needed = max(self._needed, version)
        self._wake.set()
        return await future

    def idle(self) -> bool:
        """Nothing to follow: no subscription, none arriving, no mutation waiting."""
        return (
            not self.entries
            and all(reg.detached for reg in self._pending)
            and not any(not future.done() for _, future in self._waiters)
        )

    def resync(self) -> None:
        """Re-evaluate every entry (after a Redis reconnect or a gap in the stream)."""
        self._resync = True
        self._wake.set()

    # ------------------------------------------------------------------ the pump

    async def run(self) -> None:
        """The pump and the stream watcher, until cancelled."""
        watcher = asyncio.create_task(self._watch(), name="commit-watch")
        backoff = 0.1
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    await self._cycle()
                    backoff = 0.1
                    # A cycle may finish without waiting on anything (all it needed was known):
                    # let the other tasks run before the next one.
                    await asyncio.sleep(0)
                except RedisError as exc:
                    self.metrics.redis_error("subscriptions")
                    log.warning("subscription cycle failed (%s); retrying", exc.__class__.__name__)
                    self._resync = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    self._wake.set()
                except Exception:
                    # A bug must not freeze every live query of the instance: log, start over.
                    log.exception("subscription cycle failed; re-running everything")
                    self._resync = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    self._wake.set()
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        """Block on the commit stream and wake the pump when something arrives."""
        position = max(self.fetched, 0)
        backoff = 0.1
        failing = False
        while True:
            try:
                # Below the Redis client's socket timeout, so an idle wait is not an error.
                batch = await self.engine.read_commits(
                    position, block_ms=WATCH_BLOCK_MS, count=COMMIT_BATCH
                )
                backoff = 0.1
            except Exception as exc:
                self._watch_ok = False
                self._handed.set()  # a pump waiting for the watcher reads the stream itself
                # Whatever failed, the watch goes on: the instance's sockets would otherwise
                # stop hearing of other instances' commits, with nothing to show for it.
                if not failing:
                    if isinstance(exc, RedisError):
                        self.metrics.redis_error("commit_watch")
                        log.warning("commit watch failed (%s); retrying", exc.__class__.__name__)
                    else:
                        log.exception("commit watch failed; retrying")
                    failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self.resync()  # commits may have been missed while Redis was away
                continue
            if failing:
                self.metrics.redis_reconnect("commit_watch")
                log.info("commit watch resumed at version %d", position)
                failing = False
            self._watch_ok = not batch.gap
            if batch.gap:
                # Past a trimmed stretch, or back down when Redis lost its data (the version
                # went backwards): reading on from the old position would see no new commit
                # until the versions climbed past it.
                position = batch.version
                self._watched = position
                self._handed.set()
                self.resync()
            elif batch.commits:
                # Handed to the pump: it need not read them again. Bounded: a pump that has
                # fallen this far behind reads the rest from the stream.
                for commit in batch.commits:
                    known = len(self._known)
                    if commit.version > self.fetched and known < COMMIT_BATCH:
                        values = commit.values if known < self.known_values else None
                        self._known[commit.version] = (commit.written_keys, values)
                    self._commit_made(commit.version, commit.committed_at)
                position = batch.commits[-1].version
                self._watched = max(self._watched, position)
                self._needed = max(self._needed, batch.version)
                self._handed.set()
                self._wake.set()
                # Let the pump deliver them before this task builds and sends its next read:
                # with the values at hand the pump needs no Redis, and it is the latency.
                await asyncio.sleep(0)
            else:
                # Idle: keep the watch position close to the pump's.
                position = max(position, self.fetched)
                self._handed.set()

    async def _cycle(self) -> None:
        for reg in self._pending:
            if not reg.detached:
                self._place(reg)
        self._pending.clear()
        if self._resync:
            self._resync = False
            self._dirty.update(self.entries.values())
            self._known.clear()  # perhaps from before Redis lost data: read them again
            if self.read_cache is not None:
                self.read_cache.reset(None)  # nothing served while the version is read
            self.fetched = await self.engine.version()
            if self.read_cache is not None:
                self.read_cache.reset(self.fetched)
            # Not above the version now: after Redis lost its data, an old target would keep
            # the pump reading the stream (and waiting for the watcher) on every cycle.
            self._needed = max(self.fetched, self._waited)
        converged = False
        for _ in range(MAX_ROUNDS):
            await self._read_commits()
            if not self._dirty:
                converged = True
                break
            dirty = list(self._dirty)
            self._dirty.clear()
            newest = await self._evaluate(dirty)
            if newest <= self.fetched and not self._dirty:
                converged = True
                break
            self._needed = max(self._needed, newest)  # read the commits that run saw
        if not converged:
            self._wake.set()  # commits keep landing on what we read: go round again
            return
        self._deliver()

    async def _read_commits(self) -> None:
        """Apply every commit up to (at least) ``_needed``: those already known, in version
        order, then the rest from the stream."""
        while True:
            known = self._known
            while known:
                handed = known.pop(self.fetched + 1, None)
                if handed is None:
                    break
                self._apply(self.fetched + 1, *handed)
            if known:
                for version in [v for v in known if v <= self.fetched]:
                    del known[version]
            # Waiters need their versions read, whatever lowered the target since they came.
            needed = max(self._needed, self._waited)
            if self.fetched >= needed:
                return
            if self._watch_ok and self._watched <= self.fetched and not self._resync:
                # The next commit is in the stream (a later one is needed) and the watcher has
                # not read it yet: its blocking read returns it at once (it reads after a
                # position at most `fetched`). Wait for that rather than read the stream twice.
                self._handed.clear()
                try:
                    # asyncio.timeout, not wait_for: no task per wait, and no cancellation of
                    # the pump lost (Python 3.11's wait_for can swallow one).
                    async with asyncio.timeout(WATCHER_WAIT):
                        await self._handed.wait()
                except TimeoutError:
                    pass  # a hung watcher: read the stream
                else:
                    continue  # apply what it handed over (a failed watcher: read below)
            batch = await self.engine.read_commits(self.fetched, block_ms=None, count=COMMIT_BATCH)
            if batch.gap:
                self._dirty.update(self.entries.values())
                self.fetched = self._needed = batch.version
                if self.read_cache is not None:
                    self.read_cache.reset(batch.version)
                known.clear()
                return
            for commit in batch.commits:
                self._apply(commit.version, commit.written_keys, commit.values)
                self._commit_made(commit.version, commit.committed_at)
            self._needed = max(self._needed, batch.version)
            if len(batch.commits) < COMMIT_BATCH:
                return

    def _commit_made(self, version: int, at: float | None) -> None:
        """Remember when commit ``version`` was made, for the fan-out latency (bounded: past
        :data:`COMMIT_BATCH` waiting commits, later ones go unmeasured)."""
        times = self._commit_times
        if at is not None and version > self.processed and len(times) < COMMIT_BATCH:
            times.setdefault(version, at)

    def _commits_delivered(self, version: int, *, sent: bool) -> None:
        """Commits up to ``version`` are delivered: observe their latency if this round sent
        anything (a commit that changed no subscription has no fan-out to measure)."""
        times = self._commit_times
        now = self.clock()
        observe = self.metrics.fanout_latency.observe
        for done in [v for v in times if v <= version]:
            made = times.pop(done)
            if sent:
                observe(max(0.0, now - made))

    def _apply(
        self, version: int, written_keys: frozenset[str], values: CommitValues | None = None
    ) -> None:
        """Commit ``version`` wrote ``written_keys`` (and ``values``): what read them is dirty;
        the read cache moves to ``version``."""
        for key in written_keys:
            for entry in self._by_key.get(key, ()):
                if entry.valid_at < version:
                    self._dirty.add(entry)
        self.fetched = version
        if self.read_cache is not None:
            self.read_cache.apply(version, written_keys, values)

    async def _evaluate(self, dirty: list[_Entry]) -> int:
        """Re-evaluate ``dirty``; return the newest snapshot version seen."""
        semaphore = asyncio.Semaphore(EVALUATION_CONCURRENCY)
        newest = self.fetched

        async def one(entry: _Entry) -> None:
            nonlocal newest
            try:
                async with semaphore:
                    # Check at use, once a slot is ours: no function runs under an ended
                    # identity. The connections re-check themselves and come back under their
                    # new identity.
                    usable, identity = entry.identity()
                    if not usable or (identity is not None and not self.identity_usable(identity)):
                        for reg in list(entry.regs):
                            self.detach(reg)
                            reg.subscriber.identity_ended()
                        return
                    ev = await self.engine.evaluate(
                        entry.name, entry.args, identity, self.read_cache
                    )
            except RedisError:
                self._dirty.add(entry)  # try again next cycle
                raise
            if self.entries.get(entry.key) is not entry:
                return  # dropped while evaluating
            if entry.free and ev.reads_identity:
                # It reads the identity after all: each subscriber moves to an entry for its own
                # identity, evaluated in this same cycle (they are dirty, so the cycle does not
                # converge — nor deliver, nor release mutations — before they have values).
                self._free_names.discard((entry.key[0], entry.key[1]))
                self._drop(entry)
                for reg in entry.regs:
                    # Registered perhaps long ago, under an identity the connection has since
                    # replaced: it now depends on the identity the connection holds today.
                    reg.identity = reg.subscriber.current_identity()
                    reg.generation = reg.subscriber.current_generation()
                    self._place(reg)
                return
            version = ev.version if ev.version is not None else self.fetched
            newest = max(newest, version)
            old = entry.value.read_set if entry.value is not None else frozenset()
            entry.value = ev
            entry.valid_at = version
            self._index(entry, old, ev.read_set)
            text = _result_text(ev)
            if text != entry.text:
                self._changed.add(entry)
            entry.text = text
            if not ev.reads_identity and not entry.free:
                self._make_free(entry)

        if len(dirty) == 1:
            await one(dirty[0])  # the common case after a commit: no task, no loop iteration
            return newest
        results = await asyncio.gather(*(one(entry) for entry in dirty), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return newest

    def _make_free(self, entry: _Entry) -> None:
        """An entry found not to read the identity moves to (or merges into) the free entry."""
        name_args = (entry.key[0], entry.key[1])
        self._free_names.add(name_args)
        free_key: EntryKey = (*name_args, None)
        target = self.entries.get(free_key)
        self.entries.pop(entry.key, None)
        if target is None:
            entry.key = free_key
            self.entries[free_key] = entry
            return
        # Merge: the regs move over; those whose value differs get it as fresh.
        assert entry.value is not None
        self._index(entry, entry.value.read_set, frozenset())
        for reg in entry.regs:
            reg.entry = target
            self._fresh.add(reg)
            target.regs.add(reg)
        entry.regs.clear()
        self._changed.discard(entry)

    def _deliver(self) -> None:
        version = max(self.fetched, self.processed)
        per_subscriber: dict[Subscriber, list[tuple[Registration, Evaluation]]] = {}
        regs = set(self._fresh)
        for entry in self._changed:
            regs.update(entry.regs)
        self._fresh.clear()
        self._changed.clear()
        for reg in regs:
            holder = reg.entry
            if holder is None:
                continue  # detached
            if holder.value is None:
                self._fresh.add(reg)  # not evaluated yet: deliver with its first value
                continue
            per_subscriber.setdefault(reg.subscriber, []).append((reg, holder.value))
        self.processed = version
        # Subscribers of one query mostly receive the same transition: it is encoded once.
        shared: SharedDeliveries = {}
        for subscriber, updates in per_subscriber.items():
            try:
                subscriber.deliver(version, updates, shared)
            except Exception:
                log.exception("delivering a transition failed")
        if self._commit_times:
            self._commits_delivered(version, sent=bool(per_subscriber))
        if self._pending:
            # Subscriptions arrived during this cycle and have no value yet: a mutation's
            # result must not overtake their first transition (read your writes).
            self._wake.set()
            return
        still: list[tuple[int, asyncio.Future[int]]] = []
        for wanted, future in self._waiters:
            if future.done():
                continue
            if wanted <= version:
                future.set_result(version)
            else:
                still.append((wanted, future))
        self._waiters = still
        self._waited = max((wanted for wanted, _ in still), default=0)
        if still:
            self._wake.set()


class PartitionEngine(Engine, Protocol):
    """One partition's engine: its commit stream and version; closed when no longer followed."""

    async def aclose(self) -> None: ...


class PartitionedEngine(Protocol):
    """The data layer as :class:`PartitionFollowers` needs it: one engine per partition,
    following that partition's commit stream and version."""

    def in_partition(self, partition: str | None) -> PartitionEngine: ...


class PartitionFollowers:
    """The live queries of the named data partitions on this instance (the default partition
    has its own :class:`SubscriptionManager`, run by the application).

    Each partition with a live subscription here gets its own :class:`SubscriptionManager`
    (its pump and its blocking commit-stream watcher: one Redis connection per followed
    partition), started with the first subscription in the partition and stopped when the
    last one leaves. Its transitions carry the partition's version; the connection sends the
    larger of that and the version it last sent (versions only grow on a connection).
    """

    def __init__(
        self,
        engine: PartitionedEngine,
        *,
        clock: Clock,
        identity_usable: Callable[[Caller], bool],
        metrics: Metrics | None = None,
        limit: int = 1000,
        read_cache_bytes: int | None = None,
        known_values: int = KNOWN_VALUES,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.identity_usable = identity_usable
        self.metrics = metrics or discarded()
        #: Partitions followed at most (``TETHER_MAX_FOLLOWED_PARTITIONS``).
        self.limit = limit
        #: The bound of each follower's read cache (``TETHER_READ_CACHE_BYTES``; None: none).
        self.read_cache_bytes = read_cache_bytes
        #: Each follower's bound on commits held with their documents (see SubscriptionManager).
        self.known_values = known_values
        self._managers: dict[str, SubscriptionManager] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._managers)

    def get(self, partition: str) -> SubscriptionManager | None:
        """The manager following ``partition`` here, if any."""
        return self._managers.get(partition)

    def manager(self, partition: str) -> SubscriptionManager | None:
        """The manager following ``partition``, started if there was none; ``None`` when
        there was none and :attr:`limit` partitions are followed already."""
        manager = self._managers.get(partition)
        if manager is None:
            if len(self._managers) >= self.limit:
                return None
            engine = self.engine.in_partition(partition)
            cache = None
            if self.read_cache_bytes is not None:
                cache = ReadCache(partition, max_bytes=self.read_cache_bytes)
            manager = SubscriptionManager(
                engine,
                clock=self.clock,
                identity_usable=self.identity_usable,
                metrics=self.metrics,
                read_cache=cache,
                known_values=self.known_values,
            )
            self._managers[partition] = manager
            self._tasks[partition] = asyncio.create_task(
                self._follow(manager, engine), name=f"subscriptions-partition-{len(self._managers)}"
            )
        return manager

    @staticmethod
    async def _follow(manager: SubscriptionManager, engine: PartitionEngine) -> None:
        try:
            await manager.run()
        finally:
            await engine.aclose()

    def detach(self, reg: Registration, *, release: bool = True) -> None:
        """End ``reg``; stop following its partition if it was the last thing that needed it
        (unless ``release`` is false: the caller is about to attach there again)."""
        assert reg.partition is not None
        manager = self._managers.get(reg.partition)
        if manager is None:
            reg.detached = True
            return
        manager.detach(reg)
        if release:
            self.release(reg.partition)

    def release(self, partition: str) -> None:
        """Stop following ``partition`` if nothing here needs it any more."""
        manager = self._managers.get(partition)
        if manager is not None and manager.idle():
            del self._managers[partition]
            self._tasks.pop(partition).cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._managers.clear()
        self._tasks.clear()
        await stop_tasks(tasks)
