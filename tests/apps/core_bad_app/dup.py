"""Registers one filter twice: startup must fail naming the route and this module."""

from core.router import Router


async def handler(**params: str) -> None:
    return None


router = Router()
router.on("bad/{device_id}/status", handler)
router.on("bad/{other_id}/status", handler)
