"""Stream route throughput (MQTT -> Redis Stream -> handler) beside a plain redis-py loop, same run.

Run:  .venv/bin/python -m bench.bench_streams [--count 10000] [--repeat 3] [--workers 1,2]

On a private Mosquitto and a private redis-server:

- raw redis-py: one coroutine appends ``--count`` entries in pipelines of ``--batch`` XADDs, another
  reads them with XREADGROUP (COUNT ``--batch``), calls a no-op handler per entry and XACKs each
  batch in one command; entries/s from the first XADD to the last XACK. This is the batched loop
  one writes by hand (the framework pipelines its XADDs and batches its reads and acks the same way).
- stream route, N workers: `python main.py --workers N` with tests/apps/streams_app (a shared QoS 1
  route with ``stream=``; the handler appends one line per entry to a file). A publisher thread
  sends ``--count`` QoS 1 messages as fast as the broker takes them; msgs/s from the first publish
  to the last handled entry (every message: MQTT in, XADD, ack, XREADGROUP, handler, XACK).
- inline route, N workers: the same route without ``stream=`` (handler runs at MQTT delivery), for
  the cost of the Redis hop.

Medians of ``--repeat`` runs; "vs inline" is the median of each run's stream/inline ratio (same run,
same worker count). Targets (reported, not asserted): the stream route >= 0.6 of the inline route.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

from tests.apps.streams_support.harness import AppProcess, Publisher, Records, app_env, wait_for  # noqa: E402
from tests.support.servers import MosquittoServer, RedisServer  # noqa: E402


async def _raw_loop(url: str, count: int, batch: int) -> float:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    stream, group = f"raw-{uuid.uuid4().hex[:8]}", "bench"
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    payload = b"0" * 16
    done = 0

    def handler(fields: dict[bytes, bytes]) -> None:
        return None

    async def produce() -> None:
        for start in range(0, count, batch):
            pipe = client.pipeline(transaction=False)
            for seq in range(start, min(count, start + batch)):
                pipe.xadd(stream, {"topic": f"bench/{seq}", "payload": payload})
            await pipe.execute()

    async def consume() -> None:
        nonlocal done
        while done < count:
            response = await client.xreadgroup(group, "c1", {stream: ">"}, count=batch, block=1000)
            for _, entries in response or ():
                for _, fields in entries:
                    handler(fields)
                await client.xack(stream, group, *[entry_id for entry_id, _ in entries])
                done += len(entries)

    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    await client.delete(stream)
    await client.aclose()
    return count / elapsed


def _app_run(broker: MosquittoServer, redis_server: RedisServer, workers: int, count: int, inline: bool,
             tmp: Path) -> float:
    tag = uuid.uuid4().hex[:8]
    records = tmp / f"records-{tag}.txt"
    env = app_env(
        MQTT_BROKER=broker.host, MQTT_PORT=str(broker.port), MQTT_CLIENT_ID=f"bench-{tag}", MQTT_GROUP_NAME=f"g{tag}",
        ROUTERS_PACKAGE="tests.apps.streams_app.routers", ENABLE_REDIS="true", REDIS_URL=redis_server.url,
        STREAMS_APP_TOPIC=f"bench/{tag}", STREAMS_APP_STREAM=f"bench-{tag}", STREAMS_APP_RECORD=str(records),
        STREAMS_APP_INLINE="1" if inline else "0",
    )
    app = AppProcess(tmp / f"app-{tag}.log", env, ["--workers", str(workers)])
    publisher = Publisher(broker.port)
    try:
        app.wait_log(rf"all {workers} worker\(s\) subscribed", 60)
        messages = [(f"bench/{tag}/{seq}", str(seq).encode()) for seq in range(count)]
        reader = Records(records)
        started = time.perf_counter()
        publisher.publish_in_background(messages)
        wait_for(lambda: reader.count() >= count, f"{count} handled", 300, interval=0.01)
        elapsed = time.perf_counter() - started
        publisher.join()
        return count / elapsed
    finally:
        publisher.close()
        app.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch", type=int, default=100, help="XADDs per pipeline and COUNT of the raw loop")
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    broker = MosquittoServer(max_queued=0)
    redis_server = RedisServer()
    broker.start()
    redis_server.start()
    results: dict[str, list[float]] = {}
    try:
        for run in range(args.repeat):
            rate = asyncio.run(_raw_loop(redis_server.url, args.count, args.batch))
            results.setdefault("raw", []).append(rate)
            line = [f"raw {rate:,.0f}/s"]
            for workers in worker_counts:
                for inline in (False, True) if run % 2 == 0 else (True, False):  # alternate who goes first
                    key = f"{'inline' if inline else 'stream'}-{workers}"
                    rate = _app_run(broker, redis_server, workers, args.count, inline, tmp)
                    results.setdefault(key, []).append(rate)
                    line.append(f"{key} {rate:,.0f}/s")
            print(f"run {run + 1}: " + ", ".join(line), file=sys.stderr)
    finally:
        broker.cleanup()
        redis_server.cleanup()
    med = {key: statistics.median(values) for key, values in results.items()}
    print(f"\nStream route throughput, {args.count:,} QoS 1 messages, median of {args.repeat} "
          f"(load average {os.getloadavg()[0]:.2f})\n")
    print("| path | workers | msgs/s | vs raw redis-py loop | vs inline (same run) |")
    print("|---|---|---|---|---|")
    print(f"| raw redis-py pipelined XADD + XREADGROUP/XACK loop | - | {med['raw']:,.0f} | 1.00 | - |")
    for workers in worker_counts:
        stream, inline = results[f"stream-{workers}"], results[f"inline-{workers}"]
        same_run = statistics.median(s / i for s, i in zip(stream, inline))
        for kind in ("stream", "inline"):
            value = med[f"{kind}-{workers}"]
            label = "MQTT -> stream -> handler" if kind == "stream" else "MQTT -> handler (inline, no Redis)"
            versus = f"{same_run:.2f}" if kind == "stream" else "1.00"
            print(f"| {label} | {workers} | {value:,.0f} | {value / med['raw']:.2f} | {versus} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
