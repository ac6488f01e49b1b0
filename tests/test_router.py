"""Route patterns, registration errors, groups, merging routers, and the compiled route table."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.routing.middleware import BaseMiddleware
from core.router import RouteError, Router, RouteTable, compile_pattern, merge_routers

THIS_MODULE = __name__  # routes registered here name this module in their errors


async def handler(payload: object) -> None:
    return None


async def with_id(device_id: str, payload: object) -> None:
    return None


class Named(BaseMiddleware):
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Named({self.name})"


# -- compilation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "mqtt_filter", "params"),
    [
        ("devices/{device_id}/status", "devices/+/status", ("device_id",)),
        ("logs/{path:#}", "logs/#", ("path",)),
        ("a/{x:+}/b", "a/+/b", ("x",)),
        ("{a}/{b}/{rest:#}", "+/+/#", ("a", "b", "rest")),
        ("a/+/b", "a/+/b", ()),
        ("a/#", "a/#", ()),
        ("#", "#", ()),
        ("+", "+", ()),
        ("a.b/c-d/e f/ü", "a.b/c-d/e f/ü", ()),
        ("$SYS/broker/{name}", "$SYS/broker/+", ("name",)),
        ("a//b", "a//b", ()),
        ("/leading", "/leading", ()),
    ],
)
def test_pattern_compiles_to_filter(pattern: str, mqtt_filter: str, params: tuple[str, ...]) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.filter == mqtt_filter
    assert compiled.params == params


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("devices/{device_id}/status", "devices/42/status", {"device_id": "42"}),
        ("devices/{device_id}/status", "devices/42/other", None),
        ("devices/{device_id}/status", "devices/42/status/x", None),
        ("logs/{path:#}", "logs/a/b/c", {"path": "a/b/c"}),
        ("logs/{path:#}", "logs", {"path": ""}),  # `a/#` matches `a` (MQTT-4.7.1-2)
        ("logs/{path:#}", "logsx/a", None),
        ("{a}/x/{rest:#}", "1/x/2/3", {"a": "1", "rest": "2/3"}),
        ("a/+/b", "a/anything/b", {}),
        ("a/+/b", "a/anything/c", None),
        ("a/#", "a", {}),
        ("a/#", "a/b/c", {}),
        ("#", "any/thing", {}),
        ("#", "$SYS/x", None),  # no leading wildcard matches a `$` topic
        ("{first}/x", "$SYS/x", None),
        ("$SYS/{name}", "$SYS/load", {"name": "load"}),
        ("a.b/c", "a.b/c", {}),
        ("a.b/c", "aXb/c", None),  # '.' is literal, not a regex wildcard
        ("a*/c", "abc/c", None),
        ("a*/c", "a*/c", {}),
        ("a/{x}", "a/", {"x": ""}),  # `+` matches an empty level
    ],
)
def test_pattern_extract(pattern: str, topic: str, expected: dict[str, str] | None) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.extract(topic.split("/")) == expected
    assert (expected is not None) == paho.topic_matches_sub(compiled.filter, topic)


# Property: extract() agrees with MQTT filter semantics (paho's matcher) and returns the right levels.

LEVEL = st.sampled_from(["a", "b", "", "c.d", "x y"])
PATTERN_LEVEL = st.sampled_from(["a", "b", "", "c.d", "+", "{p}"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    levels = draw(st.lists(PATTERN_LEVEL, min_size=1, max_size=4))
    counter = iter(range(100))
    levels = [f"p{next(counter)}" if lvl == "{p}" else lvl for lvl in levels]
    levels = ["{" + lvl + "}" if lvl.startswith("p") else lvl for lvl in levels]
    tail = draw(st.sampled_from(["", "#", "{tail:#}"]))
    if tail:
        levels.append(tail)
    return "/".join(levels) or "a"


@st.composite
def topics(draw: st.DrawFn) -> str:
    first = draw(st.one_of(LEVEL, st.just("$SYS")))
    return "/".join([first, *draw(st.lists(LEVEL, max_size=5))]) or "a"


@settings(max_examples=300, deadline=None)
@given(patterns(), topics())
def test_extract_agrees_with_mqtt_semantics(pattern: str, topic: str) -> None:
    compiled = compile_pattern(pattern)
    levels = topic.split("/")
    params = compiled.extract(levels)
    assert (params is not None) == paho.topic_matches_sub(compiled.filter, topic), (pattern, topic)
    if params is None:
        return
    pattern_levels = pattern.split("/")
    for index, level in enumerate(pattern_levels):
        if level.startswith("{") and level.endswith(":#}"):
            assert params[level[1:-3]] == "/".join(levels[index:])
        elif level.startswith("{"):
            assert params[level[1:-1]] == levels[index]
    assert set(params) == set(compiled.params)


@settings(max_examples=200, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=8, unique_by=lambda p: compile_pattern(p).filter), topics())
def test_route_table_matches_like_extract(pattern_list: list[str], topic: str) -> None:
    router = Router()
    for pattern in pattern_list:
        router.on(pattern, handler)
    table = RouteTable(router.routes)
    matched = {route.pattern for route in table.match(topic)}
    expected = {r.pattern for r in router.routes if r.match(topic) is not None}
    assert matched == expected


# -- invalid patterns fail at registration, naming the route and the module ----------------------


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("a/#/b", "last"),
        ("#/a", "last"),
        ("a/{rest:#}/b", "last"),
        ("a/b+/c", "mixes"),
        ("a+", "mixes"),
        ("a/+b", "mixes"),
        ("a/b#", "mixes"),
        ("a/x{id}", "mixes"),
        ("a/{id}x", "mixes"),
        ("a/{1abc}", "identifier"),
        ("a/{}", "identifier"),
        ("a/{my-id}", "identifier"),
        ("a/{class}", "identifier"),
        ("a/{id:?}", "kind"),
        ("{id}/{id}", "twice"),
        ("{id}/{id:#}", "twice"),
        ("a/{payload}", "reserved"),
        ("a/{client}", "reserved"),
        ("a/{topic}", "reserved"),
        ("a/{context}", "reserved"),
        ("", "non-empty"),
        ("$share/g/a", "shared=True"),
    ],
)
def test_invalid_pattern_names_route_and_module(pattern: str, reason: str) -> None:
    router = Router()
    with pytest.raises(RouteError) as info:
        router.on(pattern, handler)
    message = str(info.value)
    assert repr(pattern) in message
    assert THIS_MODULE in message
    assert reason in message
    assert len(router) == 0


def test_invalid_pattern_in_group_names_the_full_pattern() -> None:
    router = Router()
    with router.group(prefix="site/{site}") as site:
        with pytest.raises(RouteError) as info:
            site.on("{site}/x", handler)
    assert "'site/{site}/{site}/x'" in str(info.value)
    assert THIS_MODULE in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"qos": 3}, "qos"),
        ({"worker_count": 2}, "shared=True"),
        ({"worker_count": 0, "shared": True}, "worker_count"),
        ({"payload_format": "xml"}, "payload_format"),
        ({"timeout": 0}, "timeout"),
        ({"middleware": [BaseMiddleware]}, "instance"),
        ({"middleware": [object()]}, "handle"),
    ],
)
def test_invalid_route_options(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(RouteError) as info:
        Router().on("a/b", handler, **kwargs)  # type: ignore[arg-type]
    assert reason in str(info.value)
    assert "'a/b'" in str(info.value) and THIS_MODULE in str(info.value)


def test_route_registered_twice_is_an_error() -> None:
    router = Router()
    router.on("devices/{device_id}/status", with_id)
    with pytest.raises(RouteError) as info:
        router.on("devices/{device_id}/status", with_id)
    assert "registered twice" in str(info.value)
    assert THIS_MODULE in str(info.value)
    # Same MQTT filter with another parameter name is the same subscription.
    with pytest.raises(RouteError, match="registered twice"):
        router.on("devices/{other}/status", handler)
    with pytest.raises(RouteError, match="registered twice"):
        router.on("devices/+/status", handler)
    # A shared route on the same filter is a different subscription.
    router.on("devices/+/status", handler, shared=True)
    assert len(router) == 2


def test_duplicate_inside_group_is_an_error() -> None:
    router = Router()
    router.on("sensors/{sensor_id}/data", handler)
    with router.group(prefix="sensors") as sensors:
        with pytest.raises(RouteError, match="registered twice"):
            sensors.on("{sensor_id}/data", handler)


def test_merge_routers_rejects_duplicates_across_modules() -> None:
    first, second = Router(), Router()
    first.on("a/{x}", handler)
    second.on("a/{y}", handler)
    with pytest.raises(RouteError) as info:
        merge_routers([("app.routers.first", first), ("app.routers.second", second)])
    assert "registered twice" in str(info.value)
    assert "'a/{x}'" in str(info.value) and "'a/{y}'" in str(info.value)


def test_merge_routers_keeps_order_and_module_names() -> None:
    first, second = Router(), Router()
    first.on("a/{x}", handler)
    second.on("b/{x}", handler)
    second.on("a/{x}", handler, shared=True)
    merged = merge_routers([("m1", first), ("m2", second)])
    assert [r.pattern for r in merged] == ["a/{x}", "b/{x}", "a/{x}"]
    assert {r.module for r in merged} == {THIS_MODULE}
    with pytest.raises(RouteError, match="registered twice"):
        merged.on("b/+", handler)


# -- groups ---------------------------------------------------------------------------------------


def test_group_prefix_and_nested_groups() -> None:
    outer_mw, inner_mw, route_mw = Named("outer"), Named("inner"), Named("route")
    router = Router()
    router.on("top", handler)
    with router.group(prefix="site/{site}", middleware=[outer_mw]) as site:
        site.on("status", handler)
        with site.group(prefix="room/{room}/", middleware=[inner_mw]) as room:
            room.on("/temp/{sensor}", handler, middleware=[route_mw])
            room.on("{rest:#}", handler)
        site.on("after", handler)
    by_pattern = {r.pattern: r for r in router}
    assert list(by_pattern) == [
        "top", "site/{site}/status", "site/{site}/room/{room}/temp/{sensor}", "site/{site}/room/{room}/{rest:#}",
        "site/{site}/after",
    ]
    assert by_pattern["site/{site}/room/{room}/temp/{sensor}"].filter == "site/+/room/+/temp/+"
    assert by_pattern["site/{site}/room/{room}/temp/{sensor}"].params == ("site", "room", "sensor")
    # Group middleware is outside the route's own; outer groups outside inner ones.
    assert by_pattern["site/{site}/room/{room}/temp/{sensor}"].middleware == (outer_mw, inner_mw, route_mw)
    assert by_pattern["site/{site}/room/{room}/{rest:#}"].middleware == (outer_mw, inner_mw)
    assert by_pattern["site/{site}/after"].middleware == (outer_mw,)
    assert by_pattern["top"].middleware == ()


def test_router_prefix_and_include() -> None:
    api = Router()
    api.on("{device_id}/status", with_id, qos=1, middleware=[Named("route")])
    main = Router(prefix="v1", middleware=[Named("main")])
    main.include(api, prefix="devices", middleware=[Named("include")])
    (route,) = main.routes
    assert route.pattern == "v1/devices/{device_id}/status"
    assert route.qos == 1
    assert [m.name for m in route.middleware] == ["main", "include", "route"]  # type: ignore[attr-defined]


def test_decorator_form_registers_and_returns_function() -> None:
    router = Router()

    @router.route("x/{device_id}", qos=2, shared=True, worker_count=3, meta={"custom": "yes"})
    async def fn(device_id: str) -> None:
        return None

    assert callable(fn)
    (route,) = router.routes
    assert (route.qos, route.shared, route.worker_count, route.options) == (2, True, 3, {"meta": {"custom": "yes"}})
    assert route.module == THIS_MODULE


def test_subscription_topic_for_shared_routes() -> None:
    router = Router()
    plain = router.on("a/{x}", handler)
    shared = router.on("a/{x}", handler, shared=True, worker_count=2)
    assert plain.subscription_topic("grp") == "a/+"
    assert shared.subscription_topic("grp") == "$share/grp/a/+"


def test_route_table_subscription_ids_follow_route_order() -> None:
    router = Router()
    routes = [router.on(p, handler) for p in ("a/+", "a/#", "b")]
    table = RouteTable(routes)
    assert table.by_subscription_id == (None, *routes)
    assert {r.pattern for r in table.match("a/x")} == {"a/+", "a/#"}
    assert table.match("c") == []


def test_route_table_with_many_routes() -> None:
    router = Router()
    for i in range(2000):
        router.on(f"dev{i}/{{x}}/status", handler)
    router.on("+/{x}/status", handler)
    table = RouteTable(router.routes)
    assert sorted(r.pattern for r in table.match("dev1234/7/status")) == ["+/{x}/status", "dev1234/{x}/status"]
    assert [r.pattern for r in table.match("other/7/status")] == ["+/{x}/status"]
