"""The ASGI application: wires settings, Redis, keys and services, and owns their lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from tether.protocol import HTTPCode
from tether.server.auth.errors import AuthFailure
from tether.server.auth.http import AuthRoutes, error_response, http_error
from tether.server.auth.passwords import Passwords
from tether.server.auth.refresh_tokens import RefreshTokenCodec
from tether.server.auth.service import AuthService
from tether.server.auth.sessions import SessionStore
from tether.server.auth.signing_keys import KeyRing, KeySetError
from tether.server.auth.tokens import AccessTokens
from tether.server.browser import browser_routes
from tether.server.clock import Clock, system_clock
from tether.server.cors import CORSMiddleware
from tether.server.data.engine import QueryEngine
from tether.server.data.functions import App
from tether.server.data.store import Store
from tether.server.errors import HTTPError
from tether.server.metrics import Metrics
from tether.server.realtime.core import RESULT_ENVELOPE
from tether.server.realtime.endpoint import SyncEndpoint
from tether.server.realtime.live_sockets import LiveSockets
from tether.server.realtime.observe import connection_collector
from tether.server.realtime.session_hub import SessionHub
from tether.server.redis.connection import RedisClient, connect
from tether.server.settings import Settings, SettingsError
from tether.server.tasks import stop_tasks

log = logging.getLogger("tether")

SYNC_PATH = "/sync"

#: Seconds a readiness probe waits for Redis before answering 503.
READY_PING_TIMEOUT = 1.0


@dataclass
class Node:
    """Everything one Tether instance shares between its HTTP routes and its sockets."""

    settings: Settings
    redis: RedisClient
    keyring: KeyRing
    tokens: AccessTokens
    sessions: SessionStore
    auth: AuthService
    passwords: Passwords
    hub: SessionHub
    live: LiveSockets
    store: Store
    sync: SyncEndpoint
    clock: Clock
    metrics: Metrics

    @classmethod
    def build(cls, settings: Settings, application: App, clock: Clock = system_clock) -> Node:
        if settings.redis_url is None:
            raise ValueError("redis_url must be set (the CLI starts an embedded Redis)")
        metrics = Metrics()
        keyring = _load_keyring(settings)
        redis = connect(
            settings.redis_url, pipeline_max_commands=settings.redis_pipeline_max_commands
        )
        tokens = AccessTokens(
            keyring,
            issuer=settings.effective_issuer,
            audience=settings.audience,
            leeway=settings.clock_leeway,
        )
        codec = RefreshTokenCodec(keyring.current.refresh_secret)
        sessions = SessionStore(redis, codec, settings, clock, metrics=metrics)
        passwords = Passwords(settings)
        auth = AuthService(settings, redis, sessions, tokens, passwords, clock, metrics=metrics)
        hub = SessionHub(settings.redis_url, sessions, metrics=metrics)
        live = LiveSockets(redis, hub, settings.live_sockets_interval)
        store = Store(
            redis,
            schema=application.schema,
            clock=clock,
            stream_maxlen=settings.commit_stream_maxlen,
            commit_values_bytes=settings.commit_values_bytes,
            outcome_ttl=settings.mutation_outcome_ttl,
            max_session_partitions=settings.max_session_partitions,
            # No frame over the send limit (contract §5 rule 9): a mutation_result carries its
            # value whole. A query result is held to less by the connection's result budget.
            max_result_bytes=max(
                1, min(settings.max_result_bytes, settings.send_queue_bytes - RESULT_ENVELOPE)
            ),
            max_retries=settings.mutation_retries,
            max_batch=settings.mutation_batch,
            max_batch_bytes=settings.mutation_batch_bytes,
            metrics=metrics,
        )
        engine = QueryEngine(application, store)
        sync = SyncEndpoint(settings, auth, hub, application, engine, clock, metrics)
        metrics.add_collector(connection_collector(sync.connections))
        return cls(
            settings,
            redis,
            keyring,
            tokens,
            sessions,
            auth,
            passwords,
            hub,
            live,
            store,
            sync,
            clock,
            metrics,
        )

    async def ready(self) -> bool:
        if not self.hub.ready.is_set():
            return False  # not yet listening for revocations: sockets would miss them
        try:
            async with asyncio.timeout(READY_PING_TIMEOUT):
                return bool(await self.redis.ping())
        except (RedisError, TimeoutError, OSError):
            return False

    async def sweep_sessions_forever(self) -> None:
        """End expired sessions (announcing them) every ``session_sweep_interval`` seconds."""
        while True:
            try:
                await self.sessions.sweep_expired()
            except RedisError as exc:
                self.metrics.redis_error("sweep")
                log.warning("session sweep skipped: %s", exc.__class__.__name__)
            except Exception:
                log.exception("session sweep failed")
            await asyncio.sleep(self.settings.session_sweep_interval)

    async def close(self) -> None:
        self.sync.close()
        await self.hub.close()
        await self.live.close()
        await self.sessions.aclose()
        self.passwords.close()
        await self.redis.aclose()


def _load_keyring(settings: Settings) -> KeyRing:
    """The signing keys of ``settings``; :class:`SettingsError` naming the setting when they
    cannot be read (the message shows no key material)."""
    if settings.keys is not None:
        try:
            return KeyRing(inline=settings.keys)
        except KeySetError as exc:
            raise SettingsError(f"TETHER_KEYS: {exc}") from None
    path = settings.effective_keys_file
    name = "TETHER_KEYS_FILE" if settings.keys_file is not None else "TETHER_DATA_DIR"
    try:
        keyring = KeyRing(path=path, algorithm=settings.signing_algorithm)
    except KeySetError as exc:
        raise SettingsError(f"{name}: the key file {path}: {exc}") from None
    except OSError as exc:
        raise SettingsError(
            f"{name}: cannot read or create the key file {path}: {exc.strerror or exc}"
        ) from None
    signer = keyring.current.signing_key
    if signer.alg != settings.signing_algorithm:
        # The setting only chooses the algorithm of new keys: an existing file keeps signing
        # with its own until someone rotates.
        log.warning(
            "the key file's signing key %s is %s while TETHER_SIGNING_ALGORITHM is %s: "
            "run `tether keys rotate` to sign with %s",
            signer.kid,
            signer.alg,
            settings.signing_algorithm,
            settings.signing_algorithm,
        )
    return keyring


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background task of the instance ended other than by cancellation: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())


def dump_tasks() -> None:
    """Log every asyncio task of the process with where it waits (``kill -USR1 <pid>``): for an
    instance that is alive but stuck, it shows which await is holding it."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"{len(tasks)} tasks (SIGUSR1):"]
    for task in tasks:
        frames = task.get_stack()
        where = " <- ".join(
            f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno})"
            for f in reversed(frames)
        )
        lines.append(f"  {task.get_name()}: {where or 'not started'}")
    log.warning("%s", "\n".join(lines))


