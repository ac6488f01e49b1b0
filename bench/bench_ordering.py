"""Cost of an ordered route (`ordered=True`) against the same route unordered, same run.

Run:  .venv/bin/python -m bench.bench_ordering [--count 20000] [--topics 20] [--repeat 5]

On a private Mosquitto: a persistent session is registered for one QoS 1 route
`bench/<tag>/devices/{device_id}/status`, the runtime stops, ``--count`` QoS 1 messages spread over
``--topics`` topics (interleaved: d0, d1, ..., d19, d0, ...) are queued for it, then the runtime comes
back and drains them; msgs/s from its start to the last message handled. Two handlers:

- trivial: `async def handle(device_id, payload)` that records the message (the sequencing overhead);
- awaits 1 ms: the same after `await asyncio.sleep(0.001)` (what per-topic serialisation costs when
  handlers wait: at most one handler per topic runs, so at most ``--topics`` at once, not MAX_INFLIGHT).

Ordered and unordered take turns within each run (the order alternates between runs); the table
shows medians of ``--repeat`` runs and the ratio ordered/unordered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from typing import Any, Awaitable, Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.raw_clients import publish_backlog  # noqa: E402
from core.foundation.config import load_settings  # noqa: E402
from core.router import Router  # noqa: E402
from core.runtime.runtime import Runtime  # noqa: E402
from tests.support.servers import MosquittoServer  # noqa: E402



def queue_backlog(broker: MosquittoServer, prefix: str, count: int, topics: int) -> None:
    """Publish `count` QoS 1 messages over `topics` topics, interleaved; return once all are acknowledged."""
    publish_backlog(broker, lambda seq: f"{prefix}/devices/d{seq % topics}/status", count)


Handler = Callable[[Callable[[], None]], Callable[..., Awaitable[None]]]  # given `done()`, the route's handler


def trivial_handler(done: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(device_id: str, payload: object) -> None:
        done()

    return handle


def waiting_handler(done: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(device_id: str, payload: object) -> None:
        await asyncio.sleep(0.001)
        done()

    return handle


HANDLERS: dict[str, Handler] = {"trivial": trivial_handler, "awaits 1 ms": waiting_handler}


async def _serve(broker: MosquittoServer, client_id: str, prefix: str, handler: Handler, count: int | None,
                 route_options: dict[str, Any], env: dict[str, str]) -> float:
    """Register (count None) or drain `count` messages; the drain's msgs/s."""
    settings = load_settings({
        "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": client_id,
        "MQTT_SESSION_EXPIRY": "300", "MAX_INFLIGHT": "100", "LOG_LEVEL": "warning", **env,
    })
    handled = 0
    finished = asyncio.Event()

    def done() -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            finished.set()

    router = Router()
    router.on(f"{prefix}/devices/{{device_id}}/status", handler(done), qos=1, **route_options)
    runtime = Runtime(settings, router.routes, client_id=client_id)
    started = time.perf_counter()
    await runtime.start()
    try:
        if not await runtime.wait_ready(60):
            raise RuntimeError(f"{client_id}: not subscribed")
        if count is None:
            return 0.0
        await asyncio.wait_for(finished.wait(), 300)
        return count / (time.perf_counter() - started)
    finally:
        await runtime.stop()


def drain_rate(broker: MosquittoServer, handler: Handler, count: int, topics: int, *,
               route_options: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> float:
    """msgs/s of a runtime draining `count` queued QoS 1 messages over `topics` topics."""
    tag = uuid.uuid4().hex[:8]
    client_id, prefix = f"bench-{tag}", f"bench/{tag}"
    options, settings = route_options or {}, env or {}
    asyncio.run(_serve(broker, client_id, prefix, handler, None, options, settings))
    queue_backlog(broker, prefix, count, topics)
    return asyncio.run(_serve(broker, client_id, prefix, handler, count, options, settings))


def drain_arguments(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """--count, --topics, --repeat of a drain benchmark."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per measurement (default 20,000)")
    parser.add_argument("--topics", type=int, default=20, help="distinct topics (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; medians are shown (default 5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = drain_arguments(__doc__, argv)
    load = os.getloadavg()[0]
    broker = MosquittoServer(max_inflight=100, max_queued=0)
    broker.start()
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        for run in range(args.repeat):
            line = []
            for kind in HANDLERS:
                modes = (False, True) if run % 2 == 0 else (True, False)
                for ordered in modes:
                    rate = drain_rate(broker, HANDLERS[kind], args.count, args.topics,
                                      route_options={"ordered": ordered})
                    results.setdefault((kind, ordered), []).append(rate)
                    line.append(f"{kind} {'ordered' if ordered else 'unordered'} {rate:,.0f}/s")
            print(f"run {run + 1}: " + ", ".join(line), file=sys.stderr)
    finally:
        broker.cleanup()
    print(f"\nOrdered vs unordered route, {args.count:,} QoS 1 messages over {args.topics} topics, MAX_INFLIGHT=100, "
          f"median of {args.repeat} (load average {load:.2f})\n")
    print("| handler | unordered msgs/s | ordered msgs/s | ordered / unordered |")
    print("|---|---|---|---|")
    for kind in HANDLERS:
        plain = statistics.median(results[(kind, False)])
        ordered = statistics.median(results[(kind, True)])
        print(f"| {kind} | {plain:,.0f} | {ordered:,.0f} | {ordered / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
