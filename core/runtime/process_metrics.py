"""What each process counts for the metrics, beside its `ProcessStats`.

`MetricsHook` (in every process when HTTP_PORT is set) adds a latency histogram per route, the MQTT
connection state and the rate limiters' counters to the process's stats snapshot; integrations
report their backlog (outbox rows, stream entries) with `start_backlog`; `fold_final` keeps what a
departed process counted. Aggregation over processes and the Prometheus export are in `core.operations.metrics`.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from core.foundation.config import Settings
from core.runtime.stats import ProcessStats

if TYPE_CHECKING:
    from core.runtime.runtime import Runtime

log = logging.getLogger("core.metrics")

# Handler latency buckets in seconds (MQTT handlers are often sub-millisecond).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

_COUNTER_KEYS = ("received", "handled", "failed", "dead_lettered", "unrouted", "responses", "dropped_on_shutdown",
                 "rate_limit_redis_errors", "mqtt_publishes_abandoned", "mqtt_sessions_lost")
BACKLOG_INTERVAL = 5.0  # seconds between two measurements of a backlog (a query each, never per message)


# -- in every process -------------------------------------------------------------------------------


class LatencyHistogram:
    """Handler time per route in fixed buckets; `observe` is a `ProcessStats` observer."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._routes: dict[str, list[Any]] = {}  # pattern -> [bucket counts (last one: +Inf), sum]

    def observe(self, pattern: str, seconds: float, outcome: str) -> None:
        entry = self._routes.get(pattern)
        if entry is None:
            entry = self._routes[pattern] = [[0] * (len(self.bounds) + 1), 0.0]
        entry[0][bisect.bisect_left(self.bounds, seconds)] += 1
        entry[1] += seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "routes": {pattern: {"counts": list(counts), "sum": total} for pattern, (counts, total) in self._routes.items()},
        }


def _rate_limit_counters(runtime: "Runtime") -> list[dict[str, Any]]:
    """`counters()` of each RateLimit middleware of the routes, once per middleware object."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for route in runtime.table.routes:
        for mw in route.middleware:
            counters = getattr(mw, "counters", None)
            if counters is None or id(mw) in seen or type(mw).__name__ != "RateLimit":
                continue
            seen.add(id(mw))
            out.append(counters())
    return out


def rate_limit_counters(runtime: "Runtime") -> dict[str, dict[str, int]]:
    """{route pattern: {action: messages over the limit}} from the RateLimit middleware of the routes."""
    out: dict[str, dict[str, int]] = {}
    for data in _rate_limit_counters(runtime):
        for pattern, count in data["limited"].items():
            out.setdefault(pattern, {})[data["action"]] = out.get(pattern, {}).get(data["action"], 0) + count
    return out


def rate_limit_redis_errors(runtime: "Runtime") -> int:
    """Messages the Redis rate limits of the routes could not check (Redis unreachable or too slow)."""
    return sum(int(data.get("redis_errors", 0)) for data in _rate_limit_counters(runtime))


class MetricsHook:
    """RuntimeHook installed in every process when HTTP_PORT is set (see `metrics_hooks`)."""

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()

    async def start(self, runtime: "Runtime") -> None:
        stats = runtime.stats
        stats.observers.append(self.histogram.observe)
        stats.extensions["latency"] = self.histogram.snapshot
        state = runtime.client.state
        stats.extensions["mqtt"] = lambda: {
            "connected": state.connected, "subscribed": state.subscribed,
            "connects": state.connects, "disconnects": state.disconnects,
        }
        stats.extensions["rate_limited"] = lambda: rate_limit_counters(runtime)
        stats.extensions["rate_limit_redis_errors"] = lambda: rate_limit_redis_errors(runtime)

    async def stop(self, runtime: "Runtime") -> None:
        return None


class Backlog:
    """`stats.extensions["backlog"]`: the latest backlog values of every owner (hook) of one process."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, float]] = {}

    def set(self, owner: str, values: dict[str, float]) -> None:
        self._values[owner] = dict(values)

    def clear(self, owner: str) -> None:
        self._values.pop(owner, None)

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for values in self._values.values():
            out.update(values)
        return out


def backlog_of(stats: ProcessStats) -> Backlog:
    """The process's `Backlog`, installed as `stats.extensions["backlog"]` on first use."""
    current = stats.extensions.get("backlog")
    if isinstance(current, Backlog):
        return current
    backlog = Backlog()
    stats.extensions["backlog"] = backlog
    return backlog


def start_backlog(stats: ProcessStats, owner: str, measure: Callable[[], Awaitable[dict[str, float]]],
                  interval: float = BACKLOG_INTERVAL) -> "asyncio.Task[None]":
    """Run `measure()` now and every `interval` seconds; its result is this owner's part of the backlog.

    A failed measurement (database or Redis away) removes the owner's values rather than showing
    stale ones. Cancel the task to stop; the owner's values are removed then.
    """
    backlog = backlog_of(stats)

    async def run() -> None:
        failing = False
        try:
            while True:
                try:
                    backlog.set(owner, await measure())
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - measured again at the next interval
                    backlog.clear(owner)
                    if not failing:
                        log.warning("backlog of %s cannot be measured now (%s: %s)", owner, type(exc).__name__, exc)
                    failing = True
                await asyncio.sleep(interval)
        finally:
            backlog.clear(owner)

    return asyncio.get_running_loop().create_task(run(), name=f"backlog[{owner}]")


def metrics_hooks(settings: Settings, worker_id: str) -> list[MetricsHook]:
    """Hook factory for `Application.hook_factories`: metrics only when the HTTP server is on."""
    return [MetricsHook()] if settings.http_port is not None else []


def add_numbers(into: dict[str, Any], add: dict[str, Any]) -> None:
    """Deep-add the numbers of `add` into `into` (lists of numbers element-wise)."""
    for key, value in add.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            add_numbers(into.setdefault(key, {}), value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            current = into.get(key)
            if isinstance(current, list) and len(current) == len(value):
                into[key] = [a + b for a, b in zip(current, value)]
            else:
                into[key] = list(value)


def fold_final(into: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add the monotonic parts of a process's final snapshot to `into` (`SystemSample.departed`)."""
    add_numbers(into, countable(stats))


def countable(stats: dict[str, Any]) -> dict[str, Any]:
    """The monotonic parts of a process snapshot (what is folded into retired totals)."""
    out: dict[str, Any] = {k: stats.get(k, 0) for k in _COUNTER_KEYS}
    out["routes"] = stats.get("routes", {})
    latency = stats.get("latency")
    if isinstance(latency, dict):
        out["latency"] = {"routes": latency.get("routes", {})}
    out["rate_limited"] = stats.get("rate_limited", {})
    for name in ("streams", "outbox"):  # stream consumers' and outbox processor's counters
        value = stats.get(name)
        if isinstance(value, dict):
            out[name] = value
    mqtt = stats.get("mqtt")
    if isinstance(mqtt, dict):
        out["reconnects"] = max(0, int(mqtt.get("connects", 0)) - 1)
    return out
