"""Redis Streams: MQTT messages handed to a stream, consumer groups with retries and dead letters.

A stream route (`router.on("orders/{id}/placed", handler, stream="orders")`) has two halves:

- MQTT side (`bridge_call`, run by the Dispatcher in place of the handler): the message is
  appended to the stream by the process's `StreamWriter` (XADD with approximate MAXLEN,
  pipelined with whatever else is waiting). The Dispatcher acknowledges the MQTT message only
  after the XADD reply, so while Redis is away nothing is acknowledged and the broker keeps it.
- Stream side (`StreamConsumer`, one per stream in every process that serves the route): a
  consumer group (`MQTT_GROUP_NAME`, consumer = the process's MQTT client id, unique per replica) reads entries, runs the route's
  middleware and handler with the same arguments as an inline route, and XACKs after success.
  A failing entry is retried after `STREAM_RETRY_DELAY` (re-claimed with XCLAIM, which counts the
  delivery) up to `STREAM_MAX_RETRIES` times, then moved to `<stream>:dlq` and acknowledged.
  Entries left pending by a dead or hung consumer are taken over with XAUTOCLAIM once idle for
  `STREAM_CLAIM_IDLE_MS`.

`Router.stream(name, handler)` declares a consumer of a stream written by other systems: there is
no MQTT side, and the handler gets the entry's `payload` field (or all its fields as a dict).
Delivery is at least once: a handler may see an entry again after a crash or a Redis failover.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from core.backoff import backoff_delay
from core.breaker import CircuitBreaker
from core.config import Settings
from core.context import MessageContext, Services
from core.dispatcher import handler_call, no_stream_writer  # the handler is called as on an inline route
from core.error_log import ErrorLog
from core.failures import call_with_timeout, first_line, is_transient, is_unreachable
from core.intake import Intake
from core.middleware import CallNext, build_chain
from core.payload import PayloadError, decode_payload
from core.retry import BREAKER_THRESHOLD, DEAD_LETTER, HOLD_MAX, HOLD_MIN, TRANSIENT, Retry, stream_retry
from core.router import Route, RouteError
from core.stats import ProcessStats
from core.tracing import begin as begin_trace
from core.tracing import current as current_trace
from core.tracing import end as end_trace
from core.tracing import TRACEPARENT, TRACESTATE, otel_bridge, outgoing_pairs

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.runtime import Runtime

log = logging.getLogger("core.streams")

REDIS_KEY = "redis"
"""`Services.extras[REDIS_KEY]`: the process's `redis.asyncio.Redis` client (when ENABLE_REDIS)."""
WRITER_KEY = "stream_writer"
"""`Services.extras[WRITER_KEY]`: the process's `StreamWriter`."""

DLQ_SUFFIX = ":dlq"
BLOCK_MS = 1000  # one XREADGROUP waits this long for entries; bounds how long a stop takes
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0
WRITE_BATCH = 500  # XADDs per pipeline


class StreamError(RuntimeError):
    """Redis refused to store this entry for a reason that retrying will not fix (e.g. WRONGTYPE)."""


def redis_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "Redis is not reachable right now" (retried with backoff, never fatal)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


