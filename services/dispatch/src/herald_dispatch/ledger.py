"""What dispatch knows of each delivery: attempts before sending, final results after.

Before a batch is sent its attempt is recorded, so a batch handed over again after a crash is
known to have been (perhaps) sent. Each final result is stored once, with the DeliveryOutcomes
event reporting it, in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert

from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.outbox import OutboxEvent, enqueue
from herald_dispatch.channels import Outcome
from herald_dispatch.storage import batch_attempts, deliveries, outbox

_STATUS_NAMES = {
    events.DeliveryStatus.DELIVERY_STATUS_SENT: "sent",
    events.DeliveryStatus.DELIVERY_STATUS_FAILED: "failed",
    events.DeliveryStatus.DELIVERY_STATUS_SKIPPED: "skipped",
    events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN: "unknown",
}
_RECORD = sa.text(
    """
    INSERT INTO dispatch.deliveries
        (delivery_id, campaign, run, destination, user_id, status, attempts, reason, resent)
    SELECT d, :campaign, :run, :destination, u, s, a, r, x
    FROM unnest(CAST(:ids AS text[]), CAST(:users AS text[]), CAST(:statuses AS text[]),
                CAST(:attempts AS int[]), CAST(:reasons AS text[]), CAST(:resent AS bool[]))
         AS t(d, u, s, a, r, x)
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id
    """
)


class DeliveryLedger:
    def __init__(self, database: Database, subjects: Subjects) -> None:
        self.database = database
        self.subjects = subjects

    async def finished(self, batch: events.DeliveryBatch) -> set[str]:
        """The batch's deliveries that already have a final result (the batch was handed over again)."""
        ids = [r.delivery_id for r in batch.recipients]
        async with self.database.transaction() as session:
            return set(
                await session.scalars(
                    sa.select(deliveries.c.delivery_id).where(
                        deliveries.c.delivery_id == sa.func.any(sa.cast(sa.literal(ids), ARRAY(sa.Text)))
                    )
                )
            )

    async def attempt(self, batch: events.DeliveryBatch) -> bool:
        """Records an attempt at sending the batch, before sending; True if it was attempted before,
        so deliveries without a result may have been sent."""
        async with self.database.transaction() as session:
            statement = insert(batch_attempts).values(batch_id=batch.batch_id, attempts=1)
            attempts = await session.scalar(
                statement.on_conflict_do_update(
                    index_elements=[batch_attempts.c.batch_id],
                    set_={"attempts": batch_attempts.c.attempts + 1, "started_at": sa.func.now()},
                ).returning(batch_attempts.c.attempts)
            )
        return (attempts or 1) > 1

    async def record(self, batch: events.DeliveryBatch, outcomes: Sequence[Outcome]) -> int:
        """Stores results not stored before and reports them in one DeliveryOutcomes event."""
        unique = {o.recipient.delivery_id: o for o in outcomes}
        if not unique:
            return 0
        rows = list(unique.values())
        async with self.database.transaction() as session:
            new_ids = set(
                await session.scalars(
                    _RECORD,
                    {
                        "campaign": batch.campaign,
                        "run": batch.run,
                        "destination": batch.destination,
                        "ids": [o.recipient.delivery_id for o in rows],
                        "users": [o.recipient.user_id for o in rows],
                        "statuses": [_STATUS_NAMES[o.status] for o in rows],
                        "attempts": [o.attempts for o in rows],
                        "reasons": [o.reason for o in rows],
                        "resent": [o.resent for o in rows],
                    },
                )
            )
            if not new_ids:
                return 0
            report = events.DeliveryOutcomes(
                event_id=str(uuid.uuid4()),
                campaign=batch.campaign,
                run=batch.run,
                destination=batch.destination,
                occur_time=api.timestamp(api.utcnow()),
                results=[
                    events.DeliveryResult(
                        delivery_id=o.recipient.delivery_id,
                        user_id=o.recipient.user_id,
                        status=o.status,
                        reason=o.reason,
                        attempts=o.attempts,
                        resent=o.resent,
                    )
                    for o in rows
                    if o.recipient.delivery_id in new_ids
                ],
            )
            await enqueue(
                session, outbox, [OutboxEvent.of(self.subjects.delivery_outcomes, report, report.event_id)]
            )
        return len(new_ids)
