"""Routes of the core test app, configured by environment variables.

CORE_APP_PREFIX: first topic level of every route (a test's unique id);
CORE_APP_LOG: a file that gets one JSON line per handler event ("start"/"done"), appended and
closed each time so a SIGKILL loses nothing already written.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from core.routing.context import MessageContext
from core.router import Router

PREFIX = os.environ.get("CORE_APP_PREFIX", "core-app")
LOG = Path(os.environ.get("CORE_APP_LOG", "core-app.log"))
RELEASE = LOG.with_name(LOG.name + ".release")  # while absent, {"block": true} handlers wait


def record(event: str, n: str, **extra: Any) -> None:
    with LOG.open("a") as f:
        f.write(json.dumps({"event": event, "n": n, "pid": os.getpid(), **extra}) + "\n")


async def work(n: str, payload: Any, context: MessageContext) -> None:
    """`<prefix>/work/{n}`: payload {"sleep": s} sleeps, {"block": true} waits for the release file."""
    record("start", n, dup=bool(context.dup))
    options = payload if isinstance(payload, dict) else {}
    if options.get("block"):
        while not RELEASE.exists():
            await asyncio.sleep(0.02)
    await asyncio.sleep(float(options.get("sleep", 0)))
    record("done", n)


def sync_work(n: str, payload: Any) -> None:
    """`<prefix>/syncwork/{n}`: a plain handler (thread pool); {"block": true} blocks its thread until the release file."""
    record("start", n)
    if isinstance(payload, dict) and payload.get("block"):
        while not RELEASE.exists():
            time.sleep(0.02)
    record("done", n)


async def ping(payload: Any, context: MessageContext) -> None:
    """`<prefix>/ping` (QoS 0): publishes `<prefix>/pong` at QoS 1, returning once the broker has it."""
    await context.publish(f"{PREFIX}/pong", payload, qos=1)


router = Router()
router.on(f"{PREFIX}/work/{{n}}", work, qos=1)
router.on(f"{PREFIX}/ping", ping, qos=0)
router.on(f"{PREFIX}/syncwork/{{n}}", sync_work, qos=1)
