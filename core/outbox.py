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
import os
import random
import socket
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from itertools import count
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Generator

from sqlalchemy import (
    BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData, String, Table, Text, and_, bindparam, delete,
    func, insert, or_, select, text, update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from core.backoff import backoff_delay
from core.breaker import CircuitBreaker
from core.config import Settings
from core.context import MessageContext
from core.database import Base, Database, DatabaseError, safe_url
from core.error_log import ErrorLog
from core.payload import encode_payload
from core.streams import is_transient, is_unreachable
from core.tracing import TRACEPARENT, outgoing_now, outgoing_pairs
from core.wire import check_topic_name, publish_properties

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("core.outbox")

PENDING, PROCESSING, PUBLISHED, FAILED, ABANDONED = "PENDING", "PROCESSING", "PUBLISHED", "FAILED", "ABANDONED"
STATUSES = (PENDING, PROCESSING, PUBLISHED, FAILED, ABANDONED)
MQTT, STREAM = "mqtt", "stream"
BACKOFF_CAP = 3600.0  # longest wait between two attempts, seconds
REDIS_PROBE_MIN, REDIS_PROBE_MAX = 0.2, 10.0  # backoff of the PING that tells when Redis is back, seconds

DATABASE_KEY = "database"
"""`Services.extras[DATABASE_KEY]`: the process's `core.database.Database`."""
OUTBOX_KEY = "outbox"
"""`Services.extras[OUTBOX_KEY]`: the process's `OutboxProcessor` (when OUTBOX_ENABLED)."""


def utcnow() -> datetime:
    """Naive UTC (every backend stores it the same way; all comparisons use this process's clock)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def outbox_table(name: str = "outbox", metadata: MetaData | None = None) -> Table:
    """The outbox table definition (one MetaData per table name)."""
    metadata = metadata if metadata is not None else MetaData()
    stamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    return Table(
        name, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),  # "mqtt" or "stream"
        Column("destination", Text, nullable=False),  # MQTT topic or stream name
        Column("payload", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        Column("headers", Text, nullable=False),  # JSON: qos, retain, properties / stream fields
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", stamp, nullable=False),
        Column("locked_by", String(200)),
        Column("locked_until", stamp),
        Column("last_error", Text),
        Column("created_at", stamp, nullable=False),
        Column("published_at", stamp),
        Index(f"ix_{name}_status_due", "status", "next_attempt_at"),
        Index(f"ix_{name}_locked_by", "locked_by"),
    )


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
            headers["properties"] = _json_safe_properties(properties)
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


def _short(exc: BaseException) -> str:
    """The first line of a database error (SQLAlchemy appends the whole statement and its parameters)."""
    return (str(exc).splitlines() or [""])[0][:500]


def _json_safe_properties(properties: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in properties.items():
        if isinstance(value, bytes):
            out[key] = {"__bytes__": value.hex()}
        elif key == "user_properties" and isinstance(value, dict):
            out[key] = [[str(k), str(v)] for k, v in value.items()]
        else:
            out[key] = value
    return out


def _restore_properties(properties: dict[str, Any]) -> dict[str, Any]:
    return {k: bytes.fromhex(v["__bytes__"]) if isinstance(v, dict) and "__bytes__" in v else v
            for k, v in properties.items()}


# -- the processor -------------------------------------------------------------------------------


def retry_delay(attempts: int, base: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `attempts` failed ones (exponential, jittered, capped)."""
    return backoff_delay(max(0, attempts - 1), base, BACKOFF_CAP, rand)


class OutboxCounters:
    __slots__ = ("claimed", "published", "failed", "abandoned", "taken_over", "cleaned", "held")

    def __init__(self) -> None:
        self.claimed = self.published = self.failed = self.abandoned = self.taken_over = self.cleaned = 0
        self.held = 0  # stream rows handed back uncounted because Redis could not take them

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Held(Exception):
    """Outcome of a stream row Redis could not take for a transient reason: handed back, attempt not counted."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class OutboxProcessor:
    """Claims, publishes and marks outbox rows for one process."""

    _claims = count(1)

    def __init__(
        self,
        database: Database,
        table: Table,
        settings: Settings,
        publisher: Any,
        worker_id: str = "main",
        redis_getter: Callable[[], Any] | None = None,
    ) -> None:
        self.db = database
        self.table = table
        self.settings = settings
        self.publisher = publisher
        self.redis_getter = redis_getter or (lambda: None)
        self.batch_size = settings.outbox_batch_size
        self.tick = settings.outbox_tick_interval
        self.max_attempts = settings.outbox_max_attempts
        self.base_delay = settings.outbox_base_delay
        self.lock_timeout = settings.outbox_lock_timeout
        self.retention = settings.outbox_retention
        self.cleanup_every = max(0.5, min(self.retention / 2, 3600.0))
        self.owner = f"{socket.gethostname().split('.')[0]}/{os.getpid()}/{worker_id}"[:150]
        self.counters = OutboxCounters()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_cleanup = 0.0
        self._token: str | None = None  # the claim being published
        # Open while Redis is unreachable: stream rows stay unclaimed until a PING (the half-open probe) answers.
        self.redis_breaker = CircuitBreaker(1, REDIS_PROBE_MIN, REDIS_PROBE_MAX)
        self._redis_failures = 0  # consecutive rounds Redis could not take stream rows (backoff)
        self._errors = ErrorLog(log, settings.error_log_interval)

    # -- lifecycle --

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-processor")

    def notify(self) -> None:
        """A transaction committed outbox rows: look now rather than at the next tick."""
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self._release()
        self._task = None

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                handled = await self.process_once()
                if time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + self.cleanup_every
                    await self.cleanup()
                failures = 0
            except (SQLAlchemyError, OSError) as exc:
                log.warning("outbox: database error (%s: %s); retrying", type(exc).__name__, _short(exc))
                failures += 1
                await asyncio.sleep(backoff_delay(failures - 1, 0.2, 10.0, random.random))
                continue
            if handled >= self.batch_size:
                continue  # more may be due right away
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick)
            except asyncio.TimeoutError:
                pass

    # -- one round --

    async def _kinds(self) -> list[str]:
        kinds = []
        state = getattr(self.publisher, "state", None)
        if state is None or state.connected:
            kinds.append(MQTT)  # while the broker is away, MQTT rows wait unclaimed (no attempt is spent)
        redis = self.redis_getter()
        if redis is not None and (self.redis_breaker.closed or await self._redis_back(redis)):
            kinds.append(STREAM)  # likewise stream rows while Redis is unreachable
        return kinds

    async def _redis_back(self, redis: Any) -> bool:
        """While Redis is unreachable: PING it when the breaker allows a probe; True once it answers."""
        if not self.redis_breaker.try_admit():
            return False
        try:
            await asyncio.wait_for(redis.ping(), 2.0)
        except asyncio.CancelledError:
            self.redis_breaker.record_abandoned()
            raise
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            self.redis_breaker.record_failure()
            return False
        log.warning("outbox: Redis is reachable again: publishing stream rows")
        self.redis_breaker.record_success()
        return True

    async def process_once(self) -> int:
        """Claim one batch, publish it, record the outcome. Returns the number of rows claimed."""
        kinds = await self._kinds()
        if not kinds:
            return 0
        rows, token = await self.claim(kinds)
        if not rows:
            return 0
        self._token = token
        renew = asyncio.get_running_loop().create_task(self._renew(token))
        try:
            outcomes = await self._publish_all(rows)
            await self._record_until_done(rows, outcomes, token)
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
        self._token = None
        return len(rows)

    async def _record_until_done(self, rows: list[Any], outcomes: list[BaseException | None], token: str) -> None:
        """Record the outcome, retrying while the database is away (the lock is renewed meanwhile).

        An unrecorded claim would be published again once its lock expired: after a database outage
        the rows it published must be marked, not published twice.
        """
        failures = 0
        started = time.monotonic()
        while True:
            try:
                await self._record(rows, outcomes, token)
            except (SQLAlchemyError, OSError) as exc:
                self._errors.log(("record",), logging.WARNING, "outbox: cannot record the outcome of claim %s (%s); "
                                 "retrying until the database answers (its lock is renewed meanwhile)", token,
                                 _short(exc))
                await asyncio.sleep(backoff_delay(failures, 0.2, 5.0, random.random))
                failures += 1
                continue
            if failures:
                log.warning("outbox: recorded the outcome of claim %s after %.1f s", token, time.monotonic() - started)
            return

    async def claim(self, kinds: list[str] | None = None) -> tuple[list[Any], str]:
        """Atomically take up to OUTBOX_BATCH_SIZE due rows (new, failed and due, or with an expired lock)."""
        t = self.table
        now = utcnow()
        token = f"{self.owner}#{next(self._claims)}"
        due = or_(
            and_(t.c.status.in_((PENDING, FAILED)), t.c.next_attempt_at <= now),
            and_(t.c.status == PROCESSING, t.c.locked_until < now),
        )
        if kinds is not None:
            due = and_(due, t.c.kind.in_(kinds))
        values = {"status": PROCESSING, "locked_by": token, "locked_until": now + timedelta(seconds=self.lock_timeout),
                  "attempts": t.c.attempts + 1}
        async with self.db.engine.connect() as conn:
            if self.db.backend == "postgresql":
                picked = select(t.c.id).where(due).order_by(t.c.id).limit(self.batch_size).with_for_update(skip_locked=True)
                result = await conn.execute(update(t).where(t.c.id.in_(picked)).values(**values)
                                            .returning(*t.c))
                rows = list(result)
            elif self.db.is_mysql:
                # MySQL cannot select from the table it updates; UPDATE ... ORDER BY ... LIMIT claims directly.
                # READ COMMITTED: no gap locks, so inserts by handlers never wait for a claim.
                await conn.execution_options(isolation_level="READ COMMITTED")
                stmt = update(t).where(due).values(**values).with_dialect_options(mysql_limit=self.batch_size)
                await conn.execute(stmt)
                rows = list(await conn.execute(select(t).where(t.c.locked_by == token, t.c.status == PROCESSING)))
            else:
                picked = select(t.c.id).where(due).order_by(t.c.id).limit(self.batch_size)
                result = await conn.execute(update(t).where(t.c.id.in_(picked)).values(**values)
                                            .returning(*t.c))
                rows = list(result)
            await conn.commit()
        rows.sort(key=lambda row: row.id)
        self.counters.claimed += len(rows)
        taken = sum(1 for row in rows if row.attempts > 1 and row.last_error is None)
        if taken:
            self.counters.taken_over += taken
        return rows, token

    async def _renew(self, token: str) -> None:
        """Keep our claim while we wait for acknowledgements (a broker outage can make that long)."""
        t = self.table
        while True:
            await asyncio.sleep(self.lock_timeout / 3)
            try:
                async with self.db.engine.begin() as conn:
                    await conn.execute(update(t).where(t.c.locked_by == token, t.c.status == PROCESSING)
                                       .values(locked_until=utcnow() + timedelta(seconds=self.lock_timeout)))
            except (SQLAlchemyError, OSError) as exc:
                log.warning("outbox: could not renew the lock of claim %s: %s", token, _short(exc))

    async def _publish_all(self, rows: list[Any]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(rows)
        mqtt_rows = [(i, row) for i, row in enumerate(rows) if row.kind == MQTT]
        stream_rows = [(i, row) for i, row in enumerate(rows) if row.kind == STREAM]
        other = [(i, row) for i, row in enumerate(rows) if row.kind not in (MQTT, STREAM)]
        for i, row in other:
            outcomes[i] = ValueError(f"unknown outbox kind {row.kind!r}")
        if stream_rows:
            await self._publish_streams(stream_rows, outcomes)
        if mqtt_rows:
            results = await asyncio.gather(*(self._publish_mqtt(row) for _, row in mqtt_rows), return_exceptions=True)
            for (i, _), result in zip(mqtt_rows, results):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                outcomes[i] = result if isinstance(result, BaseException) else None
        return outcomes

    async def _publish_mqtt(self, row: Any) -> None:
        headers = json.loads(row.headers)
        properties = headers.get("properties")
        await self.publisher.publish(row.destination, bytes(row.payload), int(headers.get("qos", 1)),
                                     bool(headers.get("retain", False)),
                                     properties=_restore_properties(properties) if properties else None)

    async def _publish_streams(self, rows: list[tuple[int, Any]], outcomes: list[BaseException | None]) -> None:
        redis = self.redis_getter()
        if redis is None:
            for i, _ in rows:
                outcomes[i] = RuntimeError("Redis is not enabled in this process (ENABLE_REDIS=false)")
            return
        maxlen = self.settings.stream_maxlen or None
        pipe = redis.pipeline(transaction=False)
        for _, row in rows:
            fields = dict(json.loads(row.headers).get("fields") or {})
            fields["payload"] = bytes(row.payload)
            pipe.xadd(row.destination, fields, maxlen=maxlen, approximate=True)
        try:
            results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every row of the batch failed (classified below)
            results = [exc] * len(rows)
        held: BaseException | None = None
        for (i, _), result in zip(rows, results):
            if not isinstance(result, BaseException):
                outcomes[i] = None
            elif is_transient(result):
                # Unreachable, or READONLY/OOM/...: not the row's fault; it waits without spending an attempt.
                outcomes[i] = _Held(result)
                held = result
            else:
                outcomes[i] = result
        if held is None:
            self._redis_failures = 0
            return
        n_held = sum(1 for outcome in outcomes if isinstance(outcome, _Held))
        if is_unreachable(held):
            if self.redis_breaker.record_failure():
                log.warning("outbox: Redis unreachable (%s: %s): holding %d stream row(s) until it is back; "
                            "attempts are not counted", type(held).__name__, held, n_held)
        elif self._redis_failures == 0:
            log.warning("outbox: Redis cannot take stream rows now (%s: %s): holding %d row(s), retrying with "
                        "backoff; attempts are not counted", type(held).__name__, held, n_held)
        self._redis_failures += 1

    async def _record(self, rows: list[Any], outcomes: list[BaseException | None], token: str) -> None:
        t = self.table
        now = utcnow()
        done = [row.id for row, outcome in zip(rows, outcomes) if outcome is None]
        failed = []
        held = []
        # Held rows go back to PENDING with their attempt uncounted; unreachable Redis is waited for by not
        # claiming stream rows at all, other transient replies (OOM, READONLY...) by a growing delay.
        hold_until = now + timedelta(seconds=0.0 if not self.redis_breaker.closed else backoff_delay(
            max(0, self._redis_failures - 1), REDIS_PROBE_MIN, REDIS_PROBE_MAX, random.random))
        for row, outcome in zip(rows, outcomes):
            if outcome is None:
                continue
            if isinstance(outcome, _Held):
                held.append({"row_id": row.id, "attempts_before": row.attempts - 1, "next_at": hold_until,
                             "error": f"held: {outcome}"[:2000]})
                continue
            error = f"{type(outcome).__name__}: {outcome}"[:2000]
            if row.attempts >= self.max_attempts:
                status, next_at = ABANDONED, now
                self.counters.abandoned += 1
                log.error("outbox: giving up on row %d (%s %r) after %d attempt(s): %s", row.id, row.kind,
                          row.destination, row.attempts, error)
            else:
                status, next_at = FAILED, now + timedelta(seconds=retry_delay(row.attempts, self.base_delay))
                self.counters.failed += 1
                log.warning("outbox: row %d (%s %r) failed (attempt %d of %d): %s; retrying at %s", row.id, row.kind,
                            row.destination, row.attempts, self.max_attempts, error, next_at.isoformat(timespec="seconds"))
            failed.append({"row_id": row.id, "new_status": status, "next_at": next_at, "error": error})
        async with self.db.engine.begin() as conn:
            if done:
                await conn.execute(update(t).where(t.c.id.in_(done), t.c.locked_by == token)
                                   .values(status=PUBLISHED, published_at=now, locked_until=None, last_error=None))
            if failed:
                await conn.execute(
                    update(t).where(t.c.id == bindparam("row_id"), t.c.locked_by == token)
                    .values(status=bindparam("new_status"), next_attempt_at=bindparam("next_at"),
                            last_error=bindparam("error"), locked_until=None),
                    failed,
                )
            if held:
                await conn.execute(
                    update(t).where(t.c.id == bindparam("row_id"), t.c.locked_by == token)
                    .values(status=PENDING, attempts=bindparam("attempts_before"), next_attempt_at=bindparam("next_at"),
                            last_error=bindparam("error"), locked_until=None),
                    held,
                )
        self.counters.published += len(done)
        self.counters.held += len(held)

    async def _release(self) -> None:
        """At shutdown, hand back a claim we could not finish (the next claimer takes it at once)."""
        token = self._token
        if token is None:
            return
        t = self.table
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(update(t).where(t.c.locked_by == token, t.c.status == PROCESSING)
                                   .values(status=PENDING, locked_until=None, next_attempt_at=utcnow()))
        except (SQLAlchemyError, OSError) as exc:
            log.warning("outbox: could not release claim %s at shutdown (%s); it is taken over after "
                        "OUTBOX_LOCK_TIMEOUT", token, _short(exc))

    async def cleanup(self) -> int:
        """Delete PUBLISHED rows older than OUTBOX_RETENTION."""
        t = self.table
        cutoff = utcnow() - timedelta(seconds=self.retention)
        async with self.db.engine.begin() as conn:
            result = await conn.execute(delete(t).where(t.c.status == PUBLISHED, t.c.published_at < cutoff))
        removed = result.rowcount or 0
        self.counters.cleaned += removed
        return removed

    async def backlog(self) -> int:
        """Rows not yet published (pending, processing or failed)."""
        return int((await outbox_backlog(self.db, self.table))["outbox"])


async def outbox_backlog(database: Database, table: Table) -> dict[str, float]:
    """`outbox`: rows not yet published (PENDING, PROCESSING, FAILED); `outbox:abandoned`: ABANDONED rows.

    One indexed COUNT per status (the `(status, next_attempt_at)` index), run periodically, not per message.
    """
    t = table
    async with database.engine.connect() as conn:
        result = await conn.execute(select(t.c.status, func.count()).where(t.c.status != PUBLISHED)
                                    .group_by(t.c.status))
        counts = {status: int(n) for status, n in result}
    return {"outbox": float(sum(counts.get(s, 0) for s in (PENDING, PROCESSING, FAILED))),
            "outbox:abandoned": float(counts.get(ABANDONED, 0))}


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
            from core.streams import REDIS_KEY

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
            from core.process_metrics import start_backlog

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
