"""Recording receipts: the first final receipt of a message wins; one that arrives before its
delivery is recorded waits in `receipts` and is applied when it is (by the recording itself, or
by a sweep every few seconds when the two crossed). Applied receipts are reported to the campaign
service in DeliveryReceipts events, in the same transaction."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

import asyncpg

from herald.events.v1 import events_pb2 as events
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.db import Statement
from herald_common.outbox import OutboxEvent, enqueue
from herald_dispatch.storage import outbox

ReceiptStatus = events.ReceiptStatus
_BY_NAME = {
    "delivered": ReceiptStatus.RECEIPT_STATUS_DELIVERED,
    "undelivered": ReceiptStatus.RECEIPT_STATUS_UNDELIVERED,
    "failed": ReceiptStatus.RECEIPT_STATUS_FAILED,
}
_APPLY = """
    WITH applied AS (
        UPDATE dispatch.deliveries d SET receipt_status = r.status
        FROM dispatch.receipts r
        WHERE r.account_id = d.account_id AND r.provider_message_id = d.provider_message_id
          AND d.receipt_status IS NULL AND {which}
        RETURNING d.delivery_id, d.user_id, d.campaign, d.run, d.account_id, r.status, r.error_code,
                  r.destination AS receipt_destination, r.provider_message_id AS receipt_message
    ), handled AS (
        DELETE FROM dispatch.receipts r USING applied a
        WHERE r.destination = a.receipt_destination AND r.provider_message_id = a.receipt_message
    )
    SELECT * FROM applied
"""
# Receipts of these messages (the ledger, as it records sent deliveries).
_APPLY_MESSAGES = Statement(
    _APPLY.format(which="d.account_id = :account_id AND d.provider_message_id = ANY(CAST(:ids AS text[]))")
)
# Any waiting receipt (the sweeper, for receipts that raced their delivery's recording).
_APPLY_WAITING = Statement(
    _APPLY.format(
        which="(r.destination, r.provider_message_id) IN "
        "(SELECT destination, provider_message_id FROM dispatch.receipts LIMIT 1000)"
    )
)
# Repeats of receipts already applied, and receipts of messages never recorded here.
FORGET_APPLIED = Statement(
    """
    DELETE FROM dispatch.receipts r
    WHERE EXISTS (SELECT 1 FROM dispatch.deliveries d
                  WHERE d.account_id = r.account_id AND d.provider_message_id = r.provider_message_id
                    AND d.receipt_status IS NOT NULL)
       OR r.received_at < now() - interval '7 days'
    """
)
SWEEP_SECONDS = 2.0


async def apply_receipts(
    connection: asyncpg.Connection,
    subjects: Subjects,
    account_id: uuid.UUID | None = None,
    message_ids: Sequence[str] = (),
) -> int:
    """Gives recorded deliveries the receipts waiting for their messages (these messages of the
    account, or any), once each, and reports them in DeliveryReceipts events (one per campaign)
    in the same transaction."""
    if account_id is None:
        applied = await _APPLY_WAITING.fetch(connection)
    else:
        applied = await _APPLY_MESSAGES.fetch(connection, account_id=account_id, ids=list(message_ids))
    by_campaign: dict[tuple[str, uuid.UUID], list[events.ReceiptResult]] = defaultdict(list)
    for row in applied:
        by_campaign[(row.campaign, row.account_id)].append(
            events.ReceiptResult(
                delivery_id=row.delivery_id,
                user_id=row.user_id,
                status=_BY_NAME[row.status],
                error_code=row.error_code,
                run=row.run,
            )
        )
    queued = []
    for (campaign, owner), results in by_campaign.items():
        event = events.DeliveryReceipts(
            event_id=str(uuid.uuid4()), account=account_name(owner), campaign=campaign, results=results
        )
        queued.append(OutboxEvent.of(subjects.delivery_receipts, event, event.event_id))
    await enqueue(connection, outbox, queued)
    return len(applied)
