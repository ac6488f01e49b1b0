"""How the supervisor stops: workers drained (SIGTERM, then SIGKILL after SHUTDOWN_TIMEOUT + STOP_GRACE),
the main runtime and the drains awaited, services and the embedded broker stopped; the exit code.
Part of `core.processes.supervisor.Supervisor`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from core.processes.worker import EXIT_RECYCLE
from core.processes.worker_slots import STOPPED, STOPPING, describe_exit, kill

log = logging.getLogger("core.supervisor")

STOP_GRACE = 5.0  # on top of SHUTDOWN_TIMEOUT: time for drained workers to disconnect and exit


class SupervisorShutdown:
    """Mixin of `Supervisor`: its `_shutdown` and `_exit_code`."""

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
                kill(proc.process)
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
