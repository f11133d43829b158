"""The consistency property (issue 4): random interleavings of the demo's mutations from several
clients on two instances, while other clients subscribe, unsubscribe and reconnect.

Hypothesis draws a scenario: a few clients, each on an instance and signed in as one of two
users (or anonymous), each with a list of actions — mutations (``counter.increment`` on three
counters, ``messages.send`` on two channels, ``notes.add``), subscriptions to ``counter.get``,
``messages.list`` and ``notes.mine``, unsubscribes, reconnects (to the same or the other
instance), pauses. The clients run their lists concurrently; mutations are not awaited, so many
are in flight at once. A client that reconnects with mutations still unanswered re-sends them on
the new socket with the same ``clientId`` and ``requestId``, as the contract allows.

The reference model is replayed from the commit order. Every successful ``mutation_result``
gives the version its mutation committed at; the commit stream in Redis must hold exactly those
versions (none missing, none unknown), and replaying the mutations sorted by version into a
pure-Python model of the demo application gives each query's result at every version. Checks:

* after each ``transition`` (version ``V``), every subscription the client holds equals the
  model's result at ``V`` — including the subscriptions the transition did not mention;
* versions never go down on a socket;
* read your writes: when a successful ``mutation_result`` (version ``v``) arrives, a socket that
  holds any subscription has received a transition at ``v`` or later;
* the returned value of every ``counter.increment`` equals the model's counter at its version
  (serialisability), and every update changes what the client held;
* in the end every open socket converges to the model's latest results.

One deployment (one ``redis-server``, two servers) serves every example; each example uses new
counter and channel names and two new users, so it depends only on its own commits.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tether.server.redis import keys as redis_keys

from tests.harness import RedisProcess, ServerProcess, kill_all, shared_env
from tests.sync_client import check_frame, connect_sync, signup

pytestmark = pytest.mark.timeout(240)

COUNTERS = 3
CHANNELS = 2
USERS = 2
#: ``messages.list`` returns the channel's last this many messages.
MESSAGES_LISTED = 100
#: Seconds for the last mutations to be answered, and for sockets to converge.
SETTLE = 20.0
CONVERGE = 10.0

# ---------------------------------------------------------------------------------- deployment


@dataclass
class Deployment:
    redis: RedisProcess
    servers: list[ServerProcess]


@pytest.fixture(autouse=True)
def _kill_leftover_processes() -> Iterator[None]:
    """Overrides the conftest fixture of this name, which kills every harness process after each
    test: here the deployment is shared by the module's tests and stopped by its own fixture."""
    yield


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp: Path = tmp_path_factory.mktemp("consistency")
    redis = RedisProcess(tmp / "redis")
    servers: list[ServerProcess] = []
    try:
        redis.start()
        # Two new users per example: more sign-ups from one address than the default allows.
        env = {**shared_env(tmp), "TETHER_SIGNUP_LIMIT_ADDRESS": "100000/300"}
        for i in range(2):
            servers.append(ServerProcess(redis.url, env=env, tmp_dir=tmp / f"server-{i}"))
            servers[-1].start()
        yield Deployment(redis, servers)
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop(timeout=5.0)
        redis.stop()
        kill_all()


# ---------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Query:
    kind: str  # "counter", "channel" or "notes"
    index: int = 0


@dataclass(frozen=True)
class Mutate:
    kind: str  # "increment", "send" or "note"
    index: int = 0
    by: int = 1
    text: str = ""


@dataclass(frozen=True)
class Subscribe:
    query: Query


@dataclass(frozen=True)
class Unsubscribe:
    pick: int


@dataclass(frozen=True)
class Reconnect:
    other_instance: bool
    #: Drop the TCP connection at once, without a close handshake: answers on the way are lost
    #: and their mutations are re-sent on the new socket.
    abrupt: bool


@dataclass(frozen=True)
class Resend:
    """Send an answered mutation again (same ``requestId``): its first answer must come back."""

    pick: int


