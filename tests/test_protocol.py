"""Unit tests of the ``/sync`` protocol core (``tether.server.realtime.core``), against protocol §3.

The core is sans I/O: these tests feed it frames and answers with a fake clock (plain floats for
``now``, seconds) and check the actions it returns. No socket, no sleep, no Redis. ``resolve``
below stands in for the function registry.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tether.protocol import AuthErrorCode, CloseCode, ErrorCode, ServerMessageType, SessionEndReason
from tether.server.realtime import core as core_module
from tether.server.realtime.core import (
    Authenticate,
    BadMessage,
    BindSession,
    Close,
    Connect,
    ConnectionCore,
    DropQuery,
    Identity,
    Limits,
    Mutate,
    Ping,
    QueryResult,
    Raw,
    Refresh,
    RotateRefresh,
    RunMutation,
    RunQueries,
    Send,
    Subscribe,
    Timing,
    UnbindSession,
    Unsubscribe,
    VerifyToken,
    encode_frame,
    parse_client_message,
)

ACTION_TYPES = (
    Send,
    Close,
    VerifyToken,
    RotateRefresh,
    RunQueries,
    RunMutation,
    DropQuery,
    BindSession,
    UnbindSession,
)

# ------------------------------------------------------------------------------ test doubles

FUNCTIONS = {"whoami": "query", "echo": "query", "notes.add": "mutation"}


def resolve(kind: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The function registry's stand-in: ``{"invalid": true}`` marks args as not fitting;
    other args are returned as they came."""
    if FUNCTIONS.get(name) != kind:
        raise BadMessage(ErrorCode.UNKNOWN_FUNCTION, f"no {kind} named {name!r}")
    if args.get("invalid") is True:
        raise BadMessage(ErrorCode.BAD_ARGS, "these args do not fit the function")
    return args


# Identities. ALICE: iat 0, exp 100 → notice min(60, 100/2) = 50 s → auth_expiring at t=50,
# auth_expired at 100 + leeway 5 = 105.
ALICE = Identity("alice", "sess-a", 0.0, 100.0)
ALICE_LATER = Identity("alice", "sess-a", 0.0, 200.0)  # notice 60 → 140; expired at 205
ALICE_OTHER_SESSION = Identity("alice", "sess-a2", 0.0, 100.0)
BOB = Identity("bob", "sess-b", 0.0, 100.0)
TOKENS = {"accessToken": "at-2", "refreshToken": "rt-2", "expiresAt": 200_000}

TIMING = Timing(expiry_notice=60.0, clock_leeway=5.0)
# A heartbeat far away, so that timer tests of expiry see only expiry.
QUIET = Limits(heartbeat_timeout=1000.0)


# ------------------------------------------------------------------------------ helpers


def msg(kind: Any, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    """The frames of the ``Send`` actions, in order."""
    return [a.frame for a in actions if isinstance(a, Send)]


def of_type(actions: list[Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in sent(actions) if f["type"] == kind]


def only_frame(actions: list[Any], kind: str) -> dict[str, Any]:
    frames = of_type(actions, kind)
    assert len(frames) == 1, f"expected one {kind!r} frame in {actions!r}"
    return frames[0]


def instances(actions: list[Any], cls: type) -> list[Any]:
    return [a for a in actions if isinstance(a, cls)]


def norm(actions: list[Any]) -> list[Any]:
    """``actions`` with the serials of each ``RunQueries`` left out, to compare the rest exactly
    (serials have tests of their own)."""
    return [
        RunQueries(a.generation, a.identity, a.queries) if isinstance(a, RunQueries) else a
        for a in actions
    ]


def error_frame(actions: list[Any]) -> dict[str, Any]:
    """The single ``error`` frame of ``actions``; the connection must stay open."""
    assert not instances(actions, Close), actions
    frame = only_frame(actions, "error")
    assert isinstance(frame["message"], str) and frame["message"]
    return frame


def new_core(
    *,
    now: float = 0.0,
    limits: Limits = QUIET,
    timing: Timing = TIMING,
    connection_id: str = "conn-1",
) -> ConnectionCore:
    return ConnectionCore(
        connection_id=connection_id, now=now, timing=timing, limits=limits, resolve=resolve
    )


def connected(
    *, now: float = 0.0, limits: Limits = QUIET, timing: Timing = TIMING
) -> ConnectionCore:
    core = new_core(now=now, limits=limits, timing=timing)
    actions = core.receive(msg("connect", clientId="client-1", protocol=1), now)
    only_frame(actions, "connected")
    return core


def sign_in(
    core: ConnectionCore, identity: Identity, version: int, now: float, token: str = "jwt"
) -> list[Any]:
    """``authenticate`` with ``token`` and have the shell verify it as ``identity``."""
    actions = core.receive(msg("authenticate", token=token, authVersion=version), now)
    assert actions == [VerifyToken(version, token)]
    return core.auth_succeeded(version, identity, now)


def subscribe(
    core: ConnectionCore,
    query_id: int,
    name: str = "echo",
    args: dict[str, Any] | None = None,
    now: float = 0.0,
) -> RunQueries:
    actions = core.receive(msg("subscribe", queryId=query_id, name=name, args=args or {}), now)
    runs = instances(actions, RunQueries)
    assert len(runs) == 1 and runs[0].queries[-1][0] == query_id, actions
    return runs[-1]


def ms(seconds: float) -> int:
    return int(seconds * 1000)


# ============================================================================== parsing


@pytest.mark.parametrize("text", ["not json", "{", "", "{'type': 'ping'}", '{"type": "ping"'])
def test_not_json_is_bad_message(text: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE


def nested(depth: int) -> str:
    """A subscribe frame whose object is ``depth`` levels deep, counting the frame itself."""
    arrays = depth - 2  # the frame and args are two levels
    value = "[" * arrays + "]" * arrays
    return f'{{"type": "subscribe", "queryId": 1, "name": "echo", "args": {{"v": {value}}}}}'


def test_a_frame_nested_past_the_depth_limit_is_bad_message() -> None:
    assert isinstance(parse_client_message(nested(64)), Subscribe)
    assert isinstance(parse_client_message(nested(8), max_depth=8), Subscribe)
    for frame, limit in ((nested(65), 64), (nested(9), 8), ("[" * 5000, 64)):
        with pytest.raises(BadMessage) as info:
            parse_client_message(frame, max_depth=limit)
        assert info.value.code is ErrorCode.BAD_MESSAGE
        assert info.value.message == f"the frame is nested deeper than {limit} levels"
    # The limit reaches the core from Limits.
    core = connected(limits=Limits(max_json_depth=8, heartbeat_timeout=1000.0))
    assert error_frame(core.receive(nested(9), 1.0))["code"] == "bad_message"


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "subscribe", "queryId": 1, "name": "echo", "args": {"v": "\\ud800"}}',
        '{"type": "subscribe", "queryId": 1, "name": "\\udfff", "args": {}}',
        '{"type": "mutate", "requestId": 1, "name": "echo", "args": {"\\udbff": 1}}',
        '{"type": "ping", "x": 1' + "0" * 5000 + "}",
    ],
)
def test_a_lone_surrogate_or_a_huge_number_is_bad_message(text: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE
    # A surrogate pair written as escapes is one character, and fine.
    assert parse_client_message(msg("subscribe", queryId=1, name="echo", args={"v": "😀"}))


@pytest.mark.parametrize("text", ["[]", '["ping"]', "1", '"ping"', "null", "true"])
def test_not_an_object_is_bad_message(text: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"type": 1}',
        '{"type": null}',
        '{"type": ["ping"]}',
        '{"type": {"a": 1}}',
        '{"Type": "ping"}',
    ],
)
def test_missing_or_wrong_typed_type_is_bad_message(text: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("kind", ["nope", "", "PING", "connected", "pong"])
def test_unknown_type(kind: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg(kind))
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_binary_frame_is_bad_message() -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("ping").encode())
    assert info.value.code is ErrorCode.BAD_MESSAGE


BAD_INTS = ["1", True, False, -1, 1.5, 1.0, 2**60, 2**53, None, [1], {"v": 1}]


@pytest.mark.parametrize("value", BAD_INTS)
@pytest.mark.parametrize("kind", ["authenticate", "refresh"])
def test_auth_version_must_be_a_safe_non_negative_integer(kind: str, value: Any) -> None:
    frame = msg(kind, token="jwt", refreshToken="rt", authVersion=value)
    with pytest.raises(BadMessage) as info:
        parse_client_message(frame)
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_auth_version_missing_is_bad_message() -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("authenticate", token="jwt"))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_auth_version_bounds_accepted() -> None:
    assert parse_client_message(msg("authenticate", token="t", authVersion=0)) == Authenticate(
        "t", 0
    )
    top = 2**53 - 1
    assert parse_client_message(msg("authenticate", token="t", authVersion=top)) == Authenticate(
        "t", top
    )


@pytest.mark.parametrize("value", BAD_INTS)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_query_id_wrong_type(kind: str, value: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg(kind, queryId=value, name="echo", args={}))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.query_id is None  # not known: nothing to carry


@pytest.mark.parametrize("value", BAD_INTS)
def test_request_id_wrong_type(value: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("mutate", requestId=value, name="notes.add", args={}))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.request_id is None


@pytest.mark.parametrize("client_id", ["", "x" * 129, None, 7, True, ["a"], {"a": 1}])
def test_client_id_wrong(client_id: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("connect", clientId=client_id, protocol=1))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_client_id_missing_is_bad_message() -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("connect", protocol=1))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_client_id_of_128_characters_accepted() -> None:
    assert parse_client_message(msg("connect", clientId="x" * 128, protocol=1)) == Connect(
        "x" * 128, 1
    )


@pytest.mark.parametrize("protocol", ["1", True, -1, 1.0, None])
def test_protocol_wrong_type_is_bad_message(protocol: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("connect", clientId="c", protocol=protocol))
    assert info.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("token", [1, 0, True, False, {}, [], ["jwt"], {"jwt": 1}, 1.5])
def test_token_neither_string_nor_null(token: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("authenticate", token=token, authVersion=1))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_authenticate_without_token_field_is_bad_message() -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("authenticate", authVersion=1))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_authenticate_with_null_token_means_anonymous() -> None:
    assert parse_client_message(msg("authenticate", token=None, authVersion=3)) == Authenticate(
        None, 3
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"authVersion": 1},  # no refreshToken
        {"authVersion": 1, "refreshToken": None},
        {"authVersion": 1, "refreshToken": 5},
        {"authVersion": 1, "refreshToken": ""},
        {"authVersion": 1, "refreshToken": "rt", "retryKey": 5},
        {"authVersion": 1, "refreshToken": "rt", "retryKey": ["k"]},
    ],
)
def test_refresh_wrong_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("refresh", **fields))
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_refresh_retry_key_is_optional() -> None:
    assert parse_client_message(msg("refresh", refreshToken="rt", authVersion=2)) == Refresh(
        "rt", 2, None
    )
    key = "k" * 32
    assert parse_client_message(
        msg("refresh", refreshToken="rt", authVersion=2, retryKey=key)
    ) == Refresh("rt", 2, key)


@pytest.mark.parametrize("args", [[], ["a"], "x", 1, True, None])
def test_subscribe_args_not_an_object_carries_query_id(args: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("subscribe", queryId=7, name="echo", args=args))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.query_id == 7
    assert info.value.to_frame() == {
        "type": "error",
        "code": "bad_message",
        "message": info.value.message,
        "queryId": 7,
    }


@pytest.mark.parametrize("args", [[], "x", 1, False, None])
def test_mutate_args_not_an_object_carries_request_id(args: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("mutate", requestId=9, name="notes.add", args=args))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.request_id == 9
    assert info.value.to_frame() == {
        "type": "error",
        "code": "bad_message",
        "message": info.value.message,
        "requestId": 9,
    }


