"""Unit tests of the function registry (``tether.server.data.functions``) and the demo application.

No sockets, no Redis: registration, argument validation, identity tracking, invoking and result
encoding are pure. This module uses ``from __future__ import annotations`` on purpose: every
signature below reaches the registry as strings, as it does from user modules that use it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tether.protocol import kind_named_by, wrong_kind_message
from tether.server import demo
from tether.server.data.functions import (
    App,
    ArgsError,
    ArgSpec,
    ArgType,
    Auth,
    Context,
    FunctionSpec,
    ResultTooLarge,
    encode_result,
    invoke,
    load_application,
)
from tether.server.errors import FunctionError

USER = Auth(user_id="u1", session_id="s1")
OTHER = Auth(user_id="u2", session_id="s2")


def spec_of(
    fn: Callable[..., Any], name: str = "f", kind: Literal["query", "mutation"] = "query"
) -> FunctionSpec:
    return FunctionSpec.from_function(name, kind, fn)


def one_arg(hint: object) -> FunctionSpec:
    """The spec of ``async def f(ctx, x: hint)``: one required argument ``x``."""

    async def f(ctx: Context, x: Any) -> Any:
        return x

    f.__annotations__ = {"ctx": Context, "x": hint, "return": Any}
    return spec_of(f)


# ---------------------------------------------------------------------------------- registration


def test_decorators_register_and_return_the_function() -> None:
    app = App("t")

    @app.query("messages.list")
    async def list_messages(ctx: Context, channel: str) -> list[Any]:
        return []

    @app.mutation("messages.send")
    async def send(ctx: Context, channel: str, body: str) -> str:
        return "id"

    spec = app.lookup("messages.list")
    assert spec is not None
    assert spec.name == "messages.list"
    assert spec.kind == "query"
    assert spec.fn is list_messages
    assert spec.params == (
        ArgSpec(name="channel", type=ArgType.STRING, nullable=False, required=True),
    )
    send_spec = app.lookup("messages.send")
    assert send_spec is not None and send_spec.kind == "mutation" and send_spec.fn is send
    assert [p.name for p in send_spec.params] == ["channel", "body"]
    assert app.lookup("nope") is None
    assert set(app.functions) == {"messages.list", "messages.send"}


def test_name_defaults_to_the_function_name() -> None:
    app = App()

    @app.query()
    async def first(ctx: Context) -> None:
        return None

    @app.mutation
    async def second(ctx: Context) -> None:
        return None

    assert app.lookup("first") is not None and app.lookup("first").kind == "query"  # type: ignore[union-attr]
    assert app.lookup("second") is not None and app.lookup("second").kind == "mutation"  # type: ignore[union-attr]
    assert second.__name__ == "second"  # the bare decorator returned the function


def test_functions_is_a_read_only_live_view() -> None:
    app = App()
    view = app.functions
    assert len(view) == 0

    @app.query("a")
    async def a(ctx: Context) -> None:
        return None

    assert list(view) == ["a"]
    with pytest.raises(TypeError):
        view["b"] = view["a"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("first", "second"), [("query", "query"), ("query", "mutation"), ("mutation", "query")]
)
def test_registering_a_name_twice_is_refused(first: str, second: str) -> None:
    app = App("t")

    async def f(ctx: Context) -> None:
        return None

    async def g(ctx: Context) -> None:
        return None

    getattr(app, first)("dup")(f)
    with pytest.raises(ValueError, match=r"'dup' is already registered in app 't' as a " + first):
        getattr(app, second)("dup")(g)
    assert app.lookup("dup").fn is f  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["a", "_x", "whoami", "messages.send", "a1.b_2._c", "A.B.C"])
def test_valid_names(name: str) -> None:
    async def f(ctx: Context) -> None:
        return None

    assert App().query(name)(f) is f


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a..b", "a.", ".a", "a-b", "a b", "whoami\n", "a.1b", "é", "<lambda>"],
)
def test_invalid_names_are_refused(name: str) -> None:
    async def f(ctx: Context) -> None:
        return None

    with pytest.raises(ValueError, match="invalid query name"):
        App().query(name)(f)


def test_a_non_async_function_is_refused() -> None:
    def sync(ctx: Context) -> None:
        return None

    async def agen(ctx: Context) -> Any:
        yield 1

    with pytest.raises(ValueError, match="must be an 'async def' function"):
        App().query("s")(sync)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="must be an 'async def' function"):
        App().query("g")(agen)  # type: ignore[type-var]


def test_star_args_and_kwargs_are_refused() -> None:
    async def star(ctx: Context, *rest: Any) -> None:
        return None

    async def double_star(ctx: Context, **rest: Any) -> None:
        return None

    with pytest.raises(ValueError, match=r"\*rest is not supported"):
        spec_of(star)
    with pytest.raises(ValueError, match=r"\*\*rest is not supported"):
        spec_of(double_star)


def test_a_missing_context_is_refused() -> None:
    async def nothing() -> None:
        return None

    async def keyword_only(*, ctx: Context) -> None:
        return None

    async def args_only(channel: str) -> None:
        return None

    for fn in (nothing, keyword_only):
        with pytest.raises(ValueError, match="must take the Context as its first positional"):
            spec_of(fn)
    with pytest.raises(ValueError, match="'channel' is annotated str"):
        spec_of(args_only)


def test_an_unannotated_context_is_accepted() -> None:
    async def f(ctx, x: int) -> int:  # type: ignore[no-untyped-def]
        return x

    assert [p.name for p in spec_of(f).params] == ["x"]


def test_a_positional_only_argument_is_refused() -> None:
    async def f(ctx: Context, x: int, /) -> None:
        return None

    with pytest.raises(ValueError, match="'x' is positional-only"):
        spec_of(f)


def test_an_unannotated_argument_is_refused() -> None:
    async def f(ctx: Context, x) -> None:  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(ValueError, match="'x' has no annotation"):
        spec_of(f)


class Custom:
    pass


@pytest.mark.parametrize(
    "hint",
    [
        tuple,
        set,
        bytes,
        Custom,
        str | int,
        int | str | None,
        dict[str, int],
        dict[int, Any],
        list[int],
        tuple[int, ...],
        Literal["a"],
        type(None),
        Context,
    ],
)
def test_unsupported_annotations_are_refused(hint: object) -> None:
    with pytest.raises(ValueError, match="'x' has an unsupported annotation"):
        one_arg(hint)


def test_an_annotation_that_does_not_resolve_is_refused() -> None:
    async def f(ctx: Context, x: Undefined) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ValueError, match=r"cannot read its signature: .*Undefined"):
        spec_of(f)


def test_a_default_that_does_not_fit_its_annotation_is_refused() -> None:
    async def f(ctx: Context, x: str = None) -> None:  # type: ignore[assignment]  # noqa: RUF013
        return None

    with pytest.raises(ValueError, match="the default of argument 'x' is not a string"):
        spec_of(f)


def test_the_error_names_the_function() -> None:
    async def broken(ctx: Context, x: set[int]) -> None:
        return None

    with pytest.raises(ValueError, match=r"mutation 'm' \(.*test_functions.*broken\)"):
        App().mutation("m")(broken)


# ---------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("hint", "value", "expected"),
    [
        (str, "a", "a"),
        (str, "", ""),
        (int, 3, 3),
        (int, -(10**30), -(10**30)),
        (float, 1.5, 1.5),
        (float, 2, 2.0),
        (bool, True, True),
        (bool, False, False),
        (dict, {"a": [1]}, {"a": [1]}),
        (dict[str, Any], {}, {}),
        (list, [1, "a"], [1, "a"]),
        (list[Any], [], []),
        (Any, None, None),
        (Any, {"x": 1}, {"x": 1}),
        (Any, 1.5, 1.5),
        (str | None, None, None),
        (str | None, "a", "a"),
        (Optional[int], None, None),  # noqa: UP045 -- the old spelling must work too
        (Optional[int], 4, 4),  # noqa: UP045
        (dict[str, Any] | None, None, None),
        (Any | None, None, None),
    ],
)
def test_accepted_values(hint: object, value: object, expected: object) -> None:
    kwargs = one_arg(hint).validate_args({"x": value})
    assert kwargs == {"x": expected}
    assert type(kwargs["x"]) is type(expected)


@pytest.mark.parametrize(
    ("hint", "value", "message"),
    [
        (str, 1, "argument 'x' must be a string, not an integer"),
        (str, None, "argument 'x' must be a string, not null"),
        (str, ["a"], "argument 'x' must be a string, not an array"),
        (int, True, "argument 'x' must be an integer, not a boolean"),
        (int, 1.0, "argument 'x' must be an integer, not a number"),
        (int, "3", "argument 'x' must be an integer, not a string"),
        (float, True, "argument 'x' must be a number, not a boolean"),
        (float, "1.5", "argument 'x' must be a number, not a string"),
        (float, math.nan, "argument 'x' must be a number, not a non-finite number"),
        (float, math.inf, "argument 'x' must be a number, not a non-finite number"),
        (float, 10**400, "argument 'x' must be a number, not an integer out of the range"),
        (bool, 1, "argument 'x' must be a boolean, not an integer"),
        (bool, 0, "argument 'x' must be a boolean, not an integer"),
        (bool, "true", "argument 'x' must be a boolean, not a string"),
        (dict, [], "argument 'x' must be an object, not an array"),
        (dict[str, Any], "{}", "argument 'x' must be an object, not a string"),
        (list, {}, "argument 'x' must be an array, not an object"),
        (list[Any], (1,), "argument 'x' must be an array, not a tuple"),
        (str | None, 1, "argument 'x' must be a string or null, not an integer"),
        (int | None, False, "argument 'x' must be an integer or null, not a boolean"),
    ],
)
def test_refused_values(hint: object, value: object, message: str) -> None:
    with pytest.raises(ArgsError) as info:
        one_arg(hint).validate_args({"x": value})
    assert info.value.code == "bad_args"
    assert info.value.message.startswith(message)


def test_args_error_is_a_function_error_with_code_bad_args() -> None:
    err = ArgsError("nope")
    assert isinstance(err, FunctionError)
    assert (err.code, err.message) == ("bad_args", "nope")


async def send(ctx: Context, channel: str, body: str, urgent: bool = False) -> str:
    return f"{channel}:{body}:{urgent}"


SEND = spec_of(send, "messages.send", "mutation")


def test_defaults_make_arguments_optional() -> None:
    (channel, body, urgent) = SEND.params
    assert channel.required and body.required
    assert not urgent.required and urgent.default is False
    assert SEND.validate_args({"channel": "c", "body": "b"}) == {"channel": "c", "body": "b"}
    assert SEND.validate_args({"body": "b", "channel": "c", "urgent": True}) == {
        "channel": "c",
        "body": "b",
        "urgent": True,
    }


async def test_a_left_out_argument_takes_the_function_default() -> None:
    kwargs = SEND.validate_args({"channel": "c", "body": "b"})
    assert await invoke(SEND, Context(), kwargs) == "c:b:False"


def test_an_optional_argument_may_not_be_null_unless_annotated_so() -> None:
    with pytest.raises(ArgsError, match="argument 'urgent' must be a boolean, not null"):
        SEND.validate_args({"channel": "c", "body": "b", "urgent": None})


def test_a_required_nullable_argument_is_still_required() -> None:
    spec = one_arg(str | None)
    assert spec.validate_args({"x": None}) == {"x": None}
    with pytest.raises(ArgsError, match=r"missing argument 'x' \(a string or null\)"):
        spec.validate_args({})


def test_an_unknown_argument_is_refused() -> None:
    with pytest.raises(ArgsError) as info:
        SEND.validate_args({"channel": "c", "body": "b", "chanel": "x"})
    assert info.value.message == (
        "unknown argument 'chanel'; messages.send takes channel, body, urgent"
    )


def test_any_argument_to_a_function_without_arguments_is_refused() -> None:
    async def whoami(ctx: Context) -> None:
        return None

    spec = spec_of(whoami, "whoami")
    assert spec.validate_args({}) == {}
    with pytest.raises(ArgsError, match="unknown argument 'x'; whoami takes no arguments"):
        spec.validate_args({"x": 1})


def test_a_missing_argument_is_refused() -> None:
    with pytest.raises(ArgsError) as info:
        SEND.validate_args({"channel": "c"})
    assert info.value.message == "missing argument 'body' (a string)"


@pytest.mark.parametrize(
    ("args", "kind"),
    [(None, "null"), ([], "an array"), ("{}", "a string"), (1, "an integer"), (True, "a boolean")],
)
def test_args_must_be_an_object(args: object, kind: str) -> None:
    with pytest.raises(ArgsError) as info:
        SEND.validate_args(args)
    assert info.value.message == f"args must be an object, not {kind}"


def test_error_messages_never_echo_a_huge_value() -> None:
    huge = "SECRET" + "x" * 100_000
    cases: list[dict[str, Any]] = [
        {"channel": "c", "body": "b", "urgent": huge},
        {"channel": [huge], "body": "b"},
        {"channel": {huge: huge}, "body": "b"},
        {"channel": "c", "body": "b", huge: 1},
    ]
    for args in cases:
        with pytest.raises(ArgsError) as info:
            SEND.validate_args(args)
        assert len(info.value.message) < 200
        assert "x" * 50 not in info.value.message
        assert "x" * 50 not in str(info.value)


def test_validate_args_does_not_change_the_client_args() -> None:
    args = {"channel": "c", "body": "b"}
    kwargs = SEND.validate_args(args)
    assert kwargs is not args
    assert args == {"channel": "c", "body": "b"}


async def every(
    ctx: Context,
    s: str,
    i: int,
    f: float,
    b: bool,
    d: dict[str, Any],
    lst: list[Any],
    a: Any,
    bare_d: dict,  # type: ignore[type-arg]
    bare_l: list,  # type: ignore[type-arg]
    ns: str | None,
    ni: int | None,
    opt: int = 5,
    opt_null: str | None = None,
) -> None:
    return None


EVERY = spec_of(every)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
arg_names = st.sampled_from([p.name for p in EVERY.params]) | st.text(max_size=8)
json_args = json_values | st.dictionaries(arg_names, json_values, max_size=len(EVERY.params) + 2)


@given(json_args)
def test_validate_args_either_returns_kwargs_or_raises_args_error(args: object) -> None:
    try:
        kwargs = EVERY.validate_args(args)
    except ArgsError as exc:
        assert exc.code == "bad_args"
        assert len(exc.message) < 200
    else:
        assert isinstance(args, dict)
        assert isinstance(kwargs, dict)
        assert set(kwargs) == set(args)
        assert EVERY.validate_args(kwargs).keys() == kwargs.keys()  # kwargs fit the signature


_VALID_BY_TYPE = {
    ArgType.STRING: st.text(max_size=10),
    ArgType.INTEGER: st.integers(),
    ArgType.NUMBER: st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**60), 2**60),
    ArgType.BOOLEAN: st.booleans(),
    ArgType.OBJECT: st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    ArgType.ARRAY: st.lists(json_values, max_size=3),
    ArgType.ANY: json_values,
}


@st.composite
def well_typed_args(draw: st.DrawFn) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for p in EVERY.params:
        if not p.required and draw(st.booleans()):
            continue
        value = _VALID_BY_TYPE[p.type]
        args[p.name] = draw(st.none() | value if p.nullable else value)
    return args


@given(well_typed_args())
def test_well_typed_args_are_always_accepted(args: dict[str, Any]) -> None:
    kwargs = EVERY.validate_args(args)
    assert set(kwargs) == set(args)
    if kwargs["f"] is not None:
        assert type(kwargs["f"]) is float


# ---------------------------------------------------------------------------------- context


def test_auth_is_a_frozen_slotted_value() -> None:
    assert Auth("u1", "s1") == USER
    with pytest.raises(dataclasses.FrozenInstanceError):
        USER.user_id = "u2"  # type: ignore[misc]
    assert not hasattr(USER, "__dict__")


def test_context_defaults_and_slots() -> None:
    ctx = Context()
    with pytest.raises(RuntimeError, match="without a database"):
        _ = ctx.db
    assert ctx.read_identity is False
    db = object()
    assert Context(USER, db=db).db is db
    with pytest.raises(AttributeError):
        ctx.other = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        ctx.read_identity = False  # type: ignore[misc]


@pytest.mark.parametrize("auth", [None, USER])
def test_reading_auth_is_recorded(auth: Auth | None) -> None:
    ctx = Context(auth)
    assert ctx.read_identity is False
    assert ctx.auth == auth
    assert ctx.read_identity is True


def test_require_auth_returns_the_identity() -> None:
    ctx = Context(USER)
    assert ctx.require_auth() is USER
    assert ctx.read_identity is True


def test_require_auth_refuses_anonymous_and_counts_as_a_read() -> None:
    ctx = Context()
    with pytest.raises(FunctionError) as info:
        ctx.require_auth()
    assert (info.value.code, info.value.message) == ("unauthenticated", "sign in first")
    assert ctx.read_identity is True


async def test_a_function_that_never_reads_auth_leaves_read_identity_false() -> None:
    async def count(ctx: Context, n: int) -> int:
        return n + 1

    ctx = Context(USER)
    assert await invoke(spec_of(count), ctx, {"n": 1}) == 2
    assert ctx.read_identity is False


async def test_a_function_that_reads_auth_sets_read_identity() -> None:
    async def me(ctx: Context) -> str | None:
        return ctx.auth.user_id if ctx.auth else None

    ctx = Context(USER)
    assert await invoke(spec_of(me), ctx, {}) == "u1"
    assert ctx.read_identity is True


# ---------------------------------------------------------------------------------- invoke


async def test_invoke_passes_context_and_kwargs() -> None:
    seen: list[object] = []

    async def f(ctx: Context, a: int, b: str) -> list[object]:
        seen.append(ctx)
        return [a, b]

    ctx = Context()
    assert await invoke(spec_of(f), ctx, {"b": "x", "a": 1}) == [1, "x"]
    assert seen == [ctx]


async def test_invoke_lets_function_errors_through_unchanged() -> None:
    raised = FunctionError("forbidden", "not yours")

    async def f(ctx: Context) -> None:
        raise raised

    async def g(ctx: Context) -> None:
        raise FunctionError("quota_exceeded", "the application's own code")

    with pytest.raises(FunctionError) as info:
        await invoke(spec_of(f), Context(), {})
    assert info.value is raised
    with pytest.raises(FunctionError) as info:
        await invoke(spec_of(g), Context(), {})
    assert info.value.code == "quota_exceeded"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("password=hunter2"),
        KeyError("password=hunter2"),
        ValueError("password=hunter2"),
        ZeroDivisionError("password=hunter2"),
    ],
)
async def test_invoke_hides_other_exceptions(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    async def f(ctx: Context) -> None:
        raise exc

    with caplog.at_level(logging.ERROR, logger="tether.functions"):
        with pytest.raises(FunctionError) as info:
            await invoke(spec_of(f, "leaky"), Context(), {})
    err = info.value
    assert type(err) is FunctionError
    assert (err.code, err.message) == ("internal", "the function failed")
    assert "hunter2" not in str(err) and "hunter2" not in repr(err)
    assert err.__cause__ is None and err.__suppress_context__
    # The traceback is in the server's log, not in the error.
    [record] = [r for r in caplog.records if r.name == "tether.functions"]
    assert "leaky" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is exc


async def test_invoke_lets_cancellation_through() -> None:
    async def f(ctx: Context) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await invoke(spec_of(f), Context(), {})


# ---------------------------------------------------------------------------------- results


def test_encode_result_is_compact_utf8_json() -> None:
    value = {"a": [1, 2.5, None, True], "b": "é☃"}
    assert encode_result(value, 1000) == '{"a":[1,2.5,null,true],"b":"é☃"}'
    assert encode_result(None, 4) == "null"


def test_encode_result_limit_counts_utf8_bytes() -> None:
    text = encode_result("é", 4)  # '"é"' is 4 bytes
    assert text == '"é"'
    with pytest.raises(ResultTooLarge) as info:
        encode_result("é", 3)
    err = info.value
    assert isinstance(err, FunctionError)
    assert err.code == "limit_exceeded"
    assert (err.size, err.max_bytes) == (4, 3)


def test_encode_result_refuses_a_result_over_the_limit() -> None:
    big = ["x" * 1000] * 100
    with pytest.raises(ResultTooLarge, match="over the limit of 65536"):
        encode_result(big, 65536)
    assert len(encode_result(big, 200_000)) > 65536


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        {"a": [math.nan]},
        {1, 2},
        object(),
        b"bytes",
        {(1, 2): "tuple key"},
        "\ud800",  # a lone surrogate cannot be UTF-8
    ],
)
def test_encode_result_refuses_what_is_not_json(value: object) -> None:
    with pytest.raises(FunctionError) as info:
        encode_result(value, 1_000_000)
    assert type(info.value) is FunctionError
    assert info.value.code == "internal"


def test_encode_result_refuses_a_cycle() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(FunctionError, match="internal"):
        encode_result(cycle, 1_000_000)


# ---------------------------------------------------------------------------------- loading


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    name = f"tether_test_app_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_load_application_returns_the_app() -> None:
    assert load_application("tether.server.demo:app") is demo.app


def test_load_application_follows_a_dotted_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = write_module(
        tmp_path,
        monkeypatch,
        "import types\nfrom tether.server.data.functions import App\n"
        "ns = types.SimpleNamespace(app=App('nested'))\n",
    )
    try:
        assert load_application(f"{name}:ns.app").name == "nested"
    finally:
        sys.modules.pop(name, None)


def test_load_application_takes_app_when_only_a_module_is_named() -> None:
    """``tether serve polls`` is ``tether serve polls:app``."""
    assert load_application("tether.server.demo") is demo.app


def test_load_application_module_without_app_says_how_to_name_one() -> None:
    with pytest.raises(
        ValueError, match=r"has no attribute 'app' \(name the App with tether:ATTR\)"
    ):
        load_application("tether")


@pytest.mark.parametrize("spec", ["tether.server.demo:", ":app", ""])
def test_load_application_needs_module_and_attr(spec: str) -> None:
    with pytest.raises(ValueError, match="expected MODULE or MODULE:ATTR"):
        load_application(spec)


def test_load_application_missing_module() -> None:
    with pytest.raises(ValueError, match=r"cannot load application 'no_such_module_x:app': .*"):
        load_application("no_such_module_x:app")


def test_load_application_missing_attribute() -> None:
    with pytest.raises(ValueError, match=r"server\.demo has no attribute 'nope'"):
        load_application("tether.server.demo:nope")


def test_load_application_not_an_app() -> None:
    with pytest.raises(ValueError, match="MAX_MESSAGE_CHARS is a int, not a tether App"):
        load_application("tether.server.demo:MAX_MESSAGE_CHARS")


def test_load_application_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = write_module(tmp_path, monkeypatch, "raise RuntimeError('boom at import')\n")
    with pytest.raises(ValueError, match="RuntimeError: boom at import"):
        load_application(f"{name}:app")


def test_load_application_module_whose_registration_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = write_module(
        tmp_path,
        monkeypatch,
        "from tether.server.data.functions import App\napp = App()\n"
        "@app.query('x')\ndef x(ctx):\n    return 1\n",
    )
    with pytest.raises(ValueError, match="must be an 'async def' function"):
        load_application(f"{name}:app")


# ---------------------------------------------------------------------------------- demo


def test_demo_registers_the_contract_functions() -> None:
    kinds = {name: spec.kind for name, spec in demo.app.functions.items()}
    assert kinds == {
        "whoami": "query",
        "messages.list": "query",
        "messages.send": "mutation",
        "notes.mine": "query",
        "notes.add": "mutation",
        "counter.get": "query",
        "counter.increment": "mutation",
    }
    assert demo.app.name == "demo"


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("whoami", {}),
        ("messages.list", {"channel": "general"}),
        ("messages.send", {"channel": "general", "body": "hi"}),
        ("notes.mine", {}),
        ("notes.add", {"text": "t"}),
        ("counter.get", {"name": "c"}),
        ("counter.increment", {"name": "c"}),
        ("counter.increment", {"name": "c", "by": -3}),
    ],
)
def test_demo_accepts_the_contract_args(name: str, args: dict[str, Any]) -> None:
    spec = demo.app.lookup(name)
    assert spec is not None
    assert spec.validate_args(args) == args


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("whoami", {"x": 1}),
        ("messages.list", {}),
        ("messages.send", {"channel": "general"}),
        ("messages.send", {"channel": "general", "body": 5}),
        ("counter.increment", {"name": "c", "by": True}),
        ("counter.increment", {"name": "c", "by": 1.5}),
    ],
)
def test_demo_refuses_bad_args(name: str, args: dict[str, Any]) -> None:
    spec = demo.app.lookup(name)
    assert spec is not None
    with pytest.raises(ArgsError):
        spec.validate_args(args)


async def call(name: str, ctx: Context, args: dict[str, Any]) -> Any:
    spec = demo.app.lookup(name)
    assert spec is not None
    return await invoke(spec, ctx, spec.validate_args(args))


async def test_whoami_anonymous() -> None:
    ctx = Context()
    assert await call("whoami", ctx, {}) is None
    assert ctx.read_identity is True


async def test_whoami_signed_in() -> None:
    ctx = Context(USER)
    assert await call("whoami", ctx, {}) == {"userId": "u1"}
    assert ctx.read_identity is True
    assert encode_result(await call("whoami", Context(USER), {}), 100) == '{"userId":"u1"}'


class UntouchedDatabase:
    """A ``ctx.db`` that fails the test on any use: for checks that run before data is touched.
    The demo's reads and writes themselves are tested on the real store (tests/test_store.py)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"ctx.db.{name} used before the arguments were checked")


