"""Worker autoscaling (WORKER_AUTO_SCALE): how many worker processes a pod should run right now.

`Autoscaler` is a pure decision object: the supervisor feeds it, once per heartbeat interval, the
latest load figures of each worker (`WorkerLoad`, from the heartbeats) and acts on the `Decision` it
returns (start workers, or retire the highest-numbered one). It keeps no processes and reads no
clock of its own, so it is tested without processes (tests/test_autoscale.py).

The signals, per worker, from its heartbeat:
- saturation: the average number of messages in flight over the heartbeat interval (sampled every
  50 ms in the worker) divided by MAX_INFLIGHT. A worker that cannot keep up holds MAX_INFLIGHT
  unacknowledged messages (the broker's Receive Maximum), whatever the reason (slow I/O, CPU);
- busy time: handler seconds per second over the interval, divided by MAX_INFLIGHT (the time
  average of concurrency, which catches short handlers the in-flight samples miss);
- backlog where known: the stream backlogs (`stream:<name>`, entries the group has not acknowledged)
  that workers measure when the operations server is on.

A worker's utilization is the larger of the first two, at most 1; the pool's is their mean. The pool
grows when its utilization stayed at or above WORKER_SCALE_UP_AT for WORKER_SCALE_UP_WINDOW seconds
(or the backlog grew throughout that window) and shrinks by one when it stayed below
WORKER_SCALE_DOWN_AT for WORKER_SCALE_DOWN_WINDOW seconds, the backlog did not grow, and the
remaining workers would stay below WORKER_SCALE_UP_AT. The gap between the two thresholds is the
hysteresis; after any change nothing is decided for WORKER_SCALE_COOLDOWN seconds, and the windows
start again once every worker is up (a new worker, or one being retired, is not measured).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from core.foundation.config import Settings

RECENT_DECISIONS = 20  # decisions kept for the status page and /status.json


@dataclass(frozen=True)
class ScalePolicy:
    """The WORKER_* autoscaling settings, resolved."""

    min_count: int
    max_count: int
    up_at: float
    down_at: float
    up_window: float
    down_window: float
    cooldown: float

    @classmethod
    def from_settings(cls, settings: "Settings", cpus: int) -> "ScalePolicy":
        """WORKER_MAX_COUNT unset: one worker per CPU core (at least WORKER_MIN_COUNT)."""
        low = settings.worker_min_count
        high = settings.worker_max_count if settings.worker_max_count is not None else max(low, cpus)
        return cls(low, high, settings.worker_scale_up_at, settings.worker_scale_down_at,
                   settings.worker_scale_up_window, settings.worker_scale_down_window, settings.worker_scale_cooldown)

    def clamp(self, count: int) -> int:
        return max(self.min_count, min(self.max_count, count))


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's figures from its latest heartbeat."""

    inflight: float  # average messages in flight over the heartbeat interval
    busy: float  # handler seconds per second over the interval
    backlog: float | None = None  # stream entries waiting, if measured

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> "WorkerLoad":
        load = stats.get("load") or {}
        inflight = float(load.get("inflight", stats.get("inflight", 0)) or 0)
        backlogs = [float(v) for k, v in (stats.get("backlog") or {}).items()
                    if k.startswith("stream:") and k.count(":") == 1]
        return cls(inflight, float(load.get("busy", 0) or 0), sum(backlogs) if backlogs else None)


@dataclass(frozen=True)
class Decision:
    before: int
    after: int
    utilization: float
    reason: str
    at: float  # wall-clock time, for display

    @property
    def direction(self) -> str:
        return "up" if self.after > self.before else "down"


