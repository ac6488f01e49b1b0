"""`python main.py asyncapi`: an AsyncAPI 3.0 document of the app, valid against the specification's schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from core.operations.asyncapi import build_document
from core.foundation.config import load_settings
from core.router import Route, Router
from tests.support.rt_app import base_env, run_main

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json").read_text())


def validate(document: dict[str, Any]) -> None:
    """Against the AsyncAPI 3.0.0 JSON schema, and every local `$ref` points at something."""
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:5])
    for ref in _refs(document):
        node: Any = document
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
            node = node[part]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                assert value.startswith("#/"), value
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


class Location(BaseModel):
    lat: float
    lon: float


class Reading(BaseModel):
    value: float
    unit: str = "C"
    where: Location | None = None


@dataclasses.dataclass
class Command:
    action: str
    delay: int = 0


class Ack(BaseModel):
    ok: bool


async def reading(sensor_id: str, payload: Reading) -> None: ...


async def command(device_id: str, payload: Command) -> Ack: ...


async def anything(payload: Any) -> None: ...


async def text(payload: str) -> dict[str, Any]: ...


def sample_router() -> Router:
    router = Router()
    with router.group(prefix="sensors") as sensors:
        sensors.on("{sensor_id}/data", reading, qos=1, shared=True, worker_count=3)
    router.on("devices/{device_id}/command", command, qos=2)
    router.on("logs/{path:#}", anything, payload_format="bytes")
    router.on("chat/+/{room}", text, payload_format="text")
    router.on("sensors/+/data", anything)  # a plain route on a filter a shared route uses too
    router.stream("external", anything)  # consumes a Redis stream: no MQTT channel
    return router


def settings(**env: str) -> Any:
    return load_settings({"APP_NAME": "demo", "MQTT_BROKER": "broker.local", "MQTT_PORT": "1884", **env})


def channel_of(document: dict[str, Any], address: str, shared: bool = False) -> tuple[str, dict[str, Any]]:
    found = [(cid, ch) for cid, ch in document["channels"].items()
             if ch.get("address") == address and ch.get("x-mqtt-shared", False) == shared]
    assert len(found) == 1, (address, list(document["channels"]))
    return found[0]


def operation_for(document: dict[str, Any], channel_id: str) -> dict[str, Any]:
    (op,) = [op for op in document["operations"].values()
             if op["channel"] == {"$ref": f"#/channels/{channel_id}"} and op["action"] == "receive"]
    return op


def test_document_of_the_sample_router_is_valid_asyncapi_3() -> None:
    document = build_document(list(sample_router().routes), settings())
    validate(document)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "demo"
    assert document["servers"]["broker"]["host"] == "broker.local:1884"
    assert document["servers"]["broker"]["protocol"] == "mqtt"
    assert document["servers"]["broker"]["protocolVersion"] == "5"


def test_a_channel_per_mqtt_route_with_parameters_and_the_filter_as_subscribed() -> None:
    document = build_document(list(sample_router().routes), settings(MQTT_GROUP_NAME="fleet"))
    route_channels = [ch for ch in document["channels"].values() if "x-mqtt-filter" in ch]
    assert len(route_channels) == 5  # the stream consumer has none
    cid, ch = channel_of(document, "sensors/{sensor_id}/data", shared=True)
    assert ch["parameters"] == {"sensor_id": {"description": "one topic level"}}
    assert ch["x-mqtt-filter"] == "sensors/+/data"
    assert ch["x-mqtt-subscription"] == "$share/fleet/sensors/+/data"
    _, logs = channel_of(document, "logs/{path}")
    assert logs["x-mqtt-filter"] == "logs/#" and logs["x-mqtt-subscription"] == "logs/#"
    assert "rest of the topic" in logs["parameters"]["path"]["description"]
    _, chat = channel_of(document, "chat/+/{room}")
    assert list(chat["parameters"]) == ["room"]
    _, plain = channel_of(document, "sensors/+/data")
    assert plain["x-mqtt-subscription"] == "sensors/+/data"


def test_a_receive_operation_per_route_with_qos_shared_and_workers() -> None:
    document = build_document(list(sample_router().routes), settings())
    cid, _ = channel_of(document, "sensors/{sensor_id}/data", shared=True)
    op = operation_for(document, cid)
    assert op["bindings"]["mqtt"] == {"qos": 1, "bindingVersion": "0.2.0"}
    assert (op["x-shared"], op["x-worker-count"], op["x-share-group"]) == (True, 3, "workers")
    assert op["x-handler"].endswith("reading")
    cid, _ = channel_of(document, "devices/{device_id}/command")
    op = operation_for(document, cid)
    assert op["bindings"]["mqtt"]["qos"] == 2 and op["x-shared"] is False and "x-worker-count" not in op
    assert all(message["$ref"].startswith(f"#/channels/{cid}/messages/") for message in op["messages"])
    assert "x-ordered" not in op


def test_an_ordered_route_says_so() -> None:
    router = Router()
    router.on("sensors/{sensor_id}/state", reading, qos=1, ordered=True)
    document = build_document(list(router.routes), settings())
    cid, _ = channel_of(document, "sensors/{sensor_id}/state")
    assert operation_for(document, cid)["x-ordered"] == "per-topic"


def _payload(document: dict[str, Any], channel_id: str) -> dict[str, Any]:
    (message,) = document["channels"][channel_id]["messages"].values()
    if "$ref" in message:
        message = document["components"]["messages"][message["$ref"].rsplit("/", 1)[1]]
    return message


def test_payload_schemas_come_from_the_payload_annotation() -> None:
    document = build_document(list(sample_router().routes), settings())
    cid, _ = channel_of(document, "sensors/{sensor_id}/data", shared=True)
    message = _payload(document, cid)
    assert message["contentType"] == "application/json"
    schema = message["payload"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert schema["properties"]["value"]["type"] == "number"
    assert schema["required"] == ["value"]
    # The nested model is a component schema the payload refers to.
    assert document["components"]["schemas"]["Location"]["properties"]["lat"]["type"] == "number"
    assert "#/components/schemas/Location" in json.dumps(schema)

    cid, _ = channel_of(document, "devices/{device_id}/command")
    schema = _payload(document, cid)["payload"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert schema["properties"]["action"]["type"] == "string" and schema["required"] == ["action"]

    _, logs = channel_of(document, "logs/{path}")
    message = _payload(document, next(cid for cid, ch in document["channels"].items() if ch is logs))
    assert message["contentType"] == "application/octet-stream"
    cid, _ = channel_of(document, "chat/+/{room}")
    assert _payload(document, cid)["contentType"] == "text/plain"
    assert _payload(document, cid)["payload"] == {"type": "string"}


def test_dead_letter_and_response_channels() -> None:
    v5 = build_document(list(sample_router().routes), settings(DEAD_LETTER_QOS="2"))
    validate(v5)
    cid, dead = channel_of(v5, "dead-letter/{topic}")
    assert "original topic" in dead["parameters"]["topic"]["description"]
    (send,) = [op for op in v5["operations"].values() if op["channel"] == {"$ref": f"#/channels/{cid}"}]
    assert send["action"] == "send" and send["bindings"]["mqtt"]["qos"] == 2
    letter = _payload(v5, cid)
    # MQTT 5: the original payload, the reason in user properties.
    assert set(letter["headers"]["properties"]) >= {"error", "error_type", "original_topic", "route", "worker"}

    v311 = build_document(list(sample_router().routes), settings(MQTT_PROTOCOL="3.1.1", DEAD_LETTER_TOPIC="failed"))
    validate(v311)
    cid, dead = channel_of(v311, "failed")
    assert "parameters" not in dead
    envelope = _payload(v311, cid)["payload"]
    assert set(envelope["required"]) >= {"original_topic", "error_type", "error", "route", "payload"}

    # A handler that returns something answers a request carrying a response topic.
    cid, _ = channel_of(v5, "devices/{device_id}/command")
    op = operation_for(v5, cid)
    assert op["reply"]["address"]["location"] == "$message.header#/responseTopic"
    (reply_channel,) = [c for c, ch in v5["channels"].items() if ch.get("address") is None]
    assert op["reply"]["channel"] == {"$ref": f"#/channels/{reply_channel}"}
    cid, _ = channel_of(v5, "sensors/{sensor_id}/data", shared=True)
    assert "reply" not in operation_for(v5, cid)  # `-> None`: no response


def test_the_example_app_document_is_valid() -> None:
    from core.operations.cli_tools import load_routes

    validate(build_document(load_routes(settings()), settings()))


def test_a_single_route_document_is_valid() -> None:
    validate(build_document([Route("a/{b}", anything)], load_settings({})))


def test_cli_writes_json_to_stdout_and_yaml_to_a_file(tmp_path: Path) -> None:
    result = run_main("asyncapi", env=base_env(APP_NAME="cli-doc"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    validate(document)
    assert document["info"]["title"] == "cli-doc"
    assert "sensors/{sensor_id}/data" in {ch.get("address") for ch in document["channels"].values()}

    target = tmp_path / "asyncapi.yaml"
    result = run_main("asyncapi", "--format", "yaml", "-o", str(target), env=base_env(APP_NAME="cli-doc"))
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stderr
    assert yaml.safe_load(target.read_text()) == document


def test_cli_reports_route_errors_and_bad_formats() -> None:
    result = run_main("asyncapi", env=base_env(ROUTERS_PACKAGE="tests.apps.core_bad_app"))
    assert result.returncode == 2 and "registered twice" in result.stderr and "Traceback" not in result.stderr
    result = run_main("asyncapi", "--format", "xml", env=base_env())
    assert result.returncode == 2 and "--format" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_cli_output_is_deterministic(fmt: str) -> None:
    first = run_main("asyncapi", "--format", fmt, env=base_env())
    second = run_main("asyncapi", "--format", fmt, env=base_env())
    assert first.returncode == 0 and first.stdout == second.stdout


def test_the_schema_check_rejects_a_broken_document() -> None:
    document = build_document(list(sample_router().routes), settings())
    broken = json.loads(json.dumps(document))
    next(iter(broken["operations"].values()))["action"] = "listen"
    with pytest.raises(AssertionError):
        validate(broken)
    dangling = json.loads(json.dumps(document))
    next(iter(dangling["operations"].values()))["channel"] = {"$ref": "#/channels/nope"}
    with pytest.raises(AssertionError, match="dangling"):
        validate(dangling)
