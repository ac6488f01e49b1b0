"""What a benchmark subscriber process received, written to a JSON file for `bench/bench_core.py`.

Shared by the framework's app (`bench/apps/trivial.py`) and the lean raw paho subscriber
(`bench/lean_paho.py`), so both keep exactly the same books. Each payload is
``{"seq": n, "ts": send time, ...}`` (bench/raw_clients.py `make_payload`).

The result file is written once `expected` distinct messages arrived, and again whenever the
process gets SIGUSR1 (the benchmark asks for a snapshot while it waits for stragglers, to see
when progress stops and what was lost).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

LATENCY_SAMPLES = 20_000  # kept per run; the latency streams are far shorter


class Tally:
    """Distinct sequence numbers, first and last arrival, publish-to-handler latencies."""

    def __init__(self, expected: int, out: str) -> None:
        self.expected = expected
        self.out = out
        self.seen = bytearray(max(expected, 1))
        self.unique = 0
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []
        self._writing = False
        self._again = False
        if out:
            import psutil  # before any signal can ask for a write (an import must not be interrupted by one)

            self._process = psutil.Process()
            signal.signal(signal.SIGUSR1, lambda signum, frame: self.write())

    def record(self, seq: int, sent: float) -> None:
        now = time.time()
        self.received += 1
        if not self.first:
            self.first = now
        self.last = now
        if 0 <= seq < self.expected and not self.seen[seq]:
            self.seen[seq] = 1
            self.unique += 1
            if len(self.latencies) < LATENCY_SAMPLES:
                self.latencies.append(now - sent)
            if self.unique == self.expected:
                self.write()

    def record_json(self, payload: bytes | dict[str, Any]) -> None:
        data = payload if isinstance(payload, dict) else json.loads(payload)
        self.record(int(data["seq"]), float(data["ts"]))

    def write(self) -> None:
        if not self.out:
            return
        if self._writing:  # SIGUSR1 during a write: write once more afterwards
            self._again = True
            return
        self._writing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                result = {
                    "unique": self.unique, "received": self.received, "first": self.first, "last": self.last,
                    "latencies": self.latencies, "rss": self._process.memory_info().rss,
                    "complete": self.unique == self.expected,
                }
                tmp = f"{self.out}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(result, f)
                os.replace(tmp, self.out)  # the benchmark polls for the file: it must appear complete
        finally:
            self._writing = False
