"""Turns campaign changes into runs: when each campaign must deliver."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald_common import api, tracing
from herald_common.auth import NO_ACCOUNT, account_id_of
from herald_common.db import Database, Statement, Target
from herald_common.logging import get_logger
from herald_common.schedules import MAX_SEND_TIMES, Occurrence, account_zone, occurrences_after
from herald_scheduler.runs import RunEvents
from herald_scheduler.storage import (
    accounts,
    campaigns,
    live_awaited,
    live_timers,
    pending_deliveries,
    runs,
)

CampaignState = campaign_pb.State
RunState = pb.RunState
log = get_logger(__name__)
_STOPPABLE_RUN_STATES = [
    RunState.Name(s)
    for s in (RunState.RUN_STATE_PENDING, RunState.RUN_STATE_RELEASING, RunState.RUN_STATE_LIVE)
]


def first_runs(campaign: campaign_pb.Campaign, zone: ZoneInfo) -> list[tuple[Occurrence, bool]]:
    """The runs to plan when a campaign is published, each with whether it is the last. A
    recurring schedule plans its first occurrence only; each run plans the next when it starts."""
    recurring = campaign.schedule.WhichOneof("when") == "recurring"
    published = api.from_timestamp(campaign.publish_time)
    if campaign.schedule.WhichOneof("when") == "send_now":
        published -= timedelta(microseconds=1)  # its one occurrence is the publish time itself
    found = occurrences_after(campaign, zone, published, 2 if recurring else MAX_SEND_TIMES, under_way=True)
    if recurring:
        return [(found[0], len(found) == 1)] if found else []
    return [(o, i == len(found) - 1) for i, o in enumerate(found)]


async def plan_following(
    session: AsyncSession, run: Any, campaign: campaign_pb.Campaign, zone: ZoneInfo
) -> None:
    """Plans the occurrence after a starting run of a recurring campaign (once, however often the
    run is started)."""
    if run.final or campaign.schedule.WhichOneof("when") != "recurring":
        return
    found = occurrences_after(campaign, zone, run.scheduled_time, 2)
    if found:
        await _insert_runs(session, campaign.name, run.account_id, [(found[0], len(found) == 1)])


_SETTINGS = Statement(
    "SELECT account_id, settings FROM scheduler.accounts WHERE account_id = ANY(CAST(:accounts AS uuid[]))"
)


async def accounts_settings(
    target: Target, account_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, accounts_pb.AccountSettings]:
    """The accounts' newest settings known here, in one query; an account none are known of
    has the defaults."""
    wanted = set(account_ids)
    rows = await _SETTINGS.fetch(target, accounts=sorted(wanted))
    found = {r.account_id: accounts_pb.AccountSettings.FromString(r.settings) for r in rows}
    return {account_id: found.get(account_id, accounts_pb.AccountSettings()) for account_id in wanted}


async def account_settings(target: Target, account_id: uuid.UUID) -> accounts_pb.AccountSettings:
    """The account's newest settings known here (defaults when none are)."""
    return (await accounts_settings(target, [account_id]))[account_id]


async def store_account_settings(
    session: AsyncSession, account_id: uuid.UUID, settings: accounts_pb.AccountSettings, version: int
) -> None:
    """Keeps the settings if they are newer than those held."""
    statement = insert(accounts).values(
        account_id=account_id, settings=settings.SerializeToString(), version=version
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[accounts.c.account_id],
            set_={"settings": statement.excluded.settings, "version": statement.excluded.version},
            where=accounts.c.version < statement.excluded.version,
        )
    )


async def _insert_runs(
    session: AsyncSession, campaign: str, account_id: uuid.UUID, planned: list[tuple[Occurrence, bool]]
) -> None:
    await session.execute(
        insert(runs)
        .values(
            [
                {
                    "id": uuid.uuid4(),
                    "account_id": account_id,
                    "campaign": campaign,
                    "scheduled_time": when.start,
                    "planned_time": when.planned,
                    "state": RunState.Name(RunState.RUN_STATE_PENDING),
                    "final": final,
                    "trace_context": tracing.current_traceparent(),
                }
                for when, final in planned
            ]
        )
        .on_conflict_do_nothing(constraint="runs_campaign_time_key")
    )


async def drop_waits(session: AsyncSession, names: Sequence[str]) -> None:
    """A live campaign that ended or stopped waits for nothing more."""
    await session.execute(sa.delete(live_timers).where(live_timers.c.campaign.in_(names)))
    await session.execute(sa.delete(live_awaited).where(live_awaited.c.campaign.in_(names)))


async def _insert_live_run(
    session: AsyncSession, campaign: campaign_pb.Campaign, account_id: uuid.UUID
) -> Sequence[Any]:
    """A live campaign has one run, LIVE from its start until its end, its total limit or a stop."""
    live = campaign.schedule.live
    start = api.from_timestamp(live.start_time if live.HasField("start_time") else campaign.publish_time)
    statement = (
        insert(runs)
        .values(
            id=uuid.uuid4(),
            account_id=account_id,
            campaign=campaign.name,
            scheduled_time=start,
            planned_time=start,
            started_at=start,
            state=RunState.Name(RunState.RUN_STATE_LIVE),
            final=True,
            ends_at=api.from_timestamp(live.end_time) if live.HasField("end_time") else None,
            trace_context=tracing.current_traceparent(),
        )
        .on_conflict_do_nothing(constraint="runs_campaign_time_key")
        .returning(*runs.c)
    )
    return (await session.execute(statement)).all()


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
                account_id = _account_of(change)
                await store_account_settings(
                    session, account_id, change.account_settings, change.account_settings_version
                )
                if await self._store_snapshot(session, change):
                    await self._react(session, change.campaign, account_id)

    async def apply_accounts(self, changes: Sequence[events.AccountChanged]) -> None:
        async with self.database.transaction() as session:
            for change in sorted(changes, key=lambda c: c.version):
                account_id = account_id_of(change.account)
                if account_id is not None:
                    await store_account_settings(session, account_id, change.settings, change.version)

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
        if campaign.state == CampaignState.STATE_SCHEDULED and campaign.schedule.WhichOneof("when") == "live":
            await self.run_events.changed(session, await _insert_live_run(session, campaign, account_id))
        elif campaign.state == CampaignState.STATE_SCHEDULED:
            zone = account_zone(await account_settings(session, account_id))
            planned = first_runs(campaign, zone)
            if planned:
                await _insert_runs(session, campaign.name, account_id, planned)
        elif campaign.state == CampaignState.STATE_STOPPED:
            # A run planning its audience plans on, recording every member left as skipped
            # ("campaign stopped"), so the stats account for the whole audience; the others end.
            cancelled = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.campaign == campaign.name, runs.c.state.in_(_STOPPABLE_RUN_STATES))
                    .values(
                        state=RunState.Name(RunState.RUN_STATE_CANCELLED),
                        ended_at=api.utcnow(),
                        lease_owner=None,
                        version=runs.c.version + 1,
                    )
                    .returning(*runs.c)
                )
            ).all()
            # What still waits goes now, of every run: dispatch records each as skipped.
            await session.execute(
                sa.update(pending_deliveries)
                .where(pending_deliveries.c.campaign == campaign.name)
                .values(due_at=sa.func.least(pending_deliveries.c.due_at, api.utcnow()), cutoff_at=None)
            )
            await drop_waits(session, [campaign.name])
            await self.run_events.changed(session, cancelled)
