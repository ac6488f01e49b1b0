"""Exponential backoff with jitter, as a pure function (randomness injected for tests)."""

from __future__ import annotations

from typing import Callable


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with "equal jitter".

    Half of the exponential step is kept and the other half is random, so clients that lost the
    broker together do not come back in lockstep, yet never retry with no delay at all.
    """
    step = min(cap, base * (2 ** min(attempt, 32)))
    return step / 2 + rand() * step / 2
