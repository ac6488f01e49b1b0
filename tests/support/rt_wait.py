"""Polling with deadlines: tests wait for conditions, never for fixed times."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

DEFAULT_TIMEOUT = 20.0


async def wait_until(condition: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT,
                     interval: float = 0.01) -> None:
    """Await until `condition()` is truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(condition: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT,
                    interval: float = 0.02) -> None:
    """Blocking version of `wait_until`, for tests without an event loop in play."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
