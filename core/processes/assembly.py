"""Assembling an application in a process: settings + the discovered routers + the enabled features.

Every process (the main one and each spawned worker) calls `Application.load()` itself, so
nothing built here crosses a process boundary. `feature_hooks` checks the routes against the
settings (a stream route or a Redis rate limit with ENABLE_REDIS=false fails here, naming the
route) and chooses the hook factories each process runs: Redis Streams, the database + outbox,
and with HTTP_PORT the per-process metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from core.foundation.config import Settings
from core.routing.discovery import discover_routers
from core.runtime.process_metrics import metrics_hooks
from core.routing.router import Route, Router, merge_routers
from core.runtime.runtime import Runtime, RuntimeHook

log = logging.getLogger("bootstrap")

HookFactory = Callable[[Settings, str], Sequence[RuntimeHook]]


@dataclass
class Application:
    """Settings plus the merged routes of the app."""

    settings: Settings
    router: Router
    hook_factories: list[HookFactory] = field(default_factory=list)

    @classmethod
    def load(cls, settings: Settings, router: Router | None = None) -> "Application":
        if router is None:
            router = merge_routers(discover_routers(settings.routers_package))
        app = cls(settings, router)
        app.hook_factories.extend(feature_hooks(settings, router.routes))
        if settings.http_port is not None:
            app.hook_factories.append(metrics_hooks)
        return app

    @property
    def routes(self) -> list[Route]:
        return list(self.router.routes)

    def plain_routes(self) -> list[Route]:
        return [r for r in self.router.routes if not r.shared]

    def shared_routes(self) -> list[Route]:
        return [r for r in self.router.routes if r.shared]

    def make_runtime(self, routes: Sequence[Route], *, client_id: str | None = None, worker_id: str = "main",
                     session_expiry: int | None = None, quiet: bool = False, reconnect: bool = True) -> Runtime:
        """A Runtime for `routes` with the enabled features' hooks; `quiet` logs its connection at DEBUG;
        `reconnect=False` for a connection to someone else's session (a drain), which may be taken over."""
        hooks: list[RuntimeHook] = []
        for factory in self.hook_factories:
            hooks.extend(factory(self.settings, worker_id))
        return Runtime(self.settings, routes, client_id=client_id, worker_id=worker_id, hooks=hooks,
                       session_expiry=session_expiry, quiet=quiet, reconnect=reconnect)


def feature_hooks(settings: Settings, routes: Sequence[Route]) -> list[HookFactory]:
    """Hook factories for the enabled features, Redis first (the outbox publishes to streams through it)."""
    from core.integrations.rate_limit import check_rate_limits
    from core.integrations.streams import check_stream_routes

    check_stream_routes(routes, settings)
    check_rate_limits(routes, settings)
    factories: list[HookFactory] = []
    if settings.enable_redis:
        from core.integrations.streams import streams_hooks

        factories.append(streams_hooks)
    if settings.enable_database:
        from core.integrations.outbox import database_hooks

        factories.append(database_hooks)
    return factories


async def stop_when_idle(runtime: Runtime, idle_seconds: float) -> None:
    """`--test-mode`: once subscribed, stop after `idle_seconds` with no message and nothing in flight."""
    await runtime.wait_ready()
    last_seen = time.monotonic()
    last_count = -1
    while True:
        await asyncio.sleep(min(0.2, idle_seconds / 4))
        count = runtime.stats.received
        if count != last_count or runtime.dispatcher.inflight:
            last_count = count
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen >= idle_seconds:
            log.info("test mode: no message for %.3g s; stopping", idle_seconds)
            runtime.request_stop()
            return
