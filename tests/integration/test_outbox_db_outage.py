"""A database outage while the outbox relay works (not while a handler does), against the machine's
PostgreSQL and MariaDB behind a TCP proxy the test takes away and brings back.

Every row is published once the database is back, and none twice: neither the claim whose outcome
could not be recorded during the outage, nor the rows committed while the relay could not claim.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.integrations.database import Database
from core.integrations.outbox import OUTBOX_KEY, PUBLISHED, UnitOfWork
from core.router import Router
from tests.apps.streams_support.harness import Collector
from tests.support.ops import TcpProxy
from tests.support.servers import MosquittoServer

pytestmark = pytest.mark.timeout(150)

SERVERS = {"postgresql": ("postgresql+asyncpg://postgres@127.0.0.1:{port}/test", 5432),
           "mariadb": ("mysql+aiomysql://root@127.0.0.1:{port}/test", 3306)}


class GatedPublisher:
    """The relay's publisher, holding its publishes until `gate` opens; `entered` tells that one is waiting."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # `state` (connected?) and the rest

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        await self.gate.wait()
        await self.inner.publish(*args, **kwargs)


class FailureCounter:
    """Counts the database errors of one of the relay's steps (a wrapper around the bound method)."""

    def __init__(self, processor: Any, name: str) -> None:
        self.count = 0
        method = getattr(processor, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except Exception:
                self.count += 1
                raise

        setattr(processor, name, counted)


async def until(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_database_outage_during_relay_publishes_every_row_once_after_it_returns(
        backend: str, mosquitto: MosquittoServer, unique_id: str) -> None:
    template, server_port = SERVERS[backend]
    direct_url = template.format(port=server_port)
    proxy = TcpProxy("127.0.0.1", server_port)
    await proxy.start()
    outbox = f"ob_{unique_id}"
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": f"{unique_id}-relay",
        "DATABASE_URL": template.format(port=proxy.port), "OUTBOX_TABLE": outbox, "OUTBOX_TICK_INTERVAL": "0.2",
        "OUTBOX_BATCH_SIZE": "10", "OUTBOX_LOCK_TIMEOUT": "3", "SHUTDOWN_TIMEOUT": "5",
    })
    app = Application.load(settings, Router())
    runtime = app.make_runtime(app.routes)
    collector = Collector(mosquitto.port, f"{unique_id}/out/#", client_id=f"{unique_id}-collector")
    direct = Database(direct_url)
    try:
        await runtime.start()
        assert await runtime.wait_ready(20)
        processor = runtime.services.extras[OUTBOX_KEY]
        publisher = processor.publisher = GatedPublisher(processor.publisher)
        records = FailureCounter(processor, "_record")
        claims = FailureCounter(processor, "claim")

        # 1. The database goes away while a claim is being published: its outcome cannot be recorded,
        #    and stays unrecordable for longer than a few quick retries.
        for n in range(25):
            async with runtime.services.transaction_factory(None) as tx:
                tx.publish(f"{unique_id}/out/{n}", {"n": n})
        await asyncio.wait_for(publisher.entered.wait(), 20)
        await proxy.stop()
        publisher.gate.set()
        await until(lambda: records.count + claims.count >= 8, "the relay to fail 8 times against the database")
        await proxy.start()
        await until_published(direct, outbox, 25)

        # 2. The database goes away while the relay is idle; rows are committed meanwhile (here straight
        #    to the server, as another process would) and cannot be claimed until it is back.
        await proxy.stop()
        failed_claims = claims.count
        async with UnitOfWork(direct, processor.table) as tx:
            for n in range(25, 40):
                tx.publish(f"{unique_id}/out/{n}", {"n": n})
        await until(lambda: claims.count >= failed_claims + 2, "two failed claims during the outage")
        await proxy.start()
        await until_published(direct, outbox, 40)

        # Counted after a marker the runtime publishes itself: nothing the relay published is still on its way.
        got = await collector.final_counts(runtime.client, f"{unique_id}/out/marker")
        assert got == Counter({f"{unique_id}/out/{n}": 1 for n in range(40)}), "each row published once"
        async with direct.engine.connect() as conn:
            attempts = Counter(a for (a,) in await conn.execute(text(f"SELECT attempts FROM {outbox}")))
        assert attempts == {1: 40}, "no row claimed twice"
    finally:
        if proxy._server is None:
            await proxy.start()  # let the runtime stop cleanly
        await runtime.stop()
        collector.close()
        async with direct.engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {outbox}"))
        await direct.dispose()
        await proxy.stop()


async def until_published(db: Database, table: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with db.engine.connect() as conn:
            query = text(f"SELECT COUNT(*) FROM {table} WHERE status = :s")
            done = int((await conn.execute(query, {"s": PUBLISHED})).scalar())
        if done >= count:
            return
        assert time.monotonic() < deadline, f"only {done} of {count} outbox rows published after {timeout:.0f} s"
        await asyncio.sleep(0.05)