@dataclass(frozen=True)
class Pause:
    ms: int


Action = Mutate | Subscribe | Unsubscribe | Reconnect | Resend | Pause


@dataclass(frozen=True)
class ClientPlan:
    instance: int
    user: int | None
    subscriptions: tuple[Query, ...]  # made first
    actions: tuple[Action, ...]
    tempo_ms: int  # between two actions


texts = st.text(alphabet=st.sampled_from("ab é😀"), max_size=4)
queries = st.one_of(
    st.builds(Query, st.just("counter"), st.integers(0, COUNTERS - 1)),
    st.builds(Query, st.just("channel"), st.integers(0, CHANNELS - 1)),
    st.just(Query("notes")),
)
mutations = st.one_of(
    st.builds(
        Mutate, st.just("increment"), st.integers(0, COUNTERS - 1), st.integers(-2, 3), st.just("")
    ),
    # An empty body is refused with ``invalid``: a failed mutation, left out of the model.
    st.builds(Mutate, st.just("send"), st.integers(0, CHANNELS - 1), st.just(1), texts),
    st.builds(Mutate, st.just("note"), st.just(0), st.just(1), texts),
)
actions = st.one_of(
    mutations,
    mutations,
    mutations,
    st.builds(Subscribe, queries),
    st.builds(Unsubscribe, st.integers(0, 7)),
    st.builds(Reconnect, st.booleans(), st.booleans()),
    st.builds(Resend, st.integers(0, 30)),
    st.builds(Pause, st.sampled_from([0, 10, 50])),
)
plans = st.builds(
    ClientPlan,
    st.integers(0, 1),
    # Mostly signed in: an anonymous client's notes and messages fail with unauthenticated.
    st.one_of(*[st.integers(0, USERS - 1)] * 4, st.none()),
    st.lists(queries, min_size=1, max_size=4).map(tuple),
    st.lists(actions, min_size=6, max_size=24).map(tuple),
    st.sampled_from([0, 5, 20]),
)
scenarios = st.lists(plans, min_size=4, max_size=7)


# ---------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Committed:
    """A successful mutation: what ran, as whom, and what it answered."""

    version: int
    name: str
    args: dict[str, Any]
    author: str | None
    value: Any


@dataclass
class ModelState:
    counters: dict[str, int] = field(default_factory=dict)
    messages: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    notes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def copy(self) -> ModelState:
        return ModelState(
            dict(self.counters),
            {k: list(v) for k, v in self.messages.items()},
            {k: list(v) for k, v in self.notes.items()},
        )

    def apply(self, commit: Committed) -> None:
        if commit.name == "counter.increment":
            name = commit.args["name"]
            self.counters[name] = self.counters.get(name, 0) + commit.args.get("by", 1)
            assert commit.value == self.counters[name], (
                f"counter.increment at version {commit.version} answered {commit.value}; "
                f"replayed in commit order it makes {self.counters[name]}: {commit}"
            )
        elif commit.name == "messages.send":
            assert commit.author is not None
            channel = commit.args["channel"]
            row = (commit.value, commit.args["body"], commit.author)
            self.messages.setdefault(channel, []).append(row)
        elif commit.name == "notes.add":
            assert commit.author is not None
            self.notes.setdefault(commit.author, []).append((commit.value, commit.args["text"]))
        else:
            raise AssertionError(f"unexpected mutation {commit}")

    def result(self, name: str, args: dict[str, Any], user: str | None) -> tuple[str, Any]:
        """``("value", v)`` or ``("error", code)``, as the demo application answers."""
        if name == "counter.get":
            return ("value", self.counters.get(args["name"], 0))
        if name == "messages.list":
            channel = args["channel"]
            rows = self.messages.get(channel, [])[-MESSAGES_LISTED:]
            return (
                "value",
                [{"id": i, "channel": channel, "body": b, "author": a} for i, b, a in rows],
            )
        if name == "notes.mine":
            if user is None:
                return ("error", "unauthenticated")
            return ("value", [{"id": i, "text": t} for i, t in self.notes.get(user, [])])
        raise AssertionError(f"unexpected query {name}")


