"""Revocation latency across instances: sign-out on instance A -> ``session_revoked`` on B.

Two Tether processes (A and B) share one ``redis-server``. Each round (``--repeat``, default
200): sign up a user on A over HTTP, open a connection to B, ``connect``, ``authenticate`` and
wait for ``auth_ok``; then ``POST /auth/signout`` on A and wait for ``session_revoked`` on the
socket. The latency is the socket's receipt time (taken in ``data_received``) minus the time the
sign-out response was received; it is also given from the moment the request was sent. A
negative "from response" value means the socket heard of the revocation before the HTTP client
got its 204. B also holds ``--background`` idle authenticated connections (default 1,000).

Baseline, same run, same client, interleaved round by round: Redis ``PUBLISH`` on a channel ->
a bare ``websockets`` 17 server subscribed to it (redis-py asyncio) -> ``send`` on the socket
bound to that session. Its latency is counted from the ``PUBLISH`` reply: the floor for a
revocation that travels through Redis Pub/Sub from one Python process to another.

    .venv/bin/python bench/sync_revocation.py
    .venv/bin/python bench/sync_revocation.py --repeat 50 --background 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import redis.asyncio
from common import (
    ChildServer,
    DeploymentWithRedis,
    describe_run,
    percentile,
    print_header,
    quiet_gc,
    raise_nofile,
    run_bounded,
    serve_websockets,
    sign_up,
)
from sync_memory import Clients, LeanClient, lean_connect, tether_frames

TARGET_P99_MS = 100.0
CHANNEL = "bench:session-ended"


@dataclass
class Samples:
    label: str
    from_reply: list[float] = field(default_factory=list)
    from_request: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def tether_round(
    i: int, http_a: httpx.AsyncClient, ws_url_b: str, samples: Samples, timeout: float
) -> None:
    email = f"revoke-{uuid.uuid4().hex[:12]}@example.com"
    resp = await http_a.post("/auth/signup", json={"email": email, "password": "bench-pw-1"})
    resp.raise_for_status()
    token = resp.json()["accessToken"]
    ws = await lean_connect(ws_url_b)
    try:
        ws.send(json.dumps({"type": "connect", "clientId": f"revoke-{i}", "protocol": 1}))
        await expect(ws, "connected")
        ws.send(json.dumps({"type": "authenticate", "token": token, "authVersion": 1}))
        await expect(ws, "auth_ok")
        sent = time.time()
        resp = await http_a.post("/auth/signout", headers={"Authorization": f"Bearer {token}"})
        replied = time.time()
        if resp.status_code != 204:
            raise RuntimeError(f"sign-out answered {resp.status_code}: {resp.text}")
        received = await expect(ws, "session_revoked", timeout)
        samples.from_reply.append(received - replied)
        samples.from_request.append(received - sent)
    finally:
        ws.abort()


async def relay_round(
    i: int, publisher: redis.asyncio.Redis, ws_url: str, samples: Samples, timeout: float
) -> None:
    session_id = f"s{i}-{uuid.uuid4().hex[:8]}"
    ws = await lean_connect(ws_url)
    try:
        ws.send(json.dumps({"type": "bind", "sessionId": session_id}))
        await expect(ws, "bound")
        sent = time.time()
        await publisher.publish(CHANNEL, json.dumps({"sessionId": session_id}))
        replied = time.time()
        received = await expect(ws, "session_revoked", timeout)
        samples.from_reply.append(received - replied)
        samples.from_request.append(received - sent)
    finally:
        ws.abort()


async def expect(ws: LeanClient, kind: str, timeout: float = 10.0) -> float:
    """Wait for a message of type ``kind`` (skipping others); return its receipt time."""
    while True:
        text, received = await ws.recv(timeout)
        got = json.loads(text).get("type")
        if got == kind:
            return received
        if got in ("auth_error", "error"):
            raise RuntimeError(f"expected {kind}, got {text[:200]}")


async def run(args: argparse.Namespace) -> list[Samples]:
    deployment = DeploymentWithRedis(
        {
            "TETHER_ACCESS_TTL": "3600",
            "TETHER_LOG_LEVEL": "warning",
            # One sign-up per round from one address: lift the per-address limit.
            "TETHER_SIGNUP_LIMIT_ADDRESS": f"{args.repeat + 100}/60",
        }
    )
    relay: ChildServer | None = None
    background: Clients | None = None
    publisher: redis.asyncio.Redis | None = None
    try:
        deployment.start_redis()
        server_a = deployment.start_server()
        server_b = deployment.start_server()
        relay = ChildServer("relay", script=__file__, extra=("--redis-url", deployment.redis.url))
        publisher = redis.asyncio.Redis.from_url(deployment.redis.url)
        if args.background:
            tokens = await sign_up(server_a.base_url, 8)
            background = Clients(server_b.ws_url)
            await background.open_many(
                args.background,
                tether_frames(tokens),
                ["connected", "auth_ok"],
                50,
                "background on B",
            )
            print(f"  {len(background.conns)} idle authenticated connections on B", flush=True)
        tether = Samples("Tether: sign-out on A -> session_revoked on B")
        baseline = Samples("bare websockets + redis-py Pub/Sub relay")
        async with httpx.AsyncClient(
            base_url=server_a.base_url, timeout=30, trust_env=False
        ) as http_a:
            with quiet_gc():
                for i in range(args.repeat):
                    for samples, call in (
                        (tether, tether_round(i, http_a, server_b.ws_url, tether, args.wait)),
                        (baseline, relay_round(i, publisher, relay.ws_url, baseline, args.wait)),
                    ):
                        try:
                            await call
                        except Exception as exc:
                            samples.failures.append(f"{type(exc).__name__}: {exc}")
                    if (i + 1) % 50 == 0:
                        print(f"  {i + 1}/{args.repeat} rounds", flush=True)
        return [tether, baseline]
    except BaseException:
        print(deployment.log_tails(), file=sys.stderr)
        raise
    finally:
        if publisher is not None:
            await publisher.aclose()
        if background is not None:
            await background.abort_all()
        if relay is not None:
            relay.stop()
        deployment.close()


# ------------------------------------------------------------------------------ baseline server


def serve_relay(port: int, redis_url: str) -> None:
    """Forward each event on :data:`CHANNEL` to the socket bound to its session id."""
    from websockets.asyncio.server import ServerConnection
    from websockets.exceptions import ConnectionClosed

    bound: dict[str, ServerConnection] = {}

    async def handler(ws: ServerConnection) -> None:
        session_id = None
        try:
            async for message in ws:
                doc = json.loads(message)
                if doc.get("type") == "bind":
                    session_id = doc["sessionId"]
                    bound[session_id] = ws
                    await ws.send(json.dumps({"type": "bound"}))
        except ConnectionClosed:  # the load generator aborts its connections
            pass
        finally:
            if session_id is not None:
                bound.pop(session_id, None)

    async def listen(pubsub: redis.asyncio.client.PubSub) -> None:
        from websockets.exceptions import ConnectionClosed

        async for event in pubsub.listen():
            if event["type"] != "message":
                continue
            ws = bound.pop(json.loads(event["data"])["sessionId"], None)
            if ws is not None:
                try:
                    await ws.send(json.dumps({"type": "session_revoked", "reason": "signed_out"}))
                except ConnectionClosed:
                    pass

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)  # before listening: no event can be missed
        listener = asyncio.create_task(listen(pubsub))
        await serve_websockets(handler, port, backlog=100)  # asyncio's default
        listener.cancel()

    raise_nofile()
    asyncio.run(main())


# ------------------------------------------------------------------------------ main


def print_table(results: list[Samples], args: argparse.Namespace) -> None:
    print()
    print(
        f"Revocation latency, {args.repeat} rounds, {args.background} idle connections on B "
        "(ms; 'reply' = from the sign-out response / PUBLISH reply, 'request' = from sending it)"
    )
    header = (
        f"| {'path':<46} | {'n':>4} | {'reply p50':>9} | {'reply p99':>9} | {'reply max':>9} |"
        f" {'request p50':>11} | {'request p99':>11} | {'before reply':>12} |"
    )
    print_header(header)
    for s in results:
        if not s.from_reply:
            print(f"| {s.label:<46} | no samples; failures: {s.failures[:1]}")
            continue
        reply = [x * 1e3 for x in s.from_reply]
        request = [x * 1e3 for x in s.from_request]
        early = sum(1 for x in reply if x < 0)
        print(
            f"| {s.label:<46} | {len(reply):>4} | {percentile(reply, 50):>9.1f} | "
            f"{percentile(reply, 99):>9.1f} | {max(reply):>9.1f} | "
            f"{percentile(request, 50):>11.1f} | {percentile(request, 99):>11.1f} | "
            f"{early:>12} |"
        )
    tether = results[0]
    if tether.from_reply:
        p99 = percentile(tether.from_reply, 99) * 1e3
        verdict = "met" if p99 <= TARGET_P99_MS else "MISSED"
        print(
            f"Target: Tether p99 <= {TARGET_P99_MS:.0f} ms from the response -> "
            f"{p99:.1f} ms, {verdict}"
        )
    for s in results:
        if s.failures:
            print(f"note: {s.label}: {len(s.failures)} rounds failed, e.g. {s.failures[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200, help="rounds [200]")
    parser.add_argument("--background", type=int, default=1000, help="idle conns on B [1000]")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait per notice [5]")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    parser.add_argument("--serve", choices=["relay"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_relay(args.port, args.redis_url)
        return
    raise_nofile()
    print(f"sync_revocation: {args.repeat} rounds; {describe_run()}", flush=True)

    results = run_bounded(lambda: run(args), args.timeout)
    print_table(results, args)


if __name__ == "__main__":
    main()
