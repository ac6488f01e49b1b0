"""W3C trace context over MQTT 5 user properties, and optional OpenTelemetry spans.

Every handler run has a *trace* (`current()`), set by the dispatcher (or stream consumer) around
the run in a contextvar: continued from the message's `traceparent`/`tracestate` user properties
when it has a valid one, otherwise a new trace. Whatever the run publishes — `client.publish`, the
response, outbox rows (stored with the row, published later), stream entries, the dead letter —
carries a child `traceparent` (same trace id, new parent id) and the `tracestate` as received.

`TRACING` chooses: `w3c` (default) propagates as above; `otel` also creates OpenTelemetry spans
(a CONSUMER span per handler run, a PRODUCER span per publish, messaging semantic conventions)
through `opentelemetry-api` with whatever tracer provider the app configured; `off` does nothing.

Per message the cost without trace headers is one small object and a contextvar set/reset: the
incoming properties are read, and ids drawn, only when the run publishes something.
"""

from __future__ import annotations

import contextvars
import random
import re
from typing import Any, Callable, Iterable, Mapping

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
MODES = ("off", "w3c", "otel")
TRACESTATE_MAX = 512  # characters a propagator must forward at least; longer lists lose entries from the end

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_current: contextvars.ContextVar["Trace | None"] = contextvars.ContextVar("mqtt_trace", default=None)
_rand = random.getrandbits  # ids must be unique, not secret


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a valid W3C `traceparent`, else None.

    Version 00 must be exactly 55 characters; a later version may carry more after a '-'. Version
    ff, all-zero ids and upper-case hex are invalid.
    """
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return trace_id, parent_id, int(flags, 16)


def trim_tracestate(value: str) -> str:
    """`tracestate` kept whole up to TRACESTATE_MAX characters, else cut by whole list members from the end."""
    value = value.strip()
    if len(value) <= TRACESTATE_MAX:
        return value
    kept: list[str] = []
    size = -1
    for member in value.split(","):
        member = member.strip()
        if member and size + 1 + len(member) <= TRACESTATE_MAX:
            kept.append(member)
            size += 1 + len(member)
    return ",".join(kept)


def new_trace_id() -> str:
    return f"{_rand(128) or 1:032x}"


def new_span_id() -> str:
    return f"{_rand(64) or 1:016x}"


def incoming(pairs: Iterable[tuple[str, str]] | None) -> tuple[str | None, str | None]:
    """The `traceparent` (None if absent, repeated or invalid) and `tracestate` among user properties."""
    parents: list[str] = []
    states: list[str] = []
    for key, value in pairs or ():
        if key == TRACEPARENT:
            parents.append(value)
        elif key == TRACESTATE:
            states.append(value)
    if len(parents) != 1 or parse_traceparent(parents[0]) is None:
        return None, None  # without a valid traceparent, tracestate must not be used either
    return parents[0], (trim_tracestate(states[0] if len(states) == 1 else ",".join(states)) or None) if states else None


class Trace:
    """The trace of one handler run; the headers its publishes carry are made on first use."""

    __slots__ = ("properties", "_headers", "span", "trace_id")

    def __init__(self, properties: Any) -> None:
        self.properties = properties  # the message's MQTT properties (paho's, or a stream entry's)
        self._headers: list[tuple[str, str]] | None = None
        self.span: Any = None  # the OpenTelemetry consumer span of the run (TRACING=otel)
        self.trace_id: str | None = None

    def received(self) -> tuple[str | None, str | None]:
        props = self.properties
        return incoming(getattr(props, "UserProperty", None) if props is not None else None)

    def headers(self) -> list[tuple[str, str]]:
        """`traceparent` (child of the run: same trace id, this run's own parent id) and `tracestate`."""
        headers = self._headers
        if headers is None:
            parent, state = self.received()
            if parent is not None:  # valid, so version 00's layout: trace id at 3..35, flags at 53..55
                trace_id, sampled = parent[3:35], int(parent[53:55], 16) & 1
            else:
                trace_id, sampled, state = new_trace_id(), 0, None  # nothing recorded here: not sampled
            self.trace_id = trace_id
            headers = [(TRACEPARENT, f"00-{trace_id}-{new_span_id()}-{sampled:02x}")]
            if state:
                headers.append((TRACESTATE, state))
            self._headers = headers
        return headers


def current() -> Trace | None:
    """The trace of the handler run this code is part of (None outside handler runs)."""
    return _current.get()


def begin(properties: Any) -> contextvars.Token["Trace | None"]:
    """Start a handler run's trace in the current context; `end(token)` after the run."""
    return _current.set(Trace(properties))


end = _current.reset


def has_traceparent(pairs: Any) -> bool:
    if isinstance(pairs, Mapping):
        return TRACEPARENT in pairs
    return any(pair[0] == TRACEPARENT for pair in pairs or ())


Finish = Callable[[BaseException | None], None]


def outgoing(properties: dict[str, Any] | None, topic: str) -> tuple[dict[str, Any] | None, Finish | None]:
    """`properties` of a publish with the current trace's headers added (unless the caller set its own
    `traceparent`), and a callback ending the publish's PRODUCER span (TRACING=otel), else None."""
    trace = _current.get()
    if trace is None:
        return properties, None
    key = "UserProperty" if properties and "UserProperty" in properties else "user_properties"  # paho's name too
    user = properties.get(key) if properties else None
    if user and has_traceparent(user):
        return properties, None
    otel = _otel
    if otel is not None:
        headers, finish = otel.producer(trace, topic)
    else:
        headers, finish = trace.headers(), None
    pairs = list(user.items()) if isinstance(user, Mapping) else list(user or ())
    return {**(properties or {}), key: pairs + headers}, finish


def outgoing_now(properties: dict[str, Any] | None, topic: str) -> dict[str, Any] | None:
    """`outgoing` for a message stored or recorded now and sent later (outbox rows, the test client)."""
    properties, finish = outgoing(properties, topic)
    if finish is not None:
        finish(None)
    return properties


def outgoing_pairs(pairs: Iterable[Any] | None, destination: str) -> list[Any]:
    """User properties copied into a stream entry: the received trace headers replaced by the run's
    (with TRACING=otel, a PRODUCER span for `destination`, ended at once)."""
    trace = _current.get()
    if trace is None:
        return list(pairs or ())
    if _otel is not None:
        headers, finish = _otel.producer(trace, destination)
        finish(None)
    else:
        headers = trace.headers()
    return [p for p in pairs or () if p[0] not in (TRACEPARENT, TRACESTATE)] + [list(h) for h in headers]


# -- OpenTelemetry (TRACING=otel) ------------------------------------------------------------------

_otel: Any = None  # the OTel bridge (core.foundation.tracing_otel.OtelBridge) once configured


def configure(mode: str, client_id: str = "") -> None:
    """Apply TRACING for this process; `otel` needs `opentelemetry-api` (RuntimeError naming TRACING)."""
    global _otel
    if mode not in MODES:
        raise ValueError(f"TRACING={mode!r} must be one of: {', '.join(MODES)}")
    if mode != "otel":
        _otel = None
        return
    from core.foundation.tracing_otel import OtelBridge

    _otel = OtelBridge(client_id)


def otel_bridge() -> Any:
    """The OpenTelemetry bridge (`core.foundation.tracing_otel.OtelBridge`) with TRACING=otel, else None."""
    return _otel
