"""The zero-install MQTT broker, run inside the application's own event loop.

It wraps amqtt (MQTT 3.1.1 only) and adds what the framework relies on:

* shared subscriptions: a client subscribing ``$share/<group>/<filter>`` joins
  ``group`` for ``filter``; each matching message goes to exactly one member of
  each (group, filter) pair, round-robin over the connected members (MQTT 5
  semantics: every pair is an independent subscription). When no member is
  connected, the message waits in an offline member's persistent session.
* QoS 1 deliveries stay in the session until the subscriber acknowledges them,
  so a subscriber that disconnects without PUBACK gets them again when it
  resumes its session (stock amqtt forgets them after 5 s or on disconnect).
* persistent sessions (clean_session=False) keep their messages while offline
  (stock amqtt's default anonymous login discards such sessions).

These patches override private amqtt methods: pin ``amqtt==0.12.1``.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import socket
from collections import deque
from collections.abc import Coroutine
from typing import Any

import amqtt
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session

from core.transport.embedded_broker_protocol import OpenAuthPlugin, ResumableHandler, log_task_failure

__all__ = ["EmbeddedBroker", "EmbeddedBrokerError", "parse_shared_filter"]

SUPPORTED_AMQTT_VERSION = "0.12.1"
SHARE_PREFIX = "$share/"
_SUBACK_FAILURE = 0x80
_OWNER_KEY = "core.embedded_broker.handler"

logger = logging.getLogger("core.embedded_broker")

# True while the broker handles a SUBSCRIBE packet; retained messages go out only then.
_subscribing: contextvars.ContextVar[bool] = contextvars.ContextVar("embedded_broker_subscribing", default=False)


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start; the message says what to change."""


