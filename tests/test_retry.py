"""Retry policies of routes (core.runtime.retry) through the real Dispatcher, in the TestClient."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from core.runtime.retry import Retry
from core.router import RouteError, Router
from core.testing import TestClient


class Boom(Exception):
    pass


class Order(BaseModel):
    n: int


async def test_permanent_error_is_retried_n_times_then_dead_lettered_with_the_attempt_count() -> None:
    calls: list[int] = []

    async def handler(n: str) -> None:
        calls.append(int(n))
        raise Boom(f"order {n} is broken")

    router = Router()
    router.on("orders/{n}", handler, qos=1, retries=3, retry_backoff=(0.5, 2.0, 8.0))
    async with TestClient(router) as client:
        result = await client.publish("orders/7", b"", qos=1)
    assert calls == [7, 7, 7, 7]  # the first call and 3 retries
    (letter,) = result.dead_letters
    assert (letter.error_type, letter.attempts, letter.route) == ("Boom", 4, "orders/{n}")
    assert [m.user_properties["attempts"] for m in result.published if m.topic.startswith("dead-letter/")] == ["4"]
    stats = client.stats.routes["orders/{n}"]
    assert (stats.retried, stats.dead_lettered, stats.failed, stats.handled) == (3, 1, 1, 0)


async def test_the_attempt_count_is_in_the_json_dead_letter_on_mqtt_311() -> None:
    router = Router()
    router.on("orders/{n}", lambda n: 1 / 0, retries=1)
    async with TestClient(router, protocol="3.1.1") as client:
        result = await client.publish("orders/1", b"")
    (letter,) = result.dead_letters
    assert (letter.error_type, letter.attempts) == ("ZeroDivisionError", 2)


async def test_without_a_policy_a_failure_is_dead_lettered_at_once() -> None:
    router = Router()
    router.on("a", lambda: 1 / 0)
    async with TestClient(router) as client:
        result = await client.publish("a", b"")
    assert len(result.calls) == 1 and result.dead_letters[0].attempts == 1


async def test_a_failure_that_recovers_within_the_retries_is_handled_and_not_dead_lettered() -> None:
    attempts = 0

    async def flaky(context: Any) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise Boom("not yet")
        return "done"

    router = Router()
    router.on("jobs/x", flaky, retries=5, retry_backoff=0.01)
    async with TestClient(router) as client:
        result = await client.publish("jobs/x", b"", response_topic="replies/x")
    assert result.dead_letters == [] and attempts == 3
    assert [r.text() for r in result.responses] == ["done"]
    assert client.stats.routes["jobs/x"].handled == 1


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), ConnectionResetError(), TimeoutError()])
async def test_a_transient_failure_holds_and_is_never_dead_lettered_even_without_retries(error: Exception) -> None:
    attempts = 0

    async def needs_db() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 12:  # more failures than the breaker's threshold: it opens and probes
            raise error

    router = Router()
    router.on("orders/{n}", needs_db, qos=1)
    async with TestClient(router) as client:
        result = await client.publish("orders/1", b"", qos=1)
    assert result.dead_letters == [] and attempts == 12
    stats = client.stats.routes["orders/{n}"]
    assert (stats.held, stats.retried, stats.handled, stats.dead_lettered) == (1, 11, 1, 0)
    assert client.acks == [(1, 1)]


async def test_validation_errors_raised_by_a_handler_are_permanent() -> None:
    calls = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        Order.model_validate(payload)  # raises pydantic's ValidationError

    router = Router()
    router.on("v", handler, retries=2, retry_backoff=0.01, retry=None)
    async with TestClient(router) as client:
        result = await client.publish("v", {"n": "not a number"})
    assert calls == 3 and result.dead_letters[0].error_type == "ValidationError"


async def test_an_invalid_payload_is_dead_lettered_at_once_whatever_the_retries() -> None:
    calls = 0

    async def handler(payload: Order) -> None:
        nonlocal calls
        calls += 1

    router = Router()
    router.on("v", handler, retries=3)
    async with TestClient(router) as client:
        result = await client.publish("v", {"n": "x"})
    assert calls == 0
    assert (result.dead_letters[0].error_type, result.dead_letters[0].attempts) == ("PayloadValidationError", 1)


async def test_which_errors_are_permanent_or_transient_is_configurable() -> None:
    class Busy(Exception):
        pass

    seen: dict[str, int] = {"timeout": 0, "busy": 0}

    async def times_out() -> None:
        seen["timeout"] += 1
        raise TimeoutError("the partner API did not answer")

    async def busy() -> None:
        seen["busy"] += 1
        if seen["busy"] < 4:
            raise Busy()

    router = Router()
    router.on("t", times_out, retry=Retry(retries=1, backoff=(0.01,), permanent=(TimeoutError,)))
    router.on("b", busy, retry=Retry(transient=(Busy,)))
    async with TestClient(router) as client:
        t = await client.publish("t", b"")
        b = await client.publish("b", b"")
    assert seen["timeout"] == 2 and t.dead_letters[0].attempts == 2
    assert seen["busy"] == 4 and b.dead_letters == []


async def test_a_retrying_message_does_not_block_other_topics_and_acks_stay_in_arrival_order() -> None:
    other_done = asyncio.Event()
    acks_when_retried: list[list[tuple[int, int]]] = []
    attempts = 0

    async def slow_to_succeed() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise Boom("first try fails")
        await other_done.wait()  # the retry runs only once the other topic's message was handled
        acks_when_retried.append(list(client.acks))

    async def other() -> None:
        other_done.set()

    router = Router()
    router.on("a", slow_to_succeed, qos=1, retries=2, retry_backoff=0.2)
    router.on("b", other, qos=1)
    async with TestClient(router, retry_delays=True) as client:
        first = asyncio.create_task(client.publish("a", b"", qos=1))
        await asyncio.sleep(0)  # "a" is delivered first
        second = await client.publish("b", b"", qos=1)
        await first
    assert [c.route for c in second.calls if c.topic == "b"] == ["b"] and other_done.is_set()
    assert acks_when_retried == [[]]  # "b" finished first, but its ack waited for "a"'s final outcome
    assert client.acks == [(1, 1), (2, 1)]  # arrival order


async def test_a_shutdown_leaves_a_retrying_message_unacknowledged() -> None:
    failing = asyncio.Event()

    async def handler() -> None:
        failing.set()
        raise Boom()

    router = Router()
    router.on("a", handler, qos=1, retries=5, retry_backoff=30.0)
    client = TestClient(router, retry_delays=True)
    await client.start()
    task = asyncio.create_task(client.publish("a", b"", qos=1))
    await failing.wait()
    await client.stop()  # the backoff wait ends at once: no 30 s wait, no ack, no dead letter
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert client.acks == [] and client.dead_letters == []


async def test_stream_routes_take_the_same_policy() -> None:
    calls = 0

    async def handler() -> None:
        nonlocal calls
        calls += 1
        raise Boom()

    router = Router()
    router.on("s/in", handler, stream="jobs", retries=1, retry_backoff=0.01)
    async with TestClient(router) as client:
        result = await client.publish("s/in", b"x")
    assert calls == 2
    (letter,) = result.stream_dead_letters
    assert (letter.attempts, letter.error_type) == (2, "Boom")


async def test_a_stream_route_holds_on_a_transient_failure() -> None:
    calls = 0

    async def handler() -> None:
        nonlocal calls
        calls += 1
        if calls < 6:
            raise ConnectionResetError("the database went away")

    router = Router()
    router.on("s/in", handler, stream="jobs", retries=1)
    async with TestClient(router) as client:
        result = await client.publish("s/in", b"x")
    assert calls == 6 and result.stream_dead_letters == []


@pytest.mark.parametrize("options, message", [
    ({"retries": -1}, "retries must be a whole number >= 0"),
    ({"retries": 1.5}, "retries must be a whole number >= 0"),
    ({"retry_backoff": ()}, "retry_backoff must be"),
    ({"retry_backoff": (1, -2)}, "retry_backoff must be"),
    ({"retry": Retry(), "retries": 2}, "not both"),
    ({"retry": 3}, "retry must be a core.runtime.retry.Retry"),
])
def test_bad_retry_options_fail_at_registration_naming_the_route(options: dict[str, Any], message: str) -> None:
    router = Router()
    with pytest.raises(RouteError, match=message) as info:
        router.on("orders/{n}", lambda n: None, **options)
    assert "orders/{n}" in str(info.value)


def test_a_route_built_by_hand_keeps_its_policy() -> None:
    from core.router import Route

    assert Route("x/{n}", lambda n: None, retry=Retry(retries=2)).retry == Retry(retries=2)


def test_included_and_decorated_routes_keep_their_policy() -> None:
    inner = Router()

    @inner.route("x", retries=2, retry_backoff=1.0)
    def handler() -> None: ...

    outer = Router()
    outer.include(inner, prefix="p")
    assert outer.routes[0].retry == Retry(retries=2, backoff=(1.0,))


async def test_the_same_error_logs_its_traceback_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    router.on("a/{n}", lambda n: 1 / 0, retries=2)
    caplog.set_level(logging.WARNING, logger="core.dispatcher")
    async with TestClient(router) as client:
        for n in range(20):
            await client.publish(f"a/{n}", b"")
    assert len(client.dead_letters) == 20
    with_traceback = [r for r in caplog.records if r.exc_info]
    kinds = {(r.getMessage().split(":")[1].strip()) for r in with_traceback}
    assert len(with_traceback) == 2, [r.getMessage() for r in with_traceback]  # one retry line, one dead-letter line
    assert len(kinds) == 2
    assert len(caplog.records) == 2
