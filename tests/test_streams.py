"""Redis Streams without servers: the entry format, route checks, Router.stream, settings, startup errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bootstrap.app import Application
from core.foundation.config import ConfigError, Settings, load_settings
from core.routing.context import MessageContext, Services
from core.router import RouteError, Router, RouteTable
from core.runtime.runtime import Runtime
from core.integrations.streams import StreamProperties, check_stream_routes, decode_entry, encode_entry, original_fields

ROOT = Path(__file__).resolve().parent.parent


async def placed(id: str, payload: Any, context: MessageContext) -> None:
    return None


async def external(payload: Any) -> None:
    return None


class _Props:
    ResponseTopic = "replies/7"
    CorrelationData = b"\x00\xffcorr"
    UserProperty = [("tenant", "acme"), ("trace", "abc")]
    ContentType = "application/json"


def _context(router: Router, topic: str, raw: bytes, props: Any = None) -> MessageContext:
    route = router.routes[0]
    params = route.match(topic) or {}
    return MessageContext(topic, params, None, raw, 1, False, False, props, route, Services(publisher=None))  # type: ignore[arg-type]


def test_entry_round_trip_keeps_topic_params_payload_and_mqtt_properties() -> None:
    router = Router()
    router.on("orders/{id}/placed", placed, qos=1, stream="orders")
    fields = encode_entry("orders/{id}/placed", _context(router, "orders/42/placed", b"\x00binary\xff", _Props()))
    # As redis-py returns it: bytes keys and values.
    stored = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    message = decode_entry("orders", stored)
    assert message.topic == "orders/42/placed"
    assert message.params == {"id": "42"}
    assert message.raw == b"\x00binary\xff"
    assert (message.qos, message.retain, message.route) == (1, False, "orders/{id}/placed")
    props = message.properties
    assert isinstance(props, StreamProperties)
    assert props.ResponseTopic == "replies/7"
    assert props.CorrelationData == b"\x00\xffcorr"
    assert props.UserProperty == [("tenant", "acme"), ("trace", "abc")]
    assert props.ContentType == "application/json"


def test_entry_without_properties() -> None:
    router = Router()
    router.on("orders/{id}/placed", placed, stream="orders")
    fields = encode_entry("orders/{id}/placed", _context(router, "orders/1/placed", b'{"a": 1}'))
    assert json.loads(fields["headers"]) == {"qos": 1, "retain": False}
    message = decode_entry("orders", fields)
    assert message.properties is not None and message.properties.ResponseTopic is None


def test_external_entries_give_their_payload_field_or_all_fields() -> None:
    with_payload = decode_entry("ext", {b"payload": b'{"order": 1}', b"source": b"erp"})
    assert (with_payload.topic, with_payload.params, with_payload.raw, with_payload.route) == ("ext", {}, b'{"order": 1}', None)
    without = decode_entry("ext", {b"order": b"2", b"state": b"new"})
    assert json.loads(without.raw) == {"order": "2", "state": "new"}


def test_original_fields_of_a_dead_letter() -> None:
    dlq = {b"error": b"ValueError: x", b"attempts": b"3", b"entry.topic": b"a/b", b"entry.payload": b"\x01"}
    assert original_fields(dlq) == {"topic": b"a/b", "payload": b"\x01"}


def test_stream_route_with_redis_disabled_fails_naming_the_route() -> None:
    router = Router()
    router.on("orders/{id}/placed", placed, stream="orders")
    with pytest.raises(RouteError, match=r"route 'orders/\{id\}/placed' .* uses the Redis stream 'orders'.*ENABLE_REDIS=true"):
        Application.load(Settings(), router)
    Application.load(Settings(enable_redis=True), router)  # fine with Redis on


def test_routes_sharing_a_stream_must_agree_on_shared() -> None:
    router = Router()
    router.on("a/{id}", placed, stream="orders", shared=True)
    router.on("b/{id}", placed, stream="orders")
    with pytest.raises(RouteError, match="share the stream 'orders' but not shared="):
        check_stream_routes(router.routes, Settings(enable_redis=True))


def test_stream_name_may_not_be_a_dead_letter_stream() -> None:
    router = Router()
    router.on("a/{id}", placed, stream="orders:dlq")
    with pytest.raises(RouteError, match="dead-letter stream"):
        check_stream_routes(router.routes, Settings(enable_redis=True))


def test_router_stream_registers_a_consumer_only_route() -> None:
    router = Router()
    route = router.stream("external-orders", external)
    router.on("orders/{id}/placed", placed, qos=1)
    assert route.subscribe is False and route.stream == "external-orders" and route.shared
    table = RouteTable(router.routes)
    assert table.match("$stream/external-orders") == []
    runtime = Runtime(load_settings({"MQTT_BROKER": "127.0.0.1", "MQTT_CLIENT_ID": "unit"}), router.routes)
    assert [sub.topic for sub in runtime.subscriptions] == ["orders/+/placed"]
    assert [sub.subscription_id for sub in runtime.subscriptions] == [2]  # ids still follow the route index
    runtime.executor.shutdown()


def test_router_stream_keeps_its_name_under_a_prefix_and_in_include() -> None:
    inner = Router()
    inner.stream("ext", external)
    outer = Router(prefix="site")
    outer.include(inner, prefix="x")
    with outer.group(prefix="g") as group:
        group.stream("ext2", external)
    assert [r.pattern for r in outer.routes] == ["$stream/ext", "$stream/ext2"]
    with pytest.raises(RouteError, match="stream name"):
        Router().stream("bad/#", external)
    with pytest.raises(RouteError, match="registered twice"):
        twice = Router()
        twice.stream("ext", external)
        twice.stream("ext", external)


def test_stream_settings_parse_and_name_the_variable() -> None:
    s = load_settings({"ENABLE_REDIS": "yes", "REDIS_URL": "redis://cache:6380/2", "STREAM_MAXLEN": "0",
                       "STREAM_CLAIM_IDLE_MS": "1500", "STREAM_MAX_RETRIES": "5", "STREAM_RETRY_DELAY": "250ms",
                       "STREAM_BATCH_SIZE": "10"})
    assert (s.enable_redis, s.redis_url, s.stream_maxlen, s.stream_claim_idle_ms) == (True, "redis://cache:6380/2", 0, 1500)
    assert (s.stream_max_retries, s.stream_retry_delay, s.stream_batch_size) == (5, 0.25, 10)
    d = load_settings({})
    assert (d.enable_redis, d.redis_url, d.stream_maxlen, d.stream_claim_idle_ms) == (False, "redis://127.0.0.1:6379/0", 1_000_000, 60_000)
    for env, name in [({"REDIS_URL": "http://x"}, "REDIS_URL"), ({"STREAM_CLAIM_IDLE_MS": "0"}, "STREAM_CLAIM_IDLE_MS"),
                      ({"STREAM_RETRY_DELAY": "soon"}, "STREAM_RETRY_DELAY"), ({"ENABLE_REDIS": "maybe"}, "ENABLE_REDIS")]:
        with pytest.raises(ConfigError, match=name):
            load_settings(env)


def test_main_refuses_to_start_a_stream_route_without_redis(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ROUTERS_PACKAGE": "tests.apps.streams_app.routers", "STREAMS_APP_STREAM": "orders",
           "STREAMS_APP_TOPIC": "orders", "MQTT_BROKER": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "main.py", "--env-file", str(tmp_path / "none")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "route 'orders/{seq}' (registered in tests.apps.streams_app.routers.streams) uses the Redis stream " \
           "'orders', but Redis is disabled: set ENABLE_REDIS=true" in result.stderr


def test_transient_redis_errors_are_held_and_others_are_not() -> None:
    from redis.exceptions import (
        BusyLoadingError, ConnectionError, OutOfMemoryError, ReadOnlyError, ResponseError, TimeoutError,
    )

    from core.integrations.streams import is_transient, is_unreachable

    for exc in (ConnectionError("refused"), TimeoutError("slow"), OSError("reset"), BusyLoadingError("loading"),
                ReadOnlyError("You can't write against a read only replica.", status_code="READONLY"),
                OutOfMemoryError("command not allowed when used memory > 'maxmemory'.", status_code="OOM"),
                ResponseError("BUSY Redis is busy running a script."),
                ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
                ResponseError("TRYAGAIN Multiple keys request during rehashing of slot")):
        assert is_transient(exc), exc
    for exc in (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
                ResponseError("ERR syntax error"), ValueError("x")):
        assert not is_transient(exc), exc
    assert is_unreachable(ConnectionError("refused")) and not is_unreachable(OutOfMemoryError("oom"))
