"""Routes of the worker test app, configured through environment variables.

SEQAPP_RECORD       file that gets one line `<worker_id> <pid> <seq>` per handled message
SEQAPP_WORKER_COUNT worker_count of the shared route `seq/in` (default 1)
SEQAPP_WORKER_COUNT2 worker_count of the second shared route `seq2/in` (default 1)
SEQAPP_DELAY        seconds each handler awaits before recording (default 0)
SEQAPP_BLOCK_SEQ    this sequence number blocks the event loop forever, once (SEQAPP_MARKER remembers)
SEQAPP_CRASH_SEQ    this sequence number kills the process, every time it is handled
SEQAPP_HANG_SEQ     this sequence number's handler hangs without blocking the event loop (an async
                    handler awaits, a plain one blocks its pool thread) until the file SEQAPP_RELEASE
                    exists (forever if unset); once if SEQAPP_MARKER is set (created when it starts)
SEQAPP_GATE_FROM    sequence numbers from this one on wait (awaiting, the loop goes on) until the file
                    SEQAPP_GATE exists; each writes `<worker_id> <pid> <seq>` to SEQAPP_GATED when it
                    starts waiting, so a test knows handlers are in flight instead of hoping so
SEQAPP_HOLD         file: while it exists and lists `*` or the handling worker's id (one a line), the
                    shared (async) handlers of that worker await before recording
SEQAPP_SYNC         1: the shared routes use a plain (sync) handler, run in the thread pool
SEQAPP_ADOPT_DELAY  seconds each handler awaits when it runs in an adoption of another process's session
SEQAPP_NO_PLAIN     1: leave out the plain route `plain/in` (the supervisor then runs no main runtime)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from core.routing.context import MessageContext
from core.router import Router

_RECORD = os.environ.get("SEQAPP_RECORD", "")
_DELAY = float(os.environ.get("SEQAPP_DELAY", "0") or 0)
_ADOPT_DELAY = float(os.environ.get("SEQAPP_ADOPT_DELAY", "0") or 0)
_BLOCK = int(os.environ.get("SEQAPP_BLOCK_SEQ", "-1") or -1)
_MARKER = os.environ.get("SEQAPP_MARKER", "")
_CRASH = int(os.environ.get("SEQAPP_CRASH_SEQ", "-1") or -1)
_HANG = int(os.environ.get("SEQAPP_HANG_SEQ", "-1") or -1)
_RELEASE = os.environ.get("SEQAPP_RELEASE", "")
_SYNC = os.environ.get("SEQAPP_SYNC", "") == "1"
_GATE_FROM = int(os.environ.get("SEQAPP_GATE_FROM", "-1") or -1)
_GATE = os.environ.get("SEQAPP_GATE", "")
_GATED = os.environ.get("SEQAPP_GATED", "")
_HOLD = os.environ.get("SEQAPP_HOLD", "")
_fds: dict[str, int] = {}


def _append(path: str, worker_id: str, seq: int) -> None:
    fd = _fds.get(path)
    if fd is None:
        fd = _fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One write() per line on an O_APPEND file: lines from several processes never interleave.
    os.write(fd, f"{worker_id} {os.getpid()} {seq}\n".encode())


def record(worker_id: str, seq: int) -> None:
    if _RECORD:
        _append(_RECORD, worker_id, seq)


async def _wait_at_gate(worker_id: str, seq: int) -> None:
    if 0 <= _GATE_FROM <= seq and _GATE and not os.path.exists(_GATE):
        if _GATED:
            _append(_GATED, worker_id, seq)
        while not os.path.exists(_GATE):
            await asyncio.sleep(0.05)


async def handle_shared(payload: str, context: MessageContext) -> None:
    seq = int(payload)
    if seq == _CRASH:
        os._exit(3)
    if seq == _BLOCK and _MARKER and not os.path.exists(_MARKER):
        open(_MARKER, "w").close()
        time.sleep(3600)  # blocks the event loop on purpose: the heartbeat must notice
    if _should_hang(seq):
        while not _released():
            await asyncio.sleep(0.05)  # awaiting forever: the event loop (and heartbeat) go on
    await _wait_at_gate(context.worker_id, seq)
    while _HOLD and _held(context.worker_id):
        await asyncio.sleep(0.05)
    if _DELAY:
        await asyncio.sleep(_DELAY)
    if _ADOPT_DELAY and context.worker_id.startswith("adopted"):
        await asyncio.sleep(_ADOPT_DELAY)
    record(context.worker_id, seq)


def _should_hang(seq: int) -> bool:
    if seq != _HANG:
        return False
    if _MARKER:
        if os.path.exists(_MARKER):
            return False
        open(_MARKER, "w").close()
    return True


def _held(worker_id: str) -> bool:
    try:
        listed = Path(_HOLD).read_text().split()
    except FileNotFoundError:
        return False
    return "*" in listed or worker_id in listed


def _released() -> bool:
    return bool(_RELEASE) and os.path.exists(_RELEASE)


def handle_shared_sync(payload: str, context: MessageContext) -> None:
    seq = int(payload)
    if _should_hang(seq):
        while not _released():
            time.sleep(0.05)  # a pool thread stuck in user code: the event loop (and heartbeat) go on
    if _DELAY:
        time.sleep(_DELAY)
    record(context.worker_id, seq)


async def handle_plain(payload: str, context: MessageContext) -> None:
    record(context.worker_id, int(payload))


_shared_handler = handle_shared_sync if _SYNC else handle_shared
router = Router()
router.on("seq/in", _shared_handler, qos=1, shared=True, payload_format="text",
          worker_count=int(os.environ.get("SEQAPP_WORKER_COUNT", "1") or 1))
router.on("seq2/in", _shared_handler, qos=1, shared=True, payload_format="text",
          worker_count=int(os.environ.get("SEQAPP_WORKER_COUNT2", "1") or 1))
if os.environ.get("SEQAPP_NO_PLAIN", "") != "1":
    router.on("plain/in", handle_plain, qos=1, payload_format="text")
