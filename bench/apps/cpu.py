"""A shared QoS 1 route with a CPU-bound handler (about 1 ms of pure Python), for bench_workers.

Configured by environment variables: BENCH_TOPIC (the route pattern), BENCH_WORK_ITERS (loop
iterations of the busy work, calibrated by the benchmark to take about 1 ms), BENCH_OUT_DIR (each
process appends one line per message to `<pid>.log` there: the `job` route parameter, sequence number, send
time, handled time).
"""

from __future__ import annotations

import os
import time
from typing import Any

from core.router import Router

TOPIC = os.environ.get("BENCH_TOPIC", "bench/cpu/{job}")
WORK_ITERS = int(os.environ.get("BENCH_WORK_ITERS", "20000"))
OUT_DIR = os.environ.get("BENCH_OUT_DIR", "")


def busy_work(iterations: int) -> int:
    """Pure-Python arithmetic that holds the GIL the whole time."""
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) % 1_000_003
    return acc


_fd: int | None = None


def _out_fd() -> int:
    # Opened lazily, in the worker process (the supervisor imports this module too).
    global _fd
    if _fd is None:
        _fd = os.open(os.path.join(OUT_DIR, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _fd


async def handle(job: str, payload: Any) -> None:
    busy_work(WORK_ITERS)
    if OUT_DIR and isinstance(payload, dict):
        # One write per message, so the benchmark can count progress while the app runs.
        os.write(_out_fd(), b"%s %d %.6f %.6f\n" % (job.encode(), payload["seq"], payload["ts"], time.time()))


router = Router()
router.on(TOPIC, handle, qos=1, shared=True)
