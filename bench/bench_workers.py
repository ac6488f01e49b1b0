"""Scaling a CPU-bound shared route over worker processes: `python main.py --workers N`.

Run:  .venv/bin/python -m bench.bench_workers [--workers 1,2] [--count 5000] [--repeat 3]

The app (bench/apps/cpu.py, selected with ROUTERS_PACKAGE) has one shared QoS 1 route whose
async handler does about 1 ms of pure-Python work (calibrated here first) and appends one line
per message to a file per process. Each run, on a private Mosquitto, for each worker count:

- start-up: time from launching `python main.py --workers N` to the supervisor's "all N
  worker(s) subscribed" log line (the supervisor's own figure, from its start, is shown too);
- throughput: a publisher process sends ``--count`` QoS 1 messages as fast as the broker takes
  them; msgs/s from the first to the last handled message, over all workers, and each worker's
  share;
- latency: ``--live-count`` messages at ``--rate`` msgs/s (below one worker's capacity);
  p50/p99 of publish-to-handled time;
- RSS of each worker process (psutil on the PIDs the supervisor logs), idle and peak.

Every run uses its own client ids, group name and topic, so no session of an earlier run takes a
share. The table shows medians over ``--repeat`` runs; the speed-up is the median of each run's
N-worker / 1-worker ratio. Targets (reported, not asserted): 2 workers >= 1.7x one worker,
RSS <= 40 MB per worker, start-up <= 2 s.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

import psutil

from bench.apps.cpu import busy_work
from bench.raw_clients import Broker
from tests.support.servers import MosquittoServer

MB = 1024 * 1024
_WORKER_READY = re.compile(r"worker (\S+) \(pid (\d+)\) subscribed")
_ALL_READY = re.compile(r"all (\d+) worker\(s\) subscribed, ([\d.]+) s after start")


def calibrate(target_ms: float = 1.0) -> int:
    """Iterations of `busy_work` that take about `target_ms` here (best of several tries)."""
    iters = 10_000
    best = min(_time(iters) for _ in range(20))
    return max(1, int(iters * target_ms / 1000 / best))


def _time(iters: int) -> float:
    start = time.perf_counter()
    busy_work(iters)
    return time.perf_counter() - start


# -- the app under test ----------------------------------------------------------------------------

class WorkersApp:
    """`python main.py --workers N` with the CPU app; its log is read as it comes."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = workers
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--workers", str(workers), "--env-file", os.devnull],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self.worker_pids: dict[str, int] = {}
        self.all_ready = threading.Event()
        self.ready_after = float("nan")  # seconds from launch to the "all subscribed" line
        self.supervisor_figure = float("nan")  # the supervisor's own "s after start"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.monotonic()
            self.log.append(line)
            m = _WORKER_READY.search(line)
            if m:
                self.worker_pids[m.group(1)] = int(m.group(2))
            m = _ALL_READY.search(line)
            if m and not self.all_ready.is_set():
                self.ready_after = now - self.launched
                self.supervisor_figure = float(m.group(2))
                self.all_ready.set()

    def rss(self) -> dict[str, int]:
        out = {}
        for wid, pid in self.worker_pids.items():
            try:
                out[wid] = int(psutil.Process(pid).memory_info().rss)
            except psutil.Error:
                pass
        return out

    def stop(self, timeout: float = 60) -> int:
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
        return RuntimeError(f"python main.py --workers {self.workers}: {what}; its log:\n{''.join(self.log[-40:])}")


