"""Cost of trace propagation (TRACING=w3c, the default) against TRACING=off, same run.

Run:  .venv/bin/python -m bench.bench_tracing [--count 20000] [--repeat 5]

- Per message, in-process (timeit, best of 7): what the dispatcher adds for a message without trace
  headers (a `Trace` and a contextvar set/reset), and what the first publish of a run adds (reading
  the properties, drawing the ids, formatting the header), with and without an incoming traceparent.
- Drain, on a private Mosquitto (as bench_ordering): a runtime drains ``--count`` queued QoS 1
  messages without trace headers; handlers: trivial (publishes nothing) and one that publishes one
  QoS 0 message (which then carries a traceparent). Medians of ``--repeat`` runs, off and w3c in turns.
"""

from __future__ import annotations

import os
import statistics
import sys
import timeit
from typing import Any, Awaitable, Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from bench.bench_ordering import Handler, drain_arguments, drain_rate, trivial_handler  # noqa: E402
from core.foundation import tracing  # noqa: E402
from tests.support.servers import MosquittoServer  # noqa: E402


def publishing_handler(done: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(device_id: str, payload: object, client: Any) -> None:
        await client.publish(f"bench-out/{device_id}", b"x", 0)
        done()

    return handle


HANDLERS: dict[str, Handler] = {"trivial": trivial_handler, "publishes one QoS 0 message": publishing_handler}


def _props(user: list[tuple[str, str]]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = user
    return props


def micro() -> dict[str, float]:
    """Nanoseconds per call of what tracing adds per message and per publishing run."""
    plain = _props([("tenant", "acme")])
    traced = _props([("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                     ("tracestate", "vendor=1")])

    def per_message() -> None:
        tracing.end(tracing.begin(plain))

    def first_publish(props: Properties) -> Callable[[], None]:
        def run() -> None:
            token = tracing.begin(props)
            tracing.outgoing(None, "out/topic")
            tracing.end(token)
        return run

    cases = {"per message (no publish)": per_message, "run that publishes, new trace": first_publish(plain),
             "run that publishes, traceparent received": first_publish(traced)}
    n = 100_000
    return {name: min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e9 for name, fn in cases.items()}


def main(argv: list[str] | None = None) -> int:
    args = drain_arguments(__doc__, argv)
    load = os.getloadavg()[0]
    costs = micro()
    broker = MosquittoServer(max_inflight=100, max_queued=0)
    broker.start()
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for run in range(args.repeat):
            line = []
            for kind, handler in HANDLERS.items():
                for mode in (("off", "w3c") if run % 2 == 0 else ("w3c", "off")):
                    rate = drain_rate(broker, handler, args.count, args.topics, env={"TRACING": mode})
                    results.setdefault((kind, mode), []).append(rate)
                    line.append(f"{kind} {mode} {rate:,.0f}/s")
            print(f"run {run + 1}: " + ", ".join(line), file=sys.stderr)
    finally:
        broker.cleanup()
    print(f"\nTracing cost, Python {sys.version.split()[0]} (load average {load:.2f})\n")
    print("| in-process, per call | ns |")
    print("|---|---:|")
    for name, ns in costs.items():
        print(f"| {name} | {ns:,.0f} |")
    print(f"\nDrain of {args.count:,} queued QoS 1 messages without trace headers over {args.topics} topics, "
          f"MAX_INFLIGHT=100, median of {args.repeat}\n")
    print("| handler | TRACING=off msgs/s | TRACING=w3c msgs/s | w3c / off |")
    print("|---|---|---|---|")
    for kind in HANDLERS:
        off = statistics.median(results[(kind, "off")])
        w3c = statistics.median(results[(kind, "w3c")])
        print(f"| {kind} | {off:,.0f} | {w3c:,.0f} | {w3c / off:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
