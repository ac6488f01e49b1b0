"""One shared QoS 1 route for `bench/bench_fleet.py`: each handled message appends
`<worker id> <seq> <unix time>` to BENCH_FLEET_RECORD (one write per line on an O_APPEND file,
so lines of several processes never interleave). BENCH_FLEET_TOPIC is the route's topic.
"""

from __future__ import annotations

import os
import time

from core.routing.context import MessageContext
from core.router import Router

_RECORD = os.environ.get("BENCH_FLEET_RECORD", "")
_fd: int | None = None


async def handle(payload: str, context: MessageContext) -> None:
    global _fd
    if not _RECORD:
        return
    if _fd is None:
        _fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{context.worker_id} {payload} {time.time():.4f}\n".encode())


router = Router()
router.on(os.environ.get("BENCH_FLEET_TOPIC", "bench/fleet"), handle, qos=1, shared=True, payload_format="text")
