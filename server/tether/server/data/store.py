"""The data layer's storage: documents, indexes and serialisable mutations, held in Redis.

An application declares its tables and their indexes
(:meth:`tether.server.data.functions.App.table`). Its functions reach the data through ``ctx.db``: a
:class:`QueryDB` in a query, a :class:`MutationDB` in a mutation. :class:`Store` gives a run
(a callable the engine binds to the function: the store never calls application code) its view,
retries it and commits it (:meth:`Store.run_query`, :meth:`Store.run_mutation`), and reads the
stream of commits that the reactive layer follows (:meth:`Store.read_commits`).

Storage (key layout in :mod:`tether.server.redis.keys`)
------------------------------------------------
A document is a hash holding its JSON and the version of the commit that last wrote it; an index
key is a sorted set of the ids whose indexed fields hold one list of values, in creation order.
Every commit advances its partition's version by exactly one and appends ``(version, written
keys)`` to the partition's Redis Stream (a hot key's batch, :meth:`Store._run_batch`, by one
per member that succeeded, in one step: its first entry lists every key written, the others
none).

Partitions: a :class:`Store` reads and writes one data partition (:attr:`Store.partition`;
``None``, the default partition, whose keys are ``tether:{tether-data}:…``), and
:meth:`Store.in_partition` gives the same store on another partition's keys (its own hash tag,
version, commit stream, outcomes and session fences: ``redis_keys.DataKeys``). Everything below
holds per partition; "the global version" is the partition's.

Guarantees
----------
* **Mutations are serialisable** (optimistic concurrency control, as in Convex). A mutation runs
  against Redis without locks, recording the version of every document and index key it reads
  and buffering its writes; :func:`commit` (``lua/commit.lua``) then checks in one atomic step
  that none of those versions has changed, applies the writes and appends the commit. A changed
  read fails the commit with :class:`Conflict` and :meth:`Store.run_mutation` runs the function
  again, up to ``max_retries`` times (on a key that conflicted recently, the instance's mutations
  take turns, see :class:`_Turns`); then its outcome is the error ``conflict``. A mutation
  sees its own buffered writes. An application error is also checked against the reads (it is
  the answer of a consistent state), and its writes are dropped.
* **Hot keys commit in batches** (group commit, :meth:`Store._run_batch`): the calls queued on
  an instance for a hot key run one after another against one read and each other's writes,
  and commit with one script call, each member that succeeds at a version of its own
  (consecutive; the stream entry of the first lists every key written, the others none).
  Every guarantee here holds for each member (a member is a replay, an error, or ended on its
  own; the others run again without it when needed).
* **Queries see one snapshot.** Each read (``lua/read.lua``, atomic, an index range together with
  its documents) returns the global version and the version of every key read. The first read
  fixes the query's snapshot; a later read that meets a key written after it raises the internal
  :class:`SnapshotMoved` and the whole query runs again, so a result never mixes two versions.
  Past ``query_attempts`` runs the result is the error ``conflict``.
* **A mutation runs once per** ``(user, clientId, requestId)`` (:class:`MutationRequest`; the
  user is ``None`` for an anonymous caller). Its outcome (value and version, or error, and the
  function's name) is written by the same script as its writes, so a replay on any instance, or
  a concurrent duplicate, gets the first outcome and applies nothing, for ``outcome_ttl`` seconds
  (at least 10 minutes). Each user has its own outcomes: another user (or an anonymous caller)
  sending the same ``clientId`` and ``requestId`` neither sees nor disturbs them, and runs its
  own mutation. A replay that names another function raises :class:`RequestIdReused` and
  commits nothing (protocol 1.1 §5 rule 4). A commit without a client id is still safe to retry
  after a lost reply: each attempt carries a random id, kept ``ATTEMPT_TTL`` seconds.
* **An ended session commits nothing** (protocol 1.1 §5 rule 6). Ending a session first writes
  its *fence* (``redis_keys.data_session_fence``, in the data slot;
  :class:`tether.server.auth.sessions.SessionStore`), and ``commit.lua`` refuses a commit whose
  session has a fence, atomically with the rest of the commit: a mutation racing a sign-out on
  another instance either committed before the fence or not at all. Only a replay of an outcome
  stored before the end still answers. The refused mutation ends with ``unauthenticated`` and
  leaves no outcome, so the same user may re-send it after signing in again.
* **Versions only grow** and the commit stream holds every version in order; a reader that falls
  behind the stream's trimmed head, or finds the global version below what it saw (data loss),
  is told (:attr:`CommitBatch.gap`) and must re-run everything.

Limits
------
* Every key of a partition carries its hash tag: in Redis Cluster a partition is one slot, on one
  primary. The default partition scales with that node; an application that declares partitions
  spreads them over the cluster (``docs/scaling.md``).
* An ended session's fence in a partition other than the default is written only if the session
  registered that partition before its first commit there (:meth:`Store._register`, one script
  call per session and partition, cached :data:`REGISTRATION_CACHE_SECONDS` per instance).
* The version of every index key ever written stays in one hash (``tether:{tether-data}:kv``): it
  grows with the number of distinct indexed values, never shrinks.
* A deleted document leaves a tombstone for ``tombstone_ttl`` seconds (default one day). A query
  that runs longer than that could miss a deletion that happened during it.
* Creation order is commit order; ``_creationTime`` is the inserting instance's clock, so two
  instances' clocks can disagree with it by their skew.
* At most :data:`MAX_INSERTS` inserts per mutation, documents up to :data:`MAX_DOCUMENT_BYTES`,
  indexed values up to :data:`MAX_INDEX_VALUES_BYTES` (``limit_exceeded``). A query without a
  ``limit`` reads its whole index range in one script call.
* A read set is coarse: reading an index range depends on the whole index key, so any insert or
  removal under those values conflicts with (or re-runs) it.

Exception tree::

    FunctionError (server.errors)    what a function's caller sees: invalid, not_found, conflict …
    └── MisuseError                  invalid: the application asked what the store cannot do
    Conflict                         a commit's reads changed; nothing was written
    RequestIdReused                  a request id whose outcome belongs to another function
    SnapshotMoved (BaseException)    internal: a run saw a newer version; it is retried

Redis errors (``redis.exceptions.RedisError``) propagate from every method, also when they happen
inside an application function: the caller answers them, they are not the function's outcome.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import json
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

from redis.exceptions import RedisError

from tether.protocol import ErrorCode, FunctionErrorCode
from tether.server.clock import Clock, to_ms
from tether.server.errors import FunctionError, MisuseError
from tether.server.metrics import Metrics, discarded
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient, dedicated, load_script, without_turns

if TYPE_CHECKING:
    from tether.server.data.read_cache import ReadCache

__all__ = [
    "ATTEMPT_TTL",
    "IDENTITY_ENDED",
    "MAX_DOCUMENT_BYTES",
    "MAX_INDEX_VALUES_BYTES",
    "MAX_INSERTS",
    "Commit",
    "CommitBatch",
    "CommitResult",
    "CommitValues",
    "Conflict",
    "MutationDB",
    "MutationOutcome",
    "MutationRequest",
    "MutationRunner",
    "QueryDB",
    "QueryRun",
    "QueryRunner",
    "RequestIdReused",
    "Schema",
    "SessionPartitionsExceeded",
    "SnapshotMoved",
    "Store",
    "encode_index_values",
]

#: Table → index name → indexed fields, as :attr:`tether.server.data.functions.App.schema` gives it.
Schema = Mapping[str, Mapping[str, tuple[str, ...]]]
Order = Literal["asc", "desc"]
_D = TypeVar("_D", "QueryDB", "MutationDB")

#: Inserts one mutation may make: a document's creation score is ``version * 1000 + slot``.
MAX_INSERTS = 1000
#: Largest document, as compact UTF-8 JSON.
MAX_DOCUMENT_BYTES = 1_048_576
#: Largest list of indexed values, as canonical UTF-8 JSON (it becomes part of a Redis key).
MAX_INDEX_VALUES_BYTES = 1024
#: The most a commit's stream entry carries of the documents it wrote (the field ``w``, as JSON
#: text, ``TETHER_COMMIT_VALUES_BYTES``): past it, the entry carries their keys only.
COMMIT_VALUES_BYTES = 16_384
#: Seconds a commit made without a client id remembers its attempt (a retried call's answer).
ATTEMPT_TTL = 120
#: The least ``outcome_ttl`` a :class:`Store` accepts: a client replays within minutes.
MIN_OUTCOME_TTL = 600

#: Seconds an instance trusts its own registration of a partition with a session, and the least
#: lifetime of a session's partition set (``tether:session:{SID}:partitions``, renewed on every
#: registration): the set outlives every cached registration.
REGISTRATION_CACHE_SECONDS = 60
REGISTRATION_TTL = 3600
#: Registrations an instance caches before it starts over.
MAX_REGISTRATIONS_CACHED = 100_000
#: Seconds a request's claim (:meth:`Store.claim_request`) outlives an outcome's lifetime: the
#: outcome is stored when the mutation ends, after the claim.
CLAIM_MARGIN = 60

#: How long a key stays hot on an instance after a commit conflicted on it there (seconds): its
#: mutations take turns on it (see :class:`_Turns`). At most :data:`_MAX_HOT_KEYS` are tracked.
HOT_SECONDS = 1.0
_MAX_HOT_KEYS = 1024
#: Calls (function and arguments) whose first read a Store remembers, to make it together with
#: the outcome check (see :meth:`Store.run_mutation`).
_MAX_FIRST_READS = 4096
#: Backoff between the runs of a conflicting mutation that holds no turn on the key it
#: conflicted on (another mutation of this instance holds it): full jitter, doubling, capped
#: (seconds).
_BACKOFF_BASE = 0.004
_BACKOFF_CAP = 0.25

#: The ids ``insert`` makes (``secrets.token_urlsafe(16)``) and the only ids a document can have.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_SHOWN_CHARS = 40
#: Any limit above this reads the whole range.
_ALL = 2**31

_NO_WRITES = "queries cannot write"
_CONFLICT_MESSAGE = "the data changed too often while the {} ran; try again"


# ---------------------------------------------------------------------------------- errors


class Conflict(Exception):
    """A commit found that something the mutation read has changed; nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(f"conflict on {key}")
        self.key = key


