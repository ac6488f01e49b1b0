"""Acknowledgements in arrival order (MQTT-4.6.0-2), whatever order handlers finish in."""

from __future__ import annotations

from collections import deque
from typing import Callable


class AckTicket:
    """One delivered QoS>0 message waiting for its handlers to finish."""

    __slots__ = ("mid", "qos", "generation", "done")

    def __init__(self, mid: int, qos: int, generation: int) -> None:
        self.mid = mid
        self.qos = qos
        self.generation = generation
        self.done = False


class AckSequencer:
    """Holds back an ack until every message that arrived before it has been acked.

    Used from the event loop's thread only. A new connection generation drops the older
    tickets: the broker redelivers those messages on the new connection, so their acks must not
    be sent (their packet ids now mean something else).
    """

    __slots__ = ("_pending", "_send", "_generation")

    def __init__(self, send: Callable[[int, int, int], None]) -> None:
        self._pending: deque[AckTicket] = deque()
        self._send = send
        self._generation = 0

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, mid: int, qos: int, generation: int) -> AckTicket:
        if generation != self._generation:
            self._pending.clear()
            self._generation = generation
        ticket = AckTicket(mid, qos, generation)
        self._pending.append(ticket)
        return ticket

    def complete(self, ticket: AckTicket) -> None:
        ticket.done = True
        pending = self._pending
        send = self._send
        while pending and pending[0].done:
            head = pending.popleft()
            send(head.mid, head.qos, head.generation)
