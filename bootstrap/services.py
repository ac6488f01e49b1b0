"""Optional services of an application, chosen by settings: Redis Streams and the database + outbox.

`feature_hooks` checks the routes against the settings (a stream route or a Redis rate limit with
ENABLE_REDIS=false fails here, naming the route) and returns the hook factories each process runs.
"""

from __future__ import annotations

from typing import Callable, Sequence

from core.config import Settings
from core.router import Route
from core.runtime import RuntimeHook

HookFactory = Callable[[Settings, str], Sequence[RuntimeHook]]


def feature_hooks(settings: Settings, routes: Sequence[Route]) -> list[HookFactory]:
    """Hook factories for the enabled features, Redis first (the outbox publishes to streams through it)."""
    from core.rate_limit import check_rate_limits
    from core.streams import check_stream_routes

    check_stream_routes(routes, settings)
    check_rate_limits(routes, settings)
    factories: list[HookFactory] = []
    if settings.enable_redis:
        from core.streams import streams_hooks

        factories.append(streams_hooks)
    if settings.enable_database:
        from core.outbox import database_hooks

        factories.append(database_hooks)
    return factories
