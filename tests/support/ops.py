"""Helpers for the operations tests (issue 5): waiting, a publisher, `python main.py` as a child, HTTP GET.

Self-contained on purpose (paho, urllib, subprocess), so these tests do not depend on the other
suites' support code.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as paho
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 30.0


async def wait_until(condition: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT,
                     interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(condition: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT,
                    interval: float = 0.05) -> Any:
    """Poll `condition()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Publisher:
    """A blocking MQTT 5 publisher (paho's network loop in its own thread)."""

    def __init__(self, host: str, port: int, client_id: str, *, v5: bool = True) -> None:
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.max_inflight_messages_set(200)
        self.messages: list[paho.MQTTMessage] = []
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)
        self.client.connect(host, port)
        self.client.loop_start()
        wait_until_sync(self.client.is_connected, "the publisher to connect", 10)

    def publish(self, topic: str, payload: Any, qos: int = 1) -> None:
        data = payload if isinstance(payload, bytes) else (payload if isinstance(payload, str) else json.dumps(payload))
        info = self.client.publish(topic, data, qos)
        info.wait_for_publish(10)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(10), f"no SUBACK for {topic}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); (0, error text) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, str(exc)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(name, labels): value} using prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The value of one sample; 0 if absent."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


def metric_sum(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, l), v in metrics.items() if n == name and want <= set(l))


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment for `python main.py` (no MQTT_* from the caller; .env not read)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Apps of many tests share the session broker: none may adopt another test's sessions.
        "MQTT_ORPHAN_GRACE": "0",
    }
    env.update(extra)
    return env


class App:
    """`python main.py [args]` as a child process; output in a file; signalled by PID only."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="ops-app-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", *args, "--env-file", "/nonexistent/.env"], cwd=ROOT, env=env,
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    @property
    def output(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        self.log_file.close()
        os.unlink(self.log_file.name)


# -- `python main.py` with the ops test app and the HTTP server ---------------------------------------


@pytest.fixture
def app_factory() -> Iterator[Any]:
    """`app, url = app_factory(broker, *args, **env)`: tests.apps.ops_app served by main.py, HTTP on a free port."""
    from tests.support.servers import free_port

    apps: list[App] = []

    def start(broker: Any, *args: str, **env: str) -> tuple[App, str]:
        port = free_port()
        full_env = base_env(**{  # `env` may override any of these
            "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port), "HTTP_PORT": str(port),
            "ROUTERS_PACKAGE": "tests.apps.ops_app", "MQTT_CLIENT_ID": f"ops-{port}", "MQTT_SESSION_EXPIRY": "0",
            "MQTT_RECONNECT_MIN": "0.1", "MQTT_RECONNECT_MAX": "0.5", "SHUTDOWN_TIMEOUT": "5", **env,
        })
        app = App(full_env, *args)
        apps.append(app)
        return app, f"http://127.0.0.1:{port}"

    yield start
    for app in apps:
        app.cleanup()


def ready(url: str) -> bool:
    return http_get(url + "/ready")[0] == 200


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = http_get(url + "/metrics")
    assert status == 200, text
    return parse_metrics(text)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server, to take that server "away" and back.

    `stop()` closes the listening socket and every proxied connection (clients see the server
    gone); `start()` listens again on the same port. Runs on the caller's event loop.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()  # one side gone: drop the other too, as a dead server would