@pytest.mark.parametrize("name", [None, 3, "", "n" * 129, ["echo"]])
def test_subscribe_name_wrong_carries_query_id(name: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("subscribe", queryId=4, name=name, args={}))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.query_id == 4


@pytest.mark.parametrize("name", [None, 3, "", ["notes.add"]])
def test_mutate_name_wrong_carries_request_id(name: Any) -> None:
    with pytest.raises(BadMessage) as info:
        parse_client_message(msg("mutate", requestId=5, name=name, args={}))
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert info.value.request_id == 5


def test_unknown_extra_fields_are_ignored() -> None:
    extra = {"extra": {"nested": [1, 2]}, "x-trace": "abc", "version": "9"}
    assert parse_client_message(msg("connect", clientId="c", protocol=1, **extra)) == Connect(
        "c", 1
    )
    assert parse_client_message(msg("ping", **extra)) == Ping()
    assert parse_client_message(
        msg("subscribe", queryId=1, name="echo", args={"a": 1}, **extra)
    ) == Subscribe(1, "echo", {"a": 1})
    assert parse_client_message(msg("unsubscribe", queryId=1, **extra)) == Unsubscribe(1)
    assert parse_client_message(
        msg("mutate", requestId=2, name="notes.add", args={"text": "x"}, **extra)
    ) == Mutate(2, "notes.add", {"text": "x"})
    assert parse_client_message(msg("authenticate", token=None, authVersion=1, **extra)) == (
        Authenticate(None, 1)
    )


def test_malformed_frames_through_receive_are_error_frames_and_keep_the_connection() -> None:
    core = connected()
    assert error_frame(core.receive("not json", 1.0))["code"] == "bad_message"
    assert error_frame(core.receive(b'{"type":"ping"}', 1.0))["code"] == "bad_message"
    assert error_frame(core.receive(msg("nope"), 1.0))["code"] == "unknown_type"
    frame = error_frame(core.receive(msg("subscribe", queryId=3, name="echo", args=[1]), 1.0))
    assert frame == {
        "type": "error",
        "code": "bad_message",
        "message": frame["message"],
        "queryId": 3,
    }
    frame = error_frame(core.receive(msg("mutate", requestId=8, name="notes.add", args=1), 1.0))
    assert frame == {
        "type": "error",
        "code": "bad_message",
        "message": frame["message"],
        "requestId": 8,
    }
    # still open and working
    assert core.receive(msg("ping"), 2.0) == [Send({"type": "pong", "serverTime": 2000})]


# ============================================================================== connect


@pytest.mark.parametrize(
    "frame",
    [
        msg("ping"),
        msg("subscribe", queryId=1, name="echo", args={}),
        msg("unsubscribe", queryId=1),
        msg("mutate", requestId=1, name="notes.add", args={}),
        msg("authenticate", token="jwt", authVersion=1),
        msg("refresh", refreshToken="rt", authVersion=1),
    ],
)
def test_anything_before_connect_is_not_connected(frame: str) -> None:
    core = new_core()
    actions = core.receive(frame, 1.0)
    assert error_frame(actions)["code"] == "not_connected"
    assert len(actions) == 1  # nothing runs, nothing is verified
    # the connection stays open, and connect still works
    actions = core.receive(msg("connect", clientId="c", protocol=1), 2.0)
    assert only_frame(actions, "connected")["protocol"] == 1


@pytest.mark.parametrize("protocol", [0, 2, 99])
def test_wrong_protocol_closes_4503(protocol: int) -> None:
    core = new_core()
    actions = core.receive(msg("connect", clientId="c", protocol=protocol), 1.0)
    assert len(actions) == 1 and isinstance(actions[0], Close)
    assert actions[0].code == CloseCode.UNSUPPORTED_PROTOCOL == 4503
    assert core.next_deadline() is None
    assert core.receive(msg("ping"), 2.0) == []


def test_connected_frame() -> None:
    core = new_core(now=1_700_000_000.0)
    actions = core.receive(msg("connect", clientId="client-1", protocol=1), 1_700_000_001.2345)
    assert actions == [
        Send(
            {
                "type": "connected",
                "connectionId": "conn-1",
                "serverTime": 1_700_000_001_234,
                "protocol": 1,
            }
        )
    ]
    frame = sent(actions)[0]
    assert type(frame["serverTime"]) is int
    assert json.loads(encode_frame(frame)) == frame


@pytest.mark.parametrize(
    "frame",
    [
        {"type": ServerMessageType.CONNECTED, "connectionId": "c", "serverTime": 1, "protocol": 1},
        {
            "type": ServerMessageType.AUTH_OK,
            "authVersion": 3,
            "identity": {"userId": 'ü\u2028"', "sessionId": "s"},
            "expiresAt": 1_700_000_600,
            "serverTime": 1_700_000_000_123,
            "tokens": {"accessToken": "a.b.c", "refreshToken": "rt1.x", "expiresAt": 2},
        },
        {"type": ServerMessageType.AUTH_OK, "authVersion": 1, "identity": None, "expiresAt": None},
        {"type": ServerMessageType.AUTH_ERROR, "authVersion": 2, "code": "x", "message": "m\n"},
        {"type": ServerMessageType.PONG, "serverTime": 5},
        {"type": ServerMessageType.ERROR, "code": "bad_message", "message": "é", "queryId": 7},
    ],
    ids=lambda f: str(f["type"]),
)
def test_frames_without_raw_values_encode_as_the_general_path_does(frame: dict[str, Any]) -> None:
    """The whole-frame fast path of ``encode_frame`` gives the same text, byte for byte."""
    general: list[str] = []
    core_module._write(frame, general)
    assert encode_frame(frame) == "".join(general)
    assert json.loads(encode_frame(frame)) == frame


def test_connect_deadline() -> None:
    core = new_core(now=100.0)
    assert core.next_deadline() == 110.0
    assert core.on_timer(105.0) == []
    assert core.on_timer(109.999) == []
    actions = core.on_timer(110.0)
    assert len(actions) == 1 and isinstance(actions[0], Close)
    assert actions[0].code == CloseCode.PROTOCOL_VIOLATION == 4500
    assert core.next_deadline() is None
    assert core.receive(msg("connect", clientId="c", protocol=1), 110.5) == []


def test_malformed_frames_do_not_extend_the_connect_deadline() -> None:
    core = new_core(now=0.0)
    core.receive("junk", 5.0)
    core.receive(msg("ping"), 9.0)
    assert core.next_deadline() == 10.0
    assert [a.code for a in core.on_timer(10.0)] == [4500]


def test_connect_in_time_cancels_the_connect_deadline() -> None:
    core = new_core(now=0.0, limits=Limits(heartbeat_timeout=30.0))
    core.receive(msg("connect", clientId="c", protocol=1), 9.0)
    assert core.next_deadline() == 39.0  # the heartbeat, no longer the connect deadline
    assert core.on_timer(10.0) == []


def test_second_connect_is_bad_message() -> None:
    core = connected()
    actions = core.receive(msg("connect", clientId="client-1", protocol=1), 1.0)
    assert error_frame(actions)["code"] == "bad_message"
    assert len(actions) == 1


# ============================================================================== auth


def test_auth_ok_fields_for_authenticate() -> None:
    core = connected()
    actions = core.receive(msg("authenticate", token="jwt-1", authVersion=1), 1.0)
    assert actions == [VerifyToken(1, "jwt-1")]
    actions = core.auth_succeeded(1, ALICE, 2.5)
    assert actions[0] == Send(
        {
            "type": "auth_ok",
            "authVersion": 1,
            "identity": {"userId": "alice", "sessionId": "sess-a"},
            "expiresAt": 100_000,
            "serverTime": 2500,
        }
    )
    assert "tokens" not in sent(actions)[0]
    assert instances(actions, BindSession) == [BindSession("sess-a")]
    assert core.identity == ALICE


def test_auth_ok_fields_for_refresh_carry_tokens() -> None:
    core = connected()
    actions = core.receive(
        msg("refresh", refreshToken="rt-1", authVersion=1, retryKey="k" * 20), 1.0
    )
    assert actions == [RotateRefresh(1, "rt-1", "k" * 20)]
    actions = core.auth_succeeded(1, ALICE, 2.0, tokens=TOKENS)
    assert only_frame(actions, "auth_ok") == {
        "type": "auth_ok",
        "authVersion": 1,
        "identity": {"userId": "alice", "sessionId": "sess-a"},
        "expiresAt": 100_000,
        "serverTime": 2000,
        "tokens": TOKENS,
    }


@pytest.mark.parametrize("version", [5, 4, 0])
def test_auth_version_equal_or_lower_is_bad_message(version: int) -> None:
    core = connected()
    sign_in(core, ALICE, 5, 1.0)
    actions = core.receive(msg("authenticate", token="other", authVersion=version), 2.0)
    assert error_frame(actions)["code"] == "bad_message"
    assert instances(actions, VerifyToken) == []
    assert len(actions) == 1
    assert core.identity == ALICE
    # a refresh is held to the same ordering
    actions = core.receive(msg("refresh", refreshToken="rt", authVersion=version), 2.0)
    assert error_frame(actions)["code"] == "bad_message"
    assert core.identity == ALICE
    # a larger one is still accepted
    assert core.receive(msg("authenticate", token="t6", authVersion=6), 3.0) == [
        VerifyToken(6, "t6")
    ]


def test_auth_version_ordering_counts_refused_and_pending_requests() -> None:
    core = connected()
    core.receive(msg("authenticate", token="t", authVersion=3), 1.0)
    core.auth_failed(3, AuthErrorCode.INVALID_TOKEN, "bad", 1.0)
    actions = core.receive(msg("authenticate", token="t", authVersion=3), 2.0)
    assert error_frame(actions)["code"] == "bad_message"
    core.receive(msg("authenticate", token="t", authVersion=10), 2.0)  # in flight
    actions = core.receive(msg("authenticate", token="t", authVersion=7), 2.0)
    assert error_frame(actions)["code"] == "bad_message"


def test_auth_requests_are_processed_one_at_a_time_in_order() -> None:
    core = connected()
    assert core.receive(msg("authenticate", token="t1", authVersion=1), 1.0) == [
        VerifyToken(1, "t1")
    ]
    assert core.receive(msg("refresh", refreshToken="rt2", authVersion=2), 1.1) == []
    assert core.receive(msg("authenticate", token="t3", authVersion=3), 1.2) == []

    actions = core.auth_succeeded(1, ALICE, 2.0)
    assert only_frame(actions, "auth_ok")["authVersion"] == 1
    assert actions[-1] == RotateRefresh(2, "rt2", None)
    assert instances(actions, VerifyToken) == []

    actions = core.auth_failed(2, AuthErrorCode.REFRESH_INVALID, "unknown refresh token", 3.0)
    assert only_frame(actions, "auth_error")["authVersion"] == 2
    assert actions[-1] == VerifyToken(3, "t3")

    actions = core.auth_succeeded(3, BOB, 4.0)
    assert only_frame(actions, "auth_ok")["authVersion"] == 3
    assert core.identity == BOB


def test_answer_for_a_version_not_in_flight_is_ignored() -> None:
    core = connected()
    assert core.auth_succeeded(1, ALICE, 1.0) == []  # nothing in flight at all
    assert core.auth_failed(1, AuthErrorCode.INVALID_TOKEN, "x", 1.0) == []
    sign_in(core, ALICE, 1, 1.0)
    core.receive(msg("authenticate", token="tb", authVersion=2), 2.0)
    # a late duplicate answer for version 1 cannot overwrite anything
    assert core.auth_succeeded(1, Identity("carol", "sess-c", 0.0, 100.0), 3.0) == []
    assert core.auth_failed(1, AuthErrorCode.INVALID_TOKEN, "x", 3.0) == []
    assert core.identity == ALICE
    core.auth_succeeded(2, BOB, 4.0)
    assert core.identity == BOB
    # and the answer for 2, repeated, is ignored too
    assert core.auth_succeeded(2, ALICE, 5.0) == []
    assert core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "x", 5.0) == []
    assert core.identity == BOB