def make_redis(settings: Settings) -> "Redis":
    """One client (with its connection pool) per process; built after the process started."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry as RedisRetry
    from redis.backoff import NoBackoff

    # One immediate retry replaces a pooled connection that died with a Redis restart; longer
    # outages are handled (and logged) by the callers' own backoff.
    return Redis.from_url(settings.redis_url, socket_timeout=BLOCK_MS / 1000 + 10, socket_connect_timeout=5,
                          retry=RedisRetry(NoBackoff(), 1), health_check_interval=30)


def _reconnect_delay(failures: int) -> float:
    return backoff_delay(failures, RECONNECT_MIN, RECONNECT_MAX, random.random)


# -- the entry format ---------------------------------------------------------------------------


def encode_entry(pattern: str, context: MessageContext, stream: str = "") -> dict[str, Any]:
    """The stream fields of one MQTT message: topic, params, payload, headers, route.

    The user properties are copied, with the trace headers of the current run (`core.tracing`) in
    place of the received ones, so the stream's handler continues the trace.
    """
    headers: dict[str, Any] = {"qos": context.qos, "retain": context.retain}
    props = context.properties
    user = outgoing_pairs(getattr(props, "UserProperty", None) if props is not None else None, stream)
    if user:
        headers["user_properties"] = [list(pair) for pair in user]
    if props is not None:
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic:
            headers["response_topic"] = response_topic
        correlation = getattr(props, "CorrelationData", None)
        if correlation is not None:
            headers["correlation_data"] = base64.b64encode(correlation).decode("ascii")
        content_type = getattr(props, "ContentType", None)
        if content_type:
            headers["content_type"] = content_type
    return {
        "topic": context.topic,
        "params": json.dumps(context.params, separators=(",", ":")),
        "payload": context.raw_payload,
        "headers": json.dumps(headers, separators=(",", ":")),
        "route": pattern,
    }


class StreamProperties:
    """The MQTT properties a bridged message carried, as `MessageContext.properties` expects them."""

    __slots__ = ("ResponseTopic", "CorrelationData", "UserProperty", "ContentType")

    def __init__(self, headers: dict[str, Any]) -> None:
        self.ResponseTopic: str | None = headers.get("response_topic")
        correlation = headers.get("correlation_data")
        self.CorrelationData: bytes | None = base64.b64decode(correlation) if correlation is not None else None
        self.UserProperty: list[tuple[str, str]] = [tuple(p) for p in headers.get("user_properties", ())]  # type: ignore[misc]
        self.ContentType: str | None = headers.get("content_type")


@dataclass(frozen=True)
class StreamMessage:
    """A stream entry, decoded: what a handler's context is built from."""

    topic: str
    params: dict[str, str]
    raw: bytes
    qos: int
    retain: bool
    properties: StreamProperties | None
    route: str | None  # pattern of the route that bridged it; None for entries written by others


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_entry(stream: str, fields: dict[Any, Any]) -> StreamMessage:
    """Decode the fields of an entry (bytes keys and values, as redis-py returns them)."""
    data = {_text(k): v for k, v in fields.items()}
    if "route" in data and "topic" in data:
        try:
            headers = json.loads(data.get("headers") or b"{}")
            params = json.loads(data.get("params") or b"{}")
        except ValueError as exc:
            raise PayloadError(f"entry has malformed params/headers: {exc}") from None
        raw = data.get("payload", b"")
        return StreamMessage(
            topic=_text(data["topic"]), params={str(k): str(v) for k, v in params.items()},
            raw=raw if isinstance(raw, bytes) else str(raw).encode(), qos=int(headers.get("qos", 0)),
            retain=bool(headers.get("retain", False)), properties=StreamProperties(headers), route=_text(data["route"]),
        )
    # Written by another system: its `payload` field, or all its fields as a JSON object.
    if "payload" in data:
        raw = data["payload"]
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
    else:
        raw = json.dumps({k: _text(v) for k, v in data.items()}).encode()
    # `traceparent`/`tracestate` fields (the outbox's `tx.publish_stream` writes them) continue the trace.
    trace = [[key, _text(data[key])] for key in (TRACEPARENT, TRACESTATE) if key in data]
    return StreamMessage(stream, {}, raw, 0, False, StreamProperties({"user_properties": trace}) if trace else None, None)


@dataclass(frozen=True)
class StreamDelivery:
    """`context.state["stream"]` in a handler run by a stream consumer."""

    stream: str
    entry_id: str
    attempt: int  # 1 for the first delivery


# -- checks at startup --------------------------------------------------------------------------


