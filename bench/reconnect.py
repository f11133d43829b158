"""How long the Python client takes to restore a session after its socket drops.

One ``TetherClient`` (a stored session, ``K`` live subscriptions, ``--mutations`` mutations in
flight) talks to a real Tether server (``python -m tether serve``, its own ``redis-server``)
through a TCP forwarder in this process. Each round:

1. the forwarder stops passing the server's bytes to the client, the client sends its mutations
   (they run and commit on the server; their answers are lost), and after ``--settle`` seconds
2. the forwarder aborts the client's TCP connection (t0). The client reconnects at once (backoff
   0) through the forwarder, and the round ends when the session is **restored**: ``auth_ok``
   received, a result for each of the ``K`` subscriptions received, and every pending mutation
   answered (its original outcome), all on the new connection, as the client's ``trace`` hook
   sees the frames arrive.

The baseline, measured just before each drop in the same run: a raw ``websockets`` connection
through the same forwarder, ``connect`` -> ``connected`` (the handshake and one round trip, the
least any reconnect costs). Rows give the median and p90 over ``--repeat`` rounds. Run from the
repository root::

    .venv/bin/python bench/reconnect.py
    .venv/bin/python bench/reconnect.py --k 1,10,50 --repeat 30 --mutations 1
    .venv/bin/python bench/reconnect.py --latency-ms 20   # a 40 ms round trip

``--latency-ms`` delays every chunk the forwarder passes, each way, keeping their order: on
loopback a round trip costs ~0.1 ms and saving round trips shows only with a network's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import websockets
from common import (
    DeploymentWithRedis,
    comma_list,
    describe_run,
    load_average,
    percentile,
    print_header,
    run_bounded,
)
from tether.client import Backoff, ClientOptions, MemoryTokenStore, TetherClient, sign_up


class Forwarder:
    """A TCP forwarder to the server that can hold the server's bytes back and drop every
    connection at once (an RST, as a dead network path or a killed proxy would)."""

    def __init__(self, target_port: int, latency: float = 0.0) -> None:
        self.target_port = target_port
        self.latency = latency  # seconds added to every chunk, each way (order kept)
        self.hold = False
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.BaseTransport] = []

    async def start(self) -> Forwarder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def ws_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/sync"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._transports += [writer.transport, up_writer.transport]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_server: bool
        ) -> None:
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

            async def deliver() -> None:
                with contextlib.suppress(OSError):
                    while (item := await queue.get()) is not None:
                        due, data = item
                        if (wait := due - time.monotonic()) > 0:
                            await asyncio.sleep(wait)
                        dst.write(data)
                        await dst.drain()
                dst.close()

            delivering = asyncio.create_task(deliver())
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if from_server and self.hold:
                        continue
                    queue.put_nowait((time.monotonic() + self.latency, data))
            queue.put_nowait(None)
            await delivering

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def drop(self) -> None:
        """Abort every connection, both sides; stop holding."""
        for transport in self._transports:
            transport.abort()  # type: ignore[attr-defined]
        self._transports.clear()
        self.hold = False

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()


class Frames:
    """The client's ``trace`` hook: every frame received, with the time it arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.mutates_sent: list[int] = []

    def __call__(self, direction: str, text: str) -> None:
        frame = json.loads(text)
        if direction == "recv":
            self.received.append((time.monotonic(), frame))
        elif frame["type"] == "mutate":
            self.mutates_sent.append(frame["requestId"])

    def restored_at(self, since: int, query_ids: list[int], request_ids: set[int]) -> float | None:
        """When auth_ok, a result for every query and an answer for every mutation had all
        arrived after frame ``since``; ``None`` if not yet."""
        auth: float | None = None
        queries: dict[int, float] = {}
        answers: dict[int, float] = {}
        for at, frame in self.received[since:]:
            kind = frame["type"]
            if kind == "auth_ok" and auth is None:
                auth = at
            elif kind == "transition":
                for update in frame["updates"]:
                    queries.setdefault(update["queryId"], at)
            elif kind == "mutation_result" and frame["requestId"] in request_ids:
                if frame.get("error", {}).get("code") != "unavailable":
                    answers.setdefault(frame["requestId"], at)
        if auth is None or len(answers) < len(request_ids):
            return None
        if any(q not in queries for q in query_ids):
            return None
        return max([auth, *answers.values(), *(queries[q] for q in query_ids)])