def test_auth_error_fields_and_the_connection_becomes_anonymous() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    run = subscribe(core, 1, "whoami", now=1.5)
    assert run.identity == ALICE
    generation = core.generation
    core.receive(msg("authenticate", token="bad", authVersion=2), 2.0)
    actions = core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "signature mismatch", 3.0)
    assert norm(actions) == [
        Send(
            {
                "type": "auth_error",
                "authVersion": 2,
                "code": "invalid_token",
                "message": "signature mismatch",
            }
        ),
        UnbindSession("sess-a"),
        RunQueries(generation + 1, None, ((1, "whoami", {}),)),
    ]
    assert core.identity is None
    # still open
    assert core.receive(msg("ping"), 4.0) == [Send({"type": "pong", "serverTime": 4000})]


def test_auth_error_while_anonymous_binds_nothing() -> None:
    core = connected()
    core.receive(msg("refresh", refreshToken="rt", authVersion=1), 1.0)
    actions = core.auth_failed(1, AuthErrorCode.REFRESH_REUSED, "reused", 2.0)
    assert sent(actions) == [
        {"type": "auth_error", "authVersion": 1, "code": "refresh_reused", "message": "reused"}
    ]
    assert instances(actions, UnbindSession) == []
    assert instances(actions, BindSession) == []


def test_authenticate_with_null_token_is_answered_at_once() -> None:
    core = connected()
    actions = core.receive(msg("authenticate", token=None, authVersion=1), 1.0)
    assert actions == [
        Send(
            {
                "type": "auth_ok",
                "authVersion": 1,
                "identity": None,
                "expiresAt": None,
                "serverTime": 1000,
            }
        )
    ]
    sign_in(core, ALICE, 2, 2.0)
    subscribe(core, 1, "whoami", now=2.0)
    generation = core.generation
    actions = core.receive(msg("authenticate", token=None, authVersion=3), 3.0)
    assert norm(actions) == [
        Send(
            {
                "type": "auth_ok",
                "authVersion": 3,
                "identity": None,
                "expiresAt": None,
                "serverTime": 3000,
            }
        ),
        UnbindSession("sess-a"),
        RunQueries(generation + 1, None, ((1, "whoami", {}),)),
    ]
    assert core.identity is None
    assert instances(core.on_timer(200.0), Send) == []  # no expiry pushes for nobody


# ============================================================================== expiry


def test_expiry_notice_and_expiry_at_exact_times() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    run = subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(run.generation, 1, [QueryResult(1, '{"userId":"alice"}')], 1.0)
    generation = core.generation
    # notice = min(60, (100 - 0) / 2) = 50 s before exp → at t=50
    assert core.next_deadline() == 50.0
    assert core.on_timer(49.9) == []
    assert core.on_timer(50.0) == [
        Send({"type": "auth_expiring", "expiresAt": 100_000, "serverTime": 50_000})
    ]
    # pushed once
    assert core.next_deadline() == 105.0
    assert core.on_timer(60.0) == []
    assert core.on_timer(104.99) == []
    assert core.receive(msg("ping"), 104.99) == [Send({"type": "pong", "serverTime": 104_990})]
    actions = core.on_timer(105.0)
    assert norm(actions) == [
        Send({"type": "auth_expired", "expiresAt": 100_000, "serverTime": 105_000}),
        UnbindSession("sess-a"),
        RunQueries(generation + 1, None, ((1, "whoami", {}),)),
    ]
    assert core.identity is None
    assert core.on_timer(200.0) == []


def test_notice_never_more_than_half_the_lifetime() -> None:
    core = connected(timing=Timing(expiry_notice=60.0, clock_leeway=5.0))
    sign_in(core, Identity("u", "s", 1000.0, 1300.0), 1, 1000.0)  # lifetime 300: notice 60
    assert core.next_deadline() == 1240.0
    core2 = connected()
    sign_in(core2, Identity("u", "s", 0.0, 20.0), 1, 0.0)  # lifetime 20: notice 10
    assert core2.next_deadline() == 10.0


def test_identity_adopted_inside_its_notice_window_gets_the_notice_at_once() -> None:
    core = connected()
    actions = sign_in(core, ALICE, 1, 70.0)
    assert [f["type"] for f in sent(actions)] == ["auth_ok", "auth_expiring"]
    assert only_frame(actions, "auth_expiring") == {
        "type": "auth_expiring",
        "expiresAt": 100_000,
        "serverTime": 70_000,
    }
    assert core.on_timer(80.0) == []


def test_replacement_identity_cancels_the_old_pushes() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    generation = core.generation
    # same principal, later exp, before the notice: deadlines move
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 10.0)
    actions = core.auth_succeeded(2, ALICE_LATER, 10.0, tokens=TOKENS)
    assert [f["type"] for f in sent(actions)] == ["auth_ok"]
    assert core.generation == generation
    # ALICE_LATER: notice min(60, 200/2) = 60 → at 140; expired at 205
    assert core.next_deadline() == 140.0
    assert core.on_timer(50.0) == []
    assert core.on_timer(105.0) == []
    assert core.on_timer(139.99) == []
    assert core.on_timer(140.0) == [
        Send({"type": "auth_expiring", "expiresAt": 200_000, "serverTime": 140_000})
    ]
    assert core.on_timer(204.99) == []
    actions = core.on_timer(205.0)
    assert sent(actions) == [{"type": "auth_expired", "expiresAt": 200_000, "serverTime": 205_000}]
    assert core.identity is None


def test_replacement_after_the_notice_gets_its_own_notice() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    assert of_type(core.on_timer(50.0), "auth_expiring")
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 60.0)
    core.auth_succeeded(2, ALICE_LATER, 60.0, tokens=TOKENS)
    assert core.on_timer(105.0) == []  # the old identity's expiry does not fire
    assert core.on_timer(140.0) == [
        Send({"type": "auth_expiring", "expiresAt": 200_000, "serverTime": 140_000})
    ]


def test_replacement_by_another_user_cancels_the_old_pushes() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    bob_later = Identity("bob", "sess-b", 0.0, 300.0)  # notice 60 → 240; expired at 305
    sign_in(core, bob_later, 2, 10.0)
    assert core.on_timer(50.0) == []
    assert core.on_timer(105.0) == []
    assert core.identity == bob_later
    assert of_type(core.on_timer(240.0), "auth_expiring")[0]["expiresAt"] == 300_000


# ============================================================================== check at use


def test_subscribe_after_expiry_runs_anonymously_without_the_timer() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    generation = core.generation
    actions = core.receive(msg("subscribe", queryId=1, name="whoami", args={}), 105.0)
    # the expiry first (with the notice that was never pushed being skipped), then the run
    assert sent(actions)[0] == {
        "type": "auth_expired",
        "expiresAt": 100_000,
        "serverTime": 105_000,
    }
    assert of_type(actions, "auth_expiring") == []
    assert UnbindSession("sess-a") in actions
    assert actions.index(UnbindSession("sess-a")) < len(actions) - 1
    assert norm(actions)[-1] == RunQueries(generation + 1, None, ((1, "whoami", {}),))
    assert core.identity is None


def test_mutate_after_expiry_never_runs_as_the_expired_identity_without_the_timer() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    actions = core.receive(msg("mutate", requestId=1, name="notes.add", args={"text": "hi"}), 150.0)
    # The expiry is noticed at use; the mutate, meant for alice, runs as nobody (lapsed).
    assert [f["type"] for f in sent(actions)] == ["auth_expired", "mutation_result"]
    assert sent(actions)[1]["error"]["code"] == "unauthenticated"
    assert instances(actions, RunMutation) == []


def test_results_computed_under_an_expired_identity_are_dropped() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    run = subscribe(core, 1, "whoami", now=1.0)
    assert run.identity == ALICE
    # the result comes back after exp + leeway, before any timer fired
    actions = core.queries_done(run.generation, 3, [QueryResult(1, '{"userId":"alice"}')], 106.0)
    assert of_type(actions, "transition") == []
    assert sent(actions) == [{"type": "auth_expired", "expiresAt": 100_000, "serverTime": 106_000}]
    assert norm(instances(actions, RunQueries)) == [
        RunQueries(run.generation + 1, None, run.queries)
    ]


def test_identity_just_before_expiry_is_still_used() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    core.on_timer(50.0)
    actions = core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 104.99)
    assert actions == [RunMutation(core.generation, ALICE, 1, "notes.add", {})]


# ============================================================================== principal changes


def test_same_principal_refresh_changes_nothing_else() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    run = subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(run.generation, 1, [QueryResult(1, '{"userId":"alice"}')], 1.0)
    generation = core.generation
    core.receive(msg("refresh", refreshToken="rt-1", authVersion=2), 10.0)
    actions = core.auth_succeeded(2, ALICE_LATER, 11.0, tokens=TOKENS)
    assert actions == [
        Send(
            {
                "type": "auth_ok",
                "authVersion": 2,
                "identity": {"userId": "alice", "sessionId": "sess-a"},
                "expiresAt": 200_000,
                "serverTime": 11_000,
                "tokens": TOKENS,
            }
        )
    ]
    assert core.generation == generation
    assert core.identity == ALICE_LATER
    # results of work started before the refresh are still good
    actions = core.queries_done(run.generation, 2, [QueryResult(1, '{"userId":"alice2"}')], 12.0)
    assert of_type(actions, "transition")


def test_new_session_of_the_same_user_is_a_change() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    generation = core.generation
    actions = sign_in(core, ALICE_OTHER_SESSION, 2, 2.0)
    assert core.generation == generation + 1
    assert norm(actions)[1:] == [
        UnbindSession("sess-a"),
        BindSession("sess-a2"),
        RunQueries(generation + 1, ALICE_OTHER_SESSION, ((1, "whoami", {}),)),
    ]


def test_change_of_user_reruns_only_subscriptions_that_read_the_identity() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    for qid, name, args in ((1, "whoami", {}), (2, "echo", {"x": 1}), (3, "echo", {"x": 2})):
        assert subscribe(core, qid, name, args, now=1.0).identity == ALICE
    core.queries_done(
        core.generation,
        1,
        [
            QueryResult(1, '{"userId":"alice"}'),
            QueryResult(2, '"x=1"', reads_identity=False),
            QueryResult(3, '"x=2 for alice"'),
        ],
        1.0,
    )
    generation = core.generation
    core.receive(msg("authenticate", token="bob", authVersion=2), 2.0)
    actions = core.auth_succeeded(2, BOB, 3.0)
    assert norm(actions) == [
        Send(
            {
                "type": "auth_ok",
                "authVersion": 2,
                "identity": {"userId": "bob", "sessionId": "sess-b"},
                "expiresAt": 100_000,
                "serverTime": 3000,
            }
        ),
        UnbindSession("sess-a"),
        BindSession("sess-b"),
        RunQueries(generation + 1, BOB, ((1, "whoami", {}), (3, "echo", {"x": 2}))),
    ]
    assert core.generation == generation + 1
    # the new results reach the client in one transition
    actions = core.queries_done(
        generation + 1,
        2,
        [QueryResult(1, '{"userId":"bob"}'), QueryResult(3, '"x=2 for bob"')],
        4.0,
    )
    assert encode_frame(only_frame(actions, "transition")) == (
        '{"type":"transition","version":2,"updates":['
        '{"queryId":1,"value":{"userId":"bob"}},{"queryId":3,"value":"x=2 for bob"}]}'
    )


