"""Reading the final results of deliveries, for people asking what happened to a user."""

from __future__ import annotations

import sqlalchemy as sa

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald_common import api
from herald_common.auth import current_account_id
from herald_common.db import Database
from herald_common.errors import Validator
from herald_dispatch.storage import deliveries

MAX_LISTED = 1000


class DeliveryQueries:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def of_user(self, campaign: str, user_id: str) -> list[pb.Delivery]:
        check = Validator()
        check.require(campaign.startswith("campaigns/"), "campaign", "required: campaigns/<id>")
        check.require(api.is_valid_id(user_id), "user_id", "required: 1-200 letters, digits or ._:@+-")
        check.raise_if_any()
        async with self.database.transaction() as session:
            rows = (
                await session.execute(
                    sa.select(deliveries)
                    .where(
                        deliveries.c.account_id == current_account_id(),
                        deliveries.c.campaign == campaign,
                        deliveries.c.user_id == user_id,
                    )
                    .order_by(deliveries.c.completed_at)
                    .limit(MAX_LISTED)
                )
            ).all()
        return [
            pb.Delivery(
                delivery_id=r.delivery_id,
                run=r.run,
                status=r.status,
                reason=r.reason,
                attempts=r.attempts,
                complete_time=api.timestamp(r.completed_at),
            )
            for r in rows
        ]
