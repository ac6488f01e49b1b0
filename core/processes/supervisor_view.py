"""The supervisor's live view (`Supervisor.snapshot`, plain data for the status page and metrics) and
its periodic stats lines; part of `core.processes.supervisor.Supervisor`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from core.processes.worker import heartbeat_interval
from core.processes.worker_slots import WorkerProcess

log = logging.getLogger("core.supervisor")

LATE_HEARTBEATS = 3  # heartbeat intervals without a message before the stats show a worker's heartbeat as late


class SupervisorView:
    """Mixin of `Supervisor`: reads its slots, main runtime, parked and adopted sessions and autoscaler."""

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
