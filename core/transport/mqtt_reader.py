"""Buffered reading of MQTT packets for paho's client: one recv() per batch instead of three per packet.

paho (2.2.0) reads a packet with one recv() for the command byte, one per remaining-length byte
and one for the rest, each a system call (and a GIL release and re-acquire) on the network
thread. `PacketReader` reads whatever the socket has (up to 64 KiB) into a buffer, cuts complete
packets out of it, and hands each to paho exactly as paho's own `_packet_read` does: the same
`_in_packet` fields, then paho's `_packet_handle`, malformed packets turned into a protocol error,
the receive time noted for the keepalive. What is incomplete stays in the buffer for the next
read. tests/test_mqtt_reader.py checks it against paho's reader on random packet streams cut at
random places (hypothesis). The paho version is pinned exactly for this (requirements.txt).
"""

from __future__ import annotations

from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.client import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

READ_SIZE = 65536
_time = paho.time_func


def _fresh_in_packet() -> dict[str, Any]:
    """paho's `_in_packet` between packets."""
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1, "remaining_length": 0,
            "packet": bytearray(b""), "to_process": 0, "pos": 0}


class PacketReader:
    """The receive buffer of one connection (network thread only)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def reset(self) -> None:
        """A new connection: whatever the old one left is meaningless."""
        self._buffer.clear()

    def has_packet(self) -> bool:
        """Is a complete packet waiting in the buffer (the socket may have nothing more to say)?"""
        return _next_packet(self._buffer, 0) is not None

    def read(self, client: paho.Client, may_read: Callable[[], bool], limit: int = 512) -> MQTTErrorCode:
        """Read what the socket has and handle up to `limit` complete packets while `may_read()`.

        Returns paho's error code for the connection (SUCCESS, or what paho's loop_read would return).
        """
        buffer = self._buffer
        try:
            data = client._sock_recv(READ_SIZE)
        except BlockingIOError:
            data = None  # nothing new (e.g. TLS needs more): handle what is buffered
        except OSError as err:
            client._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if data is not None:
            if not data:
                return client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            buffer += data
            with client._msgtime_mutex:
                client._last_bytes_received = _time()
        start = 0
        try:
            for _ in range(limit):
                found = _next_packet(buffer, start)
                if found is None:
                    break
                if found == -1:
                    return client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)  # remaining length > 4 bytes
                body, end = found
                in_packet = _fresh_in_packet()
                in_packet["command"] = buffer[start]
                in_packet["have_remaining"] = 1
                in_packet["remaining_length"] = end - body
                in_packet["packet"] = bytes(buffer[body:end])
                client._in_packet = in_packet
                start = end
                try:
                    rc = client._packet_handle()
                except MalformedPacket as exc:
                    client._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                client._in_packet = _fresh_in_packet()
                with client._msgtime_mutex:
                    client._last_bytes_received = _time()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return client._loop_rc_handle(rc)
                if client._sock is None:
                    return MQTTErrorCode.MQTT_ERR_NO_CONN
                if not may_read() and client._ping_t == 0:
                    break
        finally:
            del buffer[:start]
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _next_packet(buffer: bytearray, start: int) -> tuple[int, int] | int | None:
    """(body start, end) of the packet at `start`; None if incomplete; -1 if its length is malformed."""
    size = len(buffer)
    pos = start + 1
    length = 0
    multiplier = 1
    for count in range(5):
        if pos >= size:
            return None
        if count == 4:
            return -1  # a fifth remaining-length byte: paho gives up the connection as well
        byte = buffer[pos]
        pos += 1
        length += (byte & 127) * multiplier
        multiplier *= 128
        if not byte & 128:
            break
    end = pos + length
    return (pos, end) if end <= size else None
