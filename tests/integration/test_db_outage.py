"""A database outage is not a bad message (issue 9, section 2), against the machine's PostgreSQL
behind a TCP proxy the test takes away and brings back, and a private Mosquitto.

Tables get a unique name per test and are dropped at the end; the app process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from core.foundation.config import load_settings
from core.integrations.database import Database
from core.integrations.outbox import PUBLISHED, OutboxProcessor, UnitOfWork, outbox_table
from tests.apps.streams_support.harness import AppProcess, Collector, Publisher, app_env
from tests.support.ops import TcpProxy, http_get, metric, parse_metrics
from tests.support.servers import MosquittoServer, free_port

pytestmark = pytest.mark.timeout(240)

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:{port}/test"


async def _until(condition: Any, what: str, timeout: float = 60.0, interval: float = 0.1) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def _scalar(db: Database, query: str) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(text(query))).scalar()


@pytest.mark.parametrize("workers", [0, 2], ids=["single", "workers"])
async def test_a_database_outage_under_load_holds_orders_and_loses_or_duplicates_nothing(
        workers: int, mosquitto: MosquittoServer, unique_id: str, tmp_path: Path) -> None:
    count, rate, outage = 3000, 300, 8.0
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    direct = Database(POSTGRES.format(port=5432))  # the test's own view, not through the proxy
    outbox, orders = f"ob_{unique_id}", f"orders_{unique_id}"
    http = free_port()
    route = f"{unique_id}/in/{{n}}"
    env = app_env(
        MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=unique_id,
        MQTT_GROUP_NAME=f"g{unique_id}", ROUTERS_PACKAGE="tests.apps.outage_app.routers",
        DATABASE_URL=POSTGRES.format(port=proxy.port), OUTBOX_TABLE=outbox, OUTAGE_APP_ORDERS=orders,
        OUTAGE_APP_PREFIX=unique_id, OUTBOX_TICK_INTERVAL="0.2", HTTP_PORT=str(http),
    )
    out = Collector(mosquitto.port, f"{unique_id}/out/#", client_id=f"{unique_id}-out")
    dead = Collector(mosquitto.port, f"dead-letter/{unique_id}/#", client_id=f"{unique_id}-dead")
    app = AppProcess(tmp_path / "app.log", env, ["--workers", str(workers)] if workers else [])
    publisher = Publisher(mosquitto.port)
    base = f"http://127.0.0.1:{http}"
    try:
        # Every HTTP call runs in a thread: the proxy the app's database connections go through runs on this loop.
        await _until(lambda: _get_status(base + "/ready"), "the app to be ready", 60)
        publisher.publish_in_background([(f"{unique_id}/in/{n}", b"") for n in range(count)], rate=rate)
        await _until(lambda: _scalar_ge(direct, orders, 300), "300 orders committed", 60)

        await proxy.stop()  # the database is gone: refused connections, open ones cut
        cut = asyncio.get_running_loop().time()

        async def holding_shown() -> bool:
            status, body = await asyncio.to_thread(http_get, base + "/metrics")
            if status != 200 or metric(parse_metrics(body), "mqtt_app_route_messages_holding", route=route) <= 0:
                return False
            status, body = await asyncio.to_thread(http_get, base + "/status.json")
            routes = {r["pattern"]: r for r in json.loads(body)["routes"]}
            return status == 200 and routes[route]["holding"] > 0 and json.loads(body)["totals"]["holding"] > 0

        await _until(holding_shown, "the held orders on /metrics and /status.json", outage)
        await asyncio.sleep(max(0.0, cut + outage - asyncio.get_running_loop().time()))
        await proxy.start()  # same port: the database is back

        await asyncio.to_thread(publisher.join, 120)
        await _until(lambda: len(out.snapshot()) >= count or dead.snapshot(), f"{count} orders published", 120)
        await _until(lambda: _all_published(direct, outbox), "every outbox row PUBLISHED", 60)

        assert dead.snapshot() == Counter(), "an order was dead-lettered during the outage"
        committed = Counter(n for (n,) in await _rows(direct, f"SELECT n FROM {orders}"))
        assert set(committed) == set(range(count)) and max(committed.values()) == 1
        published = out.snapshot()
        assert set(published) == {f"{unique_id}/out/{n}" for n in range(count)}
        assert max(published.values()) == 1, [t for t, c in published.items() if c > 1][:10]
        metrics = parse_metrics((await asyncio.to_thread(http_get, base + "/metrics"))[1])
        assert metric(metrics, "mqtt_app_route_messages_held_total", route=route) > 0
        assert metric(metrics, "mqtt_app_route_messages_holding", route=route) == 0
        assert metric(metrics, "mqtt_app_route_messages_dead_lettered_total", route=route) == 0
    finally:
        publisher.close()
        out.close()
        dead.close()
        code = await asyncio.to_thread(app.stop)  # the proxy runs on this loop: do not block it
        await proxy.stop()
        log = app.log()
        async with direct.engine.begin() as conn:
            for table in (outbox, orders):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await direct.dispose()
    assert code == 0, log[-3000:]
    # Bounded logs: one traceback per distinct error and route per ERROR_LOG_INTERVAL (60 s, longer than
    # this test), not one per message.
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log)
    with_traceback = [_error_kind(r) for r in records if "Traceback (most recent call last)" in r]
    assert with_traceback and max(Counter(with_traceback).values()) == 1, Counter(with_traceback)
    assert len(with_traceback) <= 8 * max(1, workers) and len(log) < 200_000 * max(1, workers), \
        f"{len(with_traceback)} tracebacks, {len(log)} bytes"


def _error_kind(record: str) -> str:
    """The first line of a log record without its time, quoted values and error message: `[process] logger: what:
    Type` (each process logs its own)."""
    head = record.splitlines()[0]
    head = head[head.find("["):]
    head = re.sub(r"'[^']*'", "''", head)
    return re.sub(r"(: [\w.]+): .*", r"\1", head)


async def _get_status(url: str) -> bool:
    return (await asyncio.to_thread(http_get, url))[0] == 200


async def _scalar_ge(db: Database, table: str, n: int) -> bool:
    return int(await _scalar(db, f"SELECT COUNT(*) FROM {table}") or 0) >= n


async def _all_published(db: Database, table: str) -> bool:
    return int(await _scalar(db, f"SELECT COUNT(*) FROM {table} WHERE status <> '{PUBLISHED}'") or 0) == 0


async def _rows(db: Database, query: str) -> list[Any]:
    async with db.engine.connect() as conn:
        return list(await conn.execute(text(query)))


class _GatedPublisher:
    """Stands in for the MQTT client: each publish waits until the test opens the gate, and is counted."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.called = asyncio.Event()
        self.published: Counter[str] = Counter()

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: Any = None) -> None:
        self.called.set()
        await self.gate.wait()
        self.published[topic] += 1


