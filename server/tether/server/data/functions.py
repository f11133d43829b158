"""The function registry: an application's queries and mutations, their arguments, and calling them.

An application is an :class:`App` whose query and mutation functions clients call by name over
``/sync`` with a JSON ``args`` object (protocol §3)::

    app = App("chat")

    @app.mutation("messages.send")
    async def send(ctx: Context, channel: str, body: str) -> str:
        auth = ctx.require_auth()
        ...

Every function is ``async``, takes a :class:`Context` first, then keyword-callable parameters
whose annotations say which JSON values a client may send (see :class:`ArgType`). The signature is
read once, at registration, and a signature the registry cannot check is refused there with
``ValueError``, not on the first call.

Calling a function is three steps the connection layer takes in order:
:meth:`FunctionSpec.validate_args` (raises :class:`ArgsError`, code ``bad_args``),
:func:`invoke` (a :class:`~tether.server.errors.FunctionError` from the function reaches the client
as is; any other exception becomes ``internal`` with a fixed message, its text only in the log), and
:func:`encode_result` (``internal`` when the value is not JSON, :class:`ResultTooLarge`, code
``limit_exceeded``, past the size limit).

Exception tree (all are :class:`~tether.server.errors.FunctionError`, so all carry ``code`` and a
``message`` safe to send to a client)::

    FunctionError
    ├── ArgsError         bad_args: the args do not fit the function's signature
    └── ResultTooLarge    limit_exceeded: the encoded result is over the byte limit
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from tether.protocol import ErrorCode, FunctionErrorCode
from tether.server.errors import FunctionError, MisuseError

if TYPE_CHECKING:
    # Types only: the store runs no application code and does not import this module, so
    # there is no cycle; importing it here at run time would load Redis for every App.
    from tether.server.data.store import MutationDB, QueryDB

__all__ = [
    "App",
    "ArgSpec",
    "ArgType",
    "ArgsError",
    "Auth",
    "Context",
    "FunctionKind",
    "FunctionSpec",
    "ResultTooLarge",
    "encode_result",
    "invoke",
    "load_application",
]

log = logging.getLogger("tether.functions")

FunctionKind = Literal["query", "mutation"]

#: Dotted identifiers: ``whoami``, ``messages.send``.
FUNCTION_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

#: Longest partition name, in UTF-8 bytes (``App.query(partition=...)``): it becomes part of
#: every Redis key of the partition (the same limit as ``redis.keys.MAX_PARTITION_BYTES``).
MAX_PARTITION_BYTES = 128

#: Names of tables and indexes.
IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: The default of ``App.table(indexes=...)``: no index.
_NO_INDEXES: Mapping[str, Sequence[str]] = types.MappingProxyType({})

#: Longest rendering of a client-supplied key in an error message (a key can be any size).
_MAX_ECHO_CHARS = 40

_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, Any]])


# ---------------------------------------------------------------------------------- errors


class ArgsError(FunctionError):
    """The ``args`` of a call do not fit the function's signature (code ``bad_args``).

    The message names the argument and the expected type; it never repeats the client's value.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_ARGS, message)


