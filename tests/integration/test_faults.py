"""Failures: the app killed mid-handler, graceful stop, the broker restarted under the runtime.

The process tests run `python main.py` with the test app `tests/apps/core_app` against a private
Mosquitto; the app writes one JSON line per handler start/finish to a log file the test reads.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.foundation.config import load_settings
from core.router import Router
from core.runtime.runtime import Runtime
from tests.integration.conftest import BrokerTarget, ProbeFn, ServeFn
from tests.support.rt_app import AppProcess, base_env, read_events
from tests.support.rt_proxy import MqttProxy
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(120)

AppFactory = Callable[..., AppProcess]


@pytest.fixture
def core_app(unique_id: str, tmp_path: Path) -> Iterator[AppFactory]:
    """`core_app(port, **env)`: start tests/apps/core_app as `python main.py` (client id fixed per test)."""
    apps: list[AppProcess] = []

    def start(port: int, **env: str) -> AppProcess:
        app = AppProcess(base_env(
            MQTT_BROKER="127.0.0.1", MQTT_PORT=str(port), MQTT_CLIENT_ID=f"{unique_id}-app",
            MQTT_SESSION_EXPIRY="60", MQTT_RECONNECT_MIN="0.1", MQTT_RECONNECT_MAX="1",
            ROUTERS_PACKAGE="tests.apps.core_app", CORE_APP_PREFIX=unique_id,
            CORE_APP_LOG=str(tmp_path / "events.log"), **env,
        ), name=unique_id)
        apps.append(app)
        return app.start()

    try:
        yield start
    finally:
        for app in apps:
            app.cleanup()


def events(tmp_path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp_path / "events.log") if kind is None or e["event"] == kind]


def has(tmp_path: Path, kind: str, n: str, times: int = 1) -> Callable[[], bool]:
    return lambda: sum(1 for e in events(tmp_path, kind) if e["n"] == n) >= times


def release_blocked(tmp_path: Path) -> None:
    (tmp_path / "events.log.release").touch()


async def test_sigkill_mid_handler_redelivers_unacknowledged_messages(
        mosquitto: Any, core_app: AppFactory, probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    """Messages 1 and 2 finish and are acked; 3 blocks; 4 finishes but its PUBACK must wait for 3
    (arrival order). After SIGKILL and a restart with the same client id, exactly 3 and 4 come back."""
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    proxy = await MqttProxy(mosquitto.host, mosquitto.port).start()
    try:
        first = core_app(proxy.port)
        await first.wait_ready()
        probe = await probe_factory(target)
        await probe.subscribe(f"{u}/pong")
        for n, payload in (("1", {}), ("2", {}), ("3", {"block": True}), ("4", {})):
            await probe.publish(f"{u}/work/{n}", payload)
        for n in "124":
            await wait_until(has(tmp_path, "done", n), f"handler {n} to finish")
        await wait_until(has(tmp_path, "start", "3"), "handler 3 to start")
        # Wire barrier: the app's QoS 1 publish of the pong leaves after any PUBACK it queued before.
        await probe.publish(f"{u}/ping", "p", qos=0)
        await probe.wait_count(f"{u}/pong", 1)
        packet_id = {p.topic.rsplit("/", 1)[1]: p.packet_id for p in proxy.publishes_in(f"{u}/work/")}  # type: ignore[union-attr]
        assert [a.packet_id for a in proxy.pubacks_out()] == [packet_id["1"], packet_id["2"]]

        first.signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
    finally:
        await proxy.stop()

    release_blocked(tmp_path)
    second = core_app(mosquitto.port)
    for n in "34":
        await wait_until(has(tmp_path, "done", n, times=2 if n == "4" else 1), f"redelivered message {n} handled")
    await probe.publish(f"{u}/work/5", {})
    await wait_until(has(tmp_path, "done", "5"), "a new message after the restart")

    starts = events(tmp_path, "start")
    assert Counter(e["n"] for e in starts) == {"1": 1, "2": 1, "3": 2, "4": 2, "5": 1}
    first_pid = starts[0]["pid"]
    redelivered = [e for e in starts if e["pid"] != first_pid]
    assert sorted(e["n"] for e in redelivered) == ["3", "4", "5"]
    assert all(e["dup"] for e in redelivered if e["n"] in "34")  # the broker marks redeliveries DUP
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0


async def test_sigterm_finishes_in_flight_handlers_acks_them_and_exits_0(
        mosquitto: Any, core_app: AppFactory, probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    first = core_app(mosquitto.port, SHUTDOWN_TIMEOUT="20")
    await first.wait_ready()
    probe = await probe_factory(target)
    await probe.publish(f"{u}/work/1", {"sleep": 1.0})
    await probe.publish(f"{u}/work/2", {"block": True})
    await wait_until(lambda: has(tmp_path, "start", "1")() and has(tmp_path, "start", "2")(), "both handlers to start")

    first.signal(signal.SIGTERM)
    await first.wait_output("stopping gracefully")
    # Published during the drain: not taken on by the stopping process, kept by the broker.
    await probe.publish(f"{u}/work/late", {})
    release_blocked(tmp_path)
    assert await first.wait_exit() == 0, first.output()
    assert "Traceback" not in first.output()
    assert has(tmp_path, "done", "1")() and has(tmp_path, "done", "2")()
    assert not has(tmp_path, "start", "late")()

    second = core_app(mosquitto.port)
    await wait_until(has(tmp_path, "done", "late"), "the message published during shutdown")
    await probe.publish(f"{u}/work/3", {})
    await wait_until(has(tmp_path, "done", "3"), "a new message")
    # 1 and 2 were acknowledged before the disconnect: not redelivered.
    assert Counter(e["n"] for e in events(tmp_path, "start")) == {"1": 1, "2": 1, "late": 1, "3": 1}
    second.signal(signal.SIGINT)
    assert await second.wait_exit() == 0


async def test_shutdown_timeout_cancels_and_leaves_the_message_to_the_broker(
        mosquitto: Any, core_app: AppFactory, probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    first = core_app(mosquitto.port, SHUTDOWN_TIMEOUT="0.5")
    await first.wait_ready()
    probe = await probe_factory(target)
    await probe.publish(f"{u}/work/1", {"block": True})
    await wait_until(has(tmp_path, "start", "1"), "the handler to start")
    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 1  # not drained cleanly
    assert "still running" in first.output()

    release_blocked(tmp_path)
    second = core_app(mosquitto.port)
    await wait_until(has(tmp_path, "done", "1"), "the redelivered message")
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0


async def test_stuck_sync_handler_does_not_keep_the_stopped_process_alive(
        mosquitto: Any, core_app: AppFactory, probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    """A plain handler blocked in its pool thread cannot be cancelled, and Python joins pool threads
    at exit: the process must exit 1 after SHUTDOWN_TIMEOUT anyway, its log complete."""
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    first = core_app(mosquitto.port, SHUTDOWN_TIMEOUT="1")
    await first.wait_ready()
    probe = await probe_factory(target)
    await probe.publish(f"{u}/syncwork/1", {"block": True})
    await wait_until(has(tmp_path, "start", "1"), "the plain handler to start")
    first.signal(signal.SIGTERM)
    assert await first.wait_exit(timeout=20) == 1, first.output()
    output = first.output()
    assert "still running after 1 s; cancelling them" in output
    assert "stopped (handlers cancelled)" in output
    assert "1 thread(s) still running after the shutdown (handler_0)" in output  # logged, and flushed, last
    assert not has(tmp_path, "done", "1")()

    release_blocked(tmp_path)
    second = core_app(mosquitto.port)
    await wait_until(has(tmp_path, "done", "1"), "the redelivered message")
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0


# -- the broker goes away under an in-process runtime ---------------------------------------------------


async def test_reconnects_and_resubscribes_after_broker_restart(
        mosquitto_factory: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """Without persistence the restarted broker has no session: the subscription must be restored."""
    u = unique_id
    server = mosquitto_factory()
    target = BrokerTarget("mosquitto", server.host, server.port, v5=True)
    seen: list[str] = []

    async def handler(n: str) -> None:
        seen.append(n)

    router = Router()
    router.on(f"{u}/r/{{n}}", handler, qos=1)
    runtime = await serve(target, router)
    probe = await probe_factory(target)
    await probe.publish(f"{u}/r/before", "x")
    await wait_until(lambda: "before" in seen, "a message before the restart")

    await asyncio.to_thread(server.restart)
    await wait_until(lambda: runtime.client.state.connects >= 2 and runtime.client.state.subscribed,
                     "the runtime to reconnect and resubscribe")
    assert runtime.client.state.disconnects >= 1
    assert not runtime.client.state.session_present
    after = await probe_factory(target)
    await after.publish(f"{u}/r/after", "y")
    await wait_until(lambda: "after" in seen, "a message published after the restart")
    assert seen == ["before", "after"]


async def test_in_flight_handler_during_broker_restart_is_redelivered_once(
        mosquitto_factory: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """With a persisted session the broker redelivers the unacked message on the new connection.
    The ack of the old delivery is dropped (its packet id belongs to the dead connection); the
    new delivery's ack is sent, so a later session does not get the message a third time."""
    u = unique_id
    server = mosquitto_factory(persistence=True)
    target = BrokerTarget("mosquitto", server.host, server.port, v5=True)
    gate = asyncio.Event()
    calls: list[tuple[str, bool]] = []

    async def handler(n: str, context: Any) -> None:
        calls.append((n, context.dup))
        await gate.wait()

    router = Router()
    router.on(f"{u}/p/{{n}}", handler, qos=1)
    client_id = f"{u}-persistent"
    runtime = await serve(target, router, MQTT_CLIENT_ID=client_id, MQTT_SESSION_EXPIRY="60")
    probe = await probe_factory(target)
    await probe.publish(f"{u}/p/1", "x")
    await wait_until(lambda: len(calls) == 1, "the handler to start")

    await asyncio.to_thread(server.restart)
    await wait_until(lambda: len(calls) == 2, "the redelivery on the new connection")
    assert calls == [("1", False), ("1", True)]
    assert runtime.client.state.session_present
    gate.set()
    await wait_until(lambda: runtime.dispatcher.inflight == 0, "both handlers to finish")
    await runtime.stop()

    again = await serve(target, router, MQTT_CLIENT_ID=client_id, MQTT_SESSION_EXPIRY="60")
    after = await probe_factory(target)
    await after.publish(f"{u}/p/2", "y")
    await wait_until(lambda: ("2", False) in calls, "a new message in the resumed session")
    assert calls == [("1", False), ("1", True), ("2", False)]
    assert again.client.state.session_present


