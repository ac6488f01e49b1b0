"""MqttClient writes the acknowledgements queued together as one packet write, in arrival order."""

from __future__ import annotations

import struct
from typing import Any

from core.foundation.config import load_settings
from core.transport.mqtt_client import MqttClient


def test_acks_queued_together_reach_paho_as_one_write_in_order() -> None:
    client = MqttClient(load_settings({"MQTT_CLIENT_ID": "acks"}), "acks", lambda message, generation: None)
    queued: list[tuple[int, bytes]] = []

    def packet_queue(command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> int:
        queued.append((command, bytes(packet)))
        return 0

    client._paho._packet_queue = packet_queue  # type: ignore[method-assign]
    client.state.connected = True
    client._generation = 2
    for mid, qos, generation in [(5, 1, 2), (6, 2, 2), (7, 1, 1), (8, 1, 2)]:  # 7: from the previous connection
        client.ack(mid, qos, generation)
    client._run_commands()
    expected = struct.pack("!BBH", 0x40, 2, 5) + struct.pack("!BBH", 0x70, 2, 6) + struct.pack("!BBH", 0x40, 2, 8)
    assert [packet for _, packet in queued] == [expected]

    client.state.connected = False
    client.ack(9, 1, 2)
    client._run_commands()
    assert len(queued) == 1  # nothing is written for a connection that is gone