@contextlib.contextmanager
def _dump_tasks_on_signal() -> Iterator[None]:
    """SIGUSR1 logs every task's stack, where the platform and thread allow a handler."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        yield  # no SIGUSR1 (Windows), or not the main thread (an app embedded in a test)
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def create_app(
    settings: Settings, application: object | None = None, *, clock: Clock = system_clock
) -> TetherApp:
    """The Tether ASGI app for ``settings``; ``application`` is the user's function registry
    (``None``: the built-in demo)."""
    from tether.server.demo import app as demo

    if application is None:
        application = demo
    if not isinstance(application, App):
        raise TypeError(
            f"the application must be a tether.server.data.functions.App, not {application!r}"
        )
    node = Node.build(settings, application, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(node.sweep_sessions_forever(), name="session-sweep"),
            asyncio.create_task(node.hub.run(), name="session-hub"),
            asyncio.create_task(node.sync.subscriptions.run(), name="subscriptions"),
            asyncio.create_task(node.live.run(), name="live-sockets"),
        ]
        for task in tasks:
            task.add_done_callback(_report_crash)
        try:
            with _dump_tasks_on_signal():
                yield
        finally:
            await stop_tasks(tasks)
            await node.sync.partitions.close()
            await node.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if await node.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    # The token's SHA-256, compared with the presented one's: two 32-byte values, so the
    # comparison's time says nothing about the token's length (compare_digest of the raw
    # strings returns at once when the lengths differ).
    metrics_digest = (
        None
        if settings.metrics_token is None
        else hashlib.sha256(settings.metrics_token.encode()).digest()
    )

    def metrics_allowed(request: Request) -> bool:
        if metrics_digest is None:
            return True
        # The scheme is case-insensitive (RFC 7235), as for the other bearer routes.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(presented, metrics_digest) and scheme.lower() == "bearer"

    async def metrics(request: Request) -> Response:
        if not metrics_allowed(request):
            return JSONResponse(
                {"error": HTTPCode.INVALID_TOKEN, "message": "GET /metrics needs its bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        registry = node.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_response(exc)

    async def on_auth_failure(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuthFailure)
        return error_response(http_error(exc))

    async def on_client_disconnect(request: Request, exc: Exception) -> Response:
        # The client went away before its body was read: nobody to answer (uvicorn drops what
        # is sent now), nothing wrong with the server. One debug line, not a traceback.
        log.debug("%s %s: the client disconnected mid-request", request.method, request.url.path)
        return Response(status_code=400)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = HTTPCode.NOT_FOUND if exc.status_code == 404 else HTTPCode.INVALID_REQUEST
        return JSONResponse(
            {"error": code, "message": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *AuthRoutes(
            node.auth, settings.max_request_bytes, settings.origin_rules, settings.max_json_depth
        ).routes(),
        *browser_routes(demo=application is demo),
        *([Route("/metrics", metrics, methods=["GET"])] if settings.metrics else []),
        WebSocketRoute(SYNC_PATH, node.sync),  # reached only if TetherApp is bypassed
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # Inside Starlette's error middleware, outside its exception handlers: error answers
        # of the API carry CORS headers too, so a page can read their codes.
        middleware=[Middleware(CORSMiddleware, allowed_origins=settings.origin_rules)],
        exception_handlers={
            HTTPError: on_http_error,
            AuthFailure: on_auth_failure,
            HTTPException: on_http_exception,
            ClientDisconnect: on_client_disconnect,
        },
    )
    app.state.node = node
    return TetherApp(app, node)


class TetherApp:
    """The ASGI entry point: ``/sync`` sockets go straight to the endpoint, everything else
    (HTTP, lifespan) to Starlette. Skipping the router for sockets saves several coroutines and
    ~3 KiB per idle connection (see ``docs/benchmarks.md``)."""

    def __init__(self, app: Starlette, node: Node) -> None:
        self.app = app
        self.node = node
        self.state = app.state

    async def drain(self, drain_timeout: float) -> int:
        """Close every ``/sync`` socket with 1012 and wait at most ``drain_timeout`` seconds for
        them (``TETHER_DRAIN_TIMEOUT`` under ``tether serve``); return how many are still open.

        The ASGI server calls this when shutdown begins, before it closes connections itself:
        the lifespan's shutdown comes only after every connection has ended, too late to drain.
        """
        return await self.node.sync.drain(drain_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.dispatch(scope, receive, send)

    def dispatch(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """:meth:`__call__` without a coroutine of its own, which would stay suspended under
        every idle socket (~250 bytes each): ``tether serve`` gives this to uvicorn as an ASGI 3
        app. (``__call__`` stays a coroutine function, which ASGI servers detect as ASGI 3.)"""
        if scope["type"] == "websocket" and scope["path"] == SYNC_PATH:
            return self.node.sync(scope, receive, send)
        return self.app(scope, receive, send)
