"""core.transport.wire against a real Mosquitto (issue 9, section 1).

1. The validator and the broker agree: a string the validator passes is accepted in a topic and in
   a user property, one it refuses makes the broker drop the connection.
2. What the application passes to `MqttClient.publish` either raises WireError at the call or is
   accepted by the broker: the connection never drops.
3. A publish the broker refuses anyway (validation bypassed) is given up after a few connection
   drops, its caller gets a PublishError, and everything published around it is delivered.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import core.transport.mqtt_client as mqtt_client
from core.foundation.config import load_settings
from core.transport.mqtt_client import MqttClient, PublishError
from core.transport.wire import WireError, check_topic_name, string_problem
from tests.integration.conftest import BrokerTarget, ProbeFn
from tests.support.raw_mqtt import RawClient, encode
from tests.test_wire import any_text
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(180)

_ids = itertools.count()


def broker_verdict(server: Any, topic: str, user_properties: list[tuple[str, str]] = ()) -> str:  # type: ignore[assignment]
    client = RawClient(server.host, server.port, f"wire-raw-{next(_ids)}")
    try:
        return client.publish(encode(topic), [(encode(k), encode(v)) for k, v in user_properties])
    finally:
        client.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_validator_and_mosquitto_agree_on_strings(mosquitto: Any, text: str) -> None:
    valid = string_problem(text) is None
    assert broker_verdict(mosquitto, "wire/t", [("k", text)]) == ("accepted" if valid else "closed")
    assert broker_verdict(mosquitto, "wire/t", [(text, "v")]) == ("accepted" if valid else "closed")
    try:
        check_topic_name("wire/" + text)
        topic_ok = True
    except WireError:
        topic_ok = False
    assert (broker_verdict(mosquitto, "wire/" + text) == "accepted") == topic_ok


class LoopClient:
    """An MqttClient on an event loop of its own, for synchronous (hypothesis) tests."""

    def __init__(self, port: int, client_id: str, **env: str) -> None:
        self.loop = asyncio.new_event_loop()
        settings = load_settings({"MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(port), "MQTT_CLIENT_ID": client_id,
                                  "MQTT_PROTOCOL": "5", "MQTT_RECONNECT_MIN": "0.05", "MQTT_RECONNECT_MAX": "0.2",
                                  **env})
        self.client = MqttClient(settings, client_id, lambda message, generation: None)
        self.client.start(self.loop)
        assert self.run(self.client.wait_subscribed(10))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.client.stop())
        self.loop.close()


@pytest.fixture
def loop_client(mosquitto_factory: Callable[..., Any], unique_id: str) -> Iterator[tuple[Any, LoopClient]]:
    server = mosquitto_factory()
    client = LoopClient(server.port, f"{unique_id}-pub")
    try:
        yield server, client
    finally:
        client.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=any_text, key=any_text, value=any_text, content_type=any_text, response=any_text)
def test_publish_raises_at_the_call_or_the_broker_accepts(
        loop_client: tuple[Any, LoopClient], topic: str, key: str, value: str, content_type: str, response: str) -> None:
    server, lc = loop_client
    properties = {"user_properties": [(key, value)], "content_type": content_type, "response_topic": "r/" + response}
    try:
        lc.run(asyncio.wait_for(lc.client.publish("wire/" + topic, b"x", 1, properties=properties), 10))
    except WireError:
        pass
    assert lc.client.state.disconnects == 0, server.log_text()[-2000:]


def _unchecked_properties(properties: dict[str, Any]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = list(properties["user_properties"])
    return props


async def test_a_publish_the_broker_keeps_refusing_is_given_up(
        mosquitto_factory: Callable[..., Any], probe_factory: ProbeFn, unique_id: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation bypassed: a user property with a newline goes out between 40 good publishes."""
    u = unique_id
    server = mosquitto_factory()
    probe = await probe_factory(BrokerTarget("mosquitto", server.host, server.port, v5=True))
    await probe.subscribe(f"{u}/#")
    settings = load_settings({"MQTT_BROKER": server.host, "MQTT_PORT": str(server.port), "MQTT_CLIENT_ID": f"{u}-c",
                              "MQTT_PROTOCOL": "5", "MQTT_RECONNECT_MIN": "0.05", "MQTT_RECONNECT_MAX": "0.5"})
    client = MqttClient(settings, f"{u}-c", lambda message, generation: None)
    client.start(asyncio.get_running_loop())
    assert await client.wait_subscribed(10)
    monkeypatch.setattr(mqtt_client, "publish_properties", _unchecked_properties)
    try:
        good = {"user_properties": [("k", "fine")]}
        bad = {"user_properties": [("error", "first line\nsecond line")]}
        sends = [client.publish(f"{u}/good/{n}", b"x", 1, properties=good) for n in range(20)]
        sends.append(client.publish(f"{u}/bad", b"x", 1, properties=bad))
        sends += [client.publish(f"{u}/good/{n}", b"x", 1, properties=good) for n in range(20, 40)]
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 60)

        failed = [r for r in results if r is not None]
        assert len(failed) == 1 and isinstance(failed[0], PublishError) and "abandoned" in str(failed[0])
        assert results[20] is failed[0]
        assert client.state.publishes_abandoned == 1
        assert 2 <= client.state.disconnects <= 5, client.state.disconnects
        assert "Malformed UTF-8" in server.log_text()
        await wait_until(lambda: {m.topic for m in probe.on(f"{u}/good/")} == {f"{u}/good/{n}" for n in range(40)},
                         "every good publish delivered")
        assert not probe.on(f"{u}/bad")
        # Back to normal: no more drops, the usual in-flight window.
        disconnects = client.state.disconnects
        await asyncio.gather(*(client.publish(f"{u}/after/{n}", b"x", 1, properties=good) for n in range(50)))
        assert client.state.disconnects == disconnects
        assert not client._guard.probing
        assert client._paho._max_inflight_messages == max(20, settings.max_inflight)
    finally:
        await client.stop()


async def test_a_qos1_publish_made_while_disconnected_completes_after_the_reconnect(
        mosquitto_factory: Callable[..., Any], unique_id: str) -> None:
    """paho queues it (rc NO_CONN); the caller's future must wait for the PUBACK, not be lost."""
    u = unique_id
    server = mosquitto_factory()
    settings = load_settings({"MQTT_BROKER": server.host, "MQTT_PORT": str(server.port), "MQTT_CLIENT_ID": f"{u}-c",
                              "MQTT_PROTOCOL": "5", "MQTT_RECONNECT_MIN": "0.05", "MQTT_RECONNECT_MAX": "0.2"})
    client = MqttClient(settings, f"{u}-c", lambda message, generation: None)
    client.start(asyncio.get_running_loop())
    assert await client.wait_subscribed(10)
    try:
        server.stop()
        await wait_until(lambda: not client.state.connected, "the client to notice the broker is gone")
        sending = asyncio.ensure_future(client.publish(f"{u}/queued", b"x", 1))
        await wait_until(lambda: client._paho._out_messages, "the publish queued in paho while disconnected")
        assert not sending.done()
        server.start()
        await asyncio.wait_for(sending, 20)
    finally:
        await client.stop()
