"""Per-process counters: plain integers updated on the event loop's thread, read by reporters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RouteStats:
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    seconds: float = 0.0  # total handler time, for the average
    retried: int = 0  # handler calls repeated after a failure (core.runtime.retry)
    held: int = 0  # messages that waited for a down dependency (transient failure or open circuit breaker)


# observe(route_pattern, seconds, outcome) with outcome in {"ok", "error", "timeout", "rejected"}
Observer = Callable[[str, float, str], None]


@dataclass
class ProcessStats:
    """What one process did; the supervisor collects these from workers."""

    received: int = 0
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    unrouted: int = 0
    dropped_on_shutdown: int = 0
    inflight: int = 0
    responses: int = 0
    routes: dict[str, RouteStats] = field(default_factory=dict)
    observers: list[Observer] = field(default_factory=list)
    # name -> callable returning plain (picklable) data, added to snapshot() under `name`; how
    # plug-ins (latency histograms, connection state, backlogs) reach the supervisor with the counters.
    extensions: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def route(self, pattern: str) -> RouteStats:
        stats = self.routes.get(pattern)
        if stats is None:
            stats = self.routes[pattern] = RouteStats()
        return stats

    def absorb(self, other: "ProcessStats", skip: str = "") -> None:
        """Add what another runtime of this process counted (a retiring worker's drain of its own
        session), leaving out route `skip` (the drain's marker)."""
        left_out = other.routes.get(skip, RouteStats())
        self.received += other.received - left_out.handled - left_out.failed - left_out.dead_lettered
        self.handled += other.handled - left_out.handled
        self.failed += other.failed - left_out.failed
        self.dead_lettered += other.dead_lettered - left_out.dead_lettered
        self.unrouted += other.unrouted
        self.dropped_on_shutdown += other.dropped_on_shutdown
        self.responses += other.responses
        for pattern, theirs in other.routes.items():
            if pattern != skip:
                mine = self.route(pattern)
                mine.handled += theirs.handled
                mine.failed += theirs.failed
                mine.dead_lettered += theirs.dead_lettered
                mine.seconds += theirs.seconds

    def snapshot(self) -> dict[str, Any]:
        out = {
            "received": self.received,
            "handled": self.handled,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "unrouted": self.unrouted,
            "dropped_on_shutdown": self.dropped_on_shutdown,
            "inflight": self.inflight,
            "responses": self.responses,
            "routes": {
                pattern: {"handled": r.handled, "failed": r.failed, "dead_lettered": r.dead_lettered, "seconds": r.seconds,
                          "retried": r.retried, "held": r.held}
                for pattern, r in self.routes.items()
            },
        }
        for name, extension in self.extensions.items():
            out[name] = extension()
        return out
