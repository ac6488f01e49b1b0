"""Orders through the outbox, idempotent per order number, for the database-outage test.

OUTAGE_APP_PREFIX  topics: `<prefix>/in/{n}` in, `<prefix>/out/{n}` out
OUTAGE_APP_ORDERS  name of the business table (created at start through core.integrations.database.Base)

A handler whose COMMIT was cut off cannot know whether it committed; the redelivered (retried)
order finds its row and does nothing, as an at-least-once consumer must.
"""

from __future__ import annotations

import os

from sqlalchemy import Column, Integer, Table, select

from core.routing.context import MessageContext
from core.integrations.database import Base
from core.router import Router

_PREFIX = os.environ.get("OUTAGE_APP_PREFIX", "outage-app")

orders = Table(
    os.environ.get("OUTAGE_APP_ORDERS", "outage_app_orders"), Base.metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False, index=True),
)


async def place(n: str, context: MessageContext) -> None:
    number = int(n)
    async with context.transaction() as tx:
        if (await tx.session.execute(select(orders.c.id).where(orders.c.n == number))).first() is not None:
            return  # placed by an earlier attempt whose COMMIT went through
        await tx.session.execute(orders.insert().values(n=number))
        tx.publish(f"{_PREFIX}/out/{number}", {"n": number}, qos=1)


router = Router()
router.on(f"{_PREFIX}/in/{{n}}", place, qos=1, shared=True, payload_format="text")
