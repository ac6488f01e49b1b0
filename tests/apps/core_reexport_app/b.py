"""Imports the router of `a` and adds a route to it: the same Router object is seen in two modules."""

from tests.apps.core_reexport_app.a import router


async def command(device_id: str) -> None:
    return None


router.on("reexport/{device_id}/command", command)
