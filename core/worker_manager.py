"""The supervisor: `python main.py --workers` runs shared routes in worker processes.

The main process runs one asyncio loop that starts the embedded broker (if used), spawns the
workers (spawn start method, see `core.worker`), serves the non-shared routes itself on plain
subscriptions, drains sessions a previous, larger run left behind, and supervises: exits,
heartbeats, restarts with backoff, crash loops, recycling hand-overs, stats lines and shutdown;
with WORKER_AUTO_SCALE it also grows and shrinks the pool (decisions in `core.autoscale`).

`Supervisor.snapshot()` is the live view (plain data) and `SupervisorService`s (an HTTP status
server, metrics) start and stop with the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import re
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from core.autoscale import Autoscaler, ScalePolicy, WorkerLoad
from core.backoff import backoff_delay
from core.config import SETTING_NAMES, Settings, load_settings
from core.events import ingest_from_worker, record_event
from core.process_metrics import fold_final
from core.ordering import check_ordered_routes
from core.router import Router
from core.worker import (EXIT_RECYCLE, WorkerSpec, client_id_for, heartbeat_interval, leave_stale, serve_only,
                         worker_main)
from core.worker_api import WorkerManager  # noqa: F401 - the seed's programmatic API, a layer over Supervisor

if TYPE_CHECKING:
    from core.assembly import Application
    from core.router import Route
    from core.stats import ProcessStats
    from core.runtime import Runtime

log = logging.getLogger("core.supervisor")

RESTART_BACKOFF_BASE = 0.5  # seconds before the first restart of a crashed worker (with jitter)
RESTART_BACKOFF_CAP = 30.0
STARTUP_GRACE = 60.0  # a new process may take this long to send its first heartbeat (imports)
LATE_HEARTBEATS = 3  # heartbeat intervals without a message before the stats show a worker's heartbeat as late
STOP_GRACE = 5.0  # on top of SHUTDOWN_TIMEOUT: time for drained workers to disconnect and exit
PARKED_MARKER_TIMEOUT = 60.0  # a drain with no progress for this long keeps its session (retried at the next start)
PARKED_PROBE_MISSES = 3  # ids probed above the worker count until this many in a row have no session


class SupervisorService(Protocol):
    """Something that lives as long as the supervisor (status HTTP server, metrics aggregation)."""

    async def start(self, manager: "Supervisor") -> None: ...

    async def stop(self, manager: "Supervisor") -> None: ...


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker processes, and which shared routes each one subscribes to."""

    count: int
    all_routes: bool  # True: each worker serves every shared route
    reason: str


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_workers(shared: Sequence["Route"], workers: int | None, cpus: int) -> WorkerPlan:
    """The process count.

    - `workers=N` (`--workers N` or WORKER_COUNT): N processes, each on every shared route.
    - `workers=None` (`--workers` alone): if some shared route sets `worker_count` above 1,
      the largest `worker_count` processes, worker i on the shared routes with worker_count > i
      (so each route has exactly its worker_count subscribers); otherwise one per CPU core, each
      on every shared route.
    """
    if not shared:
        return WorkerPlan(0, True, "no shared routes")
    if workers is not None:
        if workers < 1:
            raise ValueError(f"the number of workers must be at least 1, not {workers}")
        return WorkerPlan(workers, True, f"--workers {workers} / WORKER_COUNT: every worker on every shared route")
    largest = max(route.worker_count for route in shared)
    if largest > 1:
        return WorkerPlan(largest, False, f"the largest worker_count of the shared routes ({largest})")
    return WorkerPlan(cpus, True, f"one per CPU core ({cpus}); no shared route sets worker_count")


def autoscale_plan(plan: WorkerPlan, policy: ScalePolicy) -> WorkerPlan:
    """WORKER_AUTO_SCALE: start with the planned count within the bounds, every worker on every shared route."""
    count = policy.clamp(plan.count)
    return WorkerPlan(count, True, f"autoscaling between WORKER_MIN_COUNT={policy.min_count} and "
                                   f"WORKER_MAX_COUNT={policy.max_count}, starting at {count} ({plan.reason})")


def ordered_route_processes(plan: WorkerPlan, most: int | None = None) -> Callable[["Route"], int]:
    """How many worker processes may subscribe to a shared route under `plan` (for `check_ordered_routes`);
    `most`: the autoscaler's WORKER_MAX_COUNT, when it may add workers."""
    count = max(plan.count, most or 0)
    return lambda route: count if plan.all_routes else min(route.worker_count, count)


