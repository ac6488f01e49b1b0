"""Transactional outbox publish rate beside a plain INSERT + publish, on SQLite and PostgreSQL.

Run:  .venv/bin/python -m bench.bench_outbox [--count 3000] [--concurrency 50] [--repeat 3]
      [--backends sqlite,postgresql]

One process, one private Mosquitto, one MQTT connection (`core.transport.mqtt_client.MqttClient`), one
database engine. ``--concurrency`` tasks play handlers, ``--count`` "orders" in all:

- raw: ``INSERT`` the order and commit, then ``await client.publish(topic, payload, qos=1)``
  (returns on PUBACK) — what a handler does without an outbox (and what loses the message if the
  process dies between the two);
- outbox: ``async with UnitOfWork(...) as tx`` inserting the order and ``tx.publish(...)`` — one
  transaction — while this process's `OutboxProcessor` claims, publishes (PUBACK) and marks rows.

Both are timed from the first transaction to the last message arriving at a subscriber (a paho
client on the same broker), so the outbox figure includes claiming and marking rows. Tables get
unique names and are dropped afterwards. Medians of ``--repeat`` runs; raw and outbox take turns.
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

from sqlalchemy import Column, Integer, MetaData, Table, text  # noqa: E402

from core.foundation.config import load_settings  # noqa: E402
from core.integrations.database import Database  # noqa: E402
from core.transport.mqtt_client import MqttClient  # noqa: E402
from core.integrations.outbox import OutboxProcessor, UnitOfWork, outbox_table  # noqa: E402
from tests.apps.streams_support.harness import Collector  # noqa: E402
from tests.support.servers import MosquittoServer  # noqa: E402

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _run(url: str, broker: MosquittoServer, count: int, concurrency: int, mode: str) -> float:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings({
        "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": f"bench-{tag}",
        "DATABASE_URL": url, "OUTBOX_TABLE": f"bench_outbox_{tag}", "OUTBOX_TICK_INTERVAL": "0.5",
    })
    client = MqttClient(settings, f"bench-{tag}", lambda m, g: None, clean_start=True, session_expiry=0, name="bench")
    client.start(asyncio.get_running_loop())
    assert await client.wait_subscribed(20)
    db = Database(url)
    orders = Table(f"bench_orders_{tag}", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer))
    table = outbox_table(settings.outbox_table)
    await db.create_tables(orders.metadata, table.metadata)
    collector = await asyncio.to_thread(Collector, broker.port, f"bench/{tag}/#", client_id=f"collector-{tag}")
    processor = None
    if mode == "outbox":
        processor = OutboxProcessor(db, table, settings, client, "bench")
        processor.start()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            if mode == "raw":
                async with db.session() as session, session.begin():
                    await session.execute(orders.insert().values(n=n))
                await client.publish(f"bench/{tag}/{n}", {"n": n}, qos=1)
            else:
                async with UnitOfWork(db, table, processor.notify) as tx:  # type: ignore[union-attr]
                    await tx.session.execute(orders.insert().values(n=n))
                    tx.publish(f"bench/{tag}/{n}", {"n": n}, qos=1)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    while len(collector.counts) < count:
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{mode}: only {len(collector.counts)} of {count} messages arrived")
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    if processor is not None:
        await processor.stop()
    collector.close()
    async with db.engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE {orders.name}"))
        await conn.execute(text(f"DROP TABLE {table.name}"))
    await db.dispose()
    await client.stop()
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    broker = MosquittoServer(max_queued=0, max_inflight=0)
    broker.start()
    rows = []
    try:
        for backend in args.backends.split(","):
            url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}" if backend == "sqlite" else POSTGRES
            raw, outbox = [], []
            for run in range(args.repeat):
                raw.append(asyncio.run(_run(url, broker, args.count, args.concurrency, "raw")))
                outbox.append(asyncio.run(_run(url, broker, args.count, args.concurrency, "outbox")))
                print(f"{backend} run {run + 1}: raw {raw[-1]:,.0f}/s, outbox {outbox[-1]:,.0f}/s", file=sys.stderr)
            rows.append((backend, statistics.median(raw), statistics.median(outbox)))
    finally:
        broker.cleanup()
    load = os.getloadavg()[0]
    print(f"\nOutbox publish rate, {args.count} transactions, {args.concurrency} concurrent, "
          f"median of {args.repeat} (load average {load:.2f})\n")
    print("| database | plain INSERT + publish | outbox (tx + processor) | outbox / plain |")
    print("|---|---|---|---|")
    for backend, raw_rate, outbox_rate in rows:
        print(f"| {backend} | {raw_rate:,.0f} msg/s | {outbox_rate:,.0f} msg/s | {outbox_rate / raw_rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
