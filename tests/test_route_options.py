"""Route options (issue 9, section 4): an unknown keyword fails at registration, naming the route and
the option; options meant for middleware are declared by it (`route_options`) or go in `meta=`."""

from __future__ import annotations

from typing import Any

import pytest

from core.routing.middleware import BaseMiddleware
from core.router import ROUTE_OPTIONS, Route, RouteError, Router
from tests.support.rt_app import base_env, run_main


async def handler(**params: Any) -> None:
    return None


class Cache(BaseMiddleware):
    """Reads `cache_ttl` from the route's options."""

    route_options = ("cache_ttl",)


@pytest.mark.parametrize("register", [
    lambda r: r.on("a/{x}", handler, shared=True, worker_cout=3),
    lambda r: r.route("a/{x}", shared=True, worker_cout=3)(handler),
    lambda r: r.group("g").on("a/{x}", handler, worker_cout=3),
])
def test_a_misspelt_option_fails_naming_route_option_and_the_close_match(register: Any) -> None:
    with pytest.raises(RouteError) as info:
        register(Router())
    message = str(info.value)
    assert "a/{x}'" in message and "tests.test_route_options" in message
    assert "unknown route option 'worker_cout'" in message
    assert "did you mean 'worker_count'" in message


def test_an_unknown_option_lists_what_is_known() -> None:
    with pytest.raises(RouteError, match="unknown route option 'ordred'") as info:
        Router().on("a", handler, ordred=True)
    assert "qos" in str(info.value) and "meta" in str(info.value)


def test_stream_routes_and_hand_made_routes_are_checked_too() -> None:
    with pytest.raises(RouteError, match="unknown route option 'timout'.*did you mean 'timeout'"):
        Router().stream("orders", handler, timout=3)
    with pytest.raises(RouteError, match="unknown route option 'bogus'"):
        Route("a/b", handler, options={"bogus": 1})  # type: ignore[arg-type]


def test_meta_is_free_form_data_for_middleware_and_tools() -> None:
    route = Router().on("a", handler, meta={"owner": "team-a"})
    assert route.options == {"meta": {"owner": "team-a"}}
    with pytest.raises(RouteError, match="meta must be a dict"):
        Router().on("b", handler, meta="team-a")


def test_middleware_declares_the_options_it_reads() -> None:
    route = Router().on("a", handler, middleware=[Cache()], cache_ttl=5)
    assert route.options == {"cache_ttl": 5}
    group = Router().group("g", middleware=[Cache()])
    assert group.on("b", handler, cache_ttl=1).options == {"cache_ttl": 1}
    with pytest.raises(RouteError, match="unknown route option 'cache_ttl'") as info:
        Router().on("c", handler, cache_ttl=5)  # no middleware of this route reads it
    assert "route_options" in str(info.value)
    with pytest.raises(RouteError, match="did you mean 'cache_ttl'"):
        Router().on("d", handler, middleware=[Cache()], cache_tl=5)


def test_included_routes_keep_their_options() -> None:
    inner = Router()
    inner.on("x", handler, middleware=[Cache()], cache_ttl=2, meta={"k": 1})
    outer = Router()
    outer.include(inner, prefix="p")
    assert outer.routes[0].options == {"cache_ttl": 2, "meta": {"k": 1}}


def test_the_known_options_are_one_list() -> None:
    assert {"qos", "shared", "worker_count", "middleware", "payload_format", "timeout", "stream", "name",
            "meta"} <= set(ROUTE_OPTIONS)


def test_startup_fails_with_exit_2_naming_route_and_option() -> None:
    result = run_main("routes", env=base_env(ROUTERS_PACKAGE="tests.apps.option_typo_app"))
    assert result.returncode == 2
    assert "'typo/{device_id}/status'" in result.stderr and "tests.apps.option_typo_app.typo" in result.stderr
    assert "unknown route option 'worker_cout'" in result.stderr and "did you mean 'worker_count'" in result.stderr
    assert "Traceback" not in result.stderr
