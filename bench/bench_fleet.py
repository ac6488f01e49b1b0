"""A fleet losing pods: how long parked messages wait for adoption, and what a rolling update costs.

Run:  .venv/bin/python -m bench.bench_fleet [--repeat 5] [--grace 15] [--only scale-down,sigkill,restart,rolling]

Pods are `python main.py --workers 2` processes (distinct MQTT_CLIENT_ID, one MQTT_GROUP_NAME) on
a private Mosquitto, serving one shared QoS 1 route (bench/apps/fleet.py) that records the worker,
sequence number and time of every message it handles. Default settings except the grace, which
is MQTT_ORPHAN_GRACE's default (15 s) unless ``--grace`` says otherwise. Per run:

- **scale-down (SIGTERM)** and **pod SIGKILLed**: two pods, a steady stream at ``--rate``; one
  pod is stopped for good (SIGTERM, or SIGKILL of all its processes). The time from the signal to
  the last message handled by an adoption (`adopted` in the record) is how long a parked message
  waited at most; the stream goes on past it, and every message must be handled.
- **whole fleet restarted**: both pods stop; once the grace has passed (the notices were
  published with nobody listening: only their retained copies remain) two pods with new names
  start, and find them by sweeping. The wait is from their launch to the last adopted message.
- **rolling update**: two pods, ``--count`` messages at ``--rate``; each pod in turn gets SIGTERM
  and a pod with a new name replaces it. Duplicates (messages handled more than once) and lost
  ones, scaled to 10,000 messages.

The table shows the p50 and max over ``--repeat`` runs of the wait, and the median duplicates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.servers import MosquittoServer

SCENARIOS = ("scale-down", "sigkill", "restart", "rolling")
_READY = re.compile(r"all \d+ worker\(s\) subscribed")
_WORKER_PID = re.compile(r"started worker w\d+ \(pid (\d+)")


class Pod:
    """`python main.py --workers 2` with MQTT_CLIENT_ID=name; output to a file."""

    def __init__(self, name: str, env: dict[str, str], directory: Path) -> None:
        self.name = name
        self.log_path = directory / f"{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "main.py", "--workers", "2", "--env-file", "/nonexistent"],
                                         cwd=REPO_ROOT, env={**env, "MQTT_CLIENT_ID": name}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        _until(lambda: _READY.search(self.log()) is not None, f"{self.name} ready", timeout)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def kill_all(self) -> None:
        """SIGKILL the workers and the supervisor (a node loss)."""
        for pid in (int(p) for p in _WORKER_PID.findall(self.log())):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()


def _until(condition, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Stream:
    """QoS 1 messages `0..count-1` at `rate` per second, from a thread."""

    def __init__(self, port: int, topic: str, count: int, rate: float) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.topic, self.count, self.rate = topic, count, rate
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        infos = []
        for seq in range(self.count):
            infos.append(self.client.publish(self.topic, str(seq), qos=1))
            if seq % 20 == 19:
                ahead = (seq + 1) / self.rate - (time.monotonic() - self.started)
                if ahead > 0:
                    time.sleep(ahead)
        for info in infos:
            info.wait_for_publish(60)

    def at(self, seconds: float) -> None:
        time.sleep(max(0.0, self.started + seconds - time.monotonic()))

    def finish(self) -> None:
        self.thread.join(600)
        self.client.loop_stop()
        self.client.disconnect()


def _records(path: Path) -> list[tuple[str, int, float]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


@dataclass
class Outcome:
    wait: float | None  # seconds from the pod going away to the last adopted message handled
    lost: int
    duplicates: int
    count: int


class Run:
    """One scenario on its own broker, app group and record file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{self.tag}-"))
        self.broker = MosquittoServer(max_queued=1_000_000)
        self.broker.start()
        self.record = self.dir / "records.txt"
        self.topic = f"bench/fleet-{self.tag}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "WORKER_"))},
            "MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(self.broker.port), "MQTT_GROUP_NAME": f"fleet{self.tag}",
            "MQTT_ORPHAN_GRACE": str(args.grace), "ROUTERS_PACKAGE": "bench.apps.fleet", "LOG_LEVEL": "INFO",
            "BENCH_FLEET_TOPIC": self.topic, "BENCH_FLEET_RECORD": str(self.record), "STATS_INTERVAL": "600",
            "PYTHONUNBUFFERED": "1",
        }
        self.pods: list[Pod] = []

    def pod(self, name: str) -> Pod:
        pod = Pod(f"{name}-{self.tag}", self.env, self.dir)
        self.pods.append(pod)
        return pod

    def two_pods(self) -> tuple[Pod, Pod]:
        a, b = self.pod("a"), self.pod("b")
        a.wait_ready()
        b.wait_ready()
        return a, b

    def waited_since(self, since: float, count: int) -> Outcome:
        """Settle; the wait is from `since` to the last message an adoption handled."""
        outcome = self.settle(count, timeout=self.args.grace + 60)
        adopted = [t for worker, _, t in _records(self.record) if worker == "adopted"]
        outcome.wait = max(adopted) - since if adopted else None
        return outcome

    def settle(self, count: int, timeout: float) -> Outcome:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len({seq for _, seq, _ in _records(self.record)}) >= count:
                break
            time.sleep(0.2)
        seqs = Counter(seq for _, seq, _ in _records(self.record))
        lost = count - len(set(seqs) & set(range(count)))
        return Outcome(None, lost, sum(n - 1 for n in seqs.values() if n > 1), count)

    def close(self) -> None:
        for pod in self.pods:
            try:
                pod.stop()
            except Exception:  # noqa: BLE001 - a benchmark cleans up as far as it can
                pod.proc.kill()
        self.broker.stop()
        self.broker.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def pod_goes_away(args: argparse.Namespace, kill: bool) -> Outcome:
    run = Run(args)
    try:
        a, b = run.two_pods()
        duration = 3.0 + (args.tail if args.tail is not None else args.grace + 22.0)  # outlasts the adoption
        count = int(duration * args.rate)
        stream = Stream(run.broker.port, run.topic, count, args.rate)
        stream.at(3)
        gone = time.time()
        if kill:
            b.kill_all()
        else:
            b.terminate()
        stream.finish()
        return run.waited_since(gone, count)
    finally:
        run.close()


