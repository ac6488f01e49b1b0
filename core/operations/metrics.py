"""Metrics over every process of an app: aggregation and Prometheus export.

What each process counts for them is in `core.runtime.process_metrics` (names re-exported here).

How numbers get here (and why not prometheus-client's multiprocess mode): each process already
counts into its `ProcessStats` on the event loop's thread, and workers already send a snapshot of
it to the supervisor with every heartbeat. `MetricsHook` adds what the counters lack to that
snapshot, through `ProcessStats.extensions`: a latency histogram per route (fed by one observer
call per handled message), the MQTT connection state and the rate limiters' counters. The
supervisor turns those snapshots into Prometheus metrics with a custom collector
(`AppCollector`). prometheus-client's multiprocess mode would need a shared directory of mmap
files, cleanup of dead workers' files and a second counting path on the hot path; this way a
message costs two integer increments and a bisect, and the supervisor (which knows which process
is which, and when one was replaced) does the arithmetic.

Counters stay monotonic across worker restarts: when a worker slot's pid changes, the last
snapshot seen from the old process is folded into the slot's retired totals. What a crashed process
counted after its last heartbeat (at most about a second) is lost from the per-route numbers.

Backlog gauges (outbox rows, stream entries): hooks register a measuring coroutine with
`start_backlog(stats, owner, measure)`; a task of theirs runs it every `BACKLOG_INTERVAL` and keeps
the result in the process's `Backlog` (`stats.extensions["backlog"]`), since snapshots are taken
every heartbeat and must stay cheap. Backlogs are global quantities measured from possibly several
processes, so `mqtt_app_backlog{source}` is the largest report. The outbox and stream counters
(`stats.extensions["outbox"]`, `["streams"]`) are summed over processes like the message counters.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence

from core.processes.autoscale import add_metric_families
from core.transport.orphans import add_metric_families as add_adoption_families
from core.runtime.process_metrics import (BACKLOG_INTERVAL, LATENCY_BUCKETS, Backlog,  # noqa: F401 - also imported from here
                                  LatencyHistogram, MetricsHook, add_numbers, backlog_of, countable, fold_final,
                                  metrics_hooks, rate_limit_counters, rate_limit_redis_errors, start_backlog)

if TYPE_CHECKING:
    from core.runtime.runtime import Runtime
    from core.processes.supervisor import Supervisor

RATE_WINDOW = 10.0  # seconds of samples behind the rates shown on the status page
_ROUTE_KEYS = ("handled", "failed", "dead_lettered", "seconds")
# Counters of the Redis Streams consumers (per stream) and of the outbox processor, as exported.
STREAM_COUNTERS = {
    "handled": "Stream entries whose handler succeeded",
    "failed": "Failed attempts at stream entries (a handler raised or timed out; every retry counts)",
    "retried": "Stream entries re-claimed for a retry",
    "dead_lettered": "Stream entries moved to <stream>:dlq",
    "reclaimed": "Stream entries taken over from another consumer (XAUTOCLAIM)",
    "held": "Stream entry failures a down dependency caused (retried without counting an attempt)",
}
OUTBOX_COUNTERS = {
    "claimed": "Outbox rows claimed (a takeover counts again)",
    "published": "Outbox rows published and marked PUBLISHED",
    "failed": "Failed outbox publish attempts (retried later)",
    "abandoned": "Outbox rows ABANDONED after OUTBOX_MAX_ATTEMPTS",
    "taken_over": "Outbox rows claimed after another process's lock expired",
    "held": "Outbox stream rows handed back without an attempt while Redis could not take them",
    "cleaned": "PUBLISHED outbox rows deleted after OUTBOX_RETENTION",
}


# -- what a status source reports -------------------------------------------------------------------


@dataclass
class ProcessInfo:
    """One process as the status page and the metrics see it."""

    id: str  # "main", "w0", "w1", ...
    role: str  # "main" or "worker"
    pid: int | None
    state: str
    ready: bool  # connected and subscribed
    connected: bool
    restarts: int = 0
    recycles: int = 0
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    heartbeat_age: float | None = None  # workers: seconds since their last message to the supervisor
    heartbeat_late: bool = False  # that age passed a few heartbeat intervals: the figures shown are stale


@dataclass
class SystemSample:
    """Everything a status source knows at one moment."""

    mode: str  # "single" or "workers"
    pid: int
    uptime: float
    stopping: bool
    fatal: str | None
    processes: list[ProcessInfo]
    autoscale: dict[str, Any] | None = None  # `Autoscaler.snapshot()` with WORKER_AUTO_SCALE
    departed: dict[str, Any] | None = None  # final counters of processes gone from the pool (`fold_final`)


class StatusSource(Protocol):
    def sample(self) -> SystemSample: ...


class _ProcessMeter:
    """psutil RSS/CPU of one process (CPU percent since the previous call)."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._proc.cpu_percent(None)

    def read(self) -> tuple[int, float]:
        return self._proc.memory_info().rss, self._proc.cpu_percent(None)


