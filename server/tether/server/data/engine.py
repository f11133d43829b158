"""The query engine: the application's functions run against the store.

:class:`QueryEngine` is what the realtime layer calls — it looks functions up in the application
(and validates a call's arguments once, when it arrives: :meth:`QueryEngine.resolve`), builds the
:class:`~tether.server.data.functions.Context` a function sees and runs the function
(:func:`run_query`, :func:`run_mutation`), inside the views, retries and commits the
:class:`~tether.server.data.store.Store` offers (snapshot-validated queries, optimistic mutations
with idempotent outcomes): the engine runs application code, the store never does. It also exposes
the commit stream to the subscription manager.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from tether.protocol import ErrorCode, wrong_kind_message
from tether.server.data.caller import Caller
from tether.server.data.functions import (
    App,
    Auth,
    Context,
    FunctionSpec,
    encode_result,
    invoke,
)
from tether.server.data.read_cache import ReadCache
from tether.server.data.store import (
    CommitBatch,
    CommitValues,
    MutationDB,
    MutationOutcome,
    MutationRequest,
    QueryDB,
    RequestIdReused,
    Store,
)
from tether.server.errors import FunctionError


@dataclass(frozen=True, slots=True)
class QueryEvaluation:
    """A query's result at one snapshot: ``value_json`` or ``error`` (code, message).

    ``read_set`` holds every document and index key the run read (the result changes only when
    one of them is written); ``version`` is the snapshot; ``reads_identity`` tells whether the
    result depends on the caller's identity.
    """

    value_json: str | None
    error: tuple[str, str] | None
    read_set: frozenset[str]
    version: int
    reads_identity: bool


@dataclass(frozen=True, slots=True)
class MutationResult:
    value_json: str | None
    error: tuple[str, str] | None
    version: int | None
    #: The keys its commit wrote (see :class:`~tether.server.data.store.MutationOutcome`).
    written_keys: frozenset[str] = field(default=frozenset(), compare=False)
    #: What its commit's stream entry carries of the documents written (the same).
    written_values: CommitValues | None = field(default=None, compare=False)
    #: The data partition it ran in (``None``: the default); ``version`` is that partition's.
    partition: str | None = None


def _auth(identity: Caller | None) -> Auth | None:
    return Auth(identity.user_id, identity.session_id) if identity is not None else None


async def run_query(
    store: Store,
    spec: FunctionSpec,
    kwargs: Mapping[str, Any],
    auth: Auth | None,
    cache: ReadCache | None = None,
) -> QueryEvaluation:
    """Run the query ``spec`` at one snapshot of ``store`` (``kwargs`` from
    ``spec.validate_args``), with a fresh :class:`Context` per run.

    A :class:`~tether.server.errors.FunctionError` becomes the result's ``error``; see
    :meth:`Store.run_query` for retries. A query declared with ``partition`` reads only the
    partition its argument names (an invalid name: the error ``invalid``, nothing run). Redis
    errors propagate. ``cache``: that partition's read cache, if any (see
    :meth:`Store.run_query`).
    """
    try:
        partition = spec.partition_of(kwargs)
    except FunctionError as exc:
        return QueryEvaluation(None, (exc.code, exc.message), frozenset(), 0, False)
    store = store.in_partition(partition)
    contexts: list[Context] = []

    async def run(db: QueryDB) -> str:
        ctx = Context(auth, db=db, partition=partition)
        contexts.append(ctx)
        return encode_result(await invoke(spec, ctx, kwargs), store.max_result_bytes)

    result = await store.run_query(run, cache)
    if result.exhausted:
        # The conflict answers every run: it depends on the identity if any of them read it.
        reads_identity = any(ctx.read_identity for ctx in contexts)
    else:
        reads_identity = contexts[-1].read_identity
    return QueryEvaluation(
        result.value_json, result.error, result.read_set, result.version, reads_identity
    )


async def run_mutation(
    store: Store,
    spec: FunctionSpec,
    kwargs: Mapping[str, Any],
    auth: Auth | None,
    *,
    client_id: str | None,
    request_id: int | None,
    authorized: Callable[[], bool] | None = None,
    claim: bool = False,
) -> MutationOutcome:
    """Run the mutation ``spec`` (``kwargs`` from ``spec.validate_args``) once per
    ``(user, client_id, request_id)`` and commit it, with a fresh :class:`Context` per attempt.

    The outcome belongs to the caller: ``auth``'s user, or the anonymous owner without ``auth``
    (protocol 1.1 §5 rule 4), and records ``spec.name``; and the commit is refused once
    ``auth``'s session has ended (rule 6). Without ``client_id`` and ``request_id`` nothing is
    remembered. See :meth:`Store.run_mutation` for retries, replays, ``authorized`` and the
    :class:`~tether.server.data.store.RequestIdReused` it raises.

    A mutation declared with ``partition`` runs in the partition its argument names (an
    invalid name: the error ``invalid``, nothing run or stored); its outcome is kept there.
    With ``claim`` (an application that declares partitions) the request id is first claimed
    for this function and partition (:meth:`Store.claim_request`): re-sent into another
    partition, or naming a function of another one, it raises ``RequestIdReused`` and runs
    nothing."""
    try:
        partition = spec.partition_of(kwargs)
    except FunctionError as exc:
        return MutationOutcome(None, (exc.code, exc.message), None)
    store = store.in_partition(partition)

    async def run(db: MutationDB) -> str:
        value = await invoke(spec, Context(auth, db=db, partition=partition), kwargs)
        return encode_result(value, store.max_result_bytes)

    request = None
    if client_id is not None and request_id is not None:
        user_id = None if auth is None else auth.user_id
        request = MutationRequest(spec.name, client_id, request_id, user_id)
        if claim:
            held = await store.claim_request(request)
            if held is not None:
                raise RequestIdReused(request_id, _in(spec.name, partition), _in(held[0], held[1]))
    session_id = None if auth is None else auth.session_id
    return await store.run_mutation(
        run, request, session_id=session_id, authorized=authorized, hint=_call_key(spec, kwargs)
    )


#: Longest arguments (as JSON) under which the store remembers a call's first read: the store
#: keeps up to 4,096 calls, so at most ~4 MiB of them.
MAX_CALL_KEY_CHARS = 1024


def _call_key(spec: FunctionSpec, kwargs: Mapping[str, Any]) -> tuple[str, str] | None:
    """The function and its arguments, under which the store remembers the read a run began
    with (it makes that read together with the outcome check next time); None when the
    arguments are not JSON or longer than :data:`MAX_CALL_KEY_CHARS`."""
    try:
        text = json.dumps(kwargs, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return (spec.name, text) if len(text) <= MAX_CALL_KEY_CHARS else None


def _in(name: str, partition: str | None) -> str:
    return name if partition is None else f"{name} in partition {partition!r}"


class QueryEngine:
    def __init__(self, application: App, store: Store) -> None:
        self.application = application
        self.store = store

    def resolve(self, kind: str, name: str, args: object) -> dict[str, Any]:
        """The keyword arguments to run ``name`` with, from a client's ``args``.

        The one validation of a call (``kind``: ``query`` or ``mutation``), made when it
        arrives; what the engine runs afterwards (however often a live query is re-evaluated)
        are the arguments returned here. Raises :class:`~tether.server.errors.FunctionError`:
        ``unknown_function`` when ``name`` is not a function of that ``kind``,
        :class:`~tether.server.data.functions.ArgsError` (``bad_args``) when ``args`` do not fit
        it. Pure: no I/O.
        """
        spec = self.application.lookup(name)
        if spec is None:
            raise FunctionError(ErrorCode.UNKNOWN_FUNCTION, f"no {kind} named {name!r}")
        if spec.kind != kind:
            raise FunctionError(ErrorCode.UNKNOWN_FUNCTION, wrong_kind_message(name, spec.kind))
        return spec.validate_args(args)

    async def evaluate(
        self,
        name: str,
        kwargs: Mapping[str, Any],
        identity: Caller | None,
        cache: ReadCache | None = None,
    ) -> QueryEvaluation:
        """Run the query ``name`` under ``identity`` with ``kwargs`` from :meth:`resolve`,
        its reads answered from ``cache`` where it can (a live query's re-run)."""
        spec = self.application.lookup(name)
        if spec is None or spec.kind != "query":
            return QueryEvaluation(
                value_json=None,
                error=(ErrorCode.UNKNOWN_FUNCTION, f"no query named {name!r}"),
                read_set=frozenset(),
                version=0,  # read nothing: valid at every version
                reads_identity=False,
            )
        return await run_query(self.store, spec, kwargs, _auth(identity), cache)

    async def run_mutation(
        self,
        name: str,
        kwargs: Mapping[str, Any],
        identity: Caller | None,
        *,
        client_id: str,
        request_id: int,
        authorized: Callable[[], bool] | None = None,
    ) -> MutationResult:
        """Run the mutation ``name`` under ``identity`` with ``kwargs`` from :meth:`resolve`.

        Its outcome is ``identity``'s (or the anonymous caller's) for ``(client_id,
        request_id)``, and its commit is refused once ``identity``'s session has ended (see
        :func:`run_mutation`). Raises :class:`~tether.server.data.store.RequestIdReused` when
        the request id holds another function's outcome (nothing ran; the endpoint answers
        ``bad_message``); Redis errors propagate."""
        spec = self.application.lookup(name)
        if spec is None or spec.kind != "mutation":
            return MutationResult(None, (ErrorCode.UNKNOWN_FUNCTION, "no such mutation"), None)
        try:
            outcome = await run_mutation(
                self.store,
                spec,
                kwargs,
                _auth(identity),
                client_id=client_id,
                request_id=request_id,
                authorized=authorized,
                claim=any(s.partition is not None for s in self.application.functions.values()),
            )
        except RedisError:
            self.store.metrics.redis_error("mutation")
            raise
        return MutationResult(
            outcome.value_json,
            outcome.error,
            outcome.version,
            outcome.written_keys,
            outcome.written_values,
            self.partition_of(name, kwargs),
        )

    def partition_of(self, name: str, kwargs: Mapping[str, Any]) -> str | None:
        """The data partition the function ``name`` runs in with ``kwargs`` (from
        :meth:`resolve`): ``None`` for the default partition, an unknown function or an invalid
        partition name (which runs nothing: its answer is the error ``invalid``)."""
        spec = self.application.lookup(name)
        if spec is None:
            return None
        try:
            return spec.partition_of(kwargs)
        except FunctionError:
            return None

    def in_partition(self, partition: str | None) -> QueryEngine:
        """This engine with its commit stream and version those of ``partition`` (for the
        live layer, which follows each partition on its own), its blocking commit reads on a
        connection of its own (close it with :meth:`aclose`); functions still run in the
        partition their arguments name."""
        store = self.store.in_partition(partition).with_watch_connection()
        return QueryEngine(self.application, store)

    async def aclose(self) -> None:
        """Close what :meth:`in_partition` opened for this engine (its watch connection)."""
        await self.store.aclose_watch()

    async def read_commits(self, after: int, *, block_ms: int | None, count: int) -> CommitBatch:
        return await self.store.read_commits(after, block_ms=block_ms, count=count)

    async def version(self) -> int:
        return await self.store.version()
