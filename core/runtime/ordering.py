"""Ordered routes: the messages of one topic handled one at a time, in arrival order.

`router.on("devices/{id}/status", handler, ordered=True)`: the dispatcher takes a *turn* for the
message's topic before it takes a MAX_INFLIGHT slot, synchronously, in the order messages arrive,
and gives it back when every route of the message has finished (handler, response or dead letter,
retries included). Messages of other topics, and of unordered routes, run concurrently as before.

The bookkeeping is a dict of topic -> FIFO of waiters that exists only while a message of that
topic is in flight: the first message of a topic takes its turn without waiting (no future, no
task), later ones wait on a future, and the entry is dropped when its queue empties. Memory is
therefore bounded by the messages in flight (MAX_INFLIGHT), however many distinct topics pass.

Order per topic holds within one process. A shared subscription spreads a topic's messages over
the members of the group, so an ordered route in more than one worker is refused at startup
(`check_ordered_routes`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable

from core.routing.router import RouteError

if TYPE_CHECKING:
    from core.routing.router import Route


class _Turn:
    """One message's place in its topic's queue: `await wait()`, then `release()` (or `async with`)."""

    __slots__ = ("_sequencer", "_key", "_waiter")

    def __init__(self, sequencer: "TopicSequencer", key: str) -> None:
        self._sequencer = sequencer
        self._key = key
        self._waiter: asyncio.Future[None] | None = sequencer._reserve(key)  # at creation: arrival order

    async def wait(self) -> None:
        """Return once every earlier message of the topic has released its turn."""
        if self._waiter is not None:
            await self._waiter

    def release(self) -> None:
        """Pass the turn on (also after a cancelled `wait`, which only gives up the place)."""
        waiter = self._waiter
        if waiter is None or (waiter.done() and not waiter.cancelled()):
            self._sequencer._release(self._key)
        # else: cancelled while waiting; its predecessor skips it when passing the turn on

    async def __aenter__(self) -> None:
        await self.wait()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class TopicSequencer:
    """Turns per topic, handed out in the order they were asked for (event loop thread only)."""

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        # key -> waiters behind the current holder; present while the key has a holder
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        """Topics with a message in flight (the per-topic state held now)."""
        return len(self._queues)

    def turn(self, key: str) -> _Turn:
        """Take a place in `key`'s queue now; `async with` it to wait for the turn and give it back."""
        return _Turn(self, key)

    def waiting(self) -> int:
        """Messages waiting for their turn (behind another message of their topic)."""
        return sum(len(q) for q in self._queues.values())

    def _reserve(self, key: str) -> asyncio.Future[None] | None:
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque()
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        return waiter

    def _release(self, key: str) -> None:
        queue = self._queues[key]
        while queue:
            waiter = queue.popleft()
            if not waiter.done():  # a cancelled waiter gave up its place
                waiter.set_result(None)
                return
        del self._queues[key]


def check_ordered_routes(routes: Iterable["Route"], processes: Callable[["Route"], int]) -> None:
    """RouteError at startup when an ordered route would be served by more than one worker process
    (`processes(route)`: how many worker processes subscribe to it)."""
    for route in routes:
        if route.ordered and (count := processes(route)) > 1:
            raise RouteError(
                f"{route.describe()} has ordered=True but would run in {count} worker processes: a shared "
                "subscription spreads one topic's messages over them, so their order cannot hold. Run it with "
                "worker_count=1 and --workers without N (or WORKER_COUNT unset), without shared=True, or drop ordered=True"
            )