def check_stream_routes(routes: Iterable[Route], settings: Settings) -> None:
    """RouteError naming the route if a stream route cannot work with these settings."""
    by_stream: dict[str, Route] = {}
    for route in routes:
        if route.stream is None:
            continue
        if not isinstance(route.stream, str) or not route.stream.strip() or route.stream.endswith(DLQ_SUFFIX):
            raise RouteError(f"{route.describe()}: stream={route.stream!r} must be a non-empty name not ending in "
                             f"{DLQ_SUFFIX!r} (that suffix is the dead-letter stream)")
        if not settings.enable_redis:
            raise RouteError(
                f"{route.describe()} uses the Redis stream {route.stream!r}, but Redis is disabled: set "
                f"ENABLE_REDIS=true (and REDIS_URL, default {Settings.redis_url}), or remove stream= from the route"
            )
        other = by_stream.setdefault(route.stream, route)
        if other.shared != route.shared:
            raise RouteError(
                f"{route.describe()} and {other.describe()} share the stream {route.stream!r} but not shared=: "
                "one consumer group serves a stream, so its routes must all run in the workers or all in the main process"
            )


# -- MQTT side: appending -----------------------------------------------------------------------


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


# -- stream side: consuming ---------------------------------------------------------------------


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


class StreamConsumer:
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
                    await asyncio.sleep(_reconnect_delay(failures))
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
        # one (core.intake): most handlers finish straight through.
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
            log.error("stream %r: entry %s cannot be handled: %s", self.stream, _text(entry_id), exc)
            await self._dead_letter(entry_id, fields, attempt, exc, endpoint)
            return
        context = MessageContext(
            message.topic, message.params, payload, message.raw, message.qos, message.retain, attempt > 1,
            message.properties, endpoint.route, self.services,
        )
        trace = current_trace()
        if trace is not None:
            trace.properties = message.properties
        context.state["stream"] = StreamDelivery(self.stream, _text(entry_id), attempt)
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
                                 _text(entry_id), first_line(exc), delay, exc=exc)
                self._retry_later(entry_id, fields, attempt, delay, counted=False)
                return
            self._answered()
            if kind == DEAD_LETTER or attempt > policy.retries:
                self._errors.log((self.stream, DEAD_LETTER, type(exc)), logging.ERROR,
                                 "stream %r: entry %s failed (attempt %d): %s; moving it to %r", self.stream,
                                 _text(entry_id), attempt, first_line(exc), self.dlq, exc=exc)
                await self._dead_letter(entry_id, fields, attempt, exc, endpoint)
            else:
                delay = policy.delay(attempt)
                self._errors.log((self.stream, "retry", type(exc)), logging.WARNING,
                                 "stream %r: entry %s failed (attempt %d of %d): %s; retrying in %.3g s", self.stream,
                                 _text(entry_id), attempt, policy.retries + 1, first_line(exc), delay)
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
                await asyncio.sleep(_reconnect_delay(failures))
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

    def _endpoint_of(self, fields: dict[Any, Any]) -> _Endpoint | None:
        try:
            return self._endpoint_for(decode_entry(self.stream, fields))
        except PayloadError:
            return None

    async def _dead_letter(self, entry_id: Any, fields: dict[Any, Any], attempts: int, error: BaseException,
                           endpoint: _Endpoint | None) -> None:
        """Move the entry to `<stream>:dlq` with the error and attempt count, and acknowledge it (atomically).

        Counted for the process and, when the entry's route is known, for the route (`stream:<name>`).
        """
        entry: dict[Any, Any] = {
            "error": f"{type(error).__name__}: {error}"[:4096],
            "error_type": type(error).__name__,
            "attempts": str(attempts),
            "original_stream": self.stream,
            "original_id": _text(entry_id),
            "consumer": self.consumer,
            "failed_at": str(int(time.time() * 1000)),
        }
        for key, value in fields.items():
            entry[f"entry.{_text(key)}"] = value
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
    return {_text(k)[len(prefix):]: v for k, v in dlq_fields.items() if _text(k).startswith(prefix)}


# -- the hook ------------------------------------------------------------------------------------


