"""Find a publish the broker answers by closing the connection, and give up on it.

Paho keeps every unacknowledged QoS 1/2 publish and sends it again after each reconnect. If the
broker refuses one of them by dropping the connection (Mosquitto does so for a malformed string),
the client would reconnect, resend and be dropped for ever. `core.transport.wire` stops the known causes
before they are sent; this guard is the safety net for the rest.

How it tells: when the connection is lost within `window` seconds of sending while publishes were
waiting for their acknowledgement, it stops trusting those publishes. From the next connection
on they are resent one at a time (paho's in-flight limit set to 1), so a drop within `window` of
a send has exactly one suspect. A message that is the sole suspect of `strikes` drops in a row is
removed from paho's queue and handed back to be failed. Once every message it distrusted is
acknowledged or given up, the normal in-flight limit comes back. Acknowledgements cannot show the
culprit without this: a broker that closes on a bad packet resets the socket, and the PUBACKs it
wrote for the packets before it are lost with the connection.

Runs on the MQTT network thread only, between paho calls (paho's own lock is still taken).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import paho.mqtt.client as paho

log = logging.getLogger("core.mqtt")

_WAITING = (paho.mqtt_ms_wait_for_puback, paho.mqtt_ms_wait_for_pubrec)


class PoisonGuard:
    """Watches one paho client's outgoing queue across connection losses (network thread only)."""

    def __init__(self, client: paho.Client, name: str, inflight: int, *, window: float = 2.0, strikes: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._paho = client
        self._name = name
        self._inflight = inflight  # paho's normal in-flight limit, restored after probing
        self.window = window
        self.strikes = strikes
        self._clock = clock
        self.probing = False
        self._distrusted: set[int] = set()  # id() of the MQTTMessage objects under suspicion
        self._last_send: float | None = None  # CONNACK (paho resends then), or the last ack while probing
        self._suspect: paho.MQTTMessage | None = None
        self._suspect_drops = 0

    def connected(self) -> None:
        """CONNACK received: paho resends what it holds now."""
        self._last_send = self._clock()

    def acknowledged(self, mid: int) -> None:
        """The broker acknowledged `mid` (called before paho drops it and sends the next one)."""
        if not self.probing:
            return
        self._last_send = self._clock()
        message = self._paho._out_messages.get(mid)
        if message is not None:
            self._distrusted.discard(id(message))
        if self._suspect is message:
            self._suspect, self._suspect_drops = None, 0
        if not self._distrusted:
            self._stop_probing()

    def connection_lost(self) -> list[paho.MQTTMessage]:
        """After a loss we did not cause: the messages given up (already removed from paho's queue)."""
        last_send, self._last_send = self._last_send, None
        if last_send is None:
            return []  # no CONNACK on that connection: nothing was sent
        p = self._paho
        with p._out_message_mutex:
            waiting = [m for m in p._out_messages.values() if m.qos > 0 and m.state in _WAITING]
        if not waiting or self._clock() - last_send > self.window:
            self._suspect, self._suspect_drops = None, 0
            return []
        if not self.probing:
            self.probing = True
            self._distrusted = {id(m) for m in waiting}
            p._max_inflight_messages = 1
            log.warning("%s: the broker closed the connection right after %d publish(es) were sent; resending them "
                        "one at a time to find one it refuses", self._name, len(waiting))
            return []
        if len(waiting) != 1:
            return []
        message = waiting[0]
        if message is self._suspect:
            self._suspect_drops += 1
        else:
            self._suspect, self._suspect_drops = message, 1
        if self._suspect_drops < self.strikes:
            return []
        with p._out_message_mutex:
            p._out_messages.pop(message.mid, None)
        self._distrusted.discard(id(message))
        self._suspect, self._suspect_drops = None, 0
        if not self._distrusted:
            self._stop_probing()
        return [message]

    def before_connack(self) -> None:
        """After paho's reconnect() reset its queue: while probing, let only the first publish go out."""
        if not self.probing:
            return
        p = self._paho
        first = True
        with p._out_message_mutex:
            for message in p._out_messages.values():
                if message.qos == 0 or message.state != paho.mqtt_ms_publish:
                    continue
                if first:
                    first = False
                else:
                    message.state = paho.mqtt_ms_queued

    def _stop_probing(self) -> None:
        self.probing = False
        self._distrusted.clear()
        self._paho._max_inflight_messages = self._inflight
        log.info("%s: publishes flow normally again", self._name)
