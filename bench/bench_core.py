"""`python main.py` against lean raw paho subscribers, each in its own process, on one private Mosquitto.

Run:  .venv/bin/python -m bench.bench_core [--count 20000] [--repeat 5]

Contenders (each a process of its own, started per measurement, stopped by PID):

- raw paho 3.1.1 / raw paho 5: `bench/lean_paho.py`, paho-mqtt's own `loop_forever`, automatic
  acknowledgement, one `json.loads` per message into the shared tally and nothing else;
- framework: `python main.py` with `ROUTERS_PACKAGE=bench.apps.trivial` (one route, a trivial
  ``async def handle(payload)``, the payload arriving JSON-decoded), on its default MQTT 5,
  acknowledging after the handler.

Both feed the same `bench.apps.tally.Tally`, which writes a JSON result file.

Measurements, each the median of ``--repeat`` runs; within a run the contenders take turns per
measurement, in an order that rotates between runs:

- QoS 1 drain: register a persistent session, go away, queue ``--count`` messages, come back;
  msgs/s from the first to the last message (RSS: the peak while draining).
- QoS 0 live flood: ``--count`` messages from a publisher process as fast as it can; received/s
  and loss.
- Latency: ``--live-count`` messages at ``--rate`` msgs/s, QoS 1 and QoS 0; p50/p99 of
  publish-to-handler time (RSS idle: once subscribed, before the stream).

Mosquitto 2.0 sends at most ``max_inflight_messages`` (default 20) unacknowledged QoS 1 messages
to a client that announces no Receive Maximum (paho on 3.1.1 and paho 5 without the property),
but honours the Receive Maximum of the framework (its MAX_INFLIGHT, 100). The broker here runs
with ``max_inflight_messages`` = ``--max-inflight`` so that everyone gets the same window.
Targets (reported, not asserted): framework >= 0.8 of raw paho 3.1.1 at the QoS 1 drain and the
QoS 0 flood, QoS 1/0 p99 latency <= 1.5x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import psutil

from bench.raw_clients import Broker, publish_backlog
from tests.support.servers import MOSQUITTO_BIN, MosquittoServer

MB = 1024 * 1024
CONTENDERS = ("raw paho 3.1.1", "raw paho 5", "framework")
RAW = CONTENDERS[:2]


class SubscriberProcess:
    """One subscriber process (lean paho or `python main.py`), its log, RSS and result file."""

    def __init__(self, command: list[str], env: dict[str, str], out: Path | None) -> None:
        self.out = out
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.subscribed = threading.Event()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.ps = psutil.Process(self.proc.pid)

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.log) < 200:
                self.log.append(line)
            if "subscribed" in line:
                self.subscribed.set()

    def rss(self) -> int:
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def result(self) -> dict | None:
        try:
            return json.loads(self.out.read_text()) if self.out is not None else None
        except (FileNotFoundError, ValueError):
            return None

    def snapshot(self, timeout: float = 10) -> dict | None:
        """Ask the process (SIGUSR1) to write what it has so far; the result file then."""
        assert self.out is not None
        self.out.unlink(missing_ok=True)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while (result := self.result()) is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        return result

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"still running after {timeout} s") from None

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        if self.out is not None:
            self.out.unlink(missing_ok=True)
        return self.proc.returncode

    def fail(self, what: str) -> RuntimeError:
        self.stop()
        return RuntimeError(f"{self.proc.args}: {what}; its log:\n{''.join(self.log[-40:])}")


@dataclass
class Contender:
    """How to start one contender's subscriber for a client id, topic and QoS."""

    name: str
    broker: Broker
    max_inflight: int

    def start(self, client_id: str, topic: str, qos: int, expected: int = 0, out: Path | None = None,
              *, register: bool = False) -> SubscriberProcess:
        if self.name == "framework":
            env = {
                **os.environ, "MQTT_BROKER": self.broker.host, "MQTT_PORT": str(self.broker.port),
                "MQTT_CLIENT_ID": client_id, "MQTT_SESSION_EXPIRY": "300", "MAX_INFLIGHT": str(self.max_inflight),
                "LOG_LEVEL": "INFO", "ROUTERS_PACKAGE": "bench.apps.trivial", "BENCH_TOPIC": topic,
                "BENCH_QOS": str(qos), "BENCH_EXPECTED": str(expected), "BENCH_OUT": str(out or ""),
                "PYTHONUNBUFFERED": "1",
            }
            return SubscriberProcess([sys.executable, "main.py"], env, out)
        protocol = "4" if self.name.endswith("3.1.1") else "5"
        command = [sys.executable, "-m", "bench.lean_paho", "register" if register else "consume", self.broker.host,
                   str(self.broker.port), client_id, topic, str(qos), protocol]
        if not register:
            command += [str(expected), str(out)]
        return SubscriberProcess(command, dict(os.environ), out)

    def register(self, client_id: str, topic: str, qos: int) -> None:
        """A persistent session subscribed to `topic`, left for the broker to queue into."""
        sub = self.start(client_id, topic, qos, register=True)
        if not sub.subscribed.wait(60):
            raise sub.fail("not subscribed after 60 s")
        if self.name == "framework":
            if sub.stop() != 0:
                raise sub.fail(f"exited with {sub.proc.returncode}")
        elif sub.wait(30) != 0:
            raise sub.fail(f"register exited with {sub.proc.returncode}")