class SessionPartitionsExceeded(Exception):
    """A session's first commit into one more data partition than it may register
    (``TETHER_MAX_SESSION_PARTITIONS``): nothing was sent. A mutation answers it with the error
    ``limit_exceeded``."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this session has committed into {limit} data partitions, the most it may"
            " (TETHER_MAX_SESSION_PARTITIONS); sign in again for a new session"
        )


class RequestIdReused(Exception):
    """A mutation's request id already holds the outcome of another function: nothing ran and
    nothing was written.

    Protocol 1.1 §5 rule 4: re-sending a ``requestId`` with another function name is refused
    (the endpoint answers ``error`` ``bad_message`` with the ``requestId``). ``name`` is the
    function the request names, ``stored_name`` the one whose outcome the id holds.
    """

    def __init__(self, request_id: int, name: str, stored_name: str | None) -> None:
        super().__init__(
            f"requestId {request_id} already has the outcome of {_shown(stored_name)},"
            f" not of {_shown(name)}"
        )
        self.request_id = request_id
        self.name = name
        self.stored_name = stored_name


class _Abort(BaseException):
    """Internal: ends a function run from inside ``ctx.db``, through the application's code.

    A ``BaseException``, like ``CancelledError``, so that neither
    :func:`~tether.server.data.functions.invoke`'s catch-all nor an
    application's ``except Exception`` turns it into an ``internal`` error. The database also
    keeps it, so a run that swallowed it anyway is still retried (or its Redis error raised).
    """


class SnapshotMoved(_Abort):
    """Internal: a read met a version newer than the run's snapshot; the run is retried."""


class _CacheBehind(SnapshotMoved):
    """Internal: a query read Redis at another version than the read cache that answered its
    earlier reads (:meth:`QueryDB._fetch`); the run is repeated without the cache."""


class _Replayed(_Abort):
    """Internal: the mutation's first read found its outcome stored: it already finished."""

    def __init__(self, stored: str) -> None:
        super().__init__("replayed")
        self.stored = stored


class _BatchFull(_Abort):
    """Internal: a member of a hot key's batch (:meth:`Store._run_batch`) would take more
    creation slots than the batch has left (its inserts share the creation scores of the
    batch's first version, ``V * 1000 + slot``): it runs in the next batch."""


class _RedisFailed(_Abort):
    def __init__(self, error: RedisError) -> None:
        super().__init__(str(error))
        self.error = error


# ---------------------------------------------------------------------------------- results


#: The documents a commit wrote, as its stream entry carries them (field ``w``): document key ->
#: (its JSON text, or ``None`` for a deletion; its creation slot, ``-1`` unless the commit
#: created it). Where a commit's :class:`CommitValues` is ``None``, its entry carried the keys
#: only (past :data:`COMMIT_VALUES_BYTES`).
CommitValues = Mapping[str, tuple[str | None, int]]


@dataclass(frozen=True, slots=True)
class Commit:
    """One entry of the commit stream: a version, the keys its commit wrote, and when it was
    made (seconds since the epoch, Redis's clock; None for an entry without its field ``t``);
    ``values``: the new state of the documents it wrote, when the entry carries it."""

    version: int
    written_keys: frozenset[str]
    committed_at: float | None = None
    values: CommitValues | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CommitBatch:
    """What :meth:`Store.read_commits` found.

    ``commits`` follow ``after`` without a hole, in order. ``gap`` is true when commits were lost
    to the reader (the stream was trimmed past them, or Redis lost data): the reader must re-run
    every query. ``version`` is the latest global version seen.
    """

    commits: tuple[Commit, ...]
    gap: bool
    version: int


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`Store.commit` did: committed at ``version`` writing ``written_keys`` (none, and
    the current version, for a mutation that wrote nothing), or found the mutation already
    finished: then ``duplicate`` is its stored outcome (see :meth:`Store.get_outcome`) and
    ``version`` is ``None``; or found its session ended (``ended``; ``version`` ``None``,
    nothing written, no outcome stored)."""

    version: int | None
    written_keys: frozenset[str]
    duplicate: dict[str, Any] | None = None
    ended: bool = False
    #: What the commit's stream entry carries of the documents it wrote (see :class:`Commit`).
    written_values: CommitValues | None = None
    #: In a batch's commit (see :meth:`Store._run_batch`), the member that is a duplicate or
    #: whose session ended: 0 the first, j the j-th after it.
    member: int = 0


@dataclass(frozen=True, slots=True)
class MutationRequest:
    """A mutation as a client asked for it: the key its outcome is kept under, and its name.

    The outcome belongs to ``(user_id, client_id, request_id)``, ``user_id`` being ``None`` for
    an anonymous caller (protocol 1.1 §5 rule 4), and records ``name``: a replay that names
    another function raises :class:`RequestIdReused`. The store takes the user id as a string
    and knows nothing else of identities.
    """

    name: str
    client_id: str
    request_id: int
    user_id: str | None = None

    @property
    def outcome_key(self) -> str:
        return redis_keys.data_outcome(self.user_id, self.client_id, self.request_id)

    def replay(self, stored: Mapping[str, Any]) -> MutationOutcome:
        """The outcome ``stored`` (from :meth:`Store.get_outcome`) as the answer to this
        request; raises :class:`RequestIdReused` when it is another function's."""
        stored_name = stored.get("name")
        if stored_name != self.name:
            raise RequestIdReused(self.request_id, self.name, stored_name)
        return MutationOutcome.from_stored(stored)


@dataclass(frozen=True, slots=True)
class QueryRun:
    """What :meth:`Store.run_query` found: ``value_json`` or ``error`` (code, message).

    ``read_set`` holds every document and index key the run read (the result changes only when
    one of them is written); ``version`` is the snapshot. ``exhausted`` is true when no run kept
    one snapshot within ``query_attempts``: then ``error`` is ``conflict`` and ``read_set`` joins
    the reads of every run.
    """

    value_json: str | None
    error: tuple[str, str] | None
    read_set: frozenset[str]
    version: int
    exhausted: bool = False