def _runtime_info(runtime: "Runtime", meter: _ProcessMeter | None) -> ProcessInfo:
    state = runtime.client.state
    stats = runtime.stats.snapshot()
    stats["inflight"] = runtime.dispatcher.inflight
    rss, cpu = meter.read() if meter is not None else (0, 0.0)
    ready = state.connected and state.subscribed
    return ProcessInfo("main", "main", os.getpid(), "running" if ready else "connecting", ready, state.connected,
                       rss_bytes=rss, cpu_percent=cpu, stats=stats)


class RuntimeSource:
    """`python main.py`: one process, one runtime."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self._meter = _ProcessMeter()
        self._started = time.monotonic()

    def sample(self) -> SystemSample:
        info = _runtime_info(self.runtime, self._meter)
        stopping = bool(getattr(self.runtime, "_stopping", False))
        if stopping:
            info.state = "stopping"
        return SystemSample("single", os.getpid(), time.monotonic() - self._started, stopping, None, [info])


class SupervisorSource:
    """`python main.py --workers`: the supervisor's own runtime (plain routes) plus the workers."""

    def __init__(self, manager: "Supervisor") -> None:
        self.manager = manager
        self._meter = _ProcessMeter()

    def sample(self) -> SystemSample:
        snap = self.manager.snapshot()
        processes: list[ProcessInfo] = []
        rss, cpu = self._meter.read()
        main = snap.get("main")
        if main is not None:
            stats = dict(main.get("stats") or {})
            raw_mqtt = stats.get("mqtt")
            mqtt: dict[str, Any] = raw_mqtt if isinstance(raw_mqtt, dict) else {}
            up = bool(main.get("connected")) and bool(mqtt.get("subscribed", main.get("connected")))
            state = "stopping" if snap["state"] == "stopping" else ("running" if up else "connecting")
            processes.append(ProcessInfo("main", "main", snap["pid"], state, up, bool(main.get("connected")),
                                         rss_bytes=rss, cpu_percent=cpu, stats=stats))
        else:
            # No plain routes: the supervisor holds no MQTT connection of its own.
            processes.append(ProcessInfo("main", "supervisor", snap["pid"], snap["state"], True, False,
                                         rss_bytes=rss, cpu_percent=cpu))
        for w in snap["workers"]:
            worker_stats: dict[str, Any] = w.get("stats") or {}
            worker_mqtt = worker_stats.get("mqtt")
            subscribed = (bool(worker_mqtt["subscribed"]) if isinstance(worker_mqtt, dict)
                          else bool(w["ready"] and w["connected"]))
            processes.append(ProcessInfo(
                w["worker_id"], "worker", w["pid"], w["state"],
                ready=w["state"] == "running" and w["connected"] and subscribed and w["ready"],
                connected=bool(w["connected"]), restarts=int(w["restarts"]), recycles=int(w.get("recycles", 0)),
                rss_bytes=int(w["rss_bytes"] or 0), cpu_percent=float(w["cpu_percent"] or 0.0), stats=worker_stats,
                heartbeat_age=w.get("heartbeat_age"), heartbeat_late=bool(w.get("heartbeat_late")),
            ))
        return SystemSample("workers", snap["pid"], float(snap["uptime"]), snap["state"] == "stopping", snap["fatal"],
                            processes, snap.get("autoscale"), snap.get("departed"))


# -- aggregation ------------------------------------------------------------------------------------


@dataclass
class RouteView:
    pattern: str
    received: int = 0
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    rate_limited: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rate: float = 0.0  # completed messages per second over the last RATE_WINDOW
    error_rate: float = 0.0  # dead-lettered per second
    histogram: tuple[list[int], float] | None = None  # (bucket counts, sum)
    retried: int = 0
    held: int = 0  # messages that waited for a down dependency (cumulative)
    holding: int = 0  # messages waiting for a down dependency now, over every process
    breaker: str = "closed"  # the most open circuit breaker state of the route over the processes

    @property
    def average_ms(self) -> float:
        done = self.handled + self.failed
        return 1000 * self.seconds / done if done else 0.0


