"""The private server helpers start, stop, kill and restart real processes."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from tests.support.servers import MosquittoServer, RedisServer, free_port

WAIT = 15.0


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reaped child cannot linger as a zombie, so existence means running.
    return True


def _mqtt_client(client_id: str, server: MosquittoServer) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    client.connect(server.host, server.port, clean_start=False, properties=props)
    client.loop_start()
    assert connected.wait(WAIT), "no CONNACK"
    return client


def _mqtt_roundtrip(server: MosquittoServer, topic: str) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.connect(server.host, server.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(WAIT)
        client.publish(topic, b"ping", qos=1)
        assert done.wait(WAIT), "message not echoed"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_session_broker_serves_mqtt(mosquitto: MosquittoServer, unique_id: str) -> None:
    assert mosquitto.pid is not None
    assert "max_queued_messages 100000" in mosquitto.config_text()
    assert _mqtt_roundtrip(mosquitto, f"{unique_id}/echo") == b"ping"


def test_mosquitto_stop_kill_restart(mosquitto_factory: Callable[..., MosquittoServer], unique_id: str) -> None:
    server = mosquitto_factory()
    port, first_pid = server.port, server.pid
    assert first_pid is not None and _accepts(port)
    assert _mqtt_roundtrip(server, f"{unique_id}/a") == b"ping"

    server.restart()
    assert server.port == port
    assert server.pid is not None and server.pid != first_pid
    assert not _process_exists(first_pid)
    assert _mqtt_roundtrip(server, f"{unique_id}/b") == b"ping"

    killed_pid = server.pid
    server.kill()
    assert server.pid is None
    assert not _process_exists(killed_pid)

    server.start()
    assert server.port == port
    assert _mqtt_roundtrip(server, f"{unique_id}/c") == b"ping"

    last_pid = server.pid
    assert last_pid is not None
    server.stop()
    assert server.pid is None
    assert not _process_exists(last_pid)
    assert not _accepts(port)
    assert "mosquitto version" in server.log_text()


@pytest.mark.integration
def test_mosquitto_context_manager_and_limits(unique_id: str) -> None:
    with MosquittoServer(max_inflight=5, max_queued=12345, extra_conf="max_keepalive 120") as server:
        conf = server.conf_path.read_text()
        assert "max_inflight_messages 5" in conf
        assert "max_queued_messages 12345" in conf
        assert "max_keepalive 120" in conf
        assert _mqtt_roundtrip(server, f"{unique_id}/cm") == b"ping"
        port = server.port
    assert server.pid is None and not _accepts(port)
    server.cleanup()


def test_persistent_session_survives_restart(
    mosquitto_factory: Callable[..., MosquittoServer], unique_id: str
) -> None:
    server = mosquitto_factory(persistence=True)
    topic = f"{unique_id}/queued"
    sub_id = f"{unique_id}-sub"

    sub = _mqtt_client(sub_id, server)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(topic, qos=1)
    assert subscribed.wait(WAIT)
    sub.disconnect()
    sub.loop_stop()

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(server.host, server.port)
    pub.loop_start()
    info = pub.publish(topic, b"kept across restart", qos=1)
    info.wait_for_publish(WAIT)
    assert info.is_published()
    pub.disconnect()
    pub.loop_stop()

    server.restart()
    assert (server.tmpdir and os.path.exists(os.path.join(server.tmpdir, "mosquitto.db")))

    received: list[tuple[str, bytes, int]] = []
    got = threading.Event()
    sub2 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=sub_id, protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.topic, msg.payload, msg.qos))
        got.set()

    sub2.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    sub2.connect(server.host, server.port, clean_start=False, properties=props)
    sub2.loop_start()
    try:
        assert got.wait(WAIT), f"queued message lost across restart; log:\n{server.log_text()}"
    finally:
        sub2.disconnect()
        sub2.loop_stop()
    assert received == [(topic, b"kept across restart", 1)]


def test_redis_stop_kill_restart(redis_factory: Callable[..., RedisServer], unique_id: str) -> None:
    server = redis_factory()
    port, first_pid = server.port, server.pid
    client = redis.Redis(host=server.host, port=port)
    try:
        client.set(unique_id, "v")
        assert client.get(unique_id) == b"v"

        server.restart()
        assert server.port == port and server.pid not in (None, first_pid)
        assert not _process_exists(first_pid)
        # No persistence: a restart starts empty.
        assert client.get(unique_id) is None

        killed = server.pid
        server.kill()
        assert server.pid is None and not _process_exists(killed)
        server.start()
        assert client.ping() is True

        last = server.pid
        server.stop()
        assert server.pid is None and not _process_exists(last) and not _accepts(port)
    finally:
        client.close()
    assert "Ready to accept connections" in server.log_text()


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_redis_appendonly_survives(
    redis_factory: Callable[..., RedisServer], unique_id: str, how: str
) -> None:
    server = redis_factory(appendonly=True)
    client = redis.Redis(host=server.host, port=server.port)
    try:
        client.xadd(unique_id, {"n": "1"})
        if how == "restart":
            server.restart()
        else:
            server.kill()
            server.start()
        entries = client.xrange(unique_id)
        assert [fields for _id, fields in entries] == [{b"n": b"1"}]
    finally:
        client.close()


def test_session_redis(redis_server: RedisServer, unique_id: str) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.incr(unique_id) == 1
    finally:
        client.close()
