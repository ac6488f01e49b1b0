"""The transactional outbox against real servers: SQLite, PostgreSQL and MariaDB of this machine, Mosquitto.

Tables get a unique name per test (`OUTBOX_TABLE`, `OUTBOX_APP_ORDERS`) and are dropped at the end.
Every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis
from sqlalchemy import Column, Integer, MetaData, Table, select, text

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.integrations.database import Database
from core.integrations.outbox import (ABANDONED, MQTT, OUTBOX_KEY, PROCESSING, PUBLISHED, OutboxProcessor, UnitOfWork,
                         outbox_table, utcnow)
from core.router import Router
from tests.apps.streams_support.harness import AppProcess, Collector, Publisher, app_env, wait_for
from tests.support.servers import MosquittoServer, RedisServer

pytestmark = pytest.mark.timeout(150)

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MARIADB = "mysql+aiomysql://root@127.0.0.1:3306/test"


def _url(backend: str, tmp_path: Path) -> str:
    return {"sqlite": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", "postgresql": POSTGRES, "mariadb": MARIADB}[backend]


async def _drop(url: str, *tables: str) -> None:
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            for table in tables:
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        await db.dispose()


async def _rows(url: str, query: str) -> list[Any]:
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            return list(await conn.execute(text(query)))
    finally:
        await db.dispose()


def _rows_sync(url: str, query: str) -> list[Any]:
    return asyncio.run(_rows(url, query))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_two_processes_5000_transactions_published_exactly_once(
        backend: str, mosquitto: MosquittoServer, unique_id: str, tmp_path: Path) -> None:
    count = 5000
    url = _url(backend, tmp_path)
    outbox, orders = f"ob_{unique_id}", f"orders_{unique_id}"
    env = app_env(
        MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=unique_id,
        MQTT_GROUP_NAME=f"g{unique_id}", ROUTERS_PACKAGE="tests.apps.outbox_app.routers", DATABASE_URL=url,
        OUTBOX_TABLE=outbox, OUTBOX_APP_ORDERS=orders, OUTBOX_APP_PREFIX=unique_id, OUTBOX_TICK_INTERVAL="0.2",
    )
    collector = Collector(mosquitto.port, f"{unique_id}/out/#", client_id=f"{unique_id}-collector")
    app = AppProcess(tmp_path / "app.log", env, ["--workers", "2"])
    publisher = Publisher(mosquitto.port)
    try:
        app.wait_log(r"all 2 worker\(s\) subscribed")
        publisher.publish([(f"{unique_id}/in/{n}", b"") for n in range(count)])
        wait_for(lambda: len(collector.snapshot()) >= count, f"{count} published messages", 120)
        wait_for(lambda: _rows_sync(url, f"SELECT COUNT(*) FROM {outbox} WHERE status <> '{PUBLISHED}'")[0][0] == 0,
                 "every outbox row marked PUBLISHED", 30)
        received = collector.snapshot()
        assert set(received) == {f"{unique_id}/out/{n}" for n in range(count)}
        assert max(received.values()) == 1, "a message was published twice"
        business = Counter(n for (n,) in _rows_sync(url, f"SELECT n FROM {orders}"))
        assert set(business) == set(range(count)) and max(business.values()) == 1
        statuses = dict(_rows_sync(url, f"SELECT status, COUNT(*) FROM {outbox} GROUP BY status"))
        assert statuses == {PUBLISHED: count}
        owners = {locked_by.split("#")[0] for (locked_by,) in _rows_sync(url, f"SELECT DISTINCT locked_by FROM {outbox}")}
        assert len(owners) == 2, f"both processes publish: {owners}"
        assert _rows_sync(url, f"SELECT MAX(attempts) FROM {outbox}")[0][0] == 1
    finally:
        publisher.close()
        collector.close()
        assert app.stop() == 0, app.log()[-3000:]
        asyncio.run(_drop(url, outbox, orders))


@pytest_asyncio.fixture(params=["sqlite", "postgresql", "mariadb"])
async def db_runtime(request: pytest.FixtureRequest, mosquitto: MosquittoServer, unique_id: str,
                     tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await db_runtime(router)`: a started Runtime with the database feature on each backend.

    Its outbox table is `ob_<unique id>` (`runtime.settings.outbox_table`); that and the test's
    `orders_<unique id>` are dropped afterwards.
    """
    url = _url(request.param, tmp_path)
    outbox = f"ob_{unique_id}"
    runtimes: list[Any] = []

    async def start(router: Router, port: int | None = None, **env: str) -> Any:
        settings = load_settings({
            "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(port or mosquitto.port),
            "MQTT_CLIENT_ID": f"{unique_id}-{len(runtimes)}", "MQTT_RECONNECT_MIN": "0.1", "MQTT_RECONNECT_MAX": "0.5",
            "DATABASE_URL": url, "OUTBOX_TABLE": outbox, "OUTBOX_TICK_INTERVAL": "0.2", "SHUTDOWN_TIMEOUT": "5", **env,
        })
        app = Application.load(settings, router)
        runtime = app.make_runtime(app.routes)
        runtimes.append(runtime)
        await runtime.start()
        assert await runtime.wait_ready(20)
        return runtime

    yield start
    for runtime in runtimes:
        if not runtime._stopping:
            await runtime.stop()
    await _drop(url, outbox, f"orders_{unique_id}")