def parse_shared_filter(topic_filter: str) -> tuple[str, str] | None:
    """Split ``$share/<group>/<filter>`` into ``(group, filter)``; ``None`` for a plain filter.

    Raises ValueError for a malformed shared filter.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, sep, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not sep or not group or not inner or "+" in group or "#" in group:
        raise ValueError(f"invalid shared subscription {topic_filter!r}: expected $share/<group>/<filter>")
    return group, inner


class _SharedSubscriptionBroker(Broker):
    """amqtt's Broker with shared subscriptions and resumable QoS 1 delivery.

    Shared subscriptions live in amqtt's own subscription table under their
    full ``$share/<group>/<filter>`` key, so subscribe, unsubscribe and session
    cleanup work unchanged; only routing (``_run_broadcast``) knows about them.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._share_cursor: dict[str, int] = {}
        self._share_filters: dict[str, str] = {}
        self._deliveries: set[asyncio.Task[Any]] = set()

    # --- connections -------------------------------------------------------

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        _, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        handler = ResumableHandler(self.plugins_manager)
        session.attributes[_OWNER_KEY] = handler
        return handler, session

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        if client_session.attributes.get(_OWNER_KEY, handler) is not handler:
            # A newer connection took this session over; it stays connected.
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        await super()._client_message_loop(client_session, handler)
        # amqtt stops at the disconnect and leaves publishes it has already
        # acknowledged in the queue (lost for a clean session): route them now.
        queue = client_session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            delivered: asyncio.Future[Any] = loop.create_future()
            delivered.set_result(queue.get_nowait())
            await self._handle_message_delivery(client_session, handler, delivered)

    # --- subscriptions -----------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, _ = subscription
        try:
            parse_shared_filter(topic_filter)
        except ValueError:
            return _SUBACK_FAILURE
        granted = await super().add_subscription(subscription, session)
        if granted != _SUBACK_FAILURE:  # a repeated SUBSCRIBE replaces the QoS
            entries = self._subscriptions.get(topic_filter, [])
            for index, (member, _qos) in enumerate(entries):
                if member.client_id == session.client_id:
                    entries[index] = (member, granted)
        return granted

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        token = _subscribing.set(True)
        try:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
        finally:
            _subscribing.reset(token)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt also calls this on every reconnect for every filter of every
        # client; MQTT sends retained messages only for a new subscription,
        # and never to a shared one.
        topic_filter, qos = subscription
        if not _subscribing.get() or topic_filter.startswith(SHARE_PREFIX):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter):
                retained_qos = retained.qos if retained.qos is not None else qos
                self._track(handler.mqtt_publish(retained.topic, retained.data, min(qos, retained_qos), retain=True))

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # The messages queued while the session was offline; amqtt would send
        # them with the RETAIN flag and block the session until all are acked.
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            self._track(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))

    # --- routing -------------------------------------------------------------

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        # One copy per client, at the highest QoS of the subscriptions it is delivered for (MQTT
        # 3.1.1 section 3.3.5; Mosquitto does the same for plain filters); amqtt sent one per
        # matching filter. Each (group, filter) pair is a subscription of its own and picks one
        # member. MQTT 3.1.1 has no subscription identifiers, so a client cannot tell the copy of
        # its plain subscription from the copy of its shared one and runs every matching route
        # for each: the copy it was picked for is folded into the one it gets anyway.
        copies: dict[str | None, tuple[Session, int]] = {}
        for key, subscriptions in list(self._subscriptions.items()):
            if not subscriptions:
                continue
            if not key.startswith(SHARE_PREFIX):
                if self._matches(topic, key):
                    for target, sub_qos in subscriptions:
                        _add_copy(copies, target, sub_qos)
            elif self._matches(topic, self._shared_filter(key)):
                picked = self._pick_member(key, subscriptions, broadcast)
                if picked is not None:
                    _add_copy(copies, *picked)
        for target, sub_qos in copies.values():
            await self._deliver(broadcast, target, sub_qos)

    def _shared_filter(self, key: str) -> str:
        inner = self._share_filters.get(key)
        if inner is None:
            parsed = parse_shared_filter(key)
            inner = self._share_filters[key] = parsed[1] if parsed else key
        return inner

    def _pick_member(
        self, key: str, members: list[tuple[Session, int]], broadcast: dict[str, Any]
    ) -> tuple[Session, int] | None:
        """Next connected member round-robin; else an offline persistent one."""
        count = len(members)
        start = self._share_cursor.get(key, 0) % count
        order = [(start + i) % count for i in range(count)]
        for index in order:
            if members[index][0].transitions.state == "connected":
                self._share_cursor[key] = index + 1
                return members[index]
        for index in order:
            member, sub_qos = members[index]
            if _keeps_offline_messages(member, broadcast.get("qos", sub_qos)):
                self._share_cursor[key] = index + 1
                return members[index]
        return None

    async def _deliver(self, broadcast: dict[str, Any], target: Session, sub_qos: int) -> None:
        """One copy of ``broadcast`` to ``target``, as amqtt's broadcast loop does."""
        qos = broadcast.get("qos", sub_qos)
        if not await self._topic_filtering(target, topic=broadcast["topic"], action=Action.RECEIVE):
            return
        if target.transitions.state != "connected":
            if _keeps_offline_messages(target, qos):
                await self._retain_broadcast_message(broadcast, qos, target)
            return
        handler = self._get_handler(target)
        if handler is not None:
            self._track(handler.mqtt_publish(broadcast["topic"], broadcast["data"], qos, retain=False))

    def _track(self, coro: Coroutine[Any, Any, Any]) -> None:
        # amqtt reaps its delivery tasks in order; one unacked message would
        # pin every later task in memory, so deliveries are tracked in a set.
        task = asyncio.ensure_future(coro)
        self._deliveries.add(task)
        task.add_done_callback(log_task_failure(self._deliveries))

    async def shutdown(self) -> None:
        await super().shutdown()
        pending = list(self._deliveries)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _add_copy(copies: dict[str | None, tuple[Session, int]], target: Session, sub_qos: int) -> None:
    known = copies.get(target.client_id)
    if known is None or sub_qos > known[1]:
        copies[target.client_id] = (target, sub_qos)


def _keeps_offline_messages(session: Session, qos: int | None) -> bool:
    return not session.clean_session and qos in (QOS_1, QOS_2) and not session.is_anonymous


class _BareConnectionFilter(logging.Filter):
    """A connection closed before its first packet (a port check, a TCP health probe) is no error:
    amqtt logs it at ERROR and WARNING; log it at DEBUG instead."""

    _MARK = "No data to decode MQTT packet fixed header"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self._MARK in record.getMessage():
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_BARE_CONNECTIONS = _BareConnectionFilter()


