"""Sessions a different kind of run left behind (worker ids above the pool, or `MQTT_CLIENT_ID`'s own):
connect as each, handle what waits there, and end it (`ParkedSessions`)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

from core.foundation.config import Settings
from core.foundation.failures import first_line
from core.routing.router import Router
from core.processes.worker_slots import client_id_for, serve_only

if TYPE_CHECKING:
    from core.processes.assembly import Application
    from core.routing.router import Route
    from core.runtime.runtime import Runtime
    from core.runtime.stats import ProcessStats

log = logging.getLogger("core.supervisor")

PARKED_MARKER_TIMEOUT = 60.0  # a drain with no progress for this long keeps its session (retried at the next start)
PARKED_PROBE_MISSES = 3  # ids probed above the worker count until this many in a row have no session


class ParkedSessions:
    """Handle and end the sessions a different kind of run left: worker sessions
    (`<MQTT_CLIENT_ID>-w<i>`, i >= `first`) and, with `main_session`, `MQTT_CLIENT_ID`'s own.

    Mosquitto keeps dealing a share of a `$share` group's messages to offline persistent sessions, so
    after a run with more workers (or with workers at all, before `python main.py` alone; or without
    workers, before a supervisor that runs no main runtime) messages wait in sessions nobody resumes.
    Used by the supervisor (ids above its worker count; `MQTT_CLIENT_ID` too when it has no plain
    routes) and by the single-process mode (every worker id).
    """

    def __init__(self, app: "Application", first: int, *, main_session: bool = False) -> None:
        self.app = app
        self.settings = app.settings
        self.first = first
        self.main_session = main_session
        self.info: dict[str, dict[str, Any]] = {}  # client id -> session_present, handled, state
        self.last_drain: tuple[ProcessStats, str] | None = None  # the last drain's counters, its marker's route
        self._stopping = False

    def stop(self) -> None:
        """Stop probing; a drain in progress keeps its session for the next start."""
        self._stopping = True

    async def run(self) -> bool:
        """With `main_session`, drain `MQTT_CLIENT_ID` first; then connect as `-w<first>`,
        `-w<first+1>`... until PARKED_PROBE_MISSES ids in a row have no session. True if everything
        handled drained cleanly."""
        clean = True
        group = self.settings.mqtt_group_name
        if self.main_session and not self._stopping:
            routes = [route for route in self.app.routes if route.subscribe]
            # A run without workers subscribed the shared routes as `$share/...` and the plain ones as they are.
            leave = [f"$share/{group}/{route.filter}" for route in routes] + [route.filter for route in routes]
            try:
                found, clean = await self._drain(self.settings.mqtt_client_id, "main-parked", routes, leave,
                                                 "a run without worker processes")
            except Exception:
                log.exception("could not check for a session of %s", self.settings.mqtt_client_id)
                return False
            if found is None:
                return clean
        routes = self._routes()
        leave = [f"$share/{group}/{route.filter}" for route in routes]
        index, misses = self.first, 0
        while misses < PARKED_PROBE_MISSES and not self._stopping:
            client_id = client_id_for(self.settings.mqtt_client_id, index)
            try:
                found, ok = await self._drain(client_id, f"w{index}-parked", routes, leave, "a run with more workers")
            except Exception:
                log.exception("could not check for a session of %s", client_id)
                return False
            if found is None:
                return clean
            clean = clean and ok
            misses = 0 if found else misses + 1
            index += 1
        return clean

    async def end_session(self, index: int, left_by: str) -> bool:
        """Drain and end the session of worker `index` only; True once it is ended (or there was none)."""
        client_id = client_id_for(self.settings.mqtt_client_id, index)
        routes = self._routes()
        leave = [f"$share/{self.settings.mqtt_group_name}/{route.filter}" for route in routes]
        found, _ = await self._drain(client_id, f"w{index}-retired", routes, leave, left_by)
        # `_drain` keeps a session it could not empty, and says so in `info`.
        return found is not None and self.info.get(client_id, {}).get("state", "ended") == "ended"

    async def adopt(self, client_id: str, worker_id: str = "adopted") -> dict[str, Any]:
        """Handle what is parked in another process's session (an orphan notice named it) and end it.

        A worker id (`-w<i>`) was subscribed to the shared routes; any other id to every route, as a
        single process or a supervisor's own runtime is. Returns the drain's info: `state` is
        `ended`, `none` (no session: ended too), `lost` (taken over, or the connection dropped:
        the session is kept), `kept` or `interrupted`; `handled` counts the messages handled.
        """
        group = self.settings.mqtt_group_name
        if re.search(r"-w\d+$", client_id):
            routes = self._routes()
            leave = [f"$share/{group}/{route.filter}" for route in routes]
        else:
            routes = [route for route in self.app.routes if route.subscribe]
            leave = [f"$share/{group}/{route.filter}" for route in routes] + [route.filter for route in routes]
        found, _ = await self._drain(client_id, worker_id, routes, leave, "a process that went away")
        return self.info.pop(client_id, None) or {"session_present": bool(found), "handled": 0,
                                                  "state": "none" if found is False else "unreachable"}

    def _routes(self) -> list["Route"]:
        # With no shared route left (they became plain), handle what is parked with the routes there are.
        # Consumer-only stream routes are left out: a drain bridges what it receives, it consumes no stream.
        return [route for route in self.app.shared_routes() or self.app.routes if route.subscribe]

    async def _drain(self, client_id: str, worker_id: str, routes: list["Route"], leave: list[str],
                     left_by: str) -> tuple[bool | None, bool]:
        """(session found, drained cleanly); found is None if we could not connect."""
        settings = self.settings
        marker = _DrainMarker(client_id)
        # Quiet: most starts find no session, and this says so at INFO itself when one is found.
        # No reconnect: someone else may take this session over (its owner coming back, or an adopter).
        runtime = self.app.make_runtime(marker.routes_with(routes), client_id=client_id, worker_id=worker_id,
                                        quiet=True, reconnect=False)
        self.last_drain = (runtime.stats, marker.route.pattern)
        # Join no group, only the marker's topic; a resumed session brings its own subscriptions.
        serve_only(runtime, [marker.route], settings.mqtt_group_name)
        try:
            await runtime.start()
        except Exception as exc:
            # A hook could not start (e.g. the database is down right now): nothing was connected or
            # handled, so the session is untouched and the next start (or a later sweep) looks again.
            if not self._stopping:
                log.warning("could not look for messages parked by %s in the session of %s: %s: %s; "
                            "they stay in its session until the next start", left_by, client_id,
                            type(exc).__name__, first_line(exc))
            return None, True
        if not await self._wait_ready_or_stop(runtime, timeout=10):
            if not self._stopping:
                log.warning("could not connect as %s to look for messages parked by %s; "
                            "they stay in its session until the next start", client_id, left_by)
            await runtime.stop()
            return None, True
        present = runtime.client.state.session_present
        info = {"session_present": present, "handled": 0, "state": "draining" if present else "none"}
        self.info[client_id] = info
        if present:
            log.info("found the session of %s, left by %s: handling its parked messages and ending it",
                     client_id, left_by)
            problem = await self._handle_parked(runtime, leave, marker, info)
            if problem is not None:
                # Keep the session: ending it would discard what may still be queued in it.
                info["state"] = "lost" if runtime.client.state.lost else "interrupted" if self._stopping else "kept"
                if info["state"] == "lost":
                    log.info("lost the session of %s while draining it (taken over by its owner or another "
                             "process, or the connection dropped); leaving it to whoever holds it", client_id)
                elif not self._stopping:
                    log.warning("%s: %s; keeping its session, so nothing queued in it is discarded "
                                "(the next start tries again)", client_id, problem)
                await runtime.stop()
                info["handled"] = runtime.stats.received - marker.deliveries
                return True, runtime.drained_cleanly
        clean = await runtime.stop(session_expiry=0)
        if not settings.mqtt_v5:
            await _end_session_311(settings, client_id)
        handled = runtime.stats.received - marker.deliveries
        info["handled"] = handled
        if present:
            info["state"] = "ended"
            log.info("ended the session of %s after handling %d parked message(s)", client_id, handled)
        else:
            self.info.pop(client_id, None)
        return present, clean

    async def _wait_ready_or_stop(self, runtime: "Runtime", timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._stopping and time.monotonic() < deadline:
            if await runtime.wait_ready(timeout=0.2):
                return True
        return False

    async def _handle_parked(self, runtime: "Runtime", leave: list[str], marker: "_DrainMarker",
                             info: dict[str, Any]) -> str | None:
        """Leave the groups, then handle everything queued in the session; None once done, else why not.

        The marker is published after the UNSUBACK, so the broker queues it behind every message
        dealt to this session; once it has been handled and nothing is in flight, the queue is empty.
        """
        from core.transport.mqtt_client import PublishError

        client = runtime.client
        try:
            if not await _unless_lost(client, client.unsubscribe(leave)):
                return "could not leave the shared groups (no UNSUBACK)"
            await asyncio.wait_for(_unless_lost(client, client.publish(marker.topic, b"", qos=1)), PARKED_MARKER_TIMEOUT)
        except ConnectionError:
            return "connection lost"
        except (asyncio.TimeoutError, PublishError) as exc:
            return f"could not publish the drain marker ({exc or 'no PUBACK'})"
        dispatcher = runtime.dispatcher
        progress: tuple[int, int] = (-1, -1)
        last_progress = time.monotonic()
        while not self._stopping:
            if client.state.lost:
                return "connection lost"
            if marker.seen.is_set() and not dispatcher.inflight:
                return None
            now = time.monotonic()
            if (runtime.stats.received, dispatcher.completed) != progress:
                progress, last_progress = (runtime.stats.received, dispatcher.completed), now
                info["handled"] = runtime.stats.received - marker.deliveries
            elif now - last_progress >= PARKED_MARKER_TIMEOUT:
                waiting = "handlers to finish" if marker.seen.is_set() else "the drain marker"
                return f"no progress for {PARKED_MARKER_TIMEOUT:g} s waiting for {waiting}"
            await asyncio.sleep(0.1)
        return "stopping"


async def _unless_lost(client: Any, awaitable: Any) -> Any:
    """`await awaitable`, but raise ConnectionError as soon as the (non-reconnecting) client lost its connection."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            if client.state.lost:
                raise ConnectionError("connection lost")
            await asyncio.wait({task}, timeout=0.1)
        return task.result()
    finally:
        task.cancel()


