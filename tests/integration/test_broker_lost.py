"""Issue 9, section 5: say when the broker lost what it held, and when a worker's heartbeat is late.

(a) The broker is SIGKILLed with persistence on but nothing saved yet, then restarted: the app's
    session is gone. The app must log a WARNING naming that consequence and count it
    (`mqtt_app_mqtt_sessions_lost_total`); its first connection (a new session) stays INFO, and a
    clean broker restart (the session saved and resumed) is not reported as a loss.
(b) A worker stopped with SIGSTOP: the supervisor's stats line and the status page show its
    heartbeat as late, and stop doing so after SIGCONT.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any, Callable

import pytest

from tests.support.ops import app_factory, http_get, metric, ready, scrape  # noqa: F401 - fixture
from tests.support.ops import wait_until_sync

pytestmark = pytest.mark.timeout(180)

LOST = "the broker dropped the session this client had"


def sessions_lost(url: str) -> float:
    return metric(scrape(url), "mqtt_app_mqtt_sessions_lost_total", worker="main")


def test_a_session_the_broker_dropped_is_a_warning_and_counted(
        mosquitto_factory: Callable[..., Any], app_factory: Any, unique_id: str) -> None:  # noqa: F811
    broker = mosquitto_factory(persistence=True)
    app, url = app_factory(broker, MQTT_SESSION_EXPIRY="300", MQTT_CLIENT_ID=f"{unique_id}-app")
    wait_until_sync(lambda: ready(url), f"/ready\n{app.output}", 60)
    assert re.search(r"INFO .*connected to .* \(new session\)", app.output), app.output
    assert LOST not in app.output
    assert sessions_lost(url) == 0

    broker.kill()  # SIGKILL: nothing saved, the session is gone
    broker.start()
    wait_until_sync(lambda: LOST in app.output, "the warning about the lost session")
    line = next(line for line in app.output.splitlines() if LOST in line)
    assert " WARNING " in line and "queued" in line, line
    wait_until_sync(lambda: ready(url), "/ready again")
    wait_until_sync(lambda: sessions_lost(url) == 1, "mqtt_app_mqtt_sessions_lost_total == 1")

    broker.restart()  # clean stop: the session is saved and resumed
    wait_until_sync(lambda: app.output.count("(resumed session)") >= 1, "a resumed session after a clean restart")
    wait_until_sync(lambda: ready(url), "/ready after the clean restart")
    assert app.output.count(LOST) == 1, app.output
    assert sessions_lost(url) == 1
    assert app.stop() == 0


def _worker(url: str) -> dict[str, Any]:
    status, body = http_get(url + "/status.json")
    assert status == 200, body
    return next(p for p in json.loads(body)["processes"] if p["id"] == "w0")


def test_a_stopped_worker_shows_a_late_heartbeat(mosquitto_factory: Callable[..., Any], app_factory: Any) -> None:  # noqa: F811
    broker = mosquitto_factory()
    app, url = app_factory(broker, "--workers", "1", STATS_INTERVAL="0.5", WORKER_HEARTBEAT_TIMEOUT="60")
    wait_until_sync(lambda: ready(url), f"/ready\n{app.output}", 60)
    worker = _worker(url)
    assert worker["state"] == "running" and not worker["heartbeat_late"]
    pid = worker["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        late = wait_until_sync(lambda: _worker(url)["heartbeat_late"] and _worker(url), "a late heartbeat on /status.json")
        assert late["heartbeat_age"] > 3 * 1.0  # WORKER_HEARTBEAT_TIMEOUT=60: a heartbeat every second
        page = http_get(url + "/")[1]
        assert re.search(r'<td class="state bad">running · heartbeat late \(\d+ s\)</td>', page), page
        wait_until_sync(lambda: re.search(r"stats w0 pid=\d+ state=running heartbeat=late\([\d.]+ s\)", app.output),
                        "a stats line with a late heartbeat")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until_sync(lambda: not _worker(url)["heartbeat_late"], "the heartbeat back on time")
    assert _worker(url)["pid"] == pid  # not killed: WORKER_HEARTBEAT_TIMEOUT was not reached
    assert "heartbeat late" not in http_get(url + "/")[1]
    assert app.stop() == 0


def test_a_restarted_worker_that_finds_no_session_warns(mosquitto_factory: Callable[..., Any], app_factory: Any,  # noqa: F811
                                                        unique_id: str) -> None:
    """The worker had a session; while the broker was down it was killed and restarted by the supervisor,
    and the broker came back without the session: the new worker process expected it, so it warns."""
    broker = mosquitto_factory(persistence=True)
    app, url = app_factory(broker, "--workers", "1", MQTT_SESSION_EXPIRY="300", MQTT_CLIENT_ID=f"{unique_id}-app")
    wait_until_sync(lambda: ready(url), f"/ready\n{app.output}", 60)
    assert LOST not in app.output
    pid = _worker(url)["pid"]
    os.kill(pid, signal.SIGKILL)  # replaced with the same client id: its session is found
    wait_until_sync(lambda: _worker(url)["pid"] not in (pid, None) and ready(url), "the replacement worker ready")
    assert LOST not in app.output, app.output

    broker.kill()  # nothing saved
    pid = _worker(url)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until_sync(lambda: _worker(url)["pid"] not in (pid, None), "another replacement started")
    broker.start()
    wait_until_sync(lambda: re.search(r"WARNING +\[w0\] .*" + LOST, app.output), "the new worker's warning")
    wait_until_sync(lambda: metric(scrape(url), "mqtt_app_mqtt_sessions_lost_total", worker="w0") == 1,
                    "mqtt_app_mqtt_sessions_lost_total{worker=w0} == 1")
    assert app.stop() == 0