async def baseline(url: str) -> float:
    """A raw websockets connection: the handshake, then ``connect`` -> ``connected``."""
    started = time.monotonic()
    async with websockets.connect(url, compression=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "connect", "clientId": uuid.uuid4().hex, "protocol": 1}))
        while json.loads(await ws.recv())["type"] != "connected":
            pass
        elapsed = time.monotonic() - started
    return elapsed


async def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while (value := check()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.0005)
    return value


async def measure_k(
    forwarder: Forwarder, session: Any, k: int, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """``--repeat`` rounds with ``k`` subscriptions: (baseline times, restore times)."""
    frames = Frames()
    options = ClientOptions(backoff=Backoff(initial=0.0, maximum=0.0))
    client = TetherClient(
        forwarder.ws_url, token_store=MemoryTokenStore(session), trace=frames, options=options
    )
    base, restore = [], []
    async with client, contextlib.AsyncExitStack() as subs:
        names = [f"k{k}-{i}-{uuid.uuid4().hex[:6]}" for i in range(k)]
        opened = [
            await subs.enter_async_context(client.subscribe("counter.get", name=n)) for n in names
        ]
        for sub in opened:
            await asyncio.wait_for(sub.__anext__(), 10)
        query_ids = [sub.query_id for sub in opened if sub.query_id is not None]
        for _ in range(args.repeat):
            await asyncio.wait_for(client.wait_ready(), 10)
            base.append(await baseline(forwarder.ws_url))
            # Mutations in flight: they run and commit, their answers are held back.
            forwarder.hold = True
            mark, sent_mark = len(frames.received), len(frames.mutates_sent)
            tasks = [
                asyncio.create_task(client.mutate("counter.increment", name=names[i % k]))
                for i in range(args.mutations)
            ]
            await asyncio.sleep(args.settle)
            request_ids = {
                f["requestId"] for _, f in frames.received[mark:] if f["type"] == "mutation_result"
            }
            assert not request_ids, "an answer got through the hold"
            pending = set(frames.mutates_sent[sent_mark:])
            assert len(pending) == args.mutations, "the mutations were not sent"
            restored_at = partial(frames.restored_at, len(frames.received), query_ids, pending)
            t0 = time.monotonic()
            forwarder.drop()
            restored = await wait_until(restored_at, 10, "restored")
            restore.append(restored - t0)
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            await asyncio.sleep(args.pause)
    return base, restore


async def run(args: argparse.Namespace) -> None:
    deployment = DeploymentWithRedis({})
    forwarder: Forwarder | None = None
    try:
        deployment.start_redis()
        server = deployment.start_server()
        forwarder = await Forwarder(server.port, args.latency_ms / 1000).start()
        session = await sign_up(
            server.ws_url, f"bench-{uuid.uuid4().hex[:10]}@example.com", "bench-pw-1"
        )
        print(f"{describe_run()}; load {load_average()}")
        print(
            f"{args.repeat} rounds per row, {args.mutations} mutation(s) in flight at each drop, "
            f"{args.latency_ms:g} ms added each way; times in ms, median / p90\n"
        )
        print_header(
            "| K subscriptions | baseline: connect + 1 round trip "
            "| drop → restored | restored − baseline |"
        )
        for k in args.k:
            base, restore = await measure_k(forwarder, session, k, args)
            b50, b90 = statistics.median(base) * 1000, percentile(base, 90) * 1000
            r50, r90 = statistics.median(restore) * 1000, percentile(restore, 90) * 1000
            print(
                f"| {k} | {b50:.1f} / {b90:.1f} | {r50:.1f} / {r90:.1f} | {r50 - b50:.1f} |",
                flush=True,
            )
    finally:
        if forwarder is not None:
            await forwarder.close()
        deployment.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=lambda t: [int(x) for x in comma_list(t)], default=[1, 10, 50])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--mutations", type=int, default=1, help="in flight at each drop")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds they get to commit")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between rounds")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="one-way delay the forwarder adds to every chunk, both ways (a network's)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    run_bounded(lambda: run(args), args.timeout)


if __name__ == "__main__":
    main()