# -- state ------------------------------------------------------------------------------------

STARTING, RUNNING, RECYCLING, BACKOFF, STOPPING, STOPPED = "starting", "running", "recycling", "backoff", "stopping", "stopped"
RETIRING = "retiring"  # the autoscaler retires it: it leaves its groups, drains and ends its session
_COUNTERS = ("received", "handled", "failed", "dead_lettered", "unrouted", "dropped_on_shutdown", "responses")


@dataclass(eq=False)
class WorkerProcess:
    """One OS process serving a slot (a slot outlives its processes)."""

    process: BaseProcess
    conn: Connection
    started_at: float
    last_message_at: float
    heartbeats: int = 0
    hello: bool = False  # the process reached worker code (and handles stop signals itself)
    ready: bool = False
    session_present: bool | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    rss: int = 0
    cpu: float = 0.0
    connected: bool = False
    oldest: dict[str, Any] | None = None  # the oldest in-flight handler at the last heartbeat: age, route, topic
    recycling: str | None = None
    stopping: str | None = None
    kill_reason: str | None = None
    clean: bool | None = None
    retired: bool = False  # its "bye" says it ended its session after retiring
    reader_open: bool = True

    @property
    def pid(self) -> int | None:
        return self.process.pid


@dataclass(eq=False)
class WorkerSlot:
    """Worker `index`: its client id, current process, history."""

    index: int
    client_id: str
    state: str = STARTING
    current: WorkerProcess | None = None
    successor: WorkerProcess | None = None  # pre-started replacement during recycling
    restarts: int = 0
    recycles: int = 0
    crash_times: deque[float] = field(default_factory=deque)
    last_exit: str | None = None
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    restart_timer: asyncio.TimerHandle | None = None
    final_clean: bool = True
    logged_totals: dict[str, int] = field(default_factory=dict)
    had_session: bool = False  # a process of this slot connected (its replacement should find the session)

    @property
    def worker_id(self) -> str:
        return f"w{self.index}"

    def cumulative(self) -> dict[str, int]:
        """Counters over every process this slot has had."""
        out = dict(self.totals)
        if self.current is not None:
            for key in _COUNTERS:
                out[key] += int(self.current.stats.get(key, 0))
        return out


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


