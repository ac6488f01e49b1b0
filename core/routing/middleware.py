"""The middleware protocol and the compiled chain around a handler.

A middleware is any object with `async def handle(self, context, call_next)`. It may look at or
change `context.payload` before calling `await call_next(context)`, skip the call to
short-circuit (its return value then stands for the handler's result), inspect the result, or
catch the handler's exception. The chain for a route is built once, at startup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from core.routing.context import MessageContext

CallNext = Callable[["MessageContext"], Awaitable[Any]]


@runtime_checkable
class Middleware(Protocol):
    async def handle(self, context: "MessageContext", call_next: CallNext) -> Any: ...


class BaseMiddleware:
    """Convenience base class: pass-through unless `handle` is overridden."""

    async def handle(self, context: "MessageContext", call_next: CallNext) -> Any:
        return await call_next(context)

    def __repr__(self) -> str:
        return type(self).__name__


def check_middleware(item: object, where: str) -> Middleware:
    """Fail at startup, naming the route, if `item` is not usable as middleware."""
    if isinstance(item, type):
        raise TypeError(f"{where}: middleware {item.__name__} is a class; pass an instance, e.g. {item.__name__}()")
    handle = getattr(item, "handle", None)
    if handle is None or not callable(handle):
        raise TypeError(f"{where}: middleware {item!r} has no `async def handle(self, context, call_next)` method")
    return item  # type: ignore[return-value]


def build_chain(middleware: Sequence[Middleware], endpoint: CallNext) -> CallNext:
    """Compose the chain: the first middleware is outermost, `endpoint` runs the handler."""
    call: CallNext = endpoint
    for mw in reversed(middleware):
        call = _bind(mw, call)
    return call


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    handle = mw.handle

    def step(context: "MessageContext") -> Awaitable[Any]:
        return handle(context, call_next)

    return step
