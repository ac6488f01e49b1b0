"""A shared route with ordered=True: `--workers 2` must refuse it at startup, naming the route."""

from core.router import Router


async def status(device_id: str) -> None:
    return None


router = Router()
router.on("ordered/{device_id}/status", status, qos=1, shared=True, ordered=True)
