"""The charts' history (core/operations/history.py) and the SVG charts (core/operations/charts.py), without a broker."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest

from core.operations.charts import Line, history_charts, line_chart, nice_ceiling
from core.operations.history import History, quantile_ms
from core.operations.metrics import Aggregator, ProcessInfo, SystemSample

BOUNDS = (0.001, 0.01, 0.1)
ROUTE = "dev/{id}/data"


class FakeSource:
    """Worker processes whose counters the test sets, as their heartbeats would report them."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.backlog: dict[str, float] = {}

    def count(self, worker: str, *, ok: int = 0, dead: int = 0, bucket: int = 1, inflight: int = 0) -> None:
        w = self.workers.setdefault(worker, {"pid": 100 + len(self.workers), "handled": 0, "dead": 0,
                                             "counts": [0] * (len(BOUNDS) + 1), "inflight": 0})
        w["handled"] += ok
        w["dead"] += dead
        w["counts"][bucket] += ok + dead
        w["inflight"] = inflight

    def sample(self) -> SystemSample:
        processes = [ProcessInfo("main", "supervisor", 1, "running", True, False)]
        for name, w in self.workers.items():
            stats = {
                "received": w["handled"] + w["dead"], "handled": w["handled"], "dead_lettered": w["dead"],
                "inflight": w["inflight"],
                "routes": {ROUTE: {"handled": w["handled"], "failed": w["dead"], "dead_lettered": w["dead"],
                                   "seconds": 0.0}},
                "latency": {"bounds": list(BOUNDS), "routes": {ROUTE: {"counts": list(w["counts"]), "sum": 0.0}}},
                "backlog": dict(self.backlog),
            }
            processes.append(ProcessInfo(name, "worker", w["pid"], "running", True, True, stats=stats))
        return SystemSample("workers", 1, 10.0, False, None, processes)


def recorder() -> tuple[FakeSource, History, Callable[..., bool]]:
    """A fake supervisor, a History of 5 s points over 60 s, and `observe(now, wall=None)` feeding it."""
    source = FakeSource()
    aggregator = Aggregator(source, [ROUTE])
    history = History(interval=5, window=60)

    def observe(now: float, wall: float | None = None) -> bool:
        return history.observe(aggregator.collect(), now=now, wall=wall)

    return source, history, observe


def test_quantiles_interpolate_within_the_bucket() -> None:
    assert quantile_ms(0.5, BOUNDS, [0, 10, 0, 0]) == pytest.approx(5.5)  # half way through (1 ms, 10 ms]
    assert quantile_ms(0.99, BOUNDS, [0, 10, 0, 0]) == pytest.approx(9.91)
    assert quantile_ms(0.5, BOUNDS, [10, 0, 0, 0]) == pytest.approx(0.5)
    assert quantile_ms(0.99, BOUNDS, [99, 0, 0, 1]) == pytest.approx(1.0)
    assert quantile_ms(0.99, BOUNDS, [0, 0, 0, 5]) == pytest.approx(100.0)  # +Inf: the largest bound
    assert quantile_ms(0.5, BOUNDS, [0, 0, 0, 0]) is None


def test_points_are_rates_errors_latency_inflight_and_backlog_per_interval() -> None:
    source, history, observe = recorder()
    source.count("w0", ok=0)
    source.count("w1", ok=0)
    assert not observe(0.0, 1000.0)  # the baseline
    assert history.data()["times"] == []

    source.count("w0", ok=40, dead=10, bucket=1, inflight=7)  # 50 messages in 5 s, 10 of them dead-lettered
    source.count("w1", ok=25, bucket=0, inflight=9)
    source.backlog = {"outbox": 12.0}
    assert not observe(2.0)  # too early: no point, but w1's 9 in flight is the interval's peak
    source.count("w1", inflight=2)
    assert observe(5.0, 1005.0)
    data = history.data()
    assert data["times"] == [1005.0]
    w0, w1, route = data["processes"]["w0"], data["processes"]["w1"], data["routes"][ROUTE]
    assert (w0["rate"], w0["errors"], w0["inflight"]) == ([10.0], [2.0], [7.0])
    assert (w1["rate"], w1["errors"], w1["inflight"]) == ([5.0], [0.0], [9.0])
    assert w0["p50"] == [pytest.approx(5.5)] and w1["p99"] == [pytest.approx(0.99)]
    assert route["rate"] == [15.0] and route["errors"] == [2.0]
    assert data["backlog"] == {"outbox": {"value": [12.0]}}
    assert "main" not in data["processes"]  # the supervisor has no routes of its own here

    # A quiet interval: 0 messages/s, and no latency (a gap, not 0 ms); the peak starts afresh.
    observe(10.0, 1010.0)
    data = history.data()
    assert data["processes"]["w0"]["rate"] == [10.0, 0.0] and data["processes"]["w0"]["p50"][1] is None
    assert data["processes"]["w1"]["inflight"] == [9.0, 2.0]


def test_memory_is_bounded_by_the_window_not_the_message_count() -> None:
    source, history, observe = recorder()
    for i in range(40):
        source.count("w0", ok=1_000_000 if i % 2 else 3)
        observe(5.0 * i)
    data = history.data()
    assert history.capacity == 12 and len(data["times"]) == 12
    assert all(len(points) == 12 for points in data["processes"]["w0"].values())
    assert all(len(points) == 12 for points in data["routes"][ROUTE].values())


