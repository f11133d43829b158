"""The server's commands of ``tether``: the package root composes the whole command
(:mod:`tether.cli`, also ``python -m tether``) from these and the client's
(:mod:`tether.client.cli`), so the server never imports the client.

Subcommands::

    tether serve [MODULE[:ATTR]]    run the server (the built-in demo application without one)
    tether keys rotate              add a new signing key to the key file
    tether sessions revoke          end sessions of a user, or one session, on a running deployment
    tether sessions list            a user's active sessions, with their live sockets per instance
    tether users find EMAIL         a user's id, creation time and session count

Exit codes: 0 success (including a shutdown asked for with SIGTERM or Ctrl-C), 1 a runtime
failure, 2 a usage or configuration error (the message, on stderr, names the flag or variable).

The modules that need the whole server (``tether.server.app``, ``tether.server.auth.signing_keys``,
``tether.server.auth.sessions``) are imported inside the command that uses them: ``tether --help``
and a configuration error answer without loading them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from tether.server import tasks
from tether.server.compat.uvicorn import draining_server, limited_protocols
from tether.server.connection_limits import AddressCap, TrustedProxies
from tether.server.log_repeats import RepeatFilter
from tether.server.log_repeats import install as install_log_filter
from tether.server.redis.embedded import URL_FILE_NAME, EmbeddedRedis
from tether.server.settings import ENV_PREFIX, SIGNING_ALGORITHMS, Settings, SettingsError

if TYPE_CHECKING:
    from tether.server.app import TetherApp
    from tether.server.redis.connection import RedisClient

PROG = "tether"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A command cannot run; the message is printed as ``tether: <message>``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _ShutdownRequested(BaseException):
    """Raised by our SIGTERM/SIGINT handler. A BaseException so that no ``except Exception`` on
    the way swallows it, as with KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Seconds uvicorn's shutdown waits, after Tether's own drain, for HTTP requests in flight and for
#: the transports of closed sockets to finish before it cancels them.
SHUTDOWN_GRACE = 5

#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD_YOUNG = 50_000


#: Registers more subcommands on the ``tether`` parser (as ``tether.client.cli`` does); each
#: parser it adds sets ``run``, a function of the parsed arguments returning the exit code.
AddCommands = Callable[["argparse._SubParsersAction[Any]"], None]


