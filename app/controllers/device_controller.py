"""Example controller: device status reports and request/response."""

from __future__ import annotations

from typing import Any

from core.context import MessageContext
from core.controller import Controller


class DeviceController(Controller):
    @staticmethod
    async def status(device_id: str, payload: Any, context: MessageContext) -> dict[str, Any]:
        """`devices/{device_id}/status`: log the state; answer a request that carries a response topic."""
        state = payload.get("state") if isinstance(payload, dict) else payload
        DeviceController.logger.info("device %s reports %r", device_id, state)
        return {"device_id": device_id, "received": True}

    @staticmethod
    def command(device_id: str, payload: Any) -> dict[str, Any]:
        """`devices/{device_id}/command`: a plain (sync) handler runs in the thread pool."""
        return {"device_id": device_id, "accepted": payload}
