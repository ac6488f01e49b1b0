"""Routes of the worker test app, configured through environment variables.

SEQAPP_RECORD       file that gets one line `<worker_id> <pid> <seq>` per handled message
SEQAPP_WORKER_COUNT worker_count of the shared route `seq/in` (default 1)
SEQAPP_WORKER_COUNT2 worker_count of the second shared route `seq2/in` (default 1)
SEQAPP_DELAY        seconds each handler awaits before recording (default 0)
SEQAPP_BLOCK_SEQ    this sequence number blocks the event loop forever, once (SEQAPP_MARKER remembers)
SEQAPP_CRASH_SEQ    this sequence number kills the process, every time it is handled
"""

from __future__ import annotations

import asyncio
import os
import time

from core.context import MessageContext
from core.router import Router

_RECORD = os.environ.get("SEQAPP_RECORD", "")
_DELAY = float(os.environ.get("SEQAPP_DELAY", "0") or 0)
_BLOCK = int(os.environ.get("SEQAPP_BLOCK_SEQ", "-1") or -1)
_MARKER = os.environ.get("SEQAPP_MARKER", "")
_CRASH = int(os.environ.get("SEQAPP_CRASH_SEQ", "-1") or -1)
_fd: int | None = None


def record(worker_id: str, seq: int) -> None:
    global _fd
    if not _RECORD:
        return
    if _fd is None:
        _fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One write() per line on an O_APPEND file: lines from several processes never interleave.
    os.write(_fd, f"{worker_id} {os.getpid()} {seq}\n".encode())


async def handle_shared(payload: str, context: MessageContext) -> None:
    seq = int(payload)
    if seq == _CRASH:
        os._exit(3)
    if seq == _BLOCK and _MARKER and not os.path.exists(_MARKER):
        open(_MARKER, "w").close()
        time.sleep(3600)  # blocks the event loop on purpose: the heartbeat must notice
    if _DELAY:
        await asyncio.sleep(_DELAY)
    record(context.worker_id, seq)


async def handle_plain(payload: str, context: MessageContext) -> None:
    record(context.worker_id, int(payload))


router = Router()
router.on("seq/in", handle_shared, qos=1, shared=True, payload_format="text",
          worker_count=int(os.environ.get("SEQAPP_WORKER_COUNT", "1") or 1))
router.on("seq2/in", handle_shared, qos=1, shared=True, payload_format="text",
          worker_count=int(os.environ.get("SEQAPP_WORKER_COUNT2", "1") or 1))
router.on("plain/in", handle_plain, qos=1, payload_format="text")
