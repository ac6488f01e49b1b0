"""Transactional outbox: messages written with the business rows, published after the commit.

In a handler:

    async with context.transaction() as tx:
        tx.session.add(Order(...))
        tx.publish("orders/created", {"id": 1})          # MQTT, QoS 1 by default
        tx.publish_stream("orders", {"id": 1})           # Redis stream (ENABLE_REDIS)

The outbox rows are inserted in the same database transaction as whatever the session did, so
they commit together or not at all. Every process runs an `OutboxProcessor` that claims due rows
atomically (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite and MySQL/MariaDB: a conditional UPDATE
of the status), publishes them, waits for the broker's PUBACK or the XADD reply, and only then
marks them PUBLISHED. Failures are retried with exponential backoff and ABANDONED after
OUTBOX_MAX_ATTEMPTS. A claim carries a lock (`locked_by`, `locked_until`) that its process renews
while it publishes; a claim whose lock expired (its process died) is taken over by another.

Delivery is at least once: a process that dies after the broker acknowledged a message but
before marking its row leaves it to be published again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Generator

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.foundation.config import Settings
from core.routing.context import MessageContext
from core.integrations.database import Base, Database, DatabaseError, safe_url
from core.integrations.outbox_processor import OutboxCounters, OutboxProcessor, outbox_backlog, retry_delay  # noqa: F401
from core.integrations.outbox_table import (ABANDONED, BACKOFF_CAP, DATABASE_KEY, FAILED, MQTT, OUTBOX_KEY,  # noqa: F401
                               PENDING, PROCESSING, PUBLISHED, STATUSES, STREAM, json_safe_properties, outbox_table,
                               utcnow)
from core.routing.payload import encode_payload
from core.foundation.tracing import TRACEPARENT, outgoing_now, outgoing_pairs
from core.transport.wire import check_topic_name, publish_properties

if TYPE_CHECKING:
    from core.runtime.runtime import Runtime

log = logging.getLogger("core.outbox")

# -- the unit of work ----------------------------------------------------------------------------


class _Queued:
    """What `tx.publish` returns: nothing to wait for, but `await tx.publish(...)` works too."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_QUEUED = _Queued()


class UnitOfWork:
    """`async with context.transaction() as tx`: an AsyncSession plus outbox publishing, one transaction.

    Leaving the block normally inserts the outbox rows and commits; an exception rolls everything
    back (nothing is published) and propagates. Do not commit `tx.session` yourself inside the block.
    """

    def __init__(self, database: Database, table: Table, on_commit: Callable[[], None] | None = None,
                 redis_enabled: bool = False) -> None:
        self._database = database
        self._table = table
        self._on_commit = on_commit
        self._redis_enabled = redis_enabled
        self._rows: list[dict[str, Any]] = []
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("tx.session is only available inside `async with context.transaction() as tx:`")
        return self._session

    def publish(self, topic: str, payload: Any = None, qos: int = 1, retain: bool = False, *,
                properties: dict[str, Any] | None = None) -> _Queued:
        """Publish `payload` on MQTT after the commit (QoS 1 by default)."""
        check_topic_name(topic, "tx.publish: topic")
        if qos not in (0, 1, 2):
            raise ValueError(f"tx.publish: qos must be 0, 1 or 2, not {qos!r}")
        headers: dict[str, Any] = {"qos": qos, "retain": bool(retain)}
        properties = outgoing_now(properties, topic)  # the handler's trace, stored with the row
        if properties:
            publish_properties(properties)  # refused now, in the handler, rather than at every publish attempt
            headers["properties"] = json_safe_properties(properties)
        self._add(MQTT, topic, payload, headers)
        return _QUEUED

    def publish_stream(self, stream: str, payload: Any = None, *, fields: dict[str, str] | None = None) -> _Queued:
        """Append `payload` (field `payload`, plus any extra `fields`) to a Redis stream after the commit."""
        if not self._redis_enabled:
            raise RuntimeError(f"tx.publish_stream({stream!r}) needs Redis: set ENABLE_REDIS=true (and REDIS_URL)")
        if not isinstance(stream, str) or not stream:
            raise ValueError(f"tx.publish_stream: {stream!r} is not a stream name")
        row_fields = {str(k): str(v) for k, v in (fields or {}).items()}
        if TRACEPARENT not in row_fields:  # the handler's trace, as fields the stream's consumer reads
            row_fields.update(outgoing_pairs(None, stream))
        self._add(STREAM, stream, payload, {"fields": row_fields})
        return _QUEUED

    def _add(self, kind: str, destination: str, payload: Any, headers: dict[str, Any]) -> None:
        if self._session is None:
            raise RuntimeError("tx.publish is only available inside `async with context.transaction() as tx:`")
        now = utcnow()
        self._rows.append({
            "kind": kind, "destination": destination, "payload": encode_payload(payload),
            "headers": json.dumps(headers, separators=(",", ":")), "status": PENDING, "attempts": 0,
            "next_attempt_at": now, "created_at": now,
        })

    async def __aenter__(self) -> "UnitOfWork":
        self._session = self._database.session()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        session = self.session
        try:
            if exc_type is not None:
                await session.rollback()
                return
            if self._rows:
                await session.execute(insert(self._table), self._rows)
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        finally:
            await session.close()
            self._session = None
        if self._rows and self._on_commit is not None:
            self._on_commit()


