"""Bounded error logging: the same error at the same place logs its traceback once per interval.

A failing dependency makes every message fail the same way; logging each one (a SQLAlchemy
traceback is ~100 lines) would bury the log. The first occurrence of a key in each interval is
logged in full; the others are counted and the count is reported with the next full line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Hashable


class ErrorLog:
    """One per logger user (a dispatcher, a stream consumer); keys are e.g. (route, exception type)."""

    def __init__(self, logger: logging.Logger, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._keys: dict[Hashable, list[float]] = {}  # key -> [time the interval ends, occurrences not logged]

    def log(self, key: Hashable, level: int, message: str, *args: Any, exc: BaseException | None = None) -> bool:
        """Log `message % args` (with `exc`'s traceback) unless `key` was logged less than `interval` ago.

        Returns True if it was logged.
        """
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return False
        skipped = int(entry[1]) if entry is not None else 0
        self._keys[key] = [now + self.interval, 0]
        if skipped:
            message += f" [{skipped} more like this in the last {self.interval:g} s were not logged]"
        self.logger.log(level, message, *args, exc_info=exc)
        return True

    def suppressed(self, key: Hashable) -> int:
        """Occurrences of `key` counted but not logged since its last logged line."""
        entry = self._keys.get(key)
        return int(entry[1]) if entry is not None else 0