def fleet_restarted(args: argparse.Namespace) -> Outcome:
    """Both pods stop; after the grace (the notices fired with nobody listening, so only their
    retained copies remain) two pods with new names start. The wait is from the new pods' launch
    to the last adopted message: the sweep path."""
    run = Run(args)
    try:
        a, b = run.two_pods()
        duration = 3.0 + args.grace + 5.0 + (args.tail if args.tail is not None else 20.0)
        count = int(duration * args.rate)
        stream = Stream(run.broker.port, run.topic, count, args.rate)
        stream.at(3)
        a.terminate()
        b.terminate()
        stream.at(3 + args.grace + 5)
        launched = time.time()
        run.pod("c")
        run.pod("d")
        stream.finish()
        return run.waited_since(launched, count)
    finally:
        run.close()


def rolling_update(args: argparse.Namespace) -> Outcome:
    run = Run(args)
    try:
        a, b = run.two_pods()
        stream = Stream(run.broker.port, run.topic, args.count, args.rate)
        stream.at(3)
        a.terminate()
        run.pod("c").wait_ready()
        b.terminate()
        run.pod("d").wait_ready()
        stream.finish()
        return run.settle(args.count, timeout=args.grace + 60)
    finally:
        run.close()


def _fmt_wait(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grace", type=float, default=15.0, help="MQTT_ORPHAN_GRACE (default: its default)")
    parser.add_argument("--rate", type=float, default=200.0, help="msgs/s of the stream")
    parser.add_argument("--count", type=int, default=10_000, help="messages of the rolling update")
    parser.add_argument("--tail", type=float, default=None,
                        help="seconds the stream goes on after a pod went away (default: grace + 22)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)

    jobs = {
        "scale-down (SIGTERM)": lambda: pod_goes_away(args, kill=False),
        "pod SIGKILLed": lambda: pod_goes_away(args, kill=True),
        "whole fleet restarted, new names (from the new pods' launch)": lambda: fleet_restarted(args),
        "rolling update": lambda: rolling_update(args),
    }
    keys = dict(zip(SCENARIOS, jobs))
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in keys]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    jobs = {keys[name]: jobs[keys[name]] for name in wanted}
    results: dict[str, list[Outcome]] = {name: [] for name in jobs}
    for i in range(args.repeat):
        for name, job in jobs.items():
            outcome = job()
            results[name].append(outcome)
            wait = "—" if outcome.wait is None else f"{outcome.wait:.1f} s"
            print(f"run {i + 1}/{args.repeat} {name}: wait {wait}, {outcome.count} messages, {outcome.lost} lost, "
                  f"{outcome.duplicates} duplicates", file=sys.stderr, flush=True)

    print(f"Fleet of two `--workers 2` pods, MQTT_ORPHAN_GRACE={args.grace:g}, {args.rate:g} msgs/s, "
          f"{args.repeat} run(s), load average {os.getloadavg()[0]:.1f}\n")
    print("| scenario | owner gone → last parked message handled, p50 / max s | lost | duplicates per 10,000 |")
    print("|---|---:|---:|---:|")
    for name, outcomes in results.items():
        waits = [o.wait for o in outcomes if o.wait is not None]
        lost = sum(o.lost for o in outcomes)
        dups = statistics.median(o.duplicates * 10_000 / o.count for o in outcomes)
        print(f"| {name} | {_fmt_wait(waits) if name != 'rolling update' else '—'} | {lost} | {dups:.0f} |")
    return 0 if all(o.lost == 0 for outcomes in results.values() for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