class _DrainMarker:
    """A drain's barrier: a QoS 1 message the drain client publishes to a topic only it subscribes to.

    Brokers deliver a client's queue in order (Mosquitto, and the embedded broker), so the marker
    arrives after every message parked in the session before it was published. The route takes
    any drain's marker topic of this client id: one left in the session by an earlier drain that
    lost it (taken over) is acknowledged and ignored, neither counted as ours nor dead-lettered.
    """

    def __init__(self, client_id: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)
        self.prefix = f"{safe}/parked-drain/"
        self.topic = f"{self.prefix}{secrets.token_hex(8)}"
        self.seen = asyncio.Event()
        self.deliveries = 0
        self.route = Router().on(f"{self.prefix}+", self._arrived, qos=1, payload_format="bytes",
                                 name="parked-drain marker")

    async def _arrived(self, topic: str) -> None:
        self.deliveries += 1
        if topic == self.topic:
            self.seen.set()

    def routes_with(self, routes: Sequence["Route"]) -> list["Route"]:
        """`routes` and, last, the marker's route (its subscription id then maps to it).

        Without subscription ids (MQTT 3.1.1) the dispatcher matches by topic, so a route whose
        filter also matches the marker topic (say `#`) gets a guard that keeps the marker from it.
        """
        levels = self.topic.split("/")
        guard = _SkipTopic(self.prefix)
        guarded = [replace(route, middleware=(guard, *route.middleware))
                   if route.compiled.extract(levels) is not None else route for route in routes]
        return [*guarded, self.route]


class _SkipTopic:
    """Middleware: drop (and acknowledge) a message whose topic starts with `prefix` before it reaches the handler."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def handle(self, context: Any, call_next: Any) -> Any:
        if context.topic.startswith(self.prefix):
            return None
        return await call_next(context)


async def _end_session_311(settings: Settings, client_id: str) -> None:
    """MQTT 3.1.1 has no session expiry on DISCONNECT: connecting with a clean session ends it."""
    from core.transport.mqtt_client import MqttClient

    client = MqttClient(settings, client_id, lambda message, generation: None, subscriptions=[],
                        clean_start=True, session_expiry=0, name=f"mqtt[{client_id}-end]", quiet=True)
    client.start(asyncio.get_running_loop())
    if not await client.wait_subscribed(30):
        log.warning("could not reconnect as %s to end its session", client_id)
    await client.stop()
