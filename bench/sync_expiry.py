"""Lateness of ``auth_expiring`` with N connections whose tokens expire spread over time.

Tether runs with ``TETHER_ACCESS_TTL=40`` and ``TETHER_EXPIRY_NOTICE=15``: a token minted at
``t`` has ``iat = floor(t)``, ``exp = iat + 40`` and its notice is due at ``exp - 15``. The load
generator (this process) opens ``--n`` connections (default 10,000) with ``connect``, then for
``--spread`` seconds (default 25) mints a fresh access token every ``--tick`` seconds (HTTP
``/auth/refresh`` on a handful of sessions, round robin) and authenticates the next batch of
connections with it. The notices are therefore due over about 25 s, in bursts at each second
(``exp`` has one-second resolution): N / 25 connections per burst. For each notice::

    lateness = (client receipt wall time) - (expiresAt - notice)

taken in ``data_received`` of the client connection, before any parsing. Client and server
share the machine and its clock. ``server part`` is ``serverTime`` (stamped by the server when it
built the frame) minus the due time: how late the server's timer fired, without the delivery.

Baseline, same run, same client and schedule: a bare ``websockets`` 17 server that arms one
``loop.call_at`` per connection for the same due time and sends the same frame.

    .venv/bin/python bench/sync_expiry.py
    .venv/bin/python bench/sync_expiry.py --n 2000 --spread 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from common import (
    ChildServer,
    DeploymentWithRedis,
    comma_list,
    describe_run,
    percentile,
    print_header,
    quiet_gc,
    raise_nofile,
    run_bounded,
    serve_websockets,
)
from sync_memory import Clients, LeanClient, token_stand_ins

ACCESS_TTL = 40
EXPIRY_NOTICE = 15
TARGET_P99_MS = 100.0
LABELS = {
    "timers": "bare websockets 17 + loop.call_at per conn",
    "tether": "Tether (one DeadlineQueue per instance)",
}


def jwt_times(token: str) -> tuple[int, int]:
    """``(iat, exp)`` of a JWT, read without verifying it (the server verifies)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return int(claims["iat"]), int(claims["exp"])


def notice_for(iat: int, exp: int) -> float:
    """Seconds before ``exp`` the notice is due (protocol: never more than half the life)."""
    return min(float(EXPIRY_NOTICE), (exp - iat) / 2)


@dataclass
class Run:
    kind: str
    connected: int = 0
    authenticated: int = 0
    #: id(client) -> (due time of its notice, seconds since the epoch)
    due: dict[int, float] = field(default_factory=dict)
    #: (client id, message text, receipt time) of every message after the opening exchange.
    inbox: list[tuple[int, str, float]] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    server_part: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    notices_seen: int = 0
    refresh_retries: int = 0
    #: How many connections received each sequence of message types (for a failed run).
    sequences: Counter[str] = field(default_factory=Counter)

    def on_message(self, client: LeanClient, text: str, received: float) -> None:
        # Keep the client's work per message minimal: parse after the run.
        self.inbox.append((id(client), text, received))
        if "auth_expiring" in text:
            self.notices_seen += 1

    def analyse(self) -> None:
        seen: set[int] = set()
        sequences: dict[int, list[str]] = {}
        for cid, text, received in self.inbox:
            doc = json.loads(text)
            kind = doc.get("type")
            sequences.setdefault(cid, []).append(f"{kind}:{doc.get('code', '')}")
            if kind == "auth_ok":
                self.authenticated += 1
            elif kind == "auth_expiring":
                if cid in seen:
                    self.duplicates += 1
                    continue
                seen.add(cid)
                due = self.due[cid]
                self.lateness.append(received - due)
                self.server_part.append(doc["serverTime"] / 1000 - due)
            elif kind in ("auth_error", "error", "session_revoked"):
                self.errors.append(text[:200])
        self.sequences = Counter(" ".join(seq) for seq in sequences.values())


async def mint_tokens(base_url: str, sessions: int) -> tuple[httpx.AsyncClient, list[str]]:
    """Sign up ``sessions`` users; return an HTTP client and their refresh tokens."""
    http = httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False)
    refresh = []
    for _ in range(sessions):
        email = f"expiry-{uuid.uuid4().hex[:12]}@example.com"
        resp = await http.post("/auth/signup", json={"email": email, "password": "bench-pw-1"})
        resp.raise_for_status()
        refresh.append(resp.json()["refreshToken"])
    return http, refresh


