"""`python main.py` as a user runs it: routes table, help, configuration errors, embedded broker."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import BrokerTarget, ProbeFn
from tests.support.rt_app import AppProcess, base_env, run_main
from tests.support.servers import free_port

pytestmark = pytest.mark.timeout(90)


def test_routes_prints_the_table_of_the_example_app() -> None:
    result = run_main("routes", env=base_env())
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert lines.pop()[:3] == ["profile:", "none", "(PROFILE"]
    assert lines[0] == ["PATTERN", "SUBSCRIBES", "TO", "QOS", "SHARED", "WORKERS", "MIDDLEWARE", "HANDLER"]
    rows = {cells[0]: cells for cells in lines[1:-1]}
    assert rows["devices/{device_id}/status"][1:6] == ["devices/+/status", "1", "no", "-", "-"]
    assert rows["devices/{device_id}/status"][6] == "app.controllers.device_controller.DeviceController.status"
    assert rows["devices/{device_id}/command"][6:] == ["app.controllers.device_controller.DeviceController.command",
                                                      "(sync)"]
    assert rows["sensors/{sensor_id}/data"][1:6] == ["$share/workers/sensors/+/data", "1", "yes", "2",
                                                     "TimingMiddleware"]
    assert rows["logs/{path:#}"][1:3] == ["logs/#", "0"]
    assert lines[-1] == ["4", "route(s)"]


def test_routes_shows_the_active_profile_and_its_values() -> None:
    result = run_main("routes", env=base_env(PROFILE="batch", MAX_INFLIGHT="64"))
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("profile: batch")
    assert "MAX_INFLIGHT=64 (explicit)" in last and "OUTBOX_BATCH_SIZE=500" in last
    result = run_main("routes", env=base_env(PROFILE="nope"))
    assert result.returncode == 2 and "PROFILE='nope'" in result.stderr


def test_routes_uses_the_group_name_and_routers_package() -> None:
    result = run_main("routes", env=base_env(MQTT_GROUP_NAME="blue"))
    assert "$share/blue/sensors/+/data" in result.stdout
    result = run_main("routes", env=base_env(ROUTERS_PACKAGE="tests.apps.core_app", CORE_APP_PREFIX="pfx"))
    assert result.returncode == 0
    assert "pfx/work/{n}" in result.stdout and "pfx/work/+" in result.stdout
    assert result.stdout.strip().splitlines()[-2] == "3 route(s)"


def test_routes_lists_stream_routes_without_redis_enabled() -> None:
    """Listing is not serving: stream routes are shown (with their stream) even with ENABLE_REDIS=false."""
    result = run_main("routes", env=base_env(
        ROUTERS_PACKAGE="tests.apps.streams_app.routers", STREAMS_APP_STREAM="orders", STREAMS_APP_TOPIC="orders",
        STREAMS_APP_EXTERNAL="ext", ENABLE_REDIS="false"))
    assert result.returncode == 0, result.stderr
    assert "STREAM" in result.stdout.splitlines()[0]
    assert "orders" in result.stdout and "ext" in result.stdout
    assert "$share/workers/$stream" not in result.stdout  # a stream consumer subscribes to nothing


def test_route_error_exits_2_naming_route_and_module() -> None:
    result = run_main("routes", env=base_env(ROUTERS_PACKAGE="tests.apps.core_bad_app"))
    assert result.returncode == 2
    assert "'bad/{other_id}/status'" in result.stderr
    assert "tests.apps.core_bad_app.dup" in result.stderr
    assert "registered twice" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_main("routes", env=base_env(ROUTERS_PACKAGE="tests.apps.no_such_package"))
    assert result.returncode == 2
    assert "ROUTERS_PACKAGE" in result.stderr and "Traceback" not in result.stderr


def test_router_imported_by_a_second_module_is_merged_once() -> None:
    result = run_main("routes", env=base_env(ROUTERS_PACKAGE="tests.apps.core_reexport_app"))
    assert result.returncode == 0, result.stderr
    assert "reexport/+/status" in result.stdout and "reexport/+/command" in result.stdout
    assert result.stdout.strip().splitlines()[-2] == "2 route(s)"


@pytest.mark.parametrize(("name", "value"), [("MAX_INFLIGHT", "lots"), ("MQTT_PORT", "99999"),
                                             ("MQTT_PROTOCOL", "6"), ("LOG_LEVEL", "loud")])
def test_bad_setting_exits_2_naming_the_variable(name: str, value: str) -> None:
    result = run_main(env=base_env(**{name: value}), timeout=20)
    assert result.returncode == 2
    assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_documents_commands_and_options() -> None:
    result = run_main("--help", env=base_env())
    assert result.returncode == 0
    for text in ("routes", "publish", "--workers", "--debug", "--test-mode", "--env-file", ".env.example"):
        assert text in result.stdout


def test_help_says_how_workers_without_a_number_are_counted() -> None:
    """As plan_workers does it: the largest worker_count first, one per CPU core only as the fallback."""
    result = run_main("--help", env=base_env(COLUMNS="100"))
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "No N: the largest worker_count of the shared routes" in text
    assert "one per CPU core if no shared route sets worker_count above 1" in text
    assert "no N: one per CPU core" not in text


@pytest.fixture
def app_processes() -> Iterator[list[AppProcess]]:
    apps: list[AppProcess] = []
    try:
        yield apps
    finally:
        for app in apps:
            app.cleanup()


async def test_without_mqtt_broker_the_embedded_broker_serves_the_example_app(
        probe_factory: ProbeFn, app_processes: list[AppProcess]) -> None:
    port = free_port()
    app = AppProcess(base_env(EMBEDDED_BROKER_PORT=str(port), MQTT_SESSION_EXPIRY="0", APP_NAME="cli-embedded"))
    app_processes.append(app.start())
    await app.wait_ready()
    assert f"embedded broker listening on 127.0.0.1:{port}" in app.output()

    target = BrokerTarget("embedded", "127.0.0.1", port, v5=False)
    probe = await probe_factory(target)
    await probe.subscribe("dead-letter/#")
    await probe.publish("devices/42/status", {"state": "on"})
    await app.wait_output("device 42 reported its status")
    # The shared route works on the embedded broker too; a bad reading goes to the dead letter topic.
    await probe.publish("sensors/s1/data", {"value": "not a number"})
    (letter,) = await probe.wait_count("dead-letter/", 1)
    assert letter.topic == "dead-letter/sensors/s1/data"
    assert letter.json()["error_type"] == "DeadLetter"
    assert letter.json()["route"] == "sensors/{sensor_id}/data"

    app.signal(signal.SIGTERM)
    assert await app.wait_exit() == 0
    assert "Traceback" not in app.output()


async def test_readme_run_command_falls_back_to_11883_when_1883_is_taken(app_processes: list[AppProcess]) -> None:
    """The README's `python main.py` with nothing configured, where a broker (say Mosquitto) holds 1883."""
    from bootstrap.app import EMBEDDED_FALLBACK_PORT

    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 1883))  # free here: take it, as a Mosquitto would
            holder.listen()
        except OSError:
            pass  # already taken (this machine's Mosquitto): just what the test needs
        with socket.socket() as check:
            check.bind(("127.0.0.1", EMBEDDED_FALLBACK_PORT))  # the fallback itself must be free
        app = AppProcess(base_env(MQTT_SESSION_EXPIRY="0", APP_NAME="cli-fallback"))
        app_processes.append(app.start())
        await app.wait_ready()
        assert f"embedded broker listening on 127.0.0.1:{EMBEDDED_FALLBACK_PORT}" in app.output()
        # `publish` with nothing configured finds the app's broker on the fallback port too.
        result = await asyncio.to_thread(
            run_main, "publish", "devices/42/status", '{"state": "on"}', "--qos", "1", env=base_env())
        assert result.returncode == 0, result.stdout + result.stderr
        await app.wait_output("device 42 reported its status")
        app.signal(signal.SIGTERM)
        assert await app.wait_exit() == 0
        assert "Traceback" not in app.output()
    finally:
        holder.close()


