"""Hand-made MQTT 5 packets over a plain socket: to send bytes a client library would refuse, and to
see exactly how a broker answers them (PUBACK, DISCONNECT, or a closed connection).
"""

from __future__ import annotations

import socket
import struct


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def encode(text: str) -> bytes:
    """UTF-8, letting lone surrogates through as their (invalid) three-byte forms."""
    return text.encode("utf-8", "surrogatepass")


class RawClient:
    """One MQTT 5 connection (clean start, no session) that sends QoS 1 PUBLISH packets one at a time."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        variable = _string(b"MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + _varint(0)
        body = variable + _string(client_id.encode())
        self.sock.sendall(bytes([0x10]) + _varint(len(body)) + body)
        connack = self.sock.recv(64)
        if not connack or connack[0] != 0x20:
            raise ConnectionError(f"no CONNACK: {connack!r}")

    def publish(self, topic: bytes, user_properties: list[tuple[bytes, bytes]] = (), mid: int = 1) -> str:  # type: ignore[assignment]
        """'accepted' (PUBACK), 'disconnected' (the broker sent DISCONNECT) or 'closed'."""
        props = b"".join(b"\x26" + _string(k) + _string(v) for k, v in user_properties)
        body = _string(topic) + struct.pack("!H", mid) + _varint(len(props)) + props + b"payload"
        self.sock.sendall(bytes([0x32]) + _varint(len(body)) + body)
        try:
            answer = self.sock.recv(64)
        except ConnectionResetError:
            return "closed"
        if not answer:
            return "closed"
        return {0x40: "accepted", 0xE0: "disconnected"}.get(answer[0], f"unexpected {answer.hex()}")

    def close(self) -> None:
        self.sock.close()
