"""The example app in app/ (its routers, controllers and middleware), run with core.testing.TestClient."""

from __future__ import annotations

import pytest

from bootstrap.app import Application
from core.foundation.config import load_settings
from core.testing import TestClient


@pytest.fixture
def app() -> Application:
    return Application.load(load_settings({"ROUTERS_PACKAGE": "app.routers"}))


async def test_device_status_answers_on_the_response_topic(app: Application) -> None:
    async with TestClient(app) as client:
        result = await client.publish("devices/42/status", {"state": "on"}, qos=1,
                                      response_topic="replies/42", correlation_data=b"c-1")
    assert result.delivered_to == ["devices/{device_id}/status"]
    [reply] = result.responses
    assert reply.json() == {"device_id": "42", "received": True}
    assert reply.correlation_data == b"c-1"
    assert client.acks == [(1, 1)]


async def test_device_command_runs_the_plain_handler(app: Application) -> None:
    async with TestClient(app) as client:
        result = await client.publish("devices/7/command", {"power": "off"}, qos=1, response_topic="r")
    assert result.result == {"device_id": "7", "accepted": {"power": "off"}}
    assert result.responses[0].json() == result.result


async def test_sensor_data_passes_through_the_timing_middleware(app: Application) -> None:
    async with TestClient(app) as client:
        ok = await client.publish("sensors/t1/data", {"value": 21.5}, qos=1)
        bad = await client.publish("sensors/t1/data", {"value": "warm"}, qos=1)
        not_json = await client.publish("sensors/t1/data", "{oops", qos=1)
    assert ok.delivered_to == ["sensors/{sensor_id}/data"] and ok.dead_letters == [] and ok.calls[0].ok
    assert [(d.error_type, d.original_topic) for d in bad.dead_letters] == [("DeadLetter", "sensors/t1/data")]
    assert "numeric 'value'" in bad.dead_letters[0].error
    assert [d.error_type for d in not_json.dead_letters] == ["PayloadError"]
    assert client.stats.route("sensors/{sensor_id}/data").handled == 1


async def test_logs_route_takes_everything_below_logs(app: Application) -> None:
    async with TestClient(app) as client:
        deep = await client.publish("logs/a/b/c", "line")
        top = await client.publish("logs", "bare")  # `logs/#` matches its parent level too
        other = await client.publish("metrics/x", "nope")
    assert deep.calls[0].params == {"path": "a/b/c"}
    assert top.calls[0].params == {"path": ""}
    assert other.delivered_to == []


def test_the_example_app_with_the_sync_form() -> None:
    with TestClient("app.routers") as client:
        result = client.publish_sync("devices/1/status", "online", response_topic="r")
    assert result.responses[0].json() == {"device_id": "1", "received": True}


async def test_device_status_logs_no_payload_contents_at_info(app: Application,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    secret = "state-7f3a9c"
    with caplog.at_level("INFO", logger="app.controllers"):
        async with TestClient(app) as client:
            await client.publish("devices/42/status", {"state": secret}, qos=1)
    assert "device 42 reported its status" in caplog.messages
    assert not any(secret in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="app.controllers"):
        async with TestClient(app) as client:
            await client.publish("devices/42/status", {"state": secret}, qos=1)
    assert f"device 42 reports {secret!r}" in caplog.messages  # DEBUG may have it
