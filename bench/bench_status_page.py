"""The status page's history and charts: memory, sampling time and page size (no broker needed).

Run:  .venv/bin/python -m bench.bench_status_page [--shapes 5x2,20x8,100x16] [--points 180]

For each shape (routes x worker processes) a simulated supervisor view is fed through the real
`Aggregator` and `History` for a full window (`--points` samples, 180 = 15 min at 5 s), once with a
thousand messages per interval and once with a billion, and the history's memory is measured with
tracemalloc. Also: the time of one sample (Aggregator.collect + History.observe, what the
operations server does every second, off the message path) and the size and render time of the
page fragment the browser fetches every refresh. Target: the history's memory does not depend on
the message count.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.operations.charts import history_charts
from core.operations.history import History
from core.operations.metrics import LATENCY_BUCKETS, Aggregator, ProcessInfo, SystemSample


class SimulatedSupervisor:
    """A supervisor view of `workers` processes serving `routes` routes, counters advanced by `tick`."""

    def __init__(self, routes: int, workers: int) -> None:
        self.patterns = [f"site/{i}/{{device}}/data" for i in range(routes)]
        self.workers = [f"w{i}" for i in range(workers)]
        self.counts = {w: {p: [0, 0, [0] * (len(LATENCY_BUCKETS) + 1)] for p in self.patterns} for w in self.workers}

    def tick(self, per_interval: int) -> None:
        """Every route of every worker handles `per_interval` messages (1 in 100 dead-lettered)."""
        for w, routes in self.counts.items():
            for i, entry in enumerate(routes.values()):
                entry[0] += per_interval
                entry[1] += per_interval // 100
                entry[2][(i + len(w)) % len(LATENCY_BUCKETS)] += per_interval

    def sample(self) -> SystemSample:
        processes = [ProcessInfo("main", "supervisor", 1, "running", True, False)]
        for n, (w, routes) in enumerate(self.counts.items()):
            stats: dict[str, Any] = {
                "received": sum(e[0] for e in routes.values()), "dead_lettered": sum(e[1] for e in routes.values()),
                "inflight": n,
                "routes": {p: {"handled": e[0] - e[1], "failed": e[1], "dead_lettered": e[1], "seconds": 0.0}
                           for p, e in routes.items()},
                "latency": {"bounds": list(LATENCY_BUCKETS),
                            "routes": {p: {"counts": list(e[2]), "sum": 0.0} for p, e in routes.items()}},
                "backlog": {"outbox": 3.0, "stream:orders": 10.0},
            }
            processes.append(ProcessInfo(w, "worker", 1000 + n, "running", True, True, stats=stats))
        return SystemSample("workers", 1, 60.0, False, None, processes)


def measure(routes: int, workers: int, points: int, per_interval: int) -> dict[str, float]:
    source = SimulatedSupervisor(routes, workers)
    aggregator = Aggregator(source, source.patterns)
    gc.collect()
    tracemalloc.start()
    history = History(interval=5.0, window=5.0 * points)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(points + 1):
        source.tick(per_interval)
        history.observe(aggregator.collect(), now=5.0 * i, wall=1_700_000_000 + 5.0 * i)
    gc.collect()
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    sample_times = []  # timed without tracemalloc, which slows allocation down
    for i in range(points + 1, points + 21):
        source.tick(per_interval)
        started = time.perf_counter()
        history.observe(aggregator.collect(), now=5.0 * i, wall=1_700_000_000 + 5.0 * i)
        sample_times.append(time.perf_counter() - started)
    data = history.data()
    started = time.perf_counter()
    page = history_charts(data, max_inflight=100)
    render = time.perf_counter() - started
    return {"memory_kb": memory / 1024, "sample_ms": 1000 * statistics.median(sample_times),
            "render_ms": 1000 * render, "page_kb": len(page.encode()) / 1024, "points": len(data["times"])}


def aggregator_only_kb(routes: int, workers: int, points: int) -> float:
    """Memory of the same run without a History (subtracted, so the table shows the history's own)."""
    source = SimulatedSupervisor(routes, workers)
    aggregator = Aggregator(source, source.patterns)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(points + 1):
        source.tick(1000)
        aggregator.collect()
    gc.collect()
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return memory / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="5x2,20x8,100x16", help="routes x workers, comma-separated")
    parser.add_argument("--points", type=int, default=180, help="points per line (180 = 15 min at 5 s)")
    args = parser.parse_args(argv)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for shape in args.shapes.split(","):
        routes, workers = (int(x) for x in shape.lower().split("x"))
        base = aggregator_only_kb(routes, workers, args.points)
        small = measure(routes, workers, args.points, 1_000)
        big = measure(routes, workers, args.points, 1_000_000_000)
        print(f"{shape}: {small} / {big} (aggregator alone {base:.0f} KB)", file=sys.stderr, flush=True)
        rows.append(f"| {routes} | {workers} | {small['points']} | {max(0.0, small['memory_kb'] - base):,.0f} | "
                    f"{max(0.0, big['memory_kb'] - base):,.0f} | {small['sample_ms']:.2f} | {small['page_kb']:,.0f} | "
                    f"{small['render_ms']:.1f} |")
    print("| routes | workers | points per line | history KB, 1e3 msgs/interval | history KB, 1e9 msgs/interval | "
          "one sample, ms | charts HTML, KB | render, ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nA sample = Aggregator.collect + History.observe (once a second, off the message path). "
          f"Load average at start {load}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