def test_becoming_anonymous_reruns_the_identity_readers() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    subscribe(core, 2, "echo", now=1.0)
    core.queries_done(
        core.generation,
        1,
        [QueryResult(1, "{}"), QueryResult(2, "1", reads_identity=False)],
        1.0,
    )
    actions = core.session_ended("sess-a", SessionEndReason.SIGNED_OUT, 2.0)
    assert norm(instances(actions, RunQueries)) == [
        RunQueries(core.generation, None, ((1, "whoami", {}),))
    ]


# ============================================================================== queries_done


def test_results_from_an_old_generation_are_dropped() -> None:
    core = connected()
    run = subscribe(core, 1, "whoami", now=1.0)  # anonymous, generation 0
    sign_in(core, ALICE, 1, 2.0)
    assert core.generation == run.generation + 1
    assert core.queries_done(run.generation, 5, [QueryResult(1, "null")], 3.0) == []
    actions = core.queries_done(core.generation, 5, [QueryResult(1, '{"userId":"alice"}')], 3.0)
    assert only_frame(actions, "transition")["updates"] == [
        {"queryId": 1, "value": Raw('{"userId":"alice"}')}
    ]


def test_updates_are_grouped_in_one_transition_and_spliced_raw() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    subscribe(core, 3, now=1.0)
    value = '{ "b" : 1, "a" : [1, 2.5, "é"] }'  # spliced as is, not re-encoded
    actions = core.queries_done(
        0,
        7,
        [QueryResult(1, value), QueryResult(2, "null"), QueryResult(3, '"text"')],
        2.0,
    )
    assert actions == [
        Send(
            {
                "type": "transition",
                "version": 7,
                "updates": [
                    {"queryId": 1, "value": Raw(value)},
                    {"queryId": 2, "value": Raw("null")},
                    {"queryId": 3, "value": Raw('"text"')},
                ],
            }
        )
    ]
    text = encode_frame(sent(actions)[0])
    assert text == (
        '{"type":"transition","version":7,"updates":['
        '{"queryId":1,"value":{ "b" : 1, "a" : [1, 2.5, "é"] }},'
        '{"queryId":2,"value":null},{"queryId":3,"value":"text"}]}'
    )
    assert json.loads(text)["updates"][0]["value"] == {"b": 1, "a": [1, 2.5, "é"]}


def test_identical_results_are_not_resent() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    core.queries_done(0, 1, [QueryResult(1, "1"), QueryResult(2, "2")], 2.0)
    assert core.queries_done(0, 2, [QueryResult(1, "1"), QueryResult(2, "2")], 3.0) == []
    actions = core.queries_done(0, 3, [QueryResult(1, "1"), QueryResult(2, "22")], 4.0)
    assert sent(actions) == [
        {"type": "transition", "version": 3, "updates": [{"queryId": 2, "value": Raw("22")}]}
    ]


def test_connections_receiving_the_same_transition_share_one_encoded_send() -> None:
    shared: dict[tuple[Any, ...], Send] = {}
    cores = [connected() for _ in range(3)]
    for core in cores:
        subscribe(core, 1, now=1.0)
        core.queries_done(0, 1, [QueryResult(1, '{"n":0}')], 1.2)
    cores[2].advance_version(7, 1.5)  # this one has already seen version 7
    sends = []
    for core in cores:
        [send] = core.queries_done(0, 5, [QueryResult(1, '{"n":1}')], 2.0, shared)
        assert isinstance(send, Send)
        sends.append(send)
    assert sends[0] is sends[1]  # built and encoded once
    assert sends[2] is not sends[0] and sends[2].frame["version"] == 7
    for send in sends:
        assert send.text == encode_frame(send.frame)
    assert json.loads(sends[0].text or "") == {
        "type": "transition",
        "version": 5,
        "updates": [{"queryId": 1, "value": {"n": 1}}],
    }
    # Errors and several updates at once are shared by what they hold, too.
    pair = [connected() for _ in range(2)]
    for core in pair:
        subscribe(core, 1, now=1.0)
        subscribe(core, 2, now=1.0)
    results = [QueryResult(1, error=("forbidden", "no")), QueryResult(2, "2")]
    first, second = (core.queries_done(0, 6, results, 2.0, shared) for core in pair)
    assert first[0] is second[0]
    assert json.loads(encode_frame(first[0].frame))["updates"] == [
        {"queryId": 1, "error": {"code": "forbidden", "message": "no"}},
        {"queryId": 2, "value": 2},
    ]
    # Without a shared dict nothing is pre-encoded.
    alone = connected()
    subscribe(alone, 1, now=1.0)
    [plain] = alone.queries_done(0, 5, [QueryResult(1, '{"n":1}')], 2.0)
    assert isinstance(plain, Send) and plain.text is None


def test_error_results() -> None:
    core = connected()
    subscribe(core, 1, "whoami", now=1.0)
    subscribe(core, 2, now=1.0)
    actions = core.queries_done(
        0,
        4,
        [
            QueryResult(1, error=("unauthenticated", "sign in first")),
            QueryResult(2, '"ok"'),
        ],
        2.0,
    )
    frame = only_frame(actions, "transition")
    assert frame == {
        "type": "transition",
        "version": 4,
        "updates": [
            {"queryId": 1, "error": {"code": "unauthenticated", "message": "sign in first"}},
            {"queryId": 2, "value": Raw('"ok"')},
        ],
    }
    assert json.loads(encode_frame(frame))["updates"][0] == {
        "queryId": 1,
        "error": {"code": "unauthenticated", "message": "sign in first"},
    }
    # the same error is not re-sent; a different one is; then a value again
    error = QueryResult(1, error=("unauthenticated", "sign in first"))
    assert core.queries_done(0, 5, [error], 3.0) == []
    actions = core.queries_done(0, 6, [QueryResult(1, error=("forbidden", "no"))], 3.0)
    assert only_frame(actions, "transition")["updates"] == [
        {"queryId": 1, "error": {"code": "forbidden", "message": "no"}}
    ]
    actions = core.queries_done(0, 7, [QueryResult(1, "null")], 3.0)
    assert only_frame(actions, "transition")["updates"] == [{"queryId": 1, "value": Raw("null")}]


def test_results_for_unsubscribed_queries_are_dropped() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    # the shell is told to stop evaluating it; an unknown id is silently fine
    assert core.receive(msg("unsubscribe", queryId=1), 1.5) == [DropQuery(1)]
    assert core.receive(msg("unsubscribe", queryId=99), 1.5) == []
    actions = core.queries_done(0, 3, [QueryResult(1, "1"), QueryResult(2, "2")], 2.0)
    assert only_frame(actions, "transition")["updates"] == [{"queryId": 2, "value": Raw("2")}]
    assert core.queries_done(0, 4, [QueryResult(1, "11")], 2.0) == []


def test_versions_never_decrease() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    assert (
        only_frame(core.queries_done(0, 9, [QueryResult(1, "1")], 2.0), "transition")["version"]
        == 9
    )
    # a result computed at an older version arrives later
    assert (
        only_frame(core.queries_done(0, 4, [QueryResult(2, "2")], 3.0), "transition")["version"]
        == 9
    )
    assert (
        only_frame(core.queries_done(0, 12, [QueryResult(1, "3")], 4.0), "transition")["version"]
        == 12
    )
    assert (
        only_frame(core.queries_done(0, 0, [QueryResult(2, "4")], 5.0), "transition")["version"]
        == 12
    )


def test_nothing_changed_sends_nothing() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    assert core.queries_done(0, 1, [], 2.0) == []


# ============================================================================== session_ended


@pytest.mark.parametrize("reason", list(SessionEndReason))
def test_session_ended_for_this_session(reason: SessionEndReason) -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    actions = core.session_ended("sess-a", reason, 2.0)
    assert actions[0] == Send({"type": "session_revoked", "reason": reason.value})
    assert UnbindSession("sess-a") in actions
    assert core.identity is None
    assert core.on_timer(50.0) == []  # no expiry pushes for the ended identity
    assert core.on_timer(105.0) == []


def test_session_ended_for_another_session_does_nothing() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    assert core.session_ended("sess-b", SessionEndReason.SIGNED_OUT, 2.0) == []
    assert core.identity == ALICE
    anonymous = connected()
    assert anonymous.session_ended("sess-a", SessionEndReason.REVOKED, 2.0) == []


# ============================================================================== subscriptions


