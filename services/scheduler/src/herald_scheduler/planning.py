"""Turns campaign changes into runs: when each campaign must deliver."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald_common import api
from herald_common.auth import NO_ACCOUNT, account_id_of
from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.schedules import MAX_SEND_TIMES, times_after
from herald_scheduler.runs import RunEvents
from herald_scheduler.storage import campaigns, runs

CampaignState = campaign_pb.State
RunState = pb.RunState
log = get_logger(__name__)
_OPEN_RUN_STATES = [RunState.Name(RunState.RUN_STATE_PENDING), RunState.Name(RunState.RUN_STATE_RUNNING)]


def first_runs(campaign: campaign_pb.Campaign) -> list[tuple[datetime, bool]]:
    """The runs to plan when a campaign is published, each with whether it is the last. A
    recurring schedule plans its first occurrence only; each run plans the next when it starts."""
    recurring = campaign.schedule.WhichOneof("when") == "recurring"
    published = api.from_timestamp(campaign.publish_time)
    times = times_after(campaign, published, 2 if recurring else MAX_SEND_TIMES)
    if recurring:
        return [(times[0], len(times) == 1)] if times else []
    return [(t, i == len(times) - 1) for i, t in enumerate(times)]


async def plan_following(session: AsyncSession, run: Any, campaign: campaign_pb.Campaign) -> None:
    """Plans the occurrence after a starting run of a recurring campaign (once, however often the
    run is started)."""
    if run.final or campaign.schedule.WhichOneof("when") != "recurring":
        return
    times = times_after(campaign, run.scheduled_time, 2)
    if times:
        await _insert_runs(session, campaign.name, run.account_id, [(times[0], len(times) == 1)])


async def _insert_runs(
    session: AsyncSession, campaign: str, account_id: uuid.UUID, planned: list[tuple[datetime, bool]]
) -> None:
    await session.execute(
        insert(runs)
        .values(
            [
                {
                    "id": uuid.uuid4(),
                    "account_id": account_id,
                    "campaign": campaign,
                    "scheduled_time": when,
                    "state": RunState.Name(RunState.RUN_STATE_PENDING),
                    "final": final,
                }
                for when, final in planned
            ]
        )
        .on_conflict_do_nothing(constraint="runs_campaign_time_key")
    )


def _account_of(change: events.CampaignChanged) -> uuid.UUID:
    """The campaign's account; one that names none stays with the nil account, which owns no
    segment or destination, so its runs fail rather than reach anyone."""
    account_id = account_id_of(change.account)
    if account_id is None:
        log.warning("campaign_without_account", campaign=change.campaign.name)
        return NO_ACCOUNT
    return account_id


class Planner:
    def __init__(self, database: Database, run_events: RunEvents) -> None:
        self.database = database
        self.run_events = run_events

    async def apply(self, changes: Sequence[events.CampaignChanged]) -> None:
        """Applies campaign changes in version order; a version older than the one held is ignored."""
        ordered = sorted(changes, key=lambda c: (c.campaign.name, c.version))
        async with self.database.transaction() as session:
            for change in ordered:
                if await self._store_snapshot(session, change):
                    await self._react(session, change.campaign, _account_of(change))

    async def _store_snapshot(self, session: AsyncSession, change: events.CampaignChanged) -> bool:
        statement = insert(campaigns).values(
            name=change.campaign.name,
            account_id=_account_of(change),
            state=CampaignState.Name(change.campaign.state),
            snapshot=change.campaign.SerializeToString(),
            version=change.version,
        )
        stored = await session.execute(
            statement.on_conflict_do_update(
                index_elements=[campaigns.c.name],
                set_={
                    "account_id": statement.excluded.account_id,
                    "state": statement.excluded.state,
                    "snapshot": statement.excluded.snapshot,
                    "version": statement.excluded.version,
                },
                where=campaigns.c.version < statement.excluded.version,
            ).returning(campaigns.c.name)
        )
        return stored.first() is not None

    async def _react(
        self, session: AsyncSession, campaign: campaign_pb.Campaign, account_id: uuid.UUID
    ) -> None:
        if campaign.state == CampaignState.STATE_SCHEDULED:
            planned = first_runs(campaign)
            if planned:
                await _insert_runs(session, campaign.name, account_id, planned)
        elif campaign.state == CampaignState.STATE_STOPPED:
            cancelled = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.campaign == campaign.name, runs.c.state.in_(_OPEN_RUN_STATES))
                    .values(
                        state=RunState.Name(RunState.RUN_STATE_CANCELLED),
                        ended_at=api.utcnow(),
                        lease_owner=None,
                        version=runs.c.version + 1,
                    )
                    .returning(*runs.c)
                )
            ).all()
            await self.run_events.changed(session, cancelled)
