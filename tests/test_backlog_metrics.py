"""Outbox and stream numbers in core.operations.metrics without servers: the Backlog extension and the export."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.operations.metrics import Aggregator, ProcessInfo, SystemSample, backlog_of, render_metrics, start_backlog
from core.runtime.stats import ProcessStats


class Source:
    def __init__(self) -> None:
        self.processes: list[ProcessInfo] = []

    def sample(self) -> SystemSample:
        return SystemSample("workers", os.getpid(), 1.0, False, None, self.processes)


def _scrape(aggregator: Aggregator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = render_metrics(aggregator)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _worker(worker: str, pid: int, handled: int, published: int, backlog: dict[str, float]) -> ProcessInfo:
    stats: dict[str, Any] = {
        "received": 0, "routes": {},
        "streams": {"orders": {"handled": handled, "failed": 1, "retried": 1, "dead_lettered": 0, "reclaimed": 0}},
        "outbox": {"claimed": published, "published": published, "failed": 0, "abandoned": 0, "taken_over": 0,
                   "held": 0, "cleaned": 0},
        "backlog": backlog,
    }
    return ProcessInfo(worker, "worker", pid, "running", True, True, stats=stats)


def test_counters_are_summed_over_processes_and_kept_across_restarts_backlogs_are_the_largest_report() -> None:
    source = Source()
    aggregator = Aggregator(source)
    source.processes = [_worker("w0", 100, 10, 3, {"outbox": 7, "stream:orders": 2}),
                        _worker("w1", 101, 5, 4, {"outbox": 6, "stream:orders": 4})]
    m = _scrape(aggregator)
    assert m[("mqtt_app_stream_handled_total", (("stream", "orders"),))] == 15
    assert m[("mqtt_app_stream_failed_total", (("stream", "orders"),))] == 2
    assert m[("mqtt_app_outbox_published_total", ())] == 7
    assert m[("mqtt_app_backlog", (("source", "outbox"),))] == 7
    assert m[("mqtt_app_backlog", (("source", "stream:orders"),))] == 4
    # w0 restarted (new pid, counting from zero): what the old process counted is kept
    source.processes[0] = _worker("w0", 200, 1, 1, {"outbox": 1})
    m = _scrape(aggregator)
    assert m[("mqtt_app_stream_handled_total", (("stream", "orders"),))] == 16
    assert m[("mqtt_app_outbox_published_total", ())] == 8
    assert m[("mqtt_app_backlog", (("source", "outbox"),))] == 6


async def test_backlog_task_publishes_measurements_of_several_owners_and_drops_failed_ones() -> None:
    stats = ProcessStats()
    fail = {"now": False}

    async def outbox() -> dict[str, float]:
        if fail["now"]:
            raise ConnectionError("database away")
        return {"outbox": 3.0}

    async def streams() -> dict[str, float]:
        return {"stream:orders": 5.0}

    tasks = [start_backlog(stats, "outbox", outbox, interval=0.01), start_backlog(stats, "streams", streams, 0.01)]
    try:
        while stats.snapshot()["backlog"] != {"outbox": 3.0, "stream:orders": 5.0}:
            await asyncio.sleep(0.01)
        assert backlog_of(stats) is stats.extensions["backlog"]  # one Backlog per process, shared by owners
        fail["now"] = True
        while "outbox" in stats.snapshot()["backlog"]:
            await asyncio.sleep(0.01)
        assert stats.snapshot()["backlog"] == {"stream:orders": 5.0}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert stats.snapshot()["backlog"] == {}


@pytest.mark.parametrize("key", ["rate_limit_redis_errors", "mqtt_publishes_abandoned", "mqtt_sessions_lost"])
def test_process_counters_are_counted_per_process_and_kept_across_restarts(key: str) -> None:
    source = Source()
    aggregator = Aggregator(source)

    def worker(pid: int, count: int) -> ProcessInfo:
        return ProcessInfo("w0", "worker", pid, "running", True, True, stats={"received": 0, "routes": {}, key: count})

    source.processes = [worker(100, 4)]
    assert _scrape(aggregator)[(f"mqtt_app_{key}_total", (("worker", "w0"),))] == 4
    source.processes = [worker(200, 1)]  # restarted: counting from zero again
    assert _scrape(aggregator)[(f"mqtt_app_{key}_total", (("worker", "w0"),))] == 5


def test_rate_limit_redis_errors_are_read_once_per_limiter() -> None:
    from types import SimpleNamespace

    from core.operations.metrics import rate_limit_redis_errors

    class RateLimit:  # stands in for core.integrations.rate_limit.RateLimit: only `counters()` is read
        def __init__(self, errors: int) -> None:
            self.errors = errors

        def counters(self) -> dict[str, Any]:
            return {"action": "dead_letter", "limited": {}, "redis_errors": self.errors}

    shared, own = RateLimit(3), RateLimit(2)
    routes = [SimpleNamespace(middleware=[shared]), SimpleNamespace(middleware=[shared, own])]
    runtime: Any = SimpleNamespace(table=SimpleNamespace(routes=routes))
    assert rate_limit_redis_errors(runtime) == 5  # the group's limiter counted once, not per route

