"""Hands deliveries to dispatch: DeliveryBatch events, queued in the caller's transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, channels
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.outbox import OutboxEvent

# A DeliveryBatch carries at most this many recipients and bytes: well inside NATS's 1 MB.
BATCH_RECIPIENTS = 500
BATCH_BYTES = 512 * 1024


def _chunks(recipients: Sequence[events.Recipient]) -> Iterator[list[events.Recipient]]:
    chunk: list[events.Recipient] = []
    size = 0
    for recipient in recipients:
        bytes_ = recipient.ByteSize()
        if chunk and (len(chunk) >= BATCH_RECIPIENTS or size + bytes_ > BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(recipient)
        size += bytes_
    if chunk:
        yield chunk


def delivery_batches(
    subjects: Subjects,
    campaign: campaign_pb.Campaign,
    version: int,
    run_id: uuid.UUID,
    account_id: uuid.UUID,
    recipients: Sequence[events.Recipient],
    now: datetime,
) -> list[OutboxEvent]:
    """The recipients of one run as DeliveryBatch events for the campaign's destination; each
    batch's id follows from its first delivery, so the same hand-over always has the same id."""
    kind = channels.of_campaign(campaign)
    subject = subjects.delivery_batch(
        kind.destination_type, campaign.destination.removeprefix("destinations/")
    )
    plan_time = api.timestamp(now)
    batches = []
    for chunk in _chunks(recipients):
        batch_id = api.stable_id(run_id, f"batch:{chunk[0].delivery_id}")
        batch = events.DeliveryBatch(
            batch_id=batch_id,
            campaign=campaign.name,
            campaign_version=version,
            run=f"{campaign.name}/runs/{run_id}",
            destination=campaign.destination,
            plan_time=plan_time,
            recipients=chunk,
            account=account_name(account_id),
        )
        batches.append(OutboxEvent.of(subject, batch, batch_id))
    return batches
