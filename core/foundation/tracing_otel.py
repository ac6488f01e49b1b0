"""OpenTelemetry spans for TRACING=otel (imported only then; needs `opentelemetry-api`, not the SDK).

A CONSUMER span `process <route pattern>` per handler run, child of the message's `traceparent`
(a new trace without one), current while the handler runs so the app's own spans nest under it;
a PRODUCER span `publish <topic>` per publish, child of the run's span, whose context is what the
published message carries. Attributes follow the OpenTelemetry messaging semantic conventions
(`messaging.system=mqtt`, `messaging.destination.name`, `messaging.destination.template`,
`messaging.operation.type` `process`/`send`, `messaging.operation.name`, `messaging.client.id`,
`messaging.message.body.size`, `error.type` on failure).

Without a tracer provider (the API alone, no SDK) spans do not record; the W3C headers are then
made by `core.foundation.tracing` as with TRACING=w3c, so propagation never depends on the SDK.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


# What the bridge uses of `core.foundation.tracing.Trace` and of a `core.routing.context.MessageContext` (not imported:
# core.foundation.tracing loads this module, and tracing sits below the routing that defines the context).
class Trace(Protocol):
    span: Any

    def received(self) -> tuple[str | None, str | None]: ...

    def headers(self) -> list[tuple[str, str]]: ...


class MessageContext(Protocol):
    topic: str
    raw_payload: bytes


Finish = Callable[[BaseException | None], None]

SYSTEM = "mqtt"
INSTRUMENTATION = "mqtt-app"


def _no_finish(error: BaseException | None) -> None:
    return None


def _failed(span: Any, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
    span.set_attribute("error.type", type(error).__qualname__)


class OtelBridge:
    """Makes the spans; one per process (`core.foundation.tracing.configure`)."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.propagator = TraceContextTextMapPropagator()

    @property
    def tracer(self) -> Any:
        return otel_trace.get_tracer(INSTRUMENTATION)  # the provider the app set, whenever it set it

    def _parent(self, trace: "Trace") -> Any:
        if otel_trace.get_current_span().get_span_context().is_valid:
            return otel_context.get_current()  # inside the run (or a span the handler made): nest under it
        if trace.span is not None:  # after the run (its response or dead letter)
            return otel_trace.set_span_in_context(trace.span)
        return self._received(trace)

    def _received(self, trace: "Trace") -> Any:
        """The context of the message's own `traceparent` (an empty one, so a new trace, without)."""
        parent, state = trace.received()
        carrier = {"traceparent": parent, **({"tracestate": state} if state else {})} if parent else {}
        return self.propagator.extract(carrier)

    def consumer(self, trace: "Trace", pattern: str, topic: str, body_size: int) -> Any:
        attributes = {
            "messaging.system": SYSTEM, "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.destination.name": topic, "messaging.destination.template": pattern,
            "messaging.message.body.size": body_size,
        }
        if self.client_id:
            attributes["messaging.client.id"] = self.client_id
        span = self.tracer.start_span(f"process {pattern}", context=self._received(trace), kind=SpanKind.CONSUMER,
                                      attributes=attributes)
        trace.span = span
        return span

    def producer(self, trace: "Trace", destination: str) -> tuple[list[tuple[str, str]], "Finish"]:
        attributes = {"messaging.system": SYSTEM, "messaging.operation.type": "send",
                      "messaging.operation.name": "publish", "messaging.destination.name": destination}
        if self.client_id:
            attributes["messaging.client.id"] = self.client_id
        span = self.tracer.start_span(f"publish {destination}", context=self._parent(trace), kind=SpanKind.PRODUCER,
                                      attributes=attributes)
        if not span.is_recording():
            span.end()
            return trace.headers(), _no_finish
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=otel_trace.set_span_in_context(span))
        headers = [(key, carrier[key]) for key in ("traceparent", "tracestate") if carrier.get(key)]

        def finish(error: BaseException | None) -> None:
            if error is not None:
                _failed(span, error)
            span.end()

        return headers, finish

    def traced_chain(self, chain: Callable[["MessageContext"], Awaitable[Any]], pattern: str,
                     current: Callable[[], "Trace | None"]) -> Callable[["MessageContext"], Awaitable[Any]]:
        """`chain` (middleware + handler) inside a CONSUMER span that is current while it runs."""

        async def run(context: "MessageContext") -> Any:
            trace = current()
            if trace is None:
                return await chain(context)
            span = self.consumer(trace, pattern, context.topic, len(context.raw_payload))
            token = otel_context.attach(otel_trace.set_span_in_context(span))
            try:
                return await chain(context)
            except BaseException as exc:
                _failed(span, exc)
                raise
            finally:
                otel_context.detach(token)
                span.end()

        return run