class StreamsHook:
    """RuntimeHook (ENABLE_REDIS): the Redis client, the writer and the consumers of one process."""

    route_bridge = staticmethod(stream_bridge)  # the runtime's dispatcher appends stream routes' messages

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.redis: "Redis | None" = None
        self.writer: StreamWriter | None = None
        self.consumers: list[StreamConsumer] = []
        self._backlog_task: asyncio.Task[None] | None = None

    async def start(self, runtime: "Runtime") -> None:
        self.redis = make_redis(self.settings)
        self.writer = StreamWriter(self.redis, self.settings.stream_maxlen, f"streams[{self.worker_id}]")
        self.writer.start()
        extras = runtime.services.extras
        extras[REDIS_KEY] = self.redis
        extras[WRITER_KEY] = self.writer
        by_stream: dict[str, list[Route]] = defaultdict(list)
        for route in runtime.table.routes:
            if route.stream is not None:
                by_stream[route.stream].append(route)
        for stream, routes in by_stream.items():
            if not consumes(runtime, routes):
                continue
            consumer = StreamConsumer(self.redis, stream, routes, self.settings, runtime.services, runtime.stats,
                                      runtime.executor, consumer=runtime.client_id)
            consumer.start()
            self.consumers.append(consumer)
        if self.consumers:
            log.info("consuming stream(s) %s as %r in group %r", ", ".join(c.stream for c in self.consumers),
                     runtime.client_id, self.settings.mqtt_group_name)
        runtime.stats.extensions["streams"] = self.snapshot
        if self.consumers and self.settings.http_port is not None:  # only the ops server shows backlogs
            from core.process_metrics import start_backlog

            self._backlog_task = start_backlog(runtime.stats, "streams", self.backlog)

    def snapshot(self) -> dict[str, Any]:
        return {c.stream: vars(c.counters).copy() for c in self.consumers}

    async def backlog(self) -> dict[str, float]:
        """Per consumed stream: `stream:<name>` (entries not yet acknowledged by the group: lag + pending),
        `stream:<name>:pending` (delivered, not acknowledged) and `stream:<name>:dlq` (length of `<name>:dlq`)."""
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for consumer in self.consumers:
            pipe.xinfo_groups(consumer.stream)
            pipe.xlen(consumer.dlq)
        replies = await pipe.execute(raise_on_error=False)
        out: dict[str, float] = {}
        for index, consumer in enumerate(self.consumers):
            groups, dlq = replies[2 * index], replies[2 * index + 1]
            if isinstance(groups, Exception) or isinstance(dlq, Exception):
                continue  # e.g. the stream does not exist (yet)
            for group in groups:
                if _text(group.get("name", b"")) != consumer.group:
                    continue
                pending = int(group.get("pending") or 0)
                lag = group.get("lag")  # None when Redis cannot tell (entries deleted in the middle); pre-7.0: absent
                out[f"stream:{consumer.stream}"] = pending + (int(lag) if lag is not None else 0)
                out[f"stream:{consumer.stream}:pending"] = pending
                out[f"stream:{consumer.stream}:dlq"] = int(dlq)
        return out

    async def stop(self, runtime: "Runtime") -> None:
        if self._backlog_task is not None:
            self._backlog_task.cancel()
            await asyncio.gather(self._backlog_task, return_exceptions=True)
        await asyncio.gather(*(consumer.stop() for consumer in self.consumers), return_exceptions=True)
        if self.writer is not None:
            await self.writer.stop()
        if self.redis is not None:
            await self.redis.aclose()
        runtime.services.extras.pop(WRITER_KEY, None)
        runtime.services.extras.pop(REDIS_KEY, None)


def consumes(runtime: "Runtime", routes: Sequence[Route]) -> bool:
    """Whether this process joins the consumer group of a stream with these routes.

    It does when it subscribes to one of the stream's routes on MQTT or the stream has
    consumer-only routes (`Router.stream`). A runtime that only drains a parked session (no
    subscriptions of its own) bridges what it receives but does not consume.
    """
    if any(not route.subscribe for route in routes):
        return True
    group = runtime.settings.mqtt_group_name
    subscribed = {sub.topic for sub in runtime.client.subscriptions}
    return any(route.subscription_topic(group) in subscribed for route in routes)


def streams_hooks(settings: Settings, worker_id: str) -> list[StreamsHook]:
    """Hook factory for `Application.hook_factories`."""
    return [StreamsHook(settings, worker_id)]
