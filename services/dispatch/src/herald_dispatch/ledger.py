"""Final delivery results: recorded once, with their DeliveryOutcome events, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.outbox import OutboxEvent, enqueue
from herald_dispatch.storage import deliveries, outbox

SENT = events.DeliveryStatus.DELIVERY_STATUS_SENT
FAILED = events.DeliveryStatus.DELIVERY_STATUS_FAILED
_STATUS_NAMES = {SENT: "sent", FAILED: "failed"}


@dataclass(frozen=True)
class DeliveryResult:
    job: events.DeliveryJob
    status: events.DeliveryStatus.ValueType
    attempts: int
    reason: str = ""


class DeliveryLedger:
    def __init__(self, database: Database, subjects: Subjects) -> None:
        self.database = database
        self.subjects = subjects

    async def finished(self, delivery_ids: Iterable[str]) -> set[str]:
        """Which of these deliveries already have a final result (redelivered jobs)."""
        ids = list(set(delivery_ids))
        if not ids:
            return set()
        async with self.database.transaction() as session:
            found = await session.scalars(
                sa.select(deliveries.c.delivery_id).where(deliveries.c.delivery_id.in_(ids))
            )
            return set(found)

    async def record(self, results: Sequence[DeliveryResult]) -> int:
        """Stores results not stored before and queues one outcome event for each; returns how many."""
        if not results:
            return 0
        by_id = {r.job.delivery_id: r for r in results}
        rows = [
            {
                "delivery_id": r.job.delivery_id,
                "campaign": r.job.campaign,
                "run": r.job.run,
                "destination": r.job.destination,
                "user_id": r.job.user_id,
                "status": _STATUS_NAMES[r.status],
                "attempts": r.attempts,
                "reason": r.reason,
            }
            for r in by_id.values()
        ]
        now = api.timestamp(api.utcnow())
        async with self.database.transaction() as session:
            new_ids = await session.scalars(
                insert(deliveries)
                .on_conflict_do_nothing(index_elements=[deliveries.c.delivery_id])
                .returning(deliveries.c.delivery_id),
                rows,
            )
            outcomes = []
            for delivery_id in new_ids:
                r = by_id[delivery_id]
                outcome = events.DeliveryOutcome(
                    event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"outcome:{delivery_id}")),
                    delivery_id=delivery_id,
                    campaign=r.job.campaign,
                    run=r.job.run,
                    user_id=r.job.user_id,
                    status=r.status,
                    reason=r.reason,
                    attempts=r.attempts,
                    occur_time=now,
                )
                outcomes.append(OutboxEvent.of(self.subjects.delivery_outcome, outcome, outcome.event_id))
            await enqueue(session, outbox, outcomes)
        return len(outcomes)