def test_every_run_gets_the_arguments_resolve_returned() -> None:
    """Arguments are validated once, by ``resolve``, and nothing validates them again: what it
    returns (the function's keyword arguments: an integer made a float, say) is what the first
    run, the re-runs and a mutation get, never the client's ``args`` as they came."""

    def resolving(kind: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {**resolve(kind, name, args), "resolved": True}

    core = ConnectionCore(
        connection_id="conn-1", now=0.0, timing=TIMING, limits=QUIET, resolve=resolving
    )
    only_frame(core.receive(msg("connect", clientId="client-1", protocol=1), 0.0), "connected")
    run = subscribe(core, 1, "echo", {"x": 2})
    assert run.queries == ((1, "echo", {"x": 2, "resolved": True}),)
    # Signing in re-runs the subscription (its result may read the identity) with the same.
    (rerun,) = instances(sign_in(core, ALICE, 1, 1.0), RunQueries)
    assert rerun.queries == run.queries
    actions = core.receive(msg("mutate", requestId=1, name="notes.add", args={"t": "hi"}), 1.0)
    assert actions == [
        RunMutation(core.generation, ALICE, 1, "notes.add", {"t": "hi", "resolved": True})
    ]


def test_duplicate_query_id() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    actions = core.receive(msg("subscribe", queryId=1, name="whoami", args={}), 2.0)
    frame = error_frame(actions)
    assert frame == {
        "type": "error",
        "code": "duplicate_query_id",
        "message": frame["message"],
        "queryId": 1,
    }
    assert instances(actions, RunQueries) == []
    # after unsubscribing, the id is free again
    core.receive(msg("unsubscribe", queryId=1), 3.0)
    subscribe(core, 1, "whoami", now=3.0)


def test_subscription_limit() -> None:
    core = connected(limits=Limits(max_subscriptions=2, heartbeat_timeout=1000.0))
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    actions = core.receive(msg("subscribe", queryId=3, name="echo", args={}), 2.0)
    frame = error_frame(actions)
    assert frame == {
        "type": "error",
        "code": "limit_exceeded",
        "message": frame["message"],
        "queryId": 3,
    }
    assert len(actions) == 1
    core.receive(msg("unsubscribe", queryId=1), 3.0)
    subscribe(core, 3, now=3.0)


# ---------------------------------------------------------------- the connection's result budget

#: A budget of 1000 characters: two results of 400 fit (2 × (400 + 64) + 64 = 992), three not.
BUDGET = Limits(heartbeat_timeout=1000.0, max_result_chars=1000)


def _text(chars: int) -> str:
    """JSON text of ``chars`` characters (a string value)."""
    return json.dumps("x" * (chars - 2))


def _frame_chars(actions: list[Any]) -> list[int]:
    """The encoded length of every frame sent, as the shell would write it."""
    return [len(encode_frame(a.frame)) for a in actions if isinstance(a, Send)]


def test_a_subscribe_whose_first_result_does_not_fit_is_refused_and_holds_nothing() -> None:
    core = connected(limits=BUDGET)
    for query_id in (1, 2, 3):
        subscribe(core, query_id, now=1.0)
    results = [QueryResult(query_id, _text(400)) for query_id in (1, 2, 3)]
    actions = core.queries_done(0, 5, results, 2.0)
    refusal = error_frame(actions)
    assert (refusal["code"], refusal["queryId"]) == ("limit_exceeded", 3)
    assert DropQuery(3) in actions
    # The refusal comes before the transition, which carries the two that fit.
    kinds = [a.frame["type"] for a in actions if isinstance(a, Send)]
    assert kinds == ["error", "transition"]
    assert [u["queryId"] for u in only_frame(actions, "transition")["updates"]] == [1, 2]
    assert max(_frame_chars(actions)) <= 1000
    assert sorted(core.subscriptions) == [1, 2]
    # A late result for the refused query is ignored.
    assert core.queries_done(0, 6, [QueryResult(3, _text(10))], 2.5) == []
    # An unsubscribe frees what its result took; the refused queryId is free again.
    core.receive(msg("unsubscribe", queryId=1), 3.0)
    subscribe(core, 3, now=3.0)
    actions = core.queries_done(0, 7, [QueryResult(3, _text(400))], 3.0)
    assert only_frame(actions, "transition")["updates"] == [
        {"queryId": 3, "value": Raw(_text(400))}
    ]
    # Full again: even a small first result does not fit now.
    subscribe(core, 4, now=4.0)
    actions = core.queries_done(0, 8, [QueryResult(4, _text(10))], 4.0)
    assert error_frame(actions)["queryId"] == 4


def test_a_result_that_grows_past_the_budget_ends_its_subscription() -> None:
    core = connected(limits=BUDGET)
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    core.queries_done(0, 5, [QueryResult(1, _text(400)), QueryResult(2, _text(400))], 2.0)
    # 2 grows to 600: 464 + 664 + 64 > 1000. It ends; 1 is untouched and nothing else is sent.
    actions = core.queries_done(0, 6, [QueryResult(2, _text(600))], 3.0)
    refusal = error_frame(actions)
    assert (refusal["code"], refusal["queryId"]) == ("limit_exceeded", 2)
    assert "ended" in refusal["message"]
    assert DropQuery(2) in actions and of_type(actions, "transition") == []
    assert sorted(core.subscriptions) == [1]
    # What shrinks in the same delivery makes room: 1 shrinks to 10, 3 grows to 780.
    subscribe(core, 3, now=4.0)
    core.queries_done(0, 7, [QueryResult(3, _text(10))], 4.0)
    actions = core.queries_done(0, 8, [QueryResult(3, _text(780)), QueryResult(1, _text(10))], 5.0)
    assert of_type(actions, "error") == []
    updates = only_frame(actions, "transition")["updates"]
    assert [u["queryId"] for u in updates] == [3, 1]  # in the order given
    assert max(_frame_chars(actions)) <= 1000


def test_a_refused_first_result_releases_the_mutation_result_it_held() -> None:
    core = connected(limits=BUDGET)
    subscribe(core, 1, now=1.0)
    core.queries_done(0, 3, [QueryResult(1, _text(10))], 1.0)
    subscribe(core, 2, now=1.5)
    core.receive(msg("mutate", requestId=9, name="notes.add", args={}), 2.0)
    # Read your writes: held while subscription 2 has had no result.
    assert core.mutation_done(0, 9, 2.0, value_json='"n1"', version=4) == []
    actions = core.queries_done(0, 4, [QueryResult(2, _text(2000))], 3.0)
    assert error_frame(actions)["queryId"] == 2
    assert only_frame(actions, "transition") == {"type": "transition", "version": 4, "updates": []}
    assert only_frame(actions, "mutation_result")["requestId"] == 9


def test_a_connection_without_subscriptions_advances_without_a_transition() -> None:
    """Read your writes binds the subscriptions a connection holds: with none, advancing to a
    commit's version sends nothing, and the mutation's result goes out at once."""
    core = connected()
    core.receive(msg("mutate", requestId=9, name="notes.add", args={}), 2.0)
    assert core.advance_version(7, 2.0) == []
    assert core.version == 7
    actions = core.mutation_done(0, 9, 2.0, value_json='"n1"', version=7)
    assert only_frame(actions, "mutation_result")["version"] == 7
    # A first result at the same version is still sent: the subscription is new.
    subscribe(core, 1, now=2.5)
    actions = core.queries_done(0, 7, [QueryResult(1, _text(3))], 2.5)
    assert only_frame(actions, "transition")["version"] == 7


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(1, 5),
                st.one_of(st.integers(2, 900), st.just(-1)),  # -1: an error result
            ),
            max_size=5,
            unique_by=lambda pair: pair[0],
        ),
        max_size=12,
    )
)
def test_no_frame_is_over_the_budget_whatever_the_results(
    deliveries: list[list[tuple[int, int]]],
) -> None:
    core = connected(limits=BUDGET)
    for query_id in range(1, 6):
        subscribe(core, query_id, now=1.0)
    for version, delivery in enumerate(deliveries, start=2):
        results = [
            QueryResult(q, None, ("invalid", "m" * 40)) if size < 0 else QueryResult(q, _text(size))
            for q, size in delivery
        ]
        actions = core.queries_done(0, version, results, 2.0)
        event(f"refused: {bool(of_type(actions, 'error'))}")
        assert all(chars <= 1000 for chars in _frame_chars(actions))
        # The running total is what the current results take, and within the budget.
        subs = core.subscriptions.values()
        assert core.result_chars == sum(sub.size for sub in subs) <= 1000 - 64
        for sub in subs:
            assert sub.size == (0 if sub.last_value is None else len(sub.last_value) + 64)
        # A transition carrying every current result would fit too.
        every = [
            {"queryId": q, "value": Raw(sub.last_value)}
            for q, sub in core.subscriptions.items()
            if sub.last_value is not None and not sub.last_value.startswith("\x00")
        ]
        errors = [
            {"queryId": q, "error": {"code": "invalid", "message": "m" * 40}}
            for q, sub in core.subscriptions.items()
            if sub.last_value is not None and sub.last_value.startswith("\x00")
        ]
        whole = {"type": "transition", "version": 2**53 - 1, "updates": every + errors}
        assert len(encode_frame(whole)) <= 1000


@pytest.mark.parametrize("name", ["nope", "notes.add", "Echo"])
def test_subscribe_unknown_function(name: str) -> None:
    core = connected()
    actions = core.receive(msg("subscribe", queryId=5, name=name, args={}), 1.0)
    frame = error_frame(actions)
    assert frame == {
        "type": "error",
        "code": "unknown_function",
        "message": frame["message"],
        "queryId": 5,
    }
    assert len(actions) == 1
    # the id was not taken
    subscribe(core, 5, now=2.0)


def test_subscribe_bad_args() -> None:
    core = connected()
    actions = core.receive(msg("subscribe", queryId=5, name="echo", args={"invalid": True}), 1.0)
    frame = error_frame(actions)
    assert frame == {
        "type": "error",
        "code": "bad_args",
        "message": frame["message"],
        "queryId": 5,
    }
    assert len(actions) == 1


def test_subscribe_runs_under_the_current_identity() -> None:
    core = connected()
    run = subscribe(core, 1, "echo", {"a": 1}, now=1.0)
    assert (run.generation, run.identity, run.queries) == (0, None, ((1, "echo", {"a": 1}),))
    sign_in(core, ALICE, 1, 2.0)
    run = subscribe(core, 2, "whoami", now=2.0)
    assert (run.generation, run.identity, run.queries) == (
        core.generation,
        ALICE,
        ((2, "whoami", {}),),
    )


@pytest.mark.parametrize(
    ("name", "args", "code"),
    [
        ("nope", {}, "unknown_function"),
        ("whoami", {}, "unknown_function"),  # a query used with mutate
        ("notes.add", {"invalid": True}, "bad_args"),
    ],
)
def test_mutate_rejected(name: str, args: dict[str, Any], code: str) -> None:
    core = connected()
    actions = core.receive(msg("mutate", requestId=4, name=name, args=args), 1.0)
    frame = error_frame(actions)
    assert frame == {"type": "error", "code": code, "message": frame["message"], "requestId": 4}
    assert len(actions) == 1


def test_mutation_limit_and_mutation_done_frees_a_slot() -> None:
    core = connected(limits=Limits(max_pending_mutations=2, heartbeat_timeout=1000.0))
    sign_in(core, ALICE, 1, 1.0)
    generation = core.generation
    assert core.receive(msg("mutate", requestId=1, name="notes.add", args={"text": "a"}), 2.0) == [
        RunMutation(generation, ALICE, 1, "notes.add", {"text": "a"})
    ]
    assert core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 2.0) == [
        RunMutation(generation, ALICE, 2, "notes.add", {})
    ]
    actions = core.receive(msg("mutate", requestId=3, name="notes.add", args={}), 2.0)
    frame = error_frame(actions)
    assert frame == {
        "type": "error",
        "code": "limit_exceeded",
        "message": frame["message"],
        "requestId": 3,
    }
    assert len(actions) == 1

    core.advance_version(5, 3.0)  # the endpoint's read-your-writes step
    actions = core.mutation_done(generation, 1, 3.0, value_json='"note-1"', version=5)
    assert actions == [
        Send({"type": "mutation_result", "requestId": 1, "value": Raw('"note-1"'), "version": 5})
    ]
    assert encode_frame(sent(actions)[0]) == (
        '{"type":"mutation_result","requestId":1,"value":"note-1","version":5}'
    )
    assert core.receive(msg("mutate", requestId=3, name="notes.add", args={}), 4.0) == [
        RunMutation(generation, ALICE, 3, "notes.add", {})
    ]


def test_mutation_result_error() -> None:
    core = connected()
    core.receive(msg("mutate", requestId=7, name="notes.add", args={}), 1.0)
    actions = core.mutation_done(0, 7, 2.0, error=("unauthenticated", "sign in first"))
    assert actions == [
        Send(
            {
                "type": "mutation_result",
                "requestId": 7,
                "error": {"code": "unauthenticated", "message": "sign in first"},
            }
        )
    ]
    assert json.loads(encode_frame(sent(actions)[0])) == {
        "type": "mutation_result",
        "requestId": 7,
        "error": {"code": "unauthenticated", "message": "sign in first"},
    }


# ============================================================================== limits


def test_message_rate_limit_and_window_reset() -> None:
    core = connected(now=0.0, limits=Limits(message_rate=(5, 10.0), heartbeat_timeout=1000.0))
    # connect was message 1 of the window that started at t=0
    for t in (1.0, 2.0, 3.0, 4.0):
        assert core.receive(msg("ping"), t) == [Send({"type": "pong", "serverTime": ms(t)})]
    actions = core.receive(msg("ping"), 5.0)  # the 6th
    frame = error_frame(actions)
    assert frame["code"] == "rate_limited"
    assert len(actions) == 1
    # a rate-limited message is not processed, even a valid subscribe
    actions = core.receive(msg("subscribe", queryId=1, name="echo", args={}), 9.99)
    assert error_frame(actions)["code"] == "rate_limited"
    assert instances(actions, RunQueries) == []
    # the window resets 10 s after it started
    assert core.receive(msg("ping"), 10.0) == [Send({"type": "pong", "serverTime": 10_000})]


def test_too_many_rate_violations_close_4429() -> None:
    limits = Limits(message_rate=(1, 10.0), max_rate_violations=3, heartbeat_timeout=1000.0)
    core = connected(limits=limits)
    for t in (1.0, 2.0, 3.0):
        assert error_frame(core.receive(msg("ping"), t))["code"] == "rate_limited"
    actions = core.receive(msg("ping"), 4.0)
    assert len(actions) == 1 and isinstance(actions[0], Close)
    assert actions[0].code == CloseCode.RATE_LIMITED == 4429
    assert core.receive(msg("ping"), 20.0) == []
    assert core.next_deadline() is None


@pytest.mark.parametrize("opened", [False, True])
def test_stream_of_malformed_messages_closes_4500(opened: bool) -> None:
    limits = Limits(max_bad_messages=3, heartbeat_timeout=1000.0)
    core = connected(limits=limits) if opened else new_core(limits=limits)
    for i in range(3):
        assert error_frame(core.receive(f"junk {i}", 1.0 + i))["code"] == "bad_message"
    actions = core.receive(b"\x00", 5.0)
    assert len(actions) == 1 and isinstance(actions[0], Close)
    assert actions[0].code == CloseCode.PROTOCOL_VIOLATION == 4500
    assert core.receive(msg("ping"), 6.0) == []


