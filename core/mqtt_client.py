"""The only place that talks MQTT: connect, reconnect, subscribe, manual acks, publish.

paho-mqtt's network loop runs in a thread of its own, so no handler (which runs on the asyncio
loop or in a thread pool) can starve keepalive. Messages are acknowledged only when the
application calls `ack()` (paho's manual acknowledgement), which `core.acks.AckSequencer` does
in arrival order once the handlers have finished.

Threading: paho is used from the network thread only. The loop thread hands acks, publishes and
the final disconnect over as commands in a deque and wakes the network thread once per batch, so
paho writes each packet straight to the socket with no extra wake-up per packet and no two
threads ever write to the socket at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.backoff import backoff_delay
from core.config import Settings
from core.mqtt_properties import install as install_fast_properties
from core.mqtt_reader import PacketReader
from core.orphans import DISCONNECT_WITH_WILL, notice_payload, notice_topic, notices_enabled
from core.poison_guard import PoisonGuard
from core.tracing import Finish
from core.tracing import outgoing as outgoing_trace
from core.wire import check_topic_name, encode_payload, publish_properties

log = logging.getLogger("core.mqtt")

install_fast_properties()  # paho decodes every MQTT 5 packet's properties with table lookups built once

MessageCallback = Callable[[paho.MQTTMessage, int], None]

_ACK_PACKET = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id
_PUBACK, _PUBCOMP = 0x40, 0x70


class PublishError(RuntimeError):
    """The broker refused a publish, or the client could not queue it."""


@dataclass(frozen=True)
class Subscription:
    topic: str  # as sent to the broker, e.g. `$share/workers/sensors/+/data`
    qos: int
    subscription_id: int  # MQTT v5 subscription identifier (1-based)


@dataclass
class ConnectionState:
    connected: bool = False
    subscribed: bool = False
    session_present: bool = False
    connects: int = 0
    disconnects: int = 0
    publishes_abandoned: int = 0  # publishes given up because the broker closed the connection on each try
    sessions_lost: int = 0  # reconnects that found no session though we had one (the broker dropped it)
    last_error: str | None = None
    lost: bool = False  # the connection dropped and, with reconnect=False, is not made again


class MqttClient:
    """One MQTT connection for one process."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        on_message: MessageCallback,
        *,
        subscriptions: list[Subscription] | None = None,
        receive_maximum: int | None = None,
        session_expiry: int | None = None,
        clean_start: bool | None = None,
        name: str = "mqtt",
        on_batch_end: Callable[[], None] | None = None,
        may_read: Callable[[], bool] | None = None,
        quiet: bool = False,
        notice: bool = True,
        reconnect: bool = True,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.v5 = settings.mqtt_v5
        self.subscriptions: list[Subscription] = list(subscriptions or [])
        self.state = ConnectionState()
        self.subscription_ids_available = self.v5
        self._on_message = on_message
        self._on_batch_end = on_batch_end
        self._may_read = may_read or _always
        self._info = log.debug if quiet else log.info  # state changes of short-lived helper connections
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._receive_maximum = receive_maximum or settings.max_inflight
        self._session_expiry = settings.mqtt_session_expiry if session_expiry is None else session_expiry
        self._clean_start = settings.mqtt_clean_start if clean_start is None else clean_start
        # A reconnect should find the session of the previous connection (unless clean start or no expiry).
        self._keeps_session = not self._clean_start and (self._session_expiry > 0 or not self.v5)
        self.expect_session = False  # set before start(): a session of an earlier process with this id should exist
        self._name = name
        self._reconnect = reconnect
        # The orphan notice (core/orphans.py): this client's will, cleared by its own connects.
        self._notice_topic = (notice_topic(settings.mqtt_group_name, client_id)
                              if notice and notices_enabled(settings, self._session_expiry) else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False  # set before our own DISCONNECT, so its effects are not treated as a failure
        self._wake = threading.Event()
        self._generation = 0
        self._pending_subacks: dict[int, list[Subscription]] = {}
        self._pending_unsubacks: dict[int, asyncio.Future[None]] = {}
        self._pending_publishes: dict[int, asyncio.Future[None]] = {}
        self._commands: deque[Callable[[], None]] = deque()
        self._reader = PacketReader()
        self._acks: deque[tuple[int, int, int]] = deque()  # (mid, qos, generation), written before the commands
        self._commands_wake_pending = False
        self._publish_waiters = 0
        self._connected_event: asyncio.Event | None = None
        self._subscribed_event: asyncio.Event | None = None
        self._state_listeners: list[Callable[[str], None]] = []
        self._paho = self._make_paho()
        self._guard = PoisonGuard(self._paho, name, self._paho._max_inflight_messages)

    # -- setup -----------------------------------------------------------------------------------

    def _make_paho(self) -> paho.Client:
        s = self.settings
        if self.v5:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5, manual_ack=True,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311,
                clean_session=self._clean_start, manual_ack=True,
            )
        if s.mqtt_username is not None:
            client.username_pw_set(s.mqtt_username, s.mqtt_password)
        if s.mqtt_tls:
            client.tls_set(
                ca_certs=s.mqtt_tls_ca, certfile=s.mqtt_tls_cert, keyfile=s.mqtt_tls_key,
                cert_reqs=ssl.CERT_NONE if s.mqtt_tls_insecure else ssl.CERT_REQUIRED,
            )
            if s.mqtt_tls_insecure:
                client.tls_insecure_set(True)
        # Unlimited local queue: outgoing QoS>0 messages published while disconnected wait for the reconnect.
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(max(20, self._receive_maximum))
        if self._notice_topic is not None:
            will = Properties(PacketTypes.WILLMESSAGE)
            will.WillDelayInterval = int(math.ceil(s.mqtt_orphan_grace))
            client.will_set(self._notice_topic, notice_payload(s.mqtt_group_name, self.client_id), qos=1,
                            retain=True, properties=will)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_socket_close = self._handle_socket_close
        client.suppress_exceptions = True
        return client

    def add_state_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(event)` is called on the loop thread for 'connected', 'subscribed', 'disconnected'."""
        self._state_listeners.append(listener)

    @property
    def generation(self) -> int:
        """Increases with every successful connect; acks of an older generation are not sent."""
        return self._generation

    @property
    def publishes_pending(self) -> int:
        """QoS 1/2 publishes, unsubscribes and SUBSCRIBEs waiting for the broker's answer: reading must
        go on to it, even at MAX_INFLIGHT (the answer may be queued behind publishes not read yet; a
        drain of a parked session, core/adoption.py, waits for its SUBACK before it can begin)."""
        return self._publish_waiters + len(self._pending_subacks)

    # -- commands: loop thread -> network thread -------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wake_for_commands()

    def _wake_for_commands(self) -> None:
        if not self._commands_wake_pending:
            self._commands_wake_pending = True
            self._wake.set()
            self.wake()

    def wake(self) -> None:
        """Wake the network thread: to run queued commands, or to look again at `may_read` (any thread)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # pipe full: the network thread is awake anyway

    def _run_commands(self) -> None:
        """Write queued acks, then run queued commands (network thread only)."""
        self._commands_wake_pending = False
        if self._acks:
            self._write_acks()
        commands = self._commands
        while commands:
            command = commands.popleft()
            try:
                command()
            except Exception:
                log.exception("%s: network command failed", self._name)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start connecting in the network thread; returns at once (see `wait_subscribed`)."""
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        self._connected_event = asyncio.Event()
        self._subscribed_event = asyncio.Event()
        self._thread = threading.Thread(target=self._network_main, name=f"{self._name}-network", daemon=True)
        self._thread.start()

    async def wait_subscribed(self, timeout: float | None = None) -> bool:
        assert self._subscribed_event is not None, "start() first"
        try:
            await asyncio.wait_for(self._subscribed_event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, *, session_expiry: int | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly and stop the network thread.

        `session_expiry=0` ends the persistent session (a worker removed for good); by default the
        session is kept so messages published meanwhile wait for the next start, and the orphan
        notice (if any) is kept too: it is published unless this client id is back within the grace.
        """
        self._closing = True
        props = None
        if self.v5 and session_expiry is not None:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = session_expiry
        reason = None
        if self._notice_topic is not None and session_expiry != 0:
            reason = ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL)
        if self.state.connected:
            # Queued behind any final PUBACKs; the network thread writes it before it exits.
            self._submit(lambda: self._paho.disconnect(reasoncode=reason, properties=props))
        else:
            self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
        pending = list(self._pending_publishes.values())
        self._pending_publishes.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(PublishError("client stopped before the broker acknowledged the publish"))

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
                # An adoption (core/adoption.py) never comes back: the session may have been taken over.
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
        # One recv() for whatever the socket has, then every complete packet in it (core.mqtt_reader).
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

    # -- callbacks (network thread) -------------------------------------------------------------

    def _emit(self, event: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._emit_on_loop, event)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _emit_on_loop(self, event: str) -> None:
        if event == "connected" and self._connected_event is not None:
            self._connected_event.set()
        elif event == "subscribed" and self._subscribed_event is not None:
            self._subscribed_event.set()
        elif event == "disconnected":
            if self._connected_event is not None:
                self._connected_event.clear()
            if self._subscribed_event is not None:
                self._subscribed_event.clear()
        for listener in self._state_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: state listener failed on %r", self._name, event)

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self.state.last_error = str(reason)
            log.error("%s: broker refused the connection: %s", self._name, reason)
            return
        self._generation += 1
        self.state.connected = True
        self._guard.connected()
        _disable_nagle(client.socket())
        had_session = self._keeps_session and (self.state.connects > 0 or self.expect_session)
        self.state.connects += 1
        self.state.session_present = bool(flags.session_present)
        if self.v5 and properties is not None:
            available = getattr(properties, "SubscriptionIdentifierAvailable", 1)
            self.subscription_ids_available = bool(available)
        if had_session and not self.state.session_present:
            self.state.sessions_lost += 1
            log.warning(
                "%s: connected to %s:%s as %r, but the broker dropped the session this client had (restarted without "
                "saving it, or it expired): the messages queued in it for this client are lost; subscribing again",
                self._name, self.settings.broker_host, self.settings.broker_port, self.client_id,
            )
        else:
            self._info(
                "%s: connected to %s:%s as %r (%s session)", self._name, self.settings.broker_host,
                self.settings.broker_port, self.client_id, "resumed" if self.state.session_present else "new",
            )
        self._emit("connected")
        if self._notice_topic is not None:
            # This id is back: its notice (if the grace ran out meanwhile) no longer stands.
            client.publish(self._notice_topic, b"", qos=1, retain=True)
        self._subscribe_all()

    def _subscribe_all(self) -> None:
        self.state.subscribed = False
        self._pending_subacks.clear()
        if not self.subscriptions:
            self.state.subscribed = True
            self._emit("subscribed")
            return
        if self.v5:
            for sub in self.subscriptions:
                props = None
                if self.subscription_ids_available:
                    props = Properties(PacketTypes.SUBSCRIBE)
                    props.SubscriptionIdentifier = sub.subscription_id
                rc, mid = self._paho.subscribe(sub.topic, options=SubscribeOptions(qos=sub.qos), properties=props)
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subacks[mid] = [sub]
        else:
            rc, mid = self._paho.subscribe([(sub.topic, sub.qos) for sub in self.subscriptions])
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks[mid] = list(self.subscriptions)

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any) -> None:
        subs = self._pending_subacks.pop(mid, None)
        if subs is None:
            return
        for sub, code in zip(subs, reason_codes):
            if code.is_failure:
                log.error("%s: broker refused the subscription %r (qos %d): %s", self._name, sub.topic, sub.qos, code)
        if not self._pending_subacks:
            self.state.subscribed = True
            self._info("%s: subscribed to %d filter(s)", self._name, len(self.subscriptions))
            self._emit("subscribed")

    def _handle_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        fut = self._pending_unsubacks.pop(mid, None)
        if fut is not None:
            self._settle(fut, None)

    def _handle_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._closing:
            _close_gracefully(sock, 2.0)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        was_connected = self.state.connected
        if self._closing:
            self._stopping = True
        self.state.connected = False
        self.state.subscribed = False
        if was_connected:
            self.state.disconnects += 1
            if self._closing:
                self._info("%s: disconnected", self._name)
            else:
                log.warning("%s: disconnected from broker: %s", self._name, reason)
            self._emit("disconnected")

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(message, self._generation)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        if self._guard.probing:
            self._guard.acknowledged(mid)
        fut = self._pending_publishes.pop(mid, None)
        if fut is not None:
            failed = reason is not None and getattr(reason, "is_failure", False)
            self._settle(fut, PublishError(f"broker refused the publish: {reason}") if failed else None)

    def _give_up(self, messages: list[paho.MQTTMessage]) -> None:
        for message in messages:
            self.state.publishes_abandoned += 1
            log.error("%s: giving up on the publish to %r (mid %d): the broker closed the connection each time it was "
                      "sent (see the broker's log for why)", self._name, message.topic, message.mid)
            fut = self._pending_publishes.pop(message.mid, None)
            if fut is not None:
                self._settle(fut, PublishError(
                    f"publish to {message.topic!r} abandoned: the broker closed the connection each time it was sent"))

    # -- API (loop thread) ----------------------------------------------------------------------

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge a delivered message; skipped if the connection it came on is gone."""
        self._acks.append((mid, qos, generation))
        self._wake_for_commands()

    def _write_acks(self) -> None:
        # What paho's ack() sends with manual_ack (PUBACK for QoS 1, PUBCOMP for QoS 2), but all
        # of them in one queued packet: one send() (and one wake-up of paho's own pipe) per batch.
        acks = self._acks
        generation, connected = self._generation, self.state.connected
        data = bytearray()
        while acks:
            mid, qos, ack_generation = acks.popleft()
            if ack_generation == generation and connected:
                data += _ACK_PACKET.pack(_PUBACK if qos == 1 else _PUBCOMP, 2, mid)
        if data:
            self._paho._packet_queue(_PUBACK, bytes(data), 0, 0)

    async def unsubscribe(self, topics: list[str] | None = None, timeout: float = 10.0) -> bool:
        """Remove subscriptions (default: all of ours) and wait for the broker's UNSUBACK.

        They are also dropped from the list resubscribed after a reconnect. False if not connected
        or no UNSUBACK came within `timeout` (the session then still holds them).
        """
        topics = [sub.topic for sub in self.subscriptions] if topics is None else list(topics)
        self.subscriptions = [sub for sub in self.subscriptions if sub.topic not in topics]
        if not topics or not self.state.connected:
            return not topics
        loop = self._loop
        assert loop is not None, "start() first"
        fut: asyncio.Future[None] = loop.create_future()

        def send() -> None:
            rc, mid = self._paho.unsubscribe(topics)
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_unsubacks[mid] = fut
            else:
                self._settle(fut, PublishError(f"unsubscribe failed: {paho.error_string(rc)}"))

        self._publish_waiters += 1
        try:
            self._submit(send)
            await asyncio.wait_for(fut, timeout)
            return True
        except (asyncio.TimeoutError, PublishError):
            return False
        finally:
            self._publish_waiters -= 1

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        *,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """Publish; with qos>0, return once the broker acknowledged it (PUBACK/PUBCOMP).

        A topic or property the broker would refuse raises `core.wire.WireError` here: nothing is sent.
        """
        finish = None
        if self.v5:  # inside a handler run: the message's trace context goes along (core.tracing)
            properties, finish = outgoing_trace(properties, topic)
        await self._publish(topic, payload, qos, retain, properties, finish)

    async def _publish(self, topic: str, payload: Any, qos: int, retain: bool, properties: dict[str, Any] | None,
                       finish: Finish | None) -> None:
        try:
            check_topic_name(topic)
            data = encode_payload(payload)
            props = publish_properties(properties) if properties and self.v5 else None
            loop = self._loop
            assert loop is not None, "start() first"
            fut: asyncio.Future[None] = loop.create_future()
            self._publish_waiters += qos > 0
            try:
                self._submit(partial(self._publish_now, fut, topic, data, qos, retain, props))
                await fut
            finally:
                self._publish_waiters -= qos > 0
        except BaseException as exc:
            if finish is not None:
                finish(exc)  # the PRODUCER span (TRACING=otel) ends with the publish
            raise
        if finish is not None:
            finish(None)

    def publish_sync(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        *,
        properties: dict[str, Any] | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        """`publish` for plain (sync) handlers, which run in the thread pool: blocks until done."""
        loop = self._loop
        assert loop is not None, "start() first"
        if threading.get_ident() == self._loop_thread_id:
            raise RuntimeError("publish_sync() would block the event loop; use `await client.publish(...)` here")
        finish = None
        if self.v5:  # the handler's trace lives in this thread's context, not in the loop's
            properties, finish = outgoing_trace(properties, topic)
        asyncio.run_coroutine_threadsafe(self._publish(topic, payload, qos, retain, properties, finish),
                                         loop).result(timeout)

    def _publish_now(self, fut: asyncio.Future[None], topic: str, data: bytes, qos: int, retain: bool,
                     props: Properties | None) -> None:
        try:
            info = self._paho.publish(topic, data, qos, retain, props)
        except (ValueError, TypeError) as exc:
            self._settle(fut, PublishError(f"publish to {topic!r} rejected: {exc}"))
            return
        if qos == 0:
            ok = info.rc == paho.MQTT_ERR_SUCCESS
            self._settle(fut, None if ok else PublishError(f"QoS 0 publish to {topic!r} failed: {paho.error_string(info.rc)}"))
        elif info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST):
            # NO_CONN, or the connection broke while writing it (CONN_LOST): paho keeps the message and
            # sends it after the reconnect, so wait for that PUBACK (is_published() would raise here).
            if info.rc == paho.MQTT_ERR_SUCCESS and info.is_published():
                self._settle(fut, None)
            else:
                self._pending_publishes[info.mid] = fut
        else:
            self._settle(fut, PublishError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}"))

    def _settle(self, fut: asyncio.Future[None], error: BaseException | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_settle_future, fut, error)
        except RuntimeError:
            pass


def _always() -> bool:
    return True


def _disable_nagle(sock: Any) -> None:
    """Send each packet at once (TCP_NODELAY).

    With Nagle's algorithm a small PUBACK written while an earlier segment is unacknowledged waits
    for the peer's delayed ACK (tens of ms): the broker then holds back further messages, which
    showed as 15-20 ms QoS 1 latency spikes at modest rates.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a test double): nothing to tune


def _close_gracefully(sock: Any, timeout: float) -> None:
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


def _settle_future(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)

