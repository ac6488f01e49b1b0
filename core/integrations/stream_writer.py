"""The MQTT side of a stream route: `StreamWriter` appends (pipelined XADDs); `stream_bridge` is what the
Dispatcher runs in place of the route's handler."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from core.runtime.breaker import CircuitBreaker
from core.routing.context import MessageContext, Services
from core.runtime.dispatcher import no_stream_writer
from core.foundation.failures import is_transient, is_unreachable
from core.routing.middleware import CallNext
from core.routing.router import Route
from core.integrations.stream_entries import encode_entry
from core.integrations.stream_redis import RECONNECT_MAX, RECONNECT_MIN, WRITE_BATCH, WRITER_KEY, StreamError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("core.streams")


class StreamWriter:
    """Appends entries for every stream route of a process, pipelining what waits (one writer task).

    `append` returns after Redis stored the entry. While Redis is unreachable the writer keeps the
    entries, logs once, retries with backoff, and its callers wait (so their MQTT messages stay
    unacknowledged); entries whose caller gave up (shutdown) are dropped, the broker redelivers them.
    """

    def __init__(self, redis: "Redis", maxlen: int, name: str = "streams") -> None:
        self._redis = redis
        self._maxlen = maxlen or None
        self._name = name
        self._queue: list[tuple[str, dict[str, Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Open while Redis cannot take entries; the retried batch is the half-open probe.
        self.breaker = CircuitBreaker(1, RECONNECT_MIN, RECONNECT_MAX)
        self.appended = 0

    @property
    def down(self) -> bool:
        return not self.breaker.closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-writer")

    async def append(self, stream: str, fields: dict[str, Any]) -> Any:
        """XADD one entry; returns its id once Redis replied."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((stream, fields, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._queue[:WRITE_BATCH]
            del self._queue[:WRITE_BATCH]
            await self._write(batch)

    async def _write(self, batch: list[tuple[str, dict[str, Any], asyncio.Future[Any]]]) -> None:
        while True:
            batch = [item for item in batch if not item[2].done()]
            if not batch:
                return
            pipe = self._redis.pipeline(transaction=False)
            for stream, fields, _ in batch:
                pipe.xadd(stream, fields, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
            try:
                results = await pipe.execute(raise_on_error=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if is_transient(exc):
                    self._hold(exc, len(batch))
                    await self.breaker.admit()
                    continue
                if len(batch) > 1:
                    # Something in the batch could not even be sent (e.g. a field redis-py cannot encode):
                    # write the entries one by one, so only the culprit fails.
                    for item in batch:
                        await self._write([item])
                    return
                batch[0][2].set_exception(StreamError(f"XADD failed: {type(exc).__name__}: {exc}"))
                return
            held: list[tuple[str, dict[str, Any], asyncio.Future[Any]]] = []
            reason: BaseException | None = None
            for item, result in zip(batch, results):
                stream, _, fut = item
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    if is_transient(result):
                        held.append(item)  # e.g. OOM or READONLY: the broker keeps the message meanwhile
                        reason = result
                    else:
                        fut.set_exception(StreamError(f"XADD to stream {stream!r} failed: {result}"))
                else:
                    self.appended += 1
                    fut.set_result(result)
            if reason is None:
                if self.breaker.record_success():
                    log.warning("Redis is reachable again: appending to streams")
                return
            self._hold(reason, len(held))
            batch = held
            await self.breaker.admit()

    def _hold(self, exc: BaseException, count: int) -> None:
        """Open the breaker; log (once per outage) that MQTT acknowledgements wait until Redis takes entries again."""
        if self.breaker.record_failure():
            what = "Redis unreachable" if is_unreachable(exc) else "Redis cannot take entries now"
            log.warning("%s (%s: %s): holding %d MQTT acknowledgement(s) until it is back; retrying", what,
                        type(exc).__name__, exc, count + len(self._queue))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, _, fut in self._queue:
            if not fut.done():
                fut.cancel()
        self._queue.clear()


def stream_bridge(route: Route, services: Services) -> CallNext | None:
    """The Dispatcher's bridge (`RouteBridge`): `bridge_call` for a stream route, None for the others."""
    return None if route.stream is None else bridge_call(route, services)


def bridge_call(route: Route, services: Services) -> CallNext:
    """What the Dispatcher runs for a stream route: append the message to the route's stream."""
    stream = route.stream
    pattern = route.pattern
    extras = services.extras

    async def append(context: MessageContext) -> None:
        writer: StreamWriter | None = extras.get(WRITER_KEY)
        if writer is None:
            raise RuntimeError(no_stream_writer(route))
        await writer.append(stream, encode_entry(pattern, context, stream))  # type: ignore[arg-type]

    return append
