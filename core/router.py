"""`from core.router import Router`: the public path of the router (it lives in `core.routing.router`)."""

from core.routing.route_options import RouteError
from core.routing.router import (ROUTE_OPTIONS, STREAM_PATTERN_PREFIX, CompiledPattern, Route, Router, RouteTable,
                                 compile_pattern, merge_routers)

__all__ = ["ROUTE_OPTIONS", "STREAM_PATTERN_PREFIX", "CompiledPattern", "Route", "RouteError", "RouteTable", "Router",
           "compile_pattern", "merge_routers"]
