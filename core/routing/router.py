"""Routes: topic patterns mapped to handlers, grouped with prefixes and middleware.

A pattern is a topic filter whose levels may name parameters:

- `{name}` matches one level (MQTT `+`) and passes it to the handler as `name`;
- `{name:#}` matches the rest of the topic (MQTT `#`, last level only), joined with `/`;
- a bare `+` or `#` is an MQTT wildcard whose value is not passed;
- anything else matches literally.

Every route compiles to one MQTT subscription. When several routes match a message, each of them
runs, once (see README, "Overlapping routes"). Invalid patterns and duplicate routes raise
`RouteError` at registration, naming the pattern and the module that registered it.
"""

from __future__ import annotations

import difflib
import inspect
import keyword
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Sequence

from core.routing.handler import RESERVED_ARGUMENTS, HandlerSpec
from core.routing.middleware import Middleware, check_middleware
from core.routing.payload import PAYLOAD_FORMATS
from core.routing.retry_policy import Retry, route_retry
from core.routing.route_options import RouteError, check_ordered_option  # RouteError: also imported from here
from core.routing.topic_trie import TopicTrie
from core.foundation.mqtt_text import string_problem


# Every keyword a route takes (`Router.on`, `.route`, `.stream`, `Route(...)`): name -> default.
# Those that are also parameters of `Router._add` become fields of `Route`; the others are kept in
# `Route.options`. Add a new route option here (and, for a field, to `Router.on`/`_add`/`Route`).
# Any other keyword fails at registration, unless a middleware of the route declares it in its
# `route_options` attribute (then it is kept in `Route.options` for that middleware to read).
ROUTE_OPTIONS: dict[str, Any] = {
    "qos": 0, "shared": False, "worker_count": 1, "middleware": (), "payload_format": "auto", "timeout": None,
    "stream": None, "name": None,
    "ordered": False,  # one message per topic at a time, in arrival order (core.runtime.ordering); `route.ordered`
    "retry": None, "retries": None, "retry_backoff": None,  # the retry policy (core.runtime.retry)
    "meta": None,  # a free-form dict for middleware and tools: `route.options["meta"]`
}

# The pattern of a consumer-only stream route (`Router.stream`): `$stream/<name>`, never an MQTT topic.
STREAM_PATTERN_PREFIX = "$stream/"


@dataclass(frozen=True)
class CompiledPattern:
    pattern: str
    filter: str
    params: tuple[str, ...]
    levels: tuple[str | None, ...]  # literal level text, or None for a wildcard level
    slots: tuple[tuple[int, str], ...]  # (level index, parameter name) of single-level parameters
    tail: tuple[int, str] | None  # (level index, name) of a multi-level parameter
    multi_level: bool  # ends in '#'

    def extract(self, levels: Sequence[str]) -> dict[str, str] | None:
        """Parameters of a topic (already split on '/'), or None if the topic does not match."""
        pattern_levels = self.levels
        n = len(pattern_levels)
        if self.multi_level:
            # `a/#` matches `a` too: the '#' level may be absent.
            if len(levels) < n - 1:
                return None
            check = n - 1
        else:
            if len(levels) != n:
                return None
            check = n
        for i in range(check):
            lit = pattern_levels[i]
            if lit is not None and lit != levels[i]:
                return None
        if levels and levels[0].startswith("$") and pattern_levels and pattern_levels[0] is None:
            return None
        params = {name: levels[i] for i, name in self.slots}
        if self.tail is not None:
            index, name = self.tail
            params[name] = "/".join(levels[index:])
        return params


def compile_pattern(pattern: str) -> CompiledPattern:
    """Turn a route pattern into its MQTT filter and parameter plan; ValueError if invalid."""
    if not isinstance(pattern, str) or pattern == "":
        raise ValueError("the pattern must be a non-empty string")
    if pattern.startswith("$share/") or pattern == "$share":
        raise ValueError("do not write '$share/...' in a pattern; use shared=True (the group is MQTT_GROUP_NAME)")
    problem = string_problem(pattern)  # the broker would drop the connection at every SUBSCRIBE
    if problem is not None:
        raise ValueError(f"the pattern {problem}")
    raw_levels = pattern.split("/")
    filter_levels: list[str] = []
    literal_levels: list[str | None] = []
    slots: list[tuple[int, str]] = []
    params: list[str] = []
    tail: tuple[int, str] | None = None
    multi_level = False
    last = len(raw_levels) - 1
    for i, level in enumerate(raw_levels):
        if level.startswith("{") and level.endswith("}"):
            name, _, kind = level[1:-1].partition(":")
            if kind not in ("", "+", "#"):
                raise ValueError(f"parameter {level!r}: the kind after ':' must be '+' (one level) or '#' (the rest)")
            _check_param_name(name, params)
            params.append(name)
            if kind == "#":
                if i != last:
                    raise ValueError(f"multi-level parameter {level!r} must be the last level")
                tail = (i, name)
                multi_level = True
                filter_levels.append("#")
            else:
                slots.append((i, name))
                filter_levels.append("+")
            literal_levels.append(None)
        elif level == "#":
            if i != last:
                raise ValueError("'#' must be the last level")
            multi_level = True
            filter_levels.append("#")
            literal_levels.append(None)
        elif level == "+":
            filter_levels.append("+")
            literal_levels.append(None)
        else:
            for ch in "+#{}":
                if ch in level:
                    raise ValueError(
                        f"level {level!r} mixes {ch!r} with other characters; a wildcard or parameter must be a whole level"
                    )
            filter_levels.append(level)
            literal_levels.append(level)
    return CompiledPattern(
        pattern=pattern,
        filter="/".join(filter_levels),
        params=tuple(params),
        levels=tuple(literal_levels),
        slots=tuple(slots),
        tail=tail,
        multi_level=multi_level,
    )


