"""The embedded broker (amqtt + shared subscriptions) against real paho clients.

The broker runs in the test's event loop, as it does in the framework; paho
clients run in their own threads, so every wait here is an ``await``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio

from core.transport.embedded_broker import EmbeddedBroker, EmbeddedBrokerError, parse_shared_filter
from tests.support.servers import free_port

HOST = "127.0.0.1"
WAIT = 20.0


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Client:
    """A paho MQTT 3.1.1 client whose waits do not block the event loop."""

    def __init__(
        self, port: int, client_id: str, *, clean_session: bool = True, manual_ack: bool = False, reconnect: bool = True
    ) -> None:
        self.port = port
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self._subacks: dict[int, list[int]] = {}
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            manual_ack=manual_ack,
            reconnect_on_failure=reconnect,
        )
        self.paho.max_inflight_messages_set(100)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = lambda _c, _u, message: self.messages.append(message)

    def _on_connect(self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, _rc: object, _p: object) -> None:
        self.session_present = bool(flags.session_present)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list, _p: object) -> None:
        self._subacks[mid] = [code.value for code in codes]

    async def connect(self) -> Client:
        self.paho.connect(HOST, self.port, keepalive=30)
        self.paho.loop_start()
        await wait_until(lambda: self.session_present is not None, "CONNACK")
        return self

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the granted QoS (0x80 for a refusal)."""
        _, mid = self.paho.subscribe(topic_filter, qos)
        await wait_until(lambda: mid in self._subacks, f"SUBACK for {topic_filter}")
        return self._subacks[mid][0]

    async def unsubscribe(self, topic_filter: str) -> None:
        done: list[int] = []
        self.paho.on_unsubscribe = lambda _c, _u, mid, _codes, _p: done.append(mid)
        _, mid = self.paho.unsubscribe(topic_filter)
        await wait_until(lambda: mid in done, f"UNSUBACK for {topic_filter}")

    async def publish_all(self, topic: str, payloads: list[bytes], qos: int = 1, retain: bool = False) -> None:
        """Publish in order and wait for every PUBACK."""
        infos = [self.paho.publish(topic, payload, qos, retain=retain) for payload in payloads]
        await wait_until(lambda: all(info.is_published() for info in infos), f"PUBACKs on {topic}")

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in list(self.messages) if topic is None or m.topic == topic]

    async def disconnect(self) -> None:
        self.paho.disconnect()
        await asyncio.to_thread(self.paho.loop_stop)

    async def drop(self) -> None:
        """Vanish without DISCONNECT, like a killed process."""
        await asyncio.to_thread(self.paho.loop_stop)
        sock = self.paho.socket()
        if sock is not None:
            sock.close()


@pytest_asyncio.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker(HOST, free_port())
    await embedded.start()
    try:
        yield embedded
    finally:
        await embedded.stop()


@pytest_asyncio.fixture
async def connect(broker: EmbeddedBroker) -> AsyncIterator[Callable[..., object]]:
    clients: list[Client] = []

    async def factory(client_id: str, **options: bool) -> Client:
        client = Client(broker.port, client_id, **options)
        clients.append(client)
        return await client.connect()

    yield factory
    for client in clients:
        client.paho.disconnect()
        await asyncio.to_thread(client.paho.loop_stop)


def numbered(count: int) -> list[bytes]:
    return [str(i).encode() for i in range(count)]


def test_parse_shared_filter() -> None:
    assert parse_shared_filter("sensors/+/data") is None
    assert parse_shared_filter("$share/g/sensors/+/data") == ("g", "sensors/+/data")
    for bad in ("$share/g", "$share//a", "$share/g/", "$share/g+/a"):
        with pytest.raises(ValueError):
            parse_shared_filter(bad)