def _quiet_amqtt_logs() -> None:
    """amqtt logs every connection at INFO; keep it to warnings unless debugging."""
    broker_log = logging.getLogger("amqtt.broker")
    if _BARE_CONNECTIONS not in broker_log.filters:
        broker_log.addFilter(_BARE_CONNECTIONS)
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in ("amqtt", "transitions"):
        named = logging.getLogger(name)
        if named.level == logging.NOTSET:
            named.setLevel(logging.WARNING)


def _port_in_use_message(host: str, port: int) -> str:
    use_existing = f"MQTT_BROKER={host}" if port == 1883 else f"MQTT_BROKER={host} MQTT_PORT={port}"
    return (
        f"Port {port} on {host} is already in use, so the embedded broker cannot start. "
        f"Either use the broker that is there ({use_existing}) or pick another port for the "
        f"embedded one (EMBEDDED_BROKER_PORT={_suggest_port(host, port)})."
    )


def _suggest_port(host: str, port: int) -> int:
    for candidate in range(port + 1, min(port + 20, 65535) + 1):
        if _bind_error(host, candidate) is None:
            return candidate
    return port + 1 if port < 65535 else 1884


def _bind_error(host: str, port: int) -> OSError | None:
    """Try to bind ``host:port`` the way the broker will; the error, if any."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Same option as the real listener, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _cannot_listen_message(host: str, port: int, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return _port_in_use_message(host, port)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"The embedded broker cannot listen on {host}:{port} ({reason}). "
        f"Set EMBEDDED_BROKER_HOST / EMBEDDED_BROKER_PORT, or MQTT_BROKER to use another broker."
    )


class EmbeddedBroker:
    """An MQTT 3.1.1 broker with shared subscriptions, in the caller's event loop.

    Messages live in memory only: they are gone when the process ends.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self._host = host
        self._port = port
        self._broker: _SharedSubscriptionBroker | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port (the real one once started, if 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """Where clients connect, e.g. ``mqtt://127.0.0.1:1883``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        """Start listening; returns once clients can connect.

        Raises EmbeddedBrokerError (one line, no traceback needed) when the
        address cannot be used, e.g. the port is already taken.
        """
        if self._broker is not None:
            raise EmbeddedBrokerError(f"The embedded broker is already running at {self.url}.")
        _quiet_amqtt_logs()
        if amqtt.__version__ != SUPPORTED_AMQTT_VERSION:
            logger.warning(
                "The embedded broker patches amqtt %s internals but amqtt %s is installed; "
                "install amqtt==%s if shared subscriptions or redelivery misbehave.",
                SUPPORTED_AMQTT_VERSION, amqtt.__version__, SUPPORTED_AMQTT_VERSION,
            )
        if self._port != 0 and (error := _bind_error(self._host, self._port)) is not None:
            raise EmbeddedBrokerError(_cannot_listen_message(self._host, self._port, error))

        broker = _SharedSubscriptionBroker(self._config())
        try:
            await broker.start()
        except BrokerError as exc:  # lost a race for the port, or a bad host
            raise EmbeddedBrokerError(_cannot_listen_message(self._host, self._port, exc.__cause__ or exc)) from None
        self._broker = broker
        if self._port == 0:
            self._port = self._bound_port(broker)
        logger.info("Embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        """Disconnect every client and stop listening; a no-op if not running."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def connected_client_ids(self) -> set[str]:
        """Ids of the clients connected right now (for status pages and tests)."""
        if self._broker is None:
            return set()
        return {
            client_id
            for client_id, (session, _) in self._broker.sessions.items()
            if session.transitions.state == "connected"
        }

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _config(self) -> dict[str, Any]:
        host = f"[{self._host}]" if ":" in self._host else self._host
        auth_plugin = f"{OpenAuthPlugin.__module__}.{OpenAuthPlugin.__qualname__}"
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self._port}"}},
            # No $SYS publisher and no per-packet event loggers: only open auth.
            "plugins": {auth_plugin: {}},
        }

    @staticmethod
    def _bound_port(broker: _SharedSubscriptionBroker) -> int:
        server = broker._servers["default"].instance
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1])
