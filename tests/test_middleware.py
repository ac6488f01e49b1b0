"""The middleware chain: order, short-circuit, payload changes, seeing results and exceptions."""

from __future__ import annotations

from typing import Any

import pytest

from core.routing.context import MessageContext, Services
from core.routing.middleware import BaseMiddleware, CallNext, build_chain, check_middleware
from core.router import Router


class _Publisher:
    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, *,
                      properties: dict[str, Any] | None = None) -> None:
        return None


async def _noop(payload: Any) -> None:
    return None


def make_context(payload: Any = "p") -> MessageContext:
    route = Router().on("t/{x}", _noop)
    return MessageContext("t/1", {"x": "1"}, payload, b"p", 0, False, False, None, route, Services(_Publisher()))


class Recorder(BaseMiddleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
        self.log.append(f"{self.name}:before")
        result = await call_next(context)
        self.log.append(f"{self.name}:after:{result}")
        return result


async def test_first_middleware_is_outermost() -> None:
    log: list[str] = []

    async def endpoint(context: MessageContext) -> str:
        log.append("handler")
        return "r"

    chain = build_chain([Recorder("a", log), Recorder("b", log), Recorder("c", log)], endpoint)
    assert await chain(make_context()) == "r"
    assert log == ["a:before", "b:before", "c:before", "handler", "c:after:r", "b:after:r", "a:after:r"]


async def test_group_middleware_wraps_route_middleware() -> None:
    log: list[str] = []

    async def handler(payload: Any) -> str:
        log.append("handler")
        return "ok"

    router = Router(middleware=[Recorder("router", log)])
    with router.group(prefix="g", middleware=[Recorder("group", log)]) as group:
        with group.group(prefix="n", middleware=[Recorder("nested", log)]) as nested:
            route = nested.on("{x}", handler, middleware=[Recorder("route1", log), Recorder("route2", log)])

    async def endpoint(context: MessageContext) -> Any:
        return await handler(context.payload)

    chain = build_chain(route.middleware, endpoint)
    assert await chain(make_context()) == "ok"
    assert log[:6] == ["router:before", "group:before", "nested:before", "route1:before", "route2:before", "handler"]
    assert log[6:] == [f"{n}:after:ok" for n in ("route2", "route1", "nested", "group", "router")]


async def test_short_circuit_skips_handler_and_inner_middleware() -> None:
    log: list[str] = []

    class Deny(BaseMiddleware):
        async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
            return {"denied": True}

    async def endpoint(context: MessageContext) -> str:
        log.append("handler")
        return "r"

    chain = build_chain([Recorder("outer", log), Deny(), Recorder("inner", log)], endpoint)
    assert await chain(make_context()) == {"denied": True}
    assert log == ["outer:before", "outer:after:{'denied': True}"]


async def test_middleware_can_replace_payload_and_result() -> None:
    class Upper(BaseMiddleware):
        async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
            context.payload = context.payload.upper()
            result = await call_next(context)
            return f"<{result}>"

    async def endpoint(context: MessageContext) -> str:
        return context.payload

    assert await build_chain([Upper()], endpoint)(make_context("hello")) == "<HELLO>"


async def test_middleware_sees_and_can_swallow_exceptions() -> None:
    seen: list[BaseException] = []

    class Catch(BaseMiddleware):
        async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
            try:
                return await call_next(context)
            except ValueError as exc:
                seen.append(exc)
                return "recovered"

    class Observe(BaseMiddleware):
        async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
            try:
                return await call_next(context)
            except ValueError as exc:
                seen.append(exc)
                raise

    async def endpoint(context: MessageContext) -> str:
        raise ValueError("boom")

    assert await build_chain([Catch(), Observe()], endpoint)(make_context()) == "recovered"
    assert [str(e) for e in seen] == ["boom", "boom"]
    with pytest.raises(ValueError, match="boom"):
        await build_chain([Observe()], endpoint)(make_context())


async def test_context_state_is_shared_along_the_chain() -> None:
    class Mark(BaseMiddleware):
        async def handle(self, context: MessageContext, call_next: CallNext) -> Any:
            context.state["mark"] = "set by middleware"
            return await call_next(context)

    async def endpoint(context: MessageContext) -> str:
        return context.state["mark"]

    assert await build_chain([Mark()], endpoint)(make_context()) == "set by middleware"


def test_check_middleware() -> None:
    assert check_middleware(BaseMiddleware(), "route 'x'") is not None

    class Duck:
        async def handle(self, context: Any, call_next: Any) -> Any:
            return await call_next(context)

    check_middleware(Duck(), "route 'x'")
    with pytest.raises(TypeError, match="is a class"):
        check_middleware(BaseMiddleware, "route 'x'")
    with pytest.raises(TypeError, match="route 'x'"):
        check_middleware(object(), "route 'x'")
