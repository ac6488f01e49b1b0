"""The only place that talks MQTT: connect, reconnect, subscribe, manual acks, publish.

paho-mqtt's network loop runs in a thread of its own, so no handler (which runs on the asyncio
loop or in a thread pool) can starve keepalive. Messages are acknowledged only when the
application calls `ack()` (paho's manual acknowledgement), which `core.transport.acks.AckSequencer` does
in arrival order once the handlers have finished.

Threading: paho is used from the network thread only. The loop thread hands acks, publishes and
the final disconnect over as commands in a deque and wakes the network thread once per batch, so
paho writes each packet straight to the socket with no extra wake-up per packet and no two
threads ever write to the socket at once. The network thread's loop is `core.transport.mqtt_network`, paho's
callbacks are `core.transport.mqtt_callbacks` (both parts of `MqttClient`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import struct
import threading
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from core.foundation.config import Settings
from core.transport.mqtt_callbacks import PahoCallbacks, PublishError  # PublishError: also imported from here
from core.transport.mqtt_network import NetworkThread
from core.transport.mqtt_properties import install as install_fast_properties
from core.transport.mqtt_reader import PacketReader
from core.transport.orphans import DISCONNECT_WITH_WILL, notice_payload, notice_topic, notices_enabled
from core.transport.poison_guard import PoisonGuard
from core.foundation.tracing import Finish
from core.foundation.tracing import outgoing as outgoing_trace
from core.transport.wire import check_topic_name, encode_payload, publish_properties

log = logging.getLogger("core.mqtt")

install_fast_properties()  # paho decodes every MQTT 5 packet's properties with table lookups built once

MessageCallback = Callable[[paho.MQTTMessage, int], None]

_ACK_PACKET = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id
_PUBACK, _PUBCOMP = 0x40, 0x70


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


class MqttClient(NetworkThread, PahoCallbacks):
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
        # The orphan notice (core/transport/orphans.py): this client's will, cleared by its own connects.
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
        drain of a parked session, core/processes/adoption.py, waits for its SUBACK before it can begin)."""
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

        A topic or property the broker would refuse raises `core.transport.wire.WireError` here: nothing is sent.
        """
        finish = None
        if self.v5:  # inside a handler run: the message's trace context goes along (core.foundation.tracing)
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


def _settle_future(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)

