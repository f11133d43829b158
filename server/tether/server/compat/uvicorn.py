"""uvicorn: the socket transport behind the ASGI ``send`` it hands a WebSocket app.

ASGI gives an app no handle on its connection's socket; uvicorn's ``send`` is a bound method
of its protocol object, whose ``transport`` attribute is the socket's asyncio transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def transport_of(send: Callable[..., Any]) -> asyncio.WriteTransport | None:
    """The asyncio transport of the socket behind ``send``, or None when ``send`` does not come
    from a uvicorn protocol that has one (another ASGI server, an in-memory test harness).

    Never raises: a server that hides its transport leaves callers without the abort, nothing
    worse. Which of uvicorn's WebSocket implementations exposes it is checked by
    ``tests/test_compat.py``.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.WriteTransport) else None
