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


class PrefixProxy:
    """An HTTP proxy serving the app under /pods/app:8080/proxy/, as `kubectl proxy` or an ingress would."""

    PREFIX = "/pods/app:8080/proxy"

    def __init__(self, target: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        prefix = self.PREFIX

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not self.path.startswith(prefix + "/"):
                    status, body = 404, f"outside {prefix}/".encode()
                else:
                    status, text = http_get(target + self.path[len(prefix):])
                    body = text.encode()
                self.send_response(status or 502)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="prefix-proxy", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chart_lines(dom: str, chart_id: str) -> dict[str, tuple[int, str]]:
    """{series: (points drawn, path data)} of one chart in the page."""
    figure = re.search(rf'<figure class="chart" id="{chart_id}">(.*?)</figure>', dom, re.S)
    assert figure, f"no chart {chart_id} in the page"
    return {m.group(1): (int(m.group(2)), m.group(3)) for m in
            re.finditer(r'<path class="line" data-series="([^"]*)" data-points="(\d+)" d="([^"]*)"', figure.group(1))}


def test_charts_draw_after_traffic_and_dead_letters_show_behind_a_path_prefix(
        mosquitto_factory: Any, app_factory: Any, unique_id: str) -> None:  # noqa: F811
    require_chromium(CHROMIUM)
    broker = mosquitto_factory()
    app, url = app_factory(broker, "--workers", "2", STATUS_HISTORY_INTERVAL="1", STATUS_HISTORY_WINDOW="60")
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}", 60)

    def status() -> dict[str, Any]:
        return json.loads(http_get(url + "/status.json")[1])

    empty = status()["history"]
    assert all(points == 0 for points in _points(empty, "routes", DATA_ROUTE, "rate"))  # nothing handled yet

    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        for i in range(60):
            pub.publish(f"ops/d{i % 3}/data", {"value": i})
        pub.publish("ops/poison/data", {"value": "NaN please"})
    finally:
        pub.close()
    # Gate on the data, not on time: a point whose interval saw the messages.
    wait_until_sync(lambda: sum(_points(status()["history"], "routes", DATA_ROUTE, "rate")) > 0,
                    "a chart point with messages/s > 0")
    wait_until_sync(lambda: any(d["topic"] == "ops/poison/data" for d in status()["dead_letters"]),
                    "the worker's dead letter")

    proxy = PrefixProxy(url)
    try:
        dom = dump_dom(proxy.url + "?refresh=0.5")
    finally:
        proxy.close()
    updates = re.search(r'<span id="refreshes">(\d+)</span>', dom)
    assert updates and int(updates.group(1)) >= 1, "the page's script did not refresh it behind the path prefix"
    chart_updates = re.search(r'<span id="chart-refreshes">(\d+)</span>', dom)
    assert chart_updates and int(chart_updates.group(1)) >= 1, "the script did not refresh the charts"
    # The tables' refresh carries no chart data: the script keeps the charts it has.
    assert http_get(url + "/?fragment=1")[1].count('<div id="charts"></div>') == 1
    assert dom.count('<div id="charts">') == 1

    drawn, path = chart_lines(dom, "chart-route-rate")[DATA_ROUTE]
    assert drawn >= 1 and path.startswith("M")
    y_values = [float(y) for y in re.findall(r"[ML][\d.]+ ([\d.]+)", path)]
    baseline = max(y_values)
    assert min(y_values) < baseline, "every point of the messages/s line sits at 0"
    workers = chart_lines(dom, "chart-process-rate")
    assert {"w0", "w1"} <= set(workers) and sum(workers[w][0] for w in ("w0", "w1")) >= 2
    assert set(chart_lines(dom, "chart-process-latency")) >= {"w0 p99", "w0 p50", "w1 p99", "w1 p50"}
    assert 'class="limit"' in dom and "MAX_INFLIGHT" in dom  # in flight against the limit

    row = re.search(r'<tr class="dead-letter">((?:(?!</tr>).)*ops/poison/data.*?)</tr>', dom, re.S)
    assert row, "the dead letter is not listed"
    assert f"<code>{DATA_ROUTE}</code>" in row.group(1) and "PayloadValidationError" in row.group(1)
    assert re.search(r'<td class="source">w[01]</td>', row.group(1))
    assert app.stop() == 0


def _points(history: dict[str, Any], group: str, name: str, metric: str) -> list[float]:
    return [v for v in history[group].get(name, {}).get(metric, []) if v is not None]


def test_single_process_history_has_the_route_and_the_process(mosquitto_factory: Any, app_factory: Any,  # noqa: F811
                                                               unique_id: str) -> None:
    """`python main.py` (no workers): the charts' data covers its routes and its one process, `main`."""
    broker = mosquitto_factory()
    app, url = app_factory(broker, STATUS_HISTORY_INTERVAL="0.5", STATUS_HISTORY_WINDOW="60", MAX_INFLIGHT="7")
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}", 60)
    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        for i in range(30):
            pub.publish(f"ops/d{i % 3}/data", {"value": i})
        pub.publish("ops/d1/fail", {})
    finally:
        pub.close()

    def history() -> dict[str, Any]:
        return json.loads(http_get(url + "/status.json")[1])["history"]

    def handled_and_failed() -> bool:
        h = history()
        return (sum(_points(h, "routes", DATA_ROUTE, "rate")) > 0 and sum(_points(h, "processes", "main", "errors")) > 0
                and bool(_points(h, "processes", "main", "p99")))

    wait_until_sync(handled_and_failed, "points with the messages and the dead letter")
    h = history()
    assert set(h["processes"]) == {"main"} and "ops/{device_id}/fail" in h["routes"]
    assert len(h["times"]) == len(h["processes"]["main"]["rate"])  # every line is aligned with the times
    page = http_get(url + "/?fragment=charts")[1]
    assert 'MAX_INFLIGHT <b>7</b>' in page and 'data-series="main"' in page
    assert app.stop() == 0
