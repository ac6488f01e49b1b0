"""Routes of the operations test app (ROUTERS_PACKAGE=tests.apps.ops_app)."""

from __future__ import annotations

import asyncio
import logging
import os

from pydantic import BaseModel

from core.integrations.rate_limit import RateLimit
from core.router import Router

log = logging.getLogger("ops_app")


class Reading(BaseModel):
    value: float


async def data(device_id: str, payload: Reading) -> None:
    log.debug("reading from %s", device_id)


async def limited(device_id: str) -> None:
    return None


async def plain(device_id: str) -> None:
    return None


async def slow(device_id: str) -> None:
    await asyncio.sleep(float(os.environ.get("OPS_APP_SLOW_SECONDS", "0.02")))


async def fail(device_id: str) -> None:
    raise RuntimeError(f"failing on purpose for {device_id}")


router = Router()
router.on("ops/{device_id}/data", data, qos=1, shared=True)
if os.environ.get("ENABLE_REDIS", "").lower() == "true":  # a Redis rate limit needs ENABLE_REDIS (startup check)
    router.on("ops/{device_id}/limited", limited, qos=1, shared=True,
              middleware=[RateLimit(5, per=3600, key="device_id", backend="redis")])
router.on("ops/{device_id}/plain", plain, qos=1)
router.on("ops/{device_id}/slow", slow, qos=1, shared=True)
router.on("ops/{device_id}/fail", fail, qos=1)
