"""How handler arguments are bound by name, and the startup errors when they cannot be."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from core.routing.context import MessageContext, Services
from core.controller import Controller
from core.routing.handler import HandlerSpec, is_async_callable
from core.router import RouteError, Router

THIS_MODULE = __name__


class _Publisher:
    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: dict[str, Any] | None = None) -> None:
        return None


def make_context(route_pattern: str, topic: str, payload: Any, handler: Any) -> MessageContext:
    router = Router()
    route = router.on(route_pattern, handler)
    params = route.match(topic)
    assert params is not None
    services = Services(_Publisher(), worker_id="w1")
    return MessageContext(topic, params, payload, b"raw", 1, False, False, None, route, services)


def test_binds_params_and_reserved_arguments_by_name() -> None:
    async def fn(device_id: str, payload: Any, topic: str, client: Any, context: MessageContext) -> None:
        return None

    ctx = make_context("d/{device_id}/{kind}", "d/42/status", {"a": 1}, fn)
    kwargs = ctx.route.handler.arguments(ctx)
    assert kwargs == {"device_id": "42", "payload": {"a": 1}, "topic": "d/42/status", "client": ctx.services.publisher,
                      "context": ctx}


def test_only_asked_for_arguments_are_passed() -> None:
    def fn(kind: str) -> None:
        return None

    ctx = make_context("d/{device_id}/{kind}", "d/42/status", "x", fn)
    assert ctx.route.handler.arguments(ctx) == {"kind": "status"}


def test_var_keyword_receives_all_params() -> None:
    async def fn(payload: Any, **params: str) -> None:
        return None

    ctx = make_context("d/{device_id}/{rest:#}", "d/42/a/b", "x", fn)
    assert ctx.route.handler.arguments(ctx) == {"device_id": "42", "rest": "a/b", "payload": "x"}


def test_unknown_argument_with_default_is_left_alone() -> None:
    async def fn(device_id: str, retries: int = 3) -> None:
        return None

    ctx = make_context("d/{device_id}", "d/1", "x", fn)
    assert ctx.route.handler.arguments(ctx) == {"device_id": "1"}


def test_unknown_argument_without_default_fails_at_registration() -> None:
    async def fn(sensor_id: str, payload: Any) -> None:
        return None

    with pytest.raises(RouteError) as info:
        Router().on("devices/{device_id}", fn)
    message = str(info.value)
    assert "'sensor_id'" in message and "'devices/{device_id}'" in message and THIS_MODULE in message
    assert "device_id" in message  # lists what it could have asked for


def test_instance_method_gets_a_hint() -> None:
    class Devices(Controller):
        async def status(self, device_id: str) -> None:
            return None

    with pytest.raises(RouteError, match="staticmethod"):
        Router().on("devices/{device_id}", Devices.status)
    # A bound method is fine.
    route = Router().on("devices/{device_id}", Devices().status)
    assert route.handler.is_async


def test_positional_only_argument_is_rejected() -> None:
    def fn(device_id: str, /) -> None:
        return None

    with pytest.raises(RouteError, match="positional-only"):
        Router().on("devices/{device_id}", fn)


def test_not_callable_is_rejected() -> None:
    with pytest.raises(RouteError, match="not callable"):
        Router().on("devices/x", "not a function")  # type: ignore[arg-type]


def test_async_detection() -> None:
    async def coro(payload: Any) -> None:
        return None

    def plain(payload: Any) -> None:
        return None

    class AsyncCallable:
        async def __call__(self, payload: Any) -> None:
            return None

    class SyncCallable:
        def __call__(self, payload: Any) -> None:
            return None

    assert is_async_callable(coro)
    assert is_async_callable(functools.partial(coro))
    assert is_async_callable(AsyncCallable())
    assert not is_async_callable(plain)
    assert not is_async_callable(SyncCallable())
    assert not is_async_callable(functools.partial(plain))


def test_partial_binds_remaining_arguments() -> None:
    async def fn(prefix: str, device_id: str, payload: Any) -> None:
        return None

    spec = HandlerSpec(functools.partial(fn, "p"), ("device_id",), "route 'x'")
    assert spec.is_async
    assert spec.name.endswith("fn")
    ctx = make_context("d/{device_id}", "d/9", "x", functools.partial(fn, "p"))
    assert ctx.route.handler.arguments(ctx) == {"device_id": "9", "payload": "x"}


def test_handler_name_is_module_and_qualname() -> None:
    class Devices(Controller):
        @staticmethod
        async def status(device_id: str) -> None:
            return None

    route = Router().on("d/{device_id}", Devices.status)
    assert route.handler.name == f"{THIS_MODULE}.test_handler_name_is_module_and_qualname.<locals>.Devices.status"
