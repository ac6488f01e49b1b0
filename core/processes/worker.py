"""A worker process: builds the app itself, serves its shared routes, reports to the supervisor.

`worker_main` is the target the supervisor spawns (multiprocessing, spawn start method). Only
plain data crosses the process boundary: a `WorkerSpec` and one end of a Pipe. Everything else
(settings, app, MQTT client, hooks such as database engines or metrics) is built here, after the
process has started.

Messages to the supervisor are dicts with a "type": `hello`, `ready`, `hb` (heartbeat with
stats), `recycling`, `stopping`, `bye`. Heartbeats are sent from the event loop, so a handler that
blocks the loop stops them and the supervisor replaces the process. A handler that hangs without
blocking the loop (a plain one stuck in the thread pool, an async one awaiting forever) leaves the
heartbeats going, so each heartbeat also carries the age and route of the oldest handler in flight
(`HandlerWatch`) and the supervisor replaces a worker whose oldest handler has run longer than
WORKER_HANDLER_TIMEOUT. From the supervisor: `go` (a pre-started successor may connect now),
`stop`, and `retire` (the autoscaler shrinks the pool: leave the groups, drain, end the session).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

from core.processes.worker_slots import client_id_for, leave_stale, serve_only  # also imported from here

if TYPE_CHECKING:
    from core.processes.assembly import Application
    from core.runtime.events import FeedCursor
    from core.routing.router import Route
    from core.runtime.runtime import Runtime

log = logging.getLogger("core.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_RECYCLE = 75
"""A worker that recycled itself (WORKER_MAX_MESSAGES / WORKER_MAX_MEMORY_MB) exits with this."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker process (plain, picklable data)."""

    index: int
    all_routes: bool  # True: every shared route; False: shared routes with worker_count > index
    overrides: dict[str, Any] = field(default_factory=dict)  # settings that differ from the environment
    test_mode: bool = False
    wait_for_go: bool = False  # a recycling successor loads the app, then waits for "go" to connect
    expect_session: bool = False  # an earlier process of this slot had a session: finding none is a loss

    @property
    def worker_id(self) -> str:
        return f"w{self.index}"


def select_routes(shared_routes: Sequence["Route"], index: int, all_routes: bool) -> list["Route"]:
    """The shared routes worker `index` subscribes to."""
    if all_routes:
        return list(shared_routes)
    return [route for route in shared_routes if route.worker_count > index]


def heartbeat_interval(timeout: float) -> float:
    """How often a worker reports: several times per heartbeat timeout, at most once a second."""
    return max(0.05, min(1.0, timeout / 5))


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process."""
    early: list[int] = []
    # Until the event loop has its own handlers, remember stop signals instead of dying mid-import.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: early.append(signum))
    try:
        code = asyncio.run(_serve(spec, conn, early))
    except BaseException:  # noqa: BLE001 - the traceback must reach the log before the process dies
        logging.getLogger("core.worker").exception("worker %s failed", spec.worker_id)
        code = EXIT_FAILED
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a handler thread stuck in user code must not keep the process alive.
    os._exit(code)


class _Link:
    """The worker's end of the pipe, used from the event loop only."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.go = asyncio.Event()
        self.lost = False
        self.on_stop: Any = None

    def send(self, message: dict[str, Any]) -> None:
        if self.lost:
            return
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            self._gone()

    def watch(self) -> None:
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "go":
                    self.go.set()
                elif kind == "stop" and self.on_stop is not None:
                    self.on_stop("asked by the supervisor")
                elif kind == "retire" and self.on_stop is not None:
                    self.on_stop("retired by the autoscaler", retire=True)
        except (EOFError, OSError):
            self._gone()

    def _gone(self) -> None:
        if self.lost:
            return
        self.lost = True
        try:
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        if self.on_stop is not None:
            self.on_stop("the supervisor is gone")

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        self.conn.close()