async def test_a_claim_published_before_an_outage_is_recorded_after_it_and_never_published_again(
        unique_id: str) -> None:
    """The database goes away between the publish and the recording of a claim's outcome, for longer than
    the old ~6 s of recording retries and longer than a lock renewal interval: the outcome is recorded
    once the database is back, and the rows are not taken over and published again."""
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    name = f"ob_{unique_id}"
    url = POSTGRES.format(port=proxy.port)
    settings = load_settings({"DATABASE_URL": url, "OUTBOX_TABLE": name, "OUTBOX_LOCK_TIMEOUT": "12",
                              "OUTBOX_TICK_INTERVAL": "0.1"})
    db, direct = Database(url), Database(POSTGRES.format(port=5432))
    table = outbox_table(name)
    publisher = _GatedPublisher()
    processor = OutboxProcessor(db, table, settings, publisher)
    try:
        await db.create_tables(table.metadata)
        async with UnitOfWork(db, table) as tx:
            for n in range(20):
                tx.publish(f"{unique_id}/{n}", n)
        processor.start()
        await asyncio.wait_for(publisher.called.wait(), 20)  # the rows are claimed, their publish is waiting
        await proxy.stop()
        publisher.gate.set()  # published while the database is away
        await _until(lambda: sum(publisher.published.values()) == 20, "the 20 publishes")
        await asyncio.sleep(8.0)  # the outage: longer than the old recording retries (~6 s)
        await proxy.start()
        # An unrecorded claim would only be marked after its lock expired and it was published again.
        await _until(lambda: _all_published(direct, name), "every row PUBLISHED", 60)
        assert publisher.published == Counter({f"{unique_id}/{n}": 1 for n in range(20)})
        async with direct.engine.connect() as conn:
            attempts = [row.attempts for row in await conn.execute(select(table))]
        assert attempts == [1] * 20
    finally:
        await processor.stop(5)
        await proxy.stop()
        async with direct.engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
        await db.dispose()
        await direct.dispose()