class Model:
    """The demo application's state at every version, replayed from the commit order."""

    def __init__(self, commits: list[Committed]) -> None:
        self.versions: list[int] = []
        self.states: list[ModelState] = []
        state = ModelState()
        self.initial = state.copy()
        for commit in sorted(commits, key=lambda c: c.version):
            state.apply(commit)
            self.versions.append(commit.version)
            self.states.append(state.copy())

    def at(self, version: int) -> ModelState:
        position = bisect.bisect_right(self.versions, version)
        return self.initial if position == 0 else self.states[position - 1]

    @property
    def latest(self) -> int:
        return self.versions[-1] if self.versions else 0


def observed(name: str, update: dict[str, Any], created: dict[str, int]) -> tuple[str, Any]:
    """An update as the model states it: ``createdAt`` (an instance's clock) is checked to be an
    integer that never changes for a message, then left out."""
    if "error" in update:
        return ("error", update["error"]["code"])
    value = update["value"]
    if name == "messages.list" and isinstance(value, list):
        stripped = []
        for message in value:
            message = dict(message)
            created_at = message.pop("createdAt", None)
            assert isinstance(created_at, int), f"createdAt is not an integer: {update}"
            first = created.setdefault(message["id"], created_at)
            assert first == created_at, f"createdAt changed for {message}: {first}"
            stripped.append(message)
        return ("value", stripped)
    return ("value", value)


# ---------------------------------------------------------------------------------- running


@dataclass
class SocketLog:
    """One socket: every frame sent and received, in the order the client saw them."""

    label: str
    user: str | None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    held: dict[int, tuple[str, Any]] = field(default_factory=dict)
    closed: bool = False


