"""The query engine: the application's functions run against the store.

:class:`QueryEngine` is what the realtime layer calls — it looks functions up in the
application, validates arguments, builds the identity a function sees, and hands the run to
the :class:`~tether.server.data.store.Store` (snapshot-validated queries, optimistic mutations with
idempotent outcomes). It also exposes the commit stream to the subscription manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tether.protocol import ErrorCode
from tether.server.data.functions import App, ArgsError, Auth
from tether.server.data.store import CommitBatch, QueryEvaluation, Store
from tether.server.errors import FunctionError
from tether.server.realtime.core import Identity


@dataclass(frozen=True, slots=True)
class MutationResult:
    value_json: str | None
    error: tuple[str, str] | None
    version: int | None
    #: The keys its commit wrote (see :class:`~tether.server.data.store.MutationOutcome`).
    written_keys: frozenset[str] = field(default=frozenset(), compare=False)


def _auth(identity: Identity | None) -> Auth | None:
    return Auth(identity.user_id, identity.session_id) if identity is not None else None


class QueryEngine:
    def __init__(self, application: App, store: Store) -> None:
        self.application = application
        self.store = store

    async def evaluate(
        self, name: str, args: dict[str, Any], identity: Identity | None
    ) -> QueryEvaluation:
        spec = self.application.lookup(name)
        try:
            if spec is None or spec.kind != "query":
                raise FunctionError(ErrorCode.UNKNOWN_FUNCTION, f"no query named {name!r}")
            kwargs = spec.validate_args(args)
        except FunctionError as exc:
            return QueryEvaluation(
                value_json=None,
                error=(exc.code, exc.message),
                read_set=frozenset(),
                version=0,  # read nothing: valid at every version
                reads_identity=False,
            )
        return await self.store.run_query(spec, kwargs, _auth(identity))

    async def run_mutation(
        self,
        name: str,
        args: dict[str, Any],
        identity: Identity | None,
        *,
        client_id: str,
        request_id: int,
        authorized: Callable[[], bool] | None = None,
    ) -> MutationResult:
        spec = self.application.lookup(name)
        if spec is None or spec.kind != "mutation":
            return MutationResult(None, (ErrorCode.UNKNOWN_FUNCTION, "no such mutation"), None)
        try:
            kwargs = spec.validate_args(args)
        except ArgsError as exc:
            return MutationResult(None, (exc.code, exc.message), None)
        outcome = await self.store.run_mutation(
            spec,
            kwargs,
            _auth(identity),
            client_id=client_id,
            request_id=request_id,
            authorized=authorized,
        )
        return MutationResult(
            outcome.value_json, outcome.error, outcome.version, outcome.written_keys
        )

    async def read_commits(self, after: int, *, block_ms: int | None, count: int) -> CommitBatch:
        return await self.store.read_commits(after, block_ms=block_ms, count=count)

    async def version(self) -> int:
        return await self.store.version()
