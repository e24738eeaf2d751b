"""Reading the final results of deliveries, for people asking what happened to a user."""

from __future__ import annotations

from typing import Any

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
        return [_delivery(r) for r in rows]

    async def of_run(self, campaign: str, run: str, size: int, token: str) -> tuple[list[pb.Delivery], str]:
        """A page of a run's deliveries, by user (the campaign's user index, read in order), and
        the next page's token."""
        check = Validator()
        check.require(campaign.startswith("campaigns/"), "campaign", "required: campaigns/<id>")
        check.require(run.startswith(f"{campaign}/runs/"), "run", "must be a run of the campaign")
        check.require(0 <= size <= MAX_LISTED, "page_size", f"0 to {MAX_LISTED}")
        check.raise_if_any()
        after = api.decode_page_token(token, 2)
        query = (
            sa.select(deliveries)
            .where(
                deliveries.c.account_id == current_account_id(),
                deliveries.c.campaign == campaign,
                deliveries.c.run == run,
            )
            .order_by(deliveries.c.user_id, deliveries.c.delivery_id)
            .limit((size or MAX_LISTED) + 1)
        )
        if after is not None:
            query = query.where(sa.tuple_(deliveries.c.user_id, deliveries.c.delivery_id) > tuple(after))
        async with self.database.transaction() as session:
            rows = (await session.execute(query)).all()
        page = rows[: size or MAX_LISTED]
        more = len(rows) > len(page)
        next_token = api.encode_page_token(page[-1].user_id, page[-1].delivery_id) if more else ""
        return [_delivery(r) for r in page], next_token


def _delivery(row: Any) -> pb.Delivery:
    return pb.Delivery(
        delivery_id=row.delivery_id,
        user_id=row.user_id,
        run=row.run,
        status=row.status,
        reason=row.reason,
        attempts=row.attempts,
        complete_time=api.timestamp(row.completed_at),
    )
