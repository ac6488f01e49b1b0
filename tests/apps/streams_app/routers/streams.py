"""A stream route configured by environment variables; every handled entry appends a line to a file.

STREAMS_APP_TOPIC    topic prefix; the route is `<prefix>/{seq}` (QoS 1)
STREAMS_APP_STREAM   the stream it hands messages to
STREAMS_APP_SHARED   "1" (default): shared route, consumed in the workers; "0": main process
STREAMS_APP_RECORD   file that gets `<worker_id> <pid> <seq> <attempt>` per handled entry
STREAMS_APP_POISON   this seq always raises
STREAMS_APP_KILL_SEQ this seq SIGKILLs its process while handling it, once (STREAMS_APP_MARKER remembers)
STREAMS_APP_DELAY    seconds each handler awaits first
STREAMS_APP_HANG     comma-separated seqs whose handler never returns (entries stay pending)
STREAMS_APP_EXTERNAL also consume this stream (written by others) with the same recorder
STREAMS_APP_INLINE   "1": the same route without stream= (the handler runs inline; for benchmarks)
"""

from __future__ import annotations

import asyncio
import os
import signal

from core.routing.context import MessageContext
from core.router import Router

_RECORD = os.environ.get("STREAMS_APP_RECORD", "")
_POISON = os.environ.get("STREAMS_APP_POISON", "")
_KILL = os.environ.get("STREAMS_APP_KILL_SEQ", "")
_MARKER = os.environ.get("STREAMS_APP_MARKER", "")
_DELAY = float(os.environ.get("STREAMS_APP_DELAY", "0") or 0)
_HANG = {seq.strip() for seq in os.environ.get("STREAMS_APP_HANG", "").split(",") if seq.strip()}
_fd: int | None = None


def record(worker_id: str, seq: str, attempt: int) -> None:
    global _fd
    if not _RECORD:
        return
    if _fd is None:
        _fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{worker_id} {os.getpid()} {seq} {attempt}\n".encode())  # one write per line: no interleaving


async def handle(seq: str, payload: str, context: MessageContext) -> None:
    if _DELAY:
        await asyncio.sleep(_DELAY)
    if seq == _POISON:
        raise ValueError(f"poison entry {seq}")
    if seq in _HANG:
        await asyncio.Event().wait()
    if seq == _KILL and _MARKER and not os.path.exists(_MARKER):
        open(_MARKER, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    delivery = context.state.get("stream")
    record(context.worker_id, seq, delivery.attempt if delivery is not None else 1)


async def handle_external(payload: dict, context: MessageContext) -> None:
    record(context.worker_id, str(payload.get("seq", "?")), context.state["stream"].attempt)


router = Router()
_stream = os.environ.get("STREAMS_APP_STREAM", "")
if os.environ.get("STREAMS_APP_INLINE") == "1":
    router.on(f"{os.environ.get('STREAMS_APP_TOPIC', 'streams-app')}/{{seq}}", handle, qos=1, shared=True,
              payload_format="text")
elif _stream:
    router.on(f"{os.environ.get('STREAMS_APP_TOPIC', 'streams-app')}/{{seq}}", handle, qos=1, stream=_stream,
              shared=os.environ.get("STREAMS_APP_SHARED", "1") == "1", payload_format="text")
if os.environ.get("STREAMS_APP_EXTERNAL"):
    router.stream(os.environ["STREAMS_APP_EXTERNAL"], handle_external, payload_format="json")
