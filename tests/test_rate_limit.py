"""core.integrations.rate_limit: token buckets in memory, a Redis sliding window shared by processes, and the middleware."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from core.foundation.config import load_settings
from core.integrations.rate_limit import RateLimit, RedisSlidingWindow, TokenBuckets, check_rate_limits
from core.router import RouteError, Router
from core.testing import TestClient
from tests.support.ops import Publisher, app_factory, metric, ready, scrape, wait_until_sync  # noqa: F401


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- token buckets ---------------------------------------------------------------------------------


def test_token_bucket_burst_then_refill() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=2.0, capacity=3, clock=clock)
    assert [buckets.allow("k") for _ in range(5)] == [True, True, True, False, False]
    clock.now += 0.5  # one token back
    assert [buckets.allow("k") for _ in range(2)] == [True, False]
    clock.now += 100  # never more than the capacity
    assert [buckets.allow("k") for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("other")  # keys are independent


def test_token_buckets_forget_only_full_buckets() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=1.0, capacity=2, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        buckets.allow(key)
        buckets.allow(key)  # empty
    clock.now += 2.5  # a, b, c have refilled completely
    buckets.allow("d")
    assert len(buckets) == 1
    for key in ("e", "f"):
        buckets.allow(key)
    buckets.allow("g")  # d, e, f are not full: kept
    assert len(buckets) == 4
    assert [buckets.allow("e") for _ in range(2)] == [True, False]


def test_rate_limit_arguments_are_checked() -> None:
    for bad in (dict(limit=0), dict(limit=1.5), dict(limit=5, per=0), dict(limit=5, backend="disk"),
                dict(limit=5, on_limit="ignore"), dict(limit=5, backend="redis", burst=3), dict(limit=5, burst=0),
                dict(limit=5, backend="redis", on_redis_error="maybe"), dict(limit=5, redis_timeout=0)):
        with pytest.raises(ValueError, match="RateLimit"):
            RateLimit(**bad)  # type: ignore[arg-type]


# -- the middleware through the test client --------------------------------------------------------


def limited_router(limiter: RateLimit, handled: list[str]) -> Router:
    router = Router()

    async def handler(device_id: str) -> None:
        handled.append(device_id)

    router.on("dev/{device_id}/data", handler, qos=1, middleware=[limiter])
    return router


async def test_over_the_limit_goes_to_the_dead_letter_per_key() -> None:
    clock = FakeClock()
    limiter = RateLimit(3, per=60, key="device_id", clock=clock)
    handled: list[str] = []
    async with TestClient(limited_router(limiter, handled)) as client:
        for _ in range(5):
            await client.publish("dev/a/data", "x", qos=1)
        for _ in range(2):
            await client.publish("dev/b/data", "x", qos=1)
        clock.now += 20  # one token for a
        await client.publish("dev/a/data", "x", qos=1)
        await client.publish("dev/a/data", "x", qos=1)
    assert handled == ["a", "a", "a", "b", "b", "a"]
    assert [d.error_type for d in client.dead_letters] == ["RateLimited"] * 3
    assert client.dead_letters[0].error == "rate limit of 3 per 60 s exceeded for device_id='a'"
    assert limiter.counters() == {"action": "dead_letter", "limited": {"dev/{device_id}/data": 3}, "redis_errors": 0,
                                  "on_redis_error": "allow"}
    assert len(client.acks) == 9  # every message acknowledged, dead-lettered or not


async def test_drop_discards_quietly_and_counts() -> None:
    limiter = RateLimit(2, per=3600, on_limit="drop", clock=FakeClock())
    handled: list[str] = []
    async with TestClient(limited_router(limiter, handled)) as client:
        for device in "abcde":
            await client.publish(f"dev/{device}/data", "x", qos=1)
    assert handled == ["a", "b"]  # no key: one limit for the whole route
    assert client.dead_letters == []
    assert limiter.limited == {"dev/{device_id}/data": 3}


async def test_a_named_limit_is_shared_by_the_routes_of_a_group() -> None:
    clock = FakeClock()
    handled: list[str] = []
    router = Router()
    with router.group(prefix="site/{site}", middleware=[RateLimit(2, per=60, key="site", name="per-site", clock=clock)]) as g:
        g.on("temp", _append_to(handled, "temp"))
        g.on("humidity", _append_to(handled, "humidity"))
    per_route = RateLimit(2, per=60, key="site", clock=clock)
    with router.group(prefix="plant/{site}", middleware=[per_route]) as g:
        g.on("temp", _append_to(handled, "p-temp"))
        g.on("humidity", _append_to(handled, "p-humidity"))
    async with TestClient(router) as client:
        for topic in ("temp", "humidity", "temp", "humidity"):
            await client.publish(f"site/1/{topic}", "x")
            await client.publish(f"plant/1/{topic}", "x")
        await client.publish("site/2/temp", "x")
    assert handled.count("temp") + handled.count("humidity") == 3  # 2 for site 1 over both routes, 1 for site 2
    assert handled.count("p-temp") == 2 and handled.count("p-humidity") == 2  # unnamed: each route its own limit
    assert per_route.limited == {}


def _append_to(handled: list[str], name: str) -> Any:
    async def handler() -> None:
        handled.append(name)

    return handler


async def test_a_key_that_is_not_a_route_parameter_is_named_in_the_dead_letter() -> None:
    router = Router()
    router.on("x/{id}", _append_to([], "x"), middleware=[RateLimit(1, key="device_id")])
    async with TestClient(router) as client:
        result = await client.publish("x/1", "p")
    [dead] = result.dead_letters
    assert dead.error_type == "LookupError"
    assert "RateLimit(key='device_id') on route 'x/{id}'" in dead.error and "it has: id" in dead.error


# -- Redis ------------------------------------------------------------------------------------------


async def test_redis_window_is_shared_by_limiters_and_slides(redis_server: Any, unique_id: str) -> None:
    # Two limiters with the same prefix stand for two processes.
    first = RedisSlidingWindow(5, 0.5, url=redis_server.url, prefix=unique_id)
    second = RedisSlidingWindow(5, 0.5, url=redis_server.url, prefix=unique_id)
    try:
        results = [await (first if i % 2 else second).allow("dev-1") for i in range(8)]
        assert results == [True] * 5 + [False] * 3
        assert await first.allow("dev-2")  # another key
        started = time.monotonic()
        while not await first.allow("dev-1"):  # frees up once the window has slid past the first hits
            assert time.monotonic() - started < 10, "the window never slid"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.3  # not before the window (less Redis/loop jitter) passed
    finally:
        await first.close()
        await second.close()


def redis_env(url: str) -> dict[str, str]:
    return {"ENABLE_REDIS": "true", "REDIS_URL": url}


def test_a_redis_limit_with_redis_disabled_fails_at_startup_naming_the_route() -> None:
    router = limited_router(RateLimit(2, per=60, backend="redis"), [])
    with pytest.raises(RouteError, match=r"route 'dev/\{device_id\}/data' .*Redis is disabled: set ENABLE_REDIS=true"):
        check_rate_limits(router.routes, load_settings({}))
    check_rate_limits(router.routes, load_settings({"ENABLE_REDIS": "true"}))  # fine
    check_rate_limits(limited_router(RateLimit(2), []).routes, load_settings({}))  # memory: no Redis needed
    with pytest.raises(RouteError, match="ENABLE_REDIS"):  # the test client checks as the app's startup does
        with TestClient(router):
            pass


async def test_redis_backend_uses_the_application_settings_not_the_environment(
        redis_server: Any, unique_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there: must not be used
    limiter = RateLimit(2, per=60, key="device_id", backend="redis", redis_prefix=unique_id)
    handled: list[str] = []
    async with TestClient(limited_router(limiter, handled), env=redis_env(redis_server.url)) as client:
        for _ in range(3):
            await client.publish("dev/a/data", "x", qos=1)
    assert handled == ["a", "a"] and [d.error_type for d in client.dead_letters] == ["RateLimited"]
    assert limiter.redis_errors == 0


async def test_redis_unreachable_fails_open_by_default_logged_and_counted(
        redis_factory: Any, unique_id: str, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_factory()
    limiter = RateLimit(2, per=60, key="device_id", backend="redis", redis_prefix=unique_id)
    handled: list[str] = []
    async with TestClient(limited_router(limiter, handled), env=redis_env(server.url)) as client:
        for _ in range(4):
            await client.publish("dev/a/data", "x", qos=1)
        assert handled == ["a", "a"]
        assert [d.error_type for d in client.dead_letters] == ["RateLimited", "RateLimited"]
        server.stop()
        for _ in range(3):
            await client.publish("dev/a/data", "x", qos=1)
        assert handled == ["a"] * 5  # Redis down: let through unchecked...
        assert limiter.redis_errors == 3  # ...but counted
        server.start()  # same port, empty (no persistence): the window starts again
        for _ in range(3):
            await client.publish("dev/a/data", "x", qos=1)
    assert handled == ["a"] * 7
    assert limiter.redis_errors == 3 and limiter.counters()["redis_errors"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "core.rate_limit"]
    assert len(warnings) == 2, warnings  # one while down (not once per message), one when back
    assert "Redis unavailable" in warnings[0] and "letting messages through unchecked" in warnings[0]
    assert "Redis answers again" in warnings[1]


async def test_redis_unreachable_with_reject_dead_letters(redis_factory: Any, unique_id: str) -> None:
    server = redis_factory()
    limiter = RateLimit(5, per=60, backend="redis", redis_prefix=unique_id, on_redis_error="reject")
    handled: list[str] = []
    async with TestClient(limited_router(limiter, handled), env=redis_env(server.url)) as client:
        await client.publish("dev/a/data", "x", qos=1)
        server.stop()
        result = await client.publish("dev/a/data", "x", qos=1)
    assert handled == ["a"]
    [dead] = result.dead_letters
    assert dead.error_type == "RateLimitUnavailable" and "Redis unavailable" in dead.error
    assert limiter.redis_errors == 1


async def test_a_redis_that_does_not_answer_counts_as_unavailable(unique_id: str) -> None:
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        limiter = RateLimit(5, backend="redis", redis_url=url, redis_timeout=0.2, on_redis_error="reject")
        handled: list[str] = []
        async with TestClient(limited_router(limiter, handled), env={"ENABLE_REDIS": "true"}) as client:
            result = await client.publish("dev/a/data", "x", qos=1)
        await limiter._window.close()  # type: ignore[union-attr]
    assert handled == [] and [d.error_type for d in result.dead_letters] == ["RateLimitUnavailable"]
    assert "TimeoutError" in result.dead_letters[0].error


async def test_a_process_without_the_redis_client_dead_letters_naming_enable_redis(redis_server: Any) -> None:
    from core.integrations.rate_limit import REDIS_KEY

    router = limited_router(RateLimit(5, backend="redis"), [])
    async with TestClient(router, env=redis_env(redis_server.url)) as client:
        await client.services.extras.pop(REDIS_KEY).aclose()
        client._own_redis = False
        result = await client.publish("dev/a/data", "x", qos=1)
    [dead] = result.dead_letters
    assert dead.error_type == "RedisNotEnabled" and "ENABLE_REDIS=true" in dead.error


def test_ready_checks_the_redis_of_a_rate_limit_with_its_own_url() -> None:
    from core.operations.http import RedisCheck, route_checks

    settings = load_settings({"ENABLE_REDIS": "true", "REDIS_URL": "redis://main:6379/0"})
    router = Router()
    router.on("a/{x}", _append_to([], "a"), middleware=[RateLimit(1, backend="redis")])  # REDIS_URL: default check
    router.on("b/{x}", _append_to([], "b"), middleware=[RateLimit(1, backend="redis", redis_url="redis://:pw@other:6379/2")])
    [check] = route_checks(router.routes, settings)
    assert isinstance(check, RedisCheck) and check.url == "redis://:pw@other:6379/2"
    assert check.name == "redis redis://:***@other:6379/2 (rate limit)"  # no password in /ready


# -- across two worker processes --------------------------------------------------------------------


def test_redis_limit_holds_across_two_worker_processes(mosquitto_factory: Any, redis_factory: Any,  # noqa: F811
                                                       app_factory: Any, unique_id: str) -> None:
    """`RateLimit(5, per=3600, key="device_id", backend="redis")` on a shared route, `--workers 2`:
    exactly 5 per device get through, whichever worker each message lands on."""
    broker = mosquitto_factory()
    redis = redis_factory()
    app, url = app_factory(broker, "--workers", "2", ENABLE_REDIS="true", REDIS_URL=redis.url)
    wait_until_sync(lambda: ready(url), f"/ready to answer 200\n{app.output}", 60)
    route = "ops/{device_id}/limited"
    pub = Publisher(broker.host, broker.port, f"{unique_id}-pub")
    try:
        pub.subscribe("dead-letter/#")
        devices, per_device = 3, 12
        for i in range(devices * per_device):
            pub.publish(f"ops/dev{i % devices}/limited", "x")

        def done() -> Any:
            m = scrape(url)
            finished = metric(m, "mqtt_app_route_messages_received_total", route=route)
            return m if finished >= devices * per_device else None

        m = wait_until_sync(done, "every message to be handled or dead-lettered")
        wait_until_sync(lambda: len(pub.messages) >= devices * (per_device - 5), "the dead letters")
    finally:
        pub.close()
    assert metric(m, "mqtt_app_route_messages_handled_total", route=route) == devices * 5
    assert metric(m, "mqtt_app_rate_limited_total", route=route, action="dead_letter") == devices * (per_device - 5)
    assert metric(m, "mqtt_app_route_messages_dead_lettered_total", route=route) == devices * (per_device - 5)
    per_worker = [metric(m, "mqtt_app_messages_received_total", worker=w) for w in ("w0", "w1")]
    assert all(per_worker) and sum(per_worker) == devices * per_device, per_worker  # both workers took part
    dead = Counter(msg.topic for msg in pub.messages)
    assert dead == {f"dead-letter/ops/dev{d}/limited": per_device - 5 for d in range(devices)}
    assert all(dict(msg.properties.UserProperty)["error_type"] == "RateLimited" for msg in pub.messages)
    assert app.stop() == 0
