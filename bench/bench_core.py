"""The framework against a raw paho subscriber, on one private Mosquitto, in the same run.

Run:  .venv/bin/python -m bench.bench_core [--count 20000] [--repeat 3]

Both subscribers run in this process and feed the same `Recorder` (bench/raw_clients.py):

- raw paho: paho-mqtt 2.x, MQTT 5, network loop thread, automatic acknowledgement;
- framework: a `core.runtime.Runtime` on its own event loop thread, one route, a trivial
  ``async def handle(payload)`` (the payload arrives JSON-decoded), acks after the handler.

Measurements, each the median of ``--repeat`` runs (the clients take turns within a run):

- QoS 1 drain: register a persistent session, go away, queue ``--count`` messages, reconnect;
  msgs/s from the first to the last message.
- QoS 0 live flood: ``--count`` messages from a publisher process as fast as it can; received/s
  and loss.
- Latency: ``--live-count`` messages at ``--rate`` msgs/s, QoS 1 and QoS 0; p50/p99 of
  publish-to-handler time.
- Own process: ``python main.py`` with ``ROUTERS_PACKAGE=bench.apps.trivial`` drains the same
  QoS 1 backlog; msgs/s and the process's RSS (idle once subscribed, and the peak while draining).

Mosquitto 2.0 sends at most ``max_inflight_messages`` (default 20) unacknowledged QoS 1 messages
to a client that announces no Receive Maximum (raw paho), but honours the Receive Maximum of an
MQTT 5 client (the framework's MAX_INFLIGHT, 100). The broker here runs with
``max_inflight_messages`` = ``--max-inflight`` so that both get the same window.
Target (reported, not asserted): framework >= 50% of raw paho at QoS 1 drain and QoS 0 flood.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import psutil

from bench.raw_clients import (
    Broker,
    Recorder,
    Subscriber,
    SubscriberFactory,
    drain_backlog,
    live_stream,
    paho_factory,
    publish_backlog,
)
from core.config import load_settings
from core.router import Router
from core.runtime import Runtime
from tests.support.servers import MOSQUITTO_BIN, MosquittoServer

MB = 1024 * 1024


# -- the framework as a Subscriber ---------------------------------------------------------------

class FrameworkSubscriber:
    """A framework Runtime with one route whose handler records each payload.

    register = start, wait until subscribed, stop (the persistent session stays with the broker);
    consume = start again (resuming the session) and run until the recorder has everything.
    """

    def __init__(self, broker: Broker, client_id: str, topic: str, qos: int, *, max_inflight: int = 100) -> None:
        self.broker, self.client_id, self.topic, self.qos = broker, client_id, topic, qos
        self.settings = load_settings({
            "MQTT_BROKER": broker.host,
            "MQTT_PORT": str(broker.port),
            "MQTT_CLIENT_ID": client_id,
            "MQTT_SESSION_EXPIRY": "300",
            "MAX_INFLIGHT": str(max_inflight),
            "LOG_LEVEL": "warning",
        })

    def _runtime(self, record: Callable[[Any], None]) -> Runtime:
        async def handle(payload: Any) -> None:
            record(payload)

        router = Router()
        router.on(self.topic, handle, qos=self.qos)
        return Runtime(self.settings, router.routes, client_id=self.client_id)

    def register(self) -> None:
        asyncio.run(self._register())

    async def _register(self) -> None:
        runtime = self._runtime(lambda payload: None)
        await runtime.start()
        try:
            if not await runtime.wait_ready(30):
                raise RuntimeError(f"{self.client_id}: not subscribed after 30 s")
        finally:
            await runtime.stop()

    def consume(self, recorder: Recorder, timeout: float) -> None:
        asyncio.run(self._consume(recorder, timeout))

    async def _consume(self, recorder: Recorder, timeout: float) -> None:
        runtime = self._runtime(recorder.record)
        await runtime.start()
        try:
            if not await runtime.wait_ready(60):
                raise RuntimeError(f"{self.client_id}: not subscribed after 60 s")
            recorder.ready.set()
            await asyncio.get_running_loop().run_in_executor(None, recorder.wait_finished, timeout)
        finally:
            await runtime.stop()


def framework_factory(max_inflight: int) -> SubscriberFactory:
    def make(broker: Broker, client_id: str, topic: str, qos: int) -> Subscriber:
        return FrameworkSubscriber(broker, client_id, topic, qos, max_inflight=max_inflight)
    return make


# -- the framework in its own process (python main.py) -------------------------------------------

class AppProcess:
    """`python main.py` serving bench/apps/trivial.py, stopped by PID with SIGTERM."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "main.py"], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.subscribed = threading.Event()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.ps = psutil.Process(self.proc.pid)

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if "subscribed to" in line:
                self.subscribed.set()

    def rss(self) -> int:
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def fail(self, what: str) -> RuntimeError:
        self.stop()
        return RuntimeError(f"python main.py: {what}; its log:\n{''.join(self.log[-40:])}")


