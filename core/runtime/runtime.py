"""One process's runtime: MQTT client + dispatcher + plug-in services, started and drained together.

The main process and every worker run this; only the routes (and so the subscriptions) differ.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Sequence

from core.foundation.config import Settings
from core.routing.context import Services
from core.runtime.dispatcher import Dispatcher
from core.transport.mqtt_client import MqttClient, Subscription
from core.routing.router import Route, RouteTable
from core.runtime.stats import ProcessStats
from core.foundation.tracing import configure as configure_tracing

log = logging.getLogger("core.runtime")


class RuntimeHook(Protocol):
    """A service that lives as long as the runtime (outbox processor, stream consumers, heartbeat...)."""

    async def start(self, runtime: "Runtime") -> None: ...

    async def stop(self, runtime: "Runtime") -> None: ...

    # Optional: `route_bridge(route, services)`, a chain that replaces the handler of the routes the hook
    # takes over (core.runtime.dispatcher.RouteBridge; the stream writer of `stream=` routes).


class Runtime:
    """Serve `routes` on one MQTT connection until `stop()` is called."""

    def __init__(
        self,
        settings: Settings,
        routes: Sequence[Route],
        *,
        client_id: str | None = None,
        worker_id: str = "main",
        hooks: Sequence[RuntimeHook] = (),
        session_expiry: int | None = None,
        quiet: bool = False,
        reconnect: bool = True,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.client_id = client_id or settings.mqtt_client_id
        self.table = RouteTable(routes)
        configure_tracing(settings.tracing, self.client_id)  # before the dispatcher builds its chains
        self.stats = ProcessStats()
        self.hooks: list[RuntimeHook] = list(hooks)
        self.subscriptions = [
            Subscription(route.subscription_topic(settings.mqtt_group_name), route.qos, index + 1)
            for index, route in enumerate(self.table.routes)
            if route.subscribe  # stream consumers (`Router.stream`) have no MQTT side
        ]
        self.client = MqttClient(
            settings, self.client_id, self._on_message_network_thread, subscriptions=self.subscriptions,
            receive_maximum=settings.max_inflight, session_expiry=session_expiry, name=f"mqtt[{worker_id}]",
            on_batch_end=self._wake_loop, may_read=self._has_room, quiet=quiet, reconnect=reconnect,
        )
        state = self.client.state  # MQTT counters in every process's stats (the supervisor sums them)
        self.stats.extensions["mqtt_publishes_abandoned"] = lambda: state.publishes_abandoned
        self.stats.extensions["mqtt_sessions_lost"] = lambda: state.sessions_lost
        self.services = Services(self.client, worker_id)
        self.executor = ThreadPoolExecutor(max_workers=settings.sync_handler_threads, thread_name_prefix="handler")
        self.dispatcher = Dispatcher(
            self.table, settings, self.services, self.stats, self.client.ack, self.executor,
            use_subscription_ids=lambda: self.client.subscription_ids_available,
            on_complete=self._on_complete,
            bridges=[bridge for hook in self.hooks if (bridge := getattr(hook, "route_bridge", None)) is not None],
        )
        self._max_inflight = settings.max_inflight
        self._resume_at = settings.max_inflight - max(1, settings.max_inflight // 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[tuple[Any, int]] = deque()
        self._wakeup_scheduled = False
        self._received = 0  # written by the network thread only
        self._paused = False  # reading stopped at MAX_INFLIGHT (network thread sets, both read)
        self._resume_woken = False  # the loop thread woke the network thread for this pause (loop thread sets)
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self.drained_cleanly = True
        self._info = log.debug if quiet else log.info

    # -- network thread -> loop ---------------------------------------------------------------

    def _on_message_network_thread(self, message: Any, generation: int) -> None:
        self._received += 1
        self._inbox.append((message, generation))

    def _has_room(self) -> bool:
        """Network thread: may it read another message from the socket?

        Backpressure: no once MAX_INFLIGHT messages are queued or running, until they are down to
        `_resume_at` (a quarter of the limit lower), so that under sustained load the threads
        hand over batches of messages rather than one wake-up each way per message. On MQTT 5
        the broker should never have more than Receive Maximum (= MAX_INFLIGHT) unacknowledged
        QoS 1/2 messages out to us, but Mosquitto 2.0.x overshoots it by hundreds when acks
        trickle in during a backlog, and QoS 0 (and 3.1.1) have no such limit at all. Reading goes
        on while a handler waits for a PUBACK of its own publish: only this thread can read it.
        """
        if self.client.publishes_pending or self._stopping:
            self._paused = False
            return True
        outstanding = self._received - self.dispatcher.completed
        if self._paused:
            if outstanding > self._resume_at:
                return False
            self._paused = False
            return True
        if outstanding < self._max_inflight:
            return True
        self._wake_loop()  # the loop must see what is queued, or no room would ever free up
        # Publish the flag, then look again: a handler finishing in between sees the flag.
        self._resume_woken = False
        self._paused = True
        if self._received - self.dispatcher.completed <= self._resume_at:
            self._paused = False
            return True
        return False

    def _wake_loop(self) -> None:
        """Network thread: hand the messages read so far to the event loop (once per batch)."""
        if self._inbox and not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._drain_inbox)
                except RuntimeError:
                    pass  # loop closed: the process is exiting and the message stays unacked

    def _drain_inbox(self) -> None:
        self._wakeup_scheduled = False
        inbox = self._inbox
        submit = self.dispatcher.submit
        while inbox:
            message, generation = inbox.popleft()
            submit(message, generation)

    def _on_complete(self) -> None:
        # One wake per pause: the network thread reads on once it looks again, whoever finishes next.
        if self._paused and not self._resume_woken and self._received - self.dispatcher.completed <= self._resume_at:
            self._resume_woken = True
            self.client.wake()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe (in the background) and start hooks."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        started: list[RuntimeHook] = []
        try:
            for hook in self.hooks:
                await hook.start(self)
                started.append(hook)
        except BaseException:
            for hook in reversed(started):  # leave nothing running behind a start that failed
                try:
                    await hook.stop(self)
                except Exception:
                    log.exception("stopping hook %r after a failed start", hook)
            raise
        self.client.start(self._loop)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once connected and subscribed."""
        return await self.client.wait_subscribed(timeout)

    def request_stop(self) -> None:
        """Ask `run()` to drain and return (safe to call from a signal handler on the loop)."""
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self) -> bool:
        """Start, serve until `request_stop()`, then drain. Returns True if everything drained cleanly."""
        await self.start()
        assert self._stop_event is not None
        await self._stop_event.wait()
        return await self.stop()

    async def stop(self, *, session_expiry: int | None = None) -> bool:
        """Stop receiving, finish in-flight handlers (up to SHUTDOWN_TIMEOUT), ack them, disconnect."""
        self._stopping = True
        self.client.wake()
        self.dispatcher.stop_accepting()
        self._drain_inbox()  # messages already handed over are counted, not silently lost
        self._info("stopping: %d handler(s) in flight", self.dispatcher.inflight)
        clean = await self.dispatcher.drain(self.settings.shutdown_timeout)
        # Give paho a moment to write the final PUBACKs before DISCONNECT.
        await asyncio.sleep(0)
        for hook in reversed(self.hooks):
            try:
                await hook.stop(self)
            except Exception:
                log.exception("stopping %r failed", hook)
        await self.client.stop(session_expiry=session_expiry)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.stats.dropped_on_shutdown:
            log.info("%d message(s) arrived during shutdown and were left to the broker (QoS 1/2 are redelivered)",
                     self.stats.dropped_on_shutdown)
        self.drained_cleanly = clean
        self._info("stopped (%s)", "drained" if clean else "handlers cancelled")
        return clean
