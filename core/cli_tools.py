"""Helpers behind `python main.py routes` and `python main.py publish`."""

from __future__ import annotations

import asyncio
import os
from typing import Sequence

from core.config import Settings
from core.router import Route


def format_route_table(routes: Sequence[Route], settings: Settings) -> str:
    """A plain-text table: pattern, MQTT filter (as subscribed), qos, shared, workers, middleware, handler."""
    header = ("PATTERN", "SUBSCRIBES TO", "QOS", "SHARED", "WORKERS", "MIDDLEWARE", "HANDLER")
    rows = [header]
    for r in routes:
        rows.append((
            r.pattern, r.subscription_topic(settings.mqtt_group_name), str(r.qos), "yes" if r.shared else "no",
            str(r.worker_count) if r.shared else "-", ", ".join(type(m).__name__ for m in r.middleware) or "-",
            r.handler.name + ("" if r.handler.is_async else " (sync)"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.append(f"\n{len(routes)} route(s)")
    return "\n".join(lines)


def publish_once(settings: Settings, topic: str, payload: str, qos: int, retain: bool) -> int:
    """Publish one message and wait for the broker's acknowledgement (qos>0). Exit code 0 or 1."""
    from core.mqtt_client import MqttClient

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