def test_a_worker_that_goes_and_comes_back_leaves_a_gap_and_no_spike() -> None:
    source, history, observe = recorder()
    source.count("w0", ok=100)
    source.count("w1", ok=100)
    observe(0.0)
    source.count("w1", ok=50)
    observe(5.0)
    gone = source.workers.pop("w1")  # scaled down
    observe(10.0)
    source.workers["w1"] = gone  # the slot is back with what it had counted
    source.count("w1", ok=5)
    observe(15.0)
    assert history.data()["processes"]["w1"]["rate"] == [10.0, None, 1.0]
    # A line with nothing left in the window goes away.
    source.workers.pop("w1")
    for i in range(4, 20):
        observe(5.0 * i)
    assert "w1" not in history.data()["processes"] and "w0" in history.data()["processes"]


def test_a_new_line_is_aligned_with_the_older_points() -> None:
    source, history, observe = recorder()
    source.count("w0", ok=5)
    observe(0.0)
    observe(5.0)
    source.count("w2", ok=10)  # scaled up
    observe(10.0)
    processes = history.data()["processes"]
    assert processes["w2"]["rate"] == [None, 2.0] and len(processes["w0"]["rate"]) == 2


def test_history_rejects_a_window_shorter_than_its_interval() -> None:
    with pytest.raises(ValueError, match="interval <= window"):
        History(interval=10, window=5)


def paths(svg: str) -> dict[str, tuple[int, str]]:
    return {m.group(1): (int(m.group(2)), m.group(3))
            for m in re.finditer(r'<path class="line" data-series="([^"]*)" data-points="(\d+)" d="([^"]*)"', svg)}


def test_a_chart_draws_each_line_breaks_it_at_gaps_and_shows_the_limit() -> None:
    svg = line_chart("c", "in flight", "", [100.0, 105.0, 110.0, 115.0], 60.0,
                     [Line("w<0>", [1.0, None, 3.0, 4.0], 0), Line("w1", [None, None, None, None], 1)],
                     limit=100, limit_label="MAX_INFLIGHT")
    drawn = paths(svg)
    count, d = drawn["w&lt;0&gt;"]
    assert count == 3 and d.count("M") == 2 and d.count("L") == 1  # a new stroke after the gap
    assert drawn["w1"] == (0, "")
    assert 'class="limit"' in svg and "MAX_INFLIGHT <b>100</b>" in svg
    xs = [float(x) for x in re.findall(r"[ML]([\d.]+) ", d)]
    assert xs == sorted(xs) and xs[-1] == pytest.approx(452.0)  # the newest point at the right edge
    assert "no data yet" in line_chart("e", "empty", "", [], 60.0, [])


def test_axis_maximum_is_a_round_number() -> None:
    assert [nice_ceiling(v) for v in (0, 0.3, 1, 1.2, 3, 7, 12, 2400)] == [1, 0.5, 1, 2, 5, 10, 20, 2500]


def test_history_charts_cover_routes_processes_inflight_and_backlog() -> None:
    source, history, observe = recorder()
    source.count("w0")
    observe(0.0)
    source.count("w0", ok=20, inflight=3)
    source.backlog = {"stream:orders": 4}
    observe(5.0)
    html = history_charts(history.data(), max_inflight=100)
    ids = re.findall(r'<figure class="chart" id="([^"]+)"', html)
    assert ids == ["chart-route-rate", "chart-route-errors", "chart-route-latency", "chart-process-rate",
                   "chart-process-errors", "chart-process-latency", "chart-inflight", "chart-backlog"]
    route_rate = html[html.index('id="chart-route-rate"'):html.index('id="chart-route-errors"')]
    assert paths(route_rate)[ROUTE][0] == 1
    latency = html[html.index('id="chart-process-latency"'):html.index('id="chart-inflight"')]
    assert set(paths(latency)) == {"w0 p99", "w0 p50"}


def test_a_chart_draws_the_busiest_lines_only_and_says_so() -> None:
    def line(rate: float) -> dict[str, list[Any]]:
        return {"rate": [rate], "errors": [0.0], "p50": [None if rate == 0 else 1.0], "p99": [None if rate == 0 else 2.0],
                "inflight": [0.0]}

    history = {"interval": 5, "window": 60, "times": [1.0], "backlog": {},
               "routes": {f"r{i:02}": line(float(i)) for i in range(12)}, "processes": {"w0": line(0.0)}}
    html = history_charts(history, 100)
    assert "By route <span class=\"meta\">the 10 busiest of 12</span>" in html
    route_rate = html[html.index('id="chart-route-rate"'):html.index('id="chart-route-errors"')]
    assert sorted(paths(route_rate)) == [f"r{i:02}" for i in range(2, 12)]  # r00 and r01 handled least
    process_latency = html[html.index('id="chart-process-latency"'):html.index('id="chart-inflight"')]
    assert paths(process_latency) == {} and "no data yet" in process_latency  # w0 handled nothing
    assert "By process</h3>" in html
