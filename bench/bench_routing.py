"""Route matching: cost per lookup with 10, 1,000 and 10,000 routes.

Run:  .venv/bin/python -m bench.bench_routing [--sizes 10,1000,10000] [--repeat 7]

One lookup is what the dispatcher does when a message carries no subscription identifier:
``RouteTable.match(topic)`` (the topic trie) followed by ``CompiledPattern.extract`` for each
route found. Routes are generated from realistic templates (literal prefixes, ``{params}``, some
``+``/``#`` wildcards and ``{tail:#}`` parameters); the topics looked up hit routes spread over the
whole table, and one in ten matches nothing. The time is the best of ``--repeat`` timeit runs,
divided by the number of topics. Building the table (``Router.on`` for every route, then
``RouteTable``) is timed too. A linear scan over every route's ``extract`` is shown for contrast.
Target: 10,000 routes within 2x of 10 routes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.router import Route, Router, RouteTable


async def _handler(payload: object, **params: str) -> None:
    """Routes need a handler; the benchmark never calls it."""


# (pattern template, topic template). `{i}` makes each route distinct; the other fields are
# filled with sample values to make a topic that the route matches.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("tenants/t{i}/devices/{{device_id}}/status", "tenants/t{i}/devices/dev-{n}/status"),
    ("tenants/t{i}/devices/{{device_id}}/telemetry/{{metric}}", "tenants/t{i}/devices/dev-{n}/telemetry/temp"),
    ("factory/site{i}/line/{{line}}/machine/{{machine_id}}/events", "factory/site{i}/line/3/machine/m{n}/events"),
    ("fleet/v{i}/+/gps", "fleet/v{i}/truck{n}/gps"),
    ("buildings/b{i}/floors/{{floor}}/rooms/{{room}}/sensors/{{sensor}}/data", "buildings/b{i}/floors/2/rooms/r{n}/sensors/co2/data"),
    ("logs/svc{i}/{{path:#}}", "logs/svc{i}/api/v1/requests/{n}"),
    ("alerts/a{i}/#", "alerts/a{i}/critical/disk"),
    ("commands/c{i}/{{device_id}}/set/{{setting}}", "commands/c{i}/dev-{n}/set/brightness"),
)


def make_routes(n: int) -> tuple[Router, list[str]]:
    """A router with `n` distinct routes, and one topic that each of them matches."""
    router = Router()
    topics: list[str] = []
    for k in range(n):
        pattern, topic = TEMPLATES[k % len(TEMPLATES)]
        i = k // len(TEMPLATES)
        router.on(pattern.format(i=i), _handler, qos=1)
        topics.append(topic.format(i=i, n=k))
    return router, topics


def sample_topics(route_topics: Sequence[str], count: int, seed: int = 7) -> list[str]:
    """`count` topics: 90% hit routes spread over the table, 10% match nothing."""
    rng = random.Random(seed)
    out = []
    for j in range(count):
        if j % 10 == 9:
            out.append(f"unrouted/area{rng.randrange(1000)}/thing/{j}")
        else:
            out.append(rng.choice(route_topics))
    return out


def lookup_all(table: RouteTable, topics: Sequence[str]) -> int:
    """What the dispatcher does per message: trie match, then extract each found route's params."""
    found = 0
    match = table.match
    for topic in topics:
        levels = topic.split("/")
        for route in match(topic):
            if route.compiled.extract(levels) is not None:
                found += 1
    return found


def linear_all(routes: Sequence[Route], topics: Sequence[str]) -> int:
    """The naive alternative: try every route's matcher."""
    found = 0
    for topic in topics:
        levels = topic.split("/")
        for route in routes:
            if route.compiled.extract(levels) is not None:
                found += 1
    return found


def interleaved_best(fns: Sequence[Callable[[], object]], calls: Sequence[int], repeat: int,
                     budget: float = 0.05) -> list[float]:
    """Best seconds per call of each function, timed in turns (a, b, c, a, b, c, ...).

    Taking turns gives every function the same chances of a quiet moment on a shared machine;
    each turn is sized to take about `budget` seconds.
    """
    timers = [timeit.Timer(fn) for fn in fns]
    numbers = []
    for timer in timers:
        number, elapsed = timer.autorange()
        numbers.append(max(1, int(number * budget / max(elapsed, 1e-9))))
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, timer in enumerate(timers):
            best[k] = min(best[k], timer.timeit(numbers[k]) / numbers[k] / calls[k])
    return best