def test_heartbeat_timeout_and_ping() -> None:
    core = new_core(limits=Limits(heartbeat_timeout=30.0))
    core.receive(msg("connect", clientId="c", protocol=1), 0.0)
    assert core.next_deadline() == 30.0
    assert core.on_timer(19.9) == []
    actions = core.receive(msg("ping"), 20.0)
    assert actions == [Send({"type": "pong", "serverTime": 20_000})]
    assert core.next_deadline() == 50.0
    assert core.on_timer(30.0) == []
    assert core.on_timer(49.99) == []
    actions = core.on_timer(50.0)
    assert len(actions) == 1 and isinstance(actions[0], Close)
    assert actions[0].code == CloseCode.HEARTBEAT_TIMEOUT == 4009
    assert core.next_deadline() is None


def test_any_frame_counts_as_a_heartbeat() -> None:
    core = new_core(limits=Limits(heartbeat_timeout=30.0))
    core.receive(msg("connect", clientId="c", protocol=1), 0.0)
    core.receive(msg("unsubscribe", queryId=1), 25.0)
    assert core.next_deadline() == 55.0
    assert core.on_timer(30.0) == []


def test_heartbeat_deadline_is_earlier_than_expiry_when_due_first() -> None:
    core = new_core(limits=Limits(heartbeat_timeout=30.0))
    core.receive(msg("connect", clientId="c", protocol=1), 0.0)
    sign_in(core, ALICE, 1, 1.0)
    assert core.next_deadline() == 31.0  # heartbeat (1 + 30) before the notice (50)


def test_auth_rate_limit() -> None:
    core = connected(limits=Limits(auth_rate=(2, 60.0), heartbeat_timeout=1000.0))
    sign_in(core, ALICE, 1, 1.0)
    sign_in(core, ALICE_LATER, 2, 2.0)
    actions = core.receive(msg("refresh", refreshToken="rt", authVersion=3), 3.0)
    assert actions[0] == Send(
        {
            "type": "auth_error",
            "authVersion": 3,
            "code": "rate_limited",
            "message": sent(actions)[0]["message"],
        }
    )
    assert instances(actions, RotateRefresh) == []
    # rate_limited is transient (contract §5 rule 2): the identity held stays
    assert UnbindSession("sess-a") not in actions
    assert core.identity == ALICE_LATER
    # the window passes
    assert core.receive(msg("authenticate", token="t", authVersion=4), 61.0) == [
        VerifyToken(4, "t")
    ]


def test_max_pending_auth() -> None:
    """Past max_pending_auth a request is refused with rate_limited, in its turn: every auth
    request gets exactly one answer, in the order the requests were sent."""
    core = connected(limits=Limits(max_pending_auth=2, heartbeat_timeout=1000.0))
    assert core.receive(msg("authenticate", token="t", authVersion=1), 1.0) == [VerifyToken(1, "t")]
    # queued behind the one in flight
    assert core.receive(msg("authenticate", token="t", authVersion=2), 1.0) == []
    assert core.receive(msg("authenticate", token="t", authVersion=3), 1.0) == []
    assert core.receive(msg("authenticate", token="t", authVersion=4), 1.0) == []
    actions = core.auth_failed(1, AuthErrorCode.INVALID_TOKEN, "bad", 1.1)
    assert [f["authVersion"] for f in sent(actions)] == [1]
    assert instances(actions, VerifyToken) == [VerifyToken(2, "t")]
    actions = core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "bad", 1.2)
    assert instances(actions, VerifyToken) == [VerifyToken(3, "t")]
    actions = core.auth_failed(3, AuthErrorCode.INVALID_TOKEN, "bad", 1.3)
    frames = of_type(actions, "auth_error")
    assert [f["authVersion"] for f in frames] == [3, 4]
    assert frames[1] == {
        "type": "auth_error",
        "authVersion": 4,
        "code": "rate_limited",
        "message": frames[1]["message"],
    }
    assert instances(actions, VerifyToken) == []


def test_auth_rate_violations_count_toward_close_4429() -> None:
    limits = Limits(auth_rate=(1, 60.0), max_rate_violations=2, heartbeat_timeout=1000.0)
    core = connected(limits=limits)
    sign_in(core, ALICE, 1, 1.0)
    for version in (2, 3):
        actions = core.receive(msg("authenticate", token="t", authVersion=version), 2.0)
        assert only_frame(actions, "auth_error")["code"] == "rate_limited"
    actions = core.receive(msg("authenticate", token="t", authVersion=4), 2.0)
    assert [a.code for a in instances(actions, Close)] == [4429]


# ============================================================================== close


def test_close_releases_the_session_and_is_idempotent() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, now=1.0)
    assert core.close() == [UnbindSession("sess-a")]
    assert core.close() == []
    assert core.close() == []
    assert core.next_deadline() is None
    assert core.receive(msg("ping"), 2.0) == []
    assert core.on_timer(200.0) == []
    assert core.session_ended("sess-a", SessionEndReason.SIGNED_OUT, 3.0) == []
    assert core.queries_done(core.generation, 3, [QueryResult(1, "1")], 3.0) == []


def test_close_of_an_anonymous_or_unconnected_connection_releases_nothing() -> None:
    assert connected().close() == []
    core = new_core()
    assert core.close() == []
    assert core.close() == []


def test_close_after_a_protocol_close_still_releases_the_session() -> None:
    core = new_core(limits=Limits(heartbeat_timeout=30.0))
    core.receive(msg("connect", clientId="c", protocol=1), 0.0)
    sign_in(core, ALICE, 1, 1.0)
    assert [a.code for a in core.on_timer(31.0)] == [4009]
    assert core.close() == [UnbindSession("sess-a")]
    assert core.close() == []


def test_answers_after_close_are_ignored() -> None:
    core = connected()
    core.receive(msg("authenticate", token="t", authVersion=1), 1.0)
    core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 1.0)
    assert core.close() == []
    assert core.auth_succeeded(1, ALICE, 2.0) == []
    assert core.identity is None
    assert core.mutation_done(0, 1, 2.0, value_json="1", version=1) == []
    assert core.close() == []


# ============================================================== regressions: bugs these tests found


def test_identity_expired_when_verified_is_refused_with_token_expired() -> None:
    core = connected()
    core.receive(msg("authenticate", token="old", authVersion=1), 100.0)
    assert core.receive(msg("authenticate", token="new", authVersion=2), 100.0) == []
    actions = core.auth_succeeded(1, ALICE, 106.0)  # ALICE ends at 105
    frame = only_frame(actions, "auth_error")
    assert frame == {
        "type": "auth_error",
        "authVersion": 1,
        "code": "token_expired",
        "message": frame["message"],
    }
    assert actions[-1] == VerifyToken(2, "new")


def test_queued_anonymous_authenticates_are_answered_in_order() -> None:
    core = connected()
    core.receive(msg("authenticate", token="t", authVersion=1), 1.0)
    assert core.receive(msg("authenticate", token=None, authVersion=2), 1.0) == []
    assert core.receive(msg("authenticate", token=None, authVersion=3), 1.0) == []
    actions = core.auth_succeeded(1, ALICE, 2.0)
    versions = [f["authVersion"] for f in sent(actions) if f["type"] == "auth_ok"]
    assert versions == [1, 2, 3]


def test_older_answer_cannot_undo_a_newer_auth_error() -> None:
    core = connected(limits=Limits(heartbeat_timeout=1000.0))
    assert core.receive(msg("authenticate", token="t", authVersion=1), 1.0) == [VerifyToken(1, "t")]
    # Queued behind the request in flight, never answered before it.
    assert core.receive(msg("authenticate", token="t2", authVersion=2), 1.0) == []
    actions = core.auth_succeeded(1, ALICE, 2.0)
    assert of_type(actions, "auth_ok") and VerifyToken(2, "t2") in actions
    actions = core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "bad", 3.0)
    assert [f["authVersion"] for f in sent(actions)] == [2]
    assert UnbindSession(ALICE.session_id) in actions
    # the newer answer (anonymous) is the one in force; a late answer for 1 changes nothing
    assert core.identity is None
    assert core.auth_succeeded(1, ALICE, 4.0) == []
    assert core.identity is None


def test_result_of_a_replaced_subscription_is_not_sent_for_its_successor() -> None:
    core = connected()
    old = subscribe(core, 1, "echo", {"x": 1}, now=1.0)
    core.receive(msg("unsubscribe", queryId=1), 1.1)
    new = subscribe(core, 1, "echo", {"x": 2}, now=1.2)
    # The shell hands back the serial of the run each result belongs to.
    stale = QueryResult(1, '"result for x=1"', serial=old.serials[0])
    actions = core.queries_done(old.generation, 3, [stale], 2.0)
    assert of_type(actions, "transition") == []
    fresh = QueryResult(1, '"result for x=2"', serial=new.serials[0])
    actions = core.queries_done(new.generation, 3, [fresh], 2.1)
    assert only_frame(actions, "transition")["updates"] == [
        {"queryId": 1, "value": Raw('"result for x=2"')}
    ]


def test_each_run_carries_the_serials_of_its_subscriptions() -> None:
    core = connected()
    first = subscribe(core, 1, "whoami", now=1.0)
    second = subscribe(core, 2, "whoami", now=1.0)
    assert len(first.serials) == len(second.serials) == 1
    assert first.serials != second.serials
    # a re-run after a change of identity hands back the same serials, query by query
    actions = sign_in(core, ALICE, 1, 2.0)
    (rerun,) = instances(actions, RunQueries)
    assert rerun.queries == ((1, "whoami", {}), (2, "whoami", {}))
    assert rerun.serials == first.serials + second.serials
    results = [
        QueryResult(qid, f'"{qid}"', serial=serial)
        for (qid, _, _), serial in zip(rerun.queries, rerun.serials, strict=True)
    ]
    actions = core.queries_done(rerun.generation, 2, results, 3.0)
    assert [u["queryId"] for u in only_frame(actions, "transition")["updates"]] == [1, 2]


def test_result_without_a_serial_is_matched_by_query_id() -> None:
    core = connected()
    run = subscribe(core, 1, now=1.0)
    actions = core.queries_done(run.generation, 1, [QueryResult(1, "5")], 2.0)
    assert only_frame(actions, "transition")["updates"] == [{"queryId": 1, "value": Raw("5")}]


def test_value_whose_text_equals_the_error_key_is_sent() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    core.queries_done(0, 1, [QueryResult(1, error=("invalid", "bad"))], 2.0)
    text = '{"error": ["invalid", "bad"]}'
    actions = core.queries_done(0, 2, [QueryResult(1, text)], 3.0)
    assert only_frame(actions, "transition")["updates"] == [{"queryId": 1, "value": Raw(text)}]


# ============================================================================== property


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_ids = st.one_of(st.integers(min_value=0, max_value=4), st.integers(-2, 2**54), _json_values)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "clientId": st.one_of(st.just("client-1"), st.text(max_size=3), _json_values),
    "protocol": st.one_of(st.just(1), st.just(1), _json_values),
    "token": st.one_of(st.just("jwt"), st.none(), _json_values),
    "authVersion": st.one_of(st.integers(min_value=0, max_value=20), _ids),
    "refreshToken": st.one_of(st.just("rt"), _json_values),
    "retryKey": st.one_of(st.none(), st.just("k" * 16), _json_values),
    "queryId": _ids,
    "requestId": _ids,
    "name": st.one_of(st.sampled_from(["whoami", "echo", "notes.add", "nope", ""]), _json_values),
    "args": st.one_of(
        st.dictionaries(
            st.sampled_from(["x", "invalid", "text"]),
            st.one_of(st.booleans(), st.integers(), st.text(max_size=3)),
            max_size=2,
        ),
        _json_values,
    ),
    "extra": _json_values,
}
_TYPES = st.one_of(
    st.sampled_from(
        ["connect", "authenticate", "refresh", "subscribe", "unsubscribe", "mutate", "ping"]
    ),
    st.sampled_from(["", "nope", "connected"]),
    _json_values,
)


