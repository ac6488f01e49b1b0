"""What a stream consumer does with a failed or abandoned entry: retry it later (XCLAIM), take over
entries idle in a dead consumer (XAUTOCLAIM), move it to `<stream>:dlq`. Part of `StreamConsumer`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from core.foundation.failures import is_transient
from core.routing.payload import PayloadError
from core.integrations.stream_entries import decode_entry, entry_text
from core.integrations.stream_redis import reconnect_delay

log = logging.getLogger("core.streams")


class StreamRecovery:
    """Mixin of `core.integrations.stream_consumer.StreamConsumer`: retries, reclaiming and dead letters."""

    def _retry_later(self, entry_id: Any, fields: Any, attempt: int, delay: float, *, counted: bool) -> None:
        self._retry_ids.add(entry_id)
        task = asyncio.get_running_loop().create_task(self._retry(entry_id, fields, attempt, delay, counted))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, entry_id: Any, fields: Any, attempt: int, delay: float, counted: bool) -> None:
        await asyncio.sleep(delay)
        await self.breaker.admit()  # while it is open, one held entry at a time probes the dependency
        failures = 0
        while True:
            try:
                # XCLAIM counts the delivery and resets the idle time (JUSTID: resets it only, for an uncounted
                # retry); it returns nothing if another consumer took the entry meanwhile or it was trimmed away.
                claimed: Any = await self.redis.xclaim(self.stream, self.group, self.consumer,
                                                       int(delay * 900), [entry_id], justid=not counted)
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await asyncio.sleep(reconnect_delay(failures))
                failures += 1
        self._retry_ids.discard(entry_id)  # before handling: a failure schedules the next retry
        self.counters.retried += 1
        if counted:
            batch = [(claimed_id, claimed_fields, attempt + 1) for claimed_id, claimed_fields in claimed if claimed_fields]
        else:
            batch = [(entry_id, fields, attempt)] if claimed else []
        if not batch:
            self.breaker.record_abandoned()  # taken by another consumer: if this was the probe, another one probes
        else:
            try:
                await self._handle_batch(batch)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # otherwise the acknowledgement waits in _to_ack for the consumer loop

    async def _reclaim(self) -> None:
        """Take over entries another consumer left pending longer than STREAM_CLAIM_IDLE_MS."""
        start: Any = "0-0"
        while not self._stopping:
            next_id, entries, _deleted = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=start, count=self.batch)
            entries = [(entry_id, fields) for entry_id, fields in entries if fields and entry_id not in self._inflight]
            if entries:
                pipe = self.redis.pipeline(transaction=False)
                for entry_id, _ in entries:
                    pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
                pending = await pipe.execute()
                batch = []
                for (entry_id, fields), info in zip(entries, pending):
                    delivered = int(info[0]["times_delivered"]) if info else 1
                    batch.append((entry_id, fields, delivered))
                self.counters.reclaimed += len(batch)
                log.warning("stream %r: reclaimed %d entr(ies) left pending by another consumer", self.stream, len(batch))
                await self._handle_reclaimed(batch)
            if next_id in (b"0-0", "0-0"):
                return
            start = next_id

    async def _handle_reclaimed(self, batch: list[tuple[Any, Any, int]]) -> None:
        limit = self.max_deliveries
        runnable = []
        for entry_id, fields, delivered in batch:
            if delivered > limit:
                # Delivered that often without an ack: it kills or hangs whoever handles it.
                error = RuntimeError(f"not acknowledged after {delivered - 1} deliveries (the consumers handling it "
                                     "died or hung)")
                await self._dead_letter(entry_id, fields, delivered - 1, error, self._endpoint_of(fields))
            else:
                runnable.append((entry_id, fields, delivered))
        if runnable:
            await self._handle_batch(runnable)

    def _endpoint_of(self, fields: dict[Any, Any]) -> Any:
        try:
            return self._endpoint_for(decode_entry(self.stream, fields))
        except PayloadError:
            return None

    async def _dead_letter(self, entry_id: Any, fields: dict[Any, Any], attempts: int, error: BaseException,
                           endpoint: Any) -> None:
        """Move the entry to `<stream>:dlq` with the error and attempt count, and acknowledge it (atomically).

        Counted for the process and, when the entry's route is known, for the route (`stream:<name>`).
        """
        entry: dict[Any, Any] = {
            "error": f"{type(error).__name__}: {error}"[:4096],
            "error_type": type(error).__name__,
            "attempts": str(attempts),
            "original_stream": self.stream,
            "original_id": entry_text(entry_id),
            "consumer": self.consumer,
            "failed_at": str(int(time.time() * 1000)),
        }
        for key, value in fields.items():
            entry[f"entry.{entry_text(key)}"] = value
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dlq, entry, maxlen=self.maxlen, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        await pipe.execute()
        self.counters.dead_lettered += 1
        self.stats.dead_lettered += 1
        if endpoint is not None:
            endpoint.stats.dead_lettered += 1


def original_fields(dlq_fields: dict[Any, Any]) -> dict[str, Any]:
    """The fields of the original entry, from a `<stream>:dlq` entry (to append it again after a fix)."""
    prefix = "entry."
    return {entry_text(k)[len(prefix):]: v for k, v in dlq_fields.items() if entry_text(k).startswith(prefix)}
