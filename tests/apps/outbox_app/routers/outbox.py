"""One shared route whose handler writes an order row and an outbox message in one transaction.

OUTBOX_APP_PREFIX  topics: `<prefix>/in/{n}` in, `<prefix>/out/{n}` out
OUTBOX_APP_ORDERS  name of the business table (created at start through core.integrations.database.Base)
OUTBOX_APP_RAISE   comma-separated n whose handler raises after tx.publish (nothing may be published)
"""

from __future__ import annotations

import os

from sqlalchemy import Column, Integer, String, Table

from core.routing.context import MessageContext
from core.integrations.database import Base
from core.router import Router

_PREFIX = os.environ.get("OUTBOX_APP_PREFIX", "outbox-app")
_RAISE = {int(n) for n in os.environ.get("OUTBOX_APP_RAISE", "").split(",") if n.strip()}

orders = Table(
    os.environ.get("OUTBOX_APP_ORDERS", "outbox_app_orders"), Base.metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False),
    Column("worker", String(32), nullable=False),
)


async def place(n: str, context: MessageContext) -> None:
    number = int(n)
    async with context.transaction() as tx:
        await tx.session.execute(orders.insert().values(n=number, worker=context.worker_id))
        tx.publish(f"{_PREFIX}/out/{number}", {"n": number}, qos=1)
        if number in _RAISE:
            raise ValueError(f"order {number} rejected after tx.publish")


router = Router()
router.on(f"{_PREFIX}/in/{{n}}", place, qos=1, shared=True, payload_format="text")