class ScenarioRun:
    def __init__(self, deployment: Deployment, users: list[dict[str, Any]]) -> None:
        self.deployment = deployment
        self.users = users
        self.tag = uuid.uuid4().hex[:8]
        self.sockets: list[SocketLog] = []
        self.committed: list[Committed] = []
        self.failed: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.problems: list[str] = []  # found while reading, checked at the end
        self.changed = asyncio.Condition()

    def args_of(self, query: Query) -> tuple[str, dict[str, Any]]:
        if query.kind == "counter":
            return "counter.get", {"name": f"c{query.index}-{self.tag}"}
        if query.kind == "channel":
            return "messages.list", {"channel": f"ch{query.index}-{self.tag}"}
        return "notes.mine", {}

    def mutation_of(self, action: Mutate) -> tuple[str, dict[str, Any]]:
        if action.kind == "increment":
            return "counter.increment", {"name": f"c{action.index}-{self.tag}", "by": action.by}
        if action.kind == "send":
            return "messages.send", {"channel": f"ch{action.index}-{self.tag}", "body": action.text}
        return "notes.add", {"text": action.text}

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class ClientRun:
    """One client of a scenario: a stable ``clientId``, one socket at a time."""

    def __init__(self, run: ScenarioRun, number: int, plan: ClientPlan) -> None:
        self.run = run
        self.number = number
        self.plan = plan
        self.client_id = f"prop-{run.tag}-{number}"
        self.user = None if plan.user is None else run.users[plan.user]
        self.instance = plan.instance
        self.subs: dict[int, tuple[str, dict[str, Any]]] = {}  # on the current socket
        self.pending: dict[int, tuple[str, dict[str, Any]]] = {}
        self.sent: dict[int, tuple[str, dict[str, Any]]] = {}
        self.answers: dict[int, dict[str, Any]] = {}  # requestId → its first mutation_result
        self.resent: dict[int, int] = {}  # requestId → answers still expected to a re-send
        self.query_ids = itertools.count(1)
        self.request_ids = itertools.count(1)
        self.socket: SocketLog | None = None
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.auth_versions = itertools.count(1)

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.socket is not None
        self.socket.events.append(("send", frame))
        await self.ws.send(json.dumps(frame))

    async def open(self) -> None:
        server = self.run.deployment.servers[self.instance]
        user_id = None if self.user is None else self.user["userId"]
        label = f"client {self.number} socket {len(self.run.sockets)} on instance {self.instance}"
        socket = SocketLog(label, user_id)
        self.run.sockets.append(socket)
        client = await connect_sync(server.ws_url, client_id=self.client_id)
        self.socket, self.ws = socket, client.ws
        self.reader = asyncio.create_task(self.read(socket, client.ws))
        if self.user is not None:
            auth_version = next(self.auth_versions)
            await self.send(
                {
                    "type": "authenticate",
                    "token": self.user["accessToken"],
                    "authVersion": auth_version,
                }
            )
            await self.wait(
                lambda: any(f["type"] in ("auth_ok", "auth_error") for _, f in socket.events),
                "an answer to authenticate",
            )
            answers = [f for d, f in socket.events if f["type"] in ("auth_ok", "auth_error")]
            assert answers[0]["type"] == "auth_ok", answers[0]
        # Subscriptions and unanswered mutations move to the new socket.
        old_subs, self.subs = self.subs, {}
        for name, args in old_subs.values():
            await self.subscribe(name, args)
        for request_id, (name, args) in list(self.pending.items()):
            await self.send({"type": "mutate", "requestId": request_id, "name": name, "args": args})
        if self.answers:
            # Unsure whether its last mutation went through, the client sends it again.
            last = max(self.answers)
            self.resent[last] = self.resent.get(last, 0) + 1
        for request_id, count in list(self.resent.items()):
            if count:  # the answer was lost with the old socket, or see above
                self.resent[request_id] = 1
                name, args = self.sent[request_id]
                await self.send(
                    {"type": "mutate", "requestId": request_id, "name": name, "args": args}
                )

    async def read(self, socket: SocketLog, ws: Any) -> None:
        try:
            async for data in ws:
                try:
                    frame = check_frame(data)
                except AssertionError as exc:
                    self.run.problems.append(f"{socket.label}: {exc}")
                    continue
                socket.events.append(("recv", frame))
                if frame["type"] == "transition":
                    for update in frame["updates"]:
                        if "error" in update:
                            socket.held[update["queryId"]] = ("error", update["error"]["code"])
                        else:
                            socket.held[update["queryId"]] = ("value", update["value"])
                elif frame["type"] == "mutation_result":
                    self.answered(socket, frame)
                await self.run.notify()
        except websockets.ConnectionClosed:
            pass
        finally:
            socket.closed = True
            await self.run.notify()

    def answered(self, socket: SocketLog, frame: dict[str, Any]) -> None:
        request_id = frame["requestId"]
        if self.resent.get(request_id):
            self.resent[request_id] -= 1
            if frame != self.answers[request_id]:
                self.run.problems.append(
                    f"{socket.label}: a re-sent mutation was answered {frame}, "
                    f"first {self.answers[request_id]}"
                )
            return
        request = self.pending.pop(request_id, None)
        if request is None:
            self.run.problems.append(f"{socket.label}: an answer to nothing pending: {frame}")
            return
        self.answers[request_id] = frame
        name, args = request
        if "error" in frame:
            self.run.failed.append((name, args, frame))
        else:
            author = None if self.user is None else self.user["userId"]
            self.run.committed.append(
                Committed(frame["version"], name, args, author, frame["value"])
            )

    async def wait(self, predicate: Any, what: str, timeout: float = 5.0) -> None:
        try:
            async with self.run.changed:
                await asyncio.wait_for(self.run.changed.wait_for(predicate), timeout)
        except TimeoutError:
            raise AssertionError(f"client {self.number}: not within {timeout} s: {what}") from None

    async def subscribe(self, name: str, args: dict[str, Any]) -> None:
        query_id = next(self.query_ids)
        self.subs[query_id] = (name, args)
        await self.send({"type": "subscribe", "queryId": query_id, "name": name, "args": args})

    async def close(self, *, abrupt: bool = False) -> None:
        if abrupt:
            self.ws.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, 3)

    async def perform(self) -> None:
        await self.open()
        for query in self.plan.subscriptions:
            await self.subscribe(*self.run.args_of(query))
        for action in self.plan.actions:
            if isinstance(action, Mutate):
                name, args = self.run.mutation_of(action)
                request_id = next(self.request_ids)
                self.pending[request_id] = self.sent[request_id] = (name, args)
                await self.send(
                    {"type": "mutate", "requestId": request_id, "name": name, "args": args}
                )
            elif isinstance(action, Subscribe):
                await self.subscribe(*self.run.args_of(action.query))
            elif isinstance(action, Unsubscribe):
                if self.subs:
                    query_id = sorted(self.subs)[action.pick % len(self.subs)]
                    del self.subs[query_id]
                    await self.send({"type": "unsubscribe", "queryId": query_id})
            elif isinstance(action, Reconnect):
                await self.close(abrupt=action.abrupt)
                if action.other_instance:
                    self.instance = 1 - self.instance
                await self.open()
            elif isinstance(action, Resend):
                if self.answers:
                    request_id = sorted(self.answers)[action.pick % len(self.answers)]
                    name, args = self.sent[request_id]
                    self.resent[request_id] = self.resent.get(request_id, 0) + 1
                    await self.send(
                        {"type": "mutate", "requestId": request_id, "name": name, "args": args}
                    )
            elif isinstance(action, Pause):
                await asyncio.sleep(action.ms / 1000)
            await asyncio.sleep(self.plan.tempo_ms / 1000)
        await self.wait(
            lambda: not self.pending and not any(self.resent.values()),
            f"answers to {self.pending} and re-sent {self.resent}",
            SETTLE,
        )


