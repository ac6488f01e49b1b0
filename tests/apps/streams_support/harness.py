"""Run the app under test as `python main.py ...`, publish to it, collect what it publishes, read its records.

Every process started here is stopped by PID (the supervisor, and any worker it left behind).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[3]
PYTHON = sys.executable


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll until `condition()` is truthy (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def app_env(**settings: str) -> dict[str, str]:
    """The environment of an app process: this one's, minus any .env influence, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "REDIS_", "DATABASE_", "OUTBOX_", "STREAM"))}
    env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO", "STATS_INTERVAL": "3600", "SHUTDOWN_TIMEOUT": "10",
                "MQTT_RECONNECT_MIN": "0.1", "MQTT_RECONNECT_MAX": "1"})
    env.update(settings)
    return env


class AppProcess:
    """`python main.py <args>` with its output in a log file."""

    def __init__(self, log_path: Path, env: dict[str, str], args: list[str] = ()) -> None:  # type: ignore[assignment]
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([PYTHON, "main.py", "--env-file", "/nonexistent", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 40.0) -> "re.Match[str]":
        def found() -> "re.Match[str] | None":
            match = re.search(pattern, self.log())
            if match is None and self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode} before logging {pattern!r}:\n"
                                     f"{self.log()[-4000:]}")
            return match

        return wait_for(found, f"log line {pattern!r}", timeout)

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"started worker w\d+ \(pid (\d+)", self.log())]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.worker_pids():
            _kill_if_worker(pid)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self.worker_pids():
            _kill_if_worker(pid)


def _kill_if_worker(pid: int) -> None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"multiprocessing" in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Publisher:
    """A QoS 1 MQTT 5 publisher with its network loop in paho's thread."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{time.time_ns()}",
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port)
        self.client.loop_start()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def publish(self, topics: list[tuple[str, bytes]], rate: float | None = None, timeout: float = 120.0) -> None:
        """Publish every (topic, payload), at most `rate` per second; wait for every PUBACK."""
        infos = []
        started = time.monotonic()
        for count, (topic, payload) in enumerate(topics, 1):
            infos.append(self.client.publish(topic, payload, qos=1))
            if rate and count % 20 == 0:
                ahead = count / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge every publish"

    def publish_in_background(self, topics: list[tuple[str, bytes]], rate: float | None = None) -> None:
        def run() -> None:
            try:
                self.publish(topics, rate)
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 120.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "publisher did not finish"
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Collector:
    """An MQTT 5 subscriber counting what arrives per topic.

    With `persistent=True` its session (subscription and queued messages) outlives disconnects and,
    on a broker with persistence, broker restarts; paho reconnects by itself.
    """

    def __init__(self, port: int, topic_filter: str, *, client_id: str, persistent: bool = False,
                 host: str = "127.0.0.1") -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self._filter = topic_filter
        self.client.on_connect = self._on_connect
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect(host, port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, f"SUBACK for {topic_filter!r}", 20)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure and not flags.session_present:
            client.subscribe(self._filter, qos=1)
        elif not reason.is_failure:
            self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.counts[message.topic] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    async def final_counts(self, publisher: Any, marker: str, timeout: float = 30.0) -> Counter[str]:
        """The counts once `publisher` (an app's MQTT client) has published `marker` and it arrived:
        whatever that client published before went out before it, so nothing more is on its way."""
        import asyncio

        await publisher.publish(marker, b"", 1)
        deadline = time.monotonic() + timeout
        while marker not in self.snapshot():
            assert time.monotonic() < deadline, f"the marker {marker!r} did not arrive in {timeout:.0f} s"
            await asyncio.sleep(0.02)
        counts = self.snapshot()
        del counts[marker]
        return counts

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Records:
    """Lines `<worker_id> <pid> <seq> <attempt>` written by tests/apps/streams_app."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, int, str, int]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4:
                out.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
        return out

    def seqs(self) -> Counter[str]:
        return Counter(seq for _, _, seq, _ in self.lines())

    def workers(self) -> Counter[str]:
        return Counter(worker for worker, _, _, _ in self.lines())

    def count(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                return sum(1 for _ in fh)
        except FileNotFoundError:
            return 0
