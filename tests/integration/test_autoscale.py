"""WORKER_AUTO_SCALE: `python main.py --workers` grows under a burst and shrinks when idle, losing nothing.

The app under test is `tests/apps/seqapp` (each handled message appends `<worker> <pid> <seq>` to a
file). Its shared handlers wait at a gate file while it lists `*` or their worker's id, so the
preconditions are set by the test, not by how fast this machine is:
- the burst: every worker is held at the gate with MAX_INFLIGHT messages (saturated) and publishing
  goes on until the pool has grown to WORKER_MAX_COUNT;
- the first retirement: the gate then holds w2 only, so w0 and w1 drain the backlog and go idle
  while w2 holds MAX_INFLIGHT messages in flight and more queued in its session. The pool's mean
  utilization (1/3) is below WORKER_SCALE_DOWN_AT, so w2 (the highest index) is retired with all
  of those: the gate opens once it has left its groups and is waiting for its handlers;
- the second retirement happens with a trickle of messages flowing.
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.test_workers import (AppProcess, Publisher, Records, app_env, report, session_present,
                                            wait_for)
from tests.integration.test_workers import broker, harness  # noqa: F401 - the same fixtures
from tests.support.ops import http_get, metric, scrape
from tests.support.servers import MosquittoServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DECISION = re.compile(r"autoscale: (\d+) -> (\d+) worker\(s\)")


def decisions(app: AppProcess) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in DECISION.findall(app.log())]


def publish_until(publisher: Publisher, first: int, condition: Callable[[], bool], what: str, *,
                  batch: int, pause: float, timeout: float = 60.0) -> range:
    """Publish `batch` QoS 1 messages every `pause` seconds until `condition()`; the sequence numbers sent."""
    seq = first
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s publishing until {what}")
        publisher.publish(range(seq, seq + batch))
        seq += batch
        time.sleep(pause)
    return range(first, seq)


@dataclass
class Retiring:
    """A pool grown to 3 under a burst, now retiring w2 while w2 holds MAX_INFLIGHT messages at the gate."""

    app: AppProcess
    publisher: Publisher
    gate: Path
    http_port: int
    burst: range  # published until the pool had grown, then more for w2
    grown: float  # seconds of burst until the decision to grow to 3
    stopping: "re.Match[str]"  # w2's "stopping: N handler(s) in flight" line


def grow_to_three_and_retire_w2(broker: MosquittoServer, harness: Any, tmp_path: Path, **extra: str) -> Retiring:
    gate = tmp_path / "gate"
    gate.write_text("*")
    http_port = free_port()
    env = app_env(
        tmp_path, broker.port,
        SEQAPP_HOLD=str(gate), SEQAPP_DELAY="0.005", MAX_INFLIGHT="20",
        WORKER_AUTO_SCALE="true", WORKER_MIN_COUNT="1", WORKER_MAX_COUNT="3",
        WORKER_SCALE_UP_AT="0.8", WORKER_SCALE_DOWN_AT="0.4",
        WORKER_SCALE_UP_WINDOW="0.5", WORKER_SCALE_DOWN_WINDOW="1", WORKER_SCALE_COOLDOWN="1",
        WORKER_HEARTBEAT_TIMEOUT="2", HTTP_PORT=str(http_port), **extra,
    )
    app = harness(env, "--workers", "1")
    app.wait_ready(1)
    publisher = Publisher(broker.port)
    status = f"http://127.0.0.1:{http_port}/status.json"

    started = time.monotonic()
    burst = publish_until(publisher, 0, lambda: any(b == 3 for _, b in decisions(app)),
                          "the pool grew to WORKER_MAX_COUNT=3", batch=20, pause=0.1)
    grown = time.monotonic() - started
    assert all(a < b for a, b in decisions(app)), decisions(app)
    app.wait_ready(3)
    # w2 joined last: give it more than MAX_INFLIGHT messages (the broker deals the group round robin).
    more = range(burst.stop, burst.stop + 150)
    publisher.publish(more)
    wait_for(lambda: inflight(status, "w2") >= 20, "w2 to hold MAX_INFLIGHT=20 messages at the gate")

    gate.write_text("w2")
    stopping = app.wait_log(r"\[w2\] core\.runtime: stopping: (\d+) handler\(s\) in flight")
    assert decisions(app)[-1] == (3, 2)
    assert int(stopping.group(1)) >= 20
    return Retiring(app, publisher, gate, http_port, range(0, more.stop), grown, stopping)


def test_workers_grow_under_a_burst_and_shrink_when_idle_losing_nothing(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    records = Records(tmp_path / "records.txt")
    r = grow_to_three_and_retire_w2(broker, harness, tmp_path)
    app, publisher, gate, http_port, grown, stopping = r.app, r.publisher, r.gate, r.http_port, r.grown, r.stopping
    status = f"http://127.0.0.1:{http_port}/status.json"
    gate.unlink()
    opened = time.monotonic()
    parked = app.wait_log(r"ended the session of seqapp-w2 after handling (\d+) parked message")
    assert int(parked.group(1)) > 0  # what the broker had queued for w2 beyond its in-flight window
    trickle = publish_until(publisher, r.burst.stop, lambda: decisions(app)[-1][1] == 1,
                            "the pool shrank to WORKER_MIN_COUNT=1", batch=2, pause=0.1)
    shrunk = time.monotonic() - opened
    expected = range(0, trickle.stop)
    seqs = records.wait_handled(expected, timeout=60)
    publisher.close()

    lost, duplicates = report(f"autoscaling: burst {len(r.burst)}, trickle {len(trickle)}", seqs, expected)
    print(f"grew 1 -> 3 in {grown:.1f} s of burst; w2 retired with {stopping.group(1)} in flight and "
          f"{parked.group(1)} parked; 2 -> 1 {shrunk:.1f} s after the gate opened; decisions {decisions(app)}")
    assert lost == 0
    ups = [d for d in decisions(app) if d[1] > d[0]]
    downs = [d for d in decisions(app) if d[1] < d[0]]
    assert downs == [(3, 2), (2, 1)]
    by_worker = records.by_worker()
    assert by_worker["w1"] > 0 and by_worker["w2"] > 0 and by_worker["w2-retired"] > 0, by_worker
    for worker in ("w1", "w2"):
        app.wait_log(rf"ended the session of seqapp-{worker}\b")
        app.wait_log(rf"worker {worker} \(pid \d+\) retired")
        assert not session_present(broker.port, f"seqapp-{worker}")

    metrics = scrape(f"http://127.0.0.1:{http_port}")
    assert metric(metrics, "mqtt_app_autoscale_decisions_total", direction="up") == len(ups)
    assert metric(metrics, "mqtt_app_autoscale_decisions_total", direction="down") == len(downs)
    assert metric(metrics, "mqtt_app_autoscale_workers") == 1
    events = [e["text"] for e in json.loads(http_get(status)[1])["events"] if e["kind"] == "autoscale"]
    assert sum("worker(s): utilization" in text for text in events) == len(decisions(app)), events
    assert sum("retired" in text for text in events) == 2, events
    # The route's total keeps what the retired workers handled, their drains included.
    handled_lines = len(records.lines())
    wait_for(lambda: metric(scrape(f"http://127.0.0.1:{http_port}"), "mqtt_app_route_messages_handled_total",
                            route="seq/in") == handled_lines, f"the route's handled total to reach {handled_lines}")

    app.signal(signal.SIGTERM)
    assert app.wait() == 0, app.log()[-3000:]
    assert "all workers stopped cleanly" in app.log()


def inflight(status_url: str, worker_id: str) -> int:
    code, body = http_get(status_url)
    if code != 200:
        return 0
    return next((p["inflight"] for p in json.loads(body)["processes"] if p["id"] == worker_id), 0)


def test_a_stop_during_a_retirement_keeps_the_session_for_the_next_start(
    broker: MosquittoServer, harness: Any, tmp_path: Path
) -> None:
    """SIGTERM while w2 is retiring (its handlers held at the gate): w2 finishes them but keeps its
    session, with what the broker had queued in it, and the next, smaller start drains it."""
    records = Records(tmp_path / "records.txt")
    r = grow_to_three_and_retire_w2(broker, harness, tmp_path)
    r.app.signal(signal.SIGTERM)
    r.app.wait_log(r"\[w2\] core\.worker: SIGTERM received; already stopping")
    r.gate.unlink()
    assert r.app.wait() == 0, r.app.log()[-3000:]
    assert "ended the session of seqapp-w2" not in r.app.log()

    again = harness(app_env(tmp_path, broker.port), "--workers", "1", name="again")
    parked = again.wait_log(r"ended the session of seqapp-w2 after handling (\d+) parked message")
    assert int(parked.group(1)) > 0
    seqs = records.wait_handled(r.burst, timeout=60)
    r.publisher.close()
    lost, duplicates = report(f"stop during a retirement: {len(r.burst)}", seqs, r.burst)
    assert lost == 0
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