class ResultTooLarge(FunctionError):
    """A function's encoded result is over the byte limit (code ``limit_exceeded``)."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(
            ErrorCode.LIMIT_EXCEEDED,
            f"the result is {size} bytes, over the limit of {max_bytes}",
        )
        self.size = size
        self.max_bytes = max_bytes


# ---------------------------------------------------------------------------------- context


@dataclass(frozen=True, slots=True)
class Auth:
    """The identity a function runs under: the signed-in user and the session it came from."""

    user_id: str
    session_id: str


class Context:
    """What a function receives first: the caller's identity and the data layer.

    The caller builds one ``Context`` per run of a function. Reading the identity, through
    :attr:`auth` or :meth:`require_auth`, sets :attr:`read_identity`: the server re-runs, when the
    connection's user changes, exactly the subscriptions whose last run read it. A function that
    never looks at the identity keeps its result across sign-in and sign-out.
    """

    __slots__ = ("_auth", "_db", "_partition", "_read_identity")

    def __init__(
        self,
        auth: Auth | None = None,
        *,
        db: QueryDB | MutationDB | None = None,
        partition: str | None = None,
    ) -> None:
        self._auth = auth
        self._read_identity = False
        self._db = db
        self._partition = partition

    @property
    def partition(self) -> str | None:
        """The data partition :attr:`db` reads and writes: the value of the argument the
        function declared with ``partition=``, or ``None`` (the default partition)."""
        return self._partition

    @property
    def db(self) -> QueryDB | MutationDB:
        """The data layer for this run: a :class:`tether.server.data.store.QueryDB` in a query,
        a :class:`tether.server.data.store.MutationDB` in a mutation (both offer the same
        methods; a query's writes raise). The server always gives one; a ``Context`` built
        without one (as unit tests do) raises :class:`RuntimeError` here."""
        if self._db is None:
            raise RuntimeError("this Context was built without a database (db=...)")
        return self._db

    @property
    def auth(self) -> Auth | None:
        """The caller's identity, ``None`` when anonymous. Reading it sets :attr:`read_identity`."""
        self._read_identity = True
        return self._auth

    @property
    def read_identity(self) -> bool:
        """Whether this run has read the identity (so its result depends on who is calling)."""
        return self._read_identity

    def require_auth(self) -> Auth:
        """The caller's identity; raises ``FunctionError("unauthenticated")`` when anonymous.

        Counts as reading the identity, also when it raises: the result (an error) depends on it.
        """
        auth = self.auth
        if auth is None:
            raise FunctionError(FunctionErrorCode.UNAUTHENTICATED, "sign in first")
        return auth

    def __repr__(self) -> str:
        return f"Context(auth={self._auth!r}, read_identity={self._read_identity})"


# ---------------------------------------------------------------------------------- arguments


class ArgType(StrEnum):
    """The JSON value a parameter accepts, by annotation.

    ===========================  =========  ==============================================
    annotation                   type       accepts
    ===========================  =========  ==============================================
    ``str``                      string     a string
    ``int``                      integer    an integer (``true``/``false`` are refused)
    ``float``                    number     a finite number; an integer is converted
    ``bool``                     boolean    ``true`` or ``false``
    ``dict``, ``dict[str, Any]`` object     an object (its values are not checked)
    ``list``, ``list[Any]``      array      an array (its items are not checked)
    ``Any``                      any        any JSON value, ``null`` included
    ===========================  =========  ==============================================

    ``X | None`` (or ``Optional[X]``) also accepts ``null``. A parameter with a default may be
    left out.
    """

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    OBJECT = "object"
    ARRAY = "array"
    ANY = "any"


_ARTICLE = {
    ArgType.STRING: "a string",
    ArgType.INTEGER: "an integer",
    ArgType.NUMBER: "a number",
    ArgType.BOOLEAN: "a boolean",
    ArgType.OBJECT: "an object",
    ArgType.ARRAY: "an array",
    ArgType.ANY: "any value",
}

_SIMPLE_TYPES: dict[object, ArgType] = {
    str: ArgType.STRING,
    int: ArgType.INTEGER,
    float: ArgType.NUMBER,
    bool: ArgType.BOOLEAN,
    dict: ArgType.OBJECT,
    list: ArgType.ARRAY,
    Any: ArgType.ANY,
}


class _Mismatch(Exception):
    """Internal: a value does not fit an :class:`ArgSpec`; ``detail`` ends the message."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One parameter of a function, as clients see it: name, JSON type, nullable, optional."""

    name: str
    type: ArgType
    nullable: bool
    required: bool
    #: The Python default (meaningful only when ``required`` is false).
    default: Any = None

    @property
    def expected(self) -> str:
        """The expected value in words: ``"an integer"``, ``"a string or null"``."""
        words = _ARTICLE[self.type]
        if self.nullable and self.type is not ArgType.ANY:
            words += " or null"
        return words

    def convert(self, value: object) -> object:
        """``value`` as the function receives it; raises :class:`ArgsError` when it does not fit."""
        try:
            return self._convert(value)
        except _Mismatch as exc:
            raise ArgsError(
                f"argument {self.name!r} must be {self.expected}, {exc.detail}"
            ) from None

    def _convert(self, value: object) -> object:
        kind = self.type
        if kind is ArgType.ANY or (value is None and self.nullable):
            return value
        ok: bool
        if kind is ArgType.STRING:
            ok = isinstance(value, str)
        elif kind is ArgType.INTEGER:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is ArgType.BOOLEAN:
            ok = isinstance(value, bool)
        elif kind is ArgType.OBJECT:
            ok = isinstance(value, dict)
        elif kind is ArgType.ARRAY:
            ok = isinstance(value, list)
        else:  # NUMBER
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise _Mismatch("not a non-finite number")
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    return float(value)
                except OverflowError:
                    raise _Mismatch("not an integer out of the range of a float") from None
            ok = False
        if not ok:
            raise _Mismatch(f"not {_json_type_name(value)}")
        return value


def _json_type_name(value: object) -> str:
    """The JSON type of ``value`` with its article, never the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _echo(key: object) -> str:
    """A client-supplied key, quoted and cut to a bounded length for an error message."""
    text = repr(key)
    if len(text) > _MAX_ECHO_CHARS:
        text = text[: _MAX_ECHO_CHARS - 3] + "..."
    return text


# ---------------------------------------------------------------------------------- specs


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A registered function: its name, kind, the function itself, and its arguments.

    Build one with :meth:`from_function` (which :class:`App` does); ``params`` follows the order
    of the function's parameters after the context.
    """

    name: str
    kind: FunctionKind
    fn: Callable[..., Awaitable[Any]]
    params: tuple[ArgSpec, ...]
    #: The argument whose value names the function's data partition (``None``: the default).
    partition: str | None = None
    _by_name: Mapping[str, ArgSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_by_name", types.MappingProxyType({p.name: p for p in self.params})
        )

    @classmethod
    def from_function(
        cls,
        name: str,
        kind: FunctionKind,
        fn: Callable[..., Awaitable[Any]],
        *,
        partition: str | None = None,
    ) -> FunctionSpec:
        """Derive the spec of ``fn`` from its signature.

        Raises ``ValueError`` naming the function and the problem when ``name`` is not a dotted
        identifier, ``kind`` is unknown, ``fn`` is not an ``async def`` function, it takes no
        context first, it has ``*args``/``**kwargs``, positional-only arguments, an unannotated or
        unsupported annotation, an annotation that does not resolve, or a default that does not
        fit its annotation, or ``partition`` does not name one of its ``str`` arguments.
        """
        if kind not in ("query", "mutation"):
            raise ValueError(f"unknown function kind {kind!r}: expected 'query' or 'mutation'")
        if not isinstance(name, str) or not FUNCTION_NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid {kind} name {name!r}: expected dotted identifiers such as "
                "'whoami' or 'messages.send'"
            )
        where = f"{kind} {name!r} ({_describe(fn)})"
        if not inspect.iscoroutinefunction(fn):
            raise ValueError(f"{where} must be an 'async def' function")
        try:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(fn)
        except (NameError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: cannot read its signature: {exc}") from exc

        params = list(signature.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if not params or params[0].kind not in positional:
            raise ValueError(f"{where} must take the Context as its first positional parameter")
        ctx_param = params[0]
        ctx_hint = hints.get(ctx_param.name, Any)
        if ctx_hint is not Any and not (
            isinstance(ctx_hint, type) and issubclass(ctx_hint, Context)
        ):
            raise ValueError(
                f"{where} must take the Context as its first parameter, "
                f"but {ctx_param.name!r} is annotated {_type_repr(ctx_hint)}"
            )

        specs: list[ArgSpec] = []
        for param in params[1:]:
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                raise ValueError(f"{where}: *{param.name} is not supported; name each argument")
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                raise ValueError(f"{where}: **{param.name} is not supported; name each argument")
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise ValueError(
                    f"{where}: argument {param.name!r} is positional-only; arguments are passed "
                    "by name"
                )
            if param.name not in hints:
                raise ValueError(
                    f"{where}: argument {param.name!r} has no annotation "
                    "(use Any to accept any JSON value)"
                )
            arg_type, nullable = _arg_type(hints[param.name], where, param.name)
            required = param.default is inspect.Parameter.empty
            spec = ArgSpec(
                name=param.name,
                type=arg_type,
                nullable=nullable,
                required=required,
                default=None if required else param.default,
            )
            if not required:
                try:
                    spec._convert(param.default)
                except _Mismatch:
                    raise ValueError(
                        f"{where}: the default of argument {param.name!r} is not "
                        f"{spec.expected} (annotate it 'X | None' for a None default)"
                    ) from None
            specs.append(spec)
        if partition is not None:
            named = next((p for p in specs if p.name == partition), None)
            if named is None or named.type is not ArgType.STRING or named.nullable:
                raise ValueError(
                    f"{where}: partition={partition!r} must name one of its arguments, "
                    "annotated str"
                )
        return cls(name=name, kind=kind, fn=fn, params=tuple(specs), partition=partition)

    def partition_of(self, kwargs: Mapping[str, Any]) -> str | None:
        """The data partition a call with ``kwargs`` (from :meth:`validate_args`) runs in:
        ``None`` (the default partition) for a function declared without ``partition``.
        Raises ``FunctionError("invalid")`` when the value is empty, longer than
        :data:`MAX_PARTITION_BYTES` in UTF-8, or not encodable; nothing has run then."""
        if self.partition is None:
            return None
        value = kwargs.get(self.partition)
        where = f"argument {self.partition!r} names the data partition"
        if not isinstance(value, str):
            raise FunctionError(FunctionErrorCode.INVALID, f"{where}: give a string")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise FunctionError(FunctionErrorCode.INVALID, f"{where}: not valid text") from None
        if not 0 < size <= MAX_PARTITION_BYTES:
            raise FunctionError(
                FunctionErrorCode.INVALID,
                f"{where}: 1 to {MAX_PARTITION_BYTES} bytes of UTF-8, not {size}",
            )
        return value

    def validate_args(self, args: object) -> dict[str, Any]:
        """The keyword arguments to call the function with, from a client's ``args``.

        An integer given for a ``float`` parameter is converted; a left-out optional argument is
        left out (the function's default applies). Raises :class:`ArgsError` when ``args`` is not
        an object, has a key the function does not take, lacks a required one, or a value is not
        of the annotated type; the first problem found is reported.
        """
        if not isinstance(args, dict):
            raise ArgsError(f"args must be an object, not {_json_type_name(args)}")
        for key in args:
            if key not in self._by_name:
                if self.params:
                    names = ", ".join(p.name for p in self.params)
                    raise ArgsError(f"unknown argument {_echo(key)}; {self.name} takes {names}")
                raise ArgsError(f"unknown argument {_echo(key)}; {self.name} takes no arguments")
        kwargs: dict[str, Any] = {}
        for spec in self.params:
            if spec.name in args:
                kwargs[spec.name] = spec.convert(args[spec.name])
            elif spec.required:
                raise ArgsError(f"missing argument {spec.name!r} ({spec.expected})")
        return kwargs


def _arg_type(hint: object, where: str, name: str) -> tuple[ArgType, bool]:
    """The :class:`ArgType` of an annotation and whether it admits ``None``; else ValueError."""
    nullable = False
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        nullable = len(members) < len(typing.get_args(hint))
        if len(members) == 1:
            hint, origin = members[0], typing.get_origin(members[0])
        else:
            hint = None  # a union of several types: unsupported
    arg_type: ArgType | None = None
    if origin is None:
        arg_type = _SIMPLE_TYPES.get(hint) if _hashable(hint) else None
    elif origin is dict and typing.get_args(hint) in ((), (str, Any)):
        arg_type = ArgType.OBJECT
    elif origin is list and typing.get_args(hint) in ((), (Any,)):
        arg_type = ArgType.ARRAY
    if arg_type is None:
        raise ValueError(
            f"{where}: argument {name!r} has an unsupported annotation {_type_repr(hint)}; "
            "use str, int, float, bool, dict[str, Any], list[Any], Any, or one of them | None"
        )
    return arg_type, nullable


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _type_repr(hint: object) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__qualname__
    return repr(hint).replace("typing.", "")


def _describe(fn: object) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


# ---------------------------------------------------------------------------------- registry


class App:
    """An application: a named set of query and mutation functions, addressed by name.

    Queries and mutations share one namespace. Register with the decorators, which return the
    function unchanged::

        @app.query("messages.list")
        async def list_messages(ctx: Context, channel: str) -> list[dict[str, Any]]: ...

        @app.mutation()          # or bare @app.mutation: the name is the function's __name__
        async def reset(ctx: Context) -> None: ...

    Its data lives in the tables it declares with :meth:`table`; :attr:`schema` lists them.
    """

    def __init__(self, name: str = "app") -> None:
        self.name = name
        self._functions: dict[str, FunctionSpec] = {}
        self._view: Mapping[str, FunctionSpec] = types.MappingProxyType(self._functions)
        self._tables: dict[str, Mapping[str, tuple[str, ...]]] = {}
        self._schema_view: Mapping[str, Mapping[str, tuple[str, ...]]] = types.MappingProxyType(
            self._tables
        )

    @property
    def functions(self) -> Mapping[str, FunctionSpec]:
        """Every registered function by name (a read-only live view)."""
        return self._view

    def lookup(self, name: str) -> FunctionSpec | None:
        """The function registered as ``name``, or ``None`` (the client's ``unknown_function``)."""
        return self._functions.get(name)

    def table(self, name: str, *, indexes: Mapping[str, Sequence[str]] = _NO_INDEXES) -> None:
        """Declare the table ``name`` and its indexes, each a list of document fields.

        The data layer reads and writes only declared tables, and queries only declared indexes
        (``FunctionError("invalid")`` otherwise); it keeps every index of a table up to date on
        each write. An index with no fields lists the whole table in creation order. A field
        a document lacks is indexed as ``null``.

        Raises ``ValueError`` when ``name`` or an index name is not an identifier, the table is
        already declared, or an index's fields are not a list of distinct, non-empty field names
        (a name starting with ``_`` is reserved for the data layer's own fields).
        """
        if not isinstance(name, str) or not IDENTIFIER_RE.fullmatch(name):
            raise ValueError(f"invalid table name {name!r}: expected an identifier")
        if name in self._tables:
            raise ValueError(f"table {name!r} is already declared in app {self.name!r}")
        declared: dict[str, tuple[str, ...]] = {}
        for index, fields in indexes.items():
            where = f"index {index!r} of table {name!r}"
            if not isinstance(index, str) or not IDENTIFIER_RE.fullmatch(index):
                raise ValueError(f"invalid index name {index!r} in table {name!r}")
            if isinstance(fields, str | bytes) or not isinstance(fields, Sequence):
                raise ValueError(f"{where}: give its fields as a list of names")
            names = tuple(fields)
            for field_name in names:
                if not isinstance(field_name, str) or not field_name:
                    raise ValueError(f"{where}: field {field_name!r} is not a non-empty string")
                if field_name.startswith("_"):
                    raise ValueError(f"{where}: field {field_name!r} is reserved (starts with _)")
            if len(set(names)) != len(names):
                raise ValueError(f"{where}: a field is listed twice")
            declared[index] = names
        self._tables[name] = types.MappingProxyType(declared)

    @property
    def schema(self) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
        """Every declared table: table → index name → indexed fields (a read-only live view)."""
        return self._schema_view

    @overload
    def query(self, name: _F) -> _F: ...
    @overload
    def query(
        self, name: str | None = None, *, partition: str | None = None
    ) -> Callable[[_F], _F]: ...
    def query(
        self, name: str | _F | None = None, *, partition: str | None = None
    ) -> _F | Callable[[_F], _F]:
        """Register a query (read-only; its result is pushed to subscribers as it changes).

        ``partition`` names the argument whose value is the data partition the query reads
        (``ctx.db`` then sees only that partition: ``docs/scaling.md``); without it, the
        default partition. Raises ``ValueError`` as :meth:`FunctionSpec.from_function` does,
        and when the name is already registered.
        """
        return self._decorator("query", name, partition)

    @overload
    def mutation(self, name: _F) -> _F: ...
    @overload
    def mutation(
        self, name: str | None = None, *, partition: str | None = None
    ) -> Callable[[_F], _F]: ...
    def mutation(
        self, name: str | _F | None = None, *, partition: str | None = None
    ) -> _F | Callable[[_F], _F]:
        """Register a mutation (a write, run once per ``requestId``).

        ``partition`` names the argument whose value is the data partition the mutation reads
        and writes (see :meth:`query`). Raises ``ValueError`` as
        :meth:`FunctionSpec.from_function` does, and when the name is already registered.
        """
        return self._decorator("mutation", name, partition)

    def _decorator(
        self, kind: FunctionKind, name: str | _F | None, partition: str | None = None
    ) -> _F | Callable[[_F], _F]:
        if callable(name):  # used bare: @app.query
            self._register(kind, None, name)
            return name

        def register(fn: _F) -> _F:
            self._register(kind, name, fn, partition)
            return fn

        return register

    def _register(
        self,
        kind: FunctionKind,
        name: str | None,
        fn: Callable[..., Awaitable[Any]],
        partition: str | None = None,
    ) -> FunctionSpec:
        if name is None:
            name = getattr(fn, "__name__", "")
        spec = FunctionSpec.from_function(name, kind, fn, partition=partition)
        existing = self._functions.get(spec.name)
        if existing is not None:
            raise ValueError(
                f"{spec.name!r} is already registered in app {self.name!r} "
                f"as a {existing.kind} ({_describe(existing.fn)})"
            )
        self._functions[spec.name] = spec
        return spec

    def __repr__(self) -> str:
        return f"App({self.name!r}, functions={len(self._functions)})"


# ---------------------------------------------------------------------------------- calling


async def invoke(spec: FunctionSpec, ctx: Context, kwargs: Mapping[str, Any]) -> Any:
    """Run the function of ``spec`` with ``ctx`` and ``kwargs`` from ``spec.validate_args``.

    A :class:`~tether.server.errors.FunctionError` the function raises propagates unchanged; a
    :class:`~tether.server.errors.MisuseError` (the data layer refused what the function asked)
    is logged first, at WARNING, with the function's name and what was wrong. Any
    other exception is logged with its traceback (logger ``tether.functions``) and replaced by
    ``FunctionError("internal", "the function failed")``: its text never reaches a client.
    Cancellation (a ``BaseException``) propagates.
    """
    try:
        return await spec.fn(ctx, **kwargs)
    except MisuseError as exc:
        # A bug in the application, not an answer it chose: its author must hear of it. The
        # message names tables, indexes and fields (shortened), not the arguments it ran with.
        log.warning("%s %r used the data layer wrongly: %s", spec.kind, spec.name, exc.message)
        raise
    except FunctionError:
        raise
    except Exception:
        log.exception("%s %r failed", spec.kind, spec.name)
        raise FunctionError(ErrorCode.INTERNAL, "the function failed") from None


def encode_result(value: Any, max_bytes: int) -> str:
    """The compact JSON text of a function's result.

    Raises ``FunctionError("internal")`` when ``value`` is not JSON (an unsupported type, NaN or
    an infinity, a cycle, a lone surrogate), and :class:`ResultTooLarge` when its UTF-8 encoding
    is over ``max_bytes``.
    """
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:
        # UnicodeEncodeError (a lone surrogate) is a ValueError.
        log.warning("a function result is not JSON: %s", type(exc).__name__)
        raise FunctionError(ErrorCode.INTERNAL, "the function's result is not JSON") from None
    if size > max_bytes:
        raise ResultTooLarge(size, max_bytes)
    return text


# ---------------------------------------------------------------------------------- loading


#: The attribute ``load_application`` takes when the spec names only a module.
DEFAULT_APP_ATTR = "app"


def load_application(spec: str) -> App:
    """Import ``MODULE[:ATTR]`` (``ATTR`` may be dotted; default :data:`DEFAULT_APP_ATTR`,
    ``app``) and return that :class:`App`.

    The current directory is importable, as with ``python -m``, so ``myapp`` and ``myapp:app``
    find ``./myapp.py``. Raises ``ValueError`` naming the spec and the reason: not
    ``MODULE[:ATTR]``, the module fails to import, the attribute is missing, or it is not an
    ``App``.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep:
        attr_path = DEFAULT_APP_ATTR
    if not module_name or not attr_path:
        raise ValueError(f"cannot load application {spec!r}: expected MODULE or MODULE:ATTR")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot load application {spec!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed while importing
        raise ValueError(f"cannot load application {spec!r}: {type(exc).__name__}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            hint = "" if sep else f" (name the App with {module_name}:ATTR)"
            raise ValueError(
                f"cannot load application {spec!r}: {module_name} has no attribute "
                f"{attr_path!r}{hint}"
            ) from None
    if not isinstance(obj, App):
        raise ValueError(
            f"cannot load application {spec!r}: {attr_path} is a {type(obj).__name__}, "
            "not a tether App (create one with tether.App())"
        )
    return obj