async def test_embedded_broker_port_taken_prints_one_line_hint(mosquitto: Any) -> None:
    result = run_main(env=base_env(EMBEDDED_BROKER_PORT=str(mosquitto.port)), timeout=30)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    line = error_lines[0]
    assert str(mosquitto.port) in line and "already in use" in line
    assert "MQTT_BROKER=127.0.0.1" in line and "EMBEDDED_BROKER_PORT=" in line


def test_port_hint_names_a_free_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main(env=base_env(EMBEDDED_BROKER_PORT=str(port)), timeout=30)
    assert result.returncode == 2
    suggested = int(result.stderr.rsplit("EMBEDDED_BROKER_PORT=", 1)[1].split(")")[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", suggested))  # the suggested port is really free


async def test_publish_command_sends_one_message(mosquitto: Any, probe_factory: ProbeFn, unique_id: str) -> None:
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    probe = await probe_factory(target)
    await probe.subscribe(f"{unique_id}/cli/#", qos=1)
    env = base_env(MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=f"{unique_id}-cli")
    result = await asyncio.to_thread(run_main, "publish", f"{unique_id}/cli/x", '{"a": 1}', "--qos", "1", env=env)
    assert result.returncode == 0, result.stderr
    (message,) = await probe.wait_count(f"{unique_id}/cli/", 1)
    assert message.json() == {"a": 1} and message.qos == 1


async def test_test_mode_exits_0_when_idle(mosquitto: Any, unique_id: str) -> None:
    env = base_env(MQTT_BROKER=mosquitto.host, MQTT_PORT=str(mosquitto.port), MQTT_CLIENT_ID=f"{unique_id}-idle",
                   MQTT_SESSION_EXPIRY="0", TEST_MODE_IDLE="0.5", ROUTERS_PACKAGE="tests.apps.core_app",
                   CORE_APP_PREFIX=unique_id)
    result = await asyncio.to_thread(run_main, "--test-mode", "--debug", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "test mode: no message" in result.stderr
    assert "DEBUG" in result.stderr  # --debug overrides LOG_LEVEL


async def test_embedded_broker_start_and_bare_connections_log_at_debug(app_processes: list[AppProcess]) -> None:
    """Former-worker-session probes at each start, and connections that close before sending a packet (the
    `publish` command's port check, a TCP health check), are not worth an INFO line, let alone an ERROR."""
    port = free_port()
    app = AppProcess(base_env(EMBEDDED_BROKER_PORT=str(port), MQTT_SESSION_EXPIRY="0", APP_NAME="cli-quiet"), "--debug")
    app_processes.append(app.start())
    await app.wait_ready()
    await app.wait_output("-w2-end]: disconnected")  # the last probe of a former worker session
    with socket.create_connection(("127.0.0.1", port)):
        pass  # connect and close without a byte, as a port check does
    await app.wait_output("No data to decode MQTT packet fixed header")
    app.signal(signal.SIGTERM)
    assert await app.wait_exit() == 0
    noted = [line for line in app.output().splitlines()
             if "-end]" in line or "No data" in line or "Failed to initialize client session" in line]
    assert noted
    assert [line for line in noted if line.split()[2] != "DEBUG"] == []
