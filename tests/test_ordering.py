"""Ordered routes (issue 11, section 1): per-topic turns, the registration checks, the startup check
with workers. End to end on Mosquitto: tests/integration/test_ordered_routes.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.runtime.ordering import TopicSequencer, check_ordered_routes
from core.router import ROUTE_OPTIONS, RouteError, Router
from core.worker_manager import WorkerPlan, ordered_route_processes
from tests.support.rt_app import base_env, run_main


async def handler(**params: Any) -> None:
    return None


async def test_turns_of_one_topic_in_order_of_asking_and_other_topics_independent() -> None:
    seq = TopicSequencer()
    log: list[str] = []
    gates = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1")}

    async def run(name: str, key: str) -> None:
        turn = seq.turn(key)  # asked for now, in this order
        async with turn:
            log.append(f"start {name}")
            await gates[name].wait()
            log.append(f"end {name}")

    tasks = [asyncio.create_task(run(n, n[0])) for n in ("a1", "a2", "a3", "b1")]
    await asyncio.sleep(0)
    assert log == ["start a1", "start b1"]  # a2, a3 wait behind a1; b is another topic
    assert len(seq) == 2 and seq.waiting() == 2
    gates["a3"].set()
    gates["a2"].set()
    await asyncio.sleep(0)
    assert "start a2" not in log  # a1 still holds the turn
    gates["a1"].set()
    gates["b1"].set()
    await asyncio.gather(*tasks)
    assert [e for e in log if e.split()[1][0] == "a"] == ["start a1", "end a1", "start a2", "end a2", "start a3", "end a3"]
    assert len(seq) == 0 and seq.waiting() == 0  # state dropped once the queues emptied


async def test_a_cancelled_waiter_gives_up_its_place_and_the_next_one_runs() -> None:
    seq = TopicSequencer()
    first, second, third = seq.turn("t"), seq.turn("t"), seq.turn("t")
    await first.wait()
    waiting = asyncio.create_task(second.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    second.release()  # what the dispatcher's `finally` does: must not pass on a turn it never had
    third_task = asyncio.create_task(third.wait())
    await asyncio.sleep(0)
    assert not third_task.done()  # `first` still holds it
    first.release()
    await asyncio.wait_for(third_task, 1)
    third.release()
    assert len(seq) == 0


async def test_a_turn_granted_then_cancelled_is_still_passed_on() -> None:
    seq = TopicSequencer()
    first, second, third = seq.turn("t"), seq.turn("t"), seq.turn("t")
    await first.wait()
    waiting = asyncio.create_task(second.wait())
    await asyncio.sleep(0)
    first.release()  # second is granted the turn ...
    waiting.cancel()  # ... and cancelled before it resumed
    await asyncio.gather(waiting, return_exceptions=True)
    second.release()
    await asyncio.wait_for(third.wait(), 1)
    third.release()
    assert len(seq) == 0


def test_ordered_is_a_route_option() -> None:
    assert ROUTE_OPTIONS["ordered"] is False
    route = Router().on("devices/{id}/status", handler, ordered=True)
    assert route.ordered and not Router().on("x", handler).ordered
    outer = Router()
    inner = Router()
    inner.on("a", handler, ordered=True)
    outer.include(inner, prefix="p")
    assert outer.routes[0].ordered


@pytest.mark.parametrize("kwargs, message", [
    ({"ordered": "yes"}, "ordered must be True or False, not 'yes'"),
    ({"ordered": True, "shared": True, "worker_count": 3}, "ordered=True with worker_count=3"),
    ({"ordered": True, "stream": "orders"}, "ordered=True is not supported on a stream route"),
])
def test_an_ordered_route_that_cannot_hold_fails_at_registration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RouteError, match=message) as info:
        Router().on("devices/{id}/status", handler, **kwargs)
    assert "'devices/{id}/status'" in str(info.value) and "tests.test_ordering" in str(info.value)


@pytest.mark.parametrize("plan, most, count", [
    (WorkerPlan(4, True, "--workers 4"), None, 4),  # every worker on every shared route
    (WorkerPlan(3, False, "largest worker_count"), None, 1),  # worker_count=1: only w0 subscribes
    (WorkerPlan(1, True, "autoscaling"), 3, 3),  # the autoscaler may grow to WORKER_MAX_COUNT
])
def test_processes_per_route_follow_the_worker_plan(plan: WorkerPlan, most: int | None, count: int) -> None:
    route = Router().on("a/{x}", handler, shared=True, ordered=True)
    assert ordered_route_processes(plan, most)(route) == count


def test_startup_check_names_the_ordered_route_spread_over_workers() -> None:
    route = Router().on("devices/{id}/status", handler, shared=True, ordered=True)
    check_ordered_routes([route], lambda r: 1)
    with pytest.raises(RouteError, match="ordered=True but would run in 2 worker processes") as info:
        check_ordered_routes([route], lambda r: 2)
    assert "'devices/{id}/status'" in str(info.value)


def test_main_with_workers_refuses_a_shared_ordered_route() -> None:
    result = run_main("--workers", "2", env=base_env(ROUTERS_PACKAGE="tests.apps.ordered_app"), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "route error:" in result.stderr and "'ordered/{device_id}/status'" in result.stderr
    assert "ordered=True but would run in 2 worker processes" in result.stderr
    assert "Traceback" not in result.stderr
