"""A clock for tests: product code takes a :data:`tether.server.clock.Clock`, and a test hands it
one that moves only when the test says so, instead of sleeping."""

from __future__ import annotations


class ManualClock:
    """A :data:`~tether.server.clock.Clock` that only moves when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
