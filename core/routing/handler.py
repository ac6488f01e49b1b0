"""How a handler's arguments are chosen: by name, decided once at startup.

A handler may take any of the route's parameters by name, and any of the reserved names
`payload`, `topic`, `client`, `context`. A `payload` annotated with a pydantic model or a
dataclass is validated first (`core.routing.validation`). A `**kwargs` parameter receives all route parameters.
Arguments it cannot be given (an unknown name without a default) are a startup error.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from concurrent.futures import Executor
from contextvars import copy_context
from typing import Any, Awaitable, Callable

from core.routing.context import MessageContext
from core.routing.validation import payload_getter

RESERVED_ARGUMENTS = frozenset({"payload", "topic", "client", "context"})

_RESERVED_GETTERS: dict[str, Callable[[MessageContext], Any]] = {
    "payload": lambda c: c.payload,
    "topic": lambda c: c.topic,
    "client": lambda c: c.services.publisher,
    "context": lambda c: c,
}


def handler_name(fn: Callable[..., Any]) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or repr(target)
    return f"{module}.{qualname}"


def is_async_callable(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class HandlerSpec:
    """A handler plus the plan for calling it."""

    __slots__ = ("fn", "name", "is_async", "_reserved", "_params", "_all_params")

    def __init__(self, fn: Callable[..., Any], route_params: tuple[str, ...], where: str) -> None:
        if not callable(fn):
            raise TypeError(f"{where}: handler {fn!r} is not callable")
        self.fn = fn
        self.name = handler_name(fn)
        self.is_async = is_async_callable(fn)
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: cannot read the signature of handler {self.name}: {exc}") from None
        reserved: list[tuple[str, Callable[[MessageContext], Any]]] = []
        params: list[str] = []
        all_params = False
        for arg in signature.parameters.values():
            if arg.kind is inspect.Parameter.VAR_KEYWORD:
                all_params = True
                continue
            if arg.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if arg.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(f"{where}: handler {self.name} has a positional-only argument {arg.name!r}; arguments are passed by name")
            if arg.name in RESERVED_ARGUMENTS:
                getter = _RESERVED_GETTERS[arg.name]
                if arg.name == "payload" and arg.annotation is not inspect.Parameter.empty:
                    getter = payload_getter(fn, arg, where) or getter
                reserved.append((arg.name, getter))
            elif arg.name in route_params:
                params.append(arg.name)
            elif arg.default is inspect.Parameter.empty:
                hint = " (an instance method? use @staticmethod, or register a bound method)" if arg.name == "self" else ""
                raise TypeError(
                    f"{where}: handler {self.name} takes {arg.name!r}, which is neither a parameter of the route "
                    f"({', '.join(route_params) or 'none'}) nor one of {', '.join(sorted(RESERVED_ARGUMENTS))}{hint}"
                )
        self._reserved = tuple(reserved)
        self._params = tuple(params)
        self._all_params = all_params

    def arguments(self, context: MessageContext) -> dict[str, Any]:
        """Keyword arguments for one call."""
        if self._all_params:
            kwargs = dict(context.params)
        else:
            p = context.params
            kwargs = {name: p[name] for name in self._params}
        for name, getter in self._reserved:
            kwargs[name] = getter(context)
        return kwargs

    def caller(self, executor: Executor | None) -> Callable[[MessageContext], Awaitable[Any]]:
        """The innermost step of a route's chain: call the handler with the arguments it asks for
        (a plain function runs in `executor`; None is the loop's default executor)."""
        fn = self.fn
        arguments = self.arguments
        if self.is_async:
            async def call_async(context: MessageContext) -> Any:
                return await fn(**arguments(context))

            return call_async

        def call_sync(context: MessageContext) -> Awaitable[Any]:
            # In this message's context (its trace, the app's contextvars): an executor does not copy it.
            return asyncio.get_running_loop().run_in_executor(executor, functools.partial(copy_context().run, fn,
                                                                                          **arguments(context)))

        return call_sync
