"""The outbox without a broker: settings, backoff, the unit of work and the claim/publish/record cycle on SQLite.

The processor publishes through a small recording publisher here (the state machine is the subject);
tests/integration/test_outbox.py runs it against Mosquitto, Redis, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import Column, Integer, MetaData, Table, select, update

from core.foundation.config import ConfigError, load_settings
from core.integrations.database import Database
from core.integrations.outbox import (
    ABANDONED, FAILED, PENDING, PROCESSING, PUBLISHED, OutboxProcessor, UnitOfWork, outbox_table, retry_delay, utcnow,
)


class RecordingPublisher:
    """Publisher interface of core.transport.mqtt_client.MqttClient; `refuse` makes it fail like a refused publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool, Any]] = []
        self.refuse: str | None = None

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: Any = None) -> None:
        if self.refuse:
            raise RuntimeError(self.refuse)
        self.published.append((topic, payload, qos, retain, properties))


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'unit.db'}")
    yield database
    await database.dispose()


def _settings(tmp_path: Path, **env: str) -> Any:
    return load_settings({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'unit.db'}", **env})


async def _table(db: Database) -> Table:
    table = outbox_table("outbox")
    await db.create_tables(table.metadata)
    return table


async def _all(db: Database, table: Table) -> list[Any]:
    async with db.engine.connect() as conn:
        return list(await conn.execute(select(table).order_by(table.c.id)))


def test_database_settings() -> None:
    default = load_settings({})
    assert default.enable_database is False and default.database_url.startswith("sqlite+aiosqlite:///")
    assert default.database_url.endswith("/app.db")
    on = load_settings({"DATABASE_URL": "postgresql://postgres@db/app"})
    assert on.enable_database is True and on.database_url == "postgresql+asyncpg://postgres@db/app"
    assert load_settings({"DATABASE_URL": "mysql://root@db/app"}).database_url == "mysql+aiomysql://root@db/app"
    assert load_settings({"DATABASE_URL": "sqlite:///x.db", "ENABLE_DATABASE": "false"}).enable_database is False
    s = load_settings({"OUTBOX_RETENTION": "2d", "OUTBOX_LOCK_TIMEOUT": "90s", "OUTBOX_TICK_INTERVAL": "500ms",
                       "OUTBOX_BASE_DELAY": "2", "OUTBOX_MAX_ATTEMPTS": "4", "OUTBOX_BATCH_SIZE": "7",
                       "OUTBOX_TABLE": "app_outbox", "OUTBOX_ENABLED": "no", "DATABASE_CREATE_TABLES": "off"})
    assert (s.outbox_retention, s.outbox_lock_timeout, s.outbox_tick_interval) == (172800.0, 90.0, 0.5)
    assert (s.outbox_base_delay, s.outbox_max_attempts, s.outbox_batch_size) == (2.0, 4, 7)
    assert (s.outbox_table, s.outbox_enabled, s.database_create_tables) == ("app_outbox", False, False)
    for env, name in [({"DATABASE_URL": "oracle://x/y"}, "DATABASE_URL"), ({"DATABASE_URL": "nothing"}, "DATABASE_URL"),
                      ({"OUTBOX_LOCK_TIMEOUT": "0.5"}, "OUTBOX_LOCK_TIMEOUT"), ({"OUTBOX_TABLE": "x;drop"}, "OUTBOX_TABLE"),
                      ({"OUTBOX_RETENTION": "forever"}, "OUTBOX_RETENTION"), ({"OUTBOX_MAX_ATTEMPTS": "0"}, "OUTBOX_MAX_ATTEMPTS")]:
        with pytest.raises(ConfigError, match=name):
            load_settings(env)


def test_retry_delay_doubles_with_jitter_and_is_capped() -> None:
    low = [retry_delay(n, 1.0, lambda: 0.0) for n in range(1, 6)]
    high = [retry_delay(n, 1.0, lambda: 1.0) for n in range(1, 6)]
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert high == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert retry_delay(100, 1.0, lambda: 1.0) == 3600.0


async def test_business_rows_and_outbox_rows_commit_together_or_not_at_all(db: Database) -> None:
    table = await _table(db)
    orders = Table("orders", MetaData(), Column("n", Integer, primary_key=True))
    await db.create_tables(orders.metadata)
    async with UnitOfWork(db, table) as tx:
        await tx.session.execute(orders.insert().values(n=1))
        tx.publish("orders/1", {"n": 1}, qos=2, retain=True, properties={"user_properties": {"k": "v"},
                                                                        "correlation_data": b"\x01"})
        await tx.publish("orders/1/audit", "text")
    with pytest.raises(ValueError, match="boom"):
        async with UnitOfWork(db, table) as tx:
            await tx.session.execute(orders.insert().values(n=2))
            tx.publish("orders/2", {"n": 2})
            raise ValueError("boom")
    async with db.engine.connect() as conn:
        assert [n for (n,) in await conn.execute(select(orders.c.n))] == [1]
    rows = await _all(db, table)
    assert [(r.kind, r.destination, r.payload, r.status, r.attempts) for r in rows] == [
        ("mqtt", "orders/1", b'{"n":1}', PENDING, 0), ("mqtt", "orders/1/audit", b"text", PENDING, 0)]
    assert json.loads(rows[0].headers) == {"qos": 2, "retain": True, "properties": {
        "user_properties": [["k", "v"]], "correlation_data": {"__bytes__": "01"}}}


async def test_publish_arguments_are_checked(db: Database) -> None:
    table = await _table(db)
    async with UnitOfWork(db, table) as tx:
        with pytest.raises(ValueError, match="wildcards"):
            tx.publish("orders/#", 1)
        with pytest.raises(ValueError, match="qos"):
            tx.publish("orders/1", 1, qos=3)
        with pytest.raises(RuntimeError, match="ENABLE_REDIS=true"):
            tx.publish_stream("orders", 1)
    with pytest.raises(RuntimeError, match="inside `async with context.transaction"):
        tx.publish("orders/1", 1)


async def test_process_once_publishes_and_marks_rows(db: Database, tmp_path: Path) -> None:
    table = await _table(db)
    publisher = RecordingPublisher()
    processor = OutboxProcessor(db, table, _settings(tmp_path), publisher, "w0")
    async with UnitOfWork(db, table) as tx:
        for n in range(3):
            tx.publish(f"out/{n}", {"n": n}, properties={"correlation_data": b"\x02"})
    assert await processor.process_once() == 3
    assert [(t, p, q) for t, p, q, _, _ in publisher.published] == [(f"out/{n}", b'{"n":%d}' % n, 1) for n in range(3)]
    assert publisher.published[0][4] == {"correlation_data": b"\x02"}
    rows = await _all(db, table)
    assert {(r.status, r.attempts) for r in rows} == {(PUBLISHED, 1)}
    assert all(r.published_at is not None and r.locked_by.split("#")[0].endswith("/w0") for r in rows)
    assert await processor.process_once() == 0  # nothing is published twice


async def test_failures_back_off_then_are_abandoned(db: Database, tmp_path: Path) -> None:
    table = await _table(db)
    publisher = RecordingPublisher()
    publisher.refuse = "broker refused the publish: Not authorized"
    processor = OutboxProcessor(db, table, _settings(tmp_path, OUTBOX_MAX_ATTEMPTS="3", OUTBOX_BASE_DELAY="60"),
                                publisher)
    async with UnitOfWork(db, table) as tx:
        tx.publish("out/x", 1)
    for attempt in (1, 2):
        before = utcnow()
        assert await processor.process_once() == 1
        [row] = await _all(db, table)
        assert (row.status, row.attempts) == (FAILED, attempt)
        assert "Not authorized" in row.last_error
        assert row.next_attempt_at >= before + timedelta(seconds=30 * 2 ** (attempt - 1))
        assert await processor.process_once() == 0  # not due yet
        async with db.engine.begin() as conn:  # let time pass
            await conn.execute(update(table).values(next_attempt_at=utcnow()))
    assert await processor.process_once() == 1
    [row] = await _all(db, table)
    assert (row.status, row.attempts) == (ABANDONED, 3) and "Not authorized" in row.last_error
    async with db.engine.begin() as conn:
        await conn.execute(update(table).values(next_attempt_at=utcnow()))
    assert await processor.process_once() == 0  # abandoned rows stay abandoned


async def test_live_claims_are_left_alone_and_expired_ones_taken_over(db: Database, tmp_path: Path) -> None:
    table = await _table(db)
    settings = _settings(tmp_path, OUTBOX_LOCK_TIMEOUT="60")
    first = OutboxProcessor(db, table, settings, RecordingPublisher(), "w0")
    second_publisher = RecordingPublisher()
    second = OutboxProcessor(db, table, settings, second_publisher, "w1")
    async with UnitOfWork(db, table) as tx:
        tx.publish("out/1", 1)
        tx.publish("out/2", 2)
    rows, token = await first.claim()  # first "dies" holding the claim
    assert len(rows) == 2 and {r.status for r in await _all(db, table)} == {PROCESSING}
    assert await second.process_once() == 0  # the lock is live
    async with db.engine.begin() as conn:  # ... until it expires
        await conn.execute(update(table).values(locked_until=utcnow() - timedelta(seconds=1)))
    assert await second.process_once() == 2
    assert [t for t, *_ in second_publisher.published] == ["out/1", "out/2"]
    rows = await _all(db, table)
    assert {(r.status, r.attempts) for r in rows} == {(PUBLISHED, 2)}
    assert all(r.locked_by != token and "/w1#" in r.locked_by for r in rows)
    assert second.counters.taken_over == 2


class HeldPublisher(RecordingPublisher):
    """Waits for `release` before each publish, like a broker slow to send its PUBACKs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: Any = None) -> None:
        await self.release.wait()
        await super().publish(topic, payload, qos, retain, properties=properties)


async def test_a_claim_is_renewed_while_its_publish_outlasts_the_lock_timeout(db: Database, tmp_path: Path) -> None:
    table = await _table(db)
    settings = _settings(tmp_path, OUTBOX_LOCK_TIMEOUT="1")
    slow = HeldPublisher()
    first = OutboxProcessor(db, table, settings, slow, "w0")
    second_publisher = RecordingPublisher()
    second = OutboxProcessor(db, table, settings, second_publisher, "w1")
    async with UnitOfWork(db, table) as tx:
        tx.publish("out/1", 1)
    publishing = asyncio.create_task(first.process_once())
    for _ in range(10):  # 2.5 s: two and a half lock timeouts while the first waits for its PUBACK
        await asyncio.sleep(0.25)
        assert await second.process_once() == 0, "a live claim was taken over"
    slow.release.set()
    assert await publishing == 1
    [row] = await _all(db, table)
    assert (row.status, row.attempts) == (PUBLISHED, 1) and "/w0#" in row.locked_by
    assert [t for t, *_ in slow.published] == ["out/1"] and second_publisher.published == []


async def test_mqtt_rows_wait_while_the_broker_is_away(db: Database, tmp_path: Path) -> None:
    class Disconnected(RecordingPublisher):
        class state:  # noqa: N801 - mirrors MqttClient.state
            connected = False

    table = await _table(db)
    processor = OutboxProcessor(db, table, _settings(tmp_path), Disconnected())
    async with UnitOfWork(db, table) as tx:
        tx.publish("out/1", 1)
    assert await processor.process_once() == 0
    [row] = await _all(db, table)
    assert (row.status, row.attempts) == (PENDING, 0)


async def test_cleanup_removes_old_published_rows_only(db: Database, tmp_path: Path) -> None:
    table = await _table(db)
    processor = OutboxProcessor(db, table, _settings(tmp_path, OUTBOX_RETENTION="1h"), RecordingPublisher())
    async with UnitOfWork(db, table) as tx:
        for n in range(4):
            tx.publish(f"out/{n}", n)
    now = utcnow()
    async with db.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.id <= 2).values(status=PUBLISHED, published_at=now - timedelta(hours=2)))
        await conn.execute(update(table).where(table.c.id == 3).values(status=PUBLISHED, published_at=now))
    assert await processor.cleanup() == 2
    assert [(r.id, r.status) for r in await _all(db, table)] == [(3, PUBLISHED), (4, PENDING)]


def test_transaction_without_a_database_says_what_to_set() -> None:
    from core.routing.context import MessageContext, Services
    from core.router import Router

    router = Router()
    router.on("a/b", lambda: None)
    context = MessageContext("a/b", {}, None, b"", 0, False, False, None, router.routes[0], Services(publisher=None))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="DATABASE_URL"):
        context.transaction()


class FakeRedis:
    """Pipeline XADD replies chosen by the test: `replies` (one per entry) or `raise_on_execute`; PING as `up`."""

    def __init__(self) -> None:
        self.up = True
        self.reply: Any = None  # an exception instance to answer every XADD with; None: an id
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        if not self.up:
            from redis.exceptions import ConnectionError

            raise ConnectionError("Connection refused")
        return True

    def pipeline(self, transaction: bool = False) -> Any:
        fake = self

        class Pipe:
            def __init__(self) -> None:
                self.queued: list[tuple[str, dict[str, Any]]] = []

            def xadd(self, stream: str, fields: dict[str, Any], **_: Any) -> None:
                self.queued.append((stream, fields))

            async def execute(self, raise_on_error: bool = True) -> list[Any]:
                if not fake.up:
                    from redis.exceptions import ConnectionError

                    raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
                if fake.reply is not None:
                    return [fake.reply for _ in self.queued]
                fake.entries.extend(self.queued)
                return [b"1-%d" % i for i, _ in enumerate(self.queued)]

        return Pipe()


async def _make_due(db: Database, table: Table) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(update(table).values(next_attempt_at=utcnow()))


async def _stream_processor(db: Database, tmp_path: Path) -> tuple[Table, "FakeRedis", OutboxProcessor]:
    """A processor that publishes stream rows to a FakeRedis; a single attempt before ABANDONED."""
    table = await _table(db)
    redis = FakeRedis()
    processor = OutboxProcessor(db, table, _settings(tmp_path, OUTBOX_MAX_ATTEMPTS="1"), RecordingPublisher(),
                                redis_getter=lambda: redis)
    return table, redis, processor


async def test_stream_rows_are_not_claimed_while_redis_is_unreachable(db: Database, tmp_path: Path) -> None:
    table, redis, processor = await _stream_processor(db, tmp_path)
    async with UnitOfWork(db, table, redis_enabled=True) as tx:
        tx.publish_stream("orders", {"n": 1})
        tx.publish("out/1", 1)
    redis.up = False
    assert await processor.process_once() == 2  # Redis not known to be down yet: claimed, then handed back
    rows = {r.kind: r for r in await _all(db, table)}
    assert (rows["stream"].status, rows["stream"].attempts) == (PENDING, 0)
    assert "held: ConnectionError" in rows["stream"].last_error
    assert rows["mqtt"].status == PUBLISHED  # MQTT rows of the same batch are not held up
    for _ in range(3):
        await _make_due(db, table)
        processor.redis_breaker.probe_now()  # probe now rather than after the backoff
        assert await processor.process_once() == 0
    assert redis.pings == 3
    [row] = [r for r in await _all(db, table) if r.kind == "stream"]
    assert (row.status, row.attempts) == (PENDING, 0)
    redis.up = True
    processor.redis_breaker.probe_now()
    assert await processor.process_once() == 1
    [row] = [r for r in await _all(db, table) if r.kind == "stream"]
    assert (row.status, row.attempts, row.last_error) == (PUBLISHED, 1, None)
    assert redis.entries == [("orders", {"payload": b'{"n":1}'})]
    assert processor.counters.held == 1 and processor.counters.abandoned == 0


async def test_transient_redis_replies_hold_stream_rows_without_spending_attempts(db: Database, tmp_path: Path) -> None:
    from redis.exceptions import OutOfMemoryError, ResponseError

    table, redis, processor = await _stream_processor(db, tmp_path)
    async with UnitOfWork(db, table, redis_enabled=True) as tx:
        tx.publish_stream("orders", {"n": 1})
    for reply in (OutOfMemoryError("command not allowed when used memory > 'maxmemory'.", status_code="OOM"),
                  ResponseError("READONLY You can't write against a read only replica.")):
        redis.reply = reply
        assert await processor.process_once() == 1
        [row] = await _all(db, table)
        assert (row.status, row.attempts) == (PENDING, 0) and row.next_attempt_at > utcnow() - timedelta(seconds=1)
        await _make_due(db, table)
    redis.reply = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert await processor.process_once() == 1
    [row] = await _all(db, table)
    assert (row.status, row.attempts) == (ABANDONED, 1) and "WRONGTYPE" in row.last_error
