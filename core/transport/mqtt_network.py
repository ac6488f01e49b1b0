"""The MQTT client's network thread: connect and reconnect with backoff, and the I/O loop that reads
packets in batches, runs the loop thread's commands and writes. Part of `core.transport.mqtt_client.MqttClient`."""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.foundation.backoff import backoff_delay

log = logging.getLogger("core.mqtt")


class NetworkThread:
    """Mixin of `MqttClient`: what runs in its network thread (paho is used from this thread only)."""

    def _network_main(self) -> None:
        s = self.settings
        host, port = s.broker_host, s.broker_port
        attempt = 0
        first = True
        while not self._stopping:
            try:
                if first:
                    props = None
                    if self.v5:
                        props = Properties(PacketTypes.CONNECT)
                        props.SessionExpiryInterval = self._session_expiry
                        props.ReceiveMaximum = min(65535, self._receive_maximum)
                    self._info("%s: connecting to %s:%s as %r", self._name, host, port, self.client_id)
                    self._paho.connect(
                        host, port, keepalive=s.mqtt_keepalive, properties=props,
                        **({"clean_start": self._clean_start} if self.v5 else {}),
                    )
                    first = False
                else:
                    self._paho.reconnect()
                self._guard.before_connack()
            except (OSError, ssl.SSLError, ValueError) as exc:
                first = first and not isinstance(exc, OSError)
                delay = backoff_delay(attempt, s.mqtt_reconnect_min, s.mqtt_reconnect_max, random.random)
                self.state.last_error = str(exc)
                log.warning("%s: cannot connect to %s:%s (%s); retrying in %.1f s", self._name, host, port, exc, delay)
                attempt += 1
                self._sleep_running_commands(delay)
                continue
            rc = self._io_loop()
            if self.state.connected:
                attempt = 0
            if self._stopping or self._closing:
                break
            self._give_up(self._guard.connection_lost())
            if self._guard.probing:
                attempt = 0  # each reconnect narrows the search down: no need to back off further
            if not self._reconnect and self.state.connects:
                # An adoption (core/processes/adoption.py) never comes back: the session may have been taken over.
                self.state.lost = True
                self._info("%s: connection to %s:%s lost (%s); not reconnecting", self._name, host, port,
                           paho.error_string(rc))
                break
            delay = backoff_delay(attempt, s.mqtt_reconnect_min, s.mqtt_reconnect_max, random.random)
            log.warning("%s: connection to %s:%s lost (%s); reconnecting in %.1f s", self._name, host, port,
                        paho.error_string(rc), delay)
            attempt += 1
            self._sleep_running_commands(delay)
        self._run_commands()

    def _io_loop(self) -> int:
        """Serve one connection until it drops or we stop; returns paho's error code.

        Like paho's `loop()`, but it reads every packet already buffered before handing the
        batch to the application (one wake-up of the event loop per batch, not per message) and
        wakes on our own pipe when the loop thread queues commands.
        """
        p = self._paho
        wake_r = self._wake_r
        may_read = self._may_read
        reader = self._reader
        reader.reset()  # a new connection
        rc = paho.MQTT_ERR_SUCCESS
        while not self._stopping:
            sock = p.socket()
            if sock is None:
                return paho.MQTT_ERR_NO_CONN
            if self._commands or self._acks:
                self._run_commands()
            # Backpressure: while the application has no room, leave what the broker sends in the
            # socket (TCP flow control holds the broker back) but keep writing acks and pings, and
            # read while a PINGREQ waits for its answer: paho drops a connection whose PINGRESP
            # does not arrive within the keepalive (a well-behaved broker sends no more messages
            # beyond Receive Maximum meanwhile).
            reading = may_read() or p._ping_t != 0
            # Packets already in our buffer, or (TLS) bytes already decrypted: select() cannot see them.
            pending = getattr(sock, "pending", None)
            timeout = 0.0 if reading and (reader.has_packet() or (pending is not None and pending())) else 1.0
            try:
                readable, writable, _ = select.select([sock, wake_r] if reading else [wake_r],
                                                      [sock] if p.want_write() else [], [], timeout)
            except (OSError, ValueError, TypeError):
                return paho.MQTT_ERR_CONN_LOST
            if wake_r in readable:
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if reading and (sock in readable or timeout == 0.0):
                rc = self._read_batch()
                if self._on_batch_end is not None:
                    self._on_batch_end()
                if rc != paho.MQTT_ERR_SUCCESS:
                    return rc
            if self._commands or self._acks:
                self._run_commands()
            if p.want_write() or sock in writable:
                rc = p.loop_write()
                if rc != paho.MQTT_ERR_SUCCESS:
                    return rc
            rc = p.loop_misc()
            if rc != paho.MQTT_ERR_SUCCESS:
                return rc
        return rc

    def _read_batch(self, limit: int = 512) -> int:
        # One recv() for whatever the socket has, then every complete packet in it (core.transport.mqtt_reader).
        if self._paho._sock is None:
            return paho.MQTT_ERR_NO_CONN
        return self._reader.read(self._paho, self._may_read, limit)

    def _sleep_running_commands(self, delay: float) -> None:
        # While disconnected, publishes still queue up in paho (sent after the reconnect).
        deadline = time.monotonic() + delay
        while not self._stopping and not self._closing:
            self._wake.clear()
            self._run_commands()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)


def disable_nagle(sock: Any) -> None:
    """Send each packet at once (TCP_NODELAY).

    With Nagle's algorithm a small PUBACK written while an earlier segment is unacknowledged waits
    for the peer's delayed ACK (tens of ms): the broker then holds back further messages, which
    showed as 15-20 ms QoS 1 latency spikes at modest rates.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a test double): nothing to tune


def close_gracefully(sock: Any, timeout: float) -> None:
    """After our DISCONNECT: half-close, then read (and drop) until the broker closes its side.

    Closing a socket that still has unread data (messages the broker kept sending) makes the
    kernel reset the connection, and the broker then discards what it had not read yet: the last
    PUBACKs and the DISCONNECT. Those messages would be delivered again to the next session.
    """
    deadline = time.monotonic() + timeout
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            if readable and not sock.recv(65536):
                return
    except (OSError, ValueError):
        pass