# -- the hook ------------------------------------------------------------------------------------


class DatabaseHook:
    """RuntimeHook (ENABLE_DATABASE): engine, tables, `context.transaction()` and the outbox processor."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.database: Database | None = None
        self.processor: OutboxProcessor | None = None
        self.table = outbox_table(settings.outbox_table)
        self._backlog_task: asyncio.Task[None] | None = None

    async def start(self, runtime: "Runtime") -> None:
        settings = self.settings
        self.database = database = Database(settings.database_url)
        if settings.database_create_tables:
            try:
                await database.create_tables(Base.metadata, self.table.metadata)
            except DatabaseError as exc:
                log.error("%s", exc)
                await database.dispose()
                raise
        services = runtime.services
        extras = services.extras
        redis_enabled = settings.enable_redis
        if settings.outbox_enabled:
            from core.integrations.streams import REDIS_KEY

            self.processor = OutboxProcessor(database, self.table, settings, services.publisher,
                                             services.worker_id, redis_getter=lambda: extras.get(REDIS_KEY))
            self.processor.start()
            extras[OUTBOX_KEY] = self.processor
            runtime.stats.extensions["outbox"] = self.processor.counters.snapshot
        extras[DATABASE_KEY] = database
        on_commit = self.processor.notify if self.processor is not None else None
        table = self.table

        def transaction(context: MessageContext) -> UnitOfWork:
            return UnitOfWork(database, table, on_commit, redis_enabled)

        services.transaction_factory = transaction
        if settings.http_port is not None:  # only the ops server shows backlogs
            from core.runtime.process_metrics import start_backlog

            self._backlog_task = start_backlog(runtime.stats, "outbox", partial(outbox_backlog, database, table))
        log.info("database %s ready (%s)%s", safe_url(settings.database_url), database.backend,
                 "; outbox processor running" if self.processor is not None else "")

    async def stop(self, runtime: "Runtime") -> None:
        if self._backlog_task is not None:
            self._backlog_task.cancel()
            await asyncio.gather(self._backlog_task, return_exceptions=True)
        if self.processor is not None:
            await self.processor.stop(self.settings.shutdown_timeout)
        if self.database is not None:
            await self.database.dispose()
        runtime.services.transaction_factory = None


def database_hooks(settings: Settings, worker_id: str) -> list[DatabaseHook]:
    """Hook factory for `Application.hook_factories`."""
    return [DatabaseHook(settings, worker_id)]


__all__ = [
    "ABANDONED", "FAILED", "PENDING", "PROCESSING", "PUBLISHED", "DatabaseError", "DatabaseHook", "OutboxProcessor",
    "UnitOfWork", "database_hooks", "outbox_table", "retry_delay",
]
