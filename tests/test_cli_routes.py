"""`python main.py routes` helpers (core.operations.cli_tools): stream routes shown as such, listing without Redis enabled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.operations.cli_tools import format_route_table
from core.foundation.config import load_settings
from core.router import Router

ROOT = Path(__file__).resolve().parent.parent


async def placed(id: str) -> None:
    return None


async def imported(payload: dict) -> None:
    return None


def _rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return header, rows


def test_stream_routes_have_a_stream_column_and_consumers_subscribe_to_nothing() -> None:
    router = Router()
    router.on("orders/{id}/placed", placed, qos=1, shared=True, stream="orders")
    router.stream("external-orders", imported)
    router.on("plain/{id}", placed, qos=1)
    text = format_route_table(router.routes, load_settings({"MQTT_GROUP_NAME": "blue"}))
    header, rows = _rows(text)
    assert header == ["PATTERN", "SUBSCRIBES", "TO", "QOS", "SHARED", "WORKERS", "STREAM", "MIDDLEWARE", "HANDLER"]
    assert rows["orders/{id}/placed"][1:6] == ["$share/blue/orders/+/placed", "1", "yes", "1", "orders"]
    assert rows["$stream/external-orders"][1:6] == ["-", "-", "yes", "1", "external-orders"]
    assert rows["plain/{id}"][1:6] == ["plain/+", "1", "no", "-", "-"]
    assert "$share/blue/$stream" not in text  # a consumer-only route subscribes to nothing
    assert "ENABLE_REDIS=false" in text  # Redis is off in these settings: said, not an error
    assert text.splitlines()[-1] == "3 route(s), 2 on Redis streams"


def test_table_without_stream_routes_is_unchanged() -> None:
    router = Router()
    router.on("plain/{id}", placed, qos=1)
    text = format_route_table(router.routes, load_settings({}))
    assert text.splitlines()[0].split() == ["PATTERN", "SUBSCRIBES", "TO", "QOS", "SHARED", "WORKERS", "MIDDLEWARE",
                                            "HANDLER"]
    assert text.splitlines()[-1] == "1 route(s)"


def test_ordered_routes_have_an_ordered_column() -> None:
    router = Router()
    router.on("devices/{id}/status", placed, qos=1, ordered=True)
    router.on("plain/{id}", placed, qos=1)
    header, rows = _rows(format_route_table(router.routes, load_settings({})))
    assert header == ["PATTERN", "SUBSCRIBES", "TO", "QOS", "SHARED", "WORKERS", "ORDERED", "MIDDLEWARE", "HANDLER"]
    assert rows["devices/{id}/status"][5] == "yes" and rows["plain/{id}"][5] == "no"


def _routes_command(**env: str) -> subprocess.CompletedProcess[str]:
    """`core.operations.cli_tools.routes_command` (what `python main.py routes` runs) in a fresh interpreter."""
    code = ("import os, sys\nfrom core.foundation.config import load_settings\nfrom core.operations.cli_tools import routes_command\n"
            "sys.exit(routes_command(load_settings(dict(os.environ))))")
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


def test_routes_of_a_stream_app_are_listed_with_redis_disabled() -> None:
    result = _routes_command(ROUTERS_PACKAGE="tests.apps.streams_app.routers", STREAMS_APP_STREAM="orders",
                             STREAMS_APP_TOPIC="orders", STREAMS_APP_EXTERNAL="ext", ENABLE_REDIS="false")
    assert result.returncode == 0, result.stderr
    _, rows = _rows(result.stdout)
    assert rows["orders/{seq}"][1:6] == ["$share/workers/orders/+", "1", "yes", "1", "orders"]
    assert rows["$stream/ext"][1:6] == ["-", "-", "yes", "1", "ext"]
    assert "need ENABLE_REDIS=true" in result.stdout


def test_routes_still_reports_route_errors() -> None:
    result = _routes_command(ROUTERS_PACKAGE="tests.apps.core_bad_app")
    assert result.returncode == 2
    assert "registered twice" in result.stderr and "Traceback" not in result.stderr
    result = _routes_command(ROUTERS_PACKAGE="tests.apps.streams_app.routers", STREAMS_APP_STREAM="orders:dlq",
                             STREAMS_APP_TOPIC="orders")
    assert result.returncode == 2
    assert "dead-letter stream" in result.stderr
