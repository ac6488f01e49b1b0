"""Retry policy of a route (a route option; `core.runtime.retry.RouteGuard` applies it), shared by MQTT routes (the Dispatcher) and stream routes (core.integrations.streams).

```python
router.on("orders/{id}", place, qos=1, retries=3, retry_backoff=(0.5, 2.0, 8.0))
router.on("orders/{id}", place, qos=1, retry=Retry(retries=3, permanent=(OrderRejected,)))
```

Every failure is one of three kinds (`Retry.classify`):

- `dead_letter`: the handler or a middleware raised `DeadLetter` (a payload that fails validation
  does): dead-lettered now, never retried;
- `transient`: a dependency is down (`core.foundation.failures.is_transient`, plus `Retry.transient`): the
  message holds, retried with backoff without limit, never dead-lettered, while the route's
  circuit breaker keeps further messages from calling the handler until a probe succeeds;
- `permanent`: anything else (and `Retry.permanent`, checked first, pydantic validation errors by
  default): retried `retries` times, `retry_backoff` apart, then dead-lettered with the attempt count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.foundation.failures import DeadLetter, is_transient

TRANSIENT, PERMANENT, DEAD_LETTER = "transient", "permanent", "dead_letter"
DEFAULT_BACKOFF: tuple[float, ...] = (0.5, 2.0, 8.0)


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
            raise ValueError(f"retry must be a core.runtime.retry.Retry, not {retry!r}")
        return retry
    if retries is None and retry_backoff is None:
        return None
    kwargs: dict[str, Any] = {}
    if retries is not None:
        kwargs["retries"] = retries
    if retry_backoff is not None:
        kwargs["backoff"] = retry_backoff
    return Retry(**kwargs)


def stream_retry(retries: int, delay: float) -> Retry:
    """The default policy of a stream route: STREAM_MAX_RETRIES retries, STREAM_RETRY_DELAY apart."""
    return Retry(retries=retries, backoff=(delay,))

