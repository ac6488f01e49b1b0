"""core.transport.mqtt_reader.PacketReader hands paho the same packets as paho's own reader, however the bytes arrive.

Random streams of packets (hypothesis) arrive in random chunks on a fake socket. paho's
`_packet_read` and `PacketReader.read` each drive a paho client whose `_packet_handle` records
what it was given (command, remaining length, body); both must record the same packets and end
with the same error code.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import MQTTErrorCode
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import VariableByteIntegers

from core.transport.mqtt_reader import PacketReader


class ChunkedSocket:
    """recv() returns what has arrived so far (at most `n` bytes), or raises BlockingIOError."""

    def __init__(self) -> None:
        self.available = bytearray()

    def close(self) -> None:  # paho closes its socket when the client is collected
        pass

    def recv(self, n: int) -> bytes:
        if not self.available:
            raise BlockingIOError()
        data = bytes(self.available[:n])
        del self.available[:n]
        return data


def recording_client(outcomes: dict[bytes, Any]) -> tuple[paho.Client, list[tuple[int, int, bytes]]]:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    seen: list[tuple[int, int, bytes]] = []

    def handle() -> MQTTErrorCode:
        packet = client._in_packet
        body = bytes(packet["packet"])
        seen.append((packet["command"], packet["remaining_length"], body))
        outcome = outcomes.get(body, MQTTErrorCode.MQTT_ERR_SUCCESS)
        if outcome == "malformed":
            raise MalformedPacket("bad")
        return outcome

    client._packet_handle = handle  # type: ignore[method-assign]
    client._loop_rc_handle = lambda rc: rc  # type: ignore[method-assign]  # no disconnect handling here
    client._sock = ChunkedSocket()  # type: ignore[assignment]
    return client, seen


def run_paho(chunks: list[bytes], outcomes: dict[bytes, Any]) -> tuple[list[Any], MQTTErrorCode]:
    client, seen = recording_client(outcomes)
    for chunk in chunks:
        client._sock.available += chunk  # type: ignore[union-attr]
        while True:
            rc = client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return seen, rc
    return seen, MQTTErrorCode.MQTT_ERR_SUCCESS


def run_reader(chunks: list[bytes], outcomes: dict[bytes, Any], limit: int) -> tuple[list[Any], MQTTErrorCode]:
    client, seen = recording_client(outcomes)
    reader = PacketReader()
    sock: ChunkedSocket = client._sock  # type: ignore[assignment]
    for chunk in chunks:
        sock.available += chunk
        while sock.available or reader.has_packet():
            rc = reader.read(client, lambda: True, limit)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return seen, rc
    return seen, MQTTErrorCode.MQTT_ERR_SUCCESS


@st.composite
def packet(draw: st.DrawFn) -> bytes:
    command = draw(st.integers(0x10, 0xFF))  # 0 is no MQTT packet (paho reads it as "no command yet")
    if draw(st.integers(0, 30)) == 0:  # a remaining length of five bytes or more
        return bytes([command]) + bytes([0x80 | draw(st.integers(0, 127)) for _ in range(4)]) + \
            bytes([draw(st.integers(0, 255))])
    body = draw(st.binary(max_size=300))
    return bytes([command]) + VariableByteIntegers.encode(len(body)) + body


@settings(max_examples=400, deadline=None)
@given(st.lists(packet(), max_size=12), st.data(), st.integers(1, 5))
def test_any_packets_in_any_chunks_reach_paho_alike(packets: list[bytes], data: st.DataObject, limit: int) -> None:
    if data.draw(st.booleans()):  # ends in a packet too large to have arrived yet (3- and 4-byte lengths)
        declared = data.draw(st.sampled_from([16384, 2097151, 2097152, 268435455]))
        packets = [*packets, bytes([0x30]) + VariableByteIntegers.encode(declared) + data.draw(st.binary(max_size=20))]
    stream = b"".join(packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    bodies = [p[2:] for p in packets[:12] if len(p) > 2]
    outcomes: dict[bytes, Any] = {}
    if bodies and data.draw(st.booleans()):  # one packet's handling fails: both readers stop there
        outcomes[data.draw(st.sampled_from(bodies))] = data.draw(
            st.sampled_from(["malformed", MQTTErrorCode.MQTT_ERR_PROTOCOL]))
    assert run_reader(chunks, outcomes, limit) == run_paho(chunks, outcomes)


def test_a_publish_split_byte_by_byte_is_handled_once() -> None:
    topic = b"a/b"
    body = struct.pack("!H", 3) + topic + struct.pack("!H", 7) + b"\x00" + b'{"x": 1}'
    stream = bytes([0x32]) + VariableByteIntegers.encode(len(body)) + body
    seen, rc = run_reader([stream[i:i + 1] for i in range(len(stream))], {}, 512)
    assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS and seen == [(0x32, len(body), body)]


def test_a_closed_socket_is_a_lost_connection() -> None:
    client, _ = recording_client({})

    class Closed(ChunkedSocket):
        def recv(self, n: int) -> bytes:
            return b""

    client._sock = Closed()  # type: ignore[assignment]
    assert PacketReader().read(client, lambda: True) == MQTTErrorCode.MQTT_ERR_CONN_LOST


def test_reading_stops_when_the_application_has_no_room_and_the_rest_waits_in_the_buffer() -> None:
    client, seen = recording_client({})
    reader = PacketReader()
    client._sock.available += b"".join(bytes([0x30, 2]) + bytes([0, n]) for n in range(5))  # type: ignore[union-attr]
    room = [2]

    def may_read() -> bool:
        room[0] -= 1
        return room[0] > 0

    assert reader.read(client, may_read) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert len(seen) == 2 and reader.has_packet()
    assert reader.read(client, lambda: True) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [body for _, _, body in seen] == [bytes([0, n]) for n in range(5)]
