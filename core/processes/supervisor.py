"""The supervisor: `python main.py --workers` runs shared routes in worker processes.

The main process runs one asyncio loop that starts the embedded broker (if used), spawns the
workers (spawn start method, see `core.processes.worker`), serves the non-shared routes itself on plain
subscriptions, drains sessions a previous, larger run left behind, and supervises: exits,
heartbeats, restarts with backoff, crash loops, recycling hand-overs, stats lines and shutdown;
with WORKER_AUTO_SCALE it also grows and shrinks the pool (decisions in `core.processes.autoscale`).

`SupervisorService`s (an HTTP status server, metrics) start and stop with it; its live view and stats
lines are `core.processes.supervisor_view`, its stop `core.processes.supervisor_shutdown`, its slots `core.processes.worker_slots`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from core.processes.adoption import OrphanWatch
from core.processes.autoscale import Autoscaler, ScalePolicy, WorkerLoad
from core.foundation.backoff import backoff_delay
from core.foundation.config import Settings
from core.runtime.events import ingest_from_worker, record_event
from core.processes.parked_sessions import ParkedSessions
from core.runtime.process_metrics import fold_final
from core.processes.supervisor_shutdown import SupervisorShutdown
from core.processes.supervisor_view import SupervisorView
from core.processes.worker import EXIT_RECYCLE, WorkerSpec, heartbeat_interval, worker_main
from core.processes.worker_plan import WorkerPlan, available_cpus, settings_overrides, supervisor_plan
from core.processes.worker_slots import (BACKOFF, COUNTERS, RECYCLING, RETIRING, RUNNING, STARTING, STOPPED,
                               WorkerProcess, WorkerSlot, client_id_for, describe_exit, kill, leave_stale, send,
                               serve_only)

if TYPE_CHECKING:
    from core.processes.assembly import Application
    from core.runtime.runtime import Runtime

log = logging.getLogger("core.supervisor")

RESTART_BACKOFF_BASE = 0.5  # seconds before the first restart of a crashed worker (with jitter)
RESTART_BACKOFF_CAP = 30.0
STARTUP_GRACE = 60.0  # a new process may take this long to send its first heartbeat (imports)


class SupervisorService(Protocol):
    """Something that lives as long as the supervisor (status HTTP server, metrics aggregation)."""

    async def start(self, manager: "Supervisor") -> None: ...

    async def stop(self, manager: "Supervisor") -> None: ...


class Supervisor(SupervisorView, SupervisorShutdown):
    """Runs and supervises the worker processes of one app; `run()` returns the exit code."""

    def __init__(
        self,
        app: "Application",
        plan: WorkerPlan,
        *,
        test_mode: bool = False,
        services: Sequence[SupervisorService] = (),
        mp_context: Any = None,
        handle_signals: bool = True,  # False off the main thread (`WorkerManager`, core/processes/worker_api.py)
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
        self._overrides = settings_overrides(self.settings)
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
        # Sessions other replicas left (issue 8, docs/workers.md).
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
            from core.transport.embedded_broker import EmbeddedBroker

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
            from core.processes.assembly import stop_when_idle

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
        if successor is not None and successor.process.exitcode is None and send(successor.conn, {"type": "go"}):
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
                kill(proc.process)
            elif self._handler_hung(proc):
                assert proc.oldest is not None
                proc.kill_reason = (
                    f"handler of route {proc.oldest.get('route')!r} (topic {proc.oldest.get('topic')!r}) running for "
                    f"{float(proc.oldest['age']):.1f} s (WORKER_HANDLER_TIMEOUT={self.settings.worker_handler_timeout:g}); "
                    "its ack holds back every later one"
                )
                log.error("worker %s (pid %d): %s; killing it (its unacknowledged messages go to the replacement)",
                          slot.worker_id, proc.pid, proc.kill_reason)
                kill(proc.process)

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
            send(slot.current.conn, {"type": "retire"})

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
        for key in COUNTERS:
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
            kill(proc.process)
        proc.process.join(5)

    def _close_reader(self, proc: WorkerProcess) -> None:
        if proc.reader_open:
            proc.reader_open = False
            try:
                asyncio.get_running_loop().remove_reader(proc.conn.fileno())
            except (OSError, ValueError):
                pass

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
