"""Example middleware: records how long the rest of the chain took in `context.state`."""

from __future__ import annotations

import time
from typing import Any

from core.routing.context import MessageContext
from core.routing.middleware import BaseMiddleware, CallNext


class TimingMiddleware(BaseMiddleware):
    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        started = time.perf_counter()
        try:
            return await call_next(context)
        finally:
            context.state["elapsed"] = time.perf_counter() - started
