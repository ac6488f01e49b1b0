"""Reconnect backoff: exponential, capped, with bounded jitter (randomness injected)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from core.foundation.backoff import backoff_delay


def test_exponential_growth_without_jitter() -> None:
    low = [backoff_delay(a, 0.5, 30.0, lambda: 0.0) for a in range(8)]
    high = [backoff_delay(a, 0.5, 30.0, lambda: 1.0) for a in range(8)]
    assert high == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert low == [h / 2 for h in high]


def test_cap_holds_for_huge_attempt_numbers() -> None:
    assert backoff_delay(10_000, 0.5, 30.0, lambda: 1.0) == 30.0
    assert backoff_delay(10_000, 0.5, 30.0, lambda: 0.0) == 15.0


@given(st.integers(min_value=0, max_value=200), st.floats(min_value=0.001, max_value=5),
       st.floats(min_value=5, max_value=120), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_bounds(attempt: int, base: float, cap: float, r: float) -> None:
    step = min(cap, base * 2 ** min(attempt, 32))
    delay = backoff_delay(attempt, base, cap, lambda: r)
    assert step / 2 <= delay <= step <= cap
    assert delay > 0


def test_jitter_spreads_clients() -> None:
    values = iter([0.0, 0.25, 0.5, 0.99])
    delays = [backoff_delay(3, 1.0, 60.0, lambda: next(values)) for _ in range(4)]
    assert len(set(delays)) == 4
    assert all(4.0 <= d < 8.0 for d in delays)