async def test_handler_raising_after_publish_publishes_nothing(
        db_runtime: Callable[..., Any], mosquitto: MosquittoServer, unique_id: str) -> None:
    # Not AUTO_INCREMENT: MySQL/MariaDB would store an inserted 0 as the next id.
    orders = Table(f"orders_{unique_id}", MetaData(), Column("n", Integer, primary_key=True, autoincrement=False))

    async def place(n: str, context: Any) -> None:
        async with context.transaction() as tx:
            await tx.session.execute(orders.insert().values(n=int(n)))
            await tx.publish(f"{unique_id}/out/{n}", {"n": int(n)})
            if int(n) % 2:
                raise ValueError("rejected after tx.publish")

    router = Router()
    router.on(f"{unique_id}/in/{{n}}", place, qos=1)
    collector = Collector(mosquitto.port, f"{unique_id}/out/#", client_id=f"{unique_id}-collector")
    runtime = await db_runtime(router)
    database = runtime.services.extras["database"]
    async with database.engine.begin() as conn:
        await conn.run_sync(orders.metadata.create_all)
    publisher = Publisher(mosquitto.port)
    try:
        await asyncio.to_thread(publisher.publish, [(f"{unique_id}/in/{n}", b"") for n in range(40)])
        await _until(lambda: len(collector.snapshot()) >= 20 and runtime.stats.dead_lettered >= 20, "20 published, 20 failed")
        async with database.engine.connect() as conn:
            stored = sorted(n for (n,) in await conn.execute(select(orders.c.n)))
            outbox_rows = (await conn.execute(text(f"SELECT COUNT(*) FROM {runtime.settings.outbox_table}"))).scalar()
        assert stored == list(range(0, 40, 2))
        assert outbox_rows == 20
        await _until_all_published(runtime, database, 20)
        # A stray publish (of a rolled-back transaction, or a row published twice) went out before this
        # marker, which the runtime publishes itself afterwards: once it arrives, the count is final.
        got = await collector.final_counts(runtime.client, f"{unique_id}/out/marker")
        assert got == Counter({f"{unique_id}/out/{n}": 1 for n in range(0, 40, 2)})
    finally:
        publisher.close()
        collector.close()


