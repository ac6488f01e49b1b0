"""`TestClient`: run an app's routes in-process, without a broker, to unit-test controllers.

```python
from core.testing.client import TestClient

async def test_status_answers():
    async with TestClient(router) as client:
        result = await client.publish("devices/42/status", {"state": "on"}, response_topic="replies/1")
        assert result.responses[0].json() == {"device_id": "42", "received": True}
```

A message published here goes through the framework's own `Dispatcher` (decode, middleware,
handler, timeouts, response, dead letter, ack), the same code the runtime runs. What stands in for
the broker follows MQTT semantics:

- every route is one subscription; a topic is matched against each filter the way a broker does
  (`+`, `#`, `a/#` matching `a`, wildcards not matching `$`-topics at the first level);
- a shared route (`shared=True`) is its own `(group, filter)` subscription: a message matching a
  plain and a shared route on the same filter runs both, and overlapping shared filters each run;
- MQTT 5 (default): one copy per matching subscription, with that route's subscription
  identifier and QoS `min(published, route)`, as Mosquitto delivers; `protocol="3.1.1"`: one copy
  per message at the highest matching QoS, as the embedded broker delivers;
- what handlers publish (responses, dead letters, `context.publish`) is recorded and, like a real
  broker, delivered to the routes it matches (`loopback=False` turns that off);
- Redis Streams in memory, without Redis: a `stream=` route's message is appended to an in-memory
  stream and its handler runs as the stream consumer would run it (same arguments, middleware,
  timeout, retries, `<stream>:dlq`); a `Router.stream` route has no MQTT subscription, so only
  `feed_stream(name, payload)` reaches it.

Retries (`retries=`, `retry_backoff=`, `retry=Retry(...)`, core.runtime.retry) follow the route's policy
exactly as in production: the same classification, attempt counts and dead letters (with their
`attempts`), the same circuit breaker. Only the waits are skipped (`retry_delays=True` keeps them),
so a test does not sleep through the backoff. A message held by a transient failure (a dependency
down) is retried until it succeeds; if it still fails when `timeout` runs out, `publish()` raises
`TestClientError` naming the held route.

`publish()` returns once every handler the message (and what it caused) started has finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.properties import Properties

from core.foundation.config import Settings, load_settings
from core.routing.context import Services
from core.runtime.dispatcher import Dispatcher
from core.routing.payload import encode_payload
from core.routing.router import Route, Router, RouteTable
from core.runtime.stats import ProcessStats
from core.testing.doubles import Delivery, MemoryPublisher, MemoryStreams, Recorder, copy_properties, to_properties
from core.testing.records import (DeadLetterRecord, HandlerCall, PublishedMessage, PublishResult, StreamDeadLetter,
                                  StreamEntry, TestClientError)
from core.transport.wire import check_topic_name, publish_properties

if TYPE_CHECKING:
    from core.processes.assembly import Application

__all__ = ["TestClient", "PublishResult", "PublishedMessage", "DeadLetterRecord", "HandlerCall", "TestClientError",
           "StreamEntry", "StreamDeadLetter"]


class TestClient:
    """Runs routes in-process. Use `async with TestClient(app) as client` (or plain `with`).

    `app` is an `Application`, a `Router`, a list of routes, or a package name such as
    `"app.routers"` (every module defining `router` is loaded, as at startup).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: "Application | Router | Iterable[Route] | str",
        *,
        settings: Settings | None = None,
        env: Mapping[str, str] | None = None,
        protocol: str = "5",
        loopback: bool = True,
        timeout: float = 10.0,
        max_deliveries: int = 10_000,
        worker_id: str = "test",
        retry_delays: bool = False,
    ) -> None:
        routes, app_settings = _routes_and_settings(app)
        if settings is None:
            settings = load_settings(env) if env is not None else (app_settings or Settings())
        if protocol not in ("5", "3.1.1"):
            raise ValueError("protocol must be '5' or '3.1.1'")
        # mqtt_v5 is false for the embedded broker; name a broker so protocol="5" means MQTT 5 here.
        self.settings = settings.with_overrides(mqtt_protocol=protocol, mqtt_broker=settings.mqtt_broker or "test-client")
        self.v5 = protocol == "5"
        self.loopback = loopback
        self.timeout = timeout
        self.max_deliveries = max_deliveries
        self.retry_delays = retry_delays  # False: retries run without their backoff waits
        recorder = Recorder(self)
        self.routes: list[Route] = [dataclasses.replace(r, middleware=(recorder, *r.middleware)) for r in routes]
        self.table = RouteTable(self.routes)
        self.stats = ProcessStats()
        self.services = Services(MemoryPublisher(self), worker_id)
        self._streams = MemoryStreams(self)
        self.streams: dict[str, list[StreamEntry]] = {}  # in-memory streams: what was appended, by name
        self.stream_dead_letters: list[StreamDeadLetter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.published: list[PublishedMessage] = []
        self.dead_letters: list[DeadLetterRecord] = []
        self.acks: list[tuple[int, int]] = []  # (packet id, qos) in the order the dispatcher acknowledged
        self._calls: list[HandlerCall] = []
        self._mids = itertools.cycle(range(1, 65536))
        self._dispatcher: Dispatcher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._submitted = 0
        self._deliveries = 0
        self._overflow = False
        self._progress: asyncio.Event | None = None
        self._runner: asyncio.Runner | None = None
        self._own_redis = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> "TestClient":
        from core.integrations.rate_limit import REDIS_KEY, check_rate_limits

        from core.integrations.streams import WRITER_KEY, check_stream_routes, stream_bridge

        check_rate_limits(self.routes, self.settings)  # as at startup: a Redis rate limit needs ENABLE_REDIS
        # Streams are simulated in memory, so they need no ENABLE_REDIS; the other checks apply.
        check_stream_routes(self.routes, self.settings.with_overrides(enable_redis=True))
        self.services.extras[WRITER_KEY] = self._streams
        if self.settings.enable_redis and REDIS_KEY not in self.services.extras:
            # The process's Redis client, as the runtime has it (connects on first use): Redis rate limits.
            from core.integrations.streams import make_redis

            self.services.extras[REDIS_KEY] = make_redis(self.settings)
            self._own_redis = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._progress = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.sync_handler_threads, thread_name_prefix="test-handler")
        self._dispatcher = Dispatcher(
            self.table, self.settings, self.services, self.stats, self._ack, self._executor,
            use_subscription_ids=lambda: self.v5, on_complete=self._progress.set,
            retry_scale=1.0 if self.retry_delays else 0.0, bridges=(stream_bridge,),
        )
        return self

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.stop_accepting()
            await self._dispatcher.drain(self.timeout)
        for task in list(self._tasks):  # stream handlers still running (a publish that timed out)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_redis:
            from core.integrations.rate_limit import REDIS_KEY

            await self.services.extras.pop(REDIS_KEY).aclose()
            self._own_redis = False

    async def __aenter__(self) -> "TestClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> "TestClient":
        self._runner = asyncio.Runner()
        self._runner.run(self.start())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        try:
            self._runner.run(self.stop())
        finally:
            self._runner.close()
            self._runner = None

    # -- publishing -------------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | str | None = None,
        user_properties: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> PublishResult:
        """Publish as an outside client would and wait until everything it caused has finished."""
        if self._dispatcher is None:
            raise RuntimeError("start the client first: `async with TestClient(...) as client`")
        check_topic_name(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        if response_topic is not None:
            check_topic_name(response_topic)
        marks = (len(self._calls), len(self.published), len(self.dead_letters), len(self.stream_dead_letters))
        self._deliveries = 0
        self._overflow = False
        properties = {"response_topic": response_topic, "correlation_data": correlation_data,
                      "user_properties": user_properties}
        delivered_to = self._deliver(topic, encode_payload(payload), qos, to_properties(properties))
        await self._wait_idle(topic)
        if self._overflow:
            raise TestClientError(
                f"more than {self.max_deliveries} deliveries caused by one publish to {topic!r}: do handlers "
                "publish to topics that lead back to themselves? (or raise max_deliveries)"
            )
        return PublishResult(
            topic=topic, delivered_to=delivered_to, calls=self._calls[marks[0]:],
            published=self.published[marks[1]:], dead_letters=self.dead_letters[marks[2]:],
            response_topic=response_topic, stream_dead_letters=self.stream_dead_letters[marks[3]:],
        )

    async def feed_stream(self, stream: str, payload: Any = None, *, fields: Mapping[str, Any] | None = None
                          ) -> PublishResult:
        """Append an entry to `stream` as another system would (XADD) and wait for its consumers.

        The entry's fields are `payload` (encoded like a published payload) plus `fields`; with no
        payload and `fields` given, only those (the handler then gets them as a dict). This is how a
        `Router.stream` route is reached: it has no MQTT subscription. The result's `topic` is the
        stream name (what `context.topic` is for such entries).
        """
        if self._dispatcher is None:
            raise RuntimeError("start the client first: `async with TestClient(...) as client`")
        consumers = self._streams.consumers(stream)
        if not consumers:
            raise TestClientError(f"no route consumes the stream {stream!r} (Router.stream(...) or on(..., stream=...))")
        entry_fields: dict[str, Any] = {} if payload is None and fields else {"payload": encode_payload(payload)}
        entry_fields.update({str(k): v if isinstance(v, bytes) else str(v) for k, v in (fields or {}).items()})
        marks = (len(self._calls), len(self.published), len(self.dead_letters), len(self.stream_dead_letters))
        self._deliveries = 0
        self._overflow = False
        await self._streams.append(stream, entry_fields)
        await self._wait_idle(f"stream {stream!r}")
        return PublishResult(
            topic=stream, delivered_to=[r.pattern for r in consumers], calls=self._calls[marks[0]:],
            published=self.published[marks[1]:], dead_letters=self.dead_letters[marks[2]:],
            stream_dead_letters=self.stream_dead_letters[marks[3]:],
        )

    def feed_stream_sync(self, stream: str, payload: Any = None, **kwargs: Any) -> PublishResult:
        """`feed_stream` for plain (non-async) tests, inside `with TestClient(...) as client:`."""
        if self._runner is None:
            raise RuntimeError("feed_stream_sync() needs `with TestClient(...) as client:`; in async tests use "
                               "`await client.feed_stream(...)`")
        return self._runner.run(self.feed_stream(stream, payload, **kwargs))

    def publish_sync(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                     **kwargs: Any) -> PublishResult:
        """`publish` for plain (non-async) tests, inside `with TestClient(...) as client:`."""
        if self._runner is None:
            raise RuntimeError("publish_sync() needs `with TestClient(...) as client:`; in async tests use `await client.publish(...)`")
        return self._runner.run(self.publish(topic, payload, qos, retain, **kwargs))

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.published.clear()
        self.dead_letters.clear()
        self.acks.clear()
        self._calls.clear()
        self.streams.clear()
        self.stream_dead_letters.clear()

    @property
    def calls(self) -> list[HandlerCall]:
        return list(self._calls)

    # -- the broker stand-in ----------------------------------------------------------------------

    def _deliver(self, topic: str, payload: bytes, qos: int, properties: Properties) -> list[str]:
        """Send copies to the matching subscriptions; returns the patterns delivered to."""
        assert self._dispatcher is not None
        # `Router.stream` routes have no MQTT subscription (their `$stream/<name>` pattern is not a filter).
        matching = [(index, route) for index, route in enumerate(self.routes)
                    if route.subscribe and topic_matches_sub(route.filter, topic)]
        if not matching:
            return []
        if self._deliveries + len(matching) > self.max_deliveries:
            self._overflow = True
            return []
        self._deliveries += len(matching)
        if self.v5:
            for index, route in matching:
                copy_qos = min(qos, route.qos)
                self._submit(Delivery(topic, payload, copy_qos, self._next_mid(copy_qos),
                                       copy_properties(properties, index + 1)))
        else:
            copy_qos = min(qos, max(route.qos for _, route in matching))
            self._submit(Delivery(topic, payload, copy_qos, self._next_mid(copy_qos), None))
        return [route.pattern for _, route in matching]

    def _submit(self, delivery: Delivery) -> None:
        assert self._dispatcher is not None
        self._submitted += 1
        self._dispatcher.submit(delivery, 0)

    def _track(self, coro: Any) -> None:
        """Run work the broker stand-in started (stream consumers) so that `_wait_idle` waits for it."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if self._progress is not None:
                self._progress.set()

        task.add_done_callback(done)

    def _next_mid(self, qos: int) -> int:
        return next(self._mids) if qos else 0

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        self.acks.append((mid, qos))

    def _publish_from_app(self, topic: str, payload: bytes, qos: int, retain: bool, properties: dict[str, Any]) -> None:
        check_topic_name(topic)
        publish_properties(properties)  # what the broker would refuse raises here, as MqttClient.publish does
        message = PublishedMessage(topic, payload, qos, retain, properties)
        self.published.append(message)
        record = self._as_dead_letter(message)
        if record is not None:
            self.dead_letters.append(record)
        if self.loopback:
            self._deliver(topic, payload, qos, to_properties(
                {k: v for k, v in properties.items() if k in ("response_topic", "correlation_data", "user_properties")}))

    def _as_dead_letter(self, message: PublishedMessage) -> DeadLetterRecord | None:
        template = self.settings.dead_letter_topic
        head, marker, tail = template.partition("{topic}")
        if not marker:
            if message.topic != template:
                return None
        elif not (message.topic.startswith(head) and message.topic.endswith(tail)):
            return None
        if self.settings.mqtt_v5:
            props = message.user_properties
            if "error_type" not in props:
                return None
            return DeadLetterRecord(message.topic, props.get("original_topic", ""), props.get("route", ""),
                                    props["error_type"], props.get("error", ""), message.payload,
                                    int(props.get("attempts") or 0))
        try:
            body = message.json()
            original = body["payload"].encode() if body["payload_encoding"] == "utf-8" else _b64(body["payload"])
            return DeadLetterRecord(message.topic, body["original_topic"], body["route"], body["error_type"],
                                    body["error"], original, int(body.get("attempts") or 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    async def _wait_idle(self, topic: str) -> None:
        assert self._dispatcher is not None and self._progress is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self._dispatcher.completed < self._submitted or self._tasks:
            self._progress.clear()
            if self._dispatcher.completed >= self._submitted and not self._tasks:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                held = self._dispatcher.holding()
                if held:
                    raise TestClientError(
                        f"messages still held {self.timeout} s after publishing to {topic!r}: a transient failure "
                        f"(a dependency down) keeps them retrying on {', '.join(sorted(held))}"
                    )
                raise TestClientError(
                    f"handlers still running {self.timeout} s after publishing to {topic!r} "
                    f"({self._dispatcher.inflight + len(self._tasks)} in flight); raise TestClient(timeout=...) or "
                    "look for a hang"
                )
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _routes_and_settings(app: Any) -> tuple[list[Route], Settings | None]:
    if isinstance(app, str):
        from core.routing.discovery import discover_routers
        from core.routing.router import merge_routers

        return list(merge_routers(discover_routers(app)).routes), None
    if isinstance(app, Router):
        return list(app.routes), None
    router = getattr(app, "router", None)
    if isinstance(router, Router):
        return list(router.routes), getattr(app, "settings", None)
    routes = list(app)
    for item in routes:
        if not isinstance(item, Route):
            raise TypeError(f"TestClient takes an Application, a Router, routes or a package name, not {item!r}")
    return routes, None
