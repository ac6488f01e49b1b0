"""An asyncio TCP proxy between a client and a broker that records MQTT packets as they pass.

It lets the runtime tests see, at the wire, when and in which order the framework sends PUBACKs
for the PUBLISH packets the broker delivered. It runs in the test's event loop; packet ids and
topics are read from the fixed and variable headers only (the same in MQTT 3.1.1 and 5).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

PUBLISH, PUBACK = 3, 4
_seq = itertools.count()


@dataclass(frozen=True)
class Packet:
    seq: int  # order of observation, from the same counter as `next_seq()`
    direction: str  # "in": broker -> client, "out": client -> broker
    kind: int  # MQTT control packet type
    packet_id: int | None
    topic: str | None
    qos: int
    dup: bool


def next_seq() -> int:
    """A number from the packets' counter, to order a test's own events against them."""
    return next(_seq)


class MqttProxy:
    """Listen on 127.0.0.1 (a free port), forward each connection to the broker, record packets."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.packets: list[Packet] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "MqttProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def drop_connections(self) -> None:
        """Close every proxied connection (both sides see the TCP connection end)."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    # -- queries ------------------------------------------------------------------------------------

    def publishes_in(self, topic_prefix: str = "") -> list[Packet]:
        return [p for p in self.packets
                if p.direction == "in" and p.kind == PUBLISH and (p.topic or "").startswith(topic_prefix)]

    def publishes_out(self, topic_prefix: str = "") -> list[Packet]:
        return [p for p in self.packets
                if p.direction == "out" and p.kind == PUBLISH and (p.topic or "").startswith(topic_prefix)]

    def pubacks_out(self) -> list[Packet]:
        return [p for p in self.packets if p.direction == "out" and p.kind == PUBACK]

    async def before_forward(self, direction: str, first: int, body: bytes) -> None:
        """Called before each packet is passed on; a subclass may delay it (holding back the ones behind it)."""

    # -- plumbing -------------------------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        self._writers += [client_writer, up_writer]
        loop = asyncio.get_running_loop()
        for reader, writer, direction in ((client_reader, up_writer, "out"), (up_reader, client_writer, "in")):
            task = loop.create_task(self._pump(reader, writer, direction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while True:
                first = await reader.readexactly(1)
                header = bytearray(first)
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    header.append(byte)
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                self._record(direction, first[0], body)
                await self.before_forward(direction, first[0], body)
                writer.write(bytes(header) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _record(self, direction: str, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            topic_len = int.from_bytes(body[0:2], "big")
            topic = body[2:2 + topic_len].decode("utf-8", "replace")
            packet_id = int.from_bytes(body[2 + topic_len:4 + topic_len], "big") if qos else None
            self.packets.append(Packet(next_seq(), direction, kind, packet_id, topic, qos, bool(first & 0x08)))
        elif kind == PUBACK:
            self.packets.append(Packet(next_seq(), direction, kind, int.from_bytes(body[0:2], "big"), None, 1, False))
