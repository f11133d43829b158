"""Injected time. Code that compares against the clock takes a :data:`Clock` so tests move time
instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Returns the current time in seconds since the Unix epoch (wall clock, like ``time.time``).
Clock = Callable[[], float]

system_clock: Clock = time.time


def to_ms(seconds: float) -> int:
    """Seconds since the epoch → integer milliseconds, the unit of every time on the wire."""
    return int(seconds * 1000)