async def commit_stream_versions(deployment: Deployment, after: int) -> list[int]:
    redis = deployment.redis.client()
    try:
        entries = cast(
            "list[Any]",
            await redis.xrange(redis_keys.DATA_COMMITS, min=f"{after + 1}-0", max="+"),
        )
    finally:
        await redis.aclose()
    return [int(fields["v"]) for _, fields in entries]


async def last_stream_version(deployment: Deployment) -> int:
    redis = deployment.redis.client()
    try:
        last = cast("list[Any]", await redis.xrevrange(redis_keys.DATA_COMMITS, count=1))
    finally:
        await redis.aclose()
    return int(last[0][1]["v"]) if last else 0


# ---------------------------------------------------------------------------------- checking


def check_socket(socket: SocketLog, model: Model, created: dict[str, int]) -> list[str]:
    """Replay one socket's events against the model; return what went wrong."""
    problems: list[str] = []
    subs: dict[int, tuple[str, dict[str, Any]]] = {}
    held: dict[int, tuple[str, Any]] = {}
    subscribed_before: dict[int, set[int]] = {}  # requestId → queryIds subscribed when sent
    version = -1
    for position, (direction, frame) in enumerate(socket.events):
        where = f"{socket.label}, event {position}"
        kind = frame["type"]
        if direction == "send":
            if kind == "subscribe":
                subs[frame["queryId"]] = (frame["name"], frame["args"])
            elif kind == "unsubscribe":
                subs.pop(frame["queryId"], None)
                held.pop(frame["queryId"], None)
            elif kind == "mutate":
                subscribed_before[frame["requestId"]] = set(subs)
            continue
        if kind == "transition":
            if frame["version"] < version:
                problems.append(f"{where}: version went down from {version}: {frame}")
            version = max(version, frame["version"])
            state = model.at(frame["version"])
            for update in frame["updates"]:
                query_id = update["queryId"]
                if query_id not in subs:
                    continue  # unsubscribed meanwhile
                name, _ = subs[query_id]
                value = observed(name, update, created)
                if held.get(query_id) == value:
                    problems.append(f"{where}: an update that changes nothing: {update}")
                held[query_id] = value
            for query_id, value in held.items():
                name, args = subs[query_id]
                expected = state.result(name, args, socket.user)
                if value != expected:
                    problems.append(
                        f"{where}: after the transition at version {frame['version']}, "
                        f"{name} {args} holds {value}; at that version the model says {expected}. "
                        f"Transition: {frame}"
                    )
        elif kind == "mutation_result" and "error" not in frame:
            still = subscribed_before.get(frame["requestId"], set()) & set(subs)
            if still and version < frame["version"]:
                problems.append(
                    f"{where}: mutation_result at version {frame['version']} before any "
                    f"transition at that version (last: {version}); subscriptions {still}"
                )
        elif kind == "error":
            problems.append(f"{where}: unexpected error {frame}")
    return problems


