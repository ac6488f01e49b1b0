"""The recent past of the counters, for the status page's charts.

The operations server already collects a `SystemView` every second (counters the processes keep
anyway, and with `--workers` the heartbeats' snapshots). Every `STATUS_HISTORY_INTERVAL` seconds
`History.observe` turns the difference to the previous sample into one point per series:

- per route and per process: messages/s, errors/s (dead letters), p50 and p99 handler latency
  (milliseconds, from the latency histogram's buckets that filled during the interval);
- per process: messages in flight, the highest of the (per-second) observations since the previous
  point (the chart draws MAX_INFLIGHT over it);
- per backlog source: its value.

Each series is a ring buffer of `STATUS_HISTORY_WINDOW / STATUS_HISTORY_INTERVAL` points, so
memory depends on the number of routes, processes and backlog sources, never on the message count.
Nothing here runs per message.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from core.operations.metrics import SystemView

Value = float | None
# What one route or process had counted at the previous sample: messages, dead letters, bucket counts.
_Counters = tuple[int, int, list[int]]
METRICS = ("rate", "errors", "p50", "p99")


def quantile_ms(q: float, bounds: Sequence[float], counts: Sequence[int]) -> Value:
    """The q-quantile in milliseconds of a histogram (`counts` per bucket, the last one +Inf).

    Linear within the bucket the quantile falls in, as Prometheus' histogram_quantile does; in the
    +Inf bucket the largest finite bound (a lower estimate). None without observations.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return bounds[-1] * 1000
            lower = bounds[i - 1] if i else 0.0
            return (lower + (bounds[i] - lower) * (rank - seen) / count) * 1000
        seen += count
    return bounds[-1] * 1000


class Series:
    """Ring buffers of one group of charts (routes, processes or backlog), aligned with `History.times`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lines: dict[str, dict[str, deque[Value]]] = {}  # name -> metric -> points
        self._touched: set[str] = set()

    def put(self, name: str, values: dict[str, Value], filled: int) -> None:
        """This interval's values of `name`; a new name starts with gaps for the `filled - 1` older points."""
        line = self.lines.setdefault(name, {})
        for metric, value in values.items():
            points = line.get(metric)
            if points is None:
                points = line[metric] = deque([None] * min(self.capacity, max(0, filled - 1)), maxlen=self.capacity)
            points.append(value)
        self._touched.add(name)

    def close_interval(self) -> None:
        """Names without a value this interval get a gap; names with nothing left in the window go."""
        for name in list(self.lines):
            line = self.lines[name]
            if name not in self._touched:
                for points in line.values():
                    points.append(None)
                if all(v is None for points in line.values() for v in points):
                    del self.lines[name]
        self._touched.clear()

    def data(self) -> dict[str, dict[str, list[Value]]]:
        return {name: {metric: [None if v is None else round(v, 3) for v in points] for metric, points in line.items()}
                for name, line in sorted(self.lines.items())}


class History:
    """Points every `interval` seconds over the last `window` seconds (see the module docstring)."""

    def __init__(self, interval: float = 5.0, window: float = 900.0) -> None:
        if interval <= 0 or window < interval:
            raise ValueError(f"history needs 0 < interval <= window, got interval={interval} window={window}")
        self.interval = interval
        self.window = window
        self.capacity = max(2, math.ceil(window / interval))
        self.times: deque[float] = deque(maxlen=self.capacity)  # wall-clock time of each point
        self.routes = Series(self.capacity)
        self.processes = Series(self.capacity)
        self.backlog = Series(self.capacity)
        self._last_at: float | None = None  # monotonic time of the previous sample
        self._prev_routes: dict[str, _Counters] = {}
        self._prev_processes: dict[str, _Counters] = {}
        self._inflight_peak: dict[str, float] = {}  # highest in-flight count seen since the last point

    def observe(self, view: "SystemView", now: float | None = None, wall: float | None = None) -> bool:
        """Take a point if `interval` has passed since the previous sample; True if one was taken.

        Call it more often than `interval` (the server does, every second): in flight is a gauge,
        and a point shows the highest value the calls in between saw.
        """
        now = time.monotonic() if now is None else now
        peak = self._inflight_peak
        for info, _cumulative, _rate in view.processes:
            if info.role != "supervisor":
                value = float((info.stats or {}).get("inflight", 0))
                peak[info.id] = max(peak.get(info.id, value), value)
        if self._last_at is not None and now - self._last_at < self.interval * 0.95:
            return False
        routes = {r.pattern: (r.received, r.dead_lettered, list(r.histogram[0]) if r.histogram else [])
                  for r in view.routes}
        processes = {info.id: _process_counters(cumulative) for info, cumulative, _rate in view.processes
                     if info.role != "supervisor"}  # a supervisor without routes of its own counts nothing
        if self._last_at is None:  # the first sample is the baseline
            self._last_at, self._prev_routes, self._prev_processes = now, routes, processes
            return False
        span = now - self._last_at
        self.times.append(time.time() if wall is None else wall)
        filled = len(self.times)
        for name, counters in routes.items():
            self.routes.put(name, _rates(counters, self._prev_routes.get(name), span, view.bounds), filled)
        for name, counters in processes.items():
            values = _rates(counters, self._prev_processes.get(name), span, view.bounds)
            values["inflight"] = peak.get(name, 0.0)
            self.processes.put(name, values, filled)
        peak.clear()
        for name, value in view.backlog.items():
            self.backlog.put(name, {"value": float(value)}, filled)
        for series in (self.routes, self.processes, self.backlog):
            series.close_interval()
        # Keep the counters of names gone from this sample: a worker slot that comes back (scaled up
        # again) continues from them instead of charting its whole past as one interval.
        self._last_at = now
        self._prev_routes.update(routes)
        self._prev_processes.update(processes)
        return True

    def data(self) -> dict[str, Any]:
        """Plain data for the charts and /status.json: times (epoch seconds) and the series."""
        return {
            "interval": self.interval, "window": self.window, "times": [round(t, 3) for t in self.times],
            "routes": self.routes.data(), "processes": self.processes.data(), "backlog": self.backlog.data(),
        }


def _process_counters(cumulative: dict[str, Any]) -> _Counters:
    """A process's messages, dead letters and latency buckets summed over its routes."""
    buckets: list[int] = []
    for hist in ((cumulative.get("latency") or {}).get("routes") or {}).values():
        counts = hist.get("counts") or []
        buckets = [a + b for a, b in zip(buckets, counts)] if buckets else list(counts)
    return int(cumulative.get("received", 0)), int(cumulative.get("dead_lettered", 0)), buckets


def _rates(now: _Counters, before: _Counters | None, span: float, bounds: Sequence[float]) -> dict[str, Value]:
    """messages/s, errors/s, p50 and p99 (ms) between two samples of one route or process."""
    if before is None:
        before = (0, 0, [])
    received, dead, counts = now
    old_counts = before[2] if len(before[2]) == len(counts) else [0] * len(counts)
    # Counters only grow (the aggregator keeps replaced processes' totals); max() guards a reset anyway.
    delta = [max(0, a - b) for a, b in zip(counts, old_counts)]
    return {
        "rate": max(0, received - before[0]) / span,
        "errors": max(0, dead - before[1]) / span,
        "p50": quantile_ms(0.5, bounds, delta),
        "p99": quantile_ms(0.99, bounds, delta),
    }