@pytest.mark.asyncio
async def test_plain_publish_subscribe_in_order_with_puback(broker: EmbeddedBroker, connect) -> None:
    assert broker.url == f"mqtt://{HOST}:{broker.port}"
    sub = await connect("plain-sub")
    assert await sub.subscribe("sensors/+/data", 1) == 1
    assert await sub.subscribe("other/#", 0) == 0
    pub = await connect("plain-pub")

    await pub.publish_all("sensors/7/data", numbered(50), qos=1)  # returns once all PUBACKs arrived
    await pub.publish_all("sensors/7/status", [b"not matched"], qos=1)
    await pub.publish_all("other/x", [b"q0"], qos=0)
    await wait_until(lambda: len(sub.messages) == 51, "51 messages")

    assert sub.payloads("sensors/7/data") == numbered(50)
    assert sub.payloads("other/x") == [b"q0"]
    assert sub.payloads("sensors/7/status") == []


@pytest.mark.asyncio
async def test_shared_group_splits_messages_between_members(connect) -> None:
    members = [await connect(f"worker-{i}") for i in range(2)]
    for member in members:
        assert await member.subscribe("$share/g/sensors/+/data", 1) == 1
    pub = await connect("pub")

    await pub.publish_all("sensors/1/data", numbered(1000))
    await wait_until(lambda: sum(len(m.messages) for m in members) >= 1000, "1000 messages")

    received = Counter(p for m in members for p in m.payloads())
    assert received == Counter(numbered(1000)), "every message exactly once across the group"
    for member in members:
        assert 300 <= len(member.messages) <= 700
        assert all(m.topic == "sensors/1/data" for m in member.messages)


@pytest.mark.asyncio
async def test_plain_and_shared_subscriptions_on_one_filter(connect) -> None:
    """Each (group, filter) picks one member; a member that also has a plain subscription gets one copy.

    MQTT 3.1.1 has no subscription identifiers, so a client cannot tell a plain copy from a shared
    one: the copy it was picked for is folded into the copy it gets for its plain subscription.
    """
    plain = await connect("plain")
    await plain.subscribe("sensors/+/data")
    members = [await connect(f"member-{i}") for i in range(2)]
    for member in members:
        await member.subscribe("$share/g/sensors/+/data")
    # A client with a plain subscription that is also a third group member.
    both = await connect("both")
    await both.subscribe("sensors/+/data")
    await both.subscribe("$share/g/sensors/+/data")
    pub = await connect("pub")

    await pub.publish_all("sensors/2/data", numbered(1000))
    await wait_until(lambda: len(plain.messages) >= 1000 and len(both.messages) >= 1000, "plain copies")
    await pub.publish_all("sensors/2/data", [b"marker"])
    await wait_until(lambda: b"marker" in plain.payloads() and b"marker" in both.payloads(), "the marker")

    assert plain.payloads() == numbered(1000) + [b"marker"]
    assert both.payloads() == numbered(1000) + [b"marker"], "one copy each, though picked for the group too"
    group_counts = Counter(p for m in members for p in m.payloads() if p != b"marker")
    assert set(group_counts.values()) == {1}, "no message went to two members of the group"
    # Round-robin over three members: the other two get about two thirds between them.
    assert 600 <= len(group_counts) <= 730


@pytest.mark.asyncio
async def test_overlapping_plain_filters_give_one_copy_at_the_highest_qos(connect) -> None:
    sub = await connect("overlap")
    await sub.subscribe("a/#", 0)
    await sub.subscribe("a/+/c", 1)
    await sub.subscribe("a/b/c", 0)
    pub = await connect("pub")

    await pub.publish_all("a/b/c", numbered(10))
    await pub.publish_all("a/x", [b"only #"])
    await wait_until(lambda: len(sub.payloads("a/x")) == 1, "the marker")
    assert [(m.payload, m.qos) for m in sub.messages if m.topic == "a/b/c"] == [(p, 1) for p in numbered(10)]
    assert [m.qos for m in sub.messages if m.topic == "a/x"] == [0]


@pytest.mark.asyncio
async def test_two_groups_each_get_every_message(connect) -> None:
    groups = {name: [await connect(f"{name}-{i}") for i in range(2)] for name in ("alpha", "beta")}
    for name, members in groups.items():
        for member in members:
            await member.subscribe(f"$share/{name}/jobs/#")
    pub = await connect("pub")

    await pub.publish_all("jobs/a/b", numbered(1000))
    for name, members in groups.items():
        await wait_until(lambda: sum(len(m.messages) for m in members) >= 1000, f"group {name}")
        assert Counter(p for m in members for p in m.payloads()) == Counter(numbered(1000))
        for member in members:
            assert 300 <= len(member.messages) <= 700