class Tally:
    """Reads the per-process files the handlers append to: `job seq sent handled` per line."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._rest: dict[Path, bytes] = {}
        # job -> seq -> (sent, handled, pid of the first handling)
        self.jobs: dict[str, dict[int, tuple[float, float, int]]] = {}
        self.duplicates: dict[str, int] = {}

    def poll(self) -> None:
        for path in self.directory.glob("*.log"):
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = self._rest.get(path, b"") + f.read()
                self._offsets[path] = f.tell()
            lines = data.split(b"\n")
            self._rest[path] = lines.pop()  # an unfinished last line waits for the next poll
            pid = int(path.stem)
            for line in lines:
                job, seq, sent, handled = line.split()
                name = job.decode()
                seen = self.jobs.setdefault(name, {})
                if int(seq) in seen:
                    self.duplicates[name] = self.duplicates.get(name, 0) + 1
                else:
                    seen[int(seq)] = (float(sent), float(handled), pid)

    def count(self, job: str) -> int:
        return len(self.jobs.get(job, {}))


def _publish(broker: Broker, topic: str, n: int, rate: float | None, payload_size: int) -> subprocess.Popen[str]:
    """The raw_clients publisher in its own interpreter (QoS 1)."""
    cmd = [sys.executable, "-m", "bench.raw_clients", "_publish", broker.host, str(broker.port), topic,
           str(n), "1", str(rate or 0), str(payload_size), "120"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_handled(app: WorkersApp, tally: Tally, job: str, n: int, publisher: subprocess.Popen[str],
                  rss_peak: dict[str, int], timeout: float, idle: float = 10.0,
                  snapshot: Callable[[], _CpuSnapshot] | None = None) -> tuple[_CpuSnapshot, int, _CpuSnapshot] | None:
    """Poll until `n` messages of `job` were handled, tracking peak RSS.

    With `snapshot`, returns (snapshot at the first poll that saw messages handled, how many had
    been handled by then, snapshot at the end): CPU use measured while the workers were busy.
    """
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    first: tuple[_CpuSnapshot, int] | None = None
    while True:
        tally.poll()
        count = tally.count(job)
        if snapshot is not None and first is None and count > 0:
            first = (snapshot(), count)
        for wid, rss in app.rss().items():
            rss_peak[wid] = max(rss_peak.get(wid, 0), rss)
        now = time.monotonic()
        if count >= n:
            break
        if count != last_count:
            last_count, last_change = count, now
        if app.proc.poll() is not None:
            raise app.fail(f"exited with {app.proc.returncode} after {count} of {n} '{job}' messages")
        if now > deadline or (publisher.poll() is not None and now - last_change > idle):
            raise app.fail(f"only {count} of {n} '{job}' messages handled")
        time.sleep(0.05)
    end = snapshot() if snapshot is not None else None
    if publisher.wait(60) != 0:
        raise RuntimeError(f"publisher failed: {publisher.stderr.read() if publisher.stderr else ''}")
    if first is None or end is None:
        return None
    return first[0], first[1], end


@dataclass
class _CpuSnapshot:
    at: float
    workers: dict[int, float]  # pid -> user+system seconds
    broker: float
    machine_busy: float  # busy seconds summed over all CPUs
    machine_total: float


def _process_cpu(pid: int | None) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except (psutil.Error, ValueError):
        return 0.0


def _cpu_snapshot(app: WorkersApp, broker: MosquittoServer) -> _CpuSnapshot:
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return _CpuSnapshot(
        time.monotonic(), {pid: _process_cpu(pid) for pid in app.worker_pids.values()},
        _process_cpu(broker.pid), total - idle, total,
    )


def _cpu_use(before: _CpuSnapshot, after: _CpuSnapshot, handled: int) -> tuple[float, float, float, float]:
    """(mean CPU of one worker, worker CPU ms per message, broker CPU, share of the machine busy)."""
    wall = max(after.at - before.at, 1e-9)
    spent = [after.workers[pid] - before.workers.get(pid, 0.0) for pid in after.workers]
    busy = (after.machine_busy - before.machine_busy) / max(after.machine_total - before.machine_total, 1e-9)
    per_worker = statistics.mean(spent) / wall if spent else 0.0
    per_message = sum(spent) / handled * 1000 if handled > 0 else float("nan")
    return per_worker, per_message, (after.broker - before.broker) / wall, busy


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


@dataclass
class WorkersRun:
    workers: int
    rate: float
    shares: list[float]
    duplicates: int
    p50_ms: float
    p99_ms: float
    rss_idle: dict[str, int]
    rss_peak: dict[str, int]
    startup: float
    supervisor_startup: float
    exit_code: int
    worker_cpu: float  # mean CPU use of one worker process during the throughput run, 1.0 = one core
    cpu_ms_per_message: float  # CPU time of all workers per message handled
    broker_cpu: float
    machine_busy: float  # share of all CPUs busy (everyone's processes) during the throughput run


def run_once(broker: MosquittoServer, workers: int, args: argparse.Namespace, iters: int) -> WorkersRun:
    tag = uuid.uuid4().hex[:8]
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-workers-{tag}-"))
    env = {
        **os.environ,
        "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": f"bench-wk-{tag}",
        "MQTT_GROUP_NAME": f"bench{tag}", "MQTT_SESSION_EXPIRY": "60", "MAX_INFLIGHT": str(args.max_inflight),
        "LOG_LEVEL": "INFO", "ROUTERS_PACKAGE": "bench.apps.cpu", "BENCH_TOPIC": f"bench/cpu-{tag}/{{job}}",
        "BENCH_WORK_ITERS": str(iters), "BENCH_OUT_DIR": str(out_dir), "PYTHONUNBUFFERED": "1",
    }
    app = WorkersApp(workers, env)
    try:
        if not app.all_ready.wait(120):
            raise app.fail("workers not subscribed after 120 s")
        time.sleep(0.5)  # start-up garbage settles before the idle RSS is read
        rss_idle = app.rss()
        rss_peak = dict(rss_idle)
        tally = Tally(out_dir)

        flood = _publish(broker, f"bench/cpu-{tag}/flood", args.count, None, args.payload_size)
        window = _wait_handled(app, tally, "flood", args.count, flood, rss_peak, timeout=300,
                               snapshot=lambda: _cpu_snapshot(app, broker))
        if window is None:
            raise RuntimeError("no CPU snapshot was taken during the throughput run")
        worker_cpu, cpu_ms, broker_cpu, machine_busy = _cpu_use(window[0], window[2], args.count - window[1])
        handled = tally.jobs["flood"].values()
        first = min(h for _, h, _ in handled)
        last = max(h for _, h, _ in handled)
        rate = (len(handled) - 1) / (last - first) if last > first else 0.0
        per_pid: dict[int, int] = {}
        for _, _, pid in handled:
            per_pid[pid] = per_pid.get(pid, 0) + 1
        shares = sorted((c / len(handled) for c in per_pid.values()), reverse=True)

        live = _publish(broker, f"bench/cpu-{tag}/live", args.live_count, args.rate, args.payload_size)
        _wait_handled(app, tally, "live", args.live_count, live, rss_peak, timeout=300)
        latencies = [(h - s) * 1000 for s, h, _ in tally.jobs["live"].values()]
    except BaseException:
        app.stop()
        raise
    finally:
        code = app.stop() if app.proc.poll() is None else app.proc.returncode
        shutil.rmtree(out_dir, ignore_errors=True)
    return WorkersRun(
        workers, rate, shares, sum(tally.duplicates.values()), _percentile(latencies, 50), _percentile(latencies, 99),
        rss_idle, rss_peak, app.ready_after, app.supervisor_figure, code, worker_cpu, cpu_ms, broker_cpu, machine_busy,
    )


# -- report ----------------------------------------------------------------------------------------

@dataclass
class Runs:
    by_workers: dict[int, list[WorkersRun]] = field(default_factory=dict)


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(runs: Runs, counts: Sequence[int]) -> str:
    base = runs.by_workers[counts[0]]
    lines = [
        f"| workers | msgs/s | vs {counts[0]} worker{'s' if counts[0] > 1 else ''} | split | p50 ms | p99 ms "
        "| CPU per worker | worker CPU ms/msg | broker CPU | machine busy | RSS per worker idle / peak, MB | start-up s (supervisor's figure) | dup | exit |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for n in counts:
        rs = runs.by_workers[n]
        speedups = [r.rate / b.rate for r, b in zip(rs, base) if b.rate]
        split = " / ".join(f"{_med([r.shares[k] for r in rs if len(r.shares) > k]) * 100:.0f}%"
                           for k in range(max(len(r.shares) for r in rs)))
        # Per run the largest worker; the median of that over runs, and the largest ever seen.
        idle = [max(r.rss_idle.values(), default=0) / MB for r in rs]
        peak = [max(r.rss_peak.values(), default=0) / MB for r in rs]
        exits = ",".join(sorted({str(r.exit_code) for r in rs}))
        lines.append(
            f"| {n} | {_med([r.rate for r in rs]):,.0f} | {_med(speedups):.2f}× | {split} "
            f"| {_med([r.p50_ms for r in rs]):.1f} | {_med([r.p99_ms for r in rs]):.1f} "
            f"| {_med([r.worker_cpu for r in rs]) * 100:.0f}% "
            f"| {_med([r.cpu_ms_per_message for r in rs]):.2f} "
            f"| {_med([r.broker_cpu for r in rs]) * 100:.0f}% "
            f"| {_med([r.machine_busy for r in rs]) * 100:.0f}% "
            f"| {_med(idle):.1f} / {_med(peak):.1f} (max {max(idle):.1f} / {max(peak):.1f}) "
            f"| {_med([r.startup for r in rs]):.2f} ({_med([r.supervisor_startup for r in rs]):.2f}) "
            f"| {sum(r.duplicates for r in rs)} | {exits} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, the first is the baseline")
    parser.add_argument("--count", type=int, default=5_000, help="messages of the throughput run")
    parser.add_argument("--live-count", type=int, default=1_500, help="messages of the latency run")
    parser.add_argument("--rate", type=float, default=300, help="msgs/s of the latency run")
    parser.add_argument("--work-ms", type=float, default=1.0, help="CPU time of the handler per message")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--max-inflight", type=int, default=100, help="MAX_INFLIGHT and broker max_inflight_messages")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())  # 1/5/15 min: how shared the machine was
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    iters = calibrate(args.work_ms)
    log(f"busy_work: {iters} iterations ≈ {args.work_ms} ms")
    runs = Runs()
    with MosquittoServer(max_queued=max(100_000, 2 * args.count), max_inflight=args.max_inflight) as broker:
        try:
            for rep in range(args.repeat):
                log(f"repeat {rep + 1}/{args.repeat}")
                # Alternate the order, so a drift in the machine's load favours no worker count.
                for n in counts if rep % 2 == 0 else list(reversed(counts)):
                    r = run_once(broker, n, args, iters)
                    log(
                        f"  {n} worker(s): {r.rate:,.0f} msgs/s, split {', '.join(f'{s:.0%}' for s in r.shares)}, "
                        f"dup {r.duplicates}; latency p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms; RSS idle "
                        f"{', '.join(f'{k}={v / MB:.1f}' for k, v in sorted(r.rss_idle.items()))} peak "
                        f"{', '.join(f'{k}={v / MB:.1f}' for k, v in sorted(r.rss_peak.items()))} MB; "
                        f"start-up {r.startup:.2f} s (supervisor {r.supervisor_startup:.2f} s); exit {r.exit_code}; "
                        f"CPU per worker {r.worker_cpu:.0%} ({r.cpu_ms_per_message:.2f} ms/msg), broker {r.broker_cpu:.0%}, machine busy {r.machine_busy:.0%}"
                    )
                    runs.by_workers.setdefault(n, []).append(r)
        finally:
            broker.cleanup()

    print(
        f"`python main.py --workers N` on a private Mosquitto (max_inflight_messages {args.max_inflight}), "
        f"{os.cpu_count()} CPUs shared with the broker and the publisher, Python {sys.version.split()[0]}; "
        f"one shared QoS 1 route, async handler with ~{args.work_ms:g} ms of pure-Python work "
        f"({iters} loop iterations); MAX_INFLIGHT {args.max_inflight}; median of {args.repeat}; "
        f"load average at start {load}.\n"
        f"msgs/s: {args.count:,} messages published as fast as the broker takes them, first to last handled. "
        f"Latency: {args.live_count:,} messages at {args.rate:,.0f} msgs/s, publish to handled. "
        f"CPU (during the throughput run): mean per worker process and the broker, 100% = one core; worker CPU ms/msg = "
        f"CPU time of all workers per message handled (the handler's work included); machine busy = "
        f"share of all {os.cpu_count()} CPUs busy, other users' processes included. "
        f"RSS: the largest worker, median over runs (in brackets the max over all). Start-up: launch to the "
        f"supervisor's \"all N worker(s) subscribed\" line.\n"
    )
    print(format_table(runs, counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
