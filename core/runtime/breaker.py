"""A circuit breaker for one dependency as seen by one user of it (a route, the stream writer).

closed -> open after `threshold` transient failures in a row: callers wait in `admit()` instead
of calling. After a backoff delay (`core.foundation.backoff`, growing with each failed probe) the breaker is
half-open: exactly one caller is let through as a probe. Its success closes the breaker and lets
every waiter through; its failure opens it again for a longer delay. Used from one event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

from core.foundation.backoff import backoff_delay

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class BreakerStopped(Exception):
    """`admit()` gave up: the breaker was stopped (the process is shutting down)."""


class CircuitBreaker:
    """Shared by every call to one dependency; cheap to check while closed (`breaker.closed`)."""

    def __init__(self, threshold: int = 1, min_delay: float = 0.1, max_delay: float = 5.0, *,
                 scale: float = 1.0, rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.scale = scale  # multiplies every wait (tests run with 0: probes follow each other at once)
        self.state = CLOSED
        self.failures = 0  # transient failures in a row
        self.opened = 0  # times the breaker opened (for metrics)
        self.opened_at = 0.0
        self._probes = 0  # failed probes since it opened (backoff exponent)
        self._retry_at = 0.0
        self._rand = rand
        self._clock = clock
        self._changed: asyncio.Event | None = None
        self._stopped = False

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def record_success(self) -> bool:
        """The dependency answered. True if this closed an open breaker."""
        self.failures = 0
        if self.state == CLOSED:
            return False
        self.state = CLOSED
        self._probes = 0
        self._notify()
        return True

    def record_failure(self) -> bool:
        """A transient failure. True if this opened a closed breaker."""
        self.failures += 1
        if self.state == HALF_OPEN:
            self._probes += 1
            self._open()
            return False
        if self.state == CLOSED and self.failures >= self.threshold:
            self.opened += 1
            self.opened_at = self._clock()
            self._probes = 0
            self._open()
            return True
        return False

    def record_abandoned(self) -> None:
        """The probe ended without an answer (cancelled): let the next waiter probe at once."""
        if self.state == HALF_OPEN:
            self.state = OPEN
            self._retry_at = self._clock()
            self._notify()

    def delay(self, failures: int) -> float:
        """Backoff before retry number `failures` (0-based) of one caller while the breaker is closed."""
        return backoff_delay(failures, self.min_delay, self.max_delay, self._rand) * self.scale

    def try_admit(self) -> bool:
        """`admit()` without waiting: True while closed, or if the caller becomes the half-open probe."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self._clock() >= self._retry_at:
            self.state = HALF_OPEN
            return True
        return False

    def probe_now(self) -> None:
        """An open breaker lets its next caller probe at once (the caller knows the wait is over)."""
        if self.state == OPEN:
            self._retry_at = self._clock()
            self._notify()

    async def admit(self) -> None:
        """Return when the caller may call: at once while closed; otherwise as the half-open probe or after
        a probe closed the breaker. Raises BreakerStopped once `stop()` was called."""
        while True:
            if self._stopped:
                raise BreakerStopped()
            if self.try_admit():
                return
            now = self._clock()
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            wait = self._retry_at - now if self.state == OPEN else None
            try:
                async with asyncio.timeout(wait):
                    await changed.wait()
            except TimeoutError:
                pass

    def stop(self) -> None:
        """Wake every waiter with BreakerStopped (shutdown: their work is left to be redelivered)."""
        self._stopped = True
        self._notify()

    def _open(self) -> None:
        self.state = OPEN
        self._retry_at = self._clock() + max(self.delay(self._probes), 0.001)  # never a busy loop
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
