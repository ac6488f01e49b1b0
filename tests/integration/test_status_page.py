"""The status page in headless Chromium against `python main.py --workers 2` while messages flow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from typing import Any

import pytest

from tests.support.ops import app_factory, ready  # noqa: F401 - fixture
from tests.support.ops import Publisher, http_get, wait_until_sync

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DATA_ROUTE = "ops/{device_id}/data"


def dump_dom(url: str, budget_ms: int = 3000) -> str:
    """The page's DOM after `budget_ms` of (virtual) time, i.e. after its script refreshed it."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [require_chromium(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def cell(dom: str, row_attr: str, key: str, column: str) -> str:
    row = re.search(rf'<tr {row_attr}="{re.escape(key)}">(.*?)</tr>', dom, re.S)
    assert row, f"no row {row_attr}={key!r} in the page"
    value = re.search(rf'<td class="{column}[^"]*">([^<]*)</td>', row.group(1))
    assert value, f"no {column} in row {key!r}"
    return value.group(1)


def require_chromium(chromium: str | None, env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The Chromium binary; without one the test is skipped locally but fails in CI (CI=true)."""
    if chromium is not None:
        return chromium
    if env.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail("chromium is not installed, but CI must run the status page test "
                    "(.ci/run installs it: apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def test_missing_chromium_fails_in_ci_and_skips_elsewhere() -> None:
    assert require_chromium("/usr/bin/chromium", {"CI": "true"}) == "/usr/bin/chromium"
    with pytest.raises(pytest.fail.Exception, match="CI must run the status page test"):
        require_chromium(None, {"CI": "true"})
    with pytest.raises(pytest.skip.Exception):
        require_chromium(None, {})


def test_status_page_shows_live_numbers_in_chromium(mosquitto_factory: Any, app_factory: Any,  # noqa: F811
                                                    unique_id: str) -> None:
    require_chromium(CHROMIUM)
    broker = mosquitto_factory()
    app, url = app_factory(broker, "--workers", "2")
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}", 60)

    stop = threading.Event()
    sent = [0]

    def flow() -> None:
        pub = Publisher(broker.host, broker.port, f"{unique_id}-flow")
        try:
            while not stop.is_set() and sent[0] < 20_000:
                pub.publish(f"ops/d{sent[0] % 7}/data", {"value": sent[0]})
                sent[0] += 1
                stop.wait(0.005)
        finally:
            pub.close()

    publisher = threading.Thread(target=flow, name="flow", daemon=True)
    publisher.start()
    try:
        def handled_now() -> int:
            routes = json.loads(http_get(url + "/status.json")[1])["routes"]
            return int({r["pattern"]: r for r in routes}[DATA_ROUTE]["handled"])

        wait_until_sync(lambda: handled_now() > 0, "the first messages to be handled")
        first = dump_dom(url + "/?refresh=0.5")
        first_handled = int(cell(first, "data-route", DATA_ROUTE, "handled"))
        wait_until_sync(lambda: handled_now() > first_handled + 50, "more messages to be handled")
        second = dump_dom(url + "/?refresh=0.5")
    finally:
        stop.set()
        publisher.join(30)

    for dom in (first, second):
        updates = re.search(r'<span id="refreshes">(\d+)</span>', dom)
        assert updates and int(updates.group(1)) >= 1, "the page's script did not refresh it"
        assert 'id="ready">ready<' in dom
        for worker in ("w0", "w1"):
            assert cell(dom, "data-process", worker, "state") == "running"
            assert int(cell(dom, "data-process", worker, "pid")) > 0
            assert float(cell(dom, "data-process", worker, "rss")) > 5
            assert cell(dom, "data-process", worker, "restarts") == "0"
        assert re.search(r"<b>3 of 3</b> connection\(s\) up", dom)  # supervisor (plain routes) + 2 workers
    second_handled = int(cell(second, "data-route", DATA_ROUTE, "handled"))
    assert second_handled > first_handled
    assert float(cell(second, "data-route", DATA_ROUTE, "rate")) > 0  # messages/s while they flow
    worker_rates = [float(cell(second, "data-process", w, "rate")) for w in ("w0", "w1")]
    assert sum(worker_rates) > 0
    worker_handled = [int(cell(second, "data-process", w, "handled")) for w in ("w0", "w1")]
    assert sum(worker_handled) == second_handled  # only this route ran in the workers: the numbers add up
    assert app.stop() == 0


def test_worker_dead_letters_and_restarts_reach_the_supervisors_page(mosquitto_factory: Any,  # noqa: F811
                                                                      app_factory: Any, unique_id: str) -> None:
    """Dead letters of a worker travel with its heartbeat; a restart is an event on the page."""
    broker = mosquitto_factory()
    app, url = app_factory(broker, "--workers", "2")
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}", 60)

    def status() -> dict[str, Any]:
        return json.loads(http_get(url + "/status.json")[1])

    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        pub.publish("ops/bad7/data", {"value": "not a number"})  # a shared route: a worker dead-letters it
    finally:
        pub.close()
    dead = wait_until_sync(lambda: [d for d in status()["dead_letters"] if d["topic"] == "ops/bad7/data"],
                           "the worker's dead letter on the supervisor's page")
    assert dead[0]["route"] == DATA_ROUTE and dead[0]["source"] in ("w0", "w1")
    assert dead[0]["error"].startswith("PayloadValidationError: payload is not a valid Reading")

    victim = {p["id"]: p for p in status()["processes"]}["w1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    restarts = wait_until_sync(lambda: [e for e in status()["events"] if e["kind"] == "restart"],
                               "a restart event")
    assert f"worker w1 (pid {victim}) died: killed by SIGKILL" in restarts[0]["text"]
    wait_until_sync(lambda: ready(url), "the restarted worker", 60)
    page = http_get(url + "/")[1]
    assert 'data-kind="restart"' in page and "ops/bad7/data" in page
    assert app.stop() == 0
