"""Trace context end to end (issue 11, section 3) on a private Mosquitto, a private Redis and SQLite.

One message runs three routes (Mosquitto sends a copy per subscription): the first publishes,
writes an outbox row and answers on the response topic; the second appends the message to a Redis
stream, whose handler publishes; the third raises, so the message is dead-lettered. Everything that
comes out must carry a valid `traceparent` with the message's trace id (without one, a new trace per
handler run) and a parent id of its own, and the message's `tracestate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.router import Router
from core.foundation.tracing import parse_traceparent
from tests.support.otel import spans  # noqa: F401  (fixture)
from tests.support.rt_probe import Probe
from tests.support.rt_wait import wait_until
from tests.support.servers import MosquittoServer, RedisServer

pytestmark = pytest.mark.timeout(90)

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT, TRACESTATE = f"00-{TRACE_ID}-{PARENT_ID}-01", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


def traced_router(u: str) -> Router:
    async def handle(n: str, client: Any, context: Any) -> dict[str, Any]:
        await client.publish(f"{u}/out/published/{n}", {"n": n}, qos=1)
        async with context.transaction() as tx:
            tx.publish(f"{u}/out/outbox/{n}", {"n": n})
        return {"answer": n}

    async def from_stream(n: str, client: Any) -> None:
        await client.publish(f"{u}/out/from-stream/{n}", {"n": n}, qos=1)

    async def fail(payload: Any) -> None:
        raise ValueError("this route always fails")

    router = Router()
    router.on(f"{u}/in/{{n}}", handle, qos=1)
    router.on(f"{u}/+/{{n}}", from_stream, qos=1, stream=f"traced-{u}")
    router.on(f"{u}/in/#", fail, qos=1)
    return router


async def start(settings: Any, router: Router, mosquitto: MosquittoServer, u: str) -> tuple[Any, Probe]:
    """A started, subscribed runtime with the settings' features, and a probe client."""
    app = Application.load(settings, router)
    runtime = app.make_runtime(app.routes)
    await runtime.start()
    probe = await Probe(mosquitto.host, mosquitto.port, f"{u}-probe").connect()
    assert await runtime.wait_ready(20)
    return runtime, probe


def check_child(received: str | None, trace_id: str | None, parent_id: str | None, what: str) -> str:
    """A valid traceparent of the expected trace (any, if None) whose parent id is not the message's own."""
    assert received is not None, f"{what}: no traceparent"
    parsed = parse_traceparent(received)
    assert parsed is not None and received.startswith("00-") and len(received) == 55, f"{what}: invalid {received!r}"
    if trace_id is not None:
        assert parsed[0] == trace_id, f"{what}: trace id {parsed[0]} is not the message's {trace_id}"
    if parent_id is not None:
        assert parsed[1] != parent_id, f"{what}: parent id not renewed"
    return parsed[0]


