"""A worker slot: its stable client id, the shared routes its process subscribes to, and the
supervisor's bookkeeping of it (counters over its processes, the OS process serving it now)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from core.routing.router import Route
    from core.runtime.runtime import Runtime

log = logging.getLogger("core.worker")


STARTING, RUNNING, RECYCLING, BACKOFF, STOPPING, STOPPED = "starting", "running", "recycling", "backoff", "stopping", "stopped"
RETIRING = "retiring"  # the autoscaler retires it: it leaves its groups, drains and ends its session
COUNTERS = ("received", "handled", "failed", "dead_lettered", "unrouted", "dropped_on_shutdown", "responses")


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
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
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
            for key in COUNTERS:
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


def send(conn: Connection, message: dict[str, Any]) -> bool:
    try:
        conn.send(message)
        return True
    except (OSError, ValueError):
        return False


def kill(process: BaseProcess) -> None:
    try:
        os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
    except (ProcessLookupError, TypeError):
        pass


def client_id_for(base: str, index: int) -> str:
    """The stable MQTT client id of worker `index`."""
    return f"{base}-w{index}"


def serve_only(runtime: "Runtime", routes: Sequence["Route"], group: str) -> list[str]:
    """Subscribe `runtime` to `routes` only, though it knows (and so handles) all its table's routes.

    Returns the other routes' subscriptions: a resumed session of a wider run may still hold them,
    and what it delivers for them is then handled, not dead-lettered, until `leave_stale` leaves them.
    """
    wanted = {route.subscription_topic(group) for route in routes}
    runtime.client.subscriptions = [sub for sub in runtime.client.subscriptions if sub.topic in wanted]
    runtime.subscriptions = list(runtime.client.subscriptions)
    topics = [route.subscription_topic(group) for route in runtime.table.routes if route.subscribe]
    return [topic for topic in topics if topic not in wanted]


async def leave_stale(runtime: "Runtime", stale: Sequence[str]) -> None:
    """Once ready: unsubscribe `stale` (from `serve_only`) if the session was resumed."""
    await runtime.wait_ready()
    if stale and runtime.client.state.session_present:
        # A resumed session may still hold filters this process no longer serves (a route's
        # worker_count went down, or a single-process run left its `$share` subscriptions in the
        # supervisor's session): leave those groups so the broker stops dealing them to us.
        if await runtime.client.unsubscribe(list(stale)):
            log.info("left %d shared subscription(s) this process no longer serves, if its session held them: %s",
                     len(stale), ", ".join(stale))
