"""The autoscaler's decisions (core/processes/autoscale.py), fed with samples: no processes, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from core.processes.autoscale import Autoscaler, LoadMeter, ScalePolicy, WorkerLoad, add_metric_families
from core.foundation.config import ConfigError, load_settings
from core.operations.metrics import Aggregator, ProcessInfo, SystemSample, fold_final
from core.runtime.stats import ProcessStats
from core.worker_manager import WorkerPlan, autoscale_plan

POLICY = ScalePolicy(min_count=1, max_count=4, up_at=0.8, down_at=0.3, up_window=2.0, down_window=5.0, cooldown=3.0)
MAX_INFLIGHT = 10


def loads(*inflight: float, busy: float = 0.0, backlog: float | None = None) -> dict[str, WorkerLoad]:
    return {f"w{i}": WorkerLoad(value, busy, backlog) for i, value in enumerate(inflight)}


def run(scaler: Autoscaler, start: float, stop: float, count: int, sample: dict[str, WorkerLoad],
        settled: bool = True, step: float = 0.5) -> list[tuple[float, int, int]]:
    """Feed the same sample every `step` seconds from `start` to `stop`; the decisions as (time, before, after)."""
    out = []
    now = start
    while now <= stop + 1e-9:
        decision = scaler.observe(now, sample, count, settled)
        if decision is not None:
            out.append((now, decision.before, decision.after))
            count = decision.after
        now += step
    return out


def test_grows_once_saturation_has_held_for_the_up_window_and_not_before() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    assert run(scaler, 0.0, 1.5, 1, loads(10)) == []  # saturated, but for less than WORKER_SCALE_UP_WINDOW
    assert run(scaler, 2.0, 2.0, 1, loads(10)) == [(2.0, 1, 2)]
    assert scaler.counts == {"up": 1, "down": 0}
    assert "WORKER_SCALE_UP_AT=0.8" in scaler.recent[-1].reason


def test_growth_is_proportional_and_bounded_by_the_maximum() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    # 3 workers at full load: ceil(3 * 1.0 / 0.8) = 4 (not 3 + 1 by luck: also bounded by max 4)
    assert run(scaler, 0.0, 2.0, 3, loads(10, 10, 10)) == [(2.0, 3, 4)]
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    assert run(scaler, 0.0, 10.0, 4, loads(10, 10, 10, 10)) == []  # at the maximum already


def test_busy_time_counts_when_in_flight_samples_miss_short_handlers() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    # In-flight samples near 0 but 9 handler-seconds per second over 10 slots: saturated.
    assert run(scaler, 0.0, 2.0, 1, loads(0.5, busy=9.0)) == [(2.0, 1, 2)]


def test_cooldown_after_a_decision_and_a_fresh_window_once_settled() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    assert run(scaler, 0.0, 2.0, 1, loads(10)) == [(2.0, 1, 2)]
    # The new worker is starting: not settled, nothing counts.
    assert run(scaler, 2.5, 4.0, 2, loads(10), settled=False) == []
    # Settled from 4.5 on: the window needs 2 s of samples (6.5), and the cooldown ends at 5.0.
    assert run(scaler, 4.5, 8.0, 2, loads(10, 10))[0] == (6.5, 2, 3)


def test_nothing_happens_between_the_thresholds() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    assert run(scaler, 0.0, 60.0, 2, loads(5, 5)) == []


def test_shrinks_one_at_a_time_after_the_down_window_down_to_the_minimum() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    decisions = run(scaler, 0.0, 40.0, 3, loads(0, 0, 0))
    # First after 5 s; then cooldown 3 s and a new 5 s window after each decision.
    assert decisions == [(5.0, 3, 2), (10.5, 2, 1)]
    assert scaler.counts == {"up": 0, "down": 2}


def test_does_not_shrink_when_the_others_would_then_be_over_the_up_threshold() -> None:
    policy = ScalePolicy(1, 4, up_at=0.8, down_at=0.45, up_window=2, down_window=5, cooldown=0)
    scaler = Autoscaler(policy, MAX_INFLIGHT, now=-10)
    # 2 workers at 0.44 would be 1 worker at 0.88: it would grow right back.
    assert run(scaler, 0.0, 30.0, 2, loads(4.4, 4.4)) == []
    assert run(scaler, 31.0, 40.0, 2, loads(3.0, 3.0))[0][1:] == (2, 1)


def test_a_growing_stream_backlog_grows_the_pool_and_keeps_it_from_shrinking() -> None:
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=-10)
    decision = None
    for step, backlog in enumerate([100, 150, 200, 260, 300]):
        decision = scaler.observe(step * 0.5, {"w0": WorkerLoad(1, 0, backlog)}, 1, True) or decision
    assert decision is not None and (decision.before, decision.after) == (1, 2)
    assert "backlog grew from 100 to 300" in decision.reason
    slow_to_grow = ScalePolicy(1, 4, up_at=0.8, down_at=0.3, up_window=100, down_window=5, cooldown=0)
    scaler = Autoscaler(slow_to_grow, MAX_INFLIGHT, now=-10)
    growing = [scaler.observe(step * 0.5, {"w0": WorkerLoad(0, 0, 10 + step), "w1": WorkerLoad(0, 0, None)}, 2, True)
               for step in range(40)]
    assert growing == [None] * 40  # idle workers, but the backlog keeps growing: no shrink
    flat = [scaler.observe(20 + step * 0.5, {"w0": WorkerLoad(0, 0, 50), "w1": WorkerLoad(0, 0, None)}, 2, True)
            for step in range(12)]
    assert [(d.before, d.after) for d in flat if d is not None] == [(2, 1)]


def test_worker_load_from_heartbeat_stats() -> None:
    stats: dict[str, Any] = {"inflight": 3, "load": {"inflight": 7.5, "busy": 2.0},
                             "backlog": {"stream:orders": 40, "stream:orders:pending": 5, "stream:orders:dlq": 1,
                                         "outbox": 9}}
    assert WorkerLoad.from_stats(stats) == WorkerLoad(7.5, 2.0, 40.0)
    assert WorkerLoad.from_stats({"inflight": 2}) == WorkerLoad(2.0, 0.0, None)


def test_load_meter_averages_between_reads() -> None:
    meter = LoadMeter()
    for value in (0, 10, 20):
        meter.tick(value)
    first = meter.read(meter._at + 2.0, {"a": {"seconds": 3.0}, "b": {"seconds": 1.0}})
    assert first == {"inflight": 10.0, "busy": 2.0}
    meter.tick(4)
    assert meter.read(meter._at + 1.0, {"a": {"seconds": 4.0}, "b": {"seconds": 1.0}}) == {"inflight": 4.0, "busy": 1.0}


def test_settings_bounds_and_thresholds_are_checked_naming_the_variable() -> None:
    settings = load_settings({"WORKER_AUTO_SCALE": "true", "WORKER_MIN_COUNT": "2", "WORKER_MAX_COUNT": "5"})
    assert settings.worker_auto_scale and (settings.worker_min_count, settings.worker_max_count) == (2, 5)
    assert ScalePolicy.from_settings(settings, cpus=8).max_count == 5
    assert ScalePolicy.from_settings(load_settings({"WORKER_MIN_COUNT": "3"}), cpus=2).max_count == 3
    with pytest.raises(ConfigError, match="WORKER_MAX_COUNT=1 must not be below WORKER_MIN_COUNT=2"):
        load_settings({"WORKER_MIN_COUNT": "2", "WORKER_MAX_COUNT": "1"})
    with pytest.raises(ConfigError, match="WORKER_SCALE_DOWN_AT=0.8 must be below WORKER_SCALE_UP_AT=0.5"):
        load_settings({"WORKER_SCALE_UP_AT": "0.5", "WORKER_SCALE_DOWN_AT": "0.8"})
    with pytest.raises(ConfigError, match="WORKER_SCALE_UP_AT"):
        load_settings({"WORKER_SCALE_UP_AT": "1.5"})
    with pytest.raises(ConfigError, match="WORKER_MIN_COUNT"):
        load_settings({"WORKER_MIN_COUNT": "0"})


def test_autoscale_plan_starts_within_the_bounds_with_every_worker_on_every_route() -> None:
    plan = autoscale_plan(WorkerPlan(8, False, "the largest worker_count"), POLICY)
    assert (plan.count, plan.all_routes) == (4, True)
    assert "WORKER_MIN_COUNT=1 and WORKER_MAX_COUNT=4, starting at 4" in plan.reason


def test_metric_families_only_with_autoscaling() -> None:
    out: list[Any] = []
    add_metric_families(out, None, "app")
    assert out == []
    scaler = Autoscaler(POLICY, MAX_INFLIGHT, now=0)
    add_metric_families(out, scaler.snapshot(2), "app")
    assert [family.name for family in out] == ["app_autoscale_decisions", "app_autoscale_workers",
                                               "app_autoscale_bound", "app_autoscale_utilization"]


class _Source:
    def __init__(self) -> None:
        self.processes: list[ProcessInfo] = []
        self.departed: dict[str, Any] = {}

    def sample(self) -> SystemSample:
        return SystemSample("workers", 1, 1.0, False, None, list(self.processes), departed=self.departed)


def _stats(handled: int) -> dict[str, Any]:
    return {"received": handled, "handled": handled, "routes": {"a/b": {"handled": handled, "seconds": 0.0}}}


def _worker(worker_id: str, pid: int, handled: int) -> ProcessInfo:
    return ProcessInfo(worker_id, "worker", pid, "running", True, True, stats=_stats(handled))


def test_totals_keep_what_a_retired_worker_counted() -> None:
    source = _Source()
    aggregator = Aggregator(source)
    source.processes = [_worker("w0", 10, 5), _worker("w1", 11, 7)]
    assert aggregator.collect().totals["handled"] == 12
    source.processes = [_worker("w0", 10, 5), _worker("w1", 12, 2)]  # w1 restarted once (7 kept)
    assert aggregator.collect().totals["handled"] == 14
    # w1 retired: the supervisor reports its final numbers (9, not the 2 last sampled).
    fold_final(source.departed, _stats(9))
    source.processes = [_worker("w0", 10, 6)]
    view = aggregator.collect()
    assert view.totals["handled"] == 6 + 7 + 9
    assert [r.handled for r in view.routes if r.pattern == "a/b"] == [22]
    source.processes = [_worker("w0", 10, 6), _worker("w1", 13, 1)]  # w1 again, a new process
    assert aggregator.collect().totals["handled"] == 23


def test_a_drain_is_absorbed_without_its_marker() -> None:
    mine, drain = ProcessStats(received=3, handled=3), ProcessStats(received=5, handled=5)
    mine.route("a/b").handled = 3
    drain.route("a/b").handled = 4
    drain.route("w2/parked-drain/x").handled = 1
    mine.absorb(drain, skip="w2/parked-drain/x")
    assert (mine.received, mine.handled, set(mine.routes), mine.routes["a/b"].handled) == (7, 7, {"a/b"}, 7)
