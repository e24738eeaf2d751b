"""The last check before provider requests, shared by every replica through PostgreSQL.

Before each small wave of SMS requests one statement asks whether the campaign was halted and
which phones opted out, and records the intent to send the rest. So a stop reaches every
replica's next wave, a STOP reply the next message to that phone, and a crash leaves unknown only
the deliveries of the waves really under way.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald_common.db import Database
from herald_dispatch.storage import halted_campaigns, sms_opt_outs


@dataclass(frozen=True)
class Admission:
    """What a wave may do: nothing once its campaign is halted; else all but the opted-out."""

    halted: bool = False
    opted_out: frozenset[str] = frozenset()  # delivery ids whose phone opted out


_ADMIT = sa.text(
    """
    WITH gate AS (
        SELECT EXISTS (SELECT 1 FROM dispatch.halted_campaigns WHERE campaign = :campaign) AS halted
    ),
    wave AS (
        SELECT d, p FROM unnest(CAST(:ids AS text[]), CAST(:phones AS text[])) AS t(d, p)
    ),
    blocked AS (
        SELECT w.d FROM wave w
        JOIN dispatch.sms_opt_outs o ON o.account_id = :account_id AND o.phone = w.p
    ),
    intended AS (
        INSERT INTO dispatch.delivery_intents (delivery_id, account_id)
        SELECT d, :account_id FROM wave
        WHERE CAST(:record AS bool) AND NOT (SELECT halted FROM gate) AND d NOT IN (SELECT d FROM blocked)
        ON CONFLICT (delivery_id) DO NOTHING
    )
    SELECT (SELECT halted FROM gate) AS halted, ARRAY(SELECT d FROM blocked) AS opted_out
    """
)
_HALTED = sa.text("SELECT EXISTS (SELECT 1 FROM dispatch.halted_campaigns WHERE campaign = :campaign)")


class SendGate:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def admit(
        self,
        account_id: uuid.UUID,
        campaign: str,
        wave: Sequence[tuple[str, str]],
        *,
        record_intent: bool = True,
    ) -> Admission:
        """For (delivery id, phone) pairs about to be sent: whether the campaign is halted, and
        which phones opted out; records the intent to send the others (`record_intent`)."""
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    _ADMIT,
                    {
                        "campaign": campaign,
                        "account_id": account_id,
                        "ids": [d for d, _ in wave],
                        "phones": [p for _, p in wave],
                        "record": record_intent,
                    },
                )
            ).one()
        return Admission(bool(row.halted), frozenset(row.opted_out))

    async def halted(self, campaign: str) -> bool:
        async with self.database.transaction() as session:
            return bool(await session.scalar(_HALTED, {"campaign": campaign}))

    async def halt(self, account_id: uuid.UUID, campaign: str) -> None:
        async with self.database.transaction() as session:
            await session.execute(
                insert(halted_campaigns)
                .values(campaign=campaign, account_id=account_id)
                .on_conflict_do_nothing()
            )


async def record_opt_out(session: AsyncSession, account_id: uuid.UUID, phone: str, opted_out: bool) -> None:
    """A STOP (or START) reply from `phone` to one of the account's numbers, in the caller's
    transaction."""
    if opted_out:
        await session.execute(
            insert(sms_opt_outs).values(account_id=account_id, phone=phone).on_conflict_do_nothing()
        )
    else:
        await session.execute(
            sa.delete(sms_opt_outs).where(
                sms_opt_outs.c.account_id == account_id, sms_opt_outs.c.phone == phone
            )
        )
