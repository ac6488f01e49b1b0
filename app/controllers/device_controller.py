"""Example controller: device status reports and request/response."""

from __future__ import annotations

import logging
from typing import Any

from core.routing.context import MessageContext
from core.controller import Controller


class DeviceController(Controller):
    @staticmethod
    async def status(device_id: str, payload: Any, context: MessageContext) -> dict[str, Any]:
        """`devices/{device_id}/status`: log the report; answer a request that carries a response topic."""
        # Payload contents may be personal data: INFO names the device only, DEBUG adds the state.
        DeviceController.logger.info("device %s reported its status", device_id)
        if DeviceController.logger.isEnabledFor(logging.DEBUG):
            state = payload.get("state") if isinstance(payload, dict) else payload
            DeviceController.logger.debug("device %s reports %r", device_id, state)
        return {"device_id": device_id, "received": True}

    @staticmethod
    def command(device_id: str, payload: Any) -> dict[str, Any]:
        """`devices/{device_id}/command`: a plain (sync) handler runs in the thread pool."""
        return {"device_id": device_id, "accepted": payload}
