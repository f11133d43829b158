"""The client commands of ``tether``: ``query``, ``watch``, ``call`` and ``login``.

::

    tether login [--email E] [--signup]          sign in; store the session in the token file
    tether query NAME [--args JSON]              print a query's current result as JSON, once
    tether watch NAME [--args JSON]              print each new result of a query, one JSON line
    tether call NAME [--args JSON]               run a mutation, print its result as JSON

Every command takes ``--url`` (the server's ``/sync`` URL, repeatable for several instances;
default ``ws://127.0.0.1:8000/sync``), ``--token-file`` (default
``~/.config/tether/session.json``) and ``--email``; the password comes from ``TETHER_PASSWORD``
or a prompt. ``query``, ``watch`` and ``call`` use the session in the token file (anonymous
without one, with a hint at ``tether login``); with ``--email`` they sign in first. Processes
sharing a token file share the session safely (:class:`~tether.client.token_store.FileTokenStore`).
A query called with ``call``, or a mutation with ``query``/``watch``, is refused by the server
(``unknown_function``, whose message names the function's kind); the command adds a hint at the
right one.

Exit codes, as for the rest of ``tether``: 0 success (and Ctrl-C or SIGTERM for ``watch``),
1 a failure (the server refused, could not be reached, or stopped the client), 2 a usage error.

``server/tether/cli.py`` (the ``tether`` command) registers these with
:func:`add_client_commands`; ``python -m tether.client`` runs them on their own. This module
imports the client library only when a command runs, so ``tether --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.client.connection import TetherClient
    from tether.client.core import AuthStatus, ConnectionStatus
    from tether.client.token_store import FileTokenStore

PROG = "tether"
DEFAULT_URL = "ws://127.0.0.1:8000/sync"
DEFAULT_TOKEN_FILE = "~/.config/tether/session.json"
PASSWORD_ENV = "TETHER_PASSWORD"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """Bad arguments: printed as ``tether: <message>``, exit code 2."""


def add_client_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``query``, ``watch``, ``call`` and ``login`` on ``subparsers`` (of ``tether``).

    Each parser sets ``run``: a function of the parsed arguments returning the exit code.
    """
    query = subparsers.add_parser(
        "query",
        help="print a query's current result",
        description="Subscribe to query NAME, print its first result as JSON and exit (use "
        "watch to follow it). An error result goes to stderr, exit code 1.",
    )
    _add_function(query)
    _add_connection_options(query)
    _add_timeout(query)
    query.set_defaults(run=_run_query)

    watch = subparsers.add_parser(
        "watch",
        help="print each new result of a query",
        description="Subscribe to query NAME and print each new result as one JSON line. "
        "Errors of the query go to stderr and watching continues; so do changes of the "
        "connection and of the session. Stop with Ctrl-C.",
    )
    _add_function(watch)
    _add_connection_options(watch)
    watch.set_defaults(run=_run_watch)

    call = subparsers.add_parser(
        "call",
        help="run a mutation",
        description="Run mutation NAME once and print its result as JSON.",
    )
    _add_function(call)
    _add_connection_options(call)
    _add_timeout(call)
    call.set_defaults(run=_run_call)

    login = subparsers.add_parser(
        "login",
        help="sign in and store the session",
        description=f"Sign in over HTTP and store the session in the token file, for query, "
        f"watch and call. The password comes from {PASSWORD_ENV}, else a prompt.",
    )
    _add_connection_options(login)
    login.add_argument("--signup", action="store_true", help="create the account first")
    login.set_defaults(run=_run_login)


def _add_function(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the function, e.g. counter.get")
    parser.add_argument(
        "--args",
        dest="function_args",
        default="{}",
        metavar="JSON",
        help='its arguments as a JSON object, e.g. \'{"name": "clicks"}\' [{}]',
    )


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up after this long without an answer [30]",
    )


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help=f"the server's /sync URL; repeat for more instances [{DEFAULT_URL}]",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=Path(DEFAULT_TOKEN_FILE),
        metavar="PATH",
        help=f"where the session is kept [{DEFAULT_TOKEN_FILE}]",
    )
    parser.add_argument(
        "--email", help=f"sign in as this user first (password: {PASSWORD_ENV} or a prompt)"
    )


