"""Fixtures for the runtime suites: a broker target (private Mosquitto or the embedded broker),
an in-process runtime factory and a probe client.

`broker` is parametrized, so a test that uses it runs once against Mosquitto (MQTT 5) and once
against the embedded amqtt broker (MQTT 3.1.1, in the test's event loop).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from core.foundation.config import load_settings
from core.transport.embedded_broker import EmbeddedBroker
from core.router import Route, Router
from core.runtime.runtime import Runtime
from tests.support.rt_probe import Probe

HOST = "127.0.0.1"


@dataclass(frozen=True)
class BrokerTarget:
    kind: str  # "mosquitto" or "embedded"
    host: str
    port: int
    v5: bool

    def env(self, port: int | None = None) -> dict[str, str]:
        """Settings that make the runtime connect here (optionally through a proxy on `port`)."""
        return {
            "MQTT_BROKER": self.host,
            "MQTT_PORT": str(port or self.port),
            "MQTT_PROTOCOL": "5" if self.v5 else "3.1.1",
        }


@pytest_asyncio.fixture(params=["mosquitto", "embedded"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerTarget]:
    if request.param == "mosquitto":
        server = request.getfixturevalue("mosquitto")
        yield BrokerTarget("mosquitto", server.host, server.port, v5=True)
        return
    embedded = EmbeddedBroker(HOST, 0)
    await embedded.start()
    try:
        yield BrokerTarget("embedded", HOST, embedded.port, v5=False)
    finally:
        await embedded.stop()


ServeFn = Callable[..., Awaitable[Runtime]]


@pytest_asyncio.fixture
async def serve(unique_id: str) -> AsyncIterator[ServeFn]:
    """`await serve(target, routes_or_router, MAX_INFLIGHT="3", ...)`: a started, subscribed Runtime."""
    runtimes: list[Runtime] = []
    counter = itertools.count()

    async def start(target: BrokerTarget, routes: Router | Iterable[Route], *, port: int | None = None,
                    **env: str) -> Runtime:
        settings = load_settings({
            **target.env(port),
            "MQTT_CLIENT_ID": f"{unique_id}-rt{next(counter)}",
            "MQTT_SESSION_EXPIRY": "10",
            "MQTT_ORPHAN_GRACE": "0",  # in-process runtimes of one test: no fleet to adopt their sessions
            "MQTT_RECONNECT_MIN": "0.1",
            "MQTT_RECONNECT_MAX": "1",
            "SHUTDOWN_TIMEOUT": "5",
            **env,
        })
        runtime = Runtime(settings, list(routes))
        runtimes.append(runtime)
        await runtime.start()
        assert await runtime.wait_ready(20), f"runtime did not subscribe: {runtime.client.state.last_error}"
        return runtime

    try:
        yield start
    finally:
        for runtime in runtimes:
            if not runtime._stopping:
                await runtime.stop()


ProbeFn = Callable[..., Awaitable[Probe]]


@pytest_asyncio.fixture
async def probe_factory(unique_id: str) -> AsyncIterator[ProbeFn]:
    """`await probe_factory(target)`: a connected test client (v5 on Mosquitto, 3.1.1 on embedded)."""
    probes: list[Probe] = []
    counter = itertools.count()

    async def make(target: BrokerTarget, *, port: int | None = None, v5: bool | None = None) -> Probe:
        probe = Probe(target.host, port or target.port, f"{unique_id}-probe{next(counter)}",
                      v5=target.v5 if v5 is None else v5)
        probes.append(probe)
        return await probe.connect()

    try:
        yield make
    finally:
        for probe in probes:
            probe.close()