async def measure(kind: str, args: argparse.Namespace) -> Run:
    run = Run(kind)
    deployment: DeploymentWithRedis | None = None
    child: ChildServer | None = None
    clients: Clients | None = None
    keepalive: asyncio.Task[None] | None = None
    http: httpx.AsyncClient | None = None
    refresh_tokens: list[str] = []
    try:
        if kind == "tether":
            deployment = DeploymentWithRedis(
                {
                    "TETHER_ACCESS_TTL": str(ACCESS_TTL),
                    "TETHER_EXPIRY_NOTICE": str(EXPIRY_NOTICE),
                    "TETHER_LOG_LEVEL": "warning",
                }
            )
            deployment.start_redis()
            server = deployment.start_server()
            url = server.ws_url
            http, refresh_tokens = await mint_tokens(server.base_url, args.sessions)
        else:
            child = ChildServer("timers", script=__file__)
            url = child.ws_url

        def connect_frame(i: int) -> list[str]:
            return [json.dumps({"type": "connect", "clientId": f"expiry-{i}", "protocol": 1})]

        clients = Clients(url, args.source_ips, on_message=run.on_message)
        print(f"{LABELS[kind]}: opening {args.n} connections", flush=True)
        seconds = await clients.open_many(
            args.n, connect_frame, ["connected"], args.concurrency, kind
        )
        run.connected = len(clients.conns)
        print(f"  {run.connected} connected in {seconds:.1f} s", flush=True)
        if clients.failures:
            print(f"  {len(clients.failures)} failed, e.g. {clients.failures[0]}", flush=True)
        keepalive = asyncio.create_task(clients.keepalive(json.dumps({"type": "ping"})))
        with quiet_gc():
            await authenticate_and_wait(run, clients, http, refresh_tokens, args)
        run.analyse()
        return run
    except BaseException:
        if deployment is not None:
            print(deployment.log_tails(), file=sys.stderr)
        raise
    finally:
        if keepalive is not None:
            keepalive.cancel()
        if http is not None:
            await http.aclose()
        if clients is not None:
            await clients.abort_all()
        if child is not None:
            child.stop()
        if deployment is not None:
            deployment.close()


async def authenticate_and_wait(
    run: Run,
    clients: Clients,
    http: httpx.AsyncClient | None,
    refresh_tokens: list[str],
    args: argparse.Namespace,
) -> None:
    """Authenticate the connections batch by batch, then wait for every notice."""
    ticks = max(1, round(args.spread / args.tick))
    batch = math.ceil(run.connected / ticks)
    stand_in = token_stand_ins(1)[0]
    loop = asyncio.get_running_loop()
    start = loop.time()
    last_due = 0.0
    for tick in range(ticks):
        first = tick * batch
        conns = clients.conns[first : first + batch]
        if not conns:
            break
        await asyncio.sleep(max(0.0, start + tick * args.tick - loop.time()))
        if http is not None:
            session = tick % len(refresh_tokens)
            for attempt in range(10):
                resp = await http.post(
                    "/auth/refresh", json={"refreshToken": refresh_tokens[session]}
                )
                if resp.status_code != 503:
                    break
                # 503 unavailable means "retry" (protocol section 2); count it, it is a finding.
                run.refresh_retries += 1
                await asyncio.sleep(0.05 * (attempt + 1))
            if resp.status_code != 200:
                raise RuntimeError(f"refresh at tick {tick}: {resp.status_code} {resp.text}")
            body = resp.json()
            refresh_tokens[session] = body["refreshToken"]
            token = body["accessToken"]
            iat, exp = jwt_times(token)
        else:
            token = stand_in
            iat = int(time.time())
            exp = iat + ACCESS_TTL
        due = exp - notice_for(iat, exp)
        last_due = max(last_due, due)
        frame = json.dumps(
            {
                "type": "authenticate",
                "token": token,
                "authVersion": 1,
                # Ignored by Tether (unknown fields are); the baseline arms its timer here.
                "expiresAt": exp * 1000,
                "dueAt": due * 1000,
            }
        )
        # Spread the batch over the tick: a burst of hundreds of authenticates at once
        # is another benchmark (sync_connect.py), and exhausts Tether's Redis pool.
        chunks = max(1, math.ceil(len(conns) / args.burst))
        for c in range(chunks):
            now = time.monotonic()
            for i in range(first + c * args.burst, first + min(len(conns), (c + 1) * args.burst)):
                ws = clients.conns[i]
                run.due[id(ws)] = due
                ws.send(frame)
                clients.last_sent[i] = now  # no keepalive ping before the notice is due
            if c + 1 < chunks:
                await asyncio.sleep(args.tick * 0.8 / chunks)
        if tick % max(1, round(2 / args.tick)) == 0:
            print(
                f"  authenticating: {min((tick + 1) * batch, run.connected)}"
                f"/{run.connected}, notices from t+{due - time.time():.0f} s",
                flush=True,
            )

    # Wait for every notice (or give up 10 s after the last one was due).
    while time.time() < last_due + 10 and run.notices_seen < len(run.due):
        await asyncio.sleep(2.0)
        left = last_due - time.time()
        print(
            f"  notices received: {run.notices_seen}/{len(run.due)} "
            f"(last due in {max(left, 0):.0f} s)",
            flush=True,
        )


# ------------------------------------------------------------------------------ baseline server