@st.composite
def _object_frames(draw: st.DrawFn) -> str:
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        doc["type"] = draw(_TYPES)
    for name, strategy in _FIELDS.items():
        if draw(st.integers(0, 3)) > 0:
            doc[name] = draw(strategy)
    return json.dumps(doc)


_names = st.sampled_from(["whoami", "echo", "notes.add", "nope"])
_args = st.dictionaries(
    st.sampled_from(["x", "invalid", "text"]),
    st.one_of(st.booleans(), st.integers(0, 3)),
    max_size=2,
)
# Well-formed messages, so that runs get past connect and into auth, expiry and results.
_valid_frames = st.one_of(
    st.just(msg("connect", clientId="client-1", protocol=1)),
    st.just(msg("ping")),
    st.builds(
        lambda token, version: msg("authenticate", token=token, authVersion=version),
        st.sampled_from(["jwt", None]),
        st.integers(0, 30),
    ),
    st.builds(
        lambda version: msg("refresh", refreshToken="rt", authVersion=version),
        st.integers(0, 30),
    ),
    st.builds(
        lambda qid, name, args: msg("subscribe", queryId=qid, name=name, args=args),
        st.integers(0, 4),
        _names,
        _args,
    ),
    st.builds(lambda qid: msg("unsubscribe", queryId=qid), st.integers(0, 4)),
    st.builds(
        lambda rid, name, args: msg("mutate", requestId=rid, name=name, args=args),
        st.integers(0, 4),
        _names,
        _args,
    ),
)
_frames = st.one_of(
    _valid_frames,
    _valid_frames,
    _valid_frames,
    _object_frames(),
    _object_frames(),
    st.text(max_size=20),
    st.binary(max_size=12),
    _json_values.map(json.dumps),
)

_answers = st.tuples(
    st.booleans(),  # success (auth, mutation) or a value rather than an error (queries)
    st.sampled_from(["alice", "bob"]),  # the verified user
    st.floats(-10.0, 300.0),  # the verified token's remaining lifetime
    st.integers(0, 50),  # the database version of a result
    st.booleans(),  # reads_identity
)
_ops = st.one_of(
    st.tuples(st.just("frame"), _frames),
    st.tuples(st.just("frame"), _frames),
    st.tuples(st.just("frame"), _valid_frames),
    st.tuples(st.just("frame"), _valid_frames),
    st.tuples(st.just("answer"), _answers),
    st.tuples(st.just("answer"), _answers),
    st.tuples(st.just("answer"), _answers),
    st.tuples(st.just("timer"), st.none()),
    st.tuples(st.just("deadline"), st.none()),
    st.tuples(st.just("session_end"), st.sampled_from(["alice", "bob"])),
    st.tuples(st.just("close"), st.none()),
)


# Mostly small steps, so that runs live long enough to reach auth, results and expiry.
_time_steps = st.one_of(st.floats(0.0, 2.0), st.floats(0.0, 2.0), st.floats(0.0, 80.0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    connect_first=st.sampled_from([True, True, True, False]),
    steps=st.lists(st.tuples(_ops, _time_steps), min_size=10, max_size=60),
)
def test_random_input_never_raises_and_every_frame_encodes(
    connect_first: bool, steps: list[tuple[tuple[str, Any], float]]
) -> None:
    limits = Limits(
        max_subscriptions=3,
        max_pending_auth=2,
        max_pending_mutations=2,
        message_rate=(30, 10.0),
        auth_rate=(4, 60.0),
        max_rate_violations=4,
        max_bad_messages=12,
        heartbeat_timeout=600.0,
    )
    core = new_core(now=0.0, limits=limits)
    now = 0.0
    pending: list[Any] = []  # work handed to the shell, answered oldest first
    last_version = -1

    def check(actions: list[Any]) -> None:
        nonlocal last_version
        assert isinstance(actions, list)
        for action in actions:
            assert isinstance(action, ACTION_TYPES), action
            if isinstance(action, Send):
                frame = action.frame
                assert isinstance(frame, dict)
                assert isinstance(frame.get("type"), str)
                decoded = json.loads(encode_frame(frame))
                assert decoded["type"] == frame["type"]
                event(f"sent {frame['type']}")  # how deep runs get: --hypothesis-show-statistics
                if frame["type"] == "transition":
                    assert frame["version"] >= last_version  # versions only grow
                    last_version = frame["version"]
            elif isinstance(action, Close):
                assert 1000 <= action.code <= 4999
                event(f"close {action.code}")
            elif isinstance(action, VerifyToken | RotateRefresh | RunQueries | RunMutation):
                pending.append(action)
        deadline = core.next_deadline()
        assert deadline is None or isinstance(deadline, float)

    def answer(work: Any, ok: bool, user: str, lifetime: float, version: int, reads: bool) -> None:
        if isinstance(work, VerifyToken | RotateRefresh):
            if ok:
                identity = Identity(user, f"sess-{user}", now - 1.0, now + lifetime)
                tokens = TOKENS if isinstance(work, RotateRefresh) else None
                check(core.auth_succeeded(work.auth_version, identity, now, tokens))
            else:
                check(core.auth_failed(work.auth_version, AuthErrorCode.INVALID_TOKEN, "no", now))
        elif isinstance(work, RunQueries):
            serials = work.serials or (None,) * len(work.queries)  # as the shell hands back
            results = [
                QueryResult(qid, json.dumps([name, version]), reads_identity=reads, serial=serial)
                if ok
                else QueryResult(qid, error=("invalid", "no"), reads_identity=reads, serial=serial)
                for (qid, name, _), serial in zip(work.queries, serials, strict=True)
            ]
            check(core.queries_done(work.generation, version, results, now))
        elif ok:
            check(
                core.mutation_done(
                    work.generation, work.request_id, now, value_json='"ok"', version=version
                )
            )
        else:
            check(core.mutation_done(work.generation, work.request_id, now, error=("x", "y")))

    if connect_first:
        check(core.receive(msg("connect", clientId="client-1", protocol=1), now))
    for (op, arg), dt in steps:
        now += dt
        if op == "frame":
            check(core.receive(arg, now))
        elif op == "answer" and pending:
            answer(pending.pop(0), *arg)
        elif op == "timer":
            check(core.on_timer(now))
        elif op == "deadline":  # jump to the next expiry push (the heartbeat is far away)
            deadline = core.next_deadline()
            if deadline is not None and deadline - now < 400.0:
                now = max(now, deadline)
            check(core.on_timer(now))
        elif op == "session_end":
            check(core.session_ended(f"sess-{arg}", SessionEndReason.REVOKED, now))
        elif op == "close":
            check(core.close())
    check(core.close())
    assert core.close() == []


def test_rate_limited_error_names_the_dropped_request() -> None:
    """A subscribe or mutate dropped by the message rate limit is named in the error, so the
    client knows that request will get no other answer."""
    core = connected(limits=Limits(message_rate=(1, 10.0), heartbeat_timeout=1000.0))
    # the connect used the window's only message
    actions = core.receive(msg("subscribe", queryId=7, name="echo", args={}), 1.0)
    assert only_frame(actions, "error") == {
        "type": "error",
        "code": "rate_limited",
        "message": only_frame(actions, "error")["message"],
        "queryId": 7,
    }
    actions = core.receive(msg("mutate", requestId=9, name="notes.add", args={}), 1.1)
    assert only_frame(actions, "error")["requestId"] == 9
    assert instances(actions, RunMutation) == []
    # a ping names nothing
    assert "queryId" not in only_frame(core.receive(msg("ping"), 1.2), "error")


# ============================================================================== contract 1.1


def test_rule1_messages_after_authenticate_wait_for_its_answer_and_run_under_it() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(core.generation, 3, [QueryResult(1, '{"userId":"alice"}')], 1.1)
    # Pipelined: authenticate as bob, then subscribe, mutate, unsubscribe, all at once.
    assert core.receive(msg("authenticate", token="bob", authVersion=2), 2.0) == [
        VerifyToken(2, "bob")
    ]
    assert core.receive(msg("subscribe", queryId=2, name="echo", args={}), 2.0) == []
    assert core.receive(msg("mutate", requestId=7, name="notes.add", args={"t": 1}), 2.0) == []
    assert core.receive(msg("unsubscribe", queryId=1), 2.0) == []
    assert core.receive(msg("ping"), 2.0)[0].frame["type"] == "pong"  # not held: no identity
    actions = core.auth_succeeded(2, BOB, 2.5)
    generation = core.generation
    assert [f["type"] for f in sent(actions)] == ["auth_ok"]
    # Everything held ran after the answer, in the order sent, as bob.
    runs = [a for a in actions if isinstance(a, RunQueries | RunMutation | DropQuery)]
    assert norm(runs) == [
        RunQueries(generation, BOB, ((1, "whoami", {}),)),  # the identity change's re-run
        RunQueries(generation, BOB, ((2, "echo", {}),)),
        RunMutation(generation, BOB, 7, "notes.add", {"t": 1}),
        DropQuery(1),
    ]
    assert core.held is None


def test_rule1_held_messages_run_anonymous_when_the_authenticate_fails() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    core.receive(msg("authenticate", token="forged", authVersion=2), 2.0)
    assert core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0) == []
    actions = core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "bad token", 2.5)
    assert only_frame(actions, "auth_error")["code"] == "invalid_token"
    assert instances(actions, RunMutation) == [
        RunMutation(core.generation, None, 1, "notes.add", {})
    ]


def test_rule1_held_messages_wait_for_every_auth_request_before_them() -> None:
    core = connected()
    core.receive(msg("authenticate", token="a", authVersion=1), 1.0)
    core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 1.0)
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 1.0)
    core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 1.0)
    actions = core.auth_succeeded(1, ALICE, 1.5)
    # mutate 1 runs as alice; the refresh starts; mutate 2 waits for it.
    assert [a.request_id for a in instances(actions, RunMutation)] == [1]
    assert instances(actions, RotateRefresh) == [RotateRefresh(2, "rt", None)]
    actions = core.auth_succeeded(2, BOB, 2.0, TOKENS)
    assert instances(actions, RunMutation) == [
        RunMutation(core.generation, BOB, 2, "notes.add", {})
    ]


def test_rule1_held_messages_are_bounded_and_refused_with_their_ids() -> None:
    core = connected(limits=Limits(heartbeat_timeout=1000.0, max_held_messages=2))
    core.receive(msg("authenticate", token="a", authVersion=1), 1.0)
    assert core.receive(msg("subscribe", queryId=1, name="echo", args={}), 1.0) == []
    assert core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 1.0) == []
    refused = error_frame(core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 1.0))
    assert refused["code"] == "limit_exceeded" and refused["requestId"] == 2
    refused = error_frame(core.receive(msg("subscribe", queryId=5, name="echo", args={}), 1.0))
    assert refused["code"] == "limit_exceeded" and refused["queryId"] == 5
    big = Limits(heartbeat_timeout=1000.0, max_held_bytes=200)
    core = connected(limits=big)
    core.receive(msg("authenticate", token="a", authVersion=1), 1.0)
    assert core.receive(msg("mutate", requestId=1, name="notes.add", args={"x": "y" * 50}), 1) == []
    refused = error_frame(
        core.receive(msg("mutate", requestId=2, name="notes.add", args={"x": "y" * 150}), 1.0)
    )
    assert refused["code"] == "limit_exceeded" and refused["requestId"] == 2
    # What was held is released, and its bytes with it.
    actions = core.auth_succeeded(1, ALICE, 2.0)
    assert [a.request_id for a in instances(actions, RunMutation)] == [1]
    assert core.held_bytes == 0 and core.held is None


