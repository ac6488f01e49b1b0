"""Dispatcher intake: handlers start at once, in a task of their own as far as asyncio can tell.

Handlers that finish without waiting for anything are run straight through (no task each); one
that waits keeps the task it started in. These tests pin what a handler may rely on either way:
a current task (so `asyncio.timeout` works), its own copy of the context, acks in arrival order,
cancellation at shutdown, and the heartbeat's view of long-running handlers.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.foundation.config import load_settings
from core.routing.context import Services
from core.runtime.dispatcher import Dispatcher
from core.router import Router, RouteTable
from core.runtime.stats import ProcessStats
from core.processes.worker import HandlerWatch

_request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


class Message:
    def __init__(self, topic: str, mid: int, qos: int = 1, payload: bytes = b"{}") -> None:
        self.topic, self.mid, self.qos, self.payload = topic, mid, qos, payload
        self.retain = self.dup = False
        self.properties = None


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, **_: Any) -> None:
        self.sent.append((topic, payload))


def make_dispatcher(router: Router, acks: list[int], **settings: str) -> Dispatcher:
    return Dispatcher(
        RouteTable(router.routes), load_settings({"MQTT_CLIENT_ID": "t", **settings}), Services(Publisher()),
        ProcessStats(), lambda mid, qos, generation: acks.append(mid), ThreadPoolExecutor(1),
    )


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_each_handler_has_a_current_task_and_its_own_context() -> None:
    seen: list[tuple[bool, str]] = []
    router = Router()

    @router.route("r/{n}")
    async def handle(n: str) -> None:
        seen.append((asyncio.current_task() is not None, _request.get()))
        _request.set(n)  # must not leak into the next message's handler
        async with asyncio.timeout(5):  # needs a current task
            if int(n) % 2:
                await asyncio.sleep(0)

    acks: list[int] = []
    dispatcher = make_dispatcher(router, acks)
    for n in range(6):
        dispatcher.submit(Message(f"r/{n}", n + 1), 1)
    await until(lambda: len(acks) == 6)
    assert seen == [(True, "")] * 6
    assert acks == [1, 2, 3, 4, 5, 6]
    assert dispatcher.stats.handled == 6 and dispatcher.inflight == 0


async def test_acks_follow_arrival_when_waiting_and_quick_handlers_interleave() -> None:
    gates = {n: asyncio.Event() for n in range(0, 10, 3)}
    router = Router()

    @router.route("r/{n}")
    async def handle(n: str) -> None:
        gate = gates.get(int(n))
        if gate is not None:
            await gate.wait()

    acks: list[int] = []
    dispatcher = make_dispatcher(router, acks)
    for n in range(10):
        dispatcher.submit(Message(f"r/{n}", n + 1), 1)
    await until(lambda: len(list(dispatcher.running)) == len(gates))
    assert acks == [] and dispatcher.inflight == len(gates)  # message 0 waits, so nothing after it may be acked yet
    for n in sorted(gates, reverse=True):
        gates[n].set()
        await asyncio.sleep(0.01)
        if n:
            assert acks == []
    await until(lambda: len(acks) == 10)
    assert acks == list(range(1, 11))
    assert dispatcher.completed == 10


async def test_a_route_timeout_still_cancels_a_waiting_handler() -> None:
    router = Router()

    @router.route("slow", timeout=0.05)
    async def slow() -> None:
        await asyncio.sleep(30)

    @router.route("quick")
    async def quick() -> None:
        return None

    acks: list[int] = []
    dispatcher = make_dispatcher(router, acks)
    dispatcher.submit(Message("slow", 1), 1)
    dispatcher.submit(Message("quick", 2), 1)
    await until(lambda: len(acks) == 2)
    assert dispatcher.stats.dead_lettered == 1 and dispatcher.stats.handled == 1
    assert dispatcher.services.publisher.sent[0][0].endswith("slow")  # type: ignore[attr-defined]


async def test_shutdown_cancels_waiting_handlers_without_acking_them() -> None:
    router = Router()
    cancelled: list[str] = []

    @router.route("r/{n}")
    async def handle(n: str) -> None:
        if n == "1":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(n)
                raise

    acks: list[int] = []
    dispatcher = make_dispatcher(router, acks)
    for n in range(3):
        dispatcher.submit(Message(f"r/{n}", n + 1), 1)
    await until(lambda: dispatcher.stats.handled == 2 and cancelled == [] and len(list(dispatcher.running)) == 1)
    assert dispatcher.inflight == 1 and acks == [1]  # message 3 finished, its ack waits for message 2's
    dispatcher.stop_accepting()
    assert await dispatcher.drain(0.05) is False
    assert cancelled == ["1"] and acks == [1]
    assert dispatcher.inflight == 0


async def test_the_heartbeat_sees_a_waiting_handler_with_its_route_and_topic() -> None:
    gate = asyncio.Event()
    started: list[str] = []
    router = Router()

    @router.route("devices/{id}/status")
    async def handle(id: str) -> None:
        started.append(id)
        await gate.wait()

    acks: list[int] = []
    dispatcher = make_dispatcher(router, acks)
    dispatcher.submit(Message("devices/7/status", 1), 1)
    dispatcher.submit(Message("devices/8/status", 2, qos=0), 1)
    await until(lambda: len(started) == 2)
    assert dispatcher.inflight == 2
    oldest = HandlerWatch().oldest(dispatcher.running, 1.0)
    assert oldest is not None and oldest["route"] == "devices/{id}/status"
    assert oldest["topic"] in ("devices/7/status", "devices/8/status")  # both started at the same sample
    gate.set()
    await until(lambda: dispatcher.inflight == 0)
    assert acks == [1]
