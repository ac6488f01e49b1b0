"""Defines the router."""

from core.router import Router


async def status(device_id: str) -> None:
    return None


router = Router()
router.on("reexport/{device_id}/status", status)
