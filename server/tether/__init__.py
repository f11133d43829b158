"""Tether: a realtime sync backend. One WebSocket stays signed in for hours, queries are
reactive, and any number of server instances share one Redis.

What an application needs is here at the top::

    from tether import App, Context, FunctionError

    app = App("todos")

    @app.query("todos.list")
    async def list_todos(ctx: Context) -> list[dict]: ...

served by ``tether serve mymodule:app``; and from Python, the client::

    from tether import TetherClient

    async with TetherClient("ws://127.0.0.1:8000/sync", email=..., password=...) as t:
        await t.mutate("counter.increment", name="clicks")

Everything else lives in the subpackages and may move between releases:
:mod:`tether.server` (the server's subsystems), :mod:`tether.client` (the client's core and
socket shell) and :mod:`tether.protocol` (the wire vocabulary both of them import).
"""

from tether.client import (
    AuthError,
    ClientClosed,
    ClientOptions,
    FileTokenStore,
    MemoryTokenStore,
    MutationError,
    OutcomeUnknown,
    QueryError,
    Subscription,
    TetherClient,
    TetherError,
    TokenStore,
)
from tether.protocol import FunctionErrorCode
from tether.server.data.functions import App, Auth, Context
from tether.server.errors import FunctionError

__version__ = "0.1.0"

__all__ = [
    "App",
    "Auth",
    "AuthError",
    "ClientClosed",
    "ClientOptions",
    "Context",
    "FileTokenStore",
    "FunctionError",
    "FunctionErrorCode",
    "MemoryTokenStore",
    "MutationError",
    "OutcomeUnknown",
    "QueryError",
    "Subscription",
    "TetherClient",
    "TetherError",
    "TokenStore",
    "__version__",
]