@dataclass
class Outcome:
    rate: float
    lost: int
    p50: float
    p99: float
    rss: int


def _outcome(result: dict, expected: int, rss: int) -> Outcome:
    span = result["last"] - result["first"]
    rate = (result["unique"] - 1) / span if result["unique"] > 1 and span > 0 else 0.0
    lat = sorted(result["latencies"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, round(p / 100 * len(lat)) - 1))] * 1000 if lat else float("nan")

    return Outcome(rate, expected - result["unique"], pct(50), pct(99), rss)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def drain(contender: Contender, n: int, payload_size: int, timeout: float = 120) -> Outcome:
    """QoS 1 drain of `n` messages queued for an offline session; RSS is the peak while draining."""
    tag = _tag()
    client_id, topic, out = f"bench-drain-{tag}", f"bench/drain-{tag}", Path(tempfile.gettempdir()) / f"bench-{tag}.json"
    contender.register(client_id, topic, 1)
    publish_backlog(contender.broker, topic, n, qos=1, payload_size=payload_size)
    sub = contender.start(client_id, topic, 1, n, out)
    peak = 0
    deadline = time.monotonic() + timeout
    try:
        while (result := sub.result()) is None:
            peak = max(peak, sub.rss())
            if sub.proc.poll() is not None:
                raise sub.fail(f"exited with {sub.proc.returncode} before draining")
            if time.monotonic() > deadline:
                raise sub.fail(f"did not drain {n} messages in {timeout} s")
            time.sleep(0.02)
    finally:
        sub.stop()
    return _outcome(result, n, max(peak, result["rss"]))


def live(contender: Contender, n: int, qos: int, rate: float | None, payload_size: int, idle: float = 3.0,
         timeout: float = 300) -> Outcome:
    """`n` messages from a publisher process while the contender is connected; RSS idle once subscribed."""
    tag = _tag()
    client_id, topic, out = f"bench-live-{tag}", f"bench/live-{tag}", Path(tempfile.gettempdir()) / f"bench-{tag}.json"
    contender.register(client_id, topic, qos)
    sub = contender.start(client_id, topic, qos, n, out)
    try:
        if not sub.subscribed.wait(60):
            raise sub.fail("not subscribed after 60 s")
        time.sleep(0.5)  # let start-up garbage settle before reading the idle RSS
        rss_idle = sub.rss()
        cmd = [sys.executable, "-m", "bench.raw_clients", "_publish", contender.broker.host, str(contender.broker.port),
               topic, str(n), str(qos), str(rate or 0), str(payload_size), str(timeout)]
        publisher = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout + 30, capture_output=True, text=True)
        if publisher.returncode != 0:
            raise sub.fail(f"publisher exited with {publisher.returncode}: {publisher.stderr[-2000:]}")
        # Wait for everything, or until nothing more arrived for `idle` seconds (QoS 0 may lose some).
        last_count, last_change = -1, time.monotonic()
        while True:
            result = sub.result()
            if result is not None and result["complete"]:
                break
            time.sleep(0.25)
            result = sub.snapshot()
            if result is None:
                raise sub.fail("wrote no result")
            if result["complete"]:
                break
            if result["unique"] != last_count:
                last_count, last_change = result["unique"], time.monotonic()
            elif time.monotonic() - last_change > idle:
                break
    finally:
        sub.stop()
    return _outcome(result, n, rss_idle)


@dataclass
class Run:
    drain: Outcome
    flood: Outcome
    lat1: Outcome
    lat0: Outcome


