"""receive → match → decode → middleware → handler → response / dead letter → ack.

Runs on the event loop's thread. A delivered message's ack (QoS 1/2) is handed to the
`AckSequencer` when every route it was delivered for has finished, successfully or by
dead-lettering, so the broker redelivers whatever was still running when the process died.

Intake (`core.runtime.intake`): queued messages are run by one task, each straight through until it
finishes or has to wait; one that waits keeps that task and a new one takes the rest of the queue.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import Executor
from functools import partial
from typing import Any, Callable, Collection

from core.transport.acks import AckSequencer, AckTicket
from core.foundation.config import Settings
from core.runtime.breaker import CLOSED
from core.routing.context import MessageContext, Services
from core.foundation.error_log import ErrorLog
from core.runtime.events import record_dead_letter
from core.foundation.failures import DeadLetter, RouteTimeout, call_with_timeout, first_line  # DeadLetter: also imported from here
from core.runtime.intake import Intake
from core.routing.middleware import CallNext, build_chain
from core.runtime.ordering import TopicSequencer
from core.routing.payload import PayloadError, decode_payload
from core.runtime.retry import Retry, RouteGuard
from core.routing.router import Route, RouteTable
from core.runtime.stats import ProcessStats
from core.foundation.tracing import begin as begin_trace
from core.foundation.tracing import current as current_trace
from core.foundation.tracing import end as end_trace
from core.foundation.tracing import otel_bridge
from core.transport.wire import sanitize

log = logging.getLogger("core.dispatcher")

_perf = time.perf_counter
ERROR_BYTES = 1024  # UTF-8 bytes of the error text kept in a dead letter's user property
NAME_BYTES = 256


_GAVE_UP = object()  # a failed message was dead-lettered


class _Endpoint:
    """A route ready to run: its middleware chain and options, built once."""

    __slots__ = ("route", "chain", "timeout", "fmt", "pattern", "stats", "ordered", "guard", "breaker")

    def __init__(self, route: Route, chain: CallNext, stats: ProcessStats, guard: RouteGuard) -> None:
        self.route = route
        self.chain = chain
        self.timeout = route.timeout if route.stream is None else None  # a stream route's timeout is its consumer's
        self.fmt = route.payload_format
        self.pattern = route.pattern
        self.stats = stats.route(route.pattern)
        self.ordered = route.ordered
        self.guard = guard
        self.breaker = guard.breaker  # read per message: one attribute away


RouteBridge = Callable[[Route, Services], "CallNext | None"]
"""An integration's chain for a route it takes over (`RuntimeHook.route_bridge`), or None for the others."""


def no_stream_writer(route: Route) -> str:
    """The error of a stream route's message in a process without a stream writer."""
    return (f"{route.describe()} appends to the Redis stream {route.stream!r}, but this process has no "
            "Redis connection: set ENABLE_REDIS=true")


