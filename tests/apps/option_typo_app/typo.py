"""`worker_cout=3` instead of `worker_count=3`: startup must fail naming the route and the option."""

from core.router import Router


async def handler(device_id: str) -> None:
    return None


router = Router()
router.on("typo/{device_id}/status", handler, shared=True, worker_cout=3)