def main(argv: list[str] | None = None, *, more_commands: Sequence[AddCommands] = ()) -> int:
    """Run ``tether`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    ``more_commands`` register the subcommands that are not the server's (the package root
    passes the client's): they share this parser, its exit codes and its error handling.
    """
    parser = _build_parser(more_commands)
    try:
        args = parser.parse_args(_attach_ids(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.run(args)
        return code
    except (SettingsError, CommandError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CommandError) else EXIT_USAGE


# ---------------------------------------------------------------------------------- arguments

#: Options whose value is an id: ids made by ``secrets.token_urlsafe`` may begin with ``-``.
_ID_OPTIONS = ("--user", "--session")
#: What may follow them that is an option, not an id (a forgotten id stays a usage error).
_ADMIN_OPTIONS = (
    "--user", "--session", "--email", "--json", "--redis-url", "--data-dir", "-h", "--help"
)  # fmt: skip


def _attach_ids(argv: list[str]) -> list[str]:
    """``--session -abc`` as ``--session=-abc``: argparse would take ``-abc`` for an option and
    refuse the command (about one id in 64 begins with ``-``)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if (
            arg in _ID_OPTIONS
            and value.startswith("-")
            and value.partition("=")[0] not in _ADMIN_OPTIONS
        ):
            out.append(f"{arg}={value}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _build_parser(more_commands: Sequence[AddCommands] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tether: a realtime sync backend.",
        epilog=f"Every setting also reads {ENV_PREFIX}<NAME>; a flag beats the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Without --redis-url (or TETHER_REDIS_URL) it starts an "
        "embedded redis-server with its data in the data directory.",
        epilog=_settings_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "application",
        nargs="?",
        metavar="MODULE[:ATTR]",
        help="the application (its queries and mutations): the App named ATTR in MODULE, "
        "'app' when ATTR is left out (polls is polls:app); default: the built-in demo",
    )
    serve.add_argument("--host", help="address to listen on [127.0.0.1]")
    serve.add_argument("--port", type=int, help="port to listen on [8000]")
    _add_redis_url(serve)
    _add_data_dir(serve)
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="[info]")
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="manage signing keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    rotate = keys_commands.add_parser(
        "rotate",
        help="add a new signing key",
        description="Add a new signing key in front of the key file. Running servers that "
        "read the file pick it up within seconds; servers given TETHER_KEYS inline need a restart.",
    )
    rotate.add_argument(
        "--keys-file", type=Path, help="the key file [TETHER_KEYS_FILE or DATA_DIR/keys.json]"
    )
    rotate.add_argument(
        "--alg",
        dest="signing_algorithm",
        choices=SIGNING_ALGORITHMS,
        help="the new key's algorithm [TETHER_SIGNING_ALGORITHM or ES256]",
    )
    _add_data_dir(rotate)
    rotate.set_defaults(run=_keys_rotate)

    sessions = commands.add_parser("sessions", help="manage sessions")
    sessions_commands = sessions.add_subparsers(
        dest="sessions_command", required=True, metavar="COMMAND"
    )
    revoke = sessions_commands.add_parser(
        "revoke",
        help="end sessions now, on every instance",
        description="End every session of a user, or one session. Live connections of those "
        "sessions receive session_revoked with reason 'revoked'.",
    )
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="end every session of this user")
    who.add_argument("--email", metavar="EMAIL", help="end every session of this user")
    who.add_argument("--session", metavar="ID", help="end this session")
    _add_admin_redis(revoke)
    revoke.set_defaults(run=_sessions_revoke)

    listing = sessions_commands.add_parser(
        "list",
        help="a user's active sessions and their live sockets",
        description="List a user's active sessions: id, creation, last refresh, when it "
        "expires, and its live (authenticated) sockets summed over every instance. Instances "
        "report their sockets within a second of a change; a stopped instance's count "
        "disappears within 3 x TETHER_LIVE_SOCKETS_INTERVAL. Times are UTC.",
    )
    whose = listing.add_mutually_exclusive_group(required=True)
    whose.add_argument("--user", metavar="ID", help="the user's id")
    whose.add_argument("--email", metavar="EMAIL", help="the user's e-mail address")
    _add_json(listing)
    _add_admin_redis(listing)
    listing.set_defaults(run=_sessions_list)

    users = commands.add_parser("users", help="look up users")
    users_commands = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    find = users_commands.add_parser(
        "find",
        help="a user by e-mail address",
        description="Print the user's id, creation time (UTC), active sessions and live "
        "sockets. Exits 1 when no user has the address.",
    )
    find.add_argument("email", metavar="EMAIL")
    _add_json(find)
    _add_admin_redis(find)
    find.set_defaults(run=_users_find)
    for add_commands in more_commands:
        add_commands(commands)
    return parser


def _add_redis_url(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument("--redis-url", metavar="URL", help="redis://HOST:PORT/DB" + extra)


def _add_admin_redis(parser: argparse.ArgumentParser) -> None:
    _add_redis_url(
        parser,
        extra=" [TETHER_REDIS_URL, else the embedded Redis of a server running on DATA_DIR]",
    )
    _add_data_dir(parser)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print JSON (times in ms since the epoch)"
    )


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, metavar="PATH", help="embedded Redis data and key file [.tether]"
    )


def _settings_table() -> str:
    rows = Settings.documented()
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {doc} [{default}]" for name, default, doc in rows]
    return "environment:\n" + "\n".join(lines)


#: ``TETHER_*`` variables that are not server settings but are read by other ``tether`` commands
#: (the client's, in ``tether.client.cli``): no warning for them.
OTHER_VARIABLES = ("TETHER_PASSWORD",)


def _load_settings(
    args: argparse.Namespace, *flags: str, only: Collection[str] | None = None
) -> Settings:
    """Settings from the environment, with the given flags (when given) beating it; with
    ``only``, the other settings keep their defaults (see :meth:`Settings.load`).

    Warns on stderr about every ``TETHER_*`` variable that names no setting (a typo would
    otherwise be ignored without a word), with the closest setting's name.
    """
    for name, closest in Settings.unknown_variables(also_known=OTHER_VARIABLES):
        hint = f"; did you mean {closest}?" if closest else f" (see {PROG} serve --help)"
        print(f"{PROG}: warning: {name} is not a setting and is ignored{hint}", file=sys.stderr)
    overrides: dict[str, Any] = {flag: getattr(args, flag) for flag in flags}
    return Settings.load(overrides, only=only)


# ---------------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    settings = _load_settings(args, "host", "port", "redis_url", "data_dir", "log_level")
    application = load_application(args.application) if args.application else None
    try:
        from tether.server.app import create_app
    except ImportError as exc:
        raise CommandError(f"cannot load the server: {exc}", EXIT_FAILURE) from exc

    from tether.server.logs import configure as configure_logging

    configure_logging(settings.log_format, settings.log_level)
    embedded: EmbeddedRedis | None = None
    # Listening first: a port in use stops the server before it starts anything else.
    sockets = listen(settings.host, settings.port)
    with _shutdown_on_signals():
        try:
            if settings.redis_url is None:
                embedded = EmbeddedRedis(settings.data_dir)
                try:
                    url = embedded.start()
                except RuntimeError as exc:
                    raise CommandError(f"embedded Redis: {exc}", EXIT_FAILURE) from exc
                except OSError as exc:
                    raise CommandError(
                        f"{ENV_PREFIX}DATA_DIR: cannot use {settings.data_dir} for the embedded "
                        f"Redis: {exc.strerror or exc}",
                        EXIT_FAILURE,
                    ) from exc
                # Its address, not its URL: the URL holds the password.
                logging.getLogger("tether").info(
                    "embedded Redis: %s on %s, data in %s",
                    embedded.binary,
                    embedded.address,
                    settings.data_dir,
                )
                settings = dataclasses.replace(settings, redis_url=url)
            return _run_uvicorn(settings, create_app(settings, application), sockets)
        except _ShutdownRequested:
            return EXIT_OK
        finally:
            for sock in sockets:
                sock.close()
            # Last step of every exit path: the server has drained, now its Redis can go. A
            # second signal must not cut this short (stop() is bounded: SIGKILL after 5 s).
            _ignore_shutdown_signals()
            if embedded is not None:
                embedded.stop()


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to ``host``:``port`` (one per address the host resolves to, as uvicorn
    would bind them), not yet listening.

    Raises :class:`CommandError` naming the setting: a port in use (and how to choose another),
    or a host this machine cannot listen on.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise CommandError(
            f"{ENV_PREFIX}HOST: cannot listen on {host!r}: {exc.strerror}", EXIT_FAILURE
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"{ENV_PREFIX}PORT: port {port} on {host} is already in use (another server "
                f"listens there); choose another with --port PORT or {ENV_PREFIX}PORT",
                EXIT_FAILURE,
            ) from None
        raise CommandError(
            f"{ENV_PREFIX}HOST: cannot listen on {host}:{port}: {exc.strerror or exc}",
            EXIT_FAILURE,
        ) from None
    return sockets


def _run_uvicorn(settings: Settings, app: TetherApp, sockets: list[socket.socket]) -> int:
    import gc

    import uvicorn

    # Each idle socket holds ~100 objects the collector tracks; with the default thresholds,
    # thousands of sockets mean full collections pausing the loop for up to a second (see
    # docs/benchmarks.md). Start-up objects are frozen out of collections, and young
    # collections run less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_YOUNG, 20, 10)

    http_protocol, ws_protocol = limited_protocols(
        AddressCap(settings.max_connections_per_address),
        TrustedProxies(settings.trusted_proxies),
        settings.request_timeout,
        settings.close_grace,
    )
    config = uvicorn.Config(
        app.dispatch,  # one coroutine fewer per socket than the app itself (TetherApp.dispatch)
        interface="asgi3",
        host=settings.host,
        port=settings.port,
        # h11 and websockets-sansio, with Tether's request deadline and per-address cap.
        http=http_protocol,
        ws=ws_protocol,
        timeout_keep_alive=settings.keep_alive_timeout,
        ws_per_message_deflate=False,
        # Frames over the limit are refused by the WebSocket layer with 1009 before they are
        # buffered whole; the endpoint checks again for servers run another way.
        ws_max_size=settings.max_message_bytes,
        # WebSocket pings, answered by the client's WebSocket layer while it reads: the only
        # sign of a client that stopped reading when its kernel still takes what we send (large
        # socket buffers) and it keeps sending `ping`s. No answer within an interval: the
        # connection is dropped (contract §5 rule 9).
        ws_ping_interval=float(settings.ping_interval),
        ws_ping_timeout=float(settings.ping_interval),
        lifespan="on",
        log_level=settings.log_level.lower(),
        # uvicorn installs no handlers: its lines (the access log too) go to the root handler
        # of tether.server.logs.configure, in TETHER_LOG_FORMAT, with ids, redacted.
        log_config=None,
        # Counted from the end of Tether's drain (compat.uvicorn.draining_server), which closed
        # the sockets with 1012 and bounded its own wait by TETHER_DRAIN_TIMEOUT.
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        # X-Forwarded-For/-Proto are believed only from the configured proxies: anyone else
        # could name any address and escape the per-address rate limits.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
    )
    # uvicorn.Config has configured its loggers by now: the filter goes on their handlers and
    # on the root's, so a flood of one warning or error is logged once per interval.
    install_log_filter(RepeatFilter(settings.log_repeat_interval))
    server = draining_server(config, lambda: app.drain(settings.drain_timeout))
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown while serve() runs. Afterwards it
    # re-raises the signal it caught; our handler (see _shutdown_on_signals) then raises
    # _ShutdownRequested, which the caller reads as a clean exit.
    try:
        # asyncio.run, but a task that ignores its cancellation cannot hold up the exit.
        tasks.run(server.serve(sockets=sockets))
    except SystemExit as exc:  # uvicorn exits this way when its start-up fails
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    if not server.started:
        print(f"{PROG}: the server did not start (see the log above)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


@contextmanager
def _shutdown_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`_ShutdownRequested` while the block runs.

    Outside uvicorn's serve() (starting the embedded Redis, building the app) this lets the
    ``finally`` of the caller stop Redis; inside it, uvicorn installs its own handlers and
    restores these afterwards. Python's default SIGTERM action would kill the process on the
    spot, skipping every ``finally``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _ignore_shutdown_signals()  # once shutdown is under way, nothing may interrupt cleanup
        raise _ShutdownRequested(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SHUTDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_shutdown_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in _SHUTDOWN_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def load_application(spec: str) -> object:
    """Import ``MODULE[:ATTR]`` (``ATTR`` defaults to ``app``) and return the
    :class:`~tether.server.data.functions.App` it names.

    Raises :class:`CommandError` naming the spec and the reason (see
    :func:`tether.server.data.functions.load_application`, which does the work).
    """
    from tether.server.data.functions import load_application as load

    try:
        return load(spec)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


# ---------------------------------------------------------------------------------- keys


def _keys_rotate(args: argparse.Namespace) -> int:
    # Only what a rotation uses: a bad value of an unrelated TETHER_* variable in this shell
    # must not stop it.
    settings = _load_settings(
        args, "data_dir", "signing_algorithm", only=("data_dir", "keys_file", "signing_algorithm")
    )
    path: Path = args.keys_file if args.keys_file is not None else settings.effective_keys_file
    from tether.server.auth.signing_keys import KeySet, KeySetError, rotate_key_file

    alg = settings.signing_algorithm
    try:
        kid = rotate_key_file(path, alg)
    except KeySetError as exc:
        raise CommandError(f"the key file {path}: {exc}", EXIT_FAILURE) from None
    print(f"new signing key {kid}")
    # A rotation that changes the algorithm is usually meant (a migration), but it is also what
    # a shell without the servers' TETHER_SIGNING_ALGORITHM does by accident: say so.
    keys = KeySet.from_json(path.read_text()).keys
    if len(keys) > 1 and keys[0].kid == kid and keys[1].alg != alg:
        print(
            f"{PROG}: note: the signing algorithm changes from {keys[1].alg} to {alg}; "
            f"tokens of the {keys[1].alg} keys verify until those keys leave the set",
            file=sys.stderr,
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------- sessions


def _sessions_revoke(args: argparse.Namespace) -> int:
    from tether.server import admin
    from tether.server.auth.sessions import revoke_from_cli

    redis_url = _admin_redis_url(args)

    async def revoke() -> int:
        user_id = args.user
        if args.email is not None:
            user = await _admin_read(redis_url, lambda redis: admin.find_user(redis, args.email))
            user_id = user.user_id
        return await revoke_from_cli(redis_url, user_id=user_id, session_id=args.session)

    ended = _admin_run(redis_url, revoke())
    print(f"ended {ended} session(s)")
    return EXIT_OK


def _sessions_list(args: argparse.Namespace) -> int:
    from tether.server import admin
    from tether.server.clock import system_clock, to_ms

    redis_url = _admin_redis_url(args)

    async def work(redis: RedisClient) -> tuple[admin.UserRecord, list[admin.SessionRecord]]:
        if args.email is not None:
            user = await admin.find_user(redis, args.email)
        else:
            user = await admin.get_user(redis, args.user)
        return user, await admin.list_sessions(redis, user.user_id, to_ms(system_clock()))

    user, sessions = _admin_run(redis_url, _admin_read(redis_url, work))
    if args.json:
        print(json.dumps({"userId": user.user_id, "email": user.email, "sessions": [
            {
                "sessionId": s.session_id,
                "created": s.created,
                "lastRefresh": s.last_refresh,
                "expires": s.expires,
                "liveSockets": s.live_sockets,
                "instances": s.instances,
            }
            for s in sessions
        ]}, indent=2))  # fmt: skip
        return EXIT_OK
    print(f"user {user.user_id} ({user.email}): {len(sessions)} active session(s)")
    if sessions:
        _print_table(
            ("SESSION", "CREATED", "LAST REFRESH", "EXPIRES", "LIVE SOCKETS"),
            [
                (
                    s.session_id,
                    _utc(s.created),
                    _utc(s.last_refresh) if s.last_refresh is not None else "never",
                    _utc(s.expires),
                    str(s.live_sockets),
                )
                for s in sessions
            ],
        )
    return EXIT_OK


def _users_find(args: argparse.Namespace) -> int:
    from tether.server import admin
    from tether.server.clock import system_clock, to_ms

    redis_url = _admin_redis_url(args)

    async def work(redis: RedisClient) -> tuple[admin.UserRecord, list[admin.SessionRecord]]:
        user = await admin.find_user(redis, args.email)
        return user, await admin.list_sessions(redis, user.user_id, to_ms(system_clock()))

    user, sessions = _admin_run(redis_url, _admin_read(redis_url, work))
    sockets = sum(s.live_sockets for s in sessions)
    if args.json:
        print(json.dumps({
            "userId": user.user_id,
            "email": user.email,
            "created": user.created,
            "sessions": len(sessions),
            "liveSockets": sockets,
        }, indent=2))  # fmt: skip
        return EXIT_OK
    _print_table(
        ("USER", "EMAIL", "CREATED", "SESSIONS", "LIVE SOCKETS"),
        [(user.user_id, user.email, _utc(user.created), str(len(sessions)), str(sockets))],
    )
    return EXIT_OK


def _admin_redis_url(args: argparse.Namespace) -> str:
    return admin_redis_url(_load_settings(args, "redis_url", "data_dir"))


T = TypeVar("T")


async def _admin_read(redis_url: str, work: Callable[[RedisClient], Awaitable[T]]) -> T:
    """``work(redis)`` on a connection of its own, closed afterwards."""
    from tether.server.redis.connection import connect

    redis = connect(redis_url)
    try:
        return await work(redis)
    finally:
        await redis.aclose()


def _admin_run(redis_url: str, work: Coroutine[Any, Any, T]) -> T:
    """Run an admin command's coroutine: no such user is exit 1, and so is an unreachable
    Redis (typically a redis.url left behind by a server that was killed)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError

    from tether.server.admin import AdminError
    from tether.server.redis.connection import redact_url

    try:
        return asyncio.run(work)
    except AdminError as exc:
        raise CommandError(str(exc), EXIT_FAILURE) from exc
    except (RedisConnectionError, OSError) as exc:
        where = redact_url(redis_url)
        raise CommandError(f"cannot reach Redis at {where}: {exc}", EXIT_FAILURE) from exc
    except RedisError as exc:
        # Reached but failed: it stopped answering (TimeoutError), or refused the commands
        # (an ACL user without the permission, a Redis that is not Tether's).
        where = redact_url(redis_url)
        raise CommandError(
            f"Redis at {where} failed: {type(exc).__name__}: {exc}", EXIT_FAILURE
        ) from exc


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def admin_redis_url(settings: Settings) -> str:
    """The Redis an admin command talks to: ``--redis-url``, else ``TETHER_REDIS_URL`` (both in
    ``settings.redis_url``), else the embedded Redis of a server running on the data directory.

    Raises :class:`CommandError` when none is known.
    """
    if settings.redis_url is not None:
        return settings.redis_url
    url_file = settings.data_dir / URL_FILE_NAME
    try:
        url = url_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        url = ""
    except PermissionError:
        # Mode 0600: it holds the embedded Redis's password.
        raise CommandError(
            f"cannot read {url_file}: run this as the user that runs the server", EXIT_FAILURE
        ) from None
    if not url:
        raise CommandError(
            f"no Redis to talk to: pass --redis-url or set {ENV_PREFIX}REDIS_URL, or run this "
            f"where a server with an embedded Redis runs (no {url_file})"
        )
    return url
