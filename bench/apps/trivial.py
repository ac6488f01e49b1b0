"""One route with a trivial async handler, for `bench/bench_core.py`'s own-process runs.

Configured by environment variables: BENCH_TOPIC (the route pattern), BENCH_QOS, BENCH_EXPECTED
(how many distinct sequence numbers to wait for) and BENCH_OUT (the JSON result file of
`bench.apps.tally`, written once all of them arrived or on SIGUSR1).
"""

from __future__ import annotations

import os
from typing import Any

from bench.apps.tally import Tally
from core.router import Router

TOPIC = os.environ.get("BENCH_TOPIC", "bench/trivial")
QOS = int(os.environ.get("BENCH_QOS", "1"))

_tally = Tally(int(os.environ.get("BENCH_EXPECTED", "0")), os.environ.get("BENCH_OUT", ""))
_record = _tally.record


async def handle(payload: Any) -> None:
    _record(payload["seq"], payload["ts"])


router = Router()
router.on(TOPIC, handle, qos=QOS)