def test_rule1_a_mutation_result_of_an_ended_identity_is_never_sent() -> None:
    core = connected(limits=Limits(heartbeat_timeout=1000.0, max_pending_mutations=1))
    sign_in(core, ALICE, 1, 1.0)
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0), RunMutation
    )
    actions = core.receive(msg("authenticate", token=None, authVersion=2), 2.0)
    assert only_frame(actions, "auth_ok")["identity"] is None
    # Its answer comes back computed as alice: dropped, and its slot is free again.
    assert sent(core.mutation_done(run.generation, 1, 3.0, value_json='"n1"', version=4)) == []
    assert sent(core.mutation_done(run.generation, 1, 3.0, error=("invalid", "no"))) == []
    assert instances(
        core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 4.0), RunMutation
    )


def test_rule1_a_result_held_for_read_your_writes_is_dropped_with_its_identity() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, now=1.0)  # no result yet
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0), RunMutation
    )
    core.advance_version(4, 2.5)
    assert sent(core.mutation_done(run.generation, 1, 3.0, value_json='"n1"', version=4)) == []
    sign_in(core, BOB, 2, 3.5)
    actions = core.queries_done(core.generation, 5, [QueryResult(1, "1")], 4.0)
    assert of_type(actions, "mutation_result") == []


@pytest.mark.parametrize("code", [AuthErrorCode.UNAVAILABLE, AuthErrorCode.RATE_LIMITED])
def test_rule2_a_transient_auth_error_keeps_the_identity(code: AuthErrorCode) -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(core.generation, 3, [QueryResult(1, '{"userId":"alice"}')], 1.1)
    generation = core.generation
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 2.0)
    actions = core.auth_failed(2, code, "try again", 2.5)
    assert sent(actions) == [
        {"type": "auth_error", "authVersion": 2, "code": code.value, "message": "try again"}
    ]
    assert core.identity == ALICE and core.generation == generation
    assert instances(actions, RunQueries) == [] and instances(actions, UnbindSession) == []
    # It still ends at exp + leeway.
    expired = core.on_timer(105.0)
    assert only_frame(expired, "auth_expired") and core.identity is None


def test_rule2_any_other_auth_error_makes_the_connection_anonymous() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 2.0)
    actions = core.auth_failed(2, AuthErrorCode.REFRESH_INVALID, "unknown", 2.5)
    assert UnbindSession("sess-a") in actions and core.identity is None


def test_rule5_a_mutation_result_waits_for_every_subscriptions_first_result() -> None:
    """The replay of issue 11: on a new connection, subscribe and a re-sent mutate back to
    back; the stored outcome (version 9) is ready before the subscription's first result."""
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, now=1.0)
    subscribe(core, 2, now=1.0)
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 1.0), RunMutation
    )
    # The instance had processed version 9 long ago: no empty transition may claim the
    # subscriptions are current there, and the result waits.
    assert sent(core.advance_version(9, 1.1)) == []
    assert sent(core.mutation_done(run.generation, 1, 1.2, value_json="5", version=9)) == []
    actions = core.queries_done(core.generation, 9, [QueryResult(1, "5")], 1.3)
    assert [f["type"] for f in sent(actions)] == ["transition"]  # query 2 still has nothing
    actions = core.queries_done(core.generation, 9, [QueryResult(2, "[]")], 1.4)
    assert [f["type"] for f in sent(actions)] == ["transition", "mutation_result"]
    assert sent(actions)[1]["version"] == 9 and core.mutations_in_flight == 0


def test_rule5_a_result_waits_for_the_version_and_for_re_runs_after_an_identity_change() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(core.generation, 3, [QueryResult(1, '{"userId":"alice"}')], 1.1)
    sign_in(core, BOB, 2, 2.0)  # re-runs whoami: its alice result is not bob's
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0), RunMutation
    )
    assert sent(core.advance_version(4, 2.1)) == []
    assert sent(core.mutation_done(run.generation, 1, 2.2, value_json="1", version=4)) == []
    # An unchanged re-run result sends no transition but makes the subscription current; the
    # connection is still at version 3 < 4.
    same = core.queries_done(core.generation, 3, [QueryResult(1, '{"userId":"alice"}')], 2.3)
    assert sent(same) == []
    actions = core.advance_version(4, 2.4)
    assert [f["type"] for f in sent(actions)] == ["transition", "mutation_result"]


def test_rule5_unsubscribing_the_subscription_a_result_waits_for_releases_it() -> None:
    core = connected()
    subscribe(core, 1, now=1.0)
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 1.0), RunMutation
    )
    assert sent(core.mutation_done(run.generation, 1, 1.2, value_json="1", version=0)) == []
    actions = core.receive(msg("unsubscribe", queryId=1), 1.3)
    assert of_type(actions, "mutation_result") == [
        {"type": "mutation_result", "requestId": 1, "value": Raw("1"), "version": 0}
    ]


def test_rule8_auth_ok_for_a_null_token_has_null_identity_and_expiry() -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    actions = core.receive(msg("authenticate", token=None, authVersion=2), 2.0)
    assert sent(actions) == [
        {
            "type": "auth_ok",
            "authVersion": 2,
            "identity": None,
            "expiresAt": None,
            "serverTime": 2000,
        }
    ]


@pytest.mark.parametrize("end", ["expired", "revoked"])
def test_a_mutate_after_the_server_ended_the_identity_runs_nothing_until_the_client_re_auths(
    end: str,
) -> None:
    """A client woken from a freeze sends a mutate meant for its user before it reads the
    auth_expired (or session_revoked) push: it is answered unauthenticated, not run anonymous
    (which would apply the user's write as nobody, and again when re-sent as the user)."""
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    if end == "expired":
        assert only_frame(core.on_timer(105.0), "auth_expired")
    else:
        assert only_frame(
            core.session_ended("sess-a", SessionEndReason.SIGNED_OUT, 2.0), "session_revoked"
        )
    actions = core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 106.0)
    assert instances(actions, RunMutation) == []
    assert sent(actions) == [
        {
            "type": "mutation_result",
            "requestId": 1,
            "error": {"code": "unauthenticated", "message": sent(actions)[0]["error"]["message"]},
        }
    ]
    assert core.mutations_in_flight == 0
    # Queries still run, as anonymous.
    assert subscribe(core, 1, now=106.0).identity is None
    # A transient failure keeps the lapsed state; any answer of the client's own request ends it.
    core.receive(msg("refresh", refreshToken="rt", authVersion=2), 106.0)
    core.auth_failed(2, AuthErrorCode.UNAVAILABLE, "later", 106.5)
    assert not instances(
        core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 107.0), RunMutation
    )
    core.receive(msg("authenticate", token="t", authVersion=3), 107.0)
    core.auth_succeeded(3, ALICE_LATER, 107.5)
    assert instances(
        core.receive(msg("mutate", requestId=3, name="notes.add", args={}), 108.0), RunMutation
    ) == [RunMutation(core.generation, ALICE_LATER, 3, "notes.add", {})]


@pytest.mark.parametrize("how", ["null", "refused"])
def test_a_connection_anonymous_by_the_clients_request_runs_mutations_anonymous(how: str) -> None:
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    core.on_timer(105.0)  # lapsed
    if how == "null":
        core.receive(msg("authenticate", token=None, authVersion=2), 106.0)
    else:
        core.receive(msg("authenticate", token="forged", authVersion=2), 106.0)
        core.auth_failed(2, AuthErrorCode.INVALID_TOKEN, "bad", 106.5)
    assert instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 107.0), RunMutation
    ) == [RunMutation(core.generation, None, 1, "notes.add", {})]


def test_an_auth_request_over_the_message_rate_is_answered_in_its_turn() -> None:
    """Review of issue 11: a refresh dropped by the message rate limit was answered with a
    generic error naming no authVersion; the client waited for its answer for ever."""
    core = connected(limits=Limits(heartbeat_timeout=1000.0, message_rate=(3, 10.0)))
    sign_in(core, ALICE, 1, 1.0)  # the 2nd message (connect was the 1st)
    core.receive(msg("ping"), 1.0)
    actions = core.receive(msg("refresh", refreshToken="rt", authVersion=2), 1.0)
    assert sent(actions) == [
        {
            "type": "auth_error",
            "authVersion": 2,
            "code": "rate_limited",
            "message": sent(actions)[0]["message"],
        }
    ]
    assert core.identity == ALICE  # rate_limited is transient (rule 2)
    # Behind a request in flight, the refusal waits for its turn.
    core = connected(limits=Limits(heartbeat_timeout=1000.0, message_rate=(2, 10.0)))
    assert core.receive(msg("authenticate", token="t", authVersion=1), 1.0) == [VerifyToken(1, "t")]
    assert core.receive(msg("refresh", refreshToken="rt", authVersion=2), 1.0) == []
    answers = [(f["type"], f["authVersion"]) for f in sent(core.auth_succeeded(1, ALICE, 2.0))]
    assert answers == [("auth_ok", 1), ("auth_error", 2)]


def test_a_mutate_held_behind_a_transiently_failed_auth_request_runs_nothing() -> None:
    """Rule 2 keeps alice's identity when bob's authenticate gets unavailable; the mutate sent
    behind it was meant for bob: it must not run as alice (issue 11, item 4), nor as anonymous.
    It is answered unavailable (re-send); subscriptions behind it run under the kept identity."""
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    core.receive(msg("authenticate", token="bob", authVersion=2), 2.0)
    core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0)
    core.receive(msg("subscribe", queryId=1, name="whoami", args={}), 2.0)
    core.receive(msg("refresh", refreshToken="rt", authVersion=3), 2.0)
    core.receive(msg("mutate", requestId=2, name="notes.add", args={}), 2.0)
    actions = core.auth_failed(2, AuthErrorCode.UNAVAILABLE, "later", 2.5)
    assert instances(actions, RunMutation) == []
    result = only_frame(actions, "mutation_result")
    assert result["requestId"] == 1 and result["error"]["code"] == "unavailable"
    assert instances(actions, RunQueries)[0].identity == ALICE
    assert instances(actions, RotateRefresh) == [RotateRefresh(3, "rt", None)]
    assert core.mutations_in_flight == 0
    # Behind the next request, which succeeds, the mutate runs as it establishes.
    actions = core.auth_succeeded(3, ALICE_LATER, 3.0, TOKENS)
    assert [a.request_id for a in instances(actions, RunMutation)] == [2]


def test_a_held_result_is_released_when_the_re_run_it_waited_for_comes_back_unchanged() -> None:
    """Review of issue 11: the last subscription a held result waited for got an unchanged
    result at a newer version; no transition went out and the result waited for ever."""
    core = connected()
    sign_in(core, ALICE, 1, 1.0)
    subscribe(core, 1, "whoami", now=1.0)
    core.queries_done(core.generation, 10, [QueryResult(1, '{"userId":"alice"}')], 1.1)
    sign_in(core, ALICE_OTHER_SESSION, 2, 2.0)  # same user, new session: whoami re-runs
    [run] = instances(
        core.receive(msg("mutate", requestId=1, name="notes.add", args={}), 2.0), RunMutation
    )
    assert sent(core.advance_version(100, 2.1)) == []  # whoami is not fresh yet
    assert sent(core.mutation_done(run.generation, 1, 2.2, value_json="1", version=50)) == []
    actions = core.queries_done(core.generation, 100, [QueryResult(1, '{"userId":"alice"}')], 2.3)
    assert sent(actions) == [
        {"type": "transition", "version": 100, "updates": []},
        {"type": "mutation_result", "requestId": 1, "value": Raw("1"), "version": 50},
    ]
    assert core.mutations_in_flight == 0
