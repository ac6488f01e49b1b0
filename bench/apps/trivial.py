"""One route with a trivial async handler, for `bench/bench_core.py`'s own-process run.

Configured by environment variables: BENCH_TOPIC (the route pattern), BENCH_QOS, BENCH_EXPECTED
(how many distinct sequence numbers to wait for) and BENCH_OUT (a JSON file written once all of
them arrived: count, first and last arrival time, RSS).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from core.router import Router

TOPIC = os.environ.get("BENCH_TOPIC", "bench/trivial")
QOS = int(os.environ.get("BENCH_QOS", "1"))
EXPECTED = int(os.environ.get("BENCH_EXPECTED", "0"))
OUT = os.environ.get("BENCH_OUT", "")


class _Tally:
    """Distinct sequence numbers seen and the arrival times of the first and last message."""

    def __init__(self, expected: int) -> None:
        self.seen = bytearray(max(expected, 1))
        self.unique = 0
        self.received = 0
        self.first = 0.0
        self.last = 0.0


_tally = _Tally(EXPECTED)


def _write_result() -> None:
    import psutil

    result = {
        "unique": _tally.unique, "received": _tally.received, "first": _tally.first, "last": _tally.last,
        "rss": psutil.Process().memory_info().rss,
    }
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, OUT)  # the benchmark polls for OUT: it must appear complete


async def handle(payload: Any) -> None:
    now = time.time()
    tally = _tally
    tally.received += 1
    if not tally.first:
        tally.first = now
    tally.last = now
    seq = payload["seq"] if isinstance(payload, dict) else -1
    if 0 <= seq < EXPECTED and not tally.seen[seq]:
        tally.seen[seq] = 1
        tally.unique += 1
        if tally.unique == EXPECTED and OUT:
            _write_result()


router = Router()
router.on(TOPIC, handle, qos=QOS)