class Dispatcher:
    """Turns delivered MQTT messages into handler calls for one process."""

    def __init__(
        self,
        table: RouteTable,
        settings: Settings,
        services: Services,
        stats: ProcessStats,
        ack: Callable[[int, int, int], None],
        executor: Executor,
        *,
        use_subscription_ids: Callable[[], bool] = lambda: True,
        on_complete: Callable[[], None] | None = None,
        retry_scale: float = 1.0,
        bridges: Collection[RouteBridge] = (),
    ) -> None:
        self.table = table
        self._bridges = tuple(bridges)
        self.settings = settings
        self.services = services
        self.stats = stats
        self.acks = AckSequencer(ack)
        self._executor = executor
        self._use_subscription_ids = use_subscription_ids
        self._on_complete = on_complete
        self._max_payload = settings.max_payload_bytes
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._accepting = True
        self._intake = Intake(self._process, self._finished)
        self._idle: asyncio.Event | None = None
        self.completed = 0  # read by the network thread for backpressure; written here only
        self.last_message_at = 0.0
        self._is_dead_letter_topic = dead_letter_matcher(settings.dead_letter_topic)
        self._errors = ErrorLog(log, settings.error_log_interval)
        self._tracing = settings.tracing != "off"
        self._endpoints: dict[int, _Endpoint] = {}
        self._by_sub_id: list[_Endpoint | None] = [None]
        for route in table.routes:
            # The retry policy of a stream route is its consumers'; the MQTT side only appends (XADD).
            policy = route.retry if route.retry is not None and route.stream is None else Retry()
            guard = RouteGuard(route.pattern, policy, stats.route(route.pattern), self._errors, log, retry_scale)
            endpoint = _Endpoint(route, self._make_chain(route), stats, guard)
            self._endpoints[id(route)] = endpoint
            self._by_sub_id.append(endpoint)
        # Per-topic turns for ordered routes (core.runtime.ordering); None when no route is ordered.
        self.sequencer = TopicSequencer() if any(route.ordered for route in table.routes) else None
        stats.extensions["holding"] = self.holding

    # -- building ---------------------------------------------------------------------------------

    def _make_chain(self, route: Route) -> CallNext:
        chain = self._bridged(route)
        if chain is None:
            chain = build_chain(route.middleware, self._make_handler_call(route))
        otel = otel_bridge()
        return chain if otel is None else otel.traced_chain(chain, route.pattern, current_trace)

    def _bridged(self, route: Route) -> CallNext | None:
        """The chain an integration runs instead of the route's handler (the MQTT side of a stream
        route only appends to the stream; its middleware and handler run in the stream's consumers)."""
        for bridge in self._bridges:
            chain = bridge(route, self.services)
            if chain is not None:
                return chain
        if route.stream is None:
            return None

        async def no_writer(context: MessageContext) -> None:
            raise RuntimeError(no_stream_writer(route))

        return no_writer

    def _make_handler_call(self, route: Route) -> CallNext:
        return handler_call(route, self._executor)

    # -- intake (loop thread) ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._intake)

    @property
    def running(self) -> Collection[Any]:
        """The handlers in flight that are waiting for something (coroutines, to look at)."""
        return self._intake.waiting

    def submit(self, message: Any, generation: int) -> None:
        """Queue one delivered paho message; handling starts on the loop's next turn."""
        stats = self.stats
        stats.received += 1
        if not self._accepting:
            # Not acked: a QoS 1/2 message stays with the broker for the next session.
            stats.dropped_on_shutdown += 1
            self.completed += 1
            return
        ticket = self.acks.track(message.mid, message.qos, generation) if message.qos else None
        self._intake.put(message, ticket)

    def _finished(self, count: int) -> None:
        """`count` messages are done (called once per run of quick handlers, and per waiting one)."""
        self.completed += count
        self.stats.inflight = inflight = len(self._intake)
        if self._on_complete is not None:
            self._on_complete()
        if not inflight and self._idle is not None:
            self._idle.set()

    # -- processing -------------------------------------------------------------------------------

    def _resolve(self, topic: str, levels: list[str], message: Any) -> list[tuple[_Endpoint, dict[str, str]]]:
        found: list[tuple[_Endpoint, dict[str, str]]] = []
        props = message.properties
        sub_ids = getattr(props, "SubscriptionIdentifier", None) if props is not None else None
        if sub_ids and self._use_subscription_ids():
            by_id = self._by_sub_id
            for sid in sub_ids:
                endpoint = by_id[sid] if 0 < sid < len(by_id) else None
                if endpoint is not None:
                    params = endpoint.route.compiled.extract(levels)
                    # A stale subscription of an older app version may reuse an id: check the filter.
                    if params is not None:
                        found.append((endpoint, params))
            if found:
                return found
        for route in self.table.match(topic):
            params = route.compiled.extract(levels)
            if params is not None:
                found.append((self._endpoints[id(route)], params))
        return found

    async def _process(self, message: Any, ticket: AckTicket | None) -> None:
        self.last_message_at = time.monotonic()
        try:
            topic: str = message.topic
        except UnicodeDecodeError:
            topic = ""
        raw: bytes = message.payload
        turn = None
        # What this message's routes publish continues its trace (core.foundation.tracing); reset below.
        trace_token = begin_trace(message.properties) if self._tracing else None
        try:
            targets = self._resolve(topic, topic.split("/"), message) if topic else []
            if self.sequencer is not None and any(endpoint.ordered for endpoint, _ in targets):
                turn = self.sequencer.turn(topic)  # taken now, in arrival order; waited for before a slot
                await turn.wait()
            # The network thread has to keep reading while handlers wait for the PUBACKs of their
            # own publishes, so intake alone cannot bound the handlers: this does.
            async with self._slots:
                if not topic:
                    await self._dead_letter(None, "<invalid UTF-8 topic>", raw, message, "TopicError",
                                            "topic is not valid UTF-8")
                elif not targets:
                    self.stats.unrouted += 1
                    await self._dead_letter(None, topic, raw, message, "NoRoute", "no route matches this topic")
                for endpoint, params in targets:
                    await self._run(endpoint, topic, params, raw, message)
        except asyncio.CancelledError:
            raise  # shutdown gave up on this message: no ack, the broker redelivers it
        except Exception:
            # Only the dead-letter publish itself can land here (e.g. the broker refused it).
            log.exception("could not dead-letter a message on %r; acknowledging it to keep the session moving", topic)
        finally:
            if turn is not None:
                turn.release()
            if trace_token is not None:
                end_trace(trace_token)
        if ticket is not None:
            self.acks.complete(ticket)

    async def _run(self, endpoint: _Endpoint, topic: str, params: dict[str, str], raw: bytes, message: Any) -> None:
        route_stats = endpoint.stats
        if len(raw) > self._max_payload:
            await self._dead_letter(
                endpoint, topic, raw, message, "PayloadTooLarge",
                f"payload of {len(raw)} bytes exceeds MAX_PAYLOAD_BYTES={self._max_payload}",
            )
            return
        try:
            payload = decode_payload(raw, endpoint.fmt)
        except PayloadError as exc:
            log.warning("route %r: cannot decode payload on %r: %s", endpoint.pattern, topic, exc)
            await self._dead_letter(endpoint, topic, raw, message, "PayloadError", str(exc))
            return
        context = MessageContext(
            topic, params, payload, raw, message.qos, message.retain, message.dup, message.properties,
            endpoint.route, self.services,
        )
        started = _perf()
        breaker = endpoint.breaker
        if breaker.state is not CLOSED:  # its dependency is down: wait for the breaker's probe instead of calling
            result = await self._recover(endpoint, context, None, started, message)
        else:
            try:
                if endpoint.timeout is None:
                    result = await endpoint.chain(context)
                else:
                    result = await call_with_timeout(endpoint.chain, context, endpoint.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                result = await self._recover(endpoint, context, exc, started, message)
        if result is _GAVE_UP:
            return
        if breaker.failures:
            endpoint.guard.answered()
        elapsed = _perf() - started
        route_stats.handled += 1
        route_stats.seconds += elapsed
        self.stats.handled += 1
        if self.stats.observers:
            for observe in self.stats.observers:
                observe(endpoint.pattern, elapsed, "ok")
        if result is not None:
            await self._respond(context, result)

    async def _recover(self, endpoint: _Endpoint, context: MessageContext, exc: Exception | None, started: float,
                       message: Any) -> Any:
        """After a failure (or with the route's breaker open): retry per the route's policy; dead-letter if it
        gives up (returns _GAVE_UP). Raises CancelledError at shutdown, leaving the message unacknowledged."""
        outcome = await endpoint.guard.retry(partial(self._call, endpoint, context), exc, context.topic)
        error = outcome.error
        if error is None:
            return outcome.result
        pattern, topic = endpoint.pattern, context.topic
        self._observe(endpoint, _perf() - started, "timeout" if isinstance(error, RouteTimeout) else "error")
        if isinstance(error, (DeadLetter, RouteTimeout)):
            self._errors.log((pattern, "dead_letter", type(error)), logging.WARNING,
                             "route %r: message on %r dead-lettered: %s", pattern, topic, error)
        else:
            self._errors.log((pattern, "dead_letter", type(error)), logging.ERROR,
                             "route %r: handler raised on %r (attempt %d, giving up): %s", pattern, topic,
                             outcome.attempts, first_line(error), exc=error)
        error_type = "Timeout" if isinstance(error, RouteTimeout) else type(error).__name__
        await self._dead_letter(endpoint, topic, context.raw_payload, message, error_type, str(error), outcome.attempts)
        return _GAVE_UP

    async def _call(self, endpoint: _Endpoint, context: MessageContext) -> Any:
        """One more run of the route's chain (a retry), with the route's timeout."""
        if endpoint.timeout is None:
            return await endpoint.chain(context)
        return await call_with_timeout(endpoint.chain, context, endpoint.timeout)

    def holding(self) -> dict[str, dict[str, Any]]:
        """`stats.extensions["holding"]`: per route whose dependency is down, messages held and breaker state."""
        return {e.pattern: {"holding": e.guard.holding, "breaker": e.guard.breaker.state}
                for e in self._endpoints.values() if e.guard.holding or not e.guard.breaker.closed}

    def _observe(self, endpoint: _Endpoint, elapsed: float, outcome: str) -> None:
        endpoint.stats.failed += 1
        endpoint.stats.seconds += elapsed
        self.stats.failed += 1
        for observe in self.stats.observers:
            observe(endpoint.pattern, elapsed, outcome)

    async def _respond(self, context: MessageContext, result: Any) -> None:
        response_topic = context.response_topic
        if not response_topic:
            return
        properties: dict[str, Any] = {}
        correlation = context.correlation_data
        if correlation is not None:
            properties["correlation_data"] = correlation
        try:
            await self.services.publisher.publish(response_topic, result, 1 if context.qos else 0, False,
                                                  properties=properties or None)
            self.stats.responses += 1
        except Exception as exc:
            log.error("route %r: could not publish the response to %r: %s", context.route.pattern, response_topic, exc)

    async def _dead_letter(
        self, endpoint: _Endpoint | None, topic: str, raw: bytes, message: Any, error_type: str, error: str,
        attempts: int = 0,
    ) -> None:
        """Publish the message to the dead-letter topic; `attempts`: handler calls made (0: never called)."""
        self.stats.dead_lettered += 1
        if endpoint is not None:
            endpoint.stats.dead_lettered += 1
        route = endpoint.pattern if endpoint is not None else ""
        record_dead_letter(topic, route, error_type, error)
        if self._is_dead_letter_topic(topic):
            log.error("message on dead-letter topic %r failed again (%s: %s); not dead-lettering it twice", topic,
                      error_type, error)
            return
        target = self.settings.dead_letter_topic.replace("{topic}", topic.lstrip("$"))
        publisher = self.services.publisher
        qos = self.settings.dead_letter_qos
        if self.settings.mqtt_v5:
            props = {
                "user_properties": [  # error texts are often multi-line: the broker refuses control characters
                    ("error", sanitize(error, ERROR_BYTES)), ("error_type", sanitize(error_type, NAME_BYTES)),
                    ("original_topic", topic), ("route", sanitize(route, NAME_BYTES)),
                    ("worker", sanitize(self.services.worker_id, NAME_BYTES)), ("original_qos", str(message.qos)),
                    ("attempts", str(attempts)),
                ],
            }
            await publisher.publish(target, raw, qos, False, properties=props)
        else:
            envelope = dead_letter_envelope(topic, raw, error_type, error, route, self.services.worker_id)
            envelope["attempts"] = attempts
            await publisher.publish(target, envelope, qos)

    # -- shutdown ---------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._accepting = False
        held = sum(endpoint.guard.holding for endpoint in self._endpoints.values())
        if held:
            log.warning("shutdown: %d message(s) held for a down dependency are left unacknowledged (the broker "
                        "redelivers QoS 1/2 ones)", held)
        for endpoint in self._endpoints.values():
            endpoint.guard.stop()  # messages waiting to retry end now, without an ack

    async def drain(self, timeout: float) -> bool:
        """Wait for running handlers; cancel what is left after `timeout`. True if all finished."""
        if not len(self._intake):
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("shutdown: %d handler(s) still running after %.3g s; cancelling them (their messages will be "
                        "redelivered)", len(self._intake), timeout)
            self._finished(await self._intake.cancel())
            return False


def handler_call(route: Route, executor: Executor | None) -> CallNext:
    """The innermost step of a route's chain: its handler's call (`core.routing.handler.HandlerSpec.caller`)."""
    return route.handler.caller(executor)


def dead_letter_matcher(template: str) -> Callable[[str], bool]:
    """A test for "this topic is one of our dead-letter topics" (DEAD_LETTER_TOPIC, `{topic}` optional).

    A message that fails on such a topic is not dead-lettered again, or it would loop.
    """
    if "{topic}" not in template:
        return template.__eq__
    head, tail = template.split("{topic}", 1)
    tail = tail.replace("{topic}", "")  # a second placeholder is unusual; match on the first
    least = len(head) + len(tail)
    return lambda topic: len(topic) > least and topic.startswith(head) and topic.endswith(tail)


def dead_letter_envelope(topic: str, raw: bytes, error_type: str, error: str, route: str, worker: str) -> dict[str, Any]:
    """The JSON body of a dead letter on MQTT 3.1.1, which has no user properties."""
    try:
        body: str = raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(raw).decode("ascii")
        encoding = "base64"
    return {
        "original_topic": topic, "error_type": error_type, "error": error, "route": route, "worker": worker,
        "payload": body, "payload_encoding": encoding,
    }
