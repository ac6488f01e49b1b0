"""`python main.py --workers`: the supervisor and its worker processes, against real brokers.

Each test starts a private Mosquitto (or the embedded broker) and runs the app under test
(`tests/apps/seqapp`) as a subprocess. Its handler appends `<worker> <pid> <seq>` to a file for
every message it handled, so lost and duplicated sequence numbers can be counted. Every process
started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import paho.mqtt.client as paho
import pytest
import pytest_asyncio
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.transport.embedded_broker import EmbeddedBroker
from core.router import Router
from core.worker_manager import ParkedSessions
from tests.integration.conftest import BrokerTarget
from tests.support.rt_probe import Probe
from tests.support.rt_proxy import PUBLISH, MqttProxy
from tests.support.rt_wait import wait_until
from tests.support.servers import MosquittoServer, free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CLIENT_ID = "seqapp"
SHARED_TOPIC = "seq/in"
PLAIN_TOPIC = "plain/in"

pytestmark = pytest.mark.timeout(90)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class AppProcess:
    """`python main.py ...` with the seqapp routes; stderr goes to a file we can search."""

    def __init__(self, tmp: Path, env: dict[str, str], args: list[str], name: str = "app") -> None:
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PYTHON, "main.py", *args], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        return wait_for(lambda: re.search(pattern, self.log()) or self._check_alive(pattern), f"log {pattern!r}",
                        timeout)

    def _check_alive(self, pattern: str) -> None:
        if self.proc.poll() is not None and not re.search(pattern, self.log()):
            raise AssertionError(f"app exited with {self.proc.returncode} before logging {pattern!r}:\n{self.log()[-4000:]}")

    def wait_ready(self, workers: int, timeout: float = 40.0) -> None:
        self.wait_log(rf"all {workers} worker\(s\) subscribed", timeout)

    def worker_pids(self, worker_id: str) -> list[int]:
        """PIDs the supervisor started for `worker_id`, in order."""
        return [int(m) for m in re.findall(rf"started worker {worker_id} \(pid (\d+)", self.log())]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"app did not exit within {timeout} s:\n{self.log()[-4000:]}") from None

    def stop(self) -> None:
        """Stop the supervisor and any worker it left behind, by PID."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in (int(p) for p in re.findall(r"started worker w\d+ \(pid (\d+)", self.log())):
            _kill_if_worker(pid)
        self._log.close()


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


class Records:
    """The lines the app's handlers wrote: `<worker_id> <pid> <seq>`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, int, int]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], int(parts[1]), int(parts[2])))
        return out

    def seqs(self) -> Counter[int]:
        return Counter(seq for _, _, seq in self.lines())

    def by_worker(self) -> Counter[str]:
        return Counter(worker for worker, _, _ in self.lines())

    def pids(self, worker_id: str) -> list[int]:
        seen: list[int] = []
        for worker, pid, _ in self.lines():
            if worker == worker_id and pid not in seen:
                seen.append(pid)
        return seen

    def wait_handled(self, expected: range, timeout: float = 60.0) -> Counter[int]:
        want = set(expected)
        wait_for(lambda: want <= set(self.seqs()), f"all of {len(want)} messages handled", timeout)
        return self.seqs()


def report(name: str, seqs: Counter[int], expected: range) -> tuple[int, int]:
    lost = len(set(expected) - set(seqs))
    duplicates = sum(count - 1 for seq, count in seqs.items() if count > 1 and seq in expected)
    print(f"{name}: {len(expected)} published, {lost} lost, {duplicates} duplicate deliveries")
    return lost, duplicates


class Publisher:
    """A QoS 1 publisher (MQTT 5, or 3.1.1 for the embedded broker), optionally paced, in a thread."""

    def __init__(self, port: int, *, v5: bool = True) -> None:
        if v5:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{time.time_ns()}",
                                      protocol=paho.MQTTv5)
        else:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}",
                                      protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def publish(self, seqs: range, topic: str = SHARED_TOPIC, rate: float | None = None) -> None:
        infos = []
        started = time.monotonic()
        for count, seq in enumerate(seqs, 1):
            infos.append(self.client.publish(topic, str(seq), qos=1))
            if rate and count % 50 == 0:
                ahead = count / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published()

    def publish_in_background(self, seqs: range, rate: float) -> None:
        def run() -> None:
            try:
                self.publish(seqs, rate=rate)
            except BaseException as exc:  # noqa: BLE001 - re-raised in join()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 60.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "publisher did not finish"
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def session_present(port: int, client_id: str) -> bool:
    """Connect without a clean start and report whether the broker still had a session for the id."""
    result: dict[str, bool] = {}
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result["present"] = bool(flags.session_present)
        done.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return result["present"]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def broker(mosquitto_factory: Callable[..., MosquittoServer]) -> MosquittoServer:
    return mosquitto_factory(max_queued=100_000)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., AppProcess]]:
    """Start app processes (stopped at teardown); `harness.records` is their shared record file."""
    apps: list[AppProcess] = []

    def start(env: dict[str, str], *args: str, name: str = "app") -> AppProcess:
        app = AppProcess(tmp_path, env, list(args), name=f"{name}{len(apps)}")
        apps.append(app)
        return app

    try:
        yield start
    finally:
        for app in apps:
            app.stop()


def app_env(tmp_path: Path, port: int | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "WORKER_", "SEQAPP_", "EMBEDDED_"))}
    env.update(
        ROUTERS_PACKAGE="tests.apps.seqapp.routers",
        MQTT_CLIENT_ID=CLIENT_ID,
        SEQAPP_RECORD=str(tmp_path / "records.txt"),
        STATS_INTERVAL="2",
        SHUTDOWN_TIMEOUT="10",
        PYTHONUNBUFFERED="1",
    )
    if port is not None:
        env.update(MQTT_BROKER="127.0.0.1", MQTT_PORT=str(port))
    env.update(extra)
    return env


# -- tests ----------------------------------------------------------------------------------------


def test_two_workers_split_5000_messages_and_lose_none(broker: MosquittoServer, harness: Any, tmp_path: Path) -> None:
    records = Records(tmp_path / "records.txt")
    app = harness(app_env(tmp_path, broker.port), "--workers", "2")
    app.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(5000)
    plain = range(100_000, 100_020)
    publisher.publish(expected)
    publisher.publish(plain, topic=PLAIN_TOPIC)
    seqs = records.wait_handled(expected)
    wait_for(lambda: set(plain) <= set(records.seqs()), "the plain route's messages")
    publisher.close()

    lost, duplicates = report("5,000 over 2 workers", seqs, expected)
    assert lost == 0
    split = Counter(worker for worker, _, seq in records.lines() if seq in expected)
    print(f"split: {dict(split)}")
    assert set(split) == {"w0", "w1"}
    for worker in ("w0", "w1"):
        assert 0.30 <= split[worker] / len(expected) <= 0.70, split
    # Non-shared routes are served once, by the supervisor itself.
    plain_lines = [(worker, seq) for worker, _, seq in records.lines() if seq in plain]
    assert sorted(seq for _, seq in plain_lines) == list(plain)
    assert {worker for worker, _ in plain_lines} == {"main"}

    app.wait_log(r"stats w0 pid=\d+ state=running handled=\d+")
    app.signal(signal.SIGTERM)
    assert app.wait() == 0
    assert "all workers stopped cleanly" in app.log()


def test_sigkilled_worker_is_restarted_with_its_client_id_and_nothing_is_lost(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    app = harness(app_env(tmp_path, broker.port, SEQAPP_DELAY="0.002"), "--workers", "2")
    app.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(3000)
    publisher.publish_in_background(expected, rate=1000)
    wait_for(lambda: records.by_worker()["w1"] >= 300, "w1 to handle messages")
    (old_pid,) = app.worker_pids("w1")
    os.kill(old_pid, signal.SIGKILL)

    pids = wait_for(lambda: app.worker_pids("w1")[1:] and app.worker_pids("w1"), "w1 to be restarted")
    assert len(pids) == 2 and pids[1] != old_pid
    ids = re.findall(r"started worker w1 \(pid \d+, client id (\S+?)\)", app.log())
    assert ids == [f"{CLIENT_ID}-w1", f"{CLIENT_ID}-w1"]
    assert re.search(rf"worker w1 \(pid {old_pid}\) died: killed by SIGKILL, presumably out of memory", app.log())

    publisher.join()
    publisher.close()
    seqs = records.wait_handled(expected)
    lost, _ = report("SIGKILL of w1", seqs, expected)
    assert lost == 0
    assert records.pids("w1")[-1] == pids[1]  # the replacement handled messages too
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_sigterm_drains_and_acks_so_a_restarted_app_gets_each_message_once(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    gated = Records(tmp_path / "gated.txt")
    gate = tmp_path / "gate"
    # Messages from 500 on wait at a gate: when SIGTERM comes, handlers are in flight in both workers
    # for certain (not because they happened to be slow enough), and they finish during the drain.
    env = app_env(tmp_path, broker.port, MAX_INFLIGHT="50", SEQAPP_GATE_FROM="500", SEQAPP_GATE=str(gate),
                  SEQAPP_GATED=str(gated.path))
    first = harness(env, "--workers", "2")
    first.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(3000)
    publisher.publish_in_background(expected, rate=1000)
    wait_for(lambda: set(range(500)) <= set(records.seqs()), "the 500 ungated messages handled")
    wait_for(lambda: {"w0", "w1"} <= set(gated.by_worker()), "handlers of both workers waiting at the gate")
    first.signal(signal.SIGTERM)
    stopping = r"\[(w\d)\] core\.runtime: stopping: ([1-9]\d*) handler\(s\) in flight"
    wait_for(lambda: {m[0] for m in re.findall(stopping, first.log())} == {"w0", "w1"},
             "both workers to stop with handlers in flight")
    gate.touch()  # the drain lets them finish and acknowledges them
    assert first.wait(timeout=10 + 10) == 0  # SHUTDOWN_TIMEOUT=10 plus the stop grace
    handled_first = set(records.seqs())
    assert set(gated.seqs()) <= handled_first, "every handler in flight at the signal finished in the drain"
    publisher.join()  # the rest waits in the workers' sessions
    publisher.close()

    second = harness(env | {"TEST_MODE_IDLE": "2"}, "--workers", "2", "--test-mode")
    assert second.wait(timeout=60) == 0
    seqs = records.seqs()
    lost, duplicates = report("SIGTERM mid-flow + restart", seqs, expected)
    assert lost == 0
    redelivered = [seq for seq in handled_first if seqs[seq] > 1]
    assert redelivered == [], f"{len(redelivered)} messages handled before the stop were delivered again"
    assert duplicates == 0


def test_recycling_by_message_count_under_load_loses_nothing(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    app = harness(app_env(tmp_path, broker.port, WORKER_MAX_MESSAGES="400"), "--workers", "2")
    app.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(3000)
    publisher.publish_in_background(expected, rate=1500)
    publisher.join()
    publisher.close()
    seqs = records.wait_handled(expected)
    lost, duplicates = report("recycling every 400 messages", seqs, expected)
    assert lost == 0
    assert duplicates == 0
    for worker in ("w0", "w1"):
        assert len(records.pids(worker)) >= 2, f"{worker} was never recycled"
    assert re.search(r"worker w\d \(pid \d+\) recycled", app.log())
    assert "died" not in app.log()  # a recycle is not a crash
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_handler_blocking_the_event_loop_is_caught_by_the_heartbeat(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, WORKER_HEARTBEAT_TIMEOUT="3", SEQAPP_BLOCK_SEQ="100",
                  SEQAPP_MARKER=str(tmp_path / "blocked-once"))
    app = harness(env, "--workers", "2")
    app.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(600)
    publisher.publish(expected)
    publisher.close()
    match = app.wait_log(r"worker (w\d) \(pid (\d+)\): no heartbeat for [\d.]+ s")
    blocked_worker, blocked_pid = match.group(1), int(match.group(2))
    seqs = records.wait_handled(expected)  # including 100, by the replacement
    lost, _ = report("blocked handler", seqs, expected)
    assert lost == 0
    pids = app.worker_pids(blocked_worker)
    assert pids[0] == blocked_pid and len(pids) == 2
    assert [pid for worker, pid, seq in records.lines() if seq == 100] == [pids[1]]
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_crash_loop_stops_everything_with_exit_1(broker: MosquittoServer, harness: Any, tmp_path: Path) -> None:
    env = app_env(tmp_path, broker.port, SEQAPP_CRASH_SEQ="3", WORKER_MAX_RESTARTS="2", WORKER_RESTART_WINDOW="60")
    app = harness(env, "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    publisher.publish(range(5))
    publisher.close()
    assert app.wait(timeout=60) == 1
    log = app.log()
    assert re.search(r"worker w0 \(client id seqapp-w0\) crashed 3 time\(s\) within 60 s \(WORKER_MAX_RESTARTS=2\); "
                     r"last: exit code 3; stopping everything", log), log[-3000:]
    assert len(app.worker_pids("w0")) == 3


def start_and_stop_keeping_sessions(harness: Any, env: dict[str, str]) -> None:
    """`--workers 2` until both workers subscribed, then SIGTERM (exit 0): the sessions stay with the broker."""
    app = harness(env, "--workers", "2")
    app.wait_ready(2)
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_test_mode_handles_what_waited_in_the_sessions_and_exits_0(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, TEST_MODE_IDLE="2")
    start_and_stop_keeping_sessions(harness, env)
    # A normal stop keeps the sessions: what is published meanwhile waits for the next start.
    publisher = Publisher(broker.port)
    expected = range(1000)
    publisher.publish(expected)
    publisher.publish(range(100_000, 100_010), topic=PLAIN_TOPIC)
    publisher.close()

    second = harness(env, "--workers", "2", "--test-mode")
    assert second.wait(timeout=60) == 0
    seqs = records.seqs()
    lost, duplicates = report("test mode", seqs, expected)
    assert lost == 0 and duplicates == 0
    assert set(range(100_000, 100_010)) <= set(seqs)
    assert len(re.findall(r"worker w\d \(pid \d+\) finished \(test mode\)", second.log())) == 2


def test_fewer_workers_drain_and_end_the_sessions_a_larger_run_left(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, TEST_MODE_IDLE="2")
    first = harness(env, "--workers", "3")
    first.wait_ready(3)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    publisher = Publisher(broker.port)
    expected = range(900)
    publisher.publish(expected)  # dealt over three offline sessions, w2's share among them
    publisher.close()

    second = harness(env, "--workers", "2", "--test-mode")
    assert second.wait(timeout=60) == 0
    log = second.log()
    match = re.search(rf"ended the session of {CLIENT_ID}-w2 after handling (\d+) parked message", log)
    assert match and int(match.group(1)) > 0, log[-3000:]
    assert f"session of {CLIENT_ID}-w3" not in log
    seqs = records.seqs()
    lost, duplicates = report("3 -> 2 workers", seqs, expected)
    assert lost == 0 and duplicates == 0
    assert {worker for worker, _, _ in records.lines()} == {"w0", "w1", "w2-parked"}
    assert records.by_worker()["w2-parked"] == int(match.group(1))  # the drain counted exactly what it handled
    assert not session_present(broker.port, f"{CLIENT_ID}-w2")
    assert session_present(broker.port, f"{CLIENT_ID}-w0")  # the remaining workers keep theirs


def test_workers_on_the_embedded_broker(harness: Any, tmp_path: Path) -> None:
    records = Records(tmp_path / "records.txt")
    port = free_port()
    env = app_env(tmp_path, None, EMBEDDED_BROKER_PORT=str(port), SEQAPP_WORKER_COUNT="2")
    app = harness(env, "--workers")  # no number: the route's worker_count=2 decides
    app.wait_ready(2)
    assert "2 worker process(es), the largest worker_count" in app.log()
    publisher = Publisher(port, v5=False)
    expected = range(1000)
    publisher.publish(expected)
    publisher.publish(range(100_000, 100_005), topic=PLAIN_TOPIC)
    publisher.close()
    seqs = records.wait_handled(expected)
    wait_for(lambda: set(range(100_000, 100_005)) <= set(records.seqs()), "plain messages")
    lost, _ = report("embedded broker", seqs, expected)
    assert lost == 0
    split = Counter(worker for worker, _, seq in records.lines() if seq in expected)
    assert set(split) == {"w0", "w1"} and min(split.values()) >= 0.3 * len(expected), split
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_a_worker_leaves_the_group_of_a_route_whose_worker_count_went_down(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    first = harness(app_env(tmp_path, broker.port, SEQAPP_WORKER_COUNT="2", SEQAPP_WORKER_COUNT2="2"), "--workers")
    first.wait_ready(2)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    # seq2/in now wants one subscriber; w1's resumed session still holds its $share subscription.
    second = harness(app_env(tmp_path, broker.port, SEQAPP_WORKER_COUNT="2", SEQAPP_WORKER_COUNT2="1"), "--workers")
    second.wait_ready(2)
    publisher = Publisher(broker.port)
    expected = range(400)
    publisher.publish(expected, topic="seq2/in")
    publisher.close()
    seqs = records.wait_handled(expected)
    lost, duplicates = report("worker_count 2 -> 1", seqs, expected)
    assert lost == 0 and duplicates == 0
    assert {worker for worker, _, _ in records.lines()} == {"w0"}
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_hung_handler_is_caught_by_its_age_and_the_worker_replaced(
    mode: str, broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    """A plain handler stuck in the thread pool, or an async one awaiting forever, leaves the event loop
    and so the heartbeats running, while the acks behind it pile up until the worker stalls at
    MAX_INFLIGHT. The age of the oldest handler gives it away; the replacement gets what was unacked."""
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, WORKER_HANDLER_TIMEOUT="2", MAX_INFLIGHT="50", SEQAPP_HANG_SEQ="100",
                  SEQAPP_MARKER=str(tmp_path / "hung-once"), SEQAPP_SYNC="1" if mode == "sync" else "0")
    app = harness(env, "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    expected = range(300)
    publisher.publish(expected)  # 150 and later only arrive once 100 is acknowledged, by the replacement
    publisher.close()
    match = app.wait_log(r"worker w0 \(pid (\d+)\): handler of route 'seq/in' \(topic 'seq/in'\) running for "
                         r"([\d.]+) s \(WORKER_HANDLER_TIMEOUT=2\)")
    hung_pid = int(match.group(1))
    assert float(match.group(2)) >= 2
    seqs = records.wait_handled(expected)
    lost, _ = report(f"{mode} handler hung", seqs, expected)
    assert lost == 0
    pids = app.worker_pids("w0")
    assert pids[0] == hung_pid and len(pids) == 2
    assert [pid for _, pid, seq in records.lines() if seq == 100] == [pids[1]]  # redelivered to the successor
    assert re.search(rf"worker w0 \(pid {hung_pid}\) died: handler of route 'seq/in'", app.log())
    assert "no heartbeat" not in app.log()  # the heartbeats never stopped
    app.signal(signal.SIGTERM)
    assert app.wait() == 0


def test_single_process_after_workers_handles_what_was_parked_in_their_sessions(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    """Back from --workers to one process: the workers' sessions stay in the group while offline and
    collect their share; the single process drains and ends them as the supervisor does for ids
    above its count."""
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, TEST_MODE_IDLE="2")
    start_and_stop_keeping_sessions(harness, env)
    publisher = Publisher(broker.port)
    expected = range(600)
    publisher.publish(expected)  # dealt over w0's and w1's offline sessions
    publisher.close()

    second = harness(env, "--test-mode")  # no --workers: one process
    assert second.wait(timeout=60) == 0
    log = second.log()
    assert "supervisor" not in log.split("\n", 1)[0]
    for worker in ("w0", "w1"):
        match = re.search(rf"ended the session of {CLIENT_ID}-{worker} after handling (\d+) parked message", log)
        assert match and int(match.group(1)) > 0, log[-3000:]
    seqs = records.seqs()
    lost, duplicates = report("2 workers -> single process", seqs, expected)
    assert lost == 0 and duplicates == 0
    assert {worker for worker, _, _ in records.lines()} == {"w0-parked", "w1-parked"}
    assert not session_present(broker.port, f"{CLIENT_ID}-w0")
    assert not session_present(broker.port, f"{CLIENT_ID}-w1")


# -- supervisor signals and stop ------------------------------------------------------------------


def test_second_sigterm_during_shutdown_is_ignored(broker: MosquittoServer, harness: Any, tmp_path: Path) -> None:
    records = Records(tmp_path / "records.txt")
    release = tmp_path / "release"
    env = app_env(tmp_path, broker.port, SEQAPP_HANG_SEQ="2", SEQAPP_MARKER=str(tmp_path / "hanging"),
                  SEQAPP_RELEASE=str(release))
    app = harness(env, "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    publisher.publish(range(5))
    publisher.close()
    wait_for(lambda: (tmp_path / "hanging").exists(), "message 2's handler to hang")
    app.signal(signal.SIGTERM)
    app.wait_log(r"SIGTERM received; stopping the workers gracefully")
    app.signal(signal.SIGTERM)
    app.wait_log(r"SIGTERM received again; already stopping")
    release.touch()  # the worker, still draining, finishes the handler
    assert app.wait() == 0
    assert "all workers stopped cleanly" in app.log()
    assert records.seqs() == Counter(range(5))
    assert len(app.worker_pids("w0")) == 1


def test_sighup_stops_the_supervisor_like_sigterm(broker: MosquittoServer, harness: Any, tmp_path: Path) -> None:
    records = Records(tmp_path / "records.txt")
    app = harness(app_env(tmp_path, broker.port), "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    publisher.publish(range(10))
    publisher.close()
    records.wait_handled(range(10))
    app.signal(signal.SIGHUP)
    assert app.wait() == 0
    log = app.log()
    assert "SIGHUP received; stopping the workers gracefully" in log
    assert re.search(r"worker w0 \(pid \d+\) stopped: exit code 0", log)
    assert "all workers stopped cleanly" in log


def test_a_worker_that_does_not_drain_in_time_is_killed_and_the_exit_code_is_1(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    """A handler blocking the worker's event loop keeps it from even seeing the SIGTERM."""
    env = app_env(tmp_path, broker.port, SHUTDOWN_TIMEOUT="1", SEQAPP_BLOCK_SEQ="2",
                  SEQAPP_MARKER=str(tmp_path / "blocking"))
    app = harness(env, "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    publisher.publish(range(5))
    publisher.close()
    wait_for(lambda: (tmp_path / "blocking").exists(), "message 2's handler to block the loop")
    app.signal(signal.SIGTERM)
    assert app.wait() == 1
    log = app.log()
    (pid,) = app.worker_pids("w0")
    assert f"worker w0 (pid {pid}) did not stop within 6 s; killing it" in log
    assert f"worker w0 (pid {pid}) stopped: killed by SIGKILL" in log
    assert "exit 1: worker(s) w0 did not stop cleanly" in log


# -- draining sessions: the marker barrier, and the supervisor's own session ----------------------


class DeadLetters:
    """A subscriber to `dead-letter/#` that counts what the app dead-letters."""

    def __init__(self, port: int) -> None:
        self.topics: list[str] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dead-{time.time_ns()}", protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, message: self.topics.append(message.topic)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self._subscribed.set()
        self.client.on_connect = lambda c, u, flags, reason, props: c.subscribe("dead-letter/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK for dead-letter/#"

    def settled(self) -> list[str]:
        """What arrived, once a sentinel published after everything else has come back."""
        info = self.client.publish("dead-letter/sentinel", b"", qos=1)
        info.wait_for_publish(10)
        wait_for(lambda: "dead-letter/sentinel" in self.topics, "the dead-letter sentinel")
        return [topic for topic in self.topics if topic != "dead-letter/sentinel"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("plain", [True, False], ids=["with-plain-routes", "no-plain-routes"])
def test_workers_after_a_single_process_run_handle_what_its_session_held_for_shared_routes(
    plain: bool, broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    """`python main.py` subscribed `$share/workers/seq/in` as MQTT_CLIENT_ID; its session keeps that
    subscription and collects the messages published while nothing runs. With --workers the
    supervisor's main runtime resumes that session (with plain routes) and handles them, then leaves
    the group; without plain routes there is no main runtime and the session is drained and ended."""
    records = Records(tmp_path / "records.txt")
    env = app_env(tmp_path, broker.port, **({} if plain else {"SEQAPP_NO_PLAIN": "1"}))
    first = harness(env)  # one process
    first.wait_log(r"mqtt\[main\]: subscribed to \d+ filter")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    dead = DeadLetters(broker.port)
    publisher = Publisher(broker.port)
    expected = range(600)
    publisher.publish(expected)  # the group's only member is the offline session of MQTT_CLIENT_ID
    publisher.close()

    second = harness(env, "--workers", "2")
    second.wait_ready(2)
    if plain:
        second.wait_log(r"\[main\] core\.worker: left \d+ shared subscription\(s\)")
    else:
        match = second.wait_log(rf"ended the session of {CLIENT_ID} after handling (\d+) parked message")
        assert int(match.group(1)) == len(expected)
    records.wait_handled(expected)
    later = range(10_000, 10_300)
    publisher = Publisher(broker.port)
    publisher.publish(later)  # the main process has left the group: only the workers get these
    publisher.close()
    seqs = records.wait_handled(later)
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    for name, seq_range in (("parked in the main session", expected), ("published afterwards", later)):
        lost, duplicates = report(name, seqs, seq_range)
        assert lost == 0 and duplicates == 0
    by = Counter(worker for worker, _, seq in records.lines() if seq in expected)
    assert by == {"main" if plain else "main-parked": len(expected)}, by
    assert {worker for worker, _, seq in records.lines() if seq in later} <= {"w0", "w1"}
    assert dead.settled() == []
    dead.close()
    assert session_present(broker.port, CLIENT_ID) == plain  # kept by the main runtime, else ended


class StallingProxy(MqttProxy):
    """Passes MQTT through, but holds back the broker's PUBLISH packets after the first `after` for
    `seconds`, once: a broker slow to deliver a resumed session's queue (the packets behind wait too)."""

    def __init__(self, host: str, port: int, after: int, seconds: float) -> None:
        super().__init__(host, port)
        self.after, self.seconds = after, seconds
        self.delivered = 0
        self.stalled = False

    async def before_forward(self, direction: str, first: int, body: bytes) -> None:
        if direction == "in" and first >> 4 == PUBLISH:
            self.delivered += 1
            if self.delivered == self.after + 1:
                self.stalled = True
                await asyncio.sleep(self.seconds)


async def _persistent_client(target: BrokerTarget, client_id: str) -> tuple[paho.Client, bool]:
    """Connect keeping the session (v5: expiry 300 s; 3.1.1: clean_session off); (client, session present)."""
    result: dict[str, bool] = {}
    if target.v5:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        kwargs: dict[str, Any] = {"clean_start": False, "properties": props}
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                             clean_session=False)
        kwargs = {}
    client.on_connect = lambda c, u, flags, reason, p: result.setdefault("present", bool(flags.session_present))
    client.connect(target.host, target.port, **kwargs)
    client.loop_start()
    await wait_until(lambda: "present" in result, f"CONNACK for {client_id}")
    return client, result["present"]


async def _disconnect(client: paho.Client) -> None:
    client.disconnect()
    await wait_until(lambda: not client.is_connected(), "disconnect")
    client.loop_stop()


@pytest_asyncio.fixture(params=["mosquitto", "embedded"])
async def drain_target(request: pytest.FixtureRequest) -> AsyncIterator[BrokerTarget]:
    """Where the in-process drain test runs: a private Mosquitto (MQTT 5) or the embedded broker (3.1.1)."""
    if request.param == "mosquitto":
        server = request.getfixturevalue("mosquitto_factory")(max_queued=100_000)
        yield BrokerTarget("mosquitto", "127.0.0.1", server.port, v5=True)
        return
    embedded = EmbeddedBroker("127.0.0.1", 0)
    await embedded.start()
    try:
        yield BrokerTarget("embedded", "127.0.0.1", embedded.port, v5=False)
    finally:
        await embedded.stop()


async def test_a_drain_ends_the_session_only_after_everything_queued_in_it_was_handled(
    drain_target: BrokerTarget,
) -> None:
    """The broker stalls for 3 s after delivering 50 of 300 parked messages. A drain that guessed
    "empty" from 1.5 s without a message ended the session there and so discarded the other 250;
    the marker it publishes to itself comes behind all 300, so it waits for them."""
    target = drain_target
    base = f"drain{time.time_ns() % 10**9}"
    topic = f"{base}/seq"
    client, _ = await _persistent_client(target, f"{base}-w0")  # a worker session of a larger run...
    subscribed = threading.Event()
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.subscribe(f"$share/workers/{topic}", qos=1)
    await wait_until(subscribed.is_set, "SUBACK")
    await _disconnect(client)  # ...left offline: the group's messages park in it
    probe = await Probe(target.host, target.port, f"{base}-pub", v5=target.v5).connect()
    expected = range(300)
    for seq in expected:
        await probe.publish(topic, str(seq))
    probe.close()

    handled: list[int] = []
    everything: list[str] = []

    async def seq_handler(payload: str) -> None:
        await asyncio.sleep(0.001)
        handled.append(int(payload))

    async def catch_all(topic: str) -> None:  # matches the marker's topic too (3.1.1 matches by topic)
        everything.append(topic)

    router = Router()
    router.on(topic, seq_handler, qos=1, shared=True, payload_format="text")
    router.on("#", catch_all, qos=1, shared=True)
    stalling = await StallingProxy(target.host, target.port, after=50, seconds=3.0).start()
    try:
        settings = load_settings({
            **target.env(stalling.port), "MQTT_CLIENT_ID": base, "MAX_INFLIGHT": "20",
            "SHUTDOWN_TIMEOUT": "5", "MQTT_RECONNECT_MIN": "0.1", "MQTT_RECONNECT_MAX": "1",
        })
        parked = ParkedSessions(Application(settings, router), first=0)
        assert await asyncio.wait_for(parked.run(), 60)
    finally:
        await stalling.stop()
    assert stalling.stalled, "the broker's deliveries were never held back"
    assert Counter(handled) == Counter(expected), f"{len(set(expected) - set(handled))} lost"
    assert parked.info[f"{base}-w0"] == {"session_present": True, "handled": len(expected), "state": "ended"}
    assert not [t for t in everything if "parked-drain" in t], "the marker reached a user route"
    assert sorted(everything) == sorted([topic] * len(expected))  # `#` saw the parked messages, nothing else
    if target.v5:  # amqtt reports any id it has seen as a present session, even after a clean-session connect
        client, present = await _persistent_client(target, f"{base}-w0")
        await _disconnect(client)
        assert not present, "the drained session was not ended"
