"""The router API of RouteMQ (the seed's docs, shared/reference/004) works unchanged, over this framework's routes.

See docs/routemq.md for the mapping.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pydantic import BaseModel

from core.routing.middleware import BaseMiddleware
from core.router import Route, RouteError, Router, merge_routers
from core.routing.router_registry import RouterRegistry
from core.routing.validation import PayloadValidationError

CALLS: list[dict[str, Any]] = []


async def status(device_id: str, payload: Any, client: Any) -> str:
    CALLS.append({"device_id": device_id, "payload": payload, "client": client})
    return f"status of {device_id}"


def sync_command(device_id: str, payload: Any, client: Any) -> str:
    CALLS.append({"device_id": device_id, "payload": payload, "client": client,
                  "thread": threading.current_thread().name})
    return "done"


class Reading(BaseModel):
    value: float


async def reading(sensor_id: str, payload: Reading) -> float:
    return payload.value * 2


class Tag(BaseMiddleware):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def handle(self, context: Any, call_next: Any) -> Any:
        self.seen.append(self.name)
        context.payload = {**context.payload, "tagged": self.name}
        return await call_next(context)


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


def test_route_topic_is_the_pattern_as_registered_with_the_group_prefix() -> None:
    router = Router()
    plain = router.on("devices/{device_id}/status", status, qos=1)
    sensors = router.group(prefix="sensors")
    grouped = sensors.on("{sensor_id}/data", reading, qos=2, shared=True)
    assert (plain.topic, plain.qos) == ("devices/{device_id}/status", 1)
    assert (grouped.topic, grouped.qos) == ("sensors/{sensor_id}/data", 2)
    assert [route.topic for route in router.routes] == ["devices/{device_id}/status", "sensors/{sensor_id}/data"]


def test_group_without_with_adds_to_the_router() -> None:
    router = Router()
    group = router.group(prefix="api/v1")
    group.on("devices/{device_id}", status)
    assert [route.topic for route in router.routes] == ["api/v1/devices/{device_id}"]


def test_a_bare_route_matches_topics_returning_params_or_none() -> None:
    route = Route("devices/{device_id}/status", status)
    assert route.matches("devices/42/status") == {"device_id": "42"}
    assert route.matches("devices/42/other") is None
    assert route.matches("devices/42") is None
    assert Route("logs/{path:#}", status_any).matches("logs/a/b/c") == {"path": "a/b/c"}
    assert Route("plain/topic", status_any).matches("plain/topic") == {}
    # The same checks as a router's: a bad pattern or a handler it cannot call is a RouteError naming it.
    with pytest.raises(RouteError, match=r"'devices/\{a\}/\{a\}'"):
        Route("devices/{a}/{a}", status_any)
    with pytest.raises(RouteError, match="device_id"):
        Route("devices/{id}/status", status)
    with pytest.raises(RouteError, match="qos"):
        Route("devices/{device_id}", status, qos=3)


async def status_any(**params: Any) -> None:
    return None


def test_a_bare_route_carries_its_options() -> None:
    route = Route("sensors/{sensor_id}/data", reading, qos=1, shared=True, worker_count=3)
    assert (route.topic, route.qos, route.shared, route.worker_count) == ("sensors/{sensor_id}/data", 1, True, 3)
    assert route.get_subscription_topic("workers") == "$share/workers/sensors/+/data"
    assert route.handler.fn is reading


def test_subscription_topic_is_share_prefixed_for_a_shared_route_only() -> None:
    router = Router()
    shared = router.on("sensors/{sensor_id}/data", reading, shared=True, worker_count=2)
    plain = router.on("devices/{device_id}/status", status)
    assert shared.get_subscription_topic("production_workers") == "$share/production_workers/sensors/+/data"
    assert plain.get_subscription_topic("production_workers") == "devices/+/status"
    assert shared.get_subscription_topic() == "sensors/+/data"  # no group given: the filter itself
    assert shared.get_subscription_topic("g") == shared.subscription_topic("g")


async def test_dispatch_calls_the_handler_with_params_payload_and_client_as_keywords() -> None:
    router = Router()
    router.on("devices/{device_id}/status", status, qos=1)
    client = object()
    result = await router.dispatch("devices/42/status", {"state": "on"}, client)
    assert result == "status of 42"
    assert CALLS == [{"device_id": "42", "payload": {"state": "on"}, "client": client}]


async def test_dispatch_decodes_bytes_per_route_and_runs_sync_handlers_off_the_loop() -> None:
    router = Router()
    router.on("devices/{device_id}/command", sync_command)
    assert await router.dispatch("devices/7/command", b'{"do": "reboot"}', "the-client") == "done"
    (call,) = CALLS
    assert call["payload"] == {"do": "reboot"} and call["client"] == "the-client"
    assert call["thread"] != threading.current_thread().name


async def test_dispatch_runs_middleware_and_payload_validation() -> None:
    seen: list[str] = []
    router = Router()
    with router.group(prefix="devices", middleware=[Tag("outer", seen)]) as devices:
        devices.on("{device_id}/status", status, middleware=[Tag("inner", seen)])
    await router.dispatch("devices/1/status", {"state": "off"}, None)
    assert seen == ["outer", "inner"]
    assert CALLS[0]["payload"] == {"state": "off", "tagged": "inner"}

    router.on("sensors/{sensor_id}/data", reading)
    assert await router.dispatch("sensors/s1/data", {"value": "2.5"}, None) == 5.0
    with pytest.raises(PayloadValidationError, match="value"):
        await router.dispatch("sensors/s1/data", {"value": "warm"}, None)


async def test_dispatch_with_no_matching_route_raises_naming_the_topic() -> None:
    router = Router()
    router.on("devices/{device_id}/status", status)
    with pytest.raises(RouteError, match="'nothing/here'"):
        await router.dispatch("nothing/here", {}, None)
    assert CALLS == []


async def test_dispatch_runs_every_matching_route_once_as_a_delivered_message_does() -> None:
    router = Router()
    router.on("devices/{device_id}/status", status)
    overlapping: list[str] = []
    router.on("devices/+/#", lambda topic: overlapping.append(topic))
    router.on("other/{x}", status_any)
    assert await router.dispatch("devices/3/status", "x", None) == "status of 3"
    assert [call["device_id"] for call in CALLS] == ["3"]
    assert overlapping == ["devices/3/status"]


def test_router_registry_loads_the_apps_routers_like_startup_does() -> None:
    from bootstrap.app import discover_routers

    loaded = RouterRegistry("app.routers").discover_and_load_routers()
    assert isinstance(loaded, Router)
    expected = merge_routers(discover_routers("app.routers"))
    assert [route.topic for route in loaded.routes] == [route.topic for route in expected.routes]
    assert RouterRegistry().router_directory == "app.routers"


def test_router_registry_fails_loudly_on_a_missing_package() -> None:
    from bootstrap.app import DiscoveryError

    with pytest.raises(DiscoveryError, match="no_such_routers"):
        RouterRegistry("tests.apps.no_such_routers").discover_and_load_routers()