class LoadMeter:
    """In a worker: the average in-flight count between two heartbeats (one add per 50 ms tick)."""

    def __init__(self) -> None:
        self._sum = 0
        self._ticks = 0
        self._busy = 0.0
        self._at = time.monotonic()

    def tick(self, inflight: int) -> None:
        self._sum += inflight
        self._ticks += 1

    def read(self, now: float, routes: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """`{"inflight", "busy"}` since the previous read; `routes` is the stats snapshot's per-route part."""
        busy = sum(float(r.get("seconds", 0.0)) for r in routes.values())
        span = max(now - self._at, 1e-3)
        out = {"inflight": round(self._sum / self._ticks, 3) if self._ticks else 0.0,
               "busy": round(max(0.0, busy - self._busy) / span, 3)}
        self._sum, self._ticks, self._busy, self._at = 0, 0, busy, now
        return out


class Autoscaler:
    """Decides the worker count from load samples; see the module docstring for the rules."""

    def __init__(self, policy: ScalePolicy, max_inflight: int, now: float) -> None:
        self.policy = policy
        self.max_inflight = max(1, max_inflight)
        self.utilization = 0.0
        self.backlog: float | None = None
        self.counts = {"up": 0, "down": 0}
        self.recent: deque[Decision] = deque(maxlen=RECENT_DECISIONS)
        self._samples: deque[tuple[float, float, float | None]] = deque()  # (time, utilization, backlog)
        self._last_change = now

    def observe(self, now: float, loads: Mapping[str, WorkerLoad], count: int, settled: bool) -> Decision | None:
        """One sample of every worker's load; a decision to act on, or None.

        `settled` is False while a worker is starting, recycling, restarting or being retired: the
        windows then start again, since a pool in transition does not show its steady load.
        """
        if not settled or not loads:
            self._samples.clear()
            return None
        per_worker = [min(1.0, max(load.inflight, load.busy) / self.max_inflight) for load in loads.values()]
        self.utilization = sum(per_worker) / len(per_worker)
        known = [load.backlog for load in loads.values() if load.backlog is not None]
        self.backlog = max(known) if known else None
        self._samples.append((now, self.utilization, self.backlog))
        keep = max(self.policy.up_window, self.policy.down_window)
        while len(self._samples) > 1 and self._samples[1][0] <= now - keep:
            self._samples.popleft()
        if now - self._last_change < self.policy.cooldown:
            return None
        decision = self._decide(now, count)
        if decision is not None:
            self.counts[decision.direction] += 1
            self.recent.append(decision)
            self._last_change = now
            self._samples.clear()
        return decision

    def _window(self, now: float, seconds: float) -> list[tuple[float, float, float | None]] | None:
        """The samples of the last `seconds`, if sampling has gone on at least that long."""
        if not self._samples or self._samples[0][0] > now - seconds:
            return None
        return [s for s in self._samples if s[0] >= now - seconds]

    def _decide(self, now: float, count: int) -> Decision | None:
        p = self.policy
        up = self._window(now, p.up_window)
        if up and count < p.max_count:
            mean = sum(u for _, u, _ in up) / len(up)
            if all(u >= p.up_at for _, u, _ in up):
                after = min(p.max_count, max(count + 1, math.ceil(count * mean / p.up_at)))
                why = f"utilization {mean:.2f} >= WORKER_SCALE_UP_AT={p.up_at:g} for {p.up_window:g} s"
                return Decision(count, after, mean, why, time.time())
            if _grew(up):
                why = f"stream backlog grew from {up[0][2]:g} to {up[-1][2]:g} over {p.up_window:g} s"
                return Decision(count, count + 1, mean, why, time.time())
        down = self._window(now, p.down_window)
        if down and count > p.min_count:
            mean = sum(u for _, u, _ in down) / len(down)
            peak = max(u for _, u, _ in down)
            if peak < p.down_at and peak * count / (count - 1) < p.up_at and not _grew(down):
                why = f"utilization {mean:.2f} < WORKER_SCALE_DOWN_AT={p.down_at:g} for {p.down_window:g} s"
                return Decision(count, count - 1, mean, why, time.time())
        return None

    def snapshot(self, count: int) -> dict[str, Any]:
        """Plain data for the supervisor's snapshot, /status.json and the metrics."""
        p = self.policy
        return {
            "workers": count, "min": p.min_count, "max": p.max_count, "utilization": round(self.utilization, 3),
            "backlog": self.backlog, "decisions": dict(self.counts),
            "recent": [asdict(d) | {"direction": d.direction} for d in self.recent],
        }


def _grew(samples: list[tuple[float, float, float | None]]) -> bool:
    """The backlog was known throughout, never went down, and ended higher than it started."""
    backlogs = [b for _, _, b in samples]
    if len(backlogs) < 2 or any(b is None for b in backlogs):
        return False
    return all(b2 >= b1 for b1, b2 in zip(backlogs, backlogs[1:])) and backlogs[-1] > backlogs[0]  # type: ignore[operator]


def add_metric_families(out: list[Any], state: Mapping[str, Any] | None, prefix: str) -> None:
    """The autoscaler's Prometheus families (none when autoscaling is off)."""
    if not state:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    decisions = CounterMetricFamily(f"{prefix}_autoscale_decisions", "Worker autoscaling decisions, by direction",
                                    labels=["direction"])
    for direction in ("up", "down"):
        decisions.add_metric([direction], state["decisions"].get(direction, 0))
    workers = GaugeMetricFamily(f"{prefix}_autoscale_workers", "Worker processes the autoscaler runs now")
    workers.add_metric([], state["workers"])
    bounds = GaugeMetricFamily(f"{prefix}_autoscale_bound", "WORKER_MIN_COUNT and WORKER_MAX_COUNT", labels=["bound"])
    bounds.add_metric(["min"], state["min"])
    bounds.add_metric(["max"], state["max"])
    utilization = GaugeMetricFamily(f"{prefix}_autoscale_utilization",
                                    "Mean worker utilization at the last sample (in flight / MAX_INFLIGHT)")
    utilization.add_metric([], state["utilization"])
    out.extend([decisions, workers, bounds, utilization])
