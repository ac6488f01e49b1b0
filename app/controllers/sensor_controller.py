"""Example controller: sensor readings, spread over worker processes."""

from __future__ import annotations

from typing import Any

from core.controller import Controller
from core.runtime.dispatcher import DeadLetter


class SensorController(Controller):
    @staticmethod
    async def data(sensor_id: str, payload: Any) -> None:
        """`sensors/{sensor_id}/data`: expects a JSON object with a numeric `value`."""
        if not isinstance(payload, dict) or not isinstance(payload.get("value"), (int, float)):
            raise DeadLetter("expected a JSON object with a numeric 'value'")
        SensorController.logger.debug("sensor %s = %s", sensor_id, payload["value"])

    @staticmethod
    async def log(path: str, payload: Any) -> None:
        """`logs/{path:#}`: anything below `logs/`."""
        SensorController.logger.debug("log %s: %r", path, payload)