@dataclass
class Result:
    routes: int
    build_ms: float
    lookup_us: float
    linear_us: float | None
    matches_per_lookup: float


def measure(sizes: Sequence[int], topics_count: int, repeat: int, linear_limit: int) -> list[Result]:
    """One run over every size: build the tables, then time all lookups in turns."""
    tables, topic_sets, builds, found = [], [], [], []
    for n in sizes:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            router, route_topics = make_routes(n)
            table = RouteTable(router.routes)
            times.append(time.perf_counter() - start)
        topics = sample_topics(route_topics, topics_count)
        tables.append(table)
        topic_sets.append(topics)
        builds.append(min(times))
        found.append(lookup_all(table, topics) / len(topics))
    fns: list[Callable[[], object]] = [
        partial(lookup_all, table, topics) for table, topics in zip(tables, topic_sets)
    ]
    lookups = interleaved_best(fns, [len(ts) for ts in topic_sets], repeat)
    linear_idx = [k for k, n in enumerate(sizes) if n <= linear_limit]
    # The linear scan of a big table is slow: a tenth of the topics is enough there.
    few = [topic_sets[k] if sizes[k] <= 1000 else topic_sets[k][: max(10, topics_count // 10)] for k in linear_idx]
    linear = interleaved_best(
        [partial(linear_all, tables[k].routes, ts) for k, ts in zip(linear_idx, few)],
        [len(ts) for ts in few], max(3, repeat // 3),
    )
    linear_by_k = dict(zip(linear_idx, linear))
    return [
        Result(n, builds[k] * 1000, lookups[k] * 1e6,
               linear_by_k[k] * 1e6 if k in linear_by_k else None, found[k])
        for k, n in enumerate(sizes)
    ]


def format_table(results: list[Result]) -> str:
    base = results[0].lookup_us
    lines = [
        "| routes | build table ms | lookup µs (trie + extract) | vs smallest | linear scan µs | matches/lookup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        linear = f"{r.linear_us:,.1f}" if r.linear_us is not None else "—"
        lines.append(
            f"| {r.routes:,} | {r.build_ms:,.1f} | {r.lookup_us:.2f} | {r.lookup_us / base:.2f}× | {linear} | {r.matches_per_lookup:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="route counts, comma-separated")
    parser.add_argument("--topics", type=int, default=1000, help="topics looked up per timing run")
    parser.add_argument("--repeat", type=int, default=21, help="timed turns per size; the best one counts")
    parser.add_argument("--runs", type=int, default=3, help="whole measurements; the table shows medians")
    parser.add_argument("--linear-limit", type=int, default=10_000, help="largest table to time the linear scan on")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())  # 1/5/15 min: how shared the machine was
    runs: list[list[Result]] = []
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
        runs.append(measure(sizes, args.topics, args.repeat, args.linear_limit))

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    medians = []
    for k, n in enumerate(sizes):
        rs = [run[k] for run in runs]
        medians.append(Result(
            n, med([r.build_ms for r in rs]) or 0.0, med([r.lookup_us for r in rs]) or 0.0,
            med([r.linear_us for r in rs]), rs[0].matches_per_lookup,
        ))
    print(
        f"Route matching, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median of {args.runs} runs, "
        f"each the best of {args.repeat} turns over {args.topics:,} topics (10% unrouted). "
        f"Build = Router.on for every route + RouteTable. Load average at start {load}.\n"
    )
    print(format_table(medians))
    ratios = [run[-1].lookup_us / run[0].lookup_us for run in runs]
    print(
        f"\n{medians[-1].routes:,} routes vs {medians[0].routes:,}: {statistics.median(ratios):.2f}× per lookup "
        f"(median of the runs' ratios {', '.join(f'{r:.2f}' for r in ratios)}; target ≤ 2×)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