@pytest.mark.asyncio
async def test_shared_unsubscribe_and_invalid_filter(connect) -> None:
    first = await connect("first")
    second = await connect("second")
    assert await first.subscribe("$share/g/t") == 1
    assert await second.subscribe("$share/g/t") == 1
    assert await first.subscribe("$share/g") == 0x80
    assert await first.subscribe("$share//t") == 0x80
    await first.unsubscribe("$share/g/t")
    pub = await connect("pub")

    await pub.publish_all("t", numbered(20))
    await wait_until(lambda: len(second.messages) == 20, "all to the remaining member")
    assert first.messages == []


@pytest.mark.asyncio
async def test_shared_group_prefers_online_members_and_queues_when_none(broker: EmbeddedBroker, connect) -> None:
    a = await connect("persist-a", clean_session=False)
    b = await connect("persist-b", clean_session=False)
    for member in (a, b):
        await member.subscribe("$share/g/work")
    pub = await connect("pub")

    await a.disconnect()
    await wait_until(lambda: "persist-a" not in broker.connected_client_ids(), "broker sees a leave")
    await pub.publish_all("work", numbered(100))
    await wait_until(lambda: len(b.messages) >= 100, "all 100 to the online member")
    assert b.payloads() == numbered(100)

    await b.disconnect()
    # Otherwise `later` may still go to b's closing socket: delivered again on
    # resume (correct), but then some messages arrive twice.
    await wait_until(lambda: "persist-b" not in broker.connected_client_ids(), "broker sees b leave")
    later = [f"later-{i}".encode() for i in range(50)]
    await pub.publish_all("work", later)
    a2 = await connect("persist-a", clean_session=False)
    b2 = await connect("persist-b", clean_session=False)
    assert a2.session_present and b2.session_present
    await wait_until(lambda: set(a2.payloads() + b2.payloads()) >= set(later), "queued messages")
    assert Counter(a2.payloads() + b2.payloads()) == Counter(later)


@pytest.mark.asyncio
@pytest.mark.parametrize("leave", ["disconnect", "drop"])
async def test_unacked_qos1_is_redelivered_to_resumed_session(broker: EmbeddedBroker, connect, leave: str) -> None:
    sub = await connect("keeper", clean_session=False, manual_ack=True)
    await sub.subscribe("jobs/#")
    pub = await connect("pub")

    await pub.publish_all("jobs/1", [b"first"])
    await wait_until(lambda: len(sub.messages) == 1, "first delivery")
    await (sub.disconnect() if leave == "disconnect" else sub.drop())  # never acked
    await wait_until(lambda: "keeper" not in broker.connected_client_ids(), "broker sees keeper leave")
    await pub.publish_all("jobs/2", [b"second"])  # while offline

    resumed = await connect("keeper", clean_session=False)
    assert resumed.session_present
    await wait_until(lambda: len(resumed.messages) == 2, "redelivery and queued message")
    first, second = resumed.messages
    assert (first.topic, first.payload, first.dup) == ("jobs/1", b"first", True)
    assert (second.topic, second.payload, second.retain) == ("jobs/2", b"second", False)

    # Once acknowledged, nothing comes back: the marker is the only message.
    await resumed.subscribe("sync/barrier")  # the broker has handled the PUBACKs sent before this
    await resumed.disconnect()
    again = await connect("keeper", clean_session=False)
    await pub.publish_all("jobs/3", [b"marker"])
    await wait_until(lambda: len(again.messages) == 1, "marker")
    assert again.payloads() == [b"marker"]


