"""A drain of former sessions whose runtime cannot start its hooks (the database is down at that
moment) leaves the session alone and does not count as an unclean drain: nothing was handled, the
session stays for the next start. Before, the error made the single process exit 1 at SIGTERM
("handlers of messages parked in former worker sessions did not drain cleanly")."""

from __future__ import annotations

import asyncio
from typing import Any

from core.foundation.config import load_settings
from core.processes.assembly import Application
from core.processes.parked_sessions import ParkedSessions
from core.router import Router
from tests.support.servers import MosquittoServer


class DownDependency:
    """A hook whose start fails as a hook needing a database that is down does."""

    started = 0
    stopped = 0

    async def start(self, runtime: Any) -> None:
        DownDependency.started += 1
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    async def stop(self, runtime: Any) -> None:
        DownDependency.stopped += 1


async def test_a_probe_whose_hooks_cannot_start_keeps_the_session_and_counts_as_clean(
        mosquitto: MosquittoServer, unique_id: str) -> None:
    async def handler(payload: Any) -> None:
        return None

    router = Router()
    router.on(f"{unique_id}/in/{{n}}", handler, qos=1, shared=True)
    settings = load_settings({
        "MQTT_BROKER": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_CLIENT_ID": unique_id,
        "MQTT_GROUP_NAME": f"g{unique_id}", "SHUTDOWN_TIMEOUT": "5",
    })
    app = Application(settings, router)
    app.hook_factories.append(lambda settings, worker_id: [DownDependency()])
    parked = ParkedSessions(app, first=0)
    assert await asyncio.wait_for(parked.run(), 30) is True
    assert DownDependency.started == 1  # gave up at the first id: nothing to tell about the next ones
    assert parked.info == {}
