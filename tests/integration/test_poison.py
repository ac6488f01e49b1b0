"""Issue 9, section 1: a handler's multi-line error must not wedge the MQTT 5 session.

Mosquitto drops a connection whose packet carries a control character in an MQTT string
("Malformed UTF-8"), and paho resends the same unacknowledged publish after every reconnect.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from core.router import Router
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.rt_app import AppProcess, base_env
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(120)

MESSAGES = 300
FAILING = 150


def handled(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


async def test_multi_line_handler_error_is_dead_lettered_without_dropping_the_connection(
        mosquitto_factory: Callable[..., Any], probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    u = unique_id
    broker = mosquitto_factory()
    log = tmp_path / "handled.log"
    app = AppProcess(base_env(
        MQTT_BROKER=broker.host, MQTT_PORT=str(broker.port), MQTT_CLIENT_ID=f"{u}-app", MQTT_PROTOCOL="5",
        MQTT_SESSION_EXPIRY="60", MQTT_RECONNECT_MIN="0.1", MQTT_RECONNECT_MAX="1", SHUTDOWN_TIMEOUT="10",
        ROUTERS_PACKAGE="tests.apps.poison_app", POISON_APP_PREFIX=u, POISON_APP_LOG=str(log),
    ), name=u).start()
    try:
        await app.wait_ready()
        probe = await probe_factory(BrokerTarget("mosquitto", broker.host, broker.port, v5=True))
        await probe.subscribe(f"dead-letter/{u}/#")
        for n in range(MESSAGES):
            await probe.publish(f"{u}/work/{n}", "fail" if n == FAILING else "ok")

        await wait_until(lambda: len(handled(log)) == MESSAGES, f"all {MESSAGES} messages handled", timeout=30)
        letters = await probe.wait_count(f"dead-letter/{u}/", 1, timeout=30)
        props = letters[0].user_properties
        assert letters[0].topic == f"dead-letter/{u}/work/{FAILING}"
        assert props["error_type"] == "RuntimeError"
        assert props["error"] == "first line\\nsecond line\\r\\n\\tthird line \\x00 \\x85 end"
        assert props["original_topic"] == f"{u}/work/{FAILING}"

        app.signal(signal.SIGTERM)
        assert await app.wait_exit() == 0, app.output()
        counts = handled(log)
        assert set(counts) == {str(n) for n in range(MESSAGES)}
        assert max(counts.values()) == 1, "a message was handled twice (redelivered after a dropped connection)"
        assert len(probe.on(f"dead-letter/{u}/")) == 1
        assert "Malformed UTF-8" not in broker.log_text()
        assert "connection to" not in app.output() and "disconnected from broker" not in app.output(), app.output()
    finally:
        app.cleanup()


async def test_a_request_whose_response_topic_has_a_wildcard_does_not_wedge_the_session(
        mosquitto_factory: Callable[..., Any], serve: ServeFn, probe_factory: ProbeFn, unique_id: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto accepts `replies/+` as a request's response topic but drops a client that publishes to
    it: the handler's result is not sent (logged), the request is acknowledged, the next one is served."""
    u = unique_id
    server = mosquitto_factory()
    target = BrokerTarget("mosquitto", server.host, server.port, v5=True)
    router = Router()
    router.on(f"{u}/ask/{{n}}", lambda n: {"answer": n}, qos=1)
    runtime = await serve(target, router)
    probe = await probe_factory(target)
    await probe.subscribe(f"{u}/replies/#")
    await probe.publish(f"{u}/ask/1", "q", response_topic=f"{u}/replies/+")
    await probe.publish(f"{u}/ask/2", "q", response_topic=f"{u}/replies/2")
    [reply] = await probe.wait_count(f"{u}/replies/", 1)
    assert reply.topic == f"{u}/replies/2" and reply.json() == {"answer": "2"}
    assert runtime.client.state.disconnects == 0
    assert runtime.stats.handled == 2
    assert any("could not publish the response" in r.getMessage() and "wildcard" in r.getMessage()
               for r in caplog.records)
    assert "Malformed" not in server.log_text() and "protocol error" not in server.log_text().lower()