def _check_param_name(name: str, seen: list[str]) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"parameter name {name!r} is not a valid Python identifier")
    if name in RESERVED_ARGUMENTS:
        raise ValueError(
            f"parameter name {name!r} is reserved for the handler argument of that name "
            f"({', '.join(sorted(RESERVED_ARGUMENTS))}); rename the parameter"
        )
    if name in seen:
        raise ValueError(f"parameter name {name!r} is used twice")


@dataclass(eq=False)
class Route:
    """One pattern bound to one handler, with its delivery options."""

    pattern: str
    handler: HandlerSpec
    # Keyword-only, so `Route(pattern, handler, qos, ...)` reads as in RouteMQ; left out, it is compiled
    # (with every check of `Router.on`) in __post_init__.
    compiled: CompiledPattern = field(default=None, kw_only=True)  # type: ignore[assignment]
    qos: int = 0
    shared: bool = False
    worker_count: int = 1
    middleware: tuple[Middleware, ...] = ()
    payload_format: str = "auto"
    timeout: float | None = None
    stream: str | None = None
    name: str = ""
    module: str = "?"
    options: dict[str, Any] = field(default_factory=dict)
    retry: Retry | None = None  # None: the default of its kind (MQTT: no retries; stream: STREAM_MAX_RETRIES)
    subscribe: bool = True  # False: a consumer of a Redis stream only (`Router.stream`), no MQTT subscription

    def __post_init__(self) -> None:
        if self.compiled is None:  # written by hand, `Route(pattern, handler)`: build it as a router would
            module = sys._getframe(2).f_globals.get("__name__", "?")
            built = Router()._add(
                self.pattern, self.handler, module, qos=self.qos, shared=self.shared, worker_count=self.worker_count,
                middleware=self.middleware, payload_format=self.payload_format, timeout=self.timeout,
                stream=self.stream, name=self.name or None, options=self.options, subscribe=self.subscribe,
                retry=self.retry,
            )
            for f in fields(self):
                setattr(self, f.name, getattr(built, f.name))

    @property
    def filter(self) -> str:
        return self.compiled.filter

    @property
    def topic(self) -> str:
        """The pattern as registered, group prefix included (RouteMQ's name for `pattern`)."""
        return self.pattern

    @property
    def params(self) -> tuple[str, ...]:
        return self.compiled.params

    @property
    def ordered(self) -> bool:
        """`ordered=True`: the messages of one topic are handled one at a time, in arrival order."""
        return bool(self.options.get("ordered", False))

    def subscription_topic(self, group: str) -> str:
        """What this route subscribes to: `$share/<group>/<filter>` when shared."""
        return f"$share/{group}/{self.compiled.filter}" if self.shared else self.compiled.filter

    def match(self, topic: str) -> dict[str, str] | None:
        """The route parameters of `topic`, or None if this route's filter does not match it."""
        return self.compiled.extract(topic.split("/"))

    matches = match  # RouteMQ's name

    def get_subscription_topic(self, group_name: str | None = None) -> str:
        """RouteMQ's name for `subscription_topic`; without a group, the MQTT filter itself."""
        return self.subscription_topic(group_name) if group_name else self.compiled.filter

    def describe(self) -> str:
        return f"route {self.pattern!r} (registered in {self.module})"

    def __repr__(self) -> str:
        return f"<Route {self.pattern!r} -> {self.handler.name}>"


def _join(prefix: str, pattern: str) -> str:
    if not prefix:
        return pattern
    if not pattern:
        return prefix
    return prefix.rstrip("/") + "/" + pattern.lstrip("/")


