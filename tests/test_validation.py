"""Payload validation: pydantic models and dataclasses as the `payload` annotation."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from pydantic import BaseModel, Field

from core.router import Router, RouteError
from core.testing import TestClient
from core.routing.validation import PayloadValidationError, is_validated_type, to_jsonable


class Reading(BaseModel):
    value: float
    unit: str = "C"
    tags: list[str] = Field(default_factory=list)


@dataclasses.dataclass
class Command:
    action: str
    level: int = 1


received: list[Any] = []


async def on_reading(sensor_id: str, payload: Reading) -> dict[str, Any]:
    received.append(payload)
    return {"sensor": sensor_id, "doubled": payload.value * 2}


def on_command(payload: Command) -> str:  # a plain handler: runs in the thread pool
    received.append(payload)
    return payload.action


async def untyped(payload: dict) -> None:  # type: ignore[type-arg]  # plain dict: no validation
    received.append(payload)


def make_router() -> Router:
    router = Router()
    router.on("sensors/{sensor_id}/reading", on_reading, qos=1)
    router.on("devices/command", on_command)
    router.on("raw/{kind}", untyped, payload_format="json")
    router.on("text/reading", _text_handler(), payload_format="text")
    return router


def _text_handler() -> Any:
    async def handler(payload: Reading) -> float:
        received.append(payload)
        return payload.value

    return handler


@pytest.fixture(autouse=True)
def _clear() -> None:
    received.clear()


async def test_valid_payload_arrives_as_a_model() -> None:
    async with TestClient(make_router()) as client:
        result = await client.publish("sensors/s1/reading", {"value": "21.5", "tags": ["a"]}, qos=1,
                                      response_topic="r/1")
    assert received == [Reading(value=21.5, unit="C", tags=["a"])]
    assert result.responses[0].json() == {"sensor": "s1", "doubled": 43.0}
    assert result.dead_letters == []


async def test_invalid_payload_is_dead_lettered_with_the_fields_and_not_the_values(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-value-not-for-logs"
    caplog.set_level(logging.DEBUG)
    async with TestClient(make_router()) as client:
        result = await client.publish("sensors/s1/reading", {"value": secret, "tags": "nope"}, qos=1)
    assert received == []
    [dead] = result.dead_letters
    assert dead.error_type == "PayloadValidationError"
    assert dead.original_topic == "sensors/s1/reading"
    assert dead.route == "sensors/{sensor_id}/reading"
    assert "value:" in dead.error and "tags:" in dead.error
    assert dead.error.startswith("payload is not a valid Reading")
    assert secret not in dead.error
    assert secret.encode() in dead.payload  # the original payload travels with the dead letter
    assert secret not in caplog.text
    [call] = result.calls
    assert isinstance(call.error, PayloadValidationError)
    assert client.acks == [(1, 1)]  # acknowledged: the dead letter holds the message now


async def test_dataclass_payload_in_a_sync_handler() -> None:
    async with TestClient(make_router()) as client:
        ok = await client.publish("devices/command", {"action": "reboot", "level": 3}, response_topic="r")
        bad = await client.publish("devices/command", {"level": "high"})
        not_object = await client.publish("devices/command", [1, 2])
    assert received == [Command("reboot", 3)]
    assert ok.responses[0].text() == "reboot"
    assert bad.dead_letters[0].error_type == "PayloadValidationError"
    assert "action: Field required" in bad.dead_letters[0].error
    assert "level:" in bad.dead_letters[0].error
    assert not_object.dead_letters[0].error_type == "PayloadValidationError"


async def test_text_payload_is_parsed_as_json_for_the_model() -> None:
    async with TestClient(make_router()) as client:
        ok = await client.publish("text/reading", '{"value": 3}', response_topic="r")
        bad = await client.publish("text/reading", "not json")
    assert ok.responses[0].text() == "3.0"
    assert bad.dead_letters[0].error_type == "PayloadValidationError"


async def test_other_annotations_are_not_validated() -> None:
    async with TestClient(make_router()) as client:
        await client.publish("raw/x", {"anything": [1]})
        await client.publish("raw/y", [1, 2])  # not a dict, still delivered: `dict` is only a hint
    assert received == [{"anything": [1]}, [1, 2]]


def test_string_annotations_resolve_in_the_handler_module() -> None:
    # This module uses `from __future__ import annotations`: every annotation here is a string.
    router = make_router()
    route = router.routes[0]
    assert route.handler.arguments  # built
    assert is_validated_type(Reading) and is_validated_type(Command)
    assert not is_validated_type(dict) and not is_validated_type(Any) and not is_validated_type(Reading(value=1))


class Opaque:
    pass


@dataclasses.dataclass
class NotValidatable:
    thing: Opaque  # pydantic has no schema for an arbitrary class


async def needs_opaque(payload: NotValidatable) -> None: ...


def test_an_unbuildable_model_is_a_startup_error() -> None:
    with pytest.raises(RouteError, match=r"route 'x' .*cannot build a validator for payload type NotValidatable"):
        Router().on("x", needs_opaque)


def test_to_jsonable() -> None:
    assert to_jsonable(Reading(value=1)) == {"value": 1.0, "unit": "C", "tags": []}
    assert to_jsonable(Command("a")) == {"action": "a", "level": 1}
    assert to_jsonable({"x": 1}) == {"x": 1}
