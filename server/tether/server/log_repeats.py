"""At most one copy of a log message per interval: a flood of one error must not fill the disk.

A process out of file descriptors, or a client repeating one fault, can produce the same line
thousands of times a second (issue 13 measured 169,418 "Too many open files" lines, 73 MB, in
40 s). :class:`RepeatFilter` lets the first record of a kind through, drops the repeats that
follow within ``interval`` seconds, and adds "(repeated K times)" to the next one it lets
through, so the log keeps the count without the copies.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

#: Kinds of record remembered at once; the least recently seen is forgotten first. Messages are
#: keyed by their template, so this bounds memory even when a caller formats its own text.
MAX_KINDS = 1024


class RepeatFilter(logging.Filter):
    """Drop records of a kind already let through less than ``interval`` seconds ago.

    Records of the same kind share logger, level, message template and exception type: a
    message's arguments (a peer address, a count) may differ, as they do in a flood. Records
    below WARNING pass untouched. ``clock`` is injected for tests.
    """

    def __init__(
        self,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = MAX_KINDS,
    ) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._max_kinds = max_kinds
        #: kind -> [time let through, repeats dropped since]
        self._seen: OrderedDict[tuple[object, ...], list[float]] = OrderedDict()
        # A record that reaches two handlers sharing this filter is judged once.
        self._last_passed: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interval <= 0 or record.levelno < logging.WARNING or record is self._last_passed:
            return True
        exc_type = record.exc_info[0] if record.exc_info else None
        kind = (record.name, record.levelno, str(record.msg), exc_type)
        now = self._clock()
        entry = self._seen.get(kind)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            self._seen.move_to_end(kind)
            return False
        if entry is not None and entry[1]:
            # The message is formatted here, once: the suffix must not meet a stray '%'.
            record.msg = f"{record.getMessage()} (repeated {int(entry[1])} times)"
            record.args = None
        self._seen[kind] = [now, 0]
        self._seen.move_to_end(kind)
        while len(self._seen) > self._max_kinds:
            self._seen.popitem(last=False)
        self._last_passed = record
        return True


def install(filter_: logging.Filter, logger_names: Iterable[str] = ("", "uvicorn")) -> None:
    """Attach ``filter_`` to every handler of the named loggers (``""``: the root).

    On the handlers, not the loggers: a logger's filters see only records logged to that very
    logger, while a handler sees every record that reaches it, from any child logger. One filter
    on several handlers keeps one memory, so a record is counted once wherever it goes.
    """
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if filter_ not in handler.filters:
                handler.addFilter(filter_)
