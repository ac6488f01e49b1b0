"""Adopt the sessions other replicas left behind (docs/workers.md, "Replicas that go away").

Every client of the app registers an orphan notice (core/transport/orphans.py): a retained will, delayed by
MQTT_ORPHAN_GRACE, naming its client id. `OrphanWatch` runs once per pod (in the single process,
or in the supervisor) and adopts the sessions those notices name: it connects with the named
client id, leaves the shared groups, handles what is parked there with this app's routes behind
the drain marker (`ParkedSessions`) and ends the session.

- **Live notices** arrive on `$share/<group>-orphans/_orphans/<group>/+` over a clean,
  non-persistent connection: the broker deals each notice to one live replica, and never parks
  one in the session of a replica that is gone (it does park `$share` messages in offline
  persistent sessions).
- **Sweeps** catch what the live path missed: a notice published while no replica listened (the
  whole fleet down), or one whose receiver died before adopting. A short plain subscription reads
  the retained notices; one that is still retained at the next sweep has not been taken up
  (an adopter clears it when it connects) and is adopted. The first two sweeps run a few seconds
  apart at start, then one every MQTT_ORPHAN_GRACE / 2 seconds.
- **Races lose nothing.** An adoption never reconnects: if its connection drops (the owner came
  back, or another adopter took the session over; Mosquitto 2.0 closes the socket without a
  DISCONNECT 0x8E) it leaves the session to whoever holds it, unacknowledged messages go back
  to that holder, and only a drain that saw its own marker after leaving the groups ends the
  session. An adopter registers its own notice for the id it holds, so if it dies mid-drain the
  notice is published again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection

from core.runtime.events import record_event
from core.transport.mqtt_client import MqttClient, PublishError, Subscription
from core.transport.orphans import ADOPTION_TOTALS, ORPHAN_PREFIX, notice_filter, notices_enabled, parse_notice
from core.processes.parked_sessions import ParkedSessions

if TYPE_CHECKING:
    from core.processes.assembly import Application

log = logging.getLogger("core.adoption")

MAX_CONCURRENT_ADOPTIONS = 4
STARTUP_RECHECK = (1.0, 3.0)  # seconds between the first two sweeps (random within)
SWEEP_JITTER = 2.0  # seconds (random up to) before re-checking what a sweep found: replicas sweep too
SWEEP_TIMEOUT = 10.0
ADOPTED_KEPT = 50  # outcomes of the latest adoptions kept for the live view


def sweep_interval(grace: float) -> float:
    """Seconds between sweeps: half the grace, so a missed notice waits at most about one grace more."""
    return max(1.0, grace / 2)


class OrphanWatch:
    """Receive the fleet's orphan notices and adopt the sessions they name (one per pod)."""

    def __init__(self, app: "Application", own_ids: Callable[[], Collection[str]],
                 own_ready: Callable[[], Awaitable[Any]]) -> None:
        self.app = app
        self.settings = app.settings
        self._own_ids = own_ids  # client ids this pod serves itself: their owner is here (or coming back)
        # An adoption leaves the groups and ends a member's session: with this pod's own members not
        # subscribed yet (the whole fleet starting), the broker would have nobody to deal messages to.
        self._own_ready = own_ready
        self._parked = ParkedSessions(app, first=0)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_ADOPTIONS)
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._client: MqttClient | None = None
        self.adopted: dict[str, dict[str, Any]] = {}  # client id -> latest outcome: state, handled, seconds, at

    @property
    def enabled(self) -> bool:
        return notices_enabled(self.settings)

    def stop(self) -> None:
        """Stop watching; an adoption in progress keeps its session (its notice is published again)."""
        self._stopping = True
        self._parked.stop()
        if self._stopped is not None:
            self._stopped.set()

    async def run(self) -> None:
        """Watch until `stop()`; returns at once if orphan notices are off (MQTT 3.1.1, grace 0)."""
        if not self.enabled or self._stopping:
            return
        settings = self.settings
        group = settings.mqtt_group_name
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        live = Subscription(f"$share/{group}-orphans/{notice_filter(group)}", 1, 1)
        self._client = MqttClient(settings, f"{settings.mqtt_client_id}-orphans",
                                  lambda message, generation: loop.call_soon_threadsafe(self._on_live, message, generation),
                                  subscriptions=[live], session_expiry=0, clean_start=True, name="mqtt[orphans]",
                                  quiet=True, notice=False)
        self._client.start(loop)
        try:
            previous: set[str] | None = None
            pause = random.uniform(*STARTUP_RECHECK)
            while not self._stopping:
                present = await self._sweep()
                if present is not None:
                    await self._adopt_left_over(present & (previous or set()))
                    previous = present
                await self._sleep(pause)
                pause = sweep_interval(settings.mqtt_orphan_grace) * random.uniform(0.8, 1.2)
        finally:
            await self._client.stop()
            if self._active:
                await asyncio.gather(*self._active.values(), return_exceptions=True)

    async def _adopt_left_over(self, candidates: set[str]) -> None:
        """Adopt notices that stayed retained over a sweep interval, unless another replica starts
        on them meanwhile: replicas sweep too, so after a random pause one more sweep tells which
        are still untaken (an adopter clears the notice as it connects)."""
        candidates -= {*self._active, *self._own_ids()}
        if not candidates:
            return
        await self._sleep(random.uniform(0, SWEEP_JITTER))
        still = await self._sweep()
        for client_id in candidates & (still or set()):
            self._start(client_id, "its notice was still retained at the next sweep")

    async def _sleep(self, seconds: float) -> None:
        assert self._stopped is not None
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _on_live(self, message: Any, generation: int) -> None:
        assert self._client is not None
        if message.qos:
            self._client.ack(message.mid, message.qos, generation)  # a lost notice is still retained: sweeps
        notice = parse_notice(message.payload, self.settings.mqtt_group_name)
        if notice is not None and not message.retain:  # a retained copy (not sent to $share by the spec): sweeps
            self._start(notice.client_id, "orphan notice")

    def _start(self, client_id: str, why: str) -> None:
        if self._stopping or client_id in self._active or client_id in self._own_ids():
            return
        task = asyncio.get_running_loop().create_task(self._adopt(client_id, why))
        self._active[client_id] = task
        task.add_done_callback(lambda _: self._active.pop(client_id, None))

    async def _adopt(self, client_id: str, why: str) -> None:
        assert self._stopped is not None
        ready = asyncio.ensure_future(self._own_ready())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        async with self._slots:
            if self._stopping:
                return
            log.info("adopting the session of %s (%s)", client_id, why)
            started = time.monotonic()
            try:
                info = await self._parked.adopt(client_id)
            except Exception:
                ADOPTION_TOTALS["failed"] += 1
                log.exception("adopting the session of %s failed; its notice is published again if it still "
                              "holds messages", client_id)
                record_event("adoption", f"adopting the session of {client_id} failed (see the log)")
                return
            self._report(client_id, info, time.monotonic() - started)

    def _report(self, client_id: str, info: dict[str, Any], seconds: float) -> None:
        """Keep, count, log and show (events feed) the outcome of one adoption."""
        self.adopted.pop(client_id, None)
        self.adopted[client_id] = {**info, "seconds": round(seconds, 3), "at": time.time()}
        while len(self.adopted) > ADOPTED_KEPT:
            self.adopted.pop(next(iter(self.adopted)))
        state = info.get("state")
        if state in ADOPTION_TOTALS:
            ADOPTION_TOTALS[state] += 1
        if state == "ended":
            handled = info.get("handled", 0)
            ADOPTION_TOTALS["messages"] += handled
            text = f"adopted the session of {client_id}: handled {handled} parked message(s) in {seconds:.1f} s and ended it"
            log.info("%s", text)
        elif state == "none":
            text = f"adopted {client_id}: it had no session left; its notice is cleared"
            log.info("%s", text)
        elif state == "unreachable":
            text = f"could not connect as {client_id} to adopt its session; a later sweep tries again"
            log.warning("%s", text)
        else:
            return
        record_event("adoption", text)

    async def _sweep(self) -> set[str] | None:
        """The client ids of the notices retained now; None if the broker could not be asked."""
        settings = self.settings
        group = settings.mqtt_group_name
        loop = asyncio.get_running_loop()
        marker = f"{ORPHAN_PREFIX}-sweep/{secrets.token_hex(8)}"
        found: set[str] = set()
        done = asyncio.Event()

        def on_message(message: Any, generation: int) -> None:  # network thread
            if message.topic == marker:
                loop.call_soon_threadsafe(done.set)
            elif message.retain:
                notice = parse_notice(message.payload, group)
                if notice is not None:
                    loop.call_soon_threadsafe(found.add, notice.client_id)

        # QoS 0: nothing to acknowledge. The marker, published after the SUBACKs, is queued behind the
        # retained notices the subscription brought, so once it is back they have all arrived.
        client = MqttClient(settings, f"{settings.mqtt_client_id}-orphans-sweep", on_message,
                            subscriptions=[Subscription(notice_filter(group), 0, 1), Subscription(marker, 0, 2)],
                            session_expiry=0, clean_start=True, name="mqtt[orphan-sweep]", quiet=True,
                            notice=False, reconnect=False)
        client.start(loop)
        try:
            if not await client.wait_subscribed(SWEEP_TIMEOUT):
                return None
            await asyncio.wait_for(client.publish(marker, b"", qos=1), SWEEP_TIMEOUT)
            await asyncio.wait_for(done.wait(), SWEEP_TIMEOUT)
            return found
        except (asyncio.TimeoutError, PublishError):
            return None
        finally:
            await client.stop()