#: A query's function as the store runs it: given the snapshot view, the JSON text of the
#: result, or a :class:`~tether.server.errors.FunctionError`. The caller (the engine) binds the
#: application's function, its arguments and identity; the store never sees them.
QueryRunner = Callable[["QueryDB"], Awaitable[str]]
#: A mutation's function as the store runs it, against the buffering view (see
#: :data:`QueryRunner`).
MutationRunner = Callable[["MutationDB"], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class MutationOutcome:
    """A mutation's outcome: ``value_json`` and the ``version`` it committed at, or ``error``.

    ``written_keys`` is what this run's commit wrote (empty for a replayed outcome, an error, or
    a mutation that wrote nothing): the commit stream's entry at ``version`` holds the same.
    """

    value_json: str | None
    error: tuple[str, str] | None
    version: int | None
    written_keys: frozenset[str] = field(default=frozenset(), compare=False)
    #: What the stream entry at ``version`` carries of the documents written (see :class:`Commit`).
    written_values: CommitValues | None = field(default=None, compare=False)

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> MutationOutcome:
        """The outcome that :meth:`Store.get_outcome` returned."""
        error = stored.get("error")
        if error is not None:
            return cls(None, (str(error["code"]), str(error["message"])), None)
        version = stored.get("version")
        return cls(_compact(stored.get("value")), None, None if version is None else int(version))


# ---------------------------------------------------------------------------------- encoding


def _compact(value: Any) -> str:
    # The same text as functions.encode_result gives: a stored outcome reads back byte for byte.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical(value: Any) -> Any:
    """``value`` with equal JSON numbers made identical (``1.0`` → ``1``), recursively."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def encode_index_values(values: Sequence[Any]) -> str:
    """The index-key segment for one list of indexed values.

    Unpadded base64url of the canonical JSON (sorted object keys, integral floats as integers) of
    the list: two lists share a segment exactly when they are equal as JSON values. Raises
    ``FunctionError("invalid")`` for a value that is not JSON and ``limit_exceeded`` past
    :data:`MAX_INDEX_VALUES_BYTES`.
    """
    try:
        text = json.dumps(
            _canonical(list(values)),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        raise MisuseError("an indexed value is not JSON") from None
    if len(raw) > MAX_INDEX_VALUES_BYTES:
        raise FunctionError(
            ErrorCode.LIMIT_EXCEEDED,
            f"the indexed values are {len(raw)} bytes, over the limit of {MAX_INDEX_VALUES_BYTES}",
        )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _index_key(
    keys: redis_keys.DataKeys,
    table: str,
    index: str,
    fields: tuple[str, ...],
    doc: Mapping[str, Any],
) -> str:
    return keys.index(table, index, encode_index_values([doc.get(f) for f in fields]))


def _encode_document(doc: Mapping[str, Any]) -> tuple[dict[str, Any], str, int]:
    """The document as it will read back, its JSON text, and that text's size in UTF-8 bytes."""
    try:
        text = _compact(doc)
        size = _utf8_len(text)
    except (TypeError, ValueError, RecursionError):
        raise MisuseError("the document is not JSON") from None
    if size > MAX_DOCUMENT_BYTES:
        raise FunctionError(
            ErrorCode.LIMIT_EXCEEDED,
            f"the document is {size} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
        )
    normalized: dict[str, Any] = json.loads(text)
    return normalized, text, size


def _user_fields(fields: object) -> dict[str, Any]:
    """An application's fields, checked: an object whose keys are strings without a ``_``."""
    if not isinstance(fields, Mapping):
        raise MisuseError("a document must be an object")
    for name in fields:
        if not isinstance(name, str):
            raise MisuseError("field names must be strings")
        if name.startswith("_"):
            raise MisuseError(
                f"field {_shown(name)} is reserved: names starting with _ belong to the data layer",
            )
    return dict(fields)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


def _nonce() -> str:
    return secrets.token_urlsafe(12)


def _outcome_text(
    attempt: str,
    *,
    name: str | None = None,
    value_json: str | None = None,
    error: tuple[str, str] | None = None,
) -> str:
    """An outcome as ``commit.lua`` takes it: ``{"attempt":...}``, the function's name, then the
    value or the error. ``commit.lua`` puts ``"version"`` first and reads the attempt right after
    it: nothing may come between them."""
    text = '{"attempt":' + json.dumps(attempt)
    if name is not None:
        text += ',"name":' + json.dumps(name)
    if error is not None:
        text += ',"error":' + _compact({"code": error[0], "message": error[1]})
    elif value_json is not None:
        text += ',"value":' + value_json
    return text + "}"


def _parse_outcome(text: str) -> dict[str, Any]:
    stored = json.loads(text)
    name = stored.get("name")
    if "error" in stored:
        return {"version": None, "error": stored["error"], "name": name}
    return {"version": stored.get("version"), "value": stored.get("value"), "name": name}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class _Doc:
    """A document as read: its key, version (0: never written), JSON (None: absent), score."""

    key: str
    version: int
    doc: dict[str, Any] | None
    score: int


@dataclass(frozen=True, slots=True)
class _Range:
    key: str
    version: int
    docs: tuple[_Doc, ...]


@dataclass(frozen=True, slots=True)
class _DocOp:
    key: str


@dataclass(frozen=True, slots=True)
class _RangeOp:
    key: str
    order: Order
    limit: int | None
    doc_prefix: str


#: A read made before a mutation's run (its ops, and the version and results), for the ops its
#: first read is expected to make.
_Prefetched = tuple[tuple[_DocOp | _RangeOp, ...], tuple[int, list[_Doc | _Range]]]


class _BatchReads:
    """What a hot key's batch read (:meth:`Store._run_batch`), served again to its later members
    (who would read the same): every read of the batch is checked by its one commit, so each
    key is read once at one version. A range read with a larger limit serves a smaller one
    (its first documents); what is served is what the member records as read."""

    __slots__ = ("docs", "ranges", "version")

    def __init__(self) -> None:
        self.version = 0
        self.docs: dict[str, _Doc] = {}
        self.ranges: dict[tuple[str, str, str], tuple[int | None, _Range]] = {}

    def keep(self, ops: Sequence[_DocOp | _RangeOp], read: tuple[int, list[_Doc | _Range]]) -> None:
        self.version = max(self.version, read[0])
        for op, result in zip(ops, read[1], strict=True):
            if isinstance(result, _Doc):
                self.docs.setdefault(op.key, result)
            else:
                assert isinstance(op, _RangeOp)
                limit = None if op.limit is None or op.limit > _ALL else op.limit
                self.ranges[(op.key, op.order, op.doc_prefix)] = (limit, result)
                for doc in result.docs:
                    self.docs.setdefault(doc.key, doc)

    def serve(self, ops: Sequence[_DocOp | _RangeOp]) -> tuple[int, list[_Doc | _Range]] | None:
        results: list[_Doc | _Range] = []
        for op in ops:
            if isinstance(op, _DocOp):
                doc = self.docs.get(op.key)
                if doc is None:
                    return None
                results.append(doc)
                continue
            kept = self.ranges.get((op.key, op.order, op.doc_prefix))
            if kept is None:
                return None
            limit, found = kept
            wanted = None if op.limit is None or op.limit > _ALL else op.limit
            if wanted is None:
                if limit is not None:
                    return None
                results.append(found)
            elif limit is None or wanted <= limit:
                results.append(_Range(found.key, found.version, found.docs[:wanted]))
            else:
                return None
        return self.version, results


class _Database:
    """What :class:`QueryDB` and :class:`MutationDB` share: the schema, reading, aborting."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._aborted: _Abort | None = None

    @property
    def aborted(self) -> bool:
        """Whether this run was cut short (a newer snapshot, or Redis failed)."""
        return self._aborted is not None

    def _raise_redis_failure(self) -> None:
        if isinstance(self._aborted, _RedisFailed):
            raise self._aborted.error

    def _abort(self, reason: _Abort) -> NoReturn:
        if self._aborted is None:
            self._aborted = reason
        raise reason

    def _indexes(self, table: object) -> Mapping[str, tuple[str, ...]]:
        indexes = self._store.schema.get(table) if isinstance(table, str) else None
        if indexes is None:
            raise MisuseError(
                f"no table {_shown(table)} in the schema (declare it with App.table)",
            )
        return indexes

    def _range_key(
        self, table: str, index: object, equals: object, order: object, limit: object
    ) -> tuple[str, tuple[str, ...]]:
        """The index key a query reads, and the index's fields; ``invalid`` for a bad query."""
        indexes = self._indexes(table)
        fields = indexes.get(index) if isinstance(index, str) else None
        if fields is None:
            raise MisuseError(f"table {table!r} has no index {_shown(index)}")
        if not isinstance(equals, Mapping) or set(equals) != set(fields):
            names = ", ".join(fields) or "no fields"
            raise MisuseError(
                f"index {index!r} of table {table!r} is on {names}: equals must give exactly those",
            )
        if order not in ("asc", "desc"):
            raise MisuseError("order must be 'asc' or 'desc'")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise MisuseError("limit must be a non-negative integer")
        assert isinstance(index, str)
        return _index_key(self._store.keys, table, index, fields, equals), fields

    async def _fetch(self, ops: Sequence[_DocOp | _RangeOp]) -> tuple[int, list[_Doc | _Range]]:
        if self._aborted is not None:
            raise self._aborted  # the run is over: it reads nothing more
        try:
            return await self._store._read(ops)
        except RedisError as exc:
            self._abort(_RedisFailed(exc))


class QueryDB(_Database):
    """The ``ctx.db`` of a query: reads at one snapshot, no writes.

    ``get`` and ``query`` record every key they read in :attr:`read_set`. The first read fixes
    :attr:`snapshot`; a later read that meets a key written after it raises :class:`SnapshotMoved`
    (the caller runs the query again). ``insert``, ``patch``, ``replace`` and ``delete`` raise
    ``FunctionError("invalid", "queries cannot write")``.
    """

    def __init__(self, store: Store, cache: ReadCache | None = None) -> None:
        super().__init__(store)
        self._snapshot: int | None = None
        self._read_set: set[str] = set()
        self._cache = cache
        self._cached_at: int | None = None  # the version a cache hit of this run answered at

    async def _fetch(self, ops: Sequence[_DocOp | _RangeOp]) -> tuple[int, list[_Doc | _Range]]:
        cache = self._cache
        if cache is None or self._aborted is not None:
            return await super()._fetch(ops)
        # A live query's re-run: answered by the instance's read cache when it holds every op
        # (at the version the instance has applied), else read and, at that version, kept.
        # A hit returns without suspending, so the caller observes its version before any other
        # read of this run (concurrent ones too) can move the snapshot past it.
        hit = cache.lookup(ops, self._snapshot)
        if hit is not None:
            self._cached_at = hit[0]
            return hit
        version, results = await super()._fetch(ops)
        if self._cached_at is not None and version != self._cached_at:
            # Redis is past the cache's version: what this read returns cannot join the cached
            # answers' snapshot. A key version check would not do: a hot key's batch writes
            # its final state with its first version V (Store._run_batch), so a cache at V
            # would pass a later member's state off as V's; and a key written since would
            # make every run at the cache's version fail. Or Redis is behind it: it lost its
            # data, and the cache holds another history until the watcher notices. The run
            # starts over from Redis.
            self._abort(_CacheBehind())
        cache.fill(version, ops, results)
        return version, results

    @property
    def snapshot(self) -> int | None:
        """The global version every read so far is consistent with; ``None`` before the first."""
        return self._snapshot

    @property
    def read_set(self) -> frozenset[str]:
        return frozenset(self._read_set)

    def _observe(self, version: int, key_versions: Sequence[int]) -> None:
        if self._snapshot is None:
            self._snapshot = version
        elif any(v > self._snapshot for v in key_versions):
            self._abort(SnapshotMoved())

    async def get(self, table: str, id: str) -> dict[str, Any] | None:
        """The document ``id`` of ``table``, or ``None``."""
        self._indexes(table)
        if not isinstance(id, str) or not _ID_RE.fullmatch(id):
            return None  # no document can have this id
        key = self._store.keys.doc(table, id)
        version, results = await self._fetch([_DocOp(key)])
        doc = results[0]
        assert isinstance(doc, _Doc)
        self._read_set.add(key)
        self._observe(version, [doc.version])
        return doc.doc

    async def query(
        self,
        table: str,
        *,
        index: str,
        equals: Mapping[str, Any],
        order: Order = "asc",
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The documents of ``table`` whose ``index`` fields equal ``equals``, in creation order
        (``"desc"``: newest first), at most ``limit`` of them."""
        key, _ = self._range_key(table, index, equals, order, limit)
        version, results = await self._fetch(
            [_RangeOp(key, order, limit, self._store.keys.doc_prefix(table))]
        )
        found = results[0]
        assert isinstance(found, _Range)
        self._read_set.add(key)
        self._read_set.update(doc.key for doc in found.docs)
        self._observe(version, [found.version, *(doc.version for doc in found.docs)])
        return [doc.doc for doc in found.docs if doc.doc is not None]

    async def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        raise MisuseError(_NO_WRITES)

    async def patch(self, table: str, id: str, fields: Mapping[str, Any]) -> None:
        raise MisuseError(_NO_WRITES)

    async def replace(self, table: str, id: str, doc: Mapping[str, Any]) -> None:
        raise MisuseError(_NO_WRITES)

    async def delete(self, table: str, id: str) -> None:
        raise MisuseError(_NO_WRITES)


@dataclass(frozen=True, slots=True)
class _Staged:
    doc: dict[str, Any]
    text: str
    size: int  # of text, in UTF-8 bytes


class MutationDB(_Database):
    """The ``ctx.db`` of a mutation: reads recorded with their versions, writes buffered.

    Nothing reaches Redis before :meth:`Store.commit`, which applies the writes only if every
    recorded read is unchanged. Reads see the mutation's own writes: ``get`` returns the buffered
    document, and ``query`` includes inserted and patched documents that match, drops deleted and
    no-longer-matching ones, and keeps creation order (new documents after existing ones, in
    insertion order). A document read twice at two versions ends the run at once
    (:class:`SnapshotMoved`): it could not commit.

    Documents read back carry ``_id`` and ``_creationTime`` (ms, from the store's clock); field
    names starting with ``_`` are refused on writes (``invalid``). ``patch``, ``replace`` and
    ``delete`` of a missing document raise ``not_found``.
    """

    def __init__(self, store: Store, turns: _Turns | None = None) -> None:
        super().__init__(store)
        self._turns = turns
        # A document read through an index range -> that range's key: the key a conflict on
        # the document is known by before the next run reads it (see _Turns).
        self._via: dict[str, str] = {}
        # The ops of the run's first read, and what Store.run_mutation read for them already.
        self._first_ops: tuple[_DocOp | _RangeOp, ...] | None = None
        self._prefetched: _Prefetched | None = None
        self._reads: dict[str, tuple[Literal["doc", "index"], int]] = {}
        self._base: dict[str, _Doc] = {}  # documents as read from Redis
        self._staged: dict[str, _Staged | None] = {}  # key → final state (None: deleted)
        self._where: dict[str, tuple[str, str]] = {}  # staged key → (table, id)
        self._new: dict[str, int] = {}  # key of an inserted document → its creation slot
        self._inserts = 0
        # A hot key's batch (Store._run_batch) runs its members one after another through one
        # MutationDB: what it read, served again to later members (None: not a batch), the
        # first creation slot of the member running, and whether it ran out of slots.
        self._batch_reads: _BatchReads | None = None
        self._insert_base = 0
        self._batch_full = False

    @property
    def read_set(self) -> frozenset[str]:
        return frozenset(self._reads)

    # -------------------------------------------------------------- reading

    async def _fetch(self, ops: Sequence[_DocOp | _RangeOp]) -> tuple[int, list[_Doc | _Range]]:
        if self._first_ops is None:
            self._first_ops = tuple(ops)
            prefetched, self._prefetched = self._prefetched, None
            if prefetched is not None and prefetched[0] == self._first_ops:
                return prefetched[1]  # read just before the run, with the outcome check
        cache = self._batch_reads
        if cache is not None and self._aborted is None:
            served = cache.serve(ops)
            if served is not None:
                return served
        turns = self._turns
        if turns is not None and self._aborted is None:
            for op in ops:
                await turns.take_if_hot(op.key)
        read = await super()._fetch(ops)
        if cache is not None:
            cache.keep(ops, read)
        return read

    def _savepoint(self) -> tuple[Any, ...]:
        """The writes so far, for :meth:`_rollback` (a batch member's, see Store._run_batch)."""
        return dict(self._staged), dict(self._where), dict(self._new), self._inserts

    def _rollback(self, savepoint: tuple[Any, ...]) -> None:
        """Drop the writes made since ``savepoint``; what was read stays read (and checked)."""
        staged, where, new, inserts = savepoint
        self._staged, self._where, self._new, self._inserts = staged, where, new, inserts

    def _record(self, key: str, kind: Literal["doc", "index"], version: int) -> None:
        seen = self._reads.get(key)
        if seen is None:
            self._reads[key] = (kind, version)
        elif seen[1] != version:
            self._abort(SnapshotMoved())

    def _remember(self, doc: _Doc) -> None:
        self._record(doc.key, "doc", doc.version)
        self._base.setdefault(doc.key, doc)

    async def _current(self, key: str) -> dict[str, Any] | None:
        """The document's state for this mutation (not a copy)."""
        if key in self._staged:
            staged = self._staged[key]
            return None if staged is None else staged.doc
        base = self._base.get(key)
        if base is None:
            _, results = await self._fetch([_DocOp(key)])
            read = results[0]
            assert isinstance(read, _Doc)
            self._remember(read)
            return read.doc
        return base.doc

    async def _existing(self, table: str, doc_id: object) -> dict[str, Any]:
        if isinstance(doc_id, str) and _ID_RE.fullmatch(doc_id):
            current = await self._current(self._store.keys.doc(table, doc_id))
            if current is not None:
                return current
        raise FunctionError(
            FunctionErrorCode.NOT_FOUND, f"no document {_shown(doc_id)} in table {table!r}"
        )

    async def get(self, table: str, id: str) -> dict[str, Any] | None:
        """The document ``id`` of ``table`` as this mutation sees it, or ``None``."""
        self._indexes(table)
        if not isinstance(id, str) or not _ID_RE.fullmatch(id):
            return None
        return copy.deepcopy(await self._current(self._store.keys.doc(table, id)))

    async def query(
        self,
        table: str,
        *,
        index: str,
        equals: Mapping[str, Any],
        order: Order = "asc",
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """As :meth:`QueryDB.query`, over the stored documents with this mutation's writes."""
        key, fields = self._range_key(table, index, equals, order, limit)
        staged_here = [k for k, (t, _) in self._where.items() if t == table]
        # Each stored document this mutation changed may drop out of the range: read that many
        # more, so `limit` documents remain after the overlay.
        changed = sum(1 for k in staged_here if k not in self._new)
        fetch = None if limit is None else limit + changed
        _, results = await self._fetch(
            [_RangeOp(key, order, fetch, self._store.keys.doc_prefix(table))]
        )
        found = results[0]
        assert isinstance(found, _Range)
        self._record(key, "index", found.version)
        for doc in found.docs:
            self._remember(doc)
            self._via.setdefault(doc.key, key)

        rows: list[tuple[tuple[int, int], dict[str, Any]]] = []
        for doc in found.docs:
            if doc.key not in self._staged and doc.doc is not None:
                rows.append(((0, doc.score), doc.doc))
        assert isinstance(index, str)
        for k in staged_here:
            staged = self._staged[k]
            if (
                staged is None
                or _index_key(self._store.keys, table, index, fields, staged.doc) != key
            ):
                continue
            slot = self._new.get(k)
            rank = (1, slot) if slot is not None else (0, self._base[k].score)
            rows.append((rank, staged.doc))
        rows.sort(key=lambda row: row[0], reverse=order == "desc")
        if limit is not None:
            rows = rows[:limit]
        return [copy.deepcopy(doc) for _, doc in rows]

    # -------------------------------------------------------------- writing

    def _stage(self, table: str, doc_id: str, doc: Mapping[str, Any] | None) -> None:
        key = self._store.keys.doc(table, doc_id)
        if doc is None:
            self._staged[key] = None
        else:
            normalized, text, size = _encode_document(doc)
            for index, fields in self._indexes(table).items():
                _index_key(
                    self._store.keys, table, index, fields, normalized
                )  # its size is checked now, not later
            self._staged[key] = _Staged(normalized, text, size)
        self._where[key] = (table, doc_id)

    async def insert(self, table: str, doc: Mapping[str, Any]) -> str:
        """Insert ``doc`` into ``table``; the new document's id (random, URL-safe)."""
        self._indexes(table)
        fields = _user_fields(doc)
        if self._inserts - self._insert_base >= MAX_INSERTS:
            raise FunctionError(
                ErrorCode.LIMIT_EXCEEDED, f"a mutation inserts at most {MAX_INSERTS} documents"
            )
        if self._inserts >= MAX_INSERTS:
            # A batch's members share its first version's creation slots: this one runs next.
            self._batch_full = True
            raise _BatchFull()
        doc_id = secrets.token_urlsafe(16)
        created = to_ms(self._store.clock())
        self._stage(table, doc_id, {"_id": doc_id, "_creationTime": created, **fields})
        self._new[self._store.keys.doc(table, doc_id)] = self._inserts
        self._inserts += 1
        return doc_id

    async def patch(self, table: str, id: str, fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on the document (a shallow merge); ``not_found`` if it is missing."""
        self._indexes(table)
        updates = _user_fields(fields)
        current = await self._existing(table, id)
        self._stage(table, id, {**current, **updates})

    async def replace(self, table: str, id: str, doc: Mapping[str, Any]) -> None:
        """Replace the document's fields with ``doc`` (``_id`` and ``_creationTime`` stay)."""
        self._indexes(table)
        fields = _user_fields(doc)
        current = await self._existing(table, id)
        system = {"_id": current["_id"], "_creationTime": current["_creationTime"]}
        self._stage(table, id, {**system, **fields})

    async def delete(self, table: str, id: str) -> None:
        """Delete the document; ``not_found`` if it is missing."""
        self._indexes(table)
        await self._existing(table, id)
        self._stage(table, id, None)


# ---------------------------------------------------------------------------------- store


@dataclass(frozen=True, slots=True)
class _CommitRequest:
    keys: list[str]
    args: list[str]
    written: frozenset[str]
    values: CommitValues | None = None


class _Turn:
    """One hot key's lock on this instance, and how many mutations hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Turns:
    """The turns one mutation holds, on keys that are hot on this instance, until it ends.

    A key is *hot* for :data:`HOT_SECONDS` after a commit conflicted on it here. A mutation
    that conflicted on a key takes its turn there before running again, and keeps it for its
    remaining attempts (which then run at once, without a backoff: the commit that beat it is
    already in Redis, so the next run reads it); a first attempt takes the turn before it reads
    a hot key. So on each instance one mutation at a time works on a hot key: the others wait
    in line (FIFO) instead of reading a version that only one of them can commit on.

    Deadlock-free: a mutation waits for a turn only while it holds none and waits for no other
    (its function may read concurrently, ``asyncio.gather`` over ``ctx.db``); holding or
    waiting for one, it takes another only when nobody holds or waits for it, and a read of a
    key whose turn it is already waiting for goes ahead without it.
    """

    __slots__ = ("_held", "_store", "_waiting")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: dict[str, _Turn] = {}
        self._waiting: set[str] = set()  # keys whose turn this mutation is waiting for

    @property
    def held(self) -> bool:
        return bool(self._held)

    def holds(self, key: str) -> bool:
        return key in self._held

    async def take_if_hot(self, key: str) -> None:
        if key not in self._held and self._store._is_hot(key):
            await self.take(key)

    async def conflicted(self, key: str) -> None:
        """A commit conflicted on ``key`` (or on a document read through it): mark it hot and
        take its turn for the next attempts."""
        self._store._mark_hot(key)
        await self.take(key)

    async def take(self, key: str) -> None:
        if key in self._held or key in self._waiting:
            return  # held, or a concurrent read of this mutation waits for it: never twice
        turns = self._store._retry_turns
        turn = turns.get(key)
        if turn is None:
            turn = turns[key] = _Turn()
        elif (self._held or self._waiting) and turn.users:
            # Never wait while holding or waiting for a turn: two mutations could wait on each
            # other (or one on itself, through two concurrent reads).
            return
        turn.users += 1
        self._waiting.add(key)
        try:
            await turn.lock.acquire()
        except BaseException:
            self._leave(key, turn)
            raise
        finally:
            self._waiting.discard(key)
        self._held[key] = turn

    def release(self) -> None:
        for key, turn in self._held.items():
            turn.lock.release()
            self._leave(key, turn)
        self._held.clear()

    def _leave(self, key: str, turn: _Turn) -> None:
        turn.users -= 1
        if not turn.users and self._store._retry_turns.get(key) is turn:
            del self._store._retry_turns[key]


#: The error message of a mutation whose caller's identity has ended (before or while it ran).
IDENTITY_ENDED = "the identity has ended; authenticate again"


def _ended() -> MutationOutcome:
    return MutationOutcome(None, (FunctionErrorCode.UNAUTHENTICATED, IDENTITY_ENDED), None)


def _utf8_len(text: str) -> int:
    """``len(text.encode())``, without encoding when ``text`` is ASCII (the common case)."""
    return len(text) if text.isascii() else len(text.encode())


def _written_bytes(db: MutationDB) -> int:
    """The size of what ``db`` would write: its staged documents' JSON, in UTF-8 bytes (each
    measured once, when staged: a batch asks after each member)."""
    return sum(staged.size for staged in db._staged.values() if staged is not None)


class _Member:
    """A mutation waiting in a hot key's queue for a batch (:meth:`Store._run_batch`) to run
    it: what :meth:`Store.run_mutation` was given, its first read, and the future its answer
    (or the exception it raises) is set on."""

    __slots__ = ("attempts", "authorized", "future", "ops", "request", "run", "session_id")

    def __init__(
        self,
        run: MutationRunner,
        request: MutationRequest,
        session_id: str | None,
        authorized: Callable[[], bool] | None,
        ops: tuple[_DocOp | _RangeOp, ...],
    ) -> None:
        self.run = run
        self.request = request
        self.session_id = session_id
        self.authorized = authorized
        self.ops = ops
        self.attempts = 0  # the batches it ran in that conflicted
        self.future: asyncio.Future[MutationOutcome] = asyncio.get_running_loop().create_future()

    def answer(self, outcome: MutationOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def replay(self, stored: Mapping[str, Any]) -> None:
        """Answer with the outcome ``stored`` (or :class:`RequestIdReused`)."""
        try:
            self.answer(self.request.replay(stored))
        except RequestIdReused as exc:
            self.fail(exc)


class _HotQueue:
    """The mutations waiting to run in a batch on one hot key, and the task running them."""

    __slots__ = ("members", "worker")

    def __init__(self) -> None:
        self.members: collections.deque[_Member] = collections.deque()
        self.worker: asyncio.Task[None] | None = None


class Store:
    """Documents, indexes and mutation outcomes in Redis, and the functions that use them.

    ``redis`` must decode responses (:func:`tether.server.redis.connection.connect` does).
    ``schema`` is the application's :attr:`~tether.server.data.functions.App.schema`; ``clock``
    stamps ``_creationTime``. ``stream_maxlen`` bounds the commit stream (approximately: Redis trims
    whole nodes); ``outcome_ttl`` is how long, in seconds, a mutation's outcome answers replays (at
    least :data:`MIN_OUTCOME_TTL`); ``tombstone_ttl`` how long a deleted document's version is kept.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        schema: Schema,
        clock: Clock,
        stream_maxlen: int = 100_000,
        outcome_ttl: int = 900,
        tombstone_ttl: int = 86_400,
        max_result_bytes: int = 1_048_576,
        max_retries: int = 8,
        query_attempts: int = 5,
        metrics: Metrics | None = None,
        max_session_partitions: int = 1000,
        commit_values_bytes: int = COMMIT_VALUES_BYTES,
        max_batch: int = 64,
        max_batch_bytes: int = 1_048_576,
    ) -> None:
        if outcome_ttl < MIN_OUTCOME_TTL:
            raise ValueError(f"outcome_ttl must be at least {MIN_OUTCOME_TTL} seconds")
        if stream_maxlen < 1 or tombstone_ttl < 1 or max_retries < 0 or query_attempts < 1:
            raise ValueError("stream_maxlen, tombstone_ttl and query_attempts must be positive")
        self.redis = redis
        self.schema = schema
        self.clock = clock
        self.stream_maxlen = stream_maxlen
        self.outcome_ttl = outcome_ttl
        self.tombstone_ttl = tombstone_ttl
        self.max_result_bytes = max_result_bytes
        self.max_retries = max_retries
        self.query_attempts = query_attempts
        #: Partitions one session registers at most (``TETHER_MAX_SESSION_PARTITIONS``).
        self.max_session_partitions = max_session_partitions
        #: The most a commit's stream entry carries of its documents (see :data:`CommitValues`).
        self.commit_values_bytes = commit_values_bytes
        #: Most mutations one batch on a hot key commits together (``TETHER_MUTATION_BATCH``;
        #: 1: no batches), and the most bytes of writes and results it gathers
        #: (``TETHER_MUTATION_BATCH_BYTES``). See :meth:`_run_batch`.
        self.max_batch = max(1, max_batch)
        self.max_batch_bytes = max_batch_bytes
        self._batches: dict[str, _HotQueue] = {}  # hot key -> the mutations waiting to batch
        self.metrics = metrics or discarded()
        self._commit_script = load_script(redis, "tether.server.data", "commit")
        self._read_script = load_script(redis, "tether.server.data", "read")
        self._retry_turns: dict[str, _Turn] = {}  # hot key -> the mutations holding its turn
        self._hot: dict[str, float] = {}  # key -> until when it is hot (loop time)
        self._first_reads: dict[Hashable, tuple[_DocOp | _RangeOp, ...]] = {}  # hint -> ops
        #: The default partition's keys; :meth:`in_partition` gives a view on another's.
        self.keys = redis_keys.DEFAULT_DATA
        self._register_script = load_script(redis, "tether.server.data", "partition_register")
        # (session id, partition) -> monotonic time of its registration (see _register).
        # Shared by every partition view of this store.
        self._registered: dict[tuple[str, str], float] = {}
        self._watch_redis: RedisClient | None = None  # see with_watch_connection

    @property
    def partition(self) -> str | None:
        """The partition this store reads and writes (``None``: the default partition)."""
        return self.keys.partition

    def in_partition(self, partition: str | None) -> Store:
        """This store on ``partition``'s keys (``None``: the default partition's): the same
        Redis client, scripts, settings and metrics; its own version and commit stream."""
        if partition == self.keys.partition:
            return self
        view = copy.copy(self)
        view.keys = redis_keys.data_keys(partition)
        return view

    def with_watch_connection(self) -> Store:
        """This store, its blocking commit reads (:meth:`read_commits` with ``block_ms``) on a
        connection of its own (standalone Redis: see ``redis.connection.dedicated``). Close it
        with :meth:`aclose_watch`."""
        view = copy.copy(self)
        view._watch_redis = dedicated(self.redis)
        return view

    async def aclose_watch(self) -> None:
        if self._watch_redis is not None:
            await self._watch_redis.aclose()
            self._watch_redis = None

    async def claim_request(self, request: MutationRequest) -> tuple[str, str | None] | None:
        """Claim ``request``'s id for its function in this partition
        (``redis_keys.request_claim``), unless another partition claimed it first: then return
        that ``(function name, partition)``. The outcome key of each partition is in that
        partition's slot, so only this key, one per request, sees a requestId re-sent into
        another partition (protocol 1.1 §5 rule 4); it outlives the outcome, which is stored when
        the mutation ends."""
        key = redis_keys.request_claim(request.user_id, request.client_id, request.request_id)
        mine = json.dumps([request.name, self.partition])
        ttl_ms = (self.outcome_ttl + CLAIM_MARGIN) * 1000
        while True:
            if await self.redis.set(key, mine, px=ttl_ms, nx=True):
                return None
            raw = await self.redis.get(key)
            if raw is None:
                continue  # expired in between: claim it now
            name, partition = json.loads(_text(raw))
            if partition == self.partition:
                return None  # this partition's outcome decides (a replay, or rule 4 there)
            return str(name), None if partition is None else str(partition)

    def _outcome_key(self, request: MutationRequest) -> str:
        return self.keys.outcome(request.user_id, request.client_id, request.request_id)

    async def _register(self, session_id: str) -> bool:
        """Register this partition with ``session_id`` before its first commit here (contract
        §5 rule 6 across partitions): False when the session is ending or ended, and then the
        commit must not be sent. Raises :class:`SessionPartitionsExceeded` (nothing sent
        either) when the session has registered :attr:`max_session_partitions` others. Ending a
        session fences every partition registered before it started ending
        (:class:`tether.server.auth.sessions.SessionStore`), so a commit here either lands
        before that fence or meets it. Cached per instance for
        :data:`REGISTRATION_CACHE_SECONDS` (the set lives far longer: :data:`REGISTRATION_TTL`).
        """
        partition = self.keys.partition
        if partition is None:
            return True  # the default partition is always fenced
        cache = self._registered
        now = time.monotonic()
        at = cache.get((session_id, partition))
        if at is not None and now - at < REGISTRATION_CACHE_SECONDS:
            return True
        ok = await self._register_script(
            keys=[
                redis_keys.session(session_id),
                redis_keys.session_partitions(session_id),
                redis_keys.session_ending(session_id),
            ],
            args=[partition, REGISTRATION_TTL * 1000, self.max_session_partitions],
        )
        if int(ok) == -1:
            raise SessionPartitionsExceeded(self.max_session_partitions)
        if int(ok) != 1:
            return False
        if len(cache) >= MAX_REGISTRATIONS_CACHED:
            cache.clear()
        cache[(session_id, partition)] = now
        return True

    # -------------------------------------------------------------- versions and commits

    async def version(self) -> int:
        """The global version: that of the last commit, 0 before the first."""
        raw = await self.redis.get(self.keys.version)
        return int(raw) if raw is not None else 0

    async def read_commits(
        self, after: int, *, block_ms: int | None = None, count: int = 100
    ) -> CommitBatch:
        """Up to ``count`` commits with versions above ``after``, in order.

        With ``block_ms``, wait up to that long for a commit when there is none yet (keep it
        below the client's socket timeout). ``gap`` is set when the stream no longer holds
        version ``after + 1`` though the global version is past it (trimmed, or Redis restarted
        without its data), or when the global version is below ``after`` (data loss).
        """
        if block_ms is not None:
            # The watcher's read: one XREAD, which blocks only while there is nothing after
            # ``after``. What it returns is checked for holes below; when it returns nothing,
            # the version is read with the stream (below) to tell a trimmed stream or lost data
            # from a quiet one. (A pipelined GET would cost every commit a command more, on
            # the path from the commit to the other instances' subscribers.)
            redis = self._watch_redis if self._watch_redis is not None else self.redis
            # The blocking read takes no turn on a Cluster node: a burst of commands on the data
            # node must not hold up the watcher (see redis_conn.without_turns).
            with without_turns():
                reply = await redis.xread(
                    {self.keys.commits: f"{after}-0"}, count=count, block=block_ms
                )
            entries: list[Any] = _stream_entries(reply)
            if not entries:
                return await self.read_commits(after, count=count)
            current = 0
        else:
            # One round trip: the global version and the entries after ``after``; a pipeline
            # keeps the replies in order.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.keys.version)
                pipe.xrange(self.keys.commits, min=f"{after + 1}-0", max="+", count=count)
                raw_version, reply = await pipe.execute()
            current = int(raw_version) if raw_version is not None else 0
            if current < after:
                return CommitBatch((), True, current)
            entries = list(reply or [])
        commits: list[Commit] = []
        gap = False
        for _, fields in entries:
            version = int(_text(fields["v"]))
            if version != after + 1 + len(commits):
                gap = True
                break
            keys = json.loads(_text(fields["k"]))
            stamp = fields.get("t")
            committed_at = int(_text(stamp)) / 1e6 if stamp is not None else None
            carried = fields.get("w")
            values: CommitValues | None = None
            if carried is not None:
                values = {row[0]: (row[1], int(row[2])) for row in json.loads(_text(carried))}
            commits.append(Commit(version, frozenset(keys), committed_at, values))
        if gap and block_ms is not None:
            return await self.read_commits(after, count=count)  # a hole: with the version
        if not commits and current > after:
            gap = True
        latest = max(current, commits[-1].version) if commits else current
        return CommitBatch(tuple(commits), gap, latest)

    # -------------------------------------------------------------- outcomes

    async def get_outcome(self, request: MutationRequest) -> dict[str, Any] | None:
        """The stored outcome of ``request``'s ``(user, client, request id)``, or ``None``.

        ``{"version": V, "value": VALUE, "name": NAME}`` for a mutation that succeeded (committed
        at version ``V``), ``{"version": None, "error": {"code", "message"}, "name": NAME}`` for
        one that failed; ``NAME`` is the function whose outcome it is, which may not be
        ``request.name`` (see :meth:`MutationRequest.replay`).
        """
        raw = await self.redis.get(self._outcome_key(request))
        return None if raw is None else _parse_outcome(_text(raw))

    async def put_outcome(
        self, request: MutationRequest, code: str, message: str
    ) -> dict[str, Any]:
        """Store a failure as the outcome of ``request`` unless it has one.

        No commit: for failures decided outside the function (``conflict`` after the last
        retry). Returns the outcome that holds: this one, or the one stored first (which may be
        another function's: see :meth:`MutationRequest.replay`).
        """
        key = self._outcome_key(request)
        outcome = _outcome_text(_nonce(), name=request.name, error=(code, message))
        text = '{"version":null,' + outcome[1:]
        while True:
            if await self.redis.set(key, text, nx=True, px=self.outcome_ttl * 1000):
                return _parse_outcome(text)
            raw = await self.redis.get(key)
            if raw is not None:  # else it expired in between: store ours
                return _parse_outcome(_text(raw))

    # -------------------------------------------------------------- committing

    async def commit(
        self,
        db: MutationDB,
        *,
        request: MutationRequest | None,
        outcome_value_json: str | None,
        session_id: str | None = None,
    ) -> CommitResult:
        """Commit ``db``'s writes if its reads are unchanged; raises :class:`Conflict` otherwise.

        With a ``request``, ``outcome_value_json`` (the mutation's result as compact JSON;
        ``None`` stores ``null``) is stored as its outcome in the same step, and a mutation that
        already has an outcome commits nothing: the result's ``duplicate`` holds that outcome
        (whichever function it names: the caller checks, see :meth:`MutationRequest.replay`).
        With a ``session_id`` whose session has ended (its fence exists), nothing is committed
        or stored: the result is ``ended``. A commit that writes nothing leaves the version as
        it is. Raises :class:`SessionPartitionsExceeded` when the session may register no more
        partitions (nothing committed).
        """
        if session_id is not None and not await self._register(session_id):
            return CommitResult(None, frozenset(), ended=True)
        attempt = _nonce()
        if request is None:
            key, ttl, text = self.keys.attempt(attempt), ATTEMPT_TTL, _outcome_text(attempt)
        else:
            key, ttl = self._outcome_key(request), self.outcome_ttl
            text = _outcome_text(
                attempt, name=request.name, value_json=outcome_value_json or "null"
            )
        return await self._send_commit(
            self._commit_request(db, key, attempt, text, ttl, session_id=session_id)
        )

    def _commit_request(
        self,
        db: MutationDB,
        outcome_key: str,
        attempt: str,
        outcome_text: str,
        outcome_ttl: int,
        *,
        session_id: str | None = None,
        apply_writes: bool = True,
        more: Sequence[tuple[str, str, int, str | None, int]] = (),
        versions: int = 1,
    ) -> _CommitRequest:
        """The keys and payload of ``commit.lua`` for ``db`` (its reads only, without writes),
        refused by the script if ``session_id``'s fence exists. ``more``: the other members of
        a hot key's batch (:meth:`_run_batch`), each its outcome key, outcome text, outcome
        lifetime, session id (or None) and version offset; ``versions``: how many versions the
        batch takes when it writes."""
        keys = [
            self.keys.version,
            self.keys.commits,
            self.keys.index_versions,
            outcome_key,
        ]
        position: dict[str, int] = {}

        def at(key: str) -> int:
            if key not in position:
                keys.append(key)
                position[key] = len(keys)  # Lua counts from 1
            return position[key]

        # KEYS[5] when there is a session (no document key can equal it), else 0: no fence.
        fence = 0 if session_id is None else at(self.keys.session_fence(session_id))
        members = [
            [
                at(key),
                text,
                ttl * 1000,
                0 if sid is None else at(self.keys.session_fence(sid)),
                offset,
            ]
            for key, text, ttl, sid, offset in more
        ]
        reads = [[at(key), kind, version] for key, (kind, version) in db._reads.items()]
        docs: list[list[Any]] = []
        index_ops: list[list[Any]] = []
        touched: dict[str, int] = {}
        written: list[str] = []
        for key, staged in db._staged.items() if apply_writes else ():
            slot = db._new.get(key)
            if slot is not None and staged is None:
                continue  # inserted and deleted by the same mutation: nothing to write
            table, doc_id = db._where[key]
            docs.append(
                [at(key), False if staged is None else staged.text, -1 if slot is None else slot]
            )
            written.append(key)
            before = None if slot is not None else db._base[key].doc
            for index, fields in self.schema[table].items():
                old = (
                    None if before is None else _index_key(self.keys, table, index, fields, before)
                )
                new = (
                    None
                    if staged is None
                    else _index_key(self.keys, table, index, fields, staged.doc)
                )
                if old == new:
                    continue
                if old is not None:
                    index_ops.append(["rem", at(old), doc_id])
                    touched[old] = at(old)
                if new is not None:
                    if slot is not None:
                        index_ops.append(["new", at(new), doc_id, slot])
                    else:
                        index_ops.append(["add", at(new), doc_id, db._base[key].score])
                    touched[new] = at(new)
        written.extend(touched)
        # A batch's commit carries no values: its first entry (version V) would hand the batch's
        # final state to read caches as the state at V, which is the first member's alone.
        values_text, values = (
            (None, None) if members or versions > 1 else self._entry_values(docs, keys)
        )
        payload = {
            "attempt": attempt,
            "fence": fence,
            "reads": reads,
            "docs": docs,
            "index_ops": index_ops,
            "touched": list(touched.values()),
            "written": _compact(written),
            "outcome": outcome_text,
            "outcome_ttl_ms": outcome_ttl * 1000,
            "tombstone_ttl_ms": self.tombstone_ttl * 1000,
            "maxlen": self.stream_maxlen,
            "values": values_text,
        }
        if members:
            payload["more"] = members
        if versions > 1:
            payload["versions"] = versions
        return _CommitRequest(keys, [_compact(payload)], frozenset(written), values)

    def _entry_values(
        self, docs: list[list[Any]], keys: list[str]
    ) -> tuple[str | None, CommitValues | None]:
        """What the commit's stream entry carries of the documents it writes (its field ``w``:
        ``[[key, JSON text | null, slot], ...]``), and the same as :data:`CommitValues`; both
        ``None`` past :attr:`commit_values_bytes`."""
        budget = self.commit_values_bytes
        size = 2
        rows: list[list[Any]] = []
        for i, text, slot in docs:
            key = keys[i - 1]
            size += len(key) + (len(text) if text else 4) + 8  # at most the JSON's bytes
            if size > budget:
                return None, None
            rows.append([key, text or None, slot])
        encoded = _compact(rows)
        if len(encoded.encode("utf-8")) > budget:
            return None, None
        return encoded, {key: (text, slot) for key, text, slot in rows}

    async def _send_commit(self, request: _CommitRequest) -> CommitResult:
        reply = await self._commit_script(keys=request.keys, args=request.args)
        status = _text(reply[0])
        if status == "ok":
            return CommitResult(int(reply[1]), request.written, written_values=request.values)
        if status == "conflict":
            raise Conflict(_text(reply[1]))
        if status == "ended":
            member = int(reply[1]) if len(reply) > 1 else 0
            return CommitResult(None, frozenset(), ended=True, member=member)
        member = int(reply[2]) if len(reply) > 2 else 0
        return CommitResult(None, frozenset(), _parse_outcome(_text(reply[1])), member=member)

    # -------------------------------------------------------------- reading

    async def _read(
        self,
        ops: Sequence[_DocOp | _RangeOp],
        outcome_key: str | None = None,
        outcomes: list[str] | None = None,
    ) -> tuple[int, list[_Doc | _Range]]:
        """One atomic batch read (``read.lua``): the global version and each op's result.

        With ``outcome_key`` (a mutation's), the same script first looks for its stored
        outcome and raises :class:`_Replayed` with it instead of reading: the outcome check
        costs no round trip of its own. ``outcomes`` (a hot key's batch: its members' outcome
        keys) are looked up in the same step without stopping the read: on return the list
        holds what each key holds instead ('' for none)."""
        keys = [self.keys.version, self.keys.index_versions]
        encoded: list[list[Any]] = []
        for op in ops:
            keys.append(op.key)
            if isinstance(op, _DocOp):
                encoded.append(["doc", len(keys)])
            else:
                # A limit past any index's size reads all (and stays an integer in Lua).
                limit = -1 if op.limit is None or op.limit > _ALL else op.limit
                encoded.append(["index", len(keys), op.order, limit, op.doc_prefix])
        args = [_compact(encoded)]
        if outcome_key is not None:
            keys.append(outcome_key)
            args.append(str(len(keys)))
        if outcomes is not None:
            if outcome_key is None:
                args.append("")
            args.append(_compact(list(range(len(keys) + 1, len(keys) + 1 + len(outcomes)))))
            keys.extend(outcomes)
        reply = await self._read_script(keys=keys, args=args)
        if reply[0] == -1:
            raise _Replayed(_text(reply[1]))
        if outcomes is not None:
            outcomes[:] = [_text(x) for x in reply[-1]]
            reply = reply[:-1]
        results: list[_Doc | _Range] = []
        for op, result in zip(ops, reply[1:], strict=True):
            if isinstance(op, _DocOp):
                version, text, score = (_text(x) for x in result)
                doc = json.loads(text) if text else None
                results.append(_Doc(op.key, int(version), doc, int(score)))
            else:
                rows = [_text(x) for x in result[1]]
                docs = tuple(
                    _Doc(
                        op.doc_prefix + rows[j],
                        int(rows[j + 1]),
                        json.loads(rows[j + 2]),
                        int(float(rows[j + 3])),
                    )
                    for j in range(0, len(rows), 4)
                )
                results.append(_Range(op.key, int(_text(result[0])), docs))
        return int(reply[0]), results

    # -------------------------------------------------------------- running functions

    async def run_query(self, run: QueryRunner, cache: ReadCache | None = None) -> QueryRun:
        """Run a query at one snapshot: ``run`` is called with a fresh :class:`QueryDB` each time.

        A :class:`~tether.server.errors.FunctionError` from ``run`` becomes the result's
        ``error``; a run that met a newer version is repeated, up to ``query_attempts`` runs,
        then the error is ``conflict``. Redis errors propagate. With ``cache`` (this
        partition's, see :mod:`tether.server.data.read_cache`), reads it holds are answered
        from it, at its version.
        """
        if cache is not None and cache.partition != self.keys.partition:
            cache = None  # another partition's versions
        read_set: set[str] = set()
        # A run through the cache may end once more: behind Redis (_CacheBehind), it goes on
        # without the cache, and that run counts none of the query's attempts.
        for _ in range(self.query_attempts + (cache is not None)):
            db = QueryDB(self, cache)
            value_json, error = await self._run_function(run, db)
            read_set |= db._read_set
            if db.aborted:
                db._raise_redis_failure()
                if isinstance(db._aborted, _CacheBehind):
                    cache = None  # behind Redis: this query reads Redis alone from here
                continue
            snapshot = db.snapshot
            version = snapshot if snapshot is not None else await self.version()
            return QueryRun(value_json, error, db.read_set, version)
        return QueryRun(
            None,
            (FunctionErrorCode.CONFLICT, _CONFLICT_MESSAGE.format("query")),
            frozenset(read_set),
            await self.version(),
            exhausted=True,
        )

    async def run_mutation(
        self,
        run: MutationRunner,
        request: MutationRequest | None,
        *,
        session_id: str | None = None,
        authorized: Callable[[], bool] | None = None,
        hint: Hashable | None = None,
    ) -> MutationOutcome:
        """Run a mutation once per ``request`` (its user, client id and request id) and commit
        it: ``run`` is called with a fresh :class:`MutationDB` on each attempt.

        A request that already has an outcome gets it back without running, or raises
        :class:`RequestIdReused` when that outcome is another function's (also when the
        outcome appears while this one runs: then nothing is committed). The outcome is looked
        for before the function runs: with a ``GET``, or, when ``hint`` (the function and its
        arguments) names a call seen before, by ``read.lua`` making the read that call's last
        run began with, which is then handed to the run's first read if it asks for the same
        (one round trip fewer). Otherwise the function runs against a fresh
        :class:`MutationDB` and commits; on :class:`Conflict` it runs again, at once when it
        holds the turn on the key (:class:`_Turns`), else after a jittered backoff, up to
        ``max_retries`` times, then fails with ``conflict``. A
        :class:`~tether.server.errors.FunctionError` is the outcome too (its writes are
        dropped), so a replay returns the same error. Without a ``request`` nothing is
        remembered.

        Two checks keep an ended identity from writing; either ends the mutation with
        ``unauthenticated`` (:data:`IDENTITY_ENDED`), nothing written or remembered, so a replay
        after signing in again runs it. ``authorized`` is asked before every commit attempt
        (retries sleep and re-run): the caller's own view of its identity. ``session_id`` names
        the caller's session, whose fence ``commit.lua`` checks atomically with the commit: a
        session ended anywhere (another instance's sign-out) commits nothing from then on.

        Redis errors propagate; the mutation may or may not have committed, and a replay with
        the same request finds out.
        """
        # Mutations on a key that is hot here take turns on it (see _Turns), first attempts too.
        turns = _Turns(self)
        try:
            prefetched: _Prefetched | None = None
            if request is not None:
                # Has it finished already? Looked for before the function runs (a replay runs
                # nothing), in the same round trip as the read the function's last run began
                # with when it is known (``hint``): that read is handed to its first read.
                ops = None if hint is None else self._first_reads.get(hint)
                try:
                    if ops is None:
                        raw = await self.redis.get(self._outcome_key(request))
                        if raw is not None:
                            raise _Replayed(_text(raw))
                    else:
                        hot = self._batch_key(ops)
                        if hot is not None:
                            member = _Member(run, request, session_id, authorized, ops)
                            return await self._join_batch(hot, member)
                        for op in ops:
                            await turns.take_if_hot(op.key)
                        prefetched = (ops, await self._read(ops, self._outcome_key(request)))
                except _Replayed as exc:
                    self.metrics.mutation("replayed")
                    return request.replay(_parse_outcome(exc.stored))
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.metrics.mutation_retries.inc()
                    if not turns.held:
                        await self._backoff(attempt - 1)
                ahead, prefetched = prefetched, None  # for the first attempt only
                try:
                    outcome = await self._attempt(
                        run,
                        request,
                        turns,
                        prefetched=ahead,
                        hint=hint,
                        session_id=session_id,
                        authorized=authorized,
                    )
                except Conflict:
                    self.metrics.mutation_conflicts.inc()
                    continue
                if outcome is not None:
                    return outcome
        finally:
            turns.release()
        self.metrics.mutation("conflict")
        code, message = FunctionErrorCode.CONFLICT, _CONFLICT_MESSAGE.format("mutation")
        if request is not None:
            return request.replay(await self.put_outcome(request, code, message))
        return MutationOutcome(None, (code, message), None)

    async def _attempt(
        self,
        run: MutationRunner,
        request: MutationRequest | None,
        turns: _Turns,
        *,
        prefetched: _Prefetched | None,
        hint: Hashable | None,
        session_id: str | None,
        authorized: Callable[[], bool] | None,
    ) -> MutationOutcome | None:
        """Run the mutation once and commit it: its outcome, or None when a Redis failure
        inside the function's reads asks for another attempt. Raises :class:`Conflict` (having
        taken the turn on the key, see :class:`_Turns`) and :class:`RequestIdReused`.

        ``prefetched`` is handed to the run's first read if it asks for the same ops; the ops it
        asked for are remembered under ``hint`` for the next run of the same call."""
        db = MutationDB(self, turns)
        db._prefetched = prefetched
        value_json, error = await self._run_function(run, db)
        if hint is not None:
            self._learn_first_read(hint, db._first_ops)
        if db.aborted:
            db._raise_redis_failure()
            return None
        nonce = _nonce()
        if request is None:
            key, ttl, text = self.keys.attempt(nonce), ATTEMPT_TTL, _outcome_text(nonce)
        else:
            key, ttl = self._outcome_key(request), self.outcome_ttl
            text = _outcome_text(nonce, name=request.name, value_json=value_json, error=error)
        # An error is committed without its writes: its reads are still checked, so the
        # error, too, is the answer of one consistent state.
        commit = self._commit_request(
            db, key, nonce, text, ttl, session_id=session_id, apply_writes=error is None
        )
        ended = MutationOutcome(None, (FunctionErrorCode.UNAUTHENTICATED, IDENTITY_ENDED), None)
        metrics = self.metrics
        try:
            registered = session_id is None or await self._register(session_id)
        except SessionPartitionsExceeded as exc:
            return MutationOutcome(None, (ErrorCode.LIMIT_EXCEEDED, str(exc)), None)
        if (authorized is not None and not authorized()) or not registered:
            metrics.mutation("ended")
            return ended
        try:
            result = await self._send_commit(commit)
        except Conflict as exc:
            await turns.conflicted(db._via.get(exc.key, exc.key))
            raise
        if result.ended:
            metrics.mutation("ended")
            return ended
        if result.duplicate is not None:
            assert request is not None  # an attempt key is never found holding another's
            metrics.mutation("replayed")
            return request.replay(result.duplicate)
        if error is not None:
            metrics.mutation("error")
            return MutationOutcome(None, error, None)
        metrics.mutation("committed")
        return MutationOutcome(
            value_json, None, result.version, result.written_keys, result.written_values
        )

    # -------------------------------------------------------------- hot keys' batches

    def _batch_key(self, ops: Sequence[_DocOp | _RangeOp]) -> str | None:
        """The hot key a call whose first read is ``ops`` batches on, or None (not hot here, or
        batches are off)."""
        if self.max_batch < 2:
            return None
        for op in ops:
            if self._is_hot(op.key):
                return op.key
        return None

    async def _join_batch(self, key: str, member: _Member) -> MutationOutcome:
        """Queue ``member`` on the hot ``key`` and wait for a batch to answer it (see
        :meth:`_run_batch`); the key's worker is started when none is running."""
        queue = self._batches.get(key)
        if queue is None:
            queue = self._batches[key] = _HotQueue()
        queue.members.append(member)
        if queue.worker is None:
            queue.worker = asyncio.create_task(self._batch_worker(key, queue))
        try:
            return await member.future
        finally:
            if not member.future.done():  # cancelled while it waited: it leaves the queue
                with contextlib.suppress(ValueError):
                    queue.members.remove(member)

    async def _batch_worker(self, key: str, queue: _HotQueue) -> None:
        """Run ``queue``'s batches on ``key`` until it is empty, one at a time, each holding
        the key's turn (:class:`_Turns`: mutations of this instance that read the key outside
        a batch take turns with the batches)."""
        turns = _Turns(self)
        batch: list[_Member] = []
        try:
            while True:
                await turns.take(key)
                batch = self._drain(queue)
                if not batch:
                    break
                if len(batch) > 1:
                    self._mark_hot(key)  # still contended: it stays hot while batches form
                try:
                    await self._run_batch(batch, turns, queue)
                except Exception as exc:
                    # A Redis error (the batch may or may not have committed: a replay finds
                    # out), or a bug: every member still waiting gets it.
                    for member in batch:
                        member.fail(exc)
                turns.release()
        except BaseException:
            for member in (*batch, *queue.members):
                member.future.cancel()
            queue.members.clear()
            raise
        finally:
            turns.release()
            queue.worker = None
            if self._batches.get(key) is queue and not queue.members:
                del self._batches[key]

    def _drain(self, queue: _HotQueue) -> list[_Member]:
        """The next batch: up to :attr:`max_batch` members in order, no two of one request (the
        second stays queued for the next batch: it must see the first's outcome)."""
        batch: list[_Member] = []
        later: list[_Member] = []
        keys: set[str] = set()
        members = queue.members
        while members and len(batch) < self.max_batch:
            member = members.popleft()
            if member.future.done():
                continue  # cancelled
            key = self._outcome_key(member.request)
            if key in keys:
                later.append(member)
            else:
                keys.add(key)
                batch.append(member)
        members.extendleft(reversed(later))
        return batch

    async def _run_batch(self, members: list[_Member], turns: _Turns, queue: _HotQueue) -> None:
        """Group commit: run ``members`` (mutations on one hot key, queued while its turn was
        held) one after another through one :class:`MutationDB`, each against the state the
        ones before it left, and commit them with one ``commit.lua`` call; answer each one's
        future (or put it back in the queue for the next batch).

        One read (``read.lua``) begins a run: the first member's known first read, together
        with every member's outcome check; a member that has an outcome is answered as a
        replay and does not run. A member that raises a
        :class:`~tether.server.errors.FunctionError` has its writes dropped (its reads are
        still checked) and gets its error. The commit checks the union of the reads once,
        applies the final writes and stores every member's outcome, atomically. Each member
        that succeeds takes a version of its own, in order (V, V + 1, ...: its result is the
        state at its version), as if committed alone; the stream entry at V lists every key
        the batch wrote, the others none (no reader sees a state between two members: reads
        meet the batch's last version), and each member's ``written_keys`` are the batch's.
        A member whose commit is refused (its outcome
        appeared meanwhile: a replay; its session ended: ``unauthenticated``) is answered and
        the others run again without it (they may have read its writes); so are members
        whose ``authorized()`` turns false. A conflict runs the batch again at once (this
        worker holds the key's turn), its first half (see :meth:`_after_conflict`); a member
        whose batches conflicted more than ``max_retries`` times gets ``conflict``. A member
        that would take the batch past :attr:`max_batch_bytes` (its writes and results) or
        past the version's :data:`MAX_INSERTS` creation slots goes back to the queue, with
        those after it.
        Redis errors propagate (the caller gives them to every member still waiting)."""
        metrics = self.metrics
        pending = members
        while True:
            pending = [m for m in pending if not m.future.done() and await self._admitted(m)]
            if not pending:
                return
            db = MutationDB(self, turns)
            cache = db._batch_reads = _BatchReads()
            widen = len(pending)
            ops = tuple(
                op
                if isinstance(op, _DocOp) or op.limit is None
                else _RangeOp(op.key, op.order, op.limit + widen, op.doc_prefix)
                for op in pending[0].ops
            )
            stored = [self._outcome_key(m.request) for m in pending]
            cache.keep(ops, await self._read(ops, outcomes=stored))
            running: list[_Member] = []
            for member, text in zip(pending, stored, strict=True):
                if text:
                    metrics.mutation("replayed")
                    member.replay(_parse_outcome(text))
                else:
                    running.append(member)
            ran: list[tuple[_Member, str | None, tuple[str, str] | None]] = []
            results = 0  # UTF-8 bytes of the results so far
            for i, member in enumerate(running):
                savepoint = db._savepoint()
                db._insert_base = db._inserts
                value_json, error = await self._run_function(member.run, db)
                if db.aborted:
                    break
                grown = results + _utf8_len(value_json or "")
                if db._batch_full or (ran and _written_bytes(db) + grown > self.max_batch_bytes):
                    db._rollback(savepoint)
                    queue.members.extendleft(reversed(running[i:]))  # the next batch's
                    break
                if error is not None:
                    db._rollback(savepoint)
                else:
                    results = grown
                ran.append((member, value_json, error))
            if db.aborted:
                db._raise_redis_failure()
                # A read met a newer version: like a conflict.
                pending = await self._after_conflict(running, queue)
                continue
            gone = [m for m, _, _ in ran if m.authorized is not None and not m.authorized()]
            if gone:
                for member in gone:
                    metrics.mutation("ended")
                    member.answer(_ended())
                pending = [m for m, _, _ in ran if m not in gone]
                continue
            if not ran:
                return
            nonce = _nonce()
            # Each member that succeeds takes a version of its own, in order (see commit.lua).
            offsets: list[int] = []
            succeeded = 0
            for _, _, error in ran:
                offsets.append(succeeded)  # (an error's is never read)
                succeeded += error is None
            outcomes = [
                (
                    self._outcome_key(m.request),
                    _outcome_text(nonce, name=m.request.name, value_json=value, error=error),
                    self.outcome_ttl,
                    m.session_id,
                    offset,
                )
                for (m, value, error), offset in zip(ran, offsets, strict=True)
            ]
            key, text, ttl, session_id, _ = outcomes[0]
            commit = self._commit_request(
                db,
                key,
                nonce,
                text,
                ttl,
                session_id=session_id,
                more=outcomes[1:],
                versions=max(1, succeeded),
            )
            try:
                result = await self._send_commit(commit)
            except Conflict as exc:
                metrics.mutation_conflicts.inc()
                await turns.conflicted(db._via.get(exc.key, exc.key))
                pending = await self._after_conflict([m for m, _, _ in ran], queue)
                continue
            if result.ended or result.duplicate is not None:
                excluded = ran[result.member][0]
                if result.duplicate is not None:
                    metrics.mutation("replayed")
                    excluded.replay(result.duplicate)
                else:
                    metrics.mutation("ended")
                    excluded.answer(_ended())
                pending = [m for m, _, _ in ran if m is not excluded]
                continue
            wrote = bool(result.written_keys)
            assert result.version is not None
            metrics.mutation_batch_members.observe(len(ran))
            for (member, value, error), offset in zip(ran, offsets, strict=True):
                if error is not None:
                    metrics.mutation("error")
                    member.answer(MutationOutcome(None, error, None))
                else:
                    metrics.mutation("committed")
                    version = result.version + offset if wrote else result.version
                    member.answer(MutationOutcome(value, None, version, result.written_keys))
            return

    async def _admitted(self, member: _Member) -> bool:
        """May ``member`` run in a batch? Its caller's identity holds and its session may
        commit in this partition; else it is answered here."""
        try:
            registered = member.session_id is None or await self._register(member.session_id)
        except SessionPartitionsExceeded as exc:
            member.answer(MutationOutcome(None, (ErrorCode.LIMIT_EXCEEDED, str(exc)), None))
            return False
        if not registered or (member.authorized is not None and not member.authorized()):
            self.metrics.mutation("ended")
            member.answer(_ended())
            return False
        return True

    async def _after_conflict(self, tried: list[_Member], queue: _HotQueue) -> list[_Member]:
        """The members to run again at once after the batch ``tried`` conflicted: each has
        had one more attempt, and one past ``max_retries`` is answered ``conflict``. Of the
        others, the first half runs again (a shorter run is likelier to commit before the
        next commit on the key, the other instance's batch or a single mutation), the rest
        goes back to the head of the queue."""
        code, message = FunctionErrorCode.CONFLICT, _CONFLICT_MESSAGE.format("mutation")
        again: list[_Member] = []
        for member in tried:
            member.attempts += 1
            if member.attempts <= self.max_retries:
                again.append(member)
                continue
            self.metrics.mutation("conflict")
            member.replay(await self.put_outcome(member.request, code, message))
        self.metrics.mutation_retries.inc(len(again))
        keep = max(1, len(again) // 2)
        queue.members.extendleft(reversed(again[keep:]))
        return again[:keep]

    async def _run_function(
        self, run: Callable[[_D], Awaitable[str]], db: _D
    ) -> tuple[str | None, tuple[str, str] | None]:
        """Call ``run(db)``: ``(value JSON, None)``, or ``(None, (code, message))`` for a
        :class:`~tether.server.errors.FunctionError`; ``(None, None)`` when ``db`` ended the run
        (its ``aborted`` says why)."""
        try:
            return await run(db), None
        except _Abort:
            return None, None
        except FunctionError as exc:
            return None, (exc.code, exc.message)

    def _learn_first_read(self, hint: Hashable, ops: tuple[_DocOp | _RangeOp, ...] | None) -> None:
        reads = self._first_reads
        if ops is None:
            reads.pop(hint, None)
            return
        if reads.get(hint) != ops:
            reads.pop(hint, None)
            reads[hint] = ops
            if len(reads) > _MAX_FIRST_READS:
                del reads[next(iter(reads))]  # the call learnt longest ago

    def _is_hot(self, key: str) -> bool:
        until = self._hot.get(key)
        return until is not None and until > asyncio.get_running_loop().time()

    def _mark_hot(self, key: str) -> None:
        hot = self._hot
        hot.pop(key, None)
        hot[key] = asyncio.get_running_loop().time() + HOT_SECONDS
        if len(hot) > _MAX_HOT_KEYS:
            del hot[next(iter(hot))]  # the key that conflicted longest ago

    async def _backoff(self, retry: int) -> None:
        await asyncio.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**retry)))


def _stream_entries(reply: Any) -> list[Any]:
    """The entries of an ``XREAD`` reply on one stream (a RESP2 list or a RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        return list(next(iter(reply.values()))[0])
    return list(reply[0][1])
