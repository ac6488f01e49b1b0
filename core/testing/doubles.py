"""What stands in for the broker and Redis under `core.testing.client.TestClient`: deliveries shaped like paho's,
the handlers' publisher, the recording middleware and Redis Streams in memory.

Each takes the `TestClient` (`client: Any`: that module imports this one) and records into it."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, Mapping

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.routing.context import MessageContext
from core.foundation.failures import call_with_timeout
from core.routing.middleware import CallNext, build_chain
from core.routing.payload import PayloadError, decode_payload, encode_payload
from core.routing.router import Route
from core.testing.records import HandlerCall, StreamDeadLetter, StreamEntry
from core.foundation.tracing import outgoing_now as outgoing_trace
from core.transport.wire import publish_properties


class Delivery:
    """A delivered copy, shaped like the paho message the dispatcher reads."""

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "mid", "properties")

    def __init__(self, topic: str, payload: bytes, qos: int, mid: int, properties: Properties | None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = False  # live deliveries carry retain=0 (no Retain As Published)
        self.dup = False
        self.mid = mid
        self.properties = properties


_FORWARDED = ("ResponseTopic", "CorrelationData", "UserProperty", "ContentType", "PayloadFormatIndicator",
              "MessageExpiryInterval")


def to_properties(properties: Mapping[str, Any] | None) -> Properties:
    return publish_properties(properties or {})


def copy_properties(source: Properties, subscription_id: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name in _FORWARDED:
        value = getattr(source, name, None)
        if value not in (None, []):
            setattr(props, name, value)
    props.SubscriptionIdentifier = [subscription_id]
    return props


class Recorder:
    """Outermost middleware of every route under test: records each chain run and its outcome."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        payload = context.payload
        try:
            result = await call_next(context)
        except BaseException as exc:
            self._client._calls.append(HandlerCall(context.route.pattern, context.topic, dict(context.params), payload,
                                                   None, exc))
            raise
        self._client._calls.append(HandlerCall(context.route.pattern, context.topic, dict(context.params), payload,
                                               result))
        return result


class MemoryPublisher:
    """Stands in for `MqttClient` as the handlers' publisher: records, then delivers like a broker."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: dict[str, Any] | None = None) -> None:
        if self._client.settings.mqtt_v5:  # as MqttClient: a handler's publishes carry its trace context
            properties = outgoing_trace(properties, topic)
        self._client._publish_from_app(topic, encode_payload(payload), qos, retain, dict(properties or {}))

    def publish_sync(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                     properties: dict[str, Any] | None = None, timeout: float | None = 30.0) -> None:
        loop = self._client._loop
        assert loop is not None
        if threading.get_ident() == self._client._loop_thread:
            raise RuntimeError("publish_sync() would block the event loop; use `await client.publish(...)` here")
        if self._client.settings.mqtt_v5:  # the handler's trace lives in this thread's context
            properties = outgoing_trace(properties, topic)
        coro = self.publish(topic, payload, qos, retain, properties=properties)
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class MemoryStreams:
    """Stands in for the StreamWriter and the stream consumers: Redis Streams in this process's memory.

    An appended entry is handled at once by the routes of its stream, the way `StreamConsumer` runs
    them (decoded entry, same handler arguments, middleware, the route's timeout, up to
    STREAM_MAX_RETRIES retries, then `<stream>:dlq`), except that retries do not wait
    STREAM_RETRY_DELAY.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._ids = itertools.count(1)
        self._chains: dict[int, CallNext] = {}

    def consumers(self, stream: str) -> list[Route]:
        return [r for r in self._client.routes if r.stream == stream]

    async def append(self, stream: str, fields: dict[str, Any]) -> str:
        """What `bridge_call` awaits: "XADD", then consume in the background (the MQTT ack does not wait)."""
        entry = StreamEntry(stream, f"{next(self._ids)}-0", dict(fields))
        self._client.streams.setdefault(stream, []).append(entry)
        self._client._track(self._consume(entry))
        return entry.id

    def _endpoint(self, routes: list[Route], route_pattern: str | None, topic: str) -> Route | None:
        # As StreamConsumer._endpoint_for: the bridging route by pattern, else by topic; external entries
        # go to the `Router.stream` consumer, else to the stream's first route.
        if route_pattern is not None:
            for route in routes:
                if route.pattern == route_pattern:
                    return route
            for route in routes:
                if route.subscribe and route.match(topic) is not None:
                    return route
            return None
        external = [r for r in routes if not r.subscribe]
        return (external or routes)[0]

    def _chain(self, route: Route) -> CallNext:
        chain = self._chains.get(id(route))
        if chain is None:
            from core.integrations.streams import handler_call

            assert self._client._executor is not None
            chain = self._chains[id(route)] = build_chain(route.middleware, handler_call(route, self._client._executor))
        return chain

    async def _call(self, route: Route, context: MessageContext) -> Any:
        chain = self._chain(route)
        if route.timeout is None:
            return await chain(context)
        return await call_with_timeout(chain, context, route.timeout)

    async def _consume(self, entry: StreamEntry) -> None:
        from core.integrations.streams import StreamDelivery, decode_entry

        from core.runtime.retry import DEAD_LETTER, TRANSIENT, stream_retry

        client = self._client
        routes = self.consumers(entry.stream)
        default = stream_retry(client.settings.stream_max_retries, client.settings.stream_retry_delay)
        route: Route | None = None
        attempt = 1
        while True:
            try:
                message = decode_entry(entry.stream, dict(entry.fields))
                route = self._endpoint(routes, message.route, message.topic)
                if route is None:
                    raise LookupError(f"no route of stream {entry.stream!r} matches route {message.route!r} / "
                                      f"topic {message.topic!r}")
                payload = decode_payload(message.raw, route.payload_format)
            except (PayloadError, LookupError) as exc:
                self._dead_letter(entry, route, attempt, exc)
                return
            context = MessageContext(message.topic, message.params, payload, message.raw, message.qos,
                                     message.retain, attempt > 1, message.properties, route, client.services)
            context.state["stream"] = StreamDelivery(entry.stream, entry.id, attempt)
            try:
                result = await self._call(route, context)
            except Exception as exc:
                policy = route.retry or default
                kind = policy.classify(exc)
                if kind == TRANSIENT:  # held: retried without counting an attempt, as StreamConsumer does
                    await asyncio.sleep(0.1 if client.retry_delays else 0.001)
                    continue
                if kind == DEAD_LETTER or attempt > policy.retries:
                    self._dead_letter(entry, route, attempt, exc)
                    return
                if client.retry_delays:
                    await asyncio.sleep(policy.delay(attempt))
                attempt += 1
                continue
            if result is not None and context.response_topic:
                properties = {"correlation_data": context.correlation_data} if context.correlation_data is not None else None
                await client.services.publisher.publish(context.response_topic, result, 1 if context.qos else 0, False,
                                                        properties=properties)
            return

    def _dead_letter(self, entry: StreamEntry, route: Route | None, attempts: int, error: BaseException) -> None:
        from core.integrations.streams import DLQ_SUFFIX

        self._client.stream_dead_letters.append(StreamDeadLetter(
            entry.stream + DLQ_SUFFIX, entry.stream, entry.id, route.pattern if route is not None else "",
            type(error).__name__, f"{type(error).__name__}: {error}", attempts, entry.fields,
        ))
