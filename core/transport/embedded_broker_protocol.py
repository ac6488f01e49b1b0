"""The embedded broker's fixes to amqtt's session handling (see `core.transport.embedded_broker`): a login that keeps
persistent sessions, packets that arrive with the EOF handled, QoS 1 deliveries kept until their PUBACK.

These override private amqtt methods: pin ``amqtt==0.12.1``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import (
    OUTGOING,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

logger = logging.getLogger("core.embedded_broker")


class OpenAuthPlugin(BaseAuthPlugin):
    """Accepts every client without flagging it anonymous.

    amqtt's AnonymousAuthPlugin marks sessions anonymous, and anonymous
    sessions lose their queued messages and are deleted on disconnect.
    """

    async def authenticate(self, *, session: Session) -> bool | None:
        return True


class YieldAtEndReader(ReaderAdapter):
    """Yields to the loop once before reporting end of stream.

    amqtt's reader loop handles each packet in a new task and cancels the
    unstarted ones when the stream ends, so PUBLISH, PUBACK and DISCONNECT
    packets that arrived together with the EOF were never handled (lost
    messages, spurious redeliveries, a will sent after a clean DISCONNECT).
    """

    def __init__(self, inner: ReaderAdapter) -> None:
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        try:
            data = await self._inner.read(n)
        except asyncio.CancelledError:
            raise
        except Exception:
            await asyncio.sleep(0)
            raise
        if not data:
            await asyncio.sleep(0)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class ResumableHandler(BrokerProtocolHandler):
    """Keeps an outgoing QoS 1 message in flight until its PUBACK arrives.

    Stock amqtt waits 5 s for the PUBACK, then drops the message, and drops it
    too when the connection closes; MQTT 3.1.1 [MQTT-4.4.0-1] wants it resent
    when the session resumes. Deliveries also never block the session loop.
    """

    def __init__(self, plugins_manager: Any) -> None:
        super().__init__(plugins_manager)
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        super().attach(session, YieldAtEndReader(reader), writer)

    async def handle_connection_closed(self) -> None:
        # amqtt calls this on the first failed write too, which dropped the
        # PUBACKs and DISCONNECT still unread in the socket. The reader calls
        # it as well once it reaches the end, so let the reader decide.
        reader = self._reader_task
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            return
        await super().handle_connection_closed()

    def _stop_waiters(self) -> None:
        self._closed = True
        super()._stop_waiters()

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or self.session is None or app_message.packet_id is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        session = self.session
        packet_id = app_message.packet_id
        session.inflight_out[packet_id] = app_message  # type: ignore[assignment]
        if self._closed:
            return  # connection gone: resent when the session resumes
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return  # waiter cancelled because the connection closed; keep it in flight
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        session.inflight_out.pop(packet_id, None)

    async def handle_puback(self, puback: Any) -> None:
        # A PUBACK settles the message even when its waiter is already gone
        # (connection closing); amqtt would only log a warning.
        if puback.variable_header is None:
            return
        packet_id = puback.variable_header.packet_id
        if self.session is not None:
            self.session.inflight_out.pop(packet_id, None)
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(puback)

    async def _retry_deliveries(self) -> None:
        if self.session is None:
            return
        others: list[OutgoingApplicationMessage | IncomingApplicationMessage] = []
        for message in list(itertools.chain(self.session.inflight_in.values(), self.session.inflight_out.values())):
            if message.direction == OUTGOING and message.qos == QOS_1:
                # Not awaited: a subscriber that acks late must not stall its session.
                self._spawn(self._handle_message_flow(message))  # type: ignore[arg-type]
            else:
                others.append(message)  # type: ignore[arg-type]
        if others:  # QoS 2 flows: amqtt's own retry
            tasks = [asyncio.create_task(asyncio.wait_for(self._handle_message_flow(m), 10)) for m in others]
            await asyncio.wait(tasks)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(log_task_failure(self._background))


def log_task_failure(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("Embedded broker delivery failed: %s", exc, exc_info=exc)

    return done