async def test_username_and_password(mosquitto_factory: Any, serve: ServeFn, probe_factory: ProbeFn,
                                     unique_id: str, tmp_path: Path) -> None:
    import subprocess

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "app", "s3cret"], check=True, capture_output=True)
    passwords.chmod(0o644)
    server = mosquitto_factory(extra_conf=f"allow_anonymous false\npassword_file {passwords}")
    target = BrokerTarget("mosquitto", server.host, server.port, v5=True)
    seen: list[str] = []

    async def handler(payload: Any) -> None:
        seen.append(payload)

    router = Router()
    router.on(f"{unique_id}/auth", handler, qos=1)
    refused = Runtime(load_settings({**target.env(), "MQTT_USERNAME": "app", "MQTT_PASSWORD": "wrong",
                                     "MQTT_CLIENT_ID": f"{unique_id}-bad", "MQTT_RECONNECT_MIN": "0.5"}), router.routes)
    await refused.start()
    try:
        await wait_until(lambda: refused.client.state.last_error, "the broker to refuse the wrong password")
        assert "authori" in str(refused.client.state.last_error).lower() or "password" in str(
            refused.client.state.last_error).lower()
        assert not refused.client.state.subscribed
    finally:
        await refused.stop()
    await serve(target, router, MQTT_USERNAME="app", MQTT_PASSWORD="s3cret")
    from tests.support.rt_probe import Probe

    probe = Probe(server.host, server.port, f"{unique_id}-authprobe")
    probe.paho.username_pw_set("app", "s3cret")
    await probe.connect()
    try:
        await probe.publish(f"{unique_id}/auth", "hello")
        await wait_until(lambda: seen == ["hello"], "a message with credentials")
    finally:
        probe.close()


