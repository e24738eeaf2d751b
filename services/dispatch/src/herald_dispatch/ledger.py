"""What dispatch knows of each delivery: attempts before sending, final results after.

Before a batch is sent its attempt is recorded, so a batch handed over again after a crash is
known to have been (perhaps) sent. Each final result is stored once, with the DeliveryOutcomes
event reporting it, in one transaction.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.db import Database, Statement
from herald_common.metrics import Metrics
from herald_common.outbox import OutboxEvent, enqueue
from herald_dispatch.channels import UNKNOWN, Outcome
from herald_dispatch.receipts import apply_receipts
from herald_dispatch.storage import outbox

_STATUS_NAMES = {
    events.DeliveryStatus.DELIVERY_STATUS_SENT: "sent",
    events.DeliveryStatus.DELIVERY_STATUS_FAILED: "failed",
    events.DeliveryStatus.DELIVERY_STATUS_SKIPPED: "skipped",
    events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN: "unknown",
}
# The results go in as one JSON array of objects, and the stored deliveries come back as one JSON
# array of [id, resent] pairs: asyncpg spends several times as long on an array's elements, and a
# row per delivery would cost each its own result object.
_RECORD = Statement(
    """
    WITH stored AS (
    INSERT INTO dispatch.deliveries
        (delivery_id, account_id, campaign, run, destination, user_id, status, attempts, reason, resent,
         provider_message_id, completed_at)
    SELECT d, :account_id, :campaign, :run, :destination, u, s, a, r,
           -- Another attempt at the batch began after this one (this replica stalled past its ack
           -- wait): whatever this one sent, that one may send again, where the destination
           -- de-duplicates (an SMS delivery belongs to the one attempt that claimed it).
           x OR (CAST(:claimed AS bool) IS FALSE AND s = 'sent'
                 AND CAST(:latest_attempt AS int) > CAST(:attempt AS int)),
           nullif(m, ''), CAST(:completed_at AS timestamptz)
    FROM json_to_recordset(CAST(:results AS json))
         AS t(d text, u text, s text, a int, r text, x bool, m text)
    ON CONFLICT (account_id, campaign, user_id, delivery_id) DO NOTHING
    RETURNING delivery_id, resent
    )
    SELECT coalesce(json_agg(json_build_array(delivery_id, resent)), '[]')::text FROM stored
    """
)

# An intent has served its purpose once its delivery has a result, or waits to be settled; a
# delivery waiting to be settled is done once it has a result. Both in one statement.
_FORGET_INTENTS_AND_SETTLED = Statement(
    """
    WITH intents AS (
        DELETE FROM dispatch.delivery_intents WHERE delivery_id = ANY(CAST(:ids AS text[]))
    )
    DELETE FROM dispatch.unsettled WHERE delivery_id = ANY(CAST(:settled AS text[]))
    """
)
_UNSETTLED = Statement(
    """
    INSERT INTO dispatch.unsettled AS u
        (delivery_id, account_id, destination_type, batch, recipient, provider_destination, phone, text,
         attempts, attempted_at, settle_after)
    SELECT d, :account_id, :destination_type, :batch, r, p, ph, tx, a,
           coalesce((SELECT intended_at FROM dispatch.delivery_intents i WHERE i.delivery_id = d), now()),
           now() + make_interval(secs => :settle_seconds)
    FROM unnest(CAST(:ids AS text[]), CAST(:recipients AS bytea[]), CAST(:providers AS text[]),
                CAST(:phones AS text[]), CAST(:texts AS text[]), CAST(:attempts AS int[]))
         AS t(d, r, p, ph, tx, a)
    ON CONFLICT (delivery_id) DO UPDATE
        SET provider_destination = excluded.provider_destination, text = excluded.text,
            attempts = u.attempts + excluded.attempts, attempted_at = excluded.attempted_at,
            settle_after = excluded.settle_after, rounds = u.rounds + 1
    """
)
# Seconds until the next unknown delivery of a worker type is due to be looked up (those due
# already are another settler's, claimed as this one looked).
_NEXT_SETTLE = Statement(
    """
    SELECT extract(epoch FROM min(settle_after) - now()) FROM dispatch.unsettled
    WHERE destination_type = :destination_type AND settle_after > now()
    """
)
# Due deliveries of a worker type, held for `lease` seconds while they are looked up.
_CLAIM_UNSETTLED = Statement(
    """
    UPDATE dispatch.unsettled SET settle_after = now() + make_interval(secs => :lease)
    WHERE delivery_id IN (
        SELECT delivery_id FROM dispatch.unsettled
        WHERE destination_type = :destination_type AND settle_after <= now()
        ORDER BY settle_after LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    RETURNING delivery_id, account_id, batch, recipient, provider_destination, phone, text, attempts,
              attempted_at, rounds
    """
)
# An attempt and what came before it are read in two statements, each with its own snapshot:
# the first takes the batch's attempts row, waiting for an earlier attempt that is recording its
# results (which holds that row, _HOLD_ATTEMPTS); the second then sees those results. Read in one
# statement, they could both miss each other: the recording attempt saw no later attempt (so its
# results were not counted as resent) and this one no results (so it sent the batch again).
_BEGIN = Statement(
    """
    INSERT INTO dispatch.batch_attempts AS b (batch_id, account_id, attempts)
    VALUES (:batch_id, :account_id, 1)
    ON CONFLICT (batch_id) DO UPDATE SET attempts = b.attempts + 1, started_at = now()
    RETURNING attempts
    """
)
# Each delivery is looked up in the ledger by its whole key, one probe each: "OFFSET 0" keeps the
# lookup a probe. Without it PostgreSQL may instead read the campaign's whole range of the ledger
# for every batch, when statistics from a smaller ledger say that range holds a row or two.
_BEFORE = Statement(
    """
    SELECT ARRAY(SELECT b.id FROM unnest(CAST(:users AS text[]), CAST(:ids AS text[])) AS b(u, id)
                 WHERE EXISTS (SELECT 1 FROM dispatch.deliveries d
                               WHERE d.account_id = :account_id AND d.campaign = :campaign
                                 AND d.user_id = b.u AND d.delivery_id = b.id
                               OFFSET 0)
                 UNION ALL
                 SELECT delivery_id FROM dispatch.unsettled
                 WHERE delivery_id = ANY(CAST(:ids AS text[]))) AS finished,
           (SELECT coalesce(json_object_agg(delivery_id, destination), '{}')
            FROM dispatch.delivery_intents WHERE delivery_id = ANY(CAST(:ids AS text[]))) AS intended
    """
)
# Results are recorded holding the batch's attempts row, so that a later attempt begins either
# before (and these results count as resent) or after (and it sees them); the row's count is what
# they are judged resent by.
_HOLD_ATTEMPTS = Statement(
    "SELECT attempts FROM dispatch.batch_attempts WHERE batch_id = :batch_id FOR SHARE"
)


# The attempt number the settler sends and records with: after every real attempt, so what it
# sends never counts as resent, and held by its lease rather than fenced by attempt numbers.
SETTLING = 1 << 30


@dataclass(frozen=True)
class Attempt:
    number: int  # above 1, deliveries without a result may have been sent before
    # Deliveries with a final result, or whose provider is to be asked for it (the settler's):
    # this attempt sends none of them.
    finished: set[str]
    # Deliveries without one whose provider request may have been made, and the provider's
    # destination it went to.
    intended: dict[str, str]

    @property
    def settling(self) -> bool:
        return self.number == SETTLING

    @property
    def again(self) -> bool:
        """A batch handed over again: an earlier attempt may have sent some of it."""
        return 1 < self.number < SETTLING


class DeliveryLedger:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        destination_type: str,
        settle_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.database = database
        self.subjects = subjects
        # The worker type whose deliveries this ledger records (and settles).
        self.destination_type = destination_type
        # How long an unanswered message waits before its provider is asked about it.
        self.settle_seconds = settle_seconds

    async def claim_unsettled(self, limit: int, lease_seconds: float) -> tuple[Sequence[Any], float | None]:
        """Unknown deliveries due to be looked up, held from other replicas for `lease_seconds`,
        and (when fewer than `limit` were due) the seconds until the next one is due."""
        async with self.database.direct_transaction() as connection:
            claimed = await _CLAIM_UNSETTLED.fetch(
                connection, destination_type=self.destination_type, limit=limit, lease=lease_seconds
            )
            if len(claimed) == limit:
                return claimed, None
            next_in = await _NEXT_SETTLE.fetch_value(connection, destination_type=self.destination_type)
            return claimed, None if next_in is None else float(next_in)

    async def begin(self, batch: events.DeliveryBatch, account_id: uuid.UUID) -> Attempt:
        """Records an attempt at the batch, before anything is sent: its number, the deliveries
        that already have a final result or wait for their provider to be asked (the batch was
        handed over again) and those whose request was about to be made when an earlier attempt
        ended."""
        async with self.database.direct_transaction() as connection:
            number = await _BEGIN.fetch_value(connection, batch_id=batch.batch_id, account_id=account_id)
            row = await _BEFORE.fetch_row(
                connection,
                account_id=account_id,
                campaign=batch.campaign,
                users=[r.user_id for r in batch.recipients],
                ids=[r.delivery_id for r in batch.recipients],
            )
        assert row is not None
        return Attempt(int(number), set(row.finished), dict(row.intended))

    async def record(
        self,
        batch: events.DeliveryBatch,
        account_id: uuid.UUID,
        attempt: int,
        outcomes: Sequence[Outcome],
        *,
        destination_type: str,
        claimed: bool = False,
    ) -> int:
        """Stores results not stored before and reports them in one DeliveryOutcomes event.
        Whichever attempt records a delivery first wins; a sent delivery counts as resent when a
        later attempt at its batch exists, since that attempt may send it too, unless deliveries
        are `claimed` (SMS: each by the one attempt that recorded its intent, which these results
        also clear)."""
        unique = {o.recipient.delivery_id: o for o in outcomes}
        if not unique:
            return 0
        to_settle: list[Outcome] = []
        rows: list[Outcome] = []
        for outcome in unique.values():
            (to_settle if outcome.status == UNKNOWN and outcome.settle is not None else rows).append(outcome)
        async with self.database.direct_transaction() as connection:
            # The batch's latest attempt, held until these results are committed.
            latest_attempt = await _HOLD_ATTEMPTS.fetch_value(connection, batch_id=batch.batch_id)
            if to_settle:
                await self._wait_to_settle(connection, batch, account_id, to_settle)
            if claimed:
                settled = [o.recipient.delivery_id for o in rows]
                await _FORGET_INTENTS_AND_SETTLED.execute(connection, ids=list(unique), settled=settled)
            if not rows:
                return 0
            completed_at = api.utcnow()
            results = [
                {
                    "d": o.recipient.delivery_id,
                    "u": o.recipient.user_id,
                    "s": _STATUS_NAMES[o.status],
                    "a": o.attempts,
                    "r": o.reason,
                    "x": o.resent,
                    "m": o.provider_message_id,
                }
                for o in rows
            ]
            stored = await _RECORD.fetch_value(
                connection,
                completed_at=completed_at,
                latest_attempt=latest_attempt,
                attempt=attempt,
                claimed=claimed,
                account_id=account_id,
                campaign=batch.campaign,
                run=batch.run,
                destination=batch.destination,
                results=orjson.dumps(results).decode(),
            )
            resent: dict[str, bool] = dict(orjson.loads(stored))
            if not resent:
                return 0
            report = events.DeliveryOutcomes(
                event_id=str(uuid.uuid4()),
                campaign=batch.campaign,
                run=batch.run,
                destination=batch.destination,
                destination_type=destination_type,
                account=account_name(account_id),
                occur_time=api.timestamp(completed_at),
            )
            add = report.results.add  # in place: results handed over as a list would each be copied
            for o in rows:
                delivery_id = o.recipient.delivery_id
                if delivery_id in resent:
                    add(
                        delivery_id=delivery_id,
                        user_id=o.recipient.user_id,
                        status=o.status,
                        reason=o.reason,
                        attempts=o.attempts,
                        resent=resent[delivery_id],
                    )
            await enqueue(
                connection, outbox, [OutboxEvent.of(self.subjects.delivery_outcomes, report, report.event_id)]
            )
            # Receipts that came before these deliveries were recorded apply now.
            message_ids = [o.provider_message_id for o in rows if o.provider_message_id]
            if message_ids:
                await apply_receipts(connection, self.subjects, account_id, message_ids)
        if self.metrics is not None:
            recorded = Counter(_STATUS_NAMES[o.status] for o in rows if o.recipient.delivery_id in resent)
            for status, count in recorded.items():
                self.metrics.deliveries.labels(destination_type, status).inc(count)
        return len(resent)

    async def _wait_to_settle(
        self,
        connection: asyncpg.Connection,
        batch: events.DeliveryBatch,
        account_id: uuid.UUID,
        outcomes: list[Outcome],
    ) -> None:
        """Unknown deliveries whose provider can be asked wait to be looked up, with what was sent."""
        header = events.DeliveryBatch(
            batch_id=batch.batch_id,
            campaign=batch.campaign,
            campaign_version=batch.campaign_version,
            run=batch.run,
            destination=batch.destination,
            plan_time=batch.plan_time,
            account=batch.account,
        )
        settlements = [o.settle for o in outcomes if o.settle is not None]
        await _UNSETTLED.execute(
            connection,
            account_id=account_id,
            destination_type=self.destination_type,
            batch=header.SerializeToString(),
            settle_seconds=self.settle_seconds,
            ids=[o.recipient.delivery_id for o in outcomes],
            recipients=[o.recipient.SerializeToString() for o in outcomes],
            providers=[s.provider_destination for s in settlements],
            phones=[s.phone for s in settlements],
            texts=[s.text for s in settlements],
            attempts=[o.attempts for o in outcomes],
        )
