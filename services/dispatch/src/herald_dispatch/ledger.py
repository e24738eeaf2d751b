"""What dispatch knows of each delivery: attempts before sending, final results after.

Before a batch is sent its attempt is recorded, so a batch handed over again after a crash is
known to have been (perhaps) sent. Each final result is stored once, with the DeliveryOutcomes
event reporting it, in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.outbox import OutboxEvent, enqueue
from herald_dispatch.channels import Outcome
from herald_dispatch.receipts import apply_receipts
from herald_dispatch.storage import outbox

_STATUS_NAMES = {
    events.DeliveryStatus.DELIVERY_STATUS_SENT: "sent",
    events.DeliveryStatus.DELIVERY_STATUS_FAILED: "failed",
    events.DeliveryStatus.DELIVERY_STATUS_SKIPPED: "skipped",
    events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN: "unknown",
}
_RECORD = sa.text(
    """
    INSERT INTO dispatch.deliveries
        (delivery_id, account_id, campaign, run, destination, user_id, status, attempts, reason, resent,
         provider_message_id)
    SELECT d, :account_id, :campaign, :run, :destination, u, s, a, r,
           -- Another attempt at the batch began after this one (this replica stalled past its ack
           -- wait): whatever this one sent, that one may send again.
           x OR (s = 'sent' AND (SELECT attempts FROM dispatch.batch_attempts WHERE batch_id = :batch_id)
                                > CAST(:attempt AS int)),
           nullif(m, '')
    FROM unnest(CAST(:ids AS text[]), CAST(:users AS text[]), CAST(:statuses AS text[]),
                CAST(:attempts AS int[]), CAST(:reasons AS text[]), CAST(:resent AS bool[]),
                CAST(:messages AS text[]))
         AS t(d, u, s, a, r, x, m)
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id, resent
    """
)

# An intent has served its purpose once its delivery has a result.
_FORGET_INTENTS = sa.text(
    "DELETE FROM dispatch.delivery_intents WHERE delivery_id = ANY(CAST(:ids AS text[]))"
)
_BEGIN = sa.text(
    """
    WITH attempt AS (
        INSERT INTO dispatch.batch_attempts AS b (batch_id, account_id, attempts)
        VALUES (:batch_id, :account_id, 1)
        ON CONFLICT (batch_id) DO UPDATE SET attempts = b.attempts + 1, started_at = now()
        RETURNING attempts
    )
    SELECT (SELECT attempts FROM attempt) AS attempts,
           ARRAY(SELECT delivery_id FROM dispatch.deliveries
                 WHERE delivery_id = ANY(CAST(:ids AS text[]))) AS finished,
           ARRAY(SELECT delivery_id FROM dispatch.delivery_intents
                 WHERE delivery_id = ANY(CAST(:ids AS text[]))) AS intended
    """
)


@dataclass(frozen=True)
class Attempt:
    number: int  # above 1, deliveries without a result may have been sent before
    finished: set[str]  # deliveries with a final result
    intended: set[str]  # deliveries without one whose provider request may have been made


class DeliveryLedger:
    def __init__(self, database: Database, subjects: Subjects) -> None:
        self.database = database
        self.subjects = subjects

    async def begin(self, batch: events.DeliveryBatch, account_id: uuid.UUID) -> Attempt:
        """Records an attempt at the batch, before anything is sent, in one round trip: its
        number, the deliveries that already have a final result (the batch was handed over
        again) and those whose request was about to be made when an earlier attempt ended."""
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    _BEGIN,
                    {
                        "batch_id": batch.batch_id,
                        "account_id": account_id,
                        "ids": [r.delivery_id for r in batch.recipients],
                    },
                )
            ).one()
        return Attempt(int(row.attempts), set(row.finished), set(row.intended))

    async def record(
        self,
        batch: events.DeliveryBatch,
        account_id: uuid.UUID,
        attempt: int,
        outcomes: Sequence[Outcome],
        *,
        forget_intents: bool = False,
    ) -> int:
        """Stores results not stored before and reports them in one DeliveryOutcomes event.
        Whichever attempt records a delivery first wins; a sent delivery counts as resent when a
        later attempt at its batch exists, since that attempt may send it too."""
        unique = {o.recipient.delivery_id: o for o in outcomes}
        if not unique:
            return 0
        rows = list(unique.values())
        async with self.database.transaction() as session:
            stored = (
                await session.execute(
                    _RECORD,
                    {
                        "batch_id": batch.batch_id,
                        "attempt": attempt,
                        "account_id": account_id,
                        "campaign": batch.campaign,
                        "run": batch.run,
                        "destination": batch.destination,
                        "ids": [o.recipient.delivery_id for o in rows],
                        "users": [o.recipient.user_id for o in rows],
                        "statuses": [_STATUS_NAMES[o.status] for o in rows],
                        "attempts": [o.attempts for o in rows],
                        "reasons": [o.reason for o in rows],
                        "resent": [o.resent for o in rows],
                        "messages": [o.provider_message_id for o in rows],
                    },
                )
            ).all()
            resent = {r.delivery_id: r.resent for r in stored}
            if forget_intents:
                await session.execute(_FORGET_INTENTS, {"ids": [o.recipient.delivery_id for o in rows]})
            if not resent:
                return 0
            report = events.DeliveryOutcomes(
                event_id=str(uuid.uuid4()),
                campaign=batch.campaign,
                run=batch.run,
                destination=batch.destination,
                account=account_name(account_id),
                occur_time=api.timestamp(api.utcnow()),
                results=[
                    events.DeliveryResult(
                        delivery_id=o.recipient.delivery_id,
                        user_id=o.recipient.user_id,
                        status=o.status,
                        reason=o.reason,
                        attempts=o.attempts,
                        resent=resent[o.recipient.delivery_id],
                    )
                    for o in rows
                    if o.recipient.delivery_id in resent
                ],
            )
            await enqueue(
                session, outbox, [OutboxEvent.of(self.subjects.delivery_outcomes, report, report.event_id)]
            )
            # Receipts that came before these deliveries were recorded apply now.
            message_ids = [o.provider_message_id for o in rows if o.provider_message_id]
            if message_ids:
                await apply_receipts(session, self.subjects, account_id, message_ids)
        return len(resent)
