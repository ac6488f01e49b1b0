"""`python main.py` in one process: the composition on top of `core` (the app itself is assembled by
`core.processes.assembly`, which every worker process uses too; its names are importable from here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from core.processes.assembly import Application, HookFactory, feature_hooks, stop_when_idle  # noqa: F401 - also imported from here
from core.foundation.config import Settings
from core.routing.discovery import DiscoveryError, discover_routers  # noqa: F401 - also imported from here
from core.runtime.runtime import Runtime

log = logging.getLogger("bootstrap")


# Where the embedded broker goes when EMBEDDED_BROKER_PORT is not set and 1883 is taken.
EMBEDDED_FALLBACK_PORT = 11883


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_embedded_broker_port(settings: Settings, port_was_set: bool) -> Settings:
    """With no EMBEDDED_BROKER_PORT and 1883 taken (say, by a Mosquitto), use 11883 instead.

    An explicitly set port is kept as it is: if it is taken, the broker's start fails with a
    one-line message naming the ways out.
    """
    host, port = settings.embedded_broker_host, settings.embedded_broker_port
    if port_was_set or port_is_free(host, port):
        return settings
    if port_is_free(host, EMBEDDED_FALLBACK_PORT):
        log.warning(
            "port %d on %s is taken (another MQTT broker?); the embedded broker uses port %d instead. "
            "To use the broker on %d set MQTT_BROKER=%s; to choose the port set EMBEDDED_BROKER_PORT.",
            port, host, EMBEDDED_FALLBACK_PORT, port, host,
        )
        return settings.with_overrides(embedded_broker_port=EMBEDDED_FALLBACK_PORT)
    return settings


async def serve_single_process(app: Application, *, test_mode: bool = False) -> int:
    """`python main.py`: every route in this process (shared ones as `$share/...` subscriptions).

    Returns the exit code: 0 after a clean drain, 1 if handlers had to be cancelled.
    """
    from core.transport.embedded_broker import EmbeddedBroker

    settings = app.settings
    broker = None
    if settings.uses_embedded_broker:
        broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port)
        await broker.start()
        log.info("embedded broker listening on %s:%d (set MQTT_BROKER to use an external one)",
                 settings.embedded_broker_host, settings.embedded_broker_port)
    from core.processes.adoption import OrphanWatch
    from core.processes.parked_sessions import ParkedSessions

    runtime = app.make_runtime(app.routes)
    # Every worker id is a leftover here: a run with --workers may have left QoS 1 messages in them.
    parked = ParkedSessions(app, first=0)
    subscribed = asyncio.Event()
    runtime.client.add_state_listener(lambda event: subscribed.set() if event == "subscribed" else None)
    orphans = OrphanWatch(app, lambda: {settings.mqtt_client_id}, subscribed.wait)  # sessions other replicas left

    def request_stop() -> None:
        parked.stop()
        orphans.stop()
        runtime.request_stop()

    install_stop_signals(request_stop)

    async def drain_parked() -> bool:
        await subscribed.wait()  # the app's own subscriptions first; the drain is background work
        return await parked.run()

    parked_task = asyncio.create_task(drain_parked())
    orphans_task = asyncio.create_task(orphans.run())
    idle_task = asyncio.create_task(_stop_when_idle_after(parked_task, runtime, settings.test_mode_idle)) \
        if test_mode else None
    ops = None
    clean = parked_clean = False
    try:
        from core.operations.http import start_for_runtime  # /health, /ready, /metrics, / when HTTP_PORT is set

        ops = await start_for_runtime(settings, runtime, app.routes)
        clean = await runtime.run()
    finally:
        parked.stop()
        orphans.stop()
        if not subscribed.is_set():
            parked_task.cancel()  # stopped before it ever subscribed: nothing was drained
        try:
            parked_clean = await parked_task
        except asyncio.CancelledError:
            parked_clean = True
        except Exception:
            log.exception("draining the sessions of former worker processes failed")
        try:
            await orphans_task
        except Exception:
            log.exception("watching for orphaned sessions failed")
        if idle_task is not None:
            idle_task.cancel()
        if ops is not None:
            await ops.stop()
        if broker is not None:
            await broker.stop()
    if not parked_clean:
        log.error("exit 1: handlers of messages parked in former worker sessions did not drain cleanly")
    return 0 if clean and parked_clean else 1


async def _stop_when_idle_after(parked: "asyncio.Task[bool]", runtime: Runtime, idle_seconds: float) -> None:
    """`--test-mode` in one process: what waited in former worker sessions counts as available work."""
    await asyncio.wait({parked})
    await stop_when_idle(runtime, idle_seconds)


STUCK_THREAD_GRACE = 1.0  # seconds for idle pool threads to notice the executor's shutdown


def exit_past_stuck_threads(code: int, grace: float = STUCK_THREAD_GRACE) -> int:
    """After serving: return `code`, or end the process with it now if threads are still running.

    A plain handler stuck in its pool thread cannot be interrupted, and Python joins the pool's
    threads when the interpreter exits, so such a process would never exit even though the runtime
    gave up on the handler after SHUTDOWN_TIMEOUT (workers always end with os._exit for the same
    reason). Logs are flushed first; a process whose threads all ended exits normally.
    """
    main = threading.main_thread()
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
    if not stuck:
        return code
    log.error("%d thread(s) still running after the shutdown (%s), presumably plain handlers stuck in user code, "
              "which cannot be interrupted; exiting with code %d without waiting for them",
              len(stuck), ", ".join(stuck), code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def install_stop_signals(request_stop: Callable[[], None]) -> None:
    """SIGINT/SIGTERM start a graceful stop; further signals during it are ignored (and logged)."""
    loop = asyncio.get_running_loop()
    state = {"stopping": False}

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if state["stopping"]:
            log.info("%s received again; already stopping", name)
            return
        state["stopping"] = True
        log.info("%s received; stopping gracefully", name)
        request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
