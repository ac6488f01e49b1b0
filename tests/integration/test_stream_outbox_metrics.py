"""Outbox and stream numbers on /metrics of `python main.py` (HTTP_PORT): backlogs and counters.

A private Mosquitto and redis-server, a SQLite file; the app is tests/apps/streams_app in one process.
Every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from core.integrations.database import Database
from core.integrations.outbox import ABANDONED, FAILED, UnitOfWork, outbox_table, utcnow
from tests.apps.streams_support.harness import AppProcess, Publisher, Records, app_env, wait_for
from tests.support.ops import metric, scrape
from tests.support.servers import MosquittoServer, RedisServer, free_port

pytestmark = pytest.mark.timeout(150)


async def _prepare_outbox(url: str, prefix: str) -> None:
    """3 MQTT rows due now (published by the app), 5 failed rows due tomorrow, 2 abandoned rows."""
    db = Database(url)
    table = outbox_table("outbox")
    try:
        await db.create_tables(table.metadata)
        async with UnitOfWork(db, table) as tx:
            for n in range(10):
                tx.publish(f"{prefix}/out/{n}", {"n": n})
        async with db.engine.begin() as conn:
            await conn.execute(table.update().where(table.c.id.between(4, 8))
                               .values(status=FAILED, attempts=1, next_attempt_at=utcnow() + timedelta(days=1)))
            await conn.execute(table.update().where(table.c.id > 8).values(status=ABANDONED, attempts=10))
    finally:
        await db.dispose()


def test_metrics_show_stream_and_outbox_counters_and_backlogs(
        mosquitto: MosquittoServer, redis_server: RedisServer, unique_id: str, tmp_path: Path) -> None:
    stream, port = f"orders-{unique_id}", free_port()
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    asyncio.run(_prepare_outbox(url, unique_id))
    env = app_env(
        MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=unique_id,
        MQTT_GROUP_NAME=f"g{unique_id}", ROUTERS_PACKAGE="tests.apps.streams_app.routers", ENABLE_REDIS="true",
        REDIS_URL=redis_server.url, DATABASE_URL=url, HTTP_PORT=str(port), SHUTDOWN_TIMEOUT="2",
        STREAMS_APP_TOPIC=f"{unique_id}/orders", STREAMS_APP_STREAM=stream, STREAMS_APP_SHARED="0",
        STREAMS_APP_RECORD=str(tmp_path / "records.txt"), STREAMS_APP_POISON="3", STREAMS_APP_HANG="100,101,102,103",
        STREAM_MAX_RETRIES="1", STREAM_RETRY_DELAY="50ms", OUTBOX_TICK_INTERVAL="0.2",
    )
    app = AppProcess(tmp_path / "app.log", env)
    publisher = Publisher(mosquitto.port)
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    base = f"http://127.0.0.1:{port}"
    try:
        app.wait_log(r"subscribed to \d+ filter")
        publisher.publish([(f"{unique_id}/orders/{seq}", str(seq).encode()) for seq in range(6)])
        records = Records(tmp_path / "records.txt")
        try:
            wait_for(lambda: records.count() >= 5 and client.xlen(stream + ":dlq") >= 1, "5 handled, 1 dead-lettered")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; handled {dict(records.seqs())}, dlq {client.xlen(stream + ':dlq')}\n"
                                 f"{app.log()[-6000:]}") from None
        assert records.count() == 5 and sorted(records.seqs()) == ["0", "1", "2", "4", "5"], records.lines()
        assert client.xlen(stream + ":dlq") == 1
        publisher.publish([(f"{unique_id}/orders/{seq}", str(seq).encode()) for seq in range(100, 104)])

        def settled() -> Any:
            m = scrape(base)
            done = (metric(m, "mqtt_app_backlog", source=f"stream:{stream}") == 4
                    and metric(m, "mqtt_app_stream_dead_lettered_total", stream=stream) == 1
                    and metric(m, "mqtt_app_outbox_published_total") == 3
                    and metric(m, "mqtt_app_backlog", source="outbox") == 5)
            return m if done else None

        m = wait_for(settled, "the numbers on /metrics", 60, interval=0.5)
        # Stream counters, summed over processes
        assert metric(m, "mqtt_app_stream_handled_total", stream=stream) == 5
        assert metric(m, "mqtt_app_stream_failed_total", stream=stream) == 2  # failed attempts: first + 1 retry
        assert metric(m, "mqtt_app_stream_retried_total", stream=stream) == 1
        assert metric(m, "mqtt_app_stream_dead_lettered_total", stream=stream) == 1
        assert metric(m, "mqtt_app_route_messages_dead_lettered_total", route=f"stream:{stream}") == 1
        assert metric(m, "mqtt_app_route_messages_handled_total", route=f"stream:{stream}") == 5
        # Stream backlog: the 4 hanging entries, not acknowledged (delivered ones pending, the rest lag)
        pending = metric(m, "mqtt_app_backlog", source=f"stream:{stream}:pending")
        assert 1 <= pending <= 4
        assert metric(m, "mqtt_app_backlog", source=f"stream:{stream}:dlq") == 1
        # Outbox counters and backlog
        assert metric(m, "mqtt_app_outbox_claimed_total") == 3
        assert metric(m, "mqtt_app_outbox_abandoned_total") == 0
        assert metric(m, "mqtt_app_backlog", source="outbox") == 5
        assert metric(m, "mqtt_app_backlog", source="outbox:abandoned") == 2
    finally:
        publisher.close()
        app.stop()
        client.delete(stream, stream + ":dlq")
