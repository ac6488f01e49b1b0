"""The stream side of stream routes: `StreamConsumer` reads a stream in the consumer group and runs the
routes' middleware and handlers, as an inline route runs them (see `core.integrations.streams`)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from core.runtime.breaker import CircuitBreaker
from core.foundation.config import Settings
from core.routing.context import MessageContext, Services
from core.runtime.dispatcher import handler_call
from core.foundation.error_log import ErrorLog
from core.foundation.failures import call_with_timeout, first_line, is_transient, is_unreachable
from core.runtime.intake import Intake
from core.routing.middleware import CallNext, build_chain
from core.routing.payload import PayloadError, decode_payload
from core.runtime.retry import BREAKER_THRESHOLD, DEAD_LETTER, HOLD_MAX, HOLD_MIN, TRANSIENT, Retry, stream_retry
from core.routing.router import Route
from core.runtime.stats import ProcessStats
from core.integrations.stream_entries import StreamDelivery, StreamMessage, decode_entry, entry_text
from core.integrations.stream_recovery import StreamRecovery
from core.integrations.stream_redis import BLOCK_MS, DLQ_SUFFIX, reconnect_delay, redis_errors
from core.foundation.tracing import begin as begin_trace
from core.foundation.tracing import current as current_trace
from core.foundation.tracing import end as end_trace
from core.foundation.tracing import otel_bridge

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("core.streams")


def _consumer_chain(route: Route, executor: Executor, otel: Any) -> CallNext:
    """Middleware and handler of a route, as an inline route runs them (in a CONSUMER span with TRACING=otel)."""
    chain = build_chain(route.middleware, handler_call(route, executor))
    return chain if otel is None else otel.traced_chain(chain, route.pattern, current_trace)


class _Endpoint:
    __slots__ = ("route", "chain", "timeout", "stats", "label", "policy")

    def __init__(self, route: Route, chain: CallNext, stats: ProcessStats, stream: str, policy: Retry) -> None:
        self.route = route
        self.chain = chain
        self.timeout = route.timeout
        self.label = f"stream:{stream}"
        self.stats = stats.route(self.label)
        self.policy = policy


@dataclass
class ConsumerCounters:
    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    held: int = 0  # failures a down dependency caused (retried without counting an attempt)


class StreamConsumer(StreamRecovery):
    """One member of the consumer group of one stream, in one process."""

    def __init__(
        self,
        redis: "Redis",
        stream: str,
        routes: Sequence[Route],
        settings: Settings,
        services: Services,
        stats: ProcessStats,
        executor: Executor,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.dlq = stream + DLQ_SUFFIX
        self.group = settings.mqtt_group_name
        # Unique per replica (the MQTT client id: `<MQTT_CLIENT_ID>`, workers `<MQTT_CLIENT_ID>-w<i>`), so pods of
        # one Deployment never share a consumer name, and so never each other's pending entries.
        self.consumer = consumer or services.worker_id
        self.services = services
        self.stats = stats
        self.batch = settings.stream_batch_size
        self.maxlen = settings.stream_maxlen or None
        default = stream_retry(settings.stream_max_retries, settings.stream_retry_delay)
        self.claim_idle_ms = settings.stream_claim_idle_ms
        self.claim_every = min(15.0, max(0.2, self.claim_idle_ms / 4000))
        self.shutdown_timeout = settings.shutdown_timeout
        self.counters = ConsumerCounters()
        otel = otel_bridge()
        self._endpoints = {
            route.pattern: _Endpoint(route, _consumer_chain(route, executor, otel), stats, stream, route.retry or default)
            for route in routes
        }
        # Deliveries after which a reclaimed entry is dead-lettered unhandled (its handlers died or hung).
        self.max_deliveries = max(e.policy.retries for e in self._endpoints.values()) + 1
        self._held = 0  # transient failures in a row (backoff of their uncounted retries)
        # Open while the handlers' dependency is down: no new entries are read; held ones retry as probes.
        self.breaker = CircuitBreaker(BREAKER_THRESHOLD, HOLD_MIN, HOLD_MAX)
        self._errors = ErrorLog(log, settings.error_log_interval)
        self._tracing = settings.tracing != "off"
        self._routes = list(routes)
        self._to_ack: list[Any] = []
        self._inflight: set[Any] = set()
        self._retries: set[asyncio.Task[None]] = set()
        self._retry_ids: set[Any] = set()  # entries waiting in _retry_later
        self._recover = False  # after a Redis failure: read back our own pending entries first
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._group_ready = False
        self._next_claim = 0.0
        self.down = False

    # -- lifecycle --

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"stream-consumer[{self.stream}]")

    async def stop(self) -> None:
        """Finish the batch in hand (up to SHUTDOWN_TIMEOUT), acknowledge it, and leave the rest pending."""
        self._stopping = True
        for task in list(self._retries):
            task.cancel()  # the entry stays pending; another consumer (or our successor) reclaims it
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.shutdown_timeout + BLOCK_MS / 1000)
            except asyncio.TimeoutError:
                log.warning("stream %r: handlers still running at shutdown; their entries stay pending and are "
                            "reclaimed after STREAM_CLAIM_IDLE_MS", self.stream)
                self._task.cancel()
            await asyncio.gather(self._task, *self._retries, return_exceptions=True)
        try:
            await self._flush_acks()
        except redis_errors() as exc:
            log.warning("stream %r: could not acknowledge %d handled entr(ies) at shutdown (%s); they will be "
                        "handled again", self.stream, len(self._to_ack), exc)

    # -- the loop --

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if not self._group_ready:
                    await self._ensure_group()
                if self._recover:
                    await self._recover_own_pending()
                    self._recover = False
                probing = not self.breaker.closed
                if probing and (self._retry_ids or not self.breaker.try_admit()):
                    # The handlers' dependency is down: take no new entries until a held one's retry succeeds
                    # (with none held, reading the next batch is the half-open probe).
                    await self._flush_acks()
                    await asyncio.sleep(0.2)
                    continue
                if time.monotonic() >= self._next_claim:
                    await self._flush_acks()  # not to reclaim what we handled already
                    self._next_claim = time.monotonic() + self.claim_every
                    await self._reclaim()
                response: Any = await self._ack_and_read()
                if self.down:
                    log.warning("stream %r: Redis is reachable again; consuming", self.stream)
                    self.down = False
                failures = 0
                for _stream, entries in response or ():
                    # Acknowledged with the next read (one round trip), or by stop().
                    await self._handle_batch([(entry_id, fields, 1) for entry_id, fields in entries], flush=False)
                if probing:
                    self.breaker.record_abandoned()  # the probe read nothing that answered: probe again
            except Exception as exc:
                from redis.exceptions import ResponseError

                self.breaker.record_abandoned()  # a probe read that failed on Redis answered nothing
                if is_transient(exc):
                    if not self.down:
                        what = "Redis unreachable" if is_unreachable(exc) else "Redis cannot serve the group now"
                        log.warning("stream %r: %s (%s: %s); retrying with backoff", self.stream, what,
                                    type(exc).__name__, exc)
                    self.down = True
                    self._recover = True
                    await asyncio.sleep(reconnect_delay(failures))
                    failures += 1
                elif isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._group_ready = False  # the stream was deleted: create it (and the group) again
                else:
                    log.exception("stream %r: consumer error; retrying in 1 s", self.stream)
                    await asyncio.sleep(1.0)

    async def _ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # From the beginning: entries appended before any consumer ever started are not skipped.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _recover_own_pending(self) -> None:
        """Handle entries Redis delivered to this consumer but whose reply was lost with the connection.

        A blocking XREADGROUP can be served just before the connection breaks (e.g. Redis shutting
        down): the entries are then pending for us although we never saw them. Reading our own
        history (id 0 instead of ">") finds them now rather than after STREAM_CLAIM_IDLE_MS.
        """
        await self._flush_acks()  # not to read back what was handled already
        start: Any = "0"
        while True:
            response: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.batch)
            entries = [entry for _stream, found in response or () for entry in found]
            if not entries:
                return
            start = entries[-1][0]
            batch = [(entry_id, fields, 1) for entry_id, fields in entries if fields and entry_id not in self._retry_ids]
            if batch:
                await self._handle_batch(batch)

    async def _ack_and_read(self) -> Any:
        """XACK what was handled and XREADGROUP the next batch, in one pipeline (one round trip)."""
        read = {self.stream: ">"}
        if not self._to_ack:
            return await self.redis.xreadgroup(self.group, self.consumer, read, count=self.batch, block=BLOCK_MS)
        ids, self._to_ack = self._to_ack, []
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xreadgroup(self.group, self.consumer, read, count=self.batch, block=BLOCK_MS)
        try:
            _, response = await pipe.execute()
        except BaseException:
            self._to_ack[:0] = ids  # acknowledged by the next flush, after Redis is back
            raise
        return response

    async def _handle_batch(self, batch: list[tuple[Any, Any, int]], *, flush: bool = True) -> None:
        # The entries run concurrently, each as if in a task of its own, but only those that wait get
        # one (core.runtime.intake): most handlers finish straight through.
        left = len(batch)
        done = asyncio.get_running_loop().create_future()

        def finished(count: int) -> None:
            nonlocal left
            left -= count
            if left <= 0 and not done.done():
                done.set_result(None)

        intake = Intake(self._handle_entry, finished)
        for entry in batch:
            intake.put(entry, None)
        try:
            await done
        except asyncio.CancelledError:
            await intake.cancel()
            raise
        if flush:
            await self._flush_acks()

    async def _handle_entry(self, entry: tuple[Any, Any, int], _: Any) -> None:
        try:
            await self._handle(*entry)
        except Exception as exc:
            # Only moving an entry to the dead-letter stream can fail here (Redis went away): the entry
            # stays pending and is reclaimed, then dead-lettered, later.
            log.warning("stream %r: could not dead-letter an entry: %s", self.stream, exc)

    async def _flush_acks(self) -> None:
        if self._to_ack:
            ids, self._to_ack = self._to_ack, []
            try:
                await self.redis.xack(self.stream, self.group, *ids)
            except BaseException:
                self._to_ack[:0] = ids  # acknowledged by the next flush, after Redis is back
                raise

    def _endpoint_for(self, message: StreamMessage) -> _Endpoint | None:
        if message.route is not None:
            endpoint = self._endpoints.get(message.route)
            if endpoint is not None:
                return endpoint
            # Bridged by a route this process does not know by that pattern (renamed?): match the topic.
            for route in self._routes:
                if route.subscribe and route.match(message.topic) is not None:
                    return self._endpoints[route.pattern]
            return None
        consumers = [r for r in self._routes if not r.subscribe]
        return self._endpoints[consumers[0].pattern] if consumers else self._endpoints[self._routes[0].pattern]

    async def _handle(self, entry_id: Any, fields: dict[Any, Any], attempt: int) -> None:
        if entry_id in self._inflight:
            return  # reclaimed while we are still on it
        self._inflight.add(entry_id)
        # What the handler publishes continues the entry's trace (set from its headers once decoded).
        trace_token = begin_trace(None) if self._tracing else None
        try:
            await self._handle_once(entry_id, fields, attempt)
        finally:
            self._inflight.discard(entry_id)
            if trace_token is not None:
                end_trace(trace_token)

    async def _handle_once(self, entry_id: Any, fields: dict[Any, Any], attempt: int) -> None:
        endpoint: _Endpoint | None = None
        try:
            message = decode_entry(self.stream, fields)
            endpoint = self._endpoint_for(message)
            if endpoint is None:
                raise LookupError(f"no route of stream {self.stream!r} in this process matches route "
                                  f"{message.route!r} / topic {message.topic!r}")
            payload = decode_payload(message.raw, endpoint.route.payload_format)
        except (PayloadError, LookupError) as exc:
            log.error("stream %r: entry %s cannot be handled: %s", self.stream, entry_text(entry_id), exc)
            await self._dead_letter(entry_id, fields, attempt, exc, endpoint)
            return
        context = MessageContext(
            message.topic, message.params, payload, message.raw, message.qos, message.retain, attempt > 1,
            message.properties, endpoint.route, self.services,
        )
        trace = current_trace()
        if trace is not None:
            trace.properties = message.properties
        context.state["stream"] = StreamDelivery(self.stream, entry_text(entry_id), attempt)
        started = time.perf_counter()
        try:
            if endpoint.timeout is None:
                result = await endpoint.chain(context)
            else:
                result = await call_with_timeout(endpoint.chain, context, endpoint.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._observe(endpoint, time.perf_counter() - started, "error")
            self.counters.failed += 1
            policy = endpoint.policy
            kind = policy.classify(exc)
            if kind == TRANSIENT:
                # A dependency is down: retried without counting the attempt (it is never dead-lettered for it).
                self.counters.held += 1
                if self.breaker.record_failure():
                    log.warning("stream %r: %s; reading no new entries until it answers", self.stream,
                                first_line(exc))
                delay = self.breaker.delay(self._held)
                self._held += 1
                self._errors.log((self.stream, TRANSIENT, type(exc)), logging.WARNING,
                                 "stream %r: entry %s hit a down dependency (%s); retrying in %.3g s", self.stream,
                                 entry_text(entry_id), first_line(exc), delay, exc=exc)
                self._retry_later(entry_id, fields, attempt, delay, counted=False)
                return
            self._answered()
            if kind == DEAD_LETTER or attempt > policy.retries:
                self._errors.log((self.stream, DEAD_LETTER, type(exc)), logging.ERROR,
                                 "stream %r: entry %s failed (attempt %d): %s; moving it to %r", self.stream,
                                 entry_text(entry_id), attempt, first_line(exc), self.dlq, exc=exc)
                await self._dead_letter(entry_id, fields, attempt, exc, endpoint)
            else:
                delay = policy.delay(attempt)
                self._errors.log((self.stream, "retry", type(exc)), logging.WARNING,
                                 "stream %r: entry %s failed (attempt %d of %d): %s; retrying in %.3g s", self.stream,
                                 entry_text(entry_id), attempt, policy.retries + 1, first_line(exc), delay)
                self._retry_later(entry_id, fields, attempt, delay, counted=True)
            return
        self._answered()
        self._observe(endpoint, time.perf_counter() - started, "ok")
        self.counters.handled += 1
        if result is not None and context.response_topic:
            await self._respond(context, result)
        self._to_ack.append(entry_id)

    def _observe(self, endpoint: _Endpoint, elapsed: float, outcome: str) -> None:
        stats = endpoint.stats
        if outcome == "ok":
            stats.handled += 1
        else:
            stats.failed += 1
        stats.seconds += elapsed
        for observe in self.stats.observers:
            observe(endpoint.label, elapsed, outcome)

    async def _respond(self, context: MessageContext, result: Any) -> None:
        properties = {"correlation_data": context.correlation_data} if context.correlation_data is not None else None
        try:
            await self.services.publisher.publish(context.response_topic, result, 1 if context.qos else 0, False,  # type: ignore[arg-type]
                                                  properties=properties)
        except Exception as exc:
            log.error("stream %r: could not publish the response to %r: %s", self.stream, context.response_topic, exc)

    def _answered(self) -> None:
        """A handler ran without a transient failure: its dependency answers."""
        self._held = 0
        if self.breaker.failures and self.breaker.record_success():
            log.warning("stream %r: the handlers' dependency answers again; consuming", self.stream)
