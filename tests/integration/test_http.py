"""The operations HTTP server: endpoints, settings, and `python main.py` (single process and --workers)
against private Mosquitto brokers: metrics match the messages sent, /ready follows the broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from typing import Any

import pytest

from core.foundation.config import ConfigError, load_settings
from core.operations.http import HttpServer, OpsServer, OpsServerError, ReadinessCheck, Request, Response
from core.operations.metrics import ProcessInfo, SystemSample
from tests.support.ops import (  # noqa: F401 - app_factory is a fixture
    Publisher, app_factory, http_get, metric, metric_sum, ready, scrape, wait_until_sync,
)

pytestmark = pytest.mark.timeout(120)

DATA = "ops/{device_id}/data"
PLAIN = "ops/{device_id}/plain"
FAIL = "ops/{device_id}/fail"


# -- settings and the server itself ---------------------------------------------------------------


def test_http_settings_defaults_and_errors() -> None:
    settings = load_settings({})
    assert settings.http_port is None and settings.http_host == "127.0.0.1" and settings.http_check_timeout == 2.0
    assert load_settings({"HTTP_PORT": "8080", "HTTP_HOST": "0.0.0.0"}).http_port == 8080
    for env, name in (({"HTTP_PORT": "http"}, "HTTP_PORT"), ({"HTTP_PORT": "70000"}, "HTTP_PORT"),
                      ({"HTTP_CHECK_TIMEOUT": "0"}, "HTTP_CHECK_TIMEOUT")):
        with pytest.raises(ConfigError, match=name):
            load_settings(env)


async def _raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return body


async def test_http_server_methods_paths_and_malformed_requests() -> None:
    async def hello(request: Request) -> Response:
        return Response(200, f"hi {request.query.get('name', '')}".encode())

    server = HttpServer("127.0.0.1", 0, {"/hello": hello})
    await server.start()
    try:
        ok = await _raw_request(server.port, b"GET /hello?name=x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nhi x")
        assert b"Content-Length: 4\r\n" in ok and b"Connection: close\r\n" in ok
        head = await _raw_request(server.port, b"HEAD /hello HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert (await _raw_request(server.port, b"POST /hello HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _raw_request(server.port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _raw_request(server.port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        huge = b"GET /hello HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await _raw_request(server.port, huge)).startswith(b"HTTP/1.1 400")
    finally:
        await server.stop()


class FixedSource:
    def __init__(self) -> None:
        self.sample_value = SystemSample("single", os.getpid(), 1.0, False, None, [
            ProcessInfo("main", "main", os.getpid(), "running", True, True, stats={"received": 3, "routes": {}}),
        ])

    def sample(self) -> SystemSample:
        return self.sample_value


class FailingCheck(ReadinessCheck):
    name = "thing"

    def __init__(self) -> None:
        self.fail = True

    async def __call__(self) -> None:
        if self.fail:
            raise ConnectionError("refused")


async def test_ready_and_health_follow_the_source_and_checks() -> None:
    source = FixedSource()
    check = FailingCheck()
    ops = OpsServer(load_settings({"HTTP_PORT": "0"}), source, checks=[check])
    ops.CHECK_CACHE = 0
    await ops.start()
    try:
        url = f"http://127.0.0.1:{ops.port}"
        status, body = await asyncio.to_thread(http_get, url + "/ready")
        assert status == 503 and json.loads(body)["reasons"] == ["thing: ConnectionError: refused"]
        check.fail = False
        status, body = await asyncio.to_thread(http_get, url + "/ready")
        assert (status, json.loads(body)["checks"]) == (200, {"thing": "ok"})
        source.sample_value.processes[0].ready = False
        source.sample_value.processes[0].connected = False
        status, body = await asyncio.to_thread(http_get, url + "/ready")
        assert status == 503 and json.loads(body)["reasons"] == ["main: not connected to the broker"]
        assert (await asyncio.to_thread(http_get, url + "/health"))[0] == 200
        source.sample_value.fatal = "worker w0 crashed 6 time(s)"
        status, body = await asyncio.to_thread(http_get, url + "/health")
        assert status == 503 and json.loads(body)["reason"] == "worker w0 crashed 6 time(s)"
    finally:
        await ops.stop()


async def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ops = OpsServer(load_settings({"HTTP_PORT": str(port)}), FixedSource())
        with pytest.raises(OpsServerError, match=f"HTTP_HOST=127.0.0.1 HTTP_PORT={port}"):
            await ops.start()


# -- python main.py against a private broker ------------------------------------------------------


def test_single_process_metrics_match_the_messages_sent(mosquitto_factory: Any, app_factory: Any,
                                                        unique_id: str) -> None:
    broker = mosquitto_factory()
    secret = f"pw-{unique_id}"
    marker = f"payload-{unique_id}"
    app, url = app_factory(broker, LOG_FORMAT="json", MQTT_USERNAME="ops", MQTT_PASSWORD=secret)
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}")
    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        for i in range(30):
            pub.publish(f"ops/d{i % 3}/plain", {"marker": marker})
        for i in range(20):
            pub.publish(f"ops/d{i % 4}/data", {"value": i, "marker": marker})
        for i in range(5):
            pub.publish(f"ops/d{i}/data", {"value": marker})  # fails validation
        for i in range(3):
            pub.publish(f"ops/d{i}/fail", {"marker": marker})
        pub.publish("ops/unrouted-but-matching/nothing", "x")  # matches no subscription: never delivered
    finally:
        pub.close()

    def settled() -> Any:
        m = scrape(url)
        # Counters move when a handler finishes; a dead-lettered message stays in flight until the
        # broker acknowledged its dead letter, so wait for that too.
        return m if metric(m, "mqtt_app_messages_received_total", worker="main") >= 58 and \
            metric_sum(m, "mqtt_app_route_messages_received_total") >= 58 and \
            metric(m, "mqtt_app_inflight", worker="main") == 0 else None

    m = wait_until_sync(settled, "the metrics to count every message")
    assert metric(m, "mqtt_app_messages_received_total", worker="main") == 58
    assert metric(m, "mqtt_app_route_messages_handled_total", route=PLAIN) == 30
    assert metric(m, "mqtt_app_route_messages_handled_total", route=DATA) == 20
    assert metric(m, "mqtt_app_route_messages_failed_total", route=DATA) == 5
    assert metric(m, "mqtt_app_route_messages_dead_lettered_total", route=DATA) == 5
    assert metric(m, "mqtt_app_route_messages_received_total", route=DATA) == 25
    assert metric(m, "mqtt_app_route_messages_failed_total", route=FAIL) == 3
    assert metric(m, "mqtt_app_route_messages_dead_lettered_total", route=FAIL) == 3
    assert metric(m, "mqtt_app_route_messages_handled_total", route=FAIL) == 0
    assert metric(m, "mqtt_app_handler_duration_seconds_count", route=DATA) == 25
    assert metric(m, "mqtt_app_handler_duration_seconds_count", route=PLAIN) == 30
    assert metric(m, "mqtt_app_handler_duration_seconds_bucket", route=PLAIN, le="+Inf") == 30
    assert 0 < metric(m, "mqtt_app_handler_duration_seconds_sum", route=PLAIN) < 30
    assert metric(m, "mqtt_app_inflight", worker="main") == 0
    assert metric(m, "mqtt_app_mqtt_connected", worker="main") == 1
    assert metric(m, "mqtt_app_process_resident_memory_bytes", worker="main", pid=str(app.proc.pid)) > 10 * 2**20

    status = json.loads(http_get(url + "/status.json")[1])
    routes = {r["pattern"]: r for r in status["routes"]}
    assert (routes[DATA]["handled"], routes[DATA]["dead_lettered"]) == (20, 5)
    assert status["totals"]["received"] == 58 and status["broker"]["connected"] == 1

    assert app.stop() == 0
    lines = [line for line in app.output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(r["worker"] == "main" for r in records)
    assert any("failing on purpose" in r.get("message", "") for r in records)  # errors are logged...
    assert marker not in app.output  # ...but no payload contents
    assert secret not in app.output


def test_ready_turns_503_while_the_broker_is_down(mosquitto_factory: Any, app_factory: Any, unique_id: str) -> None:
    broker = mosquitto_factory()
    app, url = app_factory(broker)
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}")
    assert metric(scrape(url), "mqtt_app_mqtt_reconnects_total", worker="main") == 0

    broker.stop()
    status, body = wait_until_sync(lambda: (lambda r: r if r[0] == 503 else None)(http_get(url + "/ready")),
                                   "/ready to answer 503 with the broker down")
    assert "main: not connected to the broker" in json.loads(body)["reasons"]
    assert http_get(url + "/health")[0] == 200  # alive all the same
    assert metric(scrape(url), "mqtt_app_mqtt_connected", worker="main") == 0

    broker.start()  # same port
    wait_until_sync(lambda: ready(url), "/ready to answer 200 after the broker returned")
    assert metric(scrape(url), "mqtt_app_mqtt_reconnects_total", worker="main") >= 1
    assert app.stop() == 0


def test_workers_metrics_add_up_across_processes_and_restarts(mosquitto_factory: Any, app_factory: Any,
                                                              unique_id: str) -> None:
    broker = mosquitto_factory()
    app, url = app_factory(broker, "--workers", "2", WORKER_HEARTBEAT_TIMEOUT="5")
    wait_until_sync(lambda: ready(url), f"/ready to answer 200 with both workers subscribed\n{app.output}", 60)
    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        for i in range(40):
            pub.publish(f"ops/d{i}/data", {"value": i})
        for i in range(4):
            pub.publish(f"ops/d{i}/plain", "x")

        def count(expected: int) -> Any:
            m = scrape(url)
            return m if metric(m, "mqtt_app_route_messages_handled_total", route=DATA) >= expected else None

        m = wait_until_sync(lambda: count(40), "40 handled over the workers")
        assert metric(m, "mqtt_app_route_messages_handled_total", route=DATA) == 40
        assert metric(m, "mqtt_app_route_messages_handled_total", route=PLAIN) == 4  # in the supervisor
        per_worker = {w: metric(m, "mqtt_app_messages_received_total", worker=w) for w in ("w0", "w1")}
        assert sum(per_worker.values()) == 40 and all(per_worker.values()), per_worker
        assert metric(m, "mqtt_app_messages_received_total", worker="main") == 4
        assert metric(m, "mqtt_app_handler_duration_seconds_count", route=DATA) == 40
        status = json.loads(http_get(url + "/status.json")[1])
        workers = {p["id"]: p for p in status["processes"]}
        assert set(workers) == {"main", "w0", "w1"}
        assert all(workers[w]["rss_bytes"] > 10 * 2**20 and workers[w]["pid"] for w in ("w0", "w1"))
        old_pid = workers["w0"]["pid"]

        os.kill(old_pid, signal.SIGKILL)  # the supervisor restarts it with the same client id

        def restarted() -> Any:
            s = json.loads(http_get(url + "/status.json")[1])
            w0 = {p["id"]: p for p in s["processes"]}["w0"]
            return s if w0["pid"] not in (None, old_pid) and w0["restarts"] == 1 and s["ready"] else None

        wait_until_sync(restarted, "w0 to be restarted and subscribed again", 60)
        m = scrape(url)
        assert metric(m, "mqtt_app_worker_restarts_total", worker="w0") == 1
        assert metric(m, "mqtt_app_route_messages_handled_total", route=DATA) == 40  # kept across the restart
        assert metric_sum(m, "mqtt_app_messages_received_total", worker="w0") == per_worker["w0"]

        for i in range(20):
            pub.publish(f"ops/e{i}/data", {"value": i})
        m = wait_until_sync(lambda: count(60), "60 handled after the restart")
        assert metric(m, "mqtt_app_route_messages_handled_total", route=DATA) == 60
        assert metric(m, "mqtt_app_handler_duration_seconds_count", route=DATA) == 60
    finally:
        pub.close()
    assert app.stop() == 0


async def test_ready_checks_redis_and_the_database_when_enabled(redis_factory: Any, tmp_path: Any) -> None:
    from types import SimpleNamespace

    from core.operations.http import DatabaseCheck, RedisCheck, default_checks

    redis = redis_factory()
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ready.db'}"
    off = SimpleNamespace(enable_redis=False, redis_url=redis.url, enable_database=False, database_url=database_url)
    on = SimpleNamespace(enable_redis=True, redis_url=redis.url, enable_database=True, database_url=database_url)
    assert default_checks(off) == []  # type: ignore[arg-type]
    assert [type(c) for c in default_checks(on)] == [RedisCheck, DatabaseCheck]  # type: ignore[arg-type]

    ops = OpsServer(load_settings({"HTTP_PORT": "0", "HTTP_CHECK_TIMEOUT": "1"}), FixedSource(),
                    checks=default_checks(on))  # type: ignore[arg-type]
    ops.CHECK_CACHE = 0
    await ops.start()
    try:
        url = f"http://127.0.0.1:{ops.port}/ready"
        status, body = await asyncio.to_thread(http_get, url)
        assert (status, json.loads(body)["checks"]) == (200, {"redis": "ok", "database": "ok"})
        redis.stop()
        status, body = await asyncio.to_thread(http_get, url)
        reasons = json.loads(body)["reasons"]
        assert status == 503 and len(reasons) == 1 and reasons[0].startswith("redis: ")
        redis.start()
        status, _ = await asyncio.to_thread(http_get, url)
        assert status == 200
    finally:
        await ops.stop()


async def test_ready_names_the_database_while_it_is_unreachable_and_recovers() -> None:
    """A TCP proxy in front of the machine's PostgreSQL is taken away and brought back on the same port:
    /ready turns 503 naming the database, then 200 again through the check's (pooled) engine."""
    from core.operations.http import default_checks
    from tests.support.ops import TcpProxy

    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    settings = load_settings({"HTTP_PORT": "0", "HTTP_CHECK_TIMEOUT": "2", "ENABLE_DATABASE": "true",
                              "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/test"})
    ops = OpsServer(settings, FixedSource(), checks=default_checks(settings))
    ops.CHECK_CACHE = 0
    await ops.start()
    try:
        url = f"http://127.0.0.1:{ops.port}/ready"
        status, body = await asyncio.to_thread(http_get, url)
        if status != 200 and "database" in body:
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (trust, database `test`) is needed: {body}")
        assert (status, json.loads(body)["checks"]) == (200, {"database": "ok"})

        await proxy.stop()
        status, body = await asyncio.to_thread(http_get, url)
        result = json.loads(body)
        assert status == 503 and result["ready"] is False
        assert len(result["reasons"]) == 1 and result["reasons"][0].startswith("database: ")
        assert result["checks"]["database"] != "ok"

        await proxy.start()  # same port
        status, body = await asyncio.to_thread(http_get, url)
        assert (status, json.loads(body)["checks"]) == (200, {"database": "ok"})
    finally:
        await ops.stop()
        await proxy.stop()
