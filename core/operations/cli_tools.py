"""Helpers behind `python main.py routes` and `python main.py publish`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Sequence

from core.foundation.config import Settings
from core.routing.router import Route, RouteError, merge_routers


def format_route_table(routes: Sequence[Route], settings: Settings) -> str:
    """A plain-text table: pattern, MQTT filter (as subscribed), qos, shared, workers, [stream,] middleware, handler.

    The STREAM column appears when a route uses a Redis stream, ORDERED when a route has `ordered=True`
    (core.runtime.ordering). A stream consumer (`Router.stream`)
    subscribes to nothing on MQTT: its SUBSCRIBES TO and QOS are `-`.
    """
    group = settings.mqtt_group_name
    streams = any(r.stream is not None for r in routes)
    ordered = any(r.ordered for r in routes)
    header = ("PATTERN", "SUBSCRIBES TO", "QOS", "SHARED", "WORKERS", *(("STREAM",) if streams else ()),
              *(("ORDERED",) if ordered else ()), "MIDDLEWARE", "HANDLER")
    rows = [header]
    for r in routes:
        rows.append((
            r.pattern, r.subscription_topic(group) if r.subscribe else "-", str(r.qos) if r.subscribe else "-",
            "yes" if r.shared else "no", str(r.worker_count) if r.shared else "-",
            *((r.stream or "-",) if streams else ()),
            *(("yes" if r.ordered else "no",) if ordered else ()),
            ", ".join(type(m).__name__ for m in r.middleware) or "-",
            r.handler.name + ("" if r.handler.is_async else " (sync)"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if streams:
        consumers = sum(1 for r in routes if r.stream is not None and not r.subscribe)
        lines.append("")
        lines.append(f"STREAM: the route's handler runs in consumer group {group!r} of that Redis stream; a route "
                     "with an MQTT filter appends its messages there first")
        if consumers:
            lines.append("SUBSCRIBES TO '-': consumes a stream written by others (Router.stream); subscribes to "
                         "nothing on MQTT")
        if not settings.enable_redis:
            lines.append("note: ENABLE_REDIS=false; the stream routes need ENABLE_REDIS=true (and REDIS_URL) to run")
        count = sum(1 for r in routes if r.stream is not None)
        lines.append(f"\n{len(routes)} route(s), {count} on Redis streams")
    else:
        lines.append(f"\n{len(routes)} route(s)")
    return "\n".join(lines)


def load_routes(settings: Settings) -> list[Route]:
    """The app's routes for listing: every check of a start except that the features they use are enabled."""
    from core.routing.discovery import discover_routers
    from core.integrations.streams import check_stream_routes

    router = merge_routers(discover_routers(settings.routers_package))
    # Listing is not serving: check stream routes as if Redis were on (names, shared= agreement), not that it is.
    check_stream_routes(router.routes, settings.with_overrides(enable_redis=True))
    return list(router.routes)


def routes_command(settings: Settings) -> int:
    """`python main.py routes`: print the active profile and the route table; exit code 0, or 2 on a route
    or discovery error."""
    from core.routing.discovery import DiscoveryError

    try:
        routes = load_routes(settings)
    except (RouteError, DiscoveryError) as exc:
        print(f"route error: {exc}", file=sys.stderr)
        return 2
    from core.foundation.profiles import describe_profile

    print(format_route_table(routes, settings))
    print(describe_profile(settings))
    return 0


def asyncapi_command(settings: Settings, fmt: str, output: str | None, version: str) -> int:
    """`python main.py asyncapi`: the AsyncAPI 3.0 document of the routes, to stdout or `output`."""
    from core.routing.discovery import DiscoveryError
    from core.operations.asyncapi import build_document

    try:
        routes = load_routes(settings)
    except (RouteError, DiscoveryError) as exc:
        print(f"route error: {exc}", file=sys.stderr)
        return 2
    document = build_document(routes, settings, version)
    if fmt == "yaml":
        import yaml

        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)
    else:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        print(f"cannot write {output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote the AsyncAPI {document['asyncapi']} document of {len(document['operations']) - 1} route(s) to {output}",
          file=sys.stderr)
    return 0


def publish_once(settings: Settings, topic: str, payload: str, qos: int, retain: bool) -> int:
    """Publish one message and wait for the broker's acknowledgement (qos>0). Exit code 0 or 1."""
    from core.transport.mqtt_client import MqttClient

    async def run() -> int:
        client = MqttClient(settings, f"{settings.mqtt_client_id}-cli-{os.getpid()}", lambda m, g: None,
                            clean_start=True, session_expiry=0, name="publish")
        client.start(asyncio.get_running_loop())
        if not await client.wait_subscribed(10):
            print(f"could not connect to {settings.broker_host}:{settings.broker_port}: {client.state.last_error}")
            await client.stop()
            return 1
        await asyncio.wait_for(client.publish(topic, payload.encode(), qos, retain), 10)
        await client.stop()
        print(f"published to {topic} (qos {qos})")
        return 0

    return asyncio.run(run())
