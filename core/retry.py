"""Retry policy of a route, shared by MQTT routes (the Dispatcher) and stream routes (core.streams).

```python
router.on("orders/{id}", place, qos=1, retries=3, retry_backoff=(0.5, 2.0, 8.0))
router.on("orders/{id}", place, qos=1, retry=Retry(retries=3, permanent=(OrderRejected,)))
```

Every failure is one of three kinds (`Retry.classify`):

- `dead_letter`: the handler or a middleware raised `DeadLetter` (a payload that fails validation
  does): dead-lettered now, never retried;
- `transient`: a dependency is down (`core.failures.is_transient`, plus `Retry.transient`): the
  message holds, retried with backoff without limit, never dead-lettered, while the route's
  circuit breaker keeps further messages from calling the handler until a probe succeeds;
- `permanent`: anything else (and `Retry.permanent`, checked first, pydantic validation errors by
  default): retried `retries` times, `retry_backoff` apart, then dead-lettered with the attempt count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from core.breaker import BreakerStopped, CircuitBreaker
from core.error_log import ErrorLog
from core.failures import DeadLetter, first_line, is_transient
from core.stats import RouteStats

TRANSIENT, PERMANENT, DEAD_LETTER = "transient", "permanent", "dead_letter"
DEFAULT_BACKOFF: tuple[float, ...] = (0.5, 2.0, 8.0)
BREAKER_THRESHOLD = 3  # transient failures in a row that open a route's breaker
HOLD_MIN, HOLD_MAX = 0.1, 5.0  # backoff between probes of a down dependency, seconds


@dataclass(frozen=True)
class Retry:
    """How a route retries a failed message (see the module docstring for the three kinds of failure)."""

    retries: int = 0
    backoff: tuple[float, ...] = DEFAULT_BACKOFF
    permanent: tuple[type[BaseException], ...] = (ValidationError,)
    transient: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {self.retries!r}")
        backoff = self.backoff
        if isinstance(backoff, (int, float)) and not isinstance(backoff, bool):
            backoff = (float(backoff),)
        if (not isinstance(backoff, (tuple, list)) or not backoff
                or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and d >= 0 for d in backoff)):
            raise ValueError(f"retry_backoff must be seconds >= 0 or a non-empty sequence of them, not {self.backoff!r}")
        object.__setattr__(self, "backoff", tuple(float(d) for d in backoff))
        for name in ("permanent", "transient"):
            types = getattr(self, name)
            types = (types,) if isinstance(types, type) else tuple(types)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
                raise ValueError(f"Retry({name}=...) takes exception classes, not {getattr(self, name)!r}")
            object.__setattr__(self, name, types)

    def classify(self, exc: BaseException) -> str:
        """`dead_letter`, `permanent` or `transient`."""
        if isinstance(exc, DeadLetter):
            return DEAD_LETTER
        if isinstance(exc, self.permanent):
            return PERMANENT
        if isinstance(exc, self.transient) or is_transient(exc):
            return TRANSIENT
        return PERMANENT

    def delay(self, failures: int) -> float:
        """Seconds before the retry that follows the `failures`-th permanent failure (1-based)."""
        return self.backoff[min(failures, len(self.backoff)) - 1]


def route_retry(retry: Any, retries: Any, retry_backoff: Any) -> "Retry | None":
    """The Retry of a route from its options (None: the default of its kind); ValueError naming the option."""
    if retry is not None:
        if retries is not None or retry_backoff is not None:
            raise ValueError("give either retry=Retry(...) or retries=/retry_backoff=, not both")
        if not isinstance(retry, Retry):
            raise ValueError(f"retry must be a core.retry.Retry, not {retry!r}")
        return retry
    if retries is None and retry_backoff is None:
        return None
    kwargs: dict[str, Any] = {}
    if retries is not None:
        kwargs["retries"] = retries
    if retry_backoff is not None:
        kwargs["backoff"] = retry_backoff
    return Retry(**kwargs)


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


def stream_retry(retries: int, delay: float) -> Retry:
    """The default policy of a stream route: STREAM_MAX_RETRIES retries, STREAM_RETRY_DELAY apart."""
    return Retry(retries=retries, backoff=(delay,))

