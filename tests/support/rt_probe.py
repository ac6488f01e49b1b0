"""A paho client for tests: publishes requests and watches what the framework publishes.

Its network loop runs in paho's own thread and every wait is an `await`, so it also works
against the embedded broker, which runs in the test's event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.rt_wait import wait_until


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: dict[str, str] = field(default_factory=dict)
    correlation_data: bytes | None = None
    subscription_ids: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """One MQTT connection (v5 or 3.1.1) used by a test as publisher and observer."""

    def __init__(self, host: str, port: int, client_id: str, *, v5: bool = True) -> None:
        self.host, self.port, self.v5 = host, port, v5
        self.messages: list[Received] = []
        self._connected: bool | None = None
        self._subacks: dict[int, list[Any]] = {}
        if v5:
            self.paho = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        else:
            self.paho = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                                    clean_session=True)
        self.paho.max_inflight_messages_set(1000)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = lambda _c, _u, mid, codes, _p: self._subacks.__setitem__(mid, list(codes))
        self.paho.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._connected = not reason.is_failure

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        self.messages.append(Received(
            topic=message.topic, payload=message.payload, qos=message.qos, retain=bool(message.retain),
            user_properties=dict(getattr(props, "UserProperty", None) or []),
            correlation_data=getattr(props, "CorrelationData", None),
            subscription_ids=list(getattr(props, "SubscriptionIdentifier", None) or []),
        ))

    async def connect(self) -> "Probe":
        self.paho.connect(self.host, self.port, keepalive=30)
        self.paho.loop_start()
        await wait_until(lambda: self._connected is not None, f"probe CONNACK from {self.host}:{self.port}")
        assert self._connected, "probe connection refused"
        return self

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        _, mid = self.paho.subscribe(topic_filter, qos)
        await wait_until(lambda: mid in self._subacks, f"SUBACK for {topic_filter!r}")

    async def publish(self, topic: str, payload: Any = b"", qos: int = 1, *, response_topic: str | None = None,
                      correlation_data: bytes | None = None, retain: bool = False) -> None:
        """Publish and, for QoS>0, wait for the broker's acknowledgement."""
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        props = None
        if self.v5 and (response_topic is not None or correlation_data is not None):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self.paho.publish(topic, payload, qos, retain, properties=props)
        if qos:
            await wait_until(info.is_published, f"PUBACK for publish to {topic!r}")

    def on(self, topic_prefix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.startswith(topic_prefix)]

    async def wait_for(self, predicate: Callable[[list[Received]], bool], what: str, timeout: float = 20.0) -> None:
        await wait_until(lambda: predicate(self.messages), what, timeout)

    async def wait_count(self, topic_prefix: str, count: int, timeout: float = 20.0) -> list[Received]:
        await wait_until(lambda: len(self.on(topic_prefix)) >= count,
                         f"{count} message(s) on {topic_prefix!r} (have {len(self.on(topic_prefix))})", timeout)
        return self.on(topic_prefix)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()