@dataclass
class ProcessRun:
    rate: float
    unique: int
    rss_idle: int
    rss_peak: int
    exit_code: int


def drain_in_own_process(broker: Broker, n: int, *, payload_size: int, max_inflight: int,
                         timeout: float = 300) -> ProcessRun:
    """QoS 1 drain of `n` queued messages by `python main.py`, sampling its RSS meanwhile."""
    tag = uuid.uuid4().hex[:8]
    out = Path(tempfile.gettempdir()) / f"bench-core-{tag}.json"
    env = {
        **os.environ,
        "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": f"bench-proc-{tag}",
        "MQTT_SESSION_EXPIRY": "300", "MAX_INFLIGHT": str(max_inflight), "LOG_LEVEL": "INFO",
        "ROUTERS_PACKAGE": "bench.apps.trivial", "BENCH_TOPIC": f"bench/proc-{tag}", "BENCH_QOS": "1",
        "BENCH_EXPECTED": str(n), "BENCH_OUT": str(out), "PYTHONUNBUFFERED": "1",
    }
    app = AppProcess(env)
    if not app.subscribed.wait(60):
        raise app.fail("not subscribed after 60 s")
    time.sleep(0.5)  # let start-up garbage settle before reading the idle RSS
    rss_idle = app.rss()
    if app.stop() != 0:
        raise RuntimeError(f"python main.py exited with {app.proc.returncode}:\n{''.join(app.log[-40:])}")

    publish_backlog(broker, env["BENCH_TOPIC"], n, qos=1, payload_size=payload_size)
    app = AppProcess(env)
    peak = 0
    deadline = time.monotonic() + timeout
    try:
        while not out.exists():
            peak = max(peak, app.rss())
            if app.proc.poll() is not None:
                raise app.fail(f"exited with {app.proc.returncode} before draining")
            if time.monotonic() > deadline:
                raise app.fail(f"did not drain {n} messages in {timeout} s")
            time.sleep(0.02)
        peak = max(peak, app.rss())
        result = json.loads(out.read_text())
    finally:
        code = app.stop()
        out.unlink(missing_ok=True)
    span = result["last"] - result["first"]
    rate = (result["unique"] - 1) / span if span > 0 else 0.0
    return ProcessRun(rate, result["unique"], rss_idle, max(peak, result["rss"]), code)


# -- one run ---------------------------------------------------------------------------------------

@dataclass
class ClientRun:
    drain_rate: float
    drain_lost: int
    drain_dup: int
    flood_rate: float
    flood_lost: int
    q1_p50: float
    q1_p99: float
    q1_lost: int
    q0_p50: float
    q0_p99: float
    q0_lost: int


def measure_client(broker: Broker, factory: SubscriberFactory, args: argparse.Namespace) -> ClientRun:
    size = args.payload_size
    drain = drain_backlog(broker, factory, args.count, qos=1, payload_size=size)
    flood = live_stream(broker, factory, args.count, qos=0, rate=None, payload_size=size, idle=3)
    lat1 = live_stream(broker, factory, args.live_count, qos=1, rate=args.rate, payload_size=size)
    lat0 = live_stream(broker, factory, args.live_count, qos=0, rate=args.rate, payload_size=size, idle=3)
    return ClientRun(
        drain.rate, drain.lost, drain.duplicates, flood.rate, flood.lost,
        lat1.percentile_ms(50), lat1.percentile_ms(99), lat1.lost,
        lat0.percentile_ms(50), lat0.percentile_ms(99), lat0.lost,
    )


def _describe(name: str, r: ClientRun) -> str:
    return (
        f"  {name}: qos1 drain {r.drain_rate:,.0f}/s (lost {r.drain_lost}, dup {r.drain_dup}); "
        f"qos0 flood {r.flood_rate:,.0f}/s lost {r.flood_lost}; latency qos1 p50 {r.q1_p50:.2f} "
        f"p99 {r.q1_p99:.2f} ms, qos0 p50 {r.q0_p50:.2f} p99 {r.q0_p99:.2f} ms"
    )


