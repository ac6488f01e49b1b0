"""`RouteError`, and registration-time checks of route options whose work is done in a later layer.

`ordered=True` is carried out by the dispatcher (`core.runtime.ordering`); whether it can hold is a
property of the route alone, so it is checked here, when the route is registered.
"""

from __future__ import annotations

from typing import Any


class RouteError(ValueError):
    """A route is invalid; the message names the pattern and the module."""


def check_ordered_option(value: Any, route_worker_count: int, stream: str | None) -> None:
    """ValueError (the router adds the route) for an `ordered=` that cannot hold."""
    if not isinstance(value, bool):
        raise ValueError(f"ordered must be True or False, not {value!r}")
    if not value:
        return
    if route_worker_count > 1:
        raise ValueError(
            f"ordered=True with worker_count={route_worker_count}: a shared subscription spreads one topic's "
            "messages over the workers, so their order cannot hold; use worker_count=1 (one worker handles the route)"
        )
    if stream is not None:
        raise ValueError(
            f"ordered=True is not supported on a stream route (stream={stream!r}): stream consumers handle "
            "entries concurrently and retry them later; drop ordered=True or stream="
        )