@dataclass
class Runs:
    by_contender: dict[str, list[Run]] = field(default_factory=lambda: {name: [] for name in CONTENDERS})


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(runs: Runs) -> str:
    """Markdown: one row per measurement, medians, and framework / raw computed per run."""
    data = runs.by_contender

    def row(label: str, get: Callable[[Run], float], fmt: str, ratio: bool = True) -> str:
        cells = [format(_med([get(r) for r in data[name]]), fmt) for name in CONTENDERS]
        for raw in RAW:
            # The ratio of each run's pair, then the median: both saw that run's machine load.
            ratios = [get(f) / get(r) for f, r in zip(data["framework"], data[raw]) if get(r)]
            cells.append(f"{_med(ratios):.2f}" if ratio and ratios else "—")
        return f"| {label} | " + " | ".join(cells) + " |"

    def worst(label: str, get: Callable[[Run], int]) -> str:
        return f"| {label} | " + " | ".join(f"{max((get(r) for r in data[n]), default=0):,}" for n in CONTENDERS) + " | — | — |"

    return "\n".join([
        "| measurement | " + " | ".join(CONTENDERS) + " | framework / raw 3.1.1 | framework / raw 5 |",
        "|---|" + "---:|" * (len(CONTENDERS) + 2),
        row("QoS 1 drain, msgs/s", lambda r: r.drain.rate, ",.0f"),
        worst("QoS 1 drain, lost (worst run)", lambda r: r.drain.lost),
        row("QoS 0 live flood, received msgs/s", lambda r: r.flood.rate, ",.0f"),
        worst("QoS 0 live flood, lost (worst run)", lambda r: r.flood.lost),
        row("QoS 1 latency p50, ms", lambda r: r.lat1.p50, ".2f"),
        row("QoS 1 latency p99, ms", lambda r: r.lat1.p99, ".2f"),
        row("QoS 0 latency p50, ms", lambda r: r.lat0.p50, ".2f"),
        row("QoS 0 latency p99, ms", lambda r: r.lat0.p99, ".2f"),
        row("RSS idle (subscribed), MB", lambda r: r.lat1.rss / MB, ".1f"),
        row("RSS peak while draining, MB", lambda r: r.drain.rss / MB, ".1f"),
    ])


def _mosquitto_version() -> str:
    out = subprocess.run([MOSQUITTO_BIN, "-h"], capture_output=True, text=True)
    text = out.stdout or out.stderr
    return text.splitlines()[0] if text else "mosquitto"


def _describe(name: str, r: Run) -> str:
    return (f"  {name}: qos1 drain {r.drain.rate:,.0f}/s (lost {r.drain.lost}, RSS peak {r.drain.rss / MB:.1f} MB); "
            f"qos0 flood {r.flood.rate:,.0f}/s lost {r.flood.lost}; latency qos1 p50 {r.lat1.p50:.2f} p99 "
            f"{r.lat1.p99:.2f} ms, qos0 p50 {r.lat0.p50:.2f} p99 {r.lat0.p99:.2f} ms; RSS idle {r.lat1.rss / MB:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per drain/flood run")
    parser.add_argument("--live-count", type=int, default=3_000, help="messages per latency run")
    parser.add_argument("--rate", type=float, default=1_000, help="msgs/s of the latency stream")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-inflight", type=int, default=100,
                        help="broker max_inflight_messages and the framework's MAX_INFLIGHT")
    parser.add_argument("--only", default="drain,flood,lat1,lat0", help="measurements to run (others print nan)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())  # 1/5/15 min: how shared the machine was

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    nothing = Outcome(float("nan"), 0, float("nan"), float("nan"), 0)
    runs = Runs()
    max_queued = max(100_000, 2 * args.count)
    size = args.payload_size
    with MosquittoServer(max_queued=max_queued, max_inflight=args.max_inflight) as broker:
        contenders = {name: Contender(name, broker, args.max_inflight) for name in CONTENDERS}
        measurements: dict[str, Callable[[Contender], Outcome]] = {
            "drain": lambda c: drain(c, args.count, size),
            "flood": lambda c: live(c, args.count, 0, None, size),
            "lat1": lambda c: live(c, args.live_count, 1, args.rate, size),
            "lat0": lambda c: live(c, args.live_count, 0, args.rate, size),
        }
        try:
            for rep in range(args.repeat):
                log(f"repeat {rep + 1}/{args.repeat} (load average {os.getloadavg()[0]:.2f})")
                # Rotate who goes first, so a drift in the machine's load favours no one.
                order = [CONTENDERS[(rep + i) % len(CONTENDERS)] for i in range(len(CONTENDERS))]
                got: dict[str, dict[str, Outcome]] = {name: {} for name in CONTENDERS}
                for key, measure in measurements.items():
                    for name in order:
                        got[name][key] = measure(contenders[name]) if key in only else nothing
                for name in CONTENDERS:
                    run = Run(**got[name])
                    runs.by_contender[name].append(run)
                    log(_describe(name, run))
        finally:
            broker.cleanup()

    lost = sum(r.drain.lost + r.lat1.lost for rs in runs.by_contender.values() for r in rs)
    print(
        f"`python main.py` (MQTT 5) vs lean raw paho subscribers, each in its own process, on a private "
        f"{_mosquitto_version()} (max_inflight_messages {args.max_inflight}, max_queued_messages {max_queued:,}), "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, paho-mqtt {version('paho-mqtt')}; framework "
        f"MAX_INFLIGHT {args.max_inflight}, trivial async handler; median of {args.repeat} (ratios: median of "
        f"each run's ratio); load average at start {load}.\n"
        f"QoS 1 drain of a {args.count:,}-message backlog (first to last message); QoS 0 flood of "
        f"{args.count:,} from another process; latency: {args.live_count:,} messages at {args.rate:,.0f} msgs/s, "
        f"publish to handler; payload {args.payload_size} B. QoS 1 messages lost: {lost}.\n"
    )
    print(format_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