async def test_broker_down_for_seconds_everything_published_after_it_returns(
        db_runtime: Callable[..., Any], mosquitto_factory: Callable[..., MosquittoServer], unique_id: str) -> None:
    broker = mosquitto_factory(persistence=True)
    collector = Collector(broker.port, f"{unique_id}/out/#", client_id=f"{unique_id}-collector", persistent=True)
    runtime = await db_runtime(Router(), port=broker.port)
    factory = runtime.services.transaction_factory
    try:
        await asyncio.to_thread(broker.stop)
        await _until(lambda: not runtime.client.state.connected, "the runtime to notice the broker is gone")
        processor = runtime.services.extras[OUTBOX_KEY]
        rounds_without_mqtt = _count_rounds_without_mqtt(processor)
        for n in range(200):
            async with factory(None) as tx:
                tx.publish(f"{unique_id}/out/{n}", {"n": n})
        # The relay has looked at the due rows while the broker was away (what the attempt count below
        # is about), rather than the test hoping a few seconds were enough for it to.
        seen = len(rounds_without_mqtt)
        processor.notify()
        await _until(lambda: len(rounds_without_mqtt) > seen, "a relay round with the broker away")
        await asyncio.to_thread(broker.start)
        await _until(lambda: len(collector.snapshot()) >= 200, "200 messages after the broker came back", 40)
        database = runtime.services.extras["database"]

        async def statuses() -> list[Any]:
            async with database.engine.connect() as conn:
                return list(await conn.execute(text(f"SELECT status, attempts FROM {runtime.settings.outbox_table}")))

        deadline = time.monotonic() + 20
        while {status for status, _ in await statuses()} != {PUBLISHED} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        rows = await statuses()
        assert Counter(rows) == {(PUBLISHED, 1): 200}, "published once each, no attempt spent while the broker was away"
        assert max(collector.snapshot().values()) == 1
    finally:
        collector.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_claims_of_a_killed_process_are_taken_over_after_the_lock_timeout(
        backend: str, mosquitto_factory: Callable[..., MosquittoServer], unique_id: str, tmp_path: Path) -> None:
    """Process A claims a batch and waits for PUBACKs of a frozen broker; A is SIGKILLed; B takes over."""
    broker = mosquitto_factory()
    url = _url(backend, tmp_path)
    outbox = f"ob_{unique_id}"
    env = app_env(
        MQTT_BROKER=broker.host, MQTT_PORT=str(broker.port), MQTT_GROUP_NAME=f"g{unique_id}",
        ROUTERS_PACKAGE="tests.apps.outbox_app.routers", DATABASE_URL=url, OUTBOX_TABLE=outbox,
        OUTBOX_APP_ORDERS=f"orders_{unique_id}",
        OUTBOX_APP_PREFIX=unique_id, OUTBOX_TICK_INTERVAL="0.1", OUTBOX_LOCK_TIMEOUT="3",
    )
    collector = Collector(broker.port, f"{unique_id}/out/#", client_id=f"{unique_id}-collector")
    first = AppProcess(tmp_path / "a.log", {**env, "MQTT_CLIENT_ID": f"{unique_id}-a"})
    second = None
    try:
        first.wait_log(r"outbox processor running")
        first.wait_log(r"subscribed to \d+ filter")
        os.kill(broker.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            asyncio.run(_write_outbox_rows(url, unique_id, 50, outbox))
            wait_for(lambda: _rows_sync(url, f"SELECT COUNT(*) FROM {outbox} WHERE status = '{PROCESSING}' "
                                             f"AND locked_by LIKE '%/{first.pid}/%'")[0][0] == 50,
                     "process A to claim all 50 rows", 30)
            first.kill()
        finally:
            os.kill(broker.pid, signal.SIGCONT)  # type: ignore[arg-type]
        second = AppProcess(tmp_path / "b.log", {**env, "MQTT_CLIENT_ID": f"{unique_id}-b"})
        wait_for(lambda: _rows_sync(url, f"SELECT COUNT(*) FROM {outbox} WHERE status = '{PUBLISHED}'")[0][0] == 50,
                 "process B to publish the 50 rows", 40)
        rows = _rows_sync(url, f"SELECT locked_by, attempts FROM {outbox}")
        assert {locked_by.split("/")[1] for locked_by, _ in rows} == {str(second.pid)}
        assert {attempts for _, attempts in rows} == {2}  # A's claim, then B's takeover
        wait_for(lambda: set(collector.snapshot()) >= {f"{unique_id}/out/{n}" for n in range(50)},
                 "all 50 messages at the subscriber", 20)
    finally:
        collector.close()
        first.kill()
        if second is not None:
            second.stop()
        asyncio.run(_drop(url, outbox, f"orders_{unique_id}"))


async def _write_outbox_rows(url: str, prefix: str, count: int, table_name: str) -> None:
    db = Database(url)
    table = outbox_table(table_name)
    try:
        async with UnitOfWork(db, table) as tx:  # one commit: the other process claims them in one batch
            for n in range(count):
                tx.publish(f"{prefix}/out/{n}", {"n": n})
    finally:
        await db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
async def test_concurrent_claims_never_share_a_row(backend: str, unique_id: str, tmp_path: Path) -> None:
    """Four processors (separate engines, as separate processes would have) claim from one table at once."""
    url = _url(backend, tmp_path)
    name = f"ob_{unique_id}"
    settings = load_settings({"DATABASE_URL": url, "OUTBOX_TABLE": name, "OUTBOX_BATCH_SIZE": "25"})
    databases = [Database(url) for _ in range(4)]
    table = outbox_table(name)
    try:
        await databases[0].create_tables(table.metadata)
        async with UnitOfWork(databases[0], table) as tx:
            for n in range(400):
                tx.publish(f"x/{n}", n)
        processors = [OutboxProcessor(db, table, settings, publisher=None, worker_id=f"p{i}")
                      for i, db in enumerate(databases)]

        async def drain(processor: OutboxProcessor) -> list[int]:
            ids: list[int] = []
            while True:
                rows, _ = await processor.claim()
                if not rows:
                    return ids
                ids.extend(row.id for row in rows)

        claimed = await asyncio.gather(*(drain(p) for p in processors))
        every = [row_id for ids in claimed for row_id in ids]
        assert len(every) == 400 and len(set(every)) == 400, "a row was claimed twice, or one was missed"
        assert sum(1 for ids in claimed if ids) >= 2
    finally:
        await _drop(url, name)
        for db in databases:
            await db.dispose()


async def test_failing_rows_back_off_then_are_abandoned_with_the_error(
        redis_server: RedisServer, unique_id: str, tmp_path: Path) -> None:
    """A stream row whose key holds a string fails for real (WRONGTYPE) on every attempt."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    settings = load_settings({"DATABASE_URL": url, "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
                              "OUTBOX_MAX_ATTEMPTS": "3", "OUTBOX_BASE_DELAY": "50ms"})
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
    key = f"not-a-stream-{unique_id}"
    await client.set(key, "a string")
    db = Database(url)
    table = outbox_table("outbox")
    await db.create_tables(table.metadata)
    processor = OutboxProcessor(db, table, settings, publisher=None, redis_getter=lambda: client)
    try:
        async with UnitOfWork(db, table, redis_enabled=True) as tx:
            tx.publish_stream(key, {"n": 1})
            tx.publish_stream(f"stream-{unique_id}", {"n": 2})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await processor.process_once()
            async with db.engine.connect() as conn:
                rows = {row.destination: row for row in await conn.execute(select(table))}
            if rows[key].status == ABANDONED:
                break
            await asyncio.sleep(0.02)
        assert rows[key].status == ABANDONED and rows[key].attempts == 3
        assert "WRONGTYPE" in rows[key].last_error
        assert rows[f"stream-{unique_id}"].status == PUBLISHED
        [(_, fields)] = await client.xrange(f"stream-{unique_id}")
        assert fields == {b"payload": b'{"n":2}'}
    finally:
        await client.delete(key, f"stream-{unique_id}")
        await client.aclose()
        await db.dispose()


def _count_rounds_without_mqtt(processor: OutboxProcessor) -> list[float]:
    """Times of the relay's rounds that left MQTT rows alone (broker away); a wrapper around its `_kinds`."""
    rounds: list[float] = []
    kinds = processor._kinds

    async def counting() -> list[str]:
        result = await kinds()
        if MQTT not in result:
            rounds.append(time.monotonic())
        return result

    processor._kinds = counting  # type: ignore[method-assign]
    return rounds


async def _until_all_published(runtime: Any, database: Any, count: int) -> None:
    async def published() -> int:
        async with database.engine.connect() as conn:
            query = text(f"SELECT COUNT(*) FROM {runtime.settings.outbox_table} WHERE status = :s")
            return int((await conn.execute(query, {"s": PUBLISHED})).scalar())

    deadline = time.monotonic() + 30
    while await published() < count:
        assert time.monotonic() < deadline, f"timed out waiting for {count} outbox rows to be published"
        await asyncio.sleep(0.05)


async def _until(condition: Any, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)



async def test_stream_rows_wait_unclaimed_while_redis_is_down_and_are_published_after(
        redis_factory: Callable[..., RedisServer], unique_id: str, tmp_path: Path) -> None:
    """A private redis-server is stopped (by PID) while stream rows are due: no attempt is spent on them, however
    many rounds pass (OUTBOX_MAX_ATTEMPTS=2 would abandon them after two); after it starts again all are published."""
    from core.integrations.streams import make_redis

    server = redis_factory()
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    settings = load_settings({"DATABASE_URL": url, "ENABLE_REDIS": "true", "REDIS_URL": server.url,
                              "OUTBOX_MAX_ATTEMPTS": "2", "OUTBOX_BASE_DELAY": "50ms"})
    client = make_redis(settings)
    stream = f"stream-{unique_id}"
    db = Database(url)
    table = outbox_table("outbox")
    await db.create_tables(table.metadata)
    processor = OutboxProcessor(db, table, settings, publisher=None, redis_getter=lambda: client)

    async def rows() -> list[Any]:
        async with db.engine.connect() as conn:
            return list(await conn.execute(select(table)))

    try:
        await asyncio.to_thread(server.stop)
        async with UnitOfWork(db, table, redis_enabled=True) as tx:
            for n in range(20):
                tx.publish_stream(stream, {"n": n})
        for _ in range(6):  # rounds during the outage, every row made due before each
            async with db.engine.begin() as conn:
                await conn.execute(table.update().values(next_attempt_at=utcnow()))
            await processor.process_once()
            assert {(row.status, row.attempts) for row in await rows()} == {("PENDING", 0)}
        assert processor.counters.held == 20 and processor.counters.abandoned == 0
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 30
        while {row.status for row in await rows()} != {PUBLISHED} and time.monotonic() < deadline:
            await processor.process_once()
            await asyncio.sleep(0.05)
        assert {(row.status, row.attempts) for row in await rows()} == {(PUBLISHED, 1)}
        entries = await client.xrange(stream)
        assert sorted(json.loads(fields[b"payload"])["n"] for _, fields in entries) == list(range(20))
    finally:
        if server.running:
            await client.delete(stream)
        await client.aclose()
        await db.dispose()
