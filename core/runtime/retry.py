"""Applying a route's retry policy (`core.routing.retry_policy.Retry`) to its messages: `RouteGuard`.

The policy itself and the three kinds of failure are described in `core.routing.retry_policy` (a route
option, so part of routing); `Retry` is importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from core.runtime.breaker import BreakerStopped, CircuitBreaker
from core.foundation.error_log import ErrorLog
from core.foundation.failures import first_line
from core.routing.retry_policy import (DEAD_LETTER, DEFAULT_BACKOFF, PERMANENT, TRANSIENT, Retry,  # noqa: F401 - also imported from here
                               route_retry, stream_retry)
from core.runtime.stats import RouteStats


BREAKER_THRESHOLD = 3  # transient failures in a row that open a route's breaker
HOLD_MIN, HOLD_MAX = 0.1, 5.0  # backoff between probes of a down dependency, seconds


class Outcome:
    """How a retried message ended: `result` after a success, or `error` to dead-letter after `attempts` calls."""

    __slots__ = ("result", "error", "attempts")

    def __init__(self, result: Any, error: BaseException | None, attempts: int) -> None:
        self.result = result
        self.error = error
        self.attempts = attempts


class RouteGuard:
    """The retry loop, the circuit breaker and the holding count of one route in one process."""

    def __init__(self, pattern: str, policy: Retry, stats: RouteStats, errors: ErrorLog, log: logging.Logger,
                 scale: float = 1.0) -> None:
        self.pattern = pattern
        self.policy = policy
        self.stats = stats
        self.errors = errors
        self.log = log
        self.scale = scale  # multiplies every wait (the TestClient skips them with 0)
        self.breaker = CircuitBreaker(BREAKER_THRESHOLD, HOLD_MIN, HOLD_MAX, scale=scale)
        self.holding = 0  # messages waiting for the dependency right now
        self._stop: asyncio.Event | None = None
        self._stopping = False

    async def retry(self, call: Callable[[], Awaitable[Any]], exc: BaseException | None, topic: str) -> Outcome:
        """Call again until success or a reason to dead-letter. `exc`: the first call's failure (None: the
        breaker was open, so it was not called yet). Raises CancelledError at shutdown (no ack)."""
        policy, breaker, stats = self.policy, self.breaker, self.stats
        attempts = 0 if exc is None else 1
        failed = 0  # permanent failures
        held = 0  # transient failures of this message
        holding = False
        try:
            while True:
                if exc is not None:
                    kind = policy.classify(exc)
                    if kind == TRANSIENT:
                        if breaker.record_failure():
                            self.log.warning("route %r: %s; holding its messages (not acknowledged) and probing "
                                             "until it answers", self.pattern, first_line(exc))
                        self.errors.log((self.pattern, TRANSIENT, type(exc)), logging.WARNING,
                                        "route %r: transient failure on %r, holding and retrying: %s", self.pattern,
                                        topic, first_line(exc), exc=exc)
                        wait = breaker.delay(held)
                        held += 1
                    else:
                        self._answered()
                        if kind == DEAD_LETTER or failed >= policy.retries:
                            return Outcome(None, exc, attempts)
                        failed += 1
                        self.errors.log((self.pattern, PERMANENT, type(exc)), logging.WARNING,
                                        "route %r: handler failed on %r (attempt %d of %d), retrying: %s",
                                        self.pattern, topic, attempts, policy.retries + 1, first_line(exc), exc=exc)
                        wait = policy.delay(failed) * self.scale
                    stats.retried += 1
                elif not breaker.closed:
                    wait = 0.0
                else:
                    wait = -1.0  # not tried yet and the breaker closed meanwhile: call at once
                if not holding and (held or not breaker.closed):
                    holding = True
                    self.holding += 1
                    stats.held += 1
                if wait >= 0:
                    await self._sleep(wait)
                await breaker.admit()
                attempts += 1
                try:
                    result = await call()
                except asyncio.CancelledError:
                    breaker.record_abandoned()
                    raise
                except Exception as error:  # noqa: BLE001 - classified at the top of the loop
                    exc = error
                    continue
                self._answered()
                return Outcome(result, None, attempts)
        except BreakerStopped:
            raise asyncio.CancelledError() from None
        finally:
            if holding:
                self.holding -= 1

    def answered(self) -> None:
        """A call succeeded outside `retry` (the usual path): resets the breaker's failure count."""
        if self.breaker.failures:
            self._answered()

    def _answered(self) -> None:
        breaker = self.breaker
        if breaker.record_success():
            self.log.warning("route %r: the dependency answers again after %.1f s; releasing %d held message(s)",
                             self.pattern, time.monotonic() - breaker.opened_at, self.holding)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            raise BreakerStopped()
        if seconds <= 0:
            return
        if self._stop is None:
            self._stop = asyncio.Event()
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return
        raise BreakerStopped()

    def stop(self) -> None:
        """Shutdown: every message waiting here ends without an ack (the broker redelivers it)."""
        self._stopping = True
        if self._stop is not None:
            self._stop.set()
        self.breaker.stop()