def serve_timers(port: int) -> None:
    """The baseline: one ``loop.call_at`` per authenticated connection, then one send."""
    from websockets.asyncio.server import ServerConnection
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        sending: set[asyncio.Future[None]] = set()
        try:
            async for message in ws:
                doc = json.loads(message)
                kind = doc.get("type")
                if kind == "connect":
                    await ws.send(json.dumps({"type": "connected", "serverTime": now_ms()}))
                elif kind == "authenticate":
                    expires_at, due = doc["expiresAt"], doc["dueAt"] / 1000

                    def fire(expires_at: Any = expires_at) -> None:
                        frame = {"type": "auth_expiring", "expiresAt": expires_at}
                        frame["serverTime"] = now_ms()
                        task = asyncio.ensure_future(ws.send(json.dumps(frame)))
                        sending.add(task)
                        task.add_done_callback(sending.discard)

                    if timer is not None:
                        timer.cancel()
                    timer = loop.call_at(loop.time() + due - time.time(), fire)
                    await ws.send(json.dumps({"type": "auth_ok", "serverTime": now_ms()}))
                elif kind == "ping":
                    await ws.send(json.dumps({"type": "pong", "serverTime": now_ms()}))
        except ConnectionClosed:  # the load generator aborts its connections at the end
            pass
        finally:
            if timer is not None:
                timer.cancel()

    raise_nofile()
    asyncio.run(serve_websockets(handler, port, backlog=1024))


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------ main


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    print()
    print(
        f"auth_expiring lateness, N = {args.n:,}, due over {args.spread:.0f} s "
        f"(TTL {ACCESS_TTL} s, notice {EXPIRY_NOTICE} s)"
    )
    header = (
        f"| {'server':<42} | {'notices':>13} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} |"
        f" {'server part p50/p99/max ms':>26} |"
    )
    print_header(header)
    for run in runs:
        if not run.lateness:
            print(f"| {LABELS[run.kind]:<42} | {'0':>13} | no notices received")
            continue
        lat = [x * 1e3 for x in run.lateness]
        srv = [x * 1e3 for x in run.server_part]
        server_part = f"{percentile(srv, 50):.0f} / {percentile(srv, 99):.0f} / {max(srv):.0f}"
        print(
            f"| {LABELS[run.kind]:<42} | {len(lat):>6}/{len(run.due):<6} | "
            f"{percentile(lat, 50):>7.1f} | {percentile(lat, 99):>7.1f} | {max(lat):>7.1f} |"
            f" {server_part:>26} |"
        )
    tether = next((r for r in runs if r.kind == "tether"), None)
    if tether and tether.lateness:
        p99 = percentile(tether.lateness, 99) * 1e3
        verdict = "met" if p99 <= TARGET_P99_MS else "MISSED"
        missing = len(tether.due) - len(tether.lateness)
        print(f"Target: Tether p99 <= {TARGET_P99_MS:.0f} ms -> {p99:.1f} ms, {verdict}")
        if missing:
            print(f"MISSED: {missing} connections got no auth_expiring")
    for run in runs:
        if run.refresh_retries:
            print(f"note: {run.kind}: {run.refresh_retries} token refreshes answered 503, retried")
        if run.errors or run.duplicates:
            print(f"note: {run.kind}: {len(run.errors)} unexpected messages, e.g. {run.errors[:1]}")
            print(f"note: {run.kind}: {run.duplicates} duplicate notices")
            for seq, count in run.sequences.most_common(5):
                print(f"note: {run.kind}: {count} connections received: {seq}")


async def run_all(args: argparse.Namespace) -> list[Run]:
    return [await measure(kind, args) for kind in args.servers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="connections [10000]")
    parser.add_argument("--spread", type=float, default=25.0, help="seconds to mint over [25]")
    parser.add_argument("--tick", type=float, default=0.25, help="seconds between mints [0.25]")
    parser.add_argument("--sessions", type=int, default=8, help="sessions refreshed in turn [8]")
    parser.add_argument(
        "--burst", type=int, default=20, help="authenticates sent back to back, at most [20]"
    )
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--servers", default="timers,tether", help="rows [timers,tether]")
    parser.add_argument("--source-ips", type=int, default=1, help="127.0.0.1..K as sources [1]")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many s")
    parser.add_argument("--serve", choices=["timers"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_timers(args.port)
        return
    args.servers = comma_list(args.servers)
    if set(args.servers) - set(LABELS):
        parser.error(f"--servers: choose among {', '.join(LABELS)}")
    if raise_nofile() < args.n + 100:
        parser.error("RLIMIT_NOFILE too low for --n")
    # Refreshes: one every --tick seconds, round robin over the sessions; keep each session
    # under the default refresh limit (120 per 60 s).
    if 60 / (args.tick * args.sessions) > 100:
        parser.error("too many refreshes per session: raise --sessions or --tick")
    print(f"sync_expiry: N={args.n}, spread {args.spread} s; {describe_run()}", flush=True)

    runs = run_bounded(lambda: run_all(args), args.timeout)
    print_table(runs, args)


if __name__ == "__main__":
    main()
