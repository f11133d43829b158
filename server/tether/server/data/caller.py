"""Who runs a function, as the data layer sees it.

The data layer does not know connections or tokens: whatever identity the realtime layer holds
(:class:`tether.server.realtime.core.Identity`) is handed in as a :class:`Caller`, a read-only
view of the three fields the data layer uses. Any object with those attributes fits, so the
realtime layer passes its own identities unchanged and the data layer never imports it.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Caller"]


class Caller(Protocol):
    """An authenticated caller: a user, the session it signed in with, and when that ends."""

    @property
    def user_id(self) -> str: ...

    @property
    def session_id(self) -> str: ...

    @property
    def expires_at(self) -> float:
        """Seconds since the epoch (a JWT ``exp``): the live queries keep the newest one."""
        ...