def current_results_match(socket: SocketLog, model: Model, subs: dict[int, Any]) -> bool:
    state = model.at(model.latest)
    created: dict[str, int] = {}
    for query_id, (name, args) in subs.items():
        held = socket.held.get(query_id)
        if held is None:
            return False
        kind, value = held
        update = {"queryId": query_id, kind: value if kind == "value" else {"code": value}}
        try:
            if observed(name, update, created) != state.result(name, args, socket.user):
                return False
        except AssertionError:
            return False
    return True


async def run_scenario(deployment: Deployment, plans: list[ClientPlan]) -> None:
    base = deployment.servers[0].base_url
    users = [await signup(base) for _ in range(USERS)]
    run = ScenarioRun(deployment, users)
    before = await last_stream_version(deployment)
    clients = [ClientRun(run, number, plan) for number, plan in enumerate(plans)]
    try:
        await asyncio.gather(*(client.perform() for client in clients))

        # Every failure is one the scenario can cause; none is applied (checked below).
        for name, args, frame in run.failed:
            code = frame["error"]["code"]
            allowed = {"conflict"}
            if name in ("messages.send", "notes.add"):
                allowed.add("unauthenticated")
            if name == "messages.send" and not args["body"]:
                allowed.add("invalid")
            assert code in allowed, f"{name} {args} failed: {frame}"

        versions = sorted(c.version for c in run.committed)
        assert len(set(versions)) == len(versions), f"two mutations at one version: {versions}"
        streamed = await commit_stream_versions(deployment, before)
        assert streamed == versions, (
            f"the commit stream holds {streamed}, the acknowledged mutations {versions}"
        )
        model = Model(run.committed)

        # Liveness: every open socket ends on the latest results.
        for client in clients:
            socket = client.socket
            assert socket is not None
            await client.wait(
                lambda s=socket, c=client: current_results_match(s, model, c.subs),
                f"convergence to version {model.latest}: holds {socket.held}",
                CONVERGE,
            )
    finally:
        await asyncio.gather(*(client.close() for client in clients))

    created: dict[str, int] = {}
    problems = run.problems + [
        p for socket in run.sockets for p in check_socket(socket, model, created)
    ]
    assert not problems, "\n".join(problems[:10])


@settings(
    max_examples=15,
    deadline=None,
    # Timing decides the interleaving, so a failure need not reproduce: report the first one
    # (its messages say what went wrong) instead of shrinking for minutes.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios)
def test_every_transition_matches_the_model_replayed_from_the_commit_order(
    deployment: Deployment, scenario: list[ClientPlan]
) -> None:
    asyncio.run(asyncio.wait_for(run_scenario(deployment, scenario), 60))