@pytest.mark.parametrize(
    ("auth", "body", "code", "message"),
    [
        (None, "hi", "unauthenticated", "sign in first"),
        (None, "", "unauthenticated", "sign in first"),  # who comes before what
        (USER, "", "invalid", "the message body is empty"),
        (USER, "x" * 4001, "invalid", "the message body is over 4000 characters"),
        (USER, "é" * 4001, "invalid", "the message body is over 4000 characters"),
    ],
)
async def test_messages_send_validates_before_touching_data(
    auth: Auth | None, body: str, code: str, message: str
) -> None:
    with pytest.raises(FunctionError) as info:
        await call(
            "messages.send", Context(auth, db=UntouchedDatabase()), {"channel": "c", "body": body}
        )
    assert (info.value.code, info.value.message) == (code, message)


@pytest.mark.parametrize(("name", "args"), [("notes.mine", {}), ("notes.add", {"text": "t"})])
async def test_notes_need_a_user(name: str, args: dict[str, Any]) -> None:
    with pytest.raises(FunctionError) as info:
        await call(name, Context(None, db=UntouchedDatabase()), args)
    assert info.value.code == "unauthenticated"


# ---------------------------------------------------------------------------------- wrong kind


@pytest.mark.parametrize(("kind", "other"), [("query", "mutation"), ("mutation", "query")])
def test_the_wrong_kind_message_names_the_kind_and_reads_back(kind: str, other: str) -> None:
    message = wrong_kind_message("counter.get", kind)
    assert message == f"'counter.get' is a {kind}, not a {other}"
    assert kind_named_by(message) == kind
    assert kind_named_by(f"no {other} named 'counter.get'") is None