@pytest.mark.asyncio
async def test_publishes_sent_just_before_disconnect_are_routed_and_no_will(broker: EmbeddedBroker, connect) -> None:
    sub = await connect("sub")
    await sub.subscribe("burst")
    await sub.subscribe("wills/#")
    pub = Client(broker.port, "bursty")
    pub.paho.will_set("wills/bursty", b"gone", qos=1)
    await pub.connect()

    for payload in numbered(300):
        pub.paho.publish("burst", payload, qos=0)
    await pub.disconnect()  # DISCONNECT right behind the publishes

    await wait_until(lambda: len(sub.payloads("burst")) == 300, "all 300 publishes")
    assert sub.payloads("burst") == numbered(300)
    marker = await connect("marker")
    await marker.publish_all("wills/marker", [b"m"])
    await wait_until(lambda: len(sub.payloads("wills/marker")) == 1, "marker")
    assert sub.payloads("wills/bursty") == [], "a clean DISCONNECT must not send the will"


@pytest.mark.asyncio
async def test_will_is_sent_when_a_client_vanishes(broker: EmbeddedBroker, connect) -> None:
    sub = await connect("sub")
    await sub.subscribe("wills/#")
    doomed = Client(broker.port, "doomed")
    doomed.paho.will_set("wills/doomed", b"gone", qos=1)
    await doomed.connect()
    await doomed.drop()
    await wait_until(lambda: sub.payloads("wills/doomed") == [b"gone"], "will message")


@pytest.mark.asyncio
async def test_session_takeover_keeps_the_new_connection_live(broker: EmbeddedBroker, connect) -> None:
    old = await connect("twin", clean_session=False, reconnect=False)
    await old.subscribe("tasks")
    new = await connect("twin", clean_session=False)  # the old connection is still open
    assert new.session_present
    pub = await connect("pub")

    await pub.publish_all("tasks", numbered(20))
    await wait_until(lambda: len(new.messages) == 20, "messages on the new connection")
    assert new.payloads() == numbered(20)
    assert "twin" in broker.connected_client_ids()


@pytest.mark.asyncio
async def test_retained_messages(connect) -> None:
    pub = await connect("pub")
    await pub.publish_all("status/a", [b"up"], retain=True)
    await pub.publish_all("status/b", [b"down"], qos=0, retain=True)

    other = await connect("other")
    await other.subscribe("unrelated/#")
    member = await connect("member")
    await member.subscribe("$share/g/status/#")
    sub = await connect("sub")
    await sub.subscribe("status/#")
    await wait_until(lambda: len(sub.messages) == 2, "retained messages")
    assert sorted((m.topic, m.payload, m.retain, m.qos) for m in sub.messages) == [
        ("status/a", b"up", True, 1),
        ("status/b", b"down", True, 0),
    ]

    # Live messages are not flagged retained; retained ones went only to `sub`,
    # not to the other client nor to the shared subscription (MQTT 5 rule).
    await pub.publish_all("unrelated/x", [b"live"])
    await wait_until(lambda: len(other.messages) == 1, "live message")
    assert [(m.payload, m.retain) for m in other.messages] == [(b"live", False)]
    await pub.publish_all("status/c", [b"live"])
    await wait_until(lambda: len(member.messages) == 1, "live shared message")
    assert member.payloads() == [b"live"]

    await pub.publish_all("status/a", [b""], retain=True)  # clears the retained message
    late = await connect("late")
    await late.subscribe("status/#")
    await wait_until(lambda: len(late.messages) == 1, "remaining retained message")
    assert late.payloads() == [b"down"]


@pytest.mark.asyncio
async def test_port_in_use_gives_one_clear_line() -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EmbeddedBrokerError) as caught:
            await EmbeddedBroker(HOST, port).start()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"Port {port} on {HOST} is already in use, so the embedded broker cannot start.")
    assert f"MQTT_BROKER={HOST}" in message
    assert "EMBEDDED_BROKER_PORT=" in message
    assert caught.value.__cause__ is None


@pytest.mark.asyncio
async def test_stop_then_start_again_on_the_same_port() -> None:
    port = free_port()
    embedded = EmbeddedBroker(HOST, port)
    await embedded.start()
    client = await Client(port, "c").connect()
    await embedded.stop()
    await asyncio.to_thread(client.paho.loop_stop)
    async with EmbeddedBroker(HOST, port) as again:
        assert again.running
        reconnected = await Client(port, "c2").connect()
        await reconnected.disconnect()
    assert not again.running