async def test_starts_before_the_broker_and_stops_cleanly_while_disconnected(
        mosquitto_factory: Any, core_app: AppFactory, probe_factory: ProbeFn, unique_id: str, tmp_path: Path) -> None:
    from tests.support.servers import free_port

    port = free_port()
    app = core_app(port)
    await app.wait_output("cannot connect")  # retrying with backoff, not crashing
    server = mosquitto_factory(port=port)
    await app.wait_ready()
    probe = await probe_factory(BrokerTarget("mosquitto", server.host, server.port, v5=True))
    await probe.publish(f"{unique_id}/work/1", {})
    await wait_until(has(tmp_path, "done", "1"), "a message once the broker is up")

    await asyncio.to_thread(server.stop)
    await app.wait_output("reconnecting in")
    app.signal(signal.SIGTERM)
    assert await app.wait_exit(timeout=20) == 0, app.output()
    assert "Traceback" not in app.output()


@pytest.mark.slow
async def test_a_handler_blocking_the_event_loop_does_not_starve_keepalive(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """paho's network thread answers keepalive on its own: a handler that (wrongly) blocks the loop
    for longer than 1.5 × keepalive does not get the connection dropped by the broker."""
    import time

    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    done: list[str] = []

    async def hog(payload: Any) -> None:
        time.sleep(8.5)  # > 1.5 × MQTT_KEEPALIVE (5 s): the broker would drop a silent client
        done.append(payload)

    router = Router()
    router.on(f"{u}/hog", hog, qos=1)
    runtime = await serve(target, router, MQTT_KEEPALIVE="5")
    probe = await probe_factory(target)
    await probe.publish(f"{u}/hog", "x")
    await wait_until(lambda: done == ["x"], "the blocking handler", timeout=30)
    assert runtime.client.state.connects == 1 and runtime.client.state.disconnects == 0


@pytest.mark.slow
async def test_keepalive_is_answered_while_backpressure_pauses_reading(
        mosquitto: Any, serve: ServeFn, probe_factory: ProbeFn, unique_id: str) -> None:
    """At MAX_INFLIGHT the client stops reading the socket, but not the broker's PINGRESP: handlers
    that take longer than 2 × keepalive must not get the connection recycled (and their messages
    delivered twice)."""
    u = unique_id
    target = BrokerTarget("mosquitto", mosquitto.host, mosquitto.port, v5=True)
    done: list[str] = []

    async def slow(payload: Any) -> None:
        if payload == "a":
            await asyncio.sleep(11)  # > 2 × MQTT_KEEPALIVE (5 s), with reading paused all along
        done.append(payload)

    router = Router()
    router.on(f"{u}/slow", slow, qos=1)
    runtime = await serve(target, router, MQTT_KEEPALIVE="5", MAX_INFLIGHT="1")
    probe = await probe_factory(target)
    await probe.publish(f"{u}/slow", "a")
    await probe.publish(f"{u}/slow", "b")
    await wait_until(lambda: len(done) == 2, "both slow handlers", timeout=45)
    await asyncio.sleep(0.5)
    assert done == ["a", "b"]
    assert runtime.client.state.connects == 1 and runtime.client.state.disconnects == 0
