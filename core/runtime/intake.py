"""Running delivered messages on the event loop without a task per message.

Most handlers finish without ever waiting. Giving each message a task of its own costs a task,
two loop callbacks and a done callback (about 10 µs, a third of the whole budget per message at
the rates paho can deliver). Instead one task takes messages from a queue and runs each one's
coroutine straight through. A coroutine that has to wait keeps that task for the rest of its
life, and a new task takes over the queue. So every handler still runs inside a task of its own
as far as asyncio can tell (`asyncio.current_task()`, `asyncio.timeout`, cancellation at
shutdown), and in its own copy of the context (`contextvars`), as with one task per message.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from typing import Any, Callable, Collection, Coroutine, Generator

Process = Callable[[Any, Any], Coroutine[Any, Any, None]]


class Intake:
    """The queue of delivered messages and the tasks that run them (event loop thread only)."""

    __slots__ = ("_queue", "_process", "_finished", "_draining", "_carriers")

    def __init__(self, process: Process, finished: Callable[[int], None]) -> None:
        self._queue: deque[tuple[Any, Any]] = deque()
        self._process = process
        self._finished = finished  # told how many messages finished, once per run through the queue
        self._draining: asyncio.Task[None] | None = None  # the task taking messages from the queue
        self._carriers: dict[asyncio.Task[None], Coroutine[Any, Any, None]] = {}  # task -> its waiting handler

    def __len__(self) -> int:
        """Messages queued or waiting."""
        return len(self._queue) + len(self._carriers)

    @property
    def waiting(self) -> Collection[Coroutine[Any, Any, None]]:
        """The coroutines of the messages that are waiting for something (a snapshot, to look at)."""
        return set(self._carriers.values())

    def put(self, message: Any, ticket: Any) -> None:
        self._queue.append((message, ticket))
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        queue, process, copy_context = self._queue, self._process, contextvars.copy_context
        done = 0
        try:
            while queue:
                message, ticket = queue.popleft()
                coro = process(message, ticket)
                context = copy_context()
                try:
                    waiting_on = context.run(coro.send, None)
                except StopIteration:
                    done += 1
                    continue
                except BaseException:
                    done += 1
                    self._hand_over()
                    raise
                # This message waits: the task stays with it and a new one takes the rest of the queue.
                task: Any = asyncio.current_task()
                self._carriers[task] = coro
                self._hand_over()
                if done:
                    self._finished(done)
                    done = 0
                try:
                    await _Resume(coro, waiting_on, context)
                finally:
                    del self._carriers[task]
                    self._finished(1)
                return
            self._draining = None
        finally:
            if done:
                self._finished(done)

    def _hand_over(self) -> None:
        self._draining = asyncio.get_running_loop().create_task(self._drain()) if self._queue else None

    async def cancel(self) -> int:
        """Shutdown: cancel the waiting handlers and drop the queue; returns how many queued messages were dropped."""
        dropped = len(self._queue)
        self._queue.clear()
        tasks = list(self._carriers)
        if self._draining is not None:
            tasks.append(self._draining)  # not started yet (a running one never waits)
            self._draining = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return dropped


class _Resume:
    """Await a coroutine that already ran up to its first wait (`waiting_on`, what it yielded).

    Passes what the task sends or throws on to the coroutine, always inside its own context.
    """

    __slots__ = ("coro", "waiting_on", "context")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any, context: contextvars.Context) -> None:
        self.coro, self.waiting_on, self.context = coro, waiting_on, context

    def __await__(self) -> Generator[Any, Any, None]:
        coro, run = self.coro, self.context.run
        value = self.waiting_on
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # e.g. the task's cancellation: the handler decides what to do with it
                try:
                    value = run(coro.throw, exc)
                except StopIteration:
                    return
                continue
            try:
                value = run(coro.send, sent)
            except StopIteration:
                return
