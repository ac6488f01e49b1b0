"""MQTT 3.1.1 (`MQTT_PROTOCOL=3.1.1`) against Mosquitto: routing, dead letters as JSON, persistent sessions."""

from __future__ import annotations

from typing import Any

import pytest

from core.router import Router
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def target(mosquitto: Any) -> BrokerTarget:
    return BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=False)


async def test_routes_and_dead_letters_on_311(target: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn,
                                              unique_id: str) -> None:
    u = unique_id
    seen: list[tuple[str, Any]] = []

    async def status(device_id: str, payload: Any) -> None:
        if payload == "boom":
            raise ValueError("refused")
        seen.append((device_id, payload))

    router = Router()
    router.on(f"{u}/devices/{{device_id}}/status", status, qos=1)
    runtime = await serve(target, router)
    assert not runtime.client.v5
    probe = await probe_factory(target)
    await probe.subscribe(f"dead-letter/{u}/#")
    await probe.publish(f"{u}/devices/7/status", {"state": "on"})
    await probe.publish(f"{u}/devices/8/status", "boom")
    await probe.publish(f"{u}/devices/9/status", "{not json")
    await wait_until(lambda: seen == [("7", {"state": "on"})], "the good message")
    letters = await probe.wait_count(f"dead-letter/{u}/", 2)
    bodies = {letter.json()["original_topic"]: letter.json() for letter in letters}
    assert bodies[f"{u}/devices/8/status"]["error_type"] == "ValueError"
    assert bodies[f"{u}/devices/8/status"]["payload"] == "boom"
    assert bodies[f"{u}/devices/9/status"]["error_type"] == "PayloadError"
    assert runtime.stats.dead_lettered == 2


async def test_persistent_session_on_311_keeps_what_was_published_while_down(
        target: BrokerTarget, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    u = unique_id
    got: list[str] = []

    async def handler(n: str) -> None:
        got.append(n)

    router = Router()
    router.on(f"{u}/jobs/{{n}}", handler, qos=1)
    first = await serve(target, router, MQTT_CLIENT_ID=f"{u}-sess")
    probe = await probe_factory(target)
    await probe.publish(f"{u}/jobs/0", "")
    await wait_until(lambda: got == ["0"], "the first message")
    assert await first.stop()

    for n in range(1, 6):
        await probe.publish(f"{u}/jobs/{n}", "")  # the session queues these for the client
    second = await serve(target, router, MQTT_CLIENT_ID=f"{u}-sess")
    assert second.client.state.session_present
    await wait_until(lambda: len(got) >= 6, "the messages published while the app was down")
    assert got == [str(n) for n in range(6)]
