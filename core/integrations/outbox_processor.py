"""`OutboxProcessor`: claims due outbox rows, publishes them, marks them; retries, takeovers, cleanup.

See `core.integrations.outbox` for the whole design."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
from datetime import timedelta
from itertools import count
from typing import Any, Callable

from sqlalchemy import Table, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from core.foundation.backoff import backoff_delay
from core.runtime.breaker import CircuitBreaker
from core.foundation.config import Settings
from core.integrations.database import Database
from core.foundation.error_log import ErrorLog
from core.integrations.outbox_table import (ABANDONED, BACKOFF_CAP, FAILED, MQTT, PENDING, PROCESSING, PUBLISHED, REDIS_PROBE_MAX,
                               REDIS_PROBE_MIN, STREAM, restore_properties, short_error, utcnow)
from core.integrations.streams import is_transient, is_unreachable

log = logging.getLogger("core.outbox")


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
                log.warning("outbox: database error (%s: %s); retrying", type(exc).__name__, short_error(exc))
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
                                 short_error(exc))
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
                log.warning("outbox: could not renew the lock of claim %s: %s", token, short_error(exc))

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
                                     properties=restore_properties(properties) if properties else None)

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
                        "OUTBOX_LOCK_TIMEOUT", token, short_error(exc))

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
