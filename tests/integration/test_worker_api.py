"""The seed's programmatic API: two `WorkerManager`s with different group names in one program.

`tests/support/regional_app.py` is that program (as a user would write it): it starts a manager per
group over the seqapp routes, two worker processes each, on a private Mosquitto. Every message of a
shared route must be handled exactly once per group (each group is a `$share` group of its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.integration.test_workers import Publisher, Records, report, wait_for
from tests.support.servers import MosquittoServer

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("us_east", "eu_west")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def broker(mosquitto_factory: Callable[..., MosquittoServer]) -> MosquittoServer:
    return mosquitto_factory(max_queued=100_000)


@pytest.fixture
def program(broker: MosquittoServer, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "WORKER_", "SEQAPP_"))}
    env.update(MQTT_BROKER="127.0.0.1", MQTT_PORT=str(broker.port), MQTT_CLIENT_ID="regional",
               REGIONAL_ROUTERS="tests.apps.seqapp.routers", SEQAPP_RECORD=str(tmp_path / "records.txt"),
               SHUTDOWN_TIMEOUT="10", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "program.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.regional_app", *GROUPS], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in re.findall(r"started worker w\d+ \(pid (\d+)", log_path.read_text(errors="replace")):
            _kill_if_worker(int(pid))


def _kill_if_worker(pid: int) -> None:
    try:
        if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


def test_two_managers_with_different_groups_each_handle_every_message_once(
    broker: MosquittoServer, program: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    proc, log_path = program

    def log() -> str:
        text = log_path.read_text(errors="replace")
        if proc.poll() is not None and "ready" not in text.splitlines():
            raise AssertionError(f"the program exited with {proc.returncode}:\n{text[-4000:]}")
        return text

    wait_for(lambda: "ready" in log().splitlines(), "both groups' workers to subscribe", timeout=60)
    [info] = re.findall(r"^shared routes: (.*)$", log(), re.MULTILINE)
    routes = {item["mqtt_topic"]: item for item in json.loads(info)}
    assert routes["seq/in"]["qos"] == 1 and routes["seq/in"]["worker_count"] == 1
    assert routes["seq/in"]["shared_topic"] == f"$share/{GROUPS[0]}/seq/in"

    # Which group each worker process belongs to, from its client id (`regional-<group>-w<i>`).
    group_of = {int(pid): group for pid, group in
                re.findall(r"started worker w\d+ \(pid (\d+), client id regional-(\w+?)-w\d+\)", log())}
    assert sorted(Counter(group_of.values()).items()) == sorted((group, 2) for group in GROUPS)

    records = Records(tmp_path / "records.txt")
    expected = range(2000)
    publisher = Publisher(broker.port)
    publisher.publish(expected)
    wait_for(lambda: sum(records.seqs().values()) >= 2 * len(expected), "every message handled in both groups", 60)
    publisher.close()

    for group in GROUPS:
        seqs = Counter(seq for _, pid, seq in records.lines() if group_of.get(pid) == group)
        lost, duplicates = report(f"group {group}", seqs, expected)
        assert (lost, duplicates) == (0, 0)
        workers = Counter(worker for worker, pid, _ in records.lines() if group_of.get(pid) == group)
        assert set(workers) == {"w0", "w1"}, workers  # the group's two workers shared the work
    assert {pid for _, pid, _ in records.lines()} <= set(group_of)  # nothing ran outside the workers

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log_path.read_text()[-4000:]
    assert "exit codes: [0, 0]" in log_path.read_text()
