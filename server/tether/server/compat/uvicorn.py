"""uvicorn: the socket transport behind the ASGI ``send`` it hands a WebSocket app, and a hook
into its shutdown.

ASGI gives an app no handle on its connection's socket; uvicorn's ``send`` is a bound method
of its protocol object, whose ``transport`` attribute is the socket's asyncio transport.

ASGI's lifespan shutdown runs only after uvicorn has closed every WebSocket itself (1012, not
waiting for the client), too late for an app to drain its own sockets: :func:`draining_server`
runs the app's drain from ``uvicorn.Server.shutdown``, which uvicorn calls first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket

    import uvicorn


def transport_of(send: Callable[..., Any]) -> asyncio.WriteTransport | None:
    """The asyncio transport of the socket behind ``send``, or None when ``send`` does not come
    from a uvicorn protocol that has one (another ASGI server, an in-memory test harness).

    Never raises: a server that hides its transport leaves callers without the abort, nothing
    worse. Which of uvicorn's WebSocket implementations exposes it is checked by
    ``tests/test_compat.py``.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None


def draining_server(
    config: uvicorn.Config, drain: Callable[[], Awaitable[object]]
) -> uvicorn.Server:
    """A ``uvicorn.Server`` whose shutdown stops accepting, awaits ``drain()``, then does what
    uvicorn does (closing what is left, the lifespan's shutdown).

    A second Ctrl-C (uvicorn's ``force_exit``) cuts the drain short, as it cuts uvicorn's own
    wait for connections.
    """
    import uvicorn  # imported here: ``tether --help`` must not pay for it

    class _DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Stop accepting first, as uvicorn's own shutdown does next: nothing new arrives
            # while the sockets drain. Closing a server twice is harmless.
            for listener in self.servers:
                listener.close()
            draining = asyncio.ensure_future(drain())
            while not draining.done() and not self.force_exit:
                await asyncio.wait({draining}, timeout=0.1)
            if not draining.done():
                draining.cancel()
            await super().shutdown(sockets)

    return _DrainingServer(config)
