"""The seed's programmatic API: `WorkerManager(router=..., group_name=..., router_directory=...)`.

A thin layer over the supervisor of `python main.py --workers` (`core.processes.supervisor.Supervisor`):
`start_workers()` runs one on its own event loop in a background thread and returns, so a program
can run worker groups next to its own code (several managers with different group names, e.g. one
per region), and `stop_workers()` drains and joins them. Everything else — spawning, heartbeats,
restarts, parked sessions, autoscaling — is the supervisor's. `python main.py --workers` stays the
main way to run workers; see docs/workers.md ("The programmatic API").

As in the seed, workers load their routes from `router_directory` in their own process; `router`
(the same routes, imported in this one) decides how many workers and which shared routes there are.
A manager serves the shared routes only: plain routes are the program's business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from core.foundation.config import ConfigError, Settings, load_settings
from core.routing.router import Router

if TYPE_CHECKING:
    from core.processes.supervisor import Supervisor

log = logging.getLogger("core.worker_manager")

_running: dict[str, "WorkerManager"] = {}  # client id -> started manager, in this program
_running_lock = threading.Lock()


class WorkerManager:
    """Start, watch and stop the worker processes of one shared-subscription group."""

    def __init__(self, router: Router | None = None, group_name: str | None = None,
                 router_directory: str | None = None, *, settings: Settings | None = None,
                 client_id: str | None = None) -> None:
        """`settings` default to the environment's; `group_name` to MQTT_GROUP_NAME, `router_directory`
        to ROUTERS_PACKAGE and `router` to the routers found there. Client ids are `client_id`, by
        default MQTT_CLIENT_ID, with `-<group_name>` added when the group is not MQTT_GROUP_NAME (so
        managers of different groups in one program do not take over each other's sessions); the
        workers add `-w<i>`."""
        from core.routing.discovery import discover_routers
        from core.routing.router import merge_routers

        base = settings if settings is not None else load_settings(os.environ)
        group = base.mqtt_group_name if group_name is None else group_name.strip()
        if not group or any(c in group for c in "/+#"):
            raise ConfigError(f"group_name={group_name!r} must be non-empty and free of '/', '+', '#'")
        if client_id is None:
            client_id = base.mqtt_client_id if group == base.mqtt_group_name else f"{base.mqtt_client_id}-{group}"
        self.group_name = group
        self.router_directory = router_directory or base.routers_package
        self.settings = base.with_overrides(mqtt_group_name=group, routers_package=self.router_directory,
                                            mqtt_client_id=client_id)
        self.router = router if router is not None else merge_routers(discover_routers(self.router_directory))
        self.logger = log
        self.supervisor: "Supervisor | None" = None
        self.exit_code: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get_shared_routes_info(self) -> list[dict[str, Any]]:
        """The shared routes: `topic` (as registered), `mqtt_topic` (the MQTT filter), `shared_topic`
        (`$share/<group>/<filter>`), `worker_count` and `qos`."""
        return [{"topic": route.pattern, "mqtt_topic": route.filter, "shared_topic": route.subscription_topic(self.group_name),
                 "worker_count": route.worker_count, "qos": route.qos}
                for route in self.router.routes if route.shared]

    def start_workers(self, num_workers: int | None = None) -> None:
        """Start the worker processes and return: `num_workers`, or as `python main.py --workers` would
        (WORKER_COUNT, else the largest `worker_count`, else one per CPU core); WORKER_AUTO_SCALE applies."""
        from core.processes.assembly import Application
        from core.processes.supervisor import Supervisor
        from core.processes.worker_plan import supervisor_plan

        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"the workers of group {self.group_name!r} are already running")
        shared = [route for route in self.router.routes if route.shared]
        if not shared:
            self.logger.info("No shared routes found, skipping worker startup")
            return
        self._check_router_directory(shared)
        only_shared = Router()
        only_shared.routes.extend(shared)
        app = Application.load(self.settings, router=only_shared)
        plan = supervisor_plan(shared, num_workers or self.settings.worker_count, self.settings)
        self._claim()
        self.supervisor = Supervisor(app, plan, handle_signals=False)
        started = threading.Event()

        async def serve(supervisor: "Supervisor") -> int:
            self._loop = asyncio.get_running_loop()
            started.set()
            return await supervisor.run()

        def main() -> None:
            try:
                assert self.supervisor is not None
                self.exit_code = asyncio.run(serve(self.supervisor))
            except BaseException:  # noqa: BLE001 - the thread's end must be logged, not lost
                self.logger.exception("the supervisor of group %s failed", self.group_name)
                self.exit_code = 1
            finally:
                started.set()
                with _running_lock:
                    _running.pop(self.settings.mqtt_client_id, None)

        self.exit_code = None
        self._thread = threading.Thread(target=main, name=f"workers[{self.group_name}]", daemon=True)
        self._thread.start()
        started.wait()

    def snapshot(self) -> dict[str, Any] | None:
        """The supervisor's live view (`Supervisor.snapshot()`), taken on its loop; None when not running."""
        loop, supervisor = self._loop, self.supervisor
        if loop is None or supervisor is None or not self.running:
            return None

        async def take() -> dict[str, Any]:
            return supervisor.snapshot()

        try:
            return asyncio.run_coroutine_threadsafe(take(), loop).result(10)
        except RuntimeError:  # the loop closed meanwhile
            return None

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once every worker has connected and subscribed; False after `timeout` or if it stopped."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.snapshot()
            if snap is None:
                return False
            if snap["workers"] and all(w["ready"] for w in snap["workers"]):
                return True
            time.sleep(0.05)
        return False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_workers(self, timeout: float | None = None) -> int | None:
        """Drain every worker (as on SIGTERM) and wait for the supervisor to end; its exit code
        (0: all stopped cleanly), or None if it is still stopping after `timeout` seconds."""
        loop, supervisor = self._loop, self.supervisor
        if self.running and loop is not None and supervisor is not None:
            try:
                loop.call_soon_threadsafe(supervisor.request_stop, "stop_workers()")
            except RuntimeError:
                pass  # the loop closed meanwhile: the supervisor has ended
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> int | None:
        """Wait for the supervisor to end (after `stop_workers()`, or a fatal crash loop); its exit code."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
        return self.exit_code

    def _claim(self) -> None:
        """One running manager per client id (they would take over each other's sessions) and one embedded broker."""
        client_id = self.settings.mqtt_client_id
        with _running_lock:
            if client_id in _running:
                raise ConfigError(f"another WorkerManager in this program already uses client id {client_id!r}; "
                                  "give this one a different group_name or client_id")
            if self.settings.uses_embedded_broker and any(m.settings.uses_embedded_broker for m in _running.values()):
                raise ConfigError("MQTT_BROKER is not set, so this WorkerManager would start a second embedded "
                                  "broker; set MQTT_BROKER to the broker every group should use")
            _running[client_id] = self

    def _check_router_directory(self, shared: list[Any]) -> None:
        """The workers load `router_directory`: it must have the shared routes `router` has."""
        from core.routing.discovery import discover_routers
        from core.routing.router import merge_routers

        there = {route.filter for route in merge_routers(discover_routers(self.router_directory)).routes if route.shared}
        missing = sorted(route.filter for route in shared if route.filter not in there)
        if missing:
            raise ConfigError(f"router_directory={self.router_directory!r} lacks shared route(s) {', '.join(missing)} "
                              "of the router passed in; the worker processes load their routes from router_directory")
