"""Property: whatever a client sends on ``/sync``, one real server answers only with the contract.

Random JSON values, objects with a contract ``type`` and fields of any type plus junk,
well-formed messages whose ids collide, non-JSON text, binary frames and a few hand-picked nasty
frames go to a connected socket, each followed by a ``ping``. Everything read up to its ``pong``
must be a JSON object in a text frame whose ``type`` and codes the contract lists
(:func:`tests.sync_client.check_frame`), and the connection must stay open. The one close
allowed is 1009, after a frame over ``TETHER_MAX_MESSAGE_BYTES``: an example sends at most a few
frames, far from the floods that earn 4500 or 4429.

Each example opens its own connection, so examples are independent and shrink cleanly. The
server process is started once for the whole run: the property runs inside one test, which is
what a module-scoped server would buy (conftest kills every harness process after each test).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ServerProcess
from tests.sync_client import CLIENT_TYPES, connect_sync

pytestmark = pytest.mark.timeout(120)

#: ``TETHER_MAX_MESSAGE_BYTES`` (its default, named here so the test knows when 1009 is due).
MAX_MESSAGE_BYTES = 65536
#: Seconds the server may take to answer one frame and the ping behind it.
ANSWER_TIMEOUT = 5.0

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)

#: Small ids collide within an example: duplicate queryIds, non-increasing authVersions.
small_ints = st.integers(min_value=0, max_value=3)
#: Values a field could plausibly hold, mixed below with any JSON value (wrong types).
plausible: dict[str, st.SearchStrategy[Any]] = {
    "clientId": st.text(min_size=1, max_size=140),
    "protocol": st.sampled_from([1, 2, 0]),
    "token": st.none() | st.text(max_size=40) | st.just("a.b.c"),
    "authVersion": small_ints | st.integers(min_value=-2, max_value=2**53 + 1),
    "refreshToken": st.text(max_size=40) | st.just("rt1.a.b.c"),
    "retryKey": st.text(max_size=140),
    "queryId": small_ints | st.integers(min_value=-2, max_value=2**53 + 1),
    "requestId": small_ints | st.integers(min_value=-2, max_value=2**53 + 1),
    "name": st.sampled_from(
        ["whoami", "messages.list", "messages.send", "notes.add", "counter.get", "nope", ""]
    ),
    "args": st.dictionaries(
        st.sampled_from(["channel", "body", "text", "name", "by", "x"]), json_values, max_size=3
    ),
}
fields = st.fixed_dictionaries(
    {}, optional={name: strategy | json_values for name, strategy in plausible.items()}
)
types = st.sampled_from([*CLIENT_TYPES, "pong", "connected", "PING", ""]) | json_values
typed_objects = st.builds(
    lambda junk, known, kind: {**junk, **known, "type": kind},
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    fields,
    types,
)
#: Well-formed messages with colliding ids: they reach the connection's state machine.
well_formed = st.one_of(
    st.builds(
        lambda qid, name: {"type": "subscribe", "queryId": qid, "name": name, "args": {}},
        small_ints,
        st.sampled_from(["whoami", "notes.mine", "nope"]),
    ),
    st.builds(lambda qid: {"type": "unsubscribe", "queryId": qid}, small_ints),
    st.builds(
        lambda version, token: {"type": "authenticate", "token": token, "authVersion": version},
        small_ints,
        st.none() | st.just("a.b.c"),
    ),
    st.builds(
        lambda version: {"type": "refresh", "refreshToken": "rt1.a.b.c", "authVersion": version},
        small_ints,
    ),
    st.builds(
        lambda rid, name: {
            "type": "mutate",
            "requestId": rid,
            "name": name,
            "args": {"text": "hi"},
        },
        small_ints,
        st.sampled_from(["notes.add", "messages.send", "nope"]),
    ),
    st.just({"type": "connect", "clientId": "again", "protocol": 1}),
)
NASTY = [
    '{"type": "ping", "x": NaN}',
    '{"type": "ping", "x": Infinity}',
    '{"type": "ping"',
    '{"type": "ping"} trailing',
    ' {"type": "ping"} ',
    '{"type": "subscribe", "queryId": 1e400, "name": "whoami"}',
    '{"type": "subscribe", "queryId": 1.0, "name": "whoami"}',
    '{"type": "authenticate", "token": null, "authVersion": true}',
    "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    "",
    "x" * (MAX_MESSAGE_BYTES + 1),
]
frames = st.one_of(
    typed_objects.map(json.dumps),
    well_formed.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60),
    st.sampled_from(NASTY),
)


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def answers_pong(payload: str | bytes) -> bool:
    """Is ``payload`` itself a valid ``ping`` (unknown fields are ignored), answered by ``pong``?"""
    if not isinstance(payload, str):
        return False
    try:
        doc = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "ping"


def size_of(payload: str | bytes) -> int:
    return len(payload.encode() if isinstance(payload, str) else payload)


async def exercise(ws_url: str, payloads: list[str | bytes]) -> None:
    client = await connect_sync(ws_url)
    try:
        for payload in payloads:
            try:
                await client.send_raw(payload)
                await client.send({"type": "ping"})
            except websockets.ConnectionClosed:
                pass  # the server closed first; wait_closed below reads why
            if size_of(payload) > MAX_MESSAGE_BYTES:
                assert await client.wait_closed(ANSWER_TIMEOUT, allow=None) == 1009
                return
            pongs_due = 1 + answers_pong(payload)
            while pongs_due:
                frame = await client.recv(ANSWER_TIMEOUT)  # checked against the contract
                assert frame.get("code") != "not_connected", (payload, frame)
                pongs_due -= frame["type"] == "pong"
    finally:
        await client.close()


async def pong_round_trip(ws_url: str) -> float:
    client = await connect_sync(ws_url)
    try:
        started = time.monotonic()
        await client.ping(timeout=2)
        return time.monotonic() - started
    finally:
        await client.close()


def test_random_frames_get_only_contract_answers_and_the_server_stays_healthy(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads=st.lists(frames, min_size=1, max_size=8))
    def property_holds(payloads: list[str | bytes]) -> None:
        asyncio.run(exercise(server.ws_url, payloads))

    property_holds()

    # A separate client after the whole run: answered at once, by a process that logged no
    # traceback on the way.
    assert asyncio.run(pong_round_trip(server.ws_url)) < 0.5
    assert server.returncode is None
    assert "Traceback" not in server.log_text(), server.log_text()[-4000:]