class Router:
    """A list of routes. Modules in `app/routers` expose one as `router`; they are merged at startup."""

    def __init__(self, prefix: str = "", middleware: Sequence[Middleware] = ()) -> None:
        self.routes: list[Route] = []
        self._by_key: dict[tuple[str, bool], Route] = {}  # (filter, shared) -> route, shared with groups
        self._prefix = prefix
        self._middleware: tuple[Middleware, ...] = tuple(middleware)
        self._root: Router = self

    def on(
        self,
        pattern: str,
        handler: Callable[..., Any],
        *,
        qos: int = 0,
        shared: bool = False,
        worker_count: int = 1,
        middleware: Sequence[Middleware] = (),
        payload_format: str = "auto",
        timeout: float | None = None,
        stream: str | None = None,
        name: str | None = None,
        retry: Retry | None = None,
        retries: int | None = None,
        retry_backoff: float | Sequence[float] | None = None,
        **options: Any,
    ) -> Route:
        """Register `handler` for topics matching `pattern`; returns the Route.

        `retries`/`retry_backoff` (or `retry=Retry(...)`): how failures are retried (core.runtime.retry).
        """
        module = sys._getframe(1).f_globals.get("__name__", "?")
        return self._add(
            pattern, handler, module, qos=qos, shared=shared, worker_count=worker_count, middleware=middleware,
            payload_format=payload_format, timeout=timeout, stream=stream, name=name, options=options,
            retry=retry, retries=retries, retry_backoff=retry_backoff,
        )

    def stream(
        self,
        stream: str,
        handler: Callable[..., Any],
        *,
        shared: bool = True,
        middleware: Sequence[Middleware] = (),
        payload_format: str = "auto",
        timeout: float | None = None,
        name: str | None = None,
        retry: Retry | None = None,
        retries: int | None = None,
        retry_backoff: float | Sequence[float] | None = None,
        **options: Any,
    ) -> Route:
        """Consume the Redis stream `stream`, written by other systems (no MQTT subscription; see docs/streams.md).

        `shared=True` (the default) consumes it in the worker processes, `shared=False` in the main one.
        """
        module = sys._getframe(1).f_globals.get("__name__", "?")
        if not isinstance(stream, str) or not stream or any(c in stream for c in "+#{}") or stream.startswith("$"):
            raise RouteError(f"stream route {stream!r} (registered in {module}): the stream name must be non-empty, "
                             "free of '+', '#', '{', '}' and not start with '$'")
        return self._add(
            f"{STREAM_PATTERN_PREFIX}{stream}", handler, module, qos=0, shared=shared, worker_count=1,
            middleware=middleware, payload_format=payload_format, timeout=timeout, stream=stream, name=name,
            options=options, subscribe=False, retry=retry, retries=retries, retry_backoff=retry_backoff,
        )

    def route(self, pattern: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of `on`."""
        module = sys._getframe(1).f_globals.get("__name__", "?")

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            options = dict(kwargs)
            self._add(pattern, fn, module, **_split_options(options))
            return fn

        return decorate

    def group(self, prefix: str = "", middleware: Sequence[Middleware] = ()) -> "Router":
        """A sub-router whose routes get `prefix` and `middleware` (outermost first); usable with `with`."""
        child = Router(_join(self._prefix, prefix), (*self._middleware, *middleware))
        child.routes = self.routes
        child._by_key = self._by_key
        child._root = self._root
        return child

    def include(self, other: "Router", prefix: str = "", middleware: Sequence[Middleware] = ()) -> None:
        """Add every route of `other` under this router's prefix and middleware."""
        for route in other.routes:
            self._add(
                _join(prefix, route.pattern) if route.subscribe else route.pattern, route.handler.fn, route.module,
                qos=route.qos, shared=route.shared,
                worker_count=route.worker_count, middleware=(*middleware, *route.middleware),
                payload_format=route.payload_format, timeout=route.timeout, stream=route.stream,
                name=route.name, options=dict(route.options), subscribe=route.subscribe, retry=route.retry,
            )

    async def dispatch(self, topic: str, payload: Any, client: Any) -> Any:
        """Run the routes matching `topic` now, without a broker: each handler gets its route parameters,
        `payload` and `client` as keywords (RouteMQ's worker API; see `core.routing.direct_dispatch`)."""
        from core.routing.direct_dispatch import dispatch  # late: it imports the dispatcher, which imports this module

        return await dispatch(self.routes, topic, payload, client)

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def _add(
        self,
        pattern: str,
        handler: Callable[..., Any],
        module: str,
        *,
        qos: int,
        shared: bool,
        worker_count: int,
        middleware: Sequence[Middleware],
        payload_format: str,
        timeout: float | None,
        stream: str | None,
        name: str | None,
        options: dict[str, Any],
        subscribe: bool = True,
        retry: Retry | None = None,
        retries: Any = None,
        retry_backoff: Any = None,
    ) -> Route:
        full = _join(self._prefix, pattern) if isinstance(pattern, str) and subscribe else pattern
        where = f"route {full!r} (registered in {module})"
        try:
            compiled = compile_pattern(full)
        except ValueError as exc:
            raise RouteError(f"{where}: {exc}") from None
        if qos not in (0, 1, 2):
            raise RouteError(f"{where}: qos must be 0, 1 or 2, not {qos!r}")
        if not isinstance(shared, bool):
            raise RouteError(f"{where}: shared must be True or False, not {shared!r}")
        if not isinstance(worker_count, int) or isinstance(worker_count, bool) or worker_count < 1:
            raise RouteError(f"{where}: worker_count must be a whole number >= 1, not {worker_count!r}")
        if worker_count > 1 and not shared:
            raise RouteError(f"{where}: worker_count={worker_count} needs shared=True (only shared routes run in workers)")
        if payload_format not in PAYLOAD_FORMATS:
            raise RouteError(f"{where}: payload_format must be one of {', '.join(PAYLOAD_FORMATS)}, not {payload_format!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise RouteError(f"{where}: timeout must be a positive number of seconds, not {timeout!r}")
        try:
            policy = route_retry(retry, retries, retry_backoff)
        except ValueError as exc:
            raise RouteError(f"{where}: {exc}") from None
        chain: list[Middleware] = []
        for mw in (*self._middleware, *middleware):
            try:
                chain.append(check_middleware(mw, where))
            except TypeError as exc:
                raise RouteError(str(exc)) from None
        _check_options(options, chain, where)
        if "ordered" in options:
            try:
                check_ordered_option(options["ordered"], worker_count, stream)
            except ValueError as exc:
                raise RouteError(f"{where}: {exc}") from None
        try:
            spec = HandlerSpec(handler, compiled.params, where)
        except TypeError as exc:
            raise RouteError(str(exc)) from None
        existing = self._by_key.get((compiled.filter, shared))
        if existing is not None:
            raise RouteError(_duplicate_message(where, existing))
        route = Route(
            pattern=full, handler=spec, compiled=compiled, qos=qos, shared=shared, worker_count=worker_count,
            middleware=tuple(chain), payload_format=payload_format, timeout=timeout, stream=stream,
            name=name or spec.name, module=module, options=options, subscribe=subscribe, retry=policy,
        )
        self.routes.append(route)
        self._by_key[(compiled.filter, shared)] = route
        return route


def _duplicate_message(where: str, existing: Route) -> str:
    shared = " (shared)" if existing.shared else ""
    return f"{where}: registered twice — {existing.describe()} already subscribes to {existing.filter!r}{shared}"


def _split_options(options: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(Router._add).parameters
    out = {k: options.pop(k, default) for k, default in ROUTE_OPTIONS.items() if k in parameters}
    out["options"] = options
    return out


def _check_options(options: dict[str, Any], chain: Sequence[Middleware], where: str) -> None:
    """Fail on a keyword no one reads: not a route option, and no middleware of the route declares it."""
    declared = {name for mw in chain for name in getattr(mw, "route_options", ())}
    for name, value in options.items():
        if name == "meta":
            if not isinstance(value, dict):
                raise RouteError(f"{where}: meta must be a dict (free-form data for middleware), not {value!r}")
        elif name not in declared and name not in ROUTE_OPTIONS:
            known = sorted({*ROUTE_OPTIONS, *declared})
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RouteError(
                f"{where}: unknown route option {name!r}{hint}. Known: {', '.join(known)}. An option for a middleware "
                "must be declared in that middleware's `route_options` (and the middleware given to this route), "
                "or passed inside meta={...}"
            )


class RouteTable:
    """The routes one process serves, compiled: a trie for matching and subscription ids.

    Subscription identifier `i + 1` belongs to `routes[i]` (MQTT v5), so a delivered message runs
    exactly the routes whose subscriptions it was delivered for.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self.trie: TopicTrie[Route] = TopicTrie()
        for route in self.routes:
            if route.subscribe:
                self.trie.insert(route.filter, route)
        self.by_subscription_id: tuple[Route | None, ...] = (None, *self.routes)

    def match(self, topic: str) -> list[Route]:
        return self.trie.match(topic)

    def __len__(self) -> int:
        return len(self.routes)


def merge_routers(routers: Iterable[tuple[str, Router]]) -> Router:
    """One router with the routes of all (module name, router) pairs; duplicates across modules are errors."""
    merged = Router()
    for _module, router in routers:
        for route in router.routes:
            key = (route.filter, route.shared)
            existing = merged._by_key.get(key)
            if existing is not None:
                raise RouteError(_duplicate_message(route.describe(), existing))
            merged.routes.append(route)
            merged._by_key[key] = route
    return merged
