"""What every campaign use case reads and writes of a campaign: its stored row as the API's
message, who owns it, and its state changes, each announced as CampaignChanged."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_campaign.accounts import settings_of
from herald_campaign.storage import campaigns, outbox
from herald_common import api
from herald_common.auth import current_account_id
from herald_common.bus import Subjects
from herald_common.db import Built, Target
from herald_common.outbox import OutboxEvent, enqueue

State = pb.State


def state_name(state: State.ValueType) -> str:
    return State.Name(state)


def campaign_message(row: Any) -> pb.Campaign:
    campaign = pb.Campaign.FromString(row.spec)
    campaign.name = f"campaigns/{row.id}"
    campaign.state = State.Value(row.state)
    campaign.create_time.CopyFrom(api.timestamp(row.created_at))
    campaign.update_time.CopyFrom(api.timestamp(row.updated_at))
    if row.published_at is not None:
        campaign.publish_time.CopyFrom(api.timestamp(row.published_at))
    campaign.failure_reason = row.failure_reason
    return campaign


def campaign_id_of(name: str) -> uuid.UUID:
    return uuid.UUID(name.removeprefix("campaigns/"))


def owned(campaign_id: uuid.UUID) -> sa.ColumnElement[bool]:
    """The campaign, if the caller's account owns it: another account's answers NOT_FOUND."""
    return sa.and_(campaigns.c.id == campaign_id, campaigns.c.account_id == current_account_id())


async def announce_change(target: Target, subjects: Subjects, row: Any) -> None:
    """CampaignChanged for the campaign as `row` now holds it, in the changing transaction."""
    event = events.CampaignChanged(
        event_id=str(uuid.uuid4()),
        occur_time=api.timestamp(api.utcnow()),
        campaign=campaign_message(row),
        version=row.version,
        account=f"accounts/{row.account_id}" if row.account_id else "",
    )
    settings, version = await settings_of(target, row.account_id)
    event.account_settings.CopyFrom(settings)
    event.account_settings_version = version
    await enqueue(target, outbox, [OutboxEvent.of(subjects.campaign_changed, event, event.event_id)])


async def set_state(
    target: Target, subjects: Subjects, campaign_id: uuid.UUID, state: State.ValueType, **values: Any
) -> Any:
    """Moves the campaign to `state` (with `values`), announced; answers its new row."""
    statement = (
        sa.update(campaigns)
        .where(campaigns.c.id == campaign_id)
        .values(state=state_name(state), updated_at=api.utcnow(), version=campaigns.c.version + 1, **values)
        .returning(*campaigns.c)
    )
    (row,) = await Built(statement).fetch(target)
    await announce_change(target, subjects, row)
    return row