@pytest.mark.parametrize("incoming", [True, False], ids=["with-traceparent", "without"])
async def test_the_trace_continues_into_everything_a_message_causes(
        incoming: bool, mosquitto: MosquittoServer, redis_server: RedisServer, redis_client: redis.Redis,
        unique_id: str, tmp_path: Path) -> None:
    u = unique_id
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": u,
        "MQTT_GROUP_NAME": f"g{u}", "ENABLE_REDIS": "true", "REDIS_URL": redis_server.url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", "OUTBOX_TICK_INTERVAL": "0.2",
        "SHUTDOWN_TIMEOUT": "5",
    })
    runtime, probe = await start(settings, traced_router(u), mosquitto, u)
    try:
        await probe.subscribe(f"{u}/out/#")
        await probe.subscribe(f"dead-letter/{u}/#")
        user = [("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)] if incoming else [("tenant", "acme")]
        probe_publish(probe, f"{u}/in/7", {"n": 7}, user, response_topic=f"{u}/out/response/7")
        kinds = ("published", "outbox", "response", "from-stream")
        await wait_until(lambda: all(probe.on(f"{u}/out/{k}") for k in kinds) and probe.on(f"dead-letter/{u}/"),
                         "a publish, an outbox message, a response, the stream handler's publish and a dead letter")
        out = {k: probe.on(f"{u}/out/{k}")[0] for k in kinds}
        out["dead letter"] = probe.on(f"dead-letter/{u}/")[0]
        assert out["dead letter"].user_properties["error"] == "this route always fails"
        trace_id = TRACE_ID if incoming else None
        parent_id = PARENT_ID if incoming else None
        traces = {k: check_child(m.user_properties.get("traceparent"), trace_id, parent_id, k) for k, m in out.items()}
        # Mosquitto delivers a copy per route (subscription): without a traceparent each copy starts its trace,
        # and everything one route's run causes shares it.
        assert traces["published"] == traces["outbox"] == traces["response"], traces
        if incoming:
            assert set(traces.values()) == {TRACE_ID}
        for what, message in out.items():
            assert message.user_properties.get("tracestate") == (TRACESTATE if incoming else None), what
        # The stream entry itself carries the trace (its handler continued it, above).
        [(_, entry)] = redis_client.xrange(f"traced-{u}")
        headers = json.loads(entry[b"headers"])
        stored = dict(map(tuple, headers["user_properties"]))
        check_child(stored["traceparent"], traces["from-stream"], parent_id, "stream entry")
        if not incoming:
            assert stored["tenant"] == "acme"  # other user properties are kept
    finally:
        probe.close()
        await runtime.stop()
        redis_client.delete(f"traced-{u}", f"traced-{u}:dlq")


def probe_publish(probe: Probe, topic: str, payload: Any, user: list[tuple[str, str]], response_topic: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = user
    props.ResponseTopic = response_topic
    probe.paho.publish(topic, json.dumps(payload), 1, properties=props)


async def start_relay(mosquitto: MosquittoServer, u: str, tracing: str) -> tuple[Any, Probe]:
    """A runtime whose handler publishes `<u>/out/<n>` for each `<u>/in/<n>`; the probe watches `<u>/out/#`."""

    async def handle(n: str, client: Any) -> None:
        await client.publish(f"{u}/out/{n}", b"x", qos=1)

    router = Router()
    router.on(f"{u}/in/{{n}}", handle, qos=1)
    settings = load_settings({"MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port),
                              "MQTT_CLIENT_ID": u, "TRACING": tracing})
    runtime, probe = await start(settings, router, mosquitto, u)
    await probe.subscribe(f"{u}/out/#")
    return runtime, probe


async def test_tracing_off_adds_nothing(mosquitto: MosquittoServer, unique_id: str) -> None:
    u = unique_id
    runtime, probe = await start_relay(mosquitto, u, "off")
    try:
        probe_publish(probe, f"{u}/in/1", {}, [("traceparent", TRACEPARENT)], f"{u}/out/r")
        [message] = await probe.wait_count(f"{u}/out/1", 1)
        assert "traceparent" not in message.user_properties
    finally:
        probe.close()
        await runtime.stop()


async def test_otel_spans_of_a_runtime_on_mosquitto(spans: Any, mosquitto: MosquittoServer, unique_id: str) -> None:
    """TRACING=otel: the dispatcher's CONSUMER span and MqttClient's PRODUCER span, ended after the PUBACK."""
    u = unique_id
    runtime, probe = await start_relay(mosquitto, u, "otel")
    try:
        probe_publish(probe, f"{u}/in/1", {}, [("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)],
                      f"{u}/replies/1")
        [message] = await probe.wait_count(f"{u}/out/1", 1)
        await wait_until(lambda: len(spans.get_finished_spans()) >= 2, "the consumer and producer spans")
        by_name = {span.name: span for span in spans.get_finished_spans()}
        consumer, producer = by_name[f"process {u}/in/{{n}}"], by_name[f"publish {u}/out/1"]
        assert f"{consumer.context.trace_id:032x}" == TRACE_ID and f"{consumer.parent.span_id:016x}" == PARENT_ID
        assert consumer.attributes["messaging.client.id"] == u
        assert producer.parent.span_id == consumer.context.span_id
        assert producer.end_time >= consumer.start_time
        assert message.user_properties["traceparent"] == f"00-{TRACE_ID}-{producer.context.span_id:016x}-01"
        assert message.user_properties["tracestate"] == TRACESTATE
    finally:
        probe.close()
        await runtime.stop()