@dataclass
class Runs:
    raw: list[ClientRun] = field(default_factory=list)
    framework: list[ClientRun] = field(default_factory=list)
    process: list[ProcessRun] = field(default_factory=list)


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(runs: Runs) -> str:
    """Markdown: one row per measurement, medians, and framework / raw computed per run."""
    def row(label: str, get: Callable[[ClientRun], float], fmt: str, ratio: bool = True) -> str:
        raw = [get(r) for r in runs.raw]
        fw = [get(r) for r in runs.framework]
        # The ratio of each run's pair, then the median: both clients saw that run's machine load.
        ratios = [f / r for f, r in zip(fw, raw) if r]
        text = f"{_med(ratios):.2f}" if ratio and ratios else "—"
        return f"| {label} | {format(_med(raw), fmt)} | {format(_med(fw), fmt)} | {text} |"

    lines = [
        "| measurement | raw paho | framework | framework / raw |",
        "|---|---:|---:|---:|",
        row("QoS 1 drain, msgs/s", lambda r: r.drain_rate, ",.0f"),
        row("QoS 0 live flood, received msgs/s", lambda r: r.flood_rate, ",.0f"),
        "| QoS 0 live flood, lost (worst run) | "
        f"{max((r.flood_lost for r in runs.raw), default=0):,} | "
        f"{max((r.flood_lost for r in runs.framework), default=0):,} | — |",
        row("QoS 1 latency p50, ms", lambda r: r.q1_p50, ".2f"),
        row("QoS 1 latency p99, ms", lambda r: r.q1_p99, ".2f"),
        row("QoS 0 latency p50, ms", lambda r: r.q0_p50, ".2f"),
        row("QoS 0 latency p99, ms", lambda r: r.q0_p99, ".2f"),
    ]
    if runs.process:
        rates = [p.rate for p in runs.process]
        ratios = [p.rate / r.drain_rate for p, r in zip(runs.process, runs.raw) if r.drain_rate]
        lines += [
            f"| `python main.py` (own process), QoS 1 drain, msgs/s | {_med([r.drain_rate for r in runs.raw]):,.0f} "
            f"| {_med(rates):,.0f} | {_med(ratios):.2f} |",
            f"| `python main.py` RSS idle (subscribed), MB | — | {_med([p.rss_idle / MB for p in runs.process]):.1f} | — |",
            f"| `python main.py` RSS peak while draining, MB | — | {_med([p.rss_peak / MB for p in runs.process]):.1f} | — |",
        ]
    return "\n".join(lines)


def _mosquitto_version() -> str:
    out = subprocess.run([MOSQUITTO_BIN, "-h"], capture_output=True, text=True)
    text = out.stdout or out.stderr
    return text.splitlines()[0] if text else "mosquitto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per drain/flood run")
    parser.add_argument("--live-count", type=int, default=3_000, help="messages per latency run")
    parser.add_argument("--rate", type=float, default=1_000, help="msgs/s of the latency stream")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-inflight", type=int, default=100,
                        help="broker max_inflight_messages and the framework's MAX_INFLIGHT")
    parser.add_argument("--no-process", action="store_true", help="skip the `python main.py` run")
    args = parser.parse_args(argv)

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())  # 1/5/15 min: how shared the machine was
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    clients = {"raw paho": paho_factory(protocol=5), "framework": framework_factory(args.max_inflight)}
    runs = Runs()
    max_queued = max(100_000, 2 * args.count)
    with MosquittoServer(max_queued=max_queued, max_inflight=args.max_inflight) as broker:
        try:
            for rep in range(args.repeat):
                log(f"repeat {rep + 1}/{args.repeat}")
                # Alternate who goes first, so a drift in the machine's load favours neither.
                order = list(clients) if rep % 2 == 0 else list(reversed(clients))
                for name in order:
                    result = measure_client(broker, clients[name], args)
                    log(_describe(name, result))
                    (runs.raw if name == "raw paho" else runs.framework).append(result)
                if not args.no_process:
                    proc = drain_in_own_process(broker, args.count, payload_size=args.payload_size,
                                                max_inflight=args.max_inflight)
                    log(f"  python main.py: qos1 drain {proc.rate:,.0f}/s ({proc.unique} unique), RSS idle "
                        f"{proc.rss_idle / MB:.1f} MB, peak {proc.rss_peak / MB:.1f} MB, exit {proc.exit_code}")
                    runs.process.append(proc)
        finally:
            broker.cleanup()

    lost = sum(r.drain_lost + r.q1_lost for r in runs.raw + runs.framework)
    print(
        f"Framework vs raw paho on a private {_mosquitto_version()} (max_inflight_messages "
        f"{args.max_inflight}, max_queued_messages {max_queued:,}, otherwise defaults), MQTT 5, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, paho-mqtt {version('paho-mqtt')}; "
        f"framework MAX_INFLIGHT {args.max_inflight}, trivial async handler; median of {args.repeat} "
        f"(ratios: median of each run's ratio); load average at start {load}.\n"
        f"QoS 1 drain of a {args.count:,}-message backlog (first to last message); QoS 0 flood of "
        f"{args.count:,} from another process; latency: {args.live_count:,} messages at {args.rate:,.0f} msgs/s, "
        f"publish to handler; payload {args.payload_size} B. QoS 1 messages lost: {lost}.\n"
    )
    print(format_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