# ---------------------------------------------------------------------------------- commands


def _run_query(args: argparse.Namespace) -> int:
    return _run(_query(args))


def _run_watch(args: argparse.Namespace) -> int:
    return _run(_watch(args))


def _run_call(args: argparse.Namespace) -> int:
    return _run(_call(args))


def _run_login(args: argparse.Namespace) -> int:
    return _run(_login(args))


def _run(coro: Any) -> int:
    try:
        code: int = asyncio.run(coro)
        return code
    except _UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


async def _login(args: argparse.Namespace) -> int:
    from tether.client.errors import AuthError

    store = _store(args)
    email = args.email or _prompt("e-mail: ")
    try:
        session = await _sign_in(args, email, signup=args.signup)
    except AuthError as exc:
        _say(f"sign-in failed: {exc.code}: {exc.message}")
        return EXIT_FAILURE
    async with store.locked():
        await store.save(session)
    print(f"signed in as {session.user_id} (session {session.session_id}); saved to {store.path}")
    return EXIT_OK


async def _watch(args: argparse.Namespace) -> int:
    from tether.client.errors import ClientClosed, QueryError

    function_args = _json_object(args.function_args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    client = await _signed_in_client(args)
    if client is None:
        return EXIT_FAILURE

    async def print_values() -> int:
        async with client, client.subscribe(args.name, **function_args) as sub:
            while True:
                try:
                    async for value in sub:
                        print(json.dumps(value, ensure_ascii=False), flush=True)
                    return EXIT_OK
                except QueryError as exc:
                    _say_function_error(args.name, exc.code, exc.message, called_as="query")
                    if exc.code in ("unknown_function", "bad_args"):
                        return EXIT_FAILURE
                except ClientClosed as exc:
                    _say(f"stopped: {exc.message}")
                    return EXIT_FAILURE

    watching = asyncio.create_task(print_values())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if watching in done:
        return watching.result()
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    return EXIT_OK


async def _signed_in_client(args: argparse.Namespace) -> TetherClient | None:
    """The command's client (see :func:`_client`), or None once a failed sign-in was said."""
    from tether.client.errors import AuthError

    try:
        return await _client(args)
    except AuthError as exc:
        _say(f"sign-in failed: {exc.code}: {exc.message}")
        return None


async def _query(args: argparse.Namespace) -> int:
    from tether.client.errors import ClientClosed, QueryError

    function_args = _json_object(args.function_args)
    client = await _signed_in_client(args)
    if client is None:
        return EXIT_FAILURE
    async with client:
        try:
            async with asyncio.timeout(args.timeout):
                value = await client.query(args.name, **function_args)
        except QueryError as exc:
            _say_function_error(args.name, exc.code, exc.message, called_as="query")
            return EXIT_FAILURE
        except ClientClosed as exc:
            _say(f"stopped: {exc.message}")
            return EXIT_FAILURE
        except TimeoutError:
            _say(f"{args.name}: no result within {args.timeout:g} s")
            return EXIT_FAILURE
    print(json.dumps(value, ensure_ascii=False))
    return EXIT_OK


async def _call(args: argparse.Namespace) -> int:
    from tether.client.errors import ClientClosed, MutationError

    function_args = _json_object(args.function_args)
    client = await _signed_in_client(args)
    if client is None:
        return EXIT_FAILURE
    async with client:
        try:
            async with asyncio.timeout(args.timeout):
                # Issued before the token file is read, a mutation belongs to the user it will
                # hold, and fails if it holds none (docs/client.md, Mutations): an anonymous
                # call must start once the client knows it is anonymous.
                await client.wait_ready()
                value = await client.mutate(args.name, **function_args)
        except MutationError as exc:
            _say_function_error(args.name, exc.code, exc.message, called_as="mutation")
            return EXIT_FAILURE
        except ClientClosed as exc:
            _say(f"stopped: {exc.message}")
            return EXIT_FAILURE
        except TimeoutError:
            _say(f"{args.name}: no answer within {args.timeout:g} s")
            return EXIT_FAILURE
    print(json.dumps(value, ensure_ascii=False))
    return EXIT_OK


# ---------------------------------------------------------------------------------- helpers


def _urls(args: argparse.Namespace) -> list[str]:
    return list(args.url) if args.url else [DEFAULT_URL]


def _store(args: argparse.Namespace) -> FileTokenStore:
    from tether.client.token_store import FileTokenStore

    return FileTokenStore(args.token_file)


async def _sign_in(args: argparse.Namespace, email: str, *, signup: bool = False) -> Any:
    from tether.client.http_auth import AuthAPI

    password = os.environ.get(PASSWORD_ENV) or _prompt("password: ", secret=True)
    api = AuthAPI(_urls(args))
    if signup:
        return await api.sign_up(email, password)
    return await api.sign_in(email, password)


async def _client(args: argparse.Namespace) -> TetherClient:
    """A client on the token file; with ``--email``, after signing in and storing it."""
    from tether.client.connection import TetherClient

    store = _store(args)
    if args.email:
        session = await _sign_in(args, args.email)
        async with store.locked():
            await store.save(session)
    login = _login_command(args)
    return TetherClient(
        _urls(args),
        token_store=store,
        on_auth_state=lambda status: _report_auth(status, login, store.path),
        on_connection_state=_report_connection,
    )


def _login_command(args: argparse.Namespace) -> str:
    """``tether login`` with the options that make it sign in for this command."""
    words = [PROG, "login"]
    for url in args.url or ():
        words += ["--url", url]
    if args.token_file != Path(DEFAULT_TOKEN_FILE):
        words += ["--token-file", str(args.token_file)]
    return shlex.join(words)


def _report_auth(status: AuthStatus, login: str, token_file: Path) -> None:
    detail = f" ({status.reason})" if status.reason else ""
    who = f" as {status.user_id}" if status.user_id and status.state == "authenticated" else ""
    _say(f"auth: {status.state}{who}{detail}")
    # Anonymous is what a command runs as when the token file holds no session: the file was
    # never written, or a session that ended (revoked, signed out elsewhere) was forgotten.
    if status.state == "anonymous":
        _say(f"hint: no session in {token_file}; to sign in, run: {login}")
    elif status.state == "signed_out":
        _say(f"hint: the session has ended; to sign in again, run: {login}")


def _say_function_error(name: str, code: str, message: str, *, called_as: str) -> None:
    """``NAME: CODE: MESSAGE``, and a hint at the other command when ``name`` is a function of
    the other kind (the server says so in the message of ``unknown_function``)."""
    from tether.protocol import ErrorCode, kind_named_by

    _say(f"{name}: {code}: {message}")
    if code != ErrorCode.UNKNOWN_FUNCTION:
        return
    kind = kind_named_by(message)
    if kind == "query" and called_as == "mutation":
        _say(
            f"hint: {name} is a query: run `tether query {name}` for its result, or "
            f"`tether watch {name}` to follow it"
        )
    elif kind == "mutation" and called_as == "query":
        _say(f"hint: {name} is a mutation: run it with `tether call {name}`")


def _report_connection(status: ConnectionStatus) -> None:
    if status.state == "connecting":
        return
    parts = [f"connection: {status.state}"]
    if status.url:
        parts.append(status.url)
    if status.close_code is not None:
        parts.append(f"code {status.close_code}")
    if status.error:
        parts.append(status.error)
    if status.retry_in is not None:
        parts.append(f"retry in {status.retry_in:.2f} s")
    _say(", ".join(parts))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"--args is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _UsageError("--args must be a JSON object")
    return value


def _prompt(label: str, *, secret: bool = False) -> str:
    if not sys.stdin.isatty():
        what = f"set {PASSWORD_ENV}" if secret else "pass --email"
        raise _UsageError(f"cannot prompt for {label.rstrip(': ')} (no terminal): {what}")
    return getpass.getpass(label) if secret else input(label)


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m tether.client COMMAND …``: the client commands without the server's CLI."""
    parser = argparse.ArgumentParser(prog=PROG, description="Tether client commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_client_commands(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    code: int = args.run(args)
    return code
