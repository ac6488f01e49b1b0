"""Trace context (issue 11, section 3): W3C parsing, propagation through the test client (async and
plain handlers), and OpenTelemetry spans with the SDK's in-memory exporter. End to end on
Mosquitto, Redis and SQLite: tests/integration/test_tracing.py."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from core.foundation import tracing
from core.foundation.config import ConfigError, load_settings
from core.router import Router
from core.testing import TestClient
from core.foundation.tracing import parse_traceparent, trim_tracestate
from tests.support.otel import spans  # noqa: F401  (fixture)

TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize("value, parsed", [
    (TRACEPARENT, (TRACE_ID, PARENT_ID, 1)),
    (f"00-{TRACE_ID}-{PARENT_ID}-00", (TRACE_ID, PARENT_ID, 0)),
    (f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-adds", (TRACE_ID, PARENT_ID, 1)),  # later version: more fields
    (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
    (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero trace id
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id
    (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # upper-case hex
    (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
    ("", None), ("garbage", None),
])
def test_traceparent_parsing_follows_w3c(value: str, parsed: Any) -> None:
    assert parse_traceparent(value) == parsed


def test_tracestate_over_512_characters_loses_whole_members_from_the_end() -> None:
    members = [f"v{i}=" + "x" * 60 for i in range(10)]  # 10 x 63 characters
    trimmed = trim_tracestate(",".join(members))
    assert len(trimmed) <= 512 and trimmed == ",".join(members[:8])  # 8 x 63 + 7 commas = 511
    assert trim_tracestate(" a=1,b=2 ") == "a=1,b=2"


def test_outside_a_handler_run_nothing_is_added() -> None:
    assert tracing.outgoing({"user_properties": {"a": "1"}}, "t") == ({"user_properties": {"a": "1"}}, None)


@pytest.mark.parametrize("key", ["user_properties", "UserProperty"])
def test_headers_join_the_user_properties_under_either_name(key: str) -> None:
    token = tracing.begin(None)
    try:
        out, _ = tracing.outgoing({key: [("a", "1")]}, "t")
        assert list(out) == [key] and [k for k, _ in out[key]] == ["a", "traceparent"]
        own = {key: {"traceparent": TRACEPARENT}}
        assert tracing.outgoing(own, "t") == (own, None)  # the caller's own is kept, nothing added
    finally:
        tracing.end(token)


def test_tracing_otel_is_a_checked_setting() -> None:
    assert load_settings({}).tracing == "w3c"
    assert load_settings({"TRACING": "OTEL"}).tracing == "otel"
    with pytest.raises(ConfigError, match="TRACING='zipkin' must be one of: off, w3c, otel"):
        load_settings({"TRACING": "zipkin"})


def traceparent_of(message: Any) -> tuple[str, str, int]:
    parsed = parse_traceparent(message.user_properties["traceparent"])
    assert parsed is not None, message.user_properties
    return parsed


async def test_async_and_plain_handlers_continue_the_trace_and_keep_the_callers_own() -> None:
    router = Router()

    async def relay(n: str, client: Any) -> dict[str, str]:
        await client.publish(f"out/async/{n}", "x")
        await client.publish(f"out/own/{n}", "x", properties={"user_properties": {"traceparent": TRACEPARENT}})
        return {"n": n}

    def relay_sync(n: str, client: Any) -> None:  # runs in the thread pool
        client.publish_sync(f"out/sync/{n}", "x")

    router.on("in/{n}", relay)
    router.on("sync/{n}", relay_sync)
    incoming = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    async with TestClient(router) as client:
        result = await client.publish("in/1", {}, response_topic="replies/1", user_properties=incoming)
        sync_result = await client.publish("sync/1", {}, user_properties=incoming)
        fresh = await client.publish("sync/2", {})
    by_topic = {m.topic: m for m in [*result.published, *sync_result.published, *fresh.published]}
    for topic in ("out/async/1", "replies/1", "out/sync/1"):
        trace_id, parent_id, flags = traceparent_of(by_topic[topic])
        assert (trace_id, flags) == (TRACE_ID, 1) and parent_id != PARENT_ID, topic
        assert by_topic[topic].user_properties["tracestate"] == "vendor=1"
    assert by_topic["out/own/1"].user_properties["traceparent"] == TRACEPARENT  # set by the handler: kept
    new_trace, _, flags = traceparent_of(by_topic["out/sync/2"])  # no traceparent came in: a new trace
    assert new_trace != TRACE_ID and flags == 0 and "tracestate" not in by_topic["out/sync/2"].user_properties


# -- OpenTelemetry ------------------------------------------------------------------------------------

async def test_otel_consumer_span_per_handler_run_and_producer_span_per_publish(spans: InMemorySpanExporter) -> None:
    router = Router()

    async def handle(device_id: str, client: Any) -> None:
        with otel_trace.get_tracer("app").start_as_current_span("app work"):
            await client.publish(f"out/{device_id}", "x")

    async def broken(payload: Any) -> None:
        raise ValueError("no")

    router.on("devices/{device_id}/status", handle)
    router.on("broken", broken)
    async with TestClient(router) as client:
        result = await client.publish("devices/7/status", {}, user_properties={"traceparent": TRACEPARENT})
        failed = await client.publish("broken", {})
    finished = {span.name: span for span in spans.get_finished_spans()}
    consumer = finished["process devices/{device_id}/status"]
    producer = finished["publish out/7"]
    assert consumer.kind == SpanKind.CONSUMER and producer.kind == SpanKind.PRODUCER
    assert f"{consumer.context.trace_id:032x}" == TRACE_ID
    assert f"{consumer.parent.span_id:016x}" == PARENT_ID and consumer.parent.is_remote
    assert finished["app work"].parent.span_id == consumer.context.span_id  # the run's span is current
    assert producer.parent.span_id == finished["app work"].context.span_id
    assert dict(consumer.attributes) == {
        "messaging.system": "mqtt", "messaging.operation.type": "process", "messaging.operation.name": "process",
        "messaging.destination.name": "devices/7/status", "messaging.destination.template": "devices/{device_id}/status",
        "messaging.message.body.size": 2, "messaging.client.id": "test-client",
    }
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == "out/7"
    # What went out carries the producer span's context.
    trace_id, parent_id, _ = traceparent_of(result.published[0])
    assert (trace_id, parent_id) == (TRACE_ID, f"{producer.context.span_id:016x}")
    # A failing handler: its span records the error; the dead letter's producer span is its child.
    failing = finished["process broken"]
    assert failing.status.status_code.name == "ERROR" and failing.attributes["error.type"] == "ValueError"
    assert failed.dead_letters and any(
        s.kind == SpanKind.PRODUCER and s.parent.span_id == failing.context.span_id for s in spans.get_finished_spans())