class _Stopper:
    """Collects the first reason to stop; later ones are logged and ignored."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self.recycle = False
        self.retire = False
        self.on_repeat: Callable[[], None] | None = None  # a second request (a signal) cuts a retirement short

    def __call__(self, reason: str, *, recycle: bool = False, retire: bool = False) -> None:
        if self.event.is_set():
            log.info("%s; already stopping", reason)
            if self.on_repeat is not None:
                self.on_repeat()
            return
        self.reason = reason
        self.recycle = recycle
        self.retire = retire
        self.event.set()


async def _serve(spec: WorkerSpec, conn: Connection, early: list[int]) -> int:
    link = _Link(conn)
    stopper = _Stopper()
    link.on_stop = stopper
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, lambda s=sig: stopper(f"{signal.Signals(s).name} received"))
    for signum in early:
        stopper(f"{signal.Signals(signum).name} received during startup")
    link.send({"type": "hello", "pid": os.getpid()})
    link.watch()

    from core.foundation.config import load_settings
    from core.foundation.logging_setup import setup_logging

    settings = load_settings(os.environ).with_overrides(**spec.overrides)
    setup_logging(settings.log_level, settings.log_format, spec.worker_id)
    from core.processes.assembly import Application

    app = Application.load(settings)
    shared = app.shared_routes()
    mine = select_routes(shared, spec.index, spec.all_routes)
    group = settings.mqtt_group_name
    client_id = client_id_for(settings.mqtt_client_id, spec.index)
    # The runtime knows every shared route, but subscribes to its own only: deliveries for a
    # filter an older, wider run of this id had subscribed are then handled, not dead-lettered,
    # until the unsubscribe below reaches the broker.
    runtime = app.make_runtime(shared, client_id=client_id, worker_id=spec.worker_id)
    runtime.client.expect_session = spec.expect_session
    stale = serve_only(runtime, mine, group)

    from core.runtime.events import FeedCursor

    feeds = FeedCursor()  # events and dead letters not yet sent to the supervisor
    ticker = asyncio.create_task(_tick(runtime, settings, link, stopper, feeds))
    background: list[asyncio.Task[Any]] = []
    started = False
    try:
        if spec.wait_for_go and not stopper.event.is_set():
            log.info("loaded; waiting for the previous process of %s to hand over", spec.worker_id)
            await _first(link.go.wait(), stopper.event.wait())
        if not stopper.event.is_set():
            await runtime.start()
            started = True
            background.append(asyncio.create_task(_announce_ready(runtime, link, stale)))
            if spec.test_mode:
                from core.processes.assembly import stop_when_idle

                idle = asyncio.create_task(stop_when_idle(runtime, settings.test_mode_idle))
                idle.add_done_callback(lambda t: t.cancelled() or stopper("test mode: idle"))
                background.append(idle)
        await stopper.event.wait()
        log.info("%s; stopping gracefully", stopper.reason)
        link.send({"type": "recycling" if stopper.recycle else "stopping", "reason": stopper.reason})
        for task in background:
            task.cancel()
        if stopper.retire and started:
            clean, retired = await retire(app, runtime, spec.index, stopper)
        else:
            clean, retired = (await runtime.stop() if started else True), False
    finally:
        ticker.cancel()
    link.send({"type": "bye", "clean": clean, "retired": retired, "stats": runtime.stats.snapshot(),
               "reason": stopper.reason, **feeds.take()})
    link.close()
    if not clean:
        return EXIT_FAILED
    return EXIT_RECYCLE if stopper.recycle else EXIT_OK


async def retire(app: "Application", runtime: "Runtime", index: int, stopper: _Stopper) -> tuple[bool, bool]:
    """Leave the shared groups, finish and ack what is in flight, then end the session once it is empty.

    Ending a session discards what is queued in it, so after disconnecting (session kept) the worker
    reconnects as itself and drains it behind a marker like a larger run's leftover session
    (`ParkedSessions`): what the broker had dealt it before the UNSUBACK is handled, then the
    session is ended (expiry 0). (clean, session ended); a stop signal meanwhile keeps the session.
    """
    from core.processes.parked_sessions import ParkedSessions  # late: a new worker says hello before the heavy imports

    parked = ParkedSessions(app, index)
    stopper.on_repeat = parked.stop
    if not await runtime.client.unsubscribe():
        log.warning("no UNSUBACK while leaving the shared groups; the drain below leaves them again")
    clean = await runtime.stop()
    ended = await parked.end_session(index, "this worker, retired by the autoscaler")
    if parked.last_drain is not None:
        runtime.stats.absorb(*parked.last_drain)  # reported in the final "bye" with the worker's own
    return clean, ended


async def _first(*awaitables: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _announce_ready(runtime: "Runtime", link: _Link, stale: list[str]) -> None:
    await leave_stale(runtime, stale)
    state = runtime.client.state
    link.send({"type": "ready", "session_present": state.session_present,
               "subscriptions": len(runtime.client.subscriptions)})


class HandlerWatch:
    """The oldest in-flight handler of a worker, sampled with each heartbeat (off the message path).

    A dispatcher task is dated the first time a sample sees it, so an age is short by at most one
    heartbeat interval; that is plenty for a limit of minutes and costs nothing per message.
    """

    def __init__(self) -> None:
        self._first_seen: dict[Any, float] = {}  # tasks or handler coroutines

    def oldest(self, tasks: Collection[Any], now: float) -> dict[str, Any] | None:
        """`{"age", "route", "topic"}` of the longest-running task in `tasks`, or None if there is none."""
        seen = self._first_seen
        for task in tasks:
            if task not in seen:
                seen[task] = now
        if len(seen) != len(tasks):  # seen is a superset of tasks: drop the finished ones
            for task in [t for t in seen if t not in tasks]:
                del seen[task]
        if not seen:
            return None
        task, since = min(seen.items(), key=lambda item: item[1])
        route, topic = describe_task(task)
        return {"age": round(now - since, 3), "route": route, "topic": topic}


def describe_task(task: Any) -> tuple[str, str]:
    """(route pattern, topic) a dispatcher task (or handler coroutine) is working on, read from its suspended frames.

    Best effort, for log lines only: "?" where a frame does not tell (e.g. still waiting for a slot).
    """
    route = topic = "?"
    coro: Any = task.get_coro() if isinstance(task, asyncio.Task) else task  # Dispatcher.running holds coroutines
    for _ in range(16):  # _process -> _run -> middleware -> handler: a few levels at most
        frame = getattr(coro, "cr_frame", None)
        if frame is None:
            break
        local = frame.f_locals
        if topic == "?" and isinstance(local.get("topic"), str):
            topic = local["topic"]
        pattern = getattr(local.get("endpoint"), "pattern", None)
        if isinstance(pattern, str):
            route = pattern
            break
        coro = getattr(coro, "cr_await", None)
    return route, topic


def recycle_reason(received: int, rss: int | None, max_messages: int, max_memory_mb: int) -> str | None:
    """Why this worker should hand over to a fresh process now, or None (limits of 0 are off)."""
    if max_messages and received >= max_messages:
        return f"recycling after {received} messages (WORKER_MAX_MESSAGES={max_messages})"
    if max_memory_mb and rss is not None and received and rss > max_memory_mb * 2**20:
        return f"recycling at {rss / 2**20:.0f} MB RSS (WORKER_MAX_MEMORY_MB={max_memory_mb})"
    return None


async def _tick(runtime: "Runtime", settings: Any, link: _Link, stopper: _Stopper, feeds: "FeedCursor") -> None:
    """Heartbeats with stats, and the recycling limits, checked from the event loop."""
    import psutil

    from core.processes.autoscale import LoadMeter

    proc = psutil.Process()
    proc.cpu_percent(None)
    interval = heartbeat_interval(settings.worker_heartbeat_timeout)
    max_messages = settings.worker_max_messages
    max_memory_mb = settings.worker_max_memory_mb
    baseline = proc.memory_info().rss
    if max_memory_mb and baseline > max_memory_mb * 2**20:
        # Recycling would only start another process just as big: a storm of restarts.
        log.error("WORKER_MAX_MEMORY_MB=%d is below this worker's size right after start (%.0f MB); "
                  "the memory limit is ignored", max_memory_mb, baseline / 2**20)
        max_memory_mb = 0
    next_beat = 0.0
    watch = HandlerWatch()
    meter = LoadMeter()  # the autoscaler's averages (core/processes/autoscale.py)
    while True:
        meter.tick(runtime.dispatcher.inflight)
        rss = None
        beat = time.monotonic() >= next_beat
        if beat:
            next_beat = time.monotonic() + interval
            rss = proc.memory_info().rss
        if not stopper.event.is_set():
            reason = recycle_reason(runtime.stats.received, rss, max_messages, max_memory_mb)
            if reason is not None:
                stopper(reason, recycle=True)
        if beat:
            stats = runtime.stats.snapshot()
            stats["inflight"] = runtime.dispatcher.inflight
            stats["load"] = meter.read(time.monotonic(), stats["routes"])
            link.send({"type": "hb", "stats": stats, "rss": rss, "cpu": proc.cpu_percent(None),
                       "connected": runtime.client.state.connected,
                       "oldest": watch.oldest(runtime.dispatcher.running, time.monotonic()), **feeds.take()})
        await asyncio.sleep(min(0.05, interval))