class Supervisor:
    """Runs and supervises the worker processes of one app; `run()` returns the exit code."""

    def __init__(
        self,
        app: "Application",
        plan: WorkerPlan,
        *,
        test_mode: bool = False,
        services: Sequence[SupervisorService] = (),
        mp_context: Any = None,
        handle_signals: bool = True,  # False off the main thread (`WorkerManager`, core/worker_api.py)
    ) -> None:
        self.app = app
        self.handle_signals = handle_signals
        self.settings: Settings = app.settings
        self.plan = plan
        self.test_mode = test_mode
        self.services: list[SupervisorService] = list(services)
        self._ctx = mp_context or multiprocessing.get_context("spawn")
        self.slots = [WorkerSlot(i, client_id_for(self.settings.mqtt_client_id, i)) for i in range(plan.count)]
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._overrides = _settings_overrides(self.settings)
        self._stopping = False
        self._stop_reason = ""
        self._wake: asyncio.Event | None = None
        self._fatal: str | None = None
        self._main_runtime: "Runtime | None" = None
        self._main_task: asyncio.Task[bool] | None = None
        self._parked_task: asyncio.Task[bool] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._leave_task: asyncio.Task[None] | None = None
        # Without plain routes there is no main runtime to resume MQTT_CLIENT_ID's session, so a
        # single-process run's `$share` subscriptions (and messages parked there) are drained instead.
        self._parked = ParkedSessions(app, plan.count, main_session=not app.plain_routes())
        from core.adoption import OrphanWatch  # sessions other replicas left (issue 8, docs/workers.md)

        self._orphans = OrphanWatch(app, self.own_client_ids, self.wait_own_ready)
        self._orphans_task: asyncio.Task[None] | None = None
        self._main_clean = True
        self._parked_clean = True
        self._all_ready_logged = False
        self._next_stats = 0.0
        self._broker: Any = None
        self._autoscaler: Autoscaler | None = None
        if self.settings.worker_auto_scale and plan.count:
            policy = ScalePolicy.from_settings(self.settings, available_cpus())
            self._autoscaler = Autoscaler(policy, self.settings.max_inflight, time.monotonic())
        self._next_scale = 0.0
        self._departed: dict[str, Any] = {}  # final counters of retired workers (`fold_final`)

    def own_client_ids(self) -> set[str]:
        """The client ids this supervisor's processes use (orphan notices about them are not adopted)."""
        return {self.settings.mqtt_client_id, *(slot.client_id for slot in self.slots)}

    async def wait_own_ready(self) -> None:
        """Until every worker (and the main runtime, if any) has subscribed."""
        while not all(slot.current is not None and slot.current.ready for slot in self.slots):
            await asyncio.sleep(0.1)
        if self._main_runtime is not None:
            await self._main_runtime.wait_ready()

    def add_service(self, service: SupervisorService) -> None:
        """Register a service before `run()` (started after the workers, stopped before the broker)."""
        self.services.append(service)

    # -- live view ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain data for status pages and metrics: the supervisor and one entry per worker."""
        now = time.monotonic()
        workers = []
        for slot in self.slots:
            proc = slot.current
            workers.append({
                "index": slot.index,
                "worker_id": slot.worker_id,
                "client_id": slot.client_id,
                "pid": proc.pid if proc is not None else None,
                "state": slot.state,
                "ready": bool(proc and proc.ready),
                "connected": bool(proc and proc.connected),
                "restarts": slot.restarts,
                "recycles": slot.recycles,
                "last_exit": slot.last_exit,
                "uptime": round(now - proc.started_at, 3) if proc is not None else 0.0,
                "heartbeat_age": round(now - proc.last_message_at, 3) if proc is not None else None,
                "heartbeat_late": self._late_heartbeat(proc, now) is not None,
                "oldest_handler": dict(proc.oldest) if proc is not None and proc.oldest else None,
                "rss_bytes": proc.rss if proc is not None else 0,
                "cpu_percent": proc.cpu if proc is not None else 0.0,
                "stats": dict(proc.stats) if proc is not None else {},
                "totals": slot.cumulative(),
            })
        main = self._main_runtime
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": round(now - self._started_mono, 3),
            "state": "stopping" if self._stopping else "running",
            "test_mode": self.test_mode,
            "plan": {"count": self.plan.count, "all_routes": self.plan.all_routes, "reason": self.plan.reason},
            "workers": workers,
            "main": None if main is None else {
                "client_id": main.client_id,
                "connected": main.client.state.connected,
                "stats": {**main.stats.snapshot(), "inflight": main.dispatcher.inflight},
            },
            "parked": {client_id: dict(info) for client_id, info in self._parked.info.items()},
            "adopted": {client_id: dict(info) for client_id, info in self._orphans.adopted.items()},
            "autoscale": None if self._autoscaler is None else self._autoscaler.snapshot(len(self.slots)),
            "departed": self._departed,
            "fatal": self._fatal,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin a graceful stop of everything (safe from signal handlers on the loop)."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_reason = reason
        self._parked.stop()
        self._orphans.stop()
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> int:
        """Serve until a signal (or, in test mode, until everything is idle); the exit code."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.handle_signals:
            self._install_signals(loop)
        settings = self.settings
        if settings.uses_embedded_broker:
            from core.embedded_broker import EmbeddedBroker

            self._broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port)
            await self._broker.start()
            log.info("embedded broker listening on %s:%d (set MQTT_BROKER to use an external one)",
                     settings.embedded_broker_host, settings.embedded_broker_port)
        try:
            log.info("supervisor pid %d: %d worker process(es), %s", os.getpid(), self.plan.count, self.plan.reason)
            for slot in self.slots:
                self._start_slot(slot)
            self._start_main_runtime()
            # Also with 0 workers: a run that had workers may have left messages in their sessions.
            self._parked_task = asyncio.create_task(self._parked.run())
            self._orphans_task = asyncio.create_task(self._orphans.run())
            for service in self.services:
                await service.start(self)
            await self._supervise()
        finally:
            await self._shutdown()
        return self._exit_code()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if self._stopping:
                log.info("%s received again; already stopping", name)
                return
            log.info("%s received; stopping the workers gracefully", name)
            self.request_stop(name)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)

    def _start_main_runtime(self) -> None:
        routes = self.app.plain_routes()
        if not routes:
            return
        # It knows the shared routes too but subscribes to the plain ones only: the session of a run
        # without workers (same client id) still holds their `$share` subscriptions and what was
        # parked for them, handled here until leave_stale has left those groups. Same order as that
        # run's routes, so the subscription ids match. Consumer-only stream routes stay with the workers.
        known = [route for route in self.app.routes if route.subscribe or not route.shared]
        runtime = self.app.make_runtime(known, worker_id="main")
        stale = serve_only(runtime, routes, self.settings.mqtt_group_name)
        self._main_runtime = runtime
        self._main_task = asyncio.create_task(runtime.run())
        self._leave_task = asyncio.create_task(leave_stale(runtime, stale))
        if self.test_mode:
            from core.assembly import stop_when_idle

            self._idle_task = asyncio.create_task(stop_when_idle(runtime, self.settings.test_mode_idle))

    async def _supervise(self) -> None:
        assert self._wake is not None
        self._next_stats = time.monotonic() + self.settings.stats_interval
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self._check_processes()
            now = time.monotonic()
            if now >= self._next_stats:
                self._next_stats = now + self.settings.stats_interval
                self.log_stats()
            if self._autoscaler is not None and now >= self._next_scale:
                self._next_scale = now + heartbeat_interval(self.settings.worker_heartbeat_timeout)
                self._autoscale(self._autoscaler, now)
            if self._main_task is not None and self._main_task.done() and not self.test_mode:
                self.request_stop("the main process's runtime ended")
            if self.test_mode and self._all_done():
                self.request_stop("test mode: every process is idle")

    def _all_done(self) -> bool:
        workers_done = all(slot.state == STOPPED for slot in self.slots)
        main_done = self._main_task is None or self._main_task.done()
        parked_done = self._parked_task is None or self._parked_task.done()
        return workers_done and main_done and parked_done

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot, *, wait_for_go: bool) -> WorkerProcess:
        parent, child = self._ctx.Pipe(duplex=True)
        spec = WorkerSpec(slot.index, self.plan.all_routes, self._overrides, self.test_mode, wait_for_go,
                          expect_session=slot.had_session)
        process = self._ctx.Process(target=worker_main, args=(spec, child), name=f"worker-{slot.worker_id}")
        process.start()
        child.close()
        now = time.monotonic()
        proc = WorkerProcess(process, parent, now, now)
        asyncio.get_running_loop().add_reader(parent.fileno(), self._read, slot, proc)
        log.info("started worker %s (pid %d, client id %s)%s", slot.worker_id, process.pid, slot.client_id,
                 "; it connects once its predecessor has handed over" if wait_for_go else "")
        return proc

    def _start_slot(self, slot: WorkerSlot) -> None:
        slot.restart_timer = None
        if self._stopping:
            return
        successor, slot.successor = slot.successor, None
        if successor is not None and successor.process.exitcode is None and _send(successor.conn, {"type": "go"}):
            slot.current = successor
        else:
            if successor is not None:
                self._discard(successor)
            slot.current = self._spawn(slot, wait_for_go=False)
        slot.state = STARTING

    def _read(self, slot: WorkerSlot, proc: WorkerProcess) -> None:
        try:
            while proc.conn.poll():
                self._on_message(slot, proc, proc.conn.recv())
        except (EOFError, OSError):
            self._close_reader(proc)

    def _on_message(self, slot: WorkerSlot, proc: WorkerProcess, message: Any) -> None:
        if not isinstance(message, dict):
            return
        proc.last_message_at = time.monotonic()
        kind = message.get("type")
        if kind == "hello":
            proc.hello = True
        elif kind == "hb":
            proc.heartbeats += 1
            proc.stats = message.get("stats") or {}
            proc.rss = int(message.get("rss") or 0)
            proc.cpu = float(message.get("cpu") or 0.0)
            proc.connected = bool(message.get("connected"))
            proc.oldest = message.get("oldest")
            ingest_from_worker(message, slot.worker_id)
        elif kind == "ready" and proc is slot.current:
            proc.ready = True
            proc.connected = True
            proc.session_present = bool(message.get("session_present"))
            slot.had_session = True
            if slot.state == STARTING:
                slot.state = RUNNING
            log.info("worker %s (pid %d) subscribed to %d filter(s) (%s session)", slot.worker_id, proc.pid,
                     message.get("subscriptions", 0), "resumed" if proc.session_present else "new")
            self._log_all_ready()
        elif kind == "recycling":
            proc.recycling = str(message.get("reason"))
            if proc is slot.current and not self._stopping:
                slot.state = RECYCLING
                log.info("worker %s (pid %d) is recycling: %s", slot.worker_id, proc.pid, proc.recycling)
                if slot.successor is None:
                    slot.successor = self._spawn(slot, wait_for_go=True)
        elif kind == "stopping":
            proc.stopping = str(message.get("reason"))
        elif kind == "bye":
            proc.clean = bool(message.get("clean"))
            proc.retired = bool(message.get("retired"))
            proc.stats = message.get("stats") or proc.stats
            ingest_from_worker(message, slot.worker_id)

    def _log_all_ready(self) -> None:
        if self._all_ready_logged or not all(s.current is not None and s.current.ready for s in self.slots):
            return
        self._all_ready_logged = True
        log.info("all %d worker(s) subscribed, %.2f s after start", len(self.slots), time.monotonic() - self._started_mono)

    def _check_processes(self) -> None:
        now = time.monotonic()
        timeout = self.settings.worker_heartbeat_timeout
        for slot in self.slots:
            succ = slot.successor
            if succ is not None and succ.process.exitcode is not None:
                log.warning("successor of worker %s (pid %d) ended before taking over (%s)", slot.worker_id,
                            succ.pid, describe_exit(succ.process.exitcode))
                self._discard(succ)
                slot.successor = None
            proc = slot.current
            if proc is None:
                continue
            if proc.reader_open:
                self._read(slot, proc)  # if this loop was busy, heartbeats wait in the pipe: count them first
            if proc.process.exitcode is not None:
                self._on_exit(slot, proc)
                continue
            limit = timeout if proc.heartbeats else max(timeout, STARTUP_GRACE)
            age = now - proc.last_message_at
            if age > limit and proc.kill_reason is None and proc.recycling is None and proc.stopping is None:
                proc.kill_reason = f"no heartbeat for {age:.1f} s (WORKER_HEARTBEAT_TIMEOUT={timeout:g}; a handler blocking the event loop?)"
                log.error("worker %s (pid %d): %s; killing it", slot.worker_id, proc.pid, proc.kill_reason)
                _kill(proc.process)
            elif self._handler_hung(proc):
                assert proc.oldest is not None
                proc.kill_reason = (
                    f"handler of route {proc.oldest.get('route')!r} (topic {proc.oldest.get('topic')!r}) running for "
                    f"{float(proc.oldest['age']):.1f} s (WORKER_HANDLER_TIMEOUT={self.settings.worker_handler_timeout:g}); "
                    "its ack holds back every later one"
                )
                log.error("worker %s (pid %d): %s; killing it (its unacknowledged messages go to the replacement)",
                          slot.worker_id, proc.pid, proc.kill_reason)
                _kill(proc.process)

    def _handler_hung(self, proc: WorkerProcess) -> bool:
        """The oldest handler ran past WORKER_HANDLER_TIMEOUT (heartbeats alone miss hangs off the loop).

        Not while disconnected: handlers waiting for the broker's PUBACK then are not hung, and a new
        process would not get further. Not while draining: SHUTDOWN_TIMEOUT bounds that.
        """
        limit = self.settings.worker_handler_timeout
        oldest = proc.oldest
        return bool(
            limit and oldest and float(oldest.get("age", 0)) > limit and proc.connected
            and proc.kill_reason is None and proc.recycling is None and proc.stopping is None
        )

    def _on_exit(self, slot: WorkerSlot, proc: WorkerProcess) -> None:
        code = proc.process.exitcode
        self._retire(slot, proc)
        slot.current = None
        what = describe_exit(code)
        slot.last_exit = proc.kill_reason or what
        if self._stopping:
            return
        if slot.state == RETIRING:
            self._end_retirement(slot, proc)
            return
        if code == 0 and self.test_mode:
            slot.state = STOPPED
            log.info("worker %s (pid %d) finished (test mode)", slot.worker_id, proc.pid)
            return
        if code == EXIT_RECYCLE:
            slot.recycles += 1
            log.info("worker %s (pid %d) recycled; handing its session to a fresh process", slot.worker_id, proc.pid)
            record_event("recycle", f"worker {slot.worker_id} (pid {proc.pid}) recycled: {proc.recycling or 'limit reached'}")
            self._start_slot(slot)
            return
        if code == 0:
            log.warning("worker %s (pid %d) stopped on its own (%s); starting it again", slot.worker_id, proc.pid,
                        proc.stopping or "no reason given")
            self._schedule_restart(slot, backoff_delay(0, RESTART_BACKOFF_BASE, RESTART_BACKOFF_CAP, random.random))
            return
        why = proc.kill_reason or what
        if code == -signal.SIGKILL and proc.kill_reason is None:
            why = f"{what}, presumably out of memory (the kernel's OOM killer sends SIGKILL)"
        now = time.monotonic()
        slot.crash_times.append(now)
        while slot.crash_times and now - slot.crash_times[0] > self.settings.worker_restart_window:
            slot.crash_times.popleft()
        crashes = len(slot.crash_times)
        limit = self.settings.worker_max_restarts
        if crashes > limit:
            self._fatal = (f"worker {slot.worker_id} (client id {slot.client_id}) crashed {crashes} time(s) within "
                           f"{self.settings.worker_restart_window:g} s (WORKER_MAX_RESTARTS={limit}); last: {why}")
            log.error("%s; stopping everything", self._fatal)
            record_event("crash loop", f"{self._fatal}; stopping everything")
            self.request_stop("crash loop")
            return
        delay = backoff_delay(crashes - 1, RESTART_BACKOFF_BASE, RESTART_BACKOFF_CAP, random.random)
        slot.restarts += 1
        log.error("worker %s (pid %d) died: %s; restarting it with the same client id in %.2f s (crash %d of at most %d within %g s)",
                  slot.worker_id, proc.pid, why, delay, crashes, limit, self.settings.worker_restart_window)
        record_event("restart", f"worker {slot.worker_id} (pid {proc.pid}) died: {why}; restarting in {delay:.1f} s")
        self._schedule_restart(slot, delay)

    # -- autoscaling (WORKER_AUTO_SCALE) ------------------------------------------------------------

    def _autoscale(self, scaler: Autoscaler, now: float) -> None:
        """Feed the workers' latest heartbeat figures to the autoscaler and act on its decision.

        Growing adds the next indexes; shrinking retires the highest one, so the ids in use stay
        `-w0`..`-w<n-1>` and the next start's probe for larger runs' sessions still finds leftovers.
        """
        settled = (self._parked_task is not None and self._parked_task.done()
                   and all(s.state == RUNNING and s.current is not None and s.current.ready for s in self.slots))
        loads = {s.worker_id: WorkerLoad.from_stats(s.current.stats) for s in self.slots if s.current is not None}
        decision = scaler.observe(now, loads, len(self.slots), settled)
        if decision is None:
            return
        log.info("autoscale: %d -> %d worker(s): %s", decision.before, decision.after, decision.reason)
        record_event("autoscale", f"{decision.before} -> {decision.after} worker(s): {decision.reason}")
        if decision.after > decision.before:
            for index in range(decision.before, decision.after):
                slot = WorkerSlot(index, client_id_for(self.settings.mqtt_client_id, index))
                self.slots.append(slot)
                self._start_slot(slot)
            self._all_ready_logged = False
            return
        slot = self.slots[-1]
        slot.state = RETIRING
        if slot.current is not None:
            _send(slot.current.conn, {"type": "retire"})

    def _end_retirement(self, slot: WorkerSlot, proc: WorkerProcess) -> None:
        """A retiring worker exited: gone if it ended its session, else started again to resume that session."""
        if proc.retired:  # its session is ended (a handler cut at SHUTDOWN_TIMEOUT was redelivered to the drain)
            self.slots.remove(slot)
            log.info("worker %s (pid %d) retired: it left its groups, finished what was in flight and parked, "
                     "and ended its session", slot.worker_id, proc.pid)
            record_event("autoscale", f"worker {slot.worker_id} retired: left its groups, drained, session ended")
            return
        log.warning("worker %s (pid %d) did not finish retiring (%s); starting it again with its client id so "
                    "that nothing its session holds is lost", slot.worker_id, proc.pid, slot.last_exit)
        self._start_slot(slot)

    def _schedule_restart(self, slot: WorkerSlot, delay: float) -> None:
        slot.state = BACKOFF
        slot.restart_timer = asyncio.get_running_loop().call_later(delay, self._start_slot, slot)

    def _retire(self, slot: WorkerSlot, proc: WorkerProcess) -> None:
        """Fold a finished process's counters into the slot and release its pipe."""
        if proc.reader_open:
            self._read(slot, proc)  # a final "bye" may still be in the pipe
        for key in _COUNTERS:
            slot.totals[key] += int(proc.stats.get(key, 0))
        if proc.retired:  # its slot goes: the metrics' totals keep its final numbers
            fold_final(self._departed, proc.stats)
        proc.stats = {}
        self._discard(proc)

    def _discard(self, proc: WorkerProcess) -> None:
        self._close_reader(proc)
        try:
            proc.conn.close()
        except OSError:
            pass
        if proc.process.exitcode is None:
            _kill(proc.process)
        proc.process.join(5)

    def _close_reader(self, proc: WorkerProcess) -> None:
        if proc.reader_open:
            proc.reader_open = False
            try:
                asyncio.get_running_loop().remove_reader(proc.conn.fileno())
            except (OSError, ValueError):
                pass

    # -- stats --------------------------------------------------------------------------------

    def _late_heartbeat(self, proc: WorkerProcess | None, now: float) -> float | None:
        """The age of a worker's last message once it is LATE_HEARTBEATS intervals old (its figures are stale)."""
        if proc is None or not proc.heartbeats:
            return None
        age = now - proc.last_message_at
        return age if age > LATE_HEARTBEATS * heartbeat_interval(self.settings.worker_heartbeat_timeout) else None

    def log_stats(self) -> None:
        """One line per worker (and one for the main process's own routes)."""
        interval = self.settings.stats_interval
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.current
            totals = slot.cumulative()
            delta = totals["handled"] - slot.logged_totals.get("handled", 0)
            slot.logged_totals = totals
            late = self._late_heartbeat(proc, now)
            log.info(
                "stats %s pid=%s state=%s%s handled=%d (+%d, %.1f/s) failed=%d dead_lettered=%d inflight=%d "
                "rss=%.1fMB cpu=%.0f%% restarts=%d recycles=%d",
                slot.worker_id, proc.pid if proc else "-", slot.state,
                "" if late is None else f" heartbeat=late({late:.1f} s)", totals["handled"], delta, delta / interval,
                totals["failed"], totals["dead_lettered"], int(proc.stats.get("inflight", 0)) if proc else 0,
                (proc.rss if proc else 0) / 2**20, proc.cpu if proc else 0.0, slot.restarts, slot.recycles,
            )
        if self._autoscaler is not None:
            auto = self._autoscaler
            log.info("stats autoscale workers=%d (min %d, max %d) utilization=%.2f decisions: %d up, %d down",
                     len(self.slots), auto.policy.min_count, auto.policy.max_count, auto.utilization,
                     auto.counts["up"], auto.counts["down"])
        main = self._main_runtime
        if main is not None:
            s = main.stats
            log.info("stats main pid=%d handled=%d failed=%d dead_lettered=%d inflight=%d", os.getpid(), s.handled,
                     s.failed, s.dead_lettered, main.dispatcher.inflight)

    # -- shutdown -----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._stopping = True
        self._parked.stop()
        self._orphans.stop()
        if self._stop_reason:
            log.info("stopping (%s)", self._stop_reason)
        for slot in self.slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
        procs = [(slot, proc) for slot in self.slots for proc in (slot.current, slot.successor) if proc is not None]
        for slot, proc in procs:
            if slot.state != STOPPED:
                slot.state = STOPPING
            if proc.process.exitcode is None:
                try:
                    os.kill(proc.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
                except ProcessLookupError:
                    pass
        for task in (self._idle_task, self._leave_task):
            if task is not None:
                task.cancel()
        if self._main_runtime is not None:
            self._main_runtime.request_stop()
        deadline = time.monotonic() + self.settings.shutdown_timeout + STOP_GRACE
        while any(proc.process.exitcode is None for _, proc in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot, proc in procs:
            if proc.process.exitcode is None:
                log.error("worker %s (pid %d) did not stop within %g s; killing it", slot.worker_id, proc.pid,
                          self.settings.shutdown_timeout + STOP_GRACE)
                _kill(proc.process)
                proc.process.join(5)
            code = proc.process.exitcode
            if proc.reader_open:
                self._read(slot, proc)
            if proc is slot.current:
                # SIGTERM before the worker code ran (still importing) ends a process that never took a message.
                # A worker that was recycling when the stop came drained as well (exit 75).
                slot.final_clean = code in (0, EXIT_RECYCLE) or (code == -signal.SIGTERM and not proc.hello)
                slot.last_exit = describe_exit(code) if proc.hello else f"{describe_exit(code)} while starting"
                log.info("worker %s (pid %d) stopped: %s", slot.worker_id, proc.pid, slot.last_exit)
                self._retire(slot, proc)
                slot.current = None
            else:
                self._discard(proc)
            slot.successor = None if proc is slot.successor else slot.successor
        for slot in self.slots:
            slot.state = STOPPED
        if self._main_task is not None:
            try:
                self._main_clean = await self._main_task
            except Exception:
                log.exception("the main process's runtime failed")
                self._main_clean = False
        if self._parked_task is not None:
            try:
                self._parked_clean = await self._parked_task
            except Exception:
                log.exception("draining parked sessions failed")
                self._parked_clean = False
        if self._orphans_task is not None:
            try:
                await self._orphans_task
            except Exception:
                log.exception("watching for orphaned sessions failed")
        if self.plan.count:
            self.log_stats()
        for service in reversed(self.services):
            try:
                await service.stop(self)
            except Exception:
                log.exception("stopping %r failed", service)
        if self._broker is not None:
            await self._broker.stop()

    def _exit_code(self) -> int:
        if self._fatal is not None:
            log.error("exit 1: %s", self._fatal)
            return 1
        unclean = [slot.worker_id for slot in self.slots if not slot.final_clean]
        if unclean:
            log.error("exit 1: worker(s) %s did not stop cleanly", ", ".join(unclean))
            return 1
        if not self._main_clean or not self._parked_clean:
            log.error("exit 1: the main process's handlers did not drain cleanly")
            return 1
        log.info("all workers stopped cleanly")
        return 0


# -- sessions a larger run left behind ------------------------------------------------------------


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
        await runtime.start()
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
        from core.mqtt_client import PublishError

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


def _send(conn: Connection, message: dict[str, Any]) -> bool:
    try:
        conn.send(message)
        return True
    except (OSError, ValueError):
        return False


def _kill(process: BaseProcess) -> None:
    try:
        os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
    except (ProcessLookupError, TypeError):
        pass


async def _end_session_311(settings: Settings, client_id: str) -> None:
    """MQTT 3.1.1 has no session expiry on DISCONNECT: connecting with a clean session ends it."""
    from core.mqtt_client import MqttClient

    client = MqttClient(settings, client_id, lambda message, generation: None, subscriptions=[],
                        clean_start=True, session_expiry=0, name=f"mqtt[{client_id}-end]", quiet=True)
    client.start(asyncio.get_running_loop())
    if not await client.wait_subscribed(30):
        log.warning("could not reconnect as %s to end its session", client_id)
    await client.stop()


def _settings_overrides(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings that differ from what a worker would read from the environment it inherits."""
    try:
        from_env = load_settings(os.environ if env is None else env)
    except Exception:  # the supervisor's settings came from elsewhere: pass them all
        return {name: getattr(settings, name) for name in SETTING_NAMES}
    return {name: getattr(settings, name) for name in SETTING_NAMES if getattr(settings, name) != getattr(from_env, name)}


def supervisor_plan(shared: Sequence["Route"], workers: int | None, settings: Settings) -> WorkerPlan:
    """The plan `--workers [N]` runs, WORKER_AUTO_SCALE applied; RouteError naming an `ordered=True` route it
    would spread over several workers (core.ordering)."""
    plan = plan_workers(shared, workers, available_cpus())
    most = None
    if settings.worker_auto_scale and plan.count:
        policy = ScalePolicy.from_settings(settings, available_cpus())
        plan, most = autoscale_plan(plan, policy), policy.max_count
    check_ordered_routes(shared, ordered_route_processes(plan, most))
    return plan


def run_supervisor(
    app: "Application",
    workers: int | None = None,
    test_mode: bool = False,
    env_file: str | None = ".env",
    services: Sequence[SupervisorService] = (),
) -> int:
    """`python main.py --workers [N]`: supervise worker processes until stopped; the exit code.

    `env_file` was already loaded into the environment, which the workers inherit.
    """
    plan = supervisor_plan(app.shared_routes(), workers, app.settings)
    if plan.count == 0:
        log.warning("no route has shared=True, so there is nothing for worker processes to do; "
                    "serving the plain routes in this process")
    manager = Supervisor(app, plan, test_mode=test_mode, services=services)
    return asyncio.run(manager.run())