@dataclass
class SystemView:
    """Aggregated state: what /metrics, /status.json and the status page show."""

    sample: SystemSample
    processes: list[tuple[ProcessInfo, dict[str, Any], float]]  # info, cumulative counters, messages/s
    routes: list[RouteView]
    totals: dict[str, Any]
    bounds: list[float]
    backlog: dict[str, float]


class Aggregator:
    """Folds samples into cumulative counters per process slot and rates over the last seconds."""

    def __init__(self, source: StatusSource, routes: Iterable[str] = ()) -> None:
        self.source = source
        self.known_routes = list(routes)
        self._retired: dict[str, dict[str, Any]] = {}
        self._last: dict[str, tuple[int | None, dict[str, Any]]] = {}  # slot -> (pid, countable snapshot)
        self._departed: dict[str, Any] = {}  # earlier processes of slots no longer in the pool
        self._history: deque[tuple[float, dict[str, int], dict[str, tuple[int, int]]]] = deque()

    def collect(self) -> SystemView:
        sample = self.source.sample()
        now = time.monotonic()
        per_process: list[tuple[ProcessInfo, dict[str, Any]]] = []
        present = {info.id for info in sample.processes}
        for slot in [slot for slot in self._last if slot not in present]:
            # A retired worker: its final numbers are in `sample.departed`, its earlier processes' here.
            del self._last[slot]
            add_numbers(self._departed, self._retired.pop(slot, {}))
        for info in sample.processes:
            current = countable(info.stats) if info.stats else None
            last = self._last.get(info.id)
            if last is not None and last[0] != info.pid and last[0] is not None:
                # A new process took the slot: keep what the old one counted.
                add_numbers(self._retired.setdefault(info.id, {}), last[1])
                self._last.pop(info.id)
            if current is not None and info.pid is not None:
                self._last[info.id] = (info.pid, current)
            cumulative: dict[str, Any] = {}
            add_numbers(cumulative, self._retired.get(info.id, {}))
            live = self._last.get(info.id)
            if live is not None and live[0] == info.pid:
                add_numbers(cumulative, live[1])
            per_process.append((info, cumulative))
        totals: dict[str, Any] = {}
        add_numbers(totals, self._departed)
        add_numbers(totals, sample.departed or {})
        for _, cumulative in per_process:
            add_numbers(totals, cumulative)
        routes = self._routes(totals)
        _add_holding(routes, sample.processes)
        bounds = list(LATENCY_BUCKETS)
        for info in sample.processes:
            latency = info.stats.get("latency") if info.stats else None
            if isinstance(latency, dict) and latency.get("bounds"):
                bounds = list(latency["bounds"])
                break
        backlog: dict[str, float] = {}
        for info in sample.processes:
            for name, value in ((info.stats or {}).get("backlog") or {}).items():
                backlog[name] = max(backlog.get(name, value), value)
        rates_p, rates_r = self._rates(now, per_process, routes)
        view_processes = [(info, cumulative, rates_p.get(info.id, 0.0)) for info, cumulative in per_process]
        for route in routes:
            route.rate, route.error_rate = rates_r.get(route.pattern, (0.0, 0.0))
        return SystemView(sample, view_processes, routes, totals, bounds, backlog)

    def _routes(self, totals: dict[str, Any]) -> list[RouteView]:
        by_pattern: dict[str, RouteView] = {p: RouteView(p) for p in self.known_routes}
        for pattern, data in (totals.get("routes") or {}).items():
            view = by_pattern.setdefault(pattern, RouteView(pattern))
            view.handled = int(data.get("handled", 0))
            view.failed = int(data.get("failed", 0))
            view.dead_lettered = int(data.get("dead_lettered", 0))
            view.seconds = float(data.get("seconds", 0.0))
            view.retried = int(data.get("retried", 0))
            view.held = int(data.get("held", 0))
            view.received = view.handled + view.dead_lettered
        for pattern, actions in (totals.get("rate_limited") or {}).items():
            by_pattern.setdefault(pattern, RouteView(pattern)).rate_limited = {k: int(v) for k, v in actions.items()}
        for pattern, hist in ((totals.get("latency") or {}).get("routes") or {}).items():
            by_pattern.setdefault(pattern, RouteView(pattern)).histogram = (list(hist["counts"]), float(hist["sum"]))
        return list(by_pattern.values())

    def _rates(self, now: float, per_process: list[tuple[ProcessInfo, dict[str, Any]]],
               routes: list[RouteView]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
        p_counts = {info.id: int(c.get("received", 0)) for info, c in per_process}
        r_counts = {r.pattern: (r.received, r.dead_lettered) for r in routes}
        history = self._history
        if not history or now - history[-1][0] >= 0.25:
            history.append((now, p_counts, r_counts))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
            history.popleft()
        t0, p0, r0 = history[0]
        span = now - t0
        if span < 0.5:
            return {}, {}
        p_rates = {k: max(0, v - p0.get(k, 0)) / span for k, v in p_counts.items()}
        r_rates = {k: (max(0, v[0] - r0.get(k, (0, 0))[0]) / span, max(0, v[1] - r0.get(k, (0, 0))[1]) / span)
                   for k, v in r_counts.items()}
        return p_rates, r_rates


_BREAKER_ORDER = {"closed": 0, "half_open": 1, "open": 2}


def _add_holding(routes: list[RouteView], processes: list[ProcessInfo]) -> None:
    """Live holding counts and breaker states (the dispatchers' `holding` extension), summed over processes."""
    by_pattern = {route.pattern: route for route in routes}
    for info in processes:
        for pattern, data in ((info.stats or {}).get("holding") or {}).items():
            route = by_pattern.get(pattern)
            if route is None:
                route = by_pattern[pattern] = RouteView(pattern)
                routes.append(route)
            route.holding += int(data.get("holding", 0))
            state = str(data.get("breaker", "closed"))
            if _BREAKER_ORDER.get(state, 0) > _BREAKER_ORDER.get(route.breaker, 0):
                route.breaker = state


# -- Prometheus -------------------------------------------------------------------------------------


class AppCollector:
    """A prometheus-client collector reading an `Aggregator` at scrape time."""

    def __init__(self, aggregator: Aggregator, prefix: str = "mqtt_app") -> None:
        self.aggregator = aggregator
        self.prefix = prefix

    def describe(self) -> list[Any]:
        return []  # metric families depend on the routes and processes: no up-front description

    def collect(self) -> Iterator[Any]:
        return iter(build_metric_families(self.aggregator.collect(), self.prefix))


def build_metric_families(view: SystemView, prefix: str = "mqtt_app") -> list[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    p = prefix
    out: list[Any] = []

    def counter(name: str, doc: str, labels: Sequence[str]) -> Any:
        family = CounterMetricFamily(f"{p}_{name}", doc, labels=labels)
        out.append(family)
        return family

    def gauge(name: str, doc: str, labels: Sequence[str]) -> Any:
        family = GaugeMetricFamily(f"{p}_{name}", doc, labels=labels)
        out.append(family)
        return family

    received = counter("messages_received", "MQTT messages delivered to the process", ["worker"])
    unrouted = counter("messages_unrouted", "Messages that matched no route (dead-lettered)", ["worker"])
    responses = counter("responses", "Handler results published to a response topic", ["worker"])
    redis_errors = counter("rate_limit_redis_errors", "Messages a Redis RateLimit could not check because Redis "
                           "was unreachable (let through, or dead-lettered with on_redis_error='reject')", ["worker"])
    reconnects = counter("mqtt_reconnects", "MQTT reconnections after the first connection", ["worker"])
    abandoned = counter("mqtt_publishes_abandoned", "Publishes given up because the broker closed the connection "
                        "each time they were sent (the caller got a PublishError)", ["worker"])
    sessions_lost = counter("mqtt_sessions_lost", "Reconnects that found the broker had dropped the session "
                            "(and the messages queued in it)", ["worker"])
    inflight = gauge("inflight", "Messages being handled right now", ["worker"])
    connected = gauge("mqtt_connected", "1 while the process's MQTT connection is up", ["worker"])
    ready = gauge("process_ready", "1 while the process is connected and subscribed", ["worker"])
    rss = gauge("process_resident_memory_bytes", "Resident memory (psutil)", ["worker", "pid"])
    cpu = gauge("process_cpu_percent", "CPU use since the previous sample, percent of one core (psutil)", ["worker", "pid"])
    restarts = counter("worker_restarts", "Worker processes restarted after a crash or a missed heartbeat", ["worker"])
    recycles = counter("worker_recycles", "Worker processes replaced by WORKER_MAX_MESSAGES/WORKER_MAX_MEMORY_MB", ["worker"])
    for info, cumulative, _rate in view.processes:
        w = info.id
        received.add_metric([w], cumulative.get("received", 0))
        unrouted.add_metric([w], cumulative.get("unrouted", 0))
        responses.add_metric([w], cumulative.get("responses", 0))
        redis_errors.add_metric([w], cumulative.get("rate_limit_redis_errors", 0))
        reconnects.add_metric([w], cumulative.get("reconnects", 0))
        abandoned.add_metric([w], cumulative.get("mqtt_publishes_abandoned", 0))
        sessions_lost.add_metric([w], cumulative.get("mqtt_sessions_lost", 0))
        inflight.add_metric([w], (info.stats or {}).get("inflight", 0))
        if info.role != "supervisor":
            connected.add_metric([w], 1 if info.connected else 0)
        ready.add_metric([w], 1 if info.ready else 0)
        rss.add_metric([w, str(info.pid or "")], info.rss_bytes)
        cpu.add_metric([w, str(info.pid or "")], info.cpu_percent)
        if info.role == "worker":
            restarts.add_metric([w], info.restarts)
            recycles.add_metric([w], info.recycles)

    r_received = counter("route_messages_received", "Messages a route finished with (handled + dead-lettered)", ["route"])
    r_handled = counter("route_messages_handled", "Messages a route's handler finished without error", ["route"])
    r_failed = counter("route_messages_failed", "Handler errors and timeouts (these are also dead-lettered)", ["route"])
    r_dead = counter("route_messages_dead_lettered", "Messages of a route sent to the dead-letter topic", ["route"])
    r_retried = counter("route_messages_retried", "Handler calls repeated after a failure (route retry policy)",
                        ["route"])
    r_held = counter("route_messages_held", "Messages that waited for a down dependency (transient failure or "
                     "open circuit breaker) instead of being dead-lettered", ["route"])
    r_holding = gauge("route_messages_holding", "Messages waiting for a down dependency now (not acknowledged)",
                      ["route"])
    r_open = gauge("route_circuit_open", "1 while a route's circuit breaker is open or half-open", ["route"])
    r_limited = counter("rate_limited", "Messages over a RateLimit, by action (dead_letter or drop)", ["route", "action"])
    latency = HistogramMetricFamily(f"{p}_handler_duration_seconds", "Handler (with middleware) time per route",
                                    labels=["route"])
    out.append(latency)
    for route in view.routes:
        r_received.add_metric([route.pattern], route.received)
        r_handled.add_metric([route.pattern], route.handled)
        r_failed.add_metric([route.pattern], route.failed)
        r_dead.add_metric([route.pattern], route.dead_lettered)
        r_retried.add_metric([route.pattern], route.retried)
        r_held.add_metric([route.pattern], route.held)
        r_holding.add_metric([route.pattern], route.holding)
        r_open.add_metric([route.pattern], 0 if route.breaker == "closed" else 1)
        for action, count in sorted(route.rate_limited.items()):
            r_limited.add_metric([route.pattern, action], count)
        if route.histogram is not None:
            counts, total = route.histogram
            buckets, running = [], 0
            for bound, count in zip([*map(_le, view.bounds), "+Inf"], counts):
                running += count
                buckets.append((bound, running))
            latency.add_metric([route.pattern], buckets, total)

    streams = view.totals.get("streams")
    if streams:
        for key, doc in STREAM_COUNTERS.items():
            family = counter(f"stream_{key}", doc, ["stream"])
            for stream, counts in sorted(streams.items()):
                family.add_metric([stream], counts.get(key, 0))
    outbox = view.totals.get("outbox")
    if outbox:
        for key, doc in OUTBOX_COUNTERS.items():
            counter(f"outbox_{key}", doc, []).add_metric([], outbox.get(key, 0))

    backlog = gauge("backlog", "Work waiting (outbox rows, stream entries), largest report", ["source"])
    for name, value in sorted(view.backlog.items()):
        backlog.add_metric([name], value)
    up = gauge("up_seconds", "Seconds since the process (supervisor) started", [])
    up.add_metric([], view.sample.uptime)
    add_metric_families(out, view.sample.autoscale, p)
    add_adoption_families(out, p)
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


def render_metrics(aggregator: Aggregator, prefix: str = "mqtt_app") -> tuple[bytes, str]:
    """The Prometheus text exposition of an aggregator: (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(aggregator, prefix))
    return generate_latest(registry), CONTENT_TYPE_LATEST
