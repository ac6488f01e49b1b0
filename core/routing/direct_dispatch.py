"""`Router.dispatch`: run the routes matching a topic directly, without a broker or a runtime.

RouteMQ's workers called `await router.dispatch(topic, payload, client)`; code written against it
keeps working. The message runs through the same pieces the runtime uses (payload decoding, the
middleware chain, payload validation, the handler call), but nothing is acknowledged, responded to
or dead-lettered: a handler's exception reaches the caller. For tests with broker semantics
(responses, dead letters, QoS) use `core.testing.client.TestClient`.
"""

from __future__ import annotations

from typing import Any, Sequence

from core.routing.context import MessageContext, Publisher, Services
from core.routing.middleware import build_chain
from core.routing.payload import decode_payload, encode_payload
from core.routing.route_options import RouteError


async def dispatch(routes: Sequence[Any], topic: str, payload: Any, client: Publisher | Any) -> Any:
    """Run every route whose filter matches `topic`, in registration order (as a delivered message runs
    each matching subscription once); the first route's result. RouteError if no route matches."""
    levels = topic.split("/")
    matched = [(route, params) for route in routes
               if route.subscribe and (params := route.compiled.extract(levels)) is not None]
    if not matched:
        raise RouteError(f"no route matches topic {topic!r}")
    services = Services(client)
    results = [await run_route(route, topic, params, payload, services) for route, params in matched]
    return results[0]


async def run_route(route: Any, topic: str, params: dict[str, str], payload: Any, services: Services) -> Any:
    """One route's middleware and handler for one message. Bytes are decoded per the route's
    `payload_format`; anything else is taken as the decoded payload."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        value = decode_payload(raw, route.payload_format)
    else:
        raw, value = encode_payload(payload), payload
    context = MessageContext(topic, params, value, raw, route.qos, False, False, None, route, services)
    return await build_chain(route.middleware, route.handler.caller(None))(context)
