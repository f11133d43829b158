"""The Tether Python client: one ``/sync`` connection whose session stays alive by itself.

::

    from tether.client import TetherClient

    async with TetherClient("ws://127.0.0.1:8000/sync", email=..., password=...) as tether:
        print(await tether.query("whoami"))
        async with tether.subscribe("counter.get", name="clicks") as sub:
            async for value in sub:
                print(value)

See ``docs/client.md``.
"""

from tether.client.connection import ClientOptions, FetchToken, Subscription, TetherClient
from tether.client.core import AuthState, AuthStatus, Backoff, ConnectionState, ConnectionStatus
from tether.client.errors import (
    AuthError,
    ClientClosed,
    MessageTooLarge,
    MutationError,
    OutcomeUnknown,
    QueryError,
    TetherError,
)
from tether.client.http_auth import AuthAPI, http_base_url, sign_in, sign_up
from tether.client.token_store import FileTokenStore, MemoryTokenStore, StoredSession, TokenStore

__all__ = [
    "AuthAPI",
    "AuthError",
    "AuthState",
    "AuthStatus",
    "Backoff",
    "ClientClosed",
    "ClientOptions",
    "ConnectionState",
    "ConnectionStatus",
    "FetchToken",
    "FileTokenStore",
    "MemoryTokenStore",
    "MessageTooLarge",
    "MutationError",
    "OutcomeUnknown",
    "QueryError",
    "StoredSession",
    "Subscription",
    "TetherClient",
    "TetherError",
    "TokenStore",
    "http_base_url",
    "sign_in",
    "sign_up",
]
