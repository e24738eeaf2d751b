"""What became of a campaign's deliveries: the counts the scheduler and dispatch report,
GetCampaignStats, and the campaign's state as they settle."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald_campaign.goals import goal_results, record_exposures
from herald_campaign.records import State, campaign_id_of, owned, set_state, state_name
from herald_campaign.storage import campaigns, failure_reasons, outcome_events, runs, stats
from herald_common import api
from herald_common.auth import account_id_of
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.errors import NotFound, invalid

_RUN_ENDED = {"RUN_STATE_DISPATCHED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED"}
_CAMPAIGN_ENDED = {state_name(s) for s in (State.STATE_COMPLETED, State.STATE_STOPPED, State.STATE_FAILED)}
# How often a stats watch looks for changes (one indexed read of a few rows).
WATCH_POLL_SECONDS = 0.25


_STATUS_COLUMNS = {
    events.DeliveryStatus.DELIVERY_STATUS_SENT: "sent",
    events.DeliveryStatus.DELIVERY_STATUS_FAILED: "failed",
    events.DeliveryStatus.DELIVERY_STATUS_SKIPPED: "skipped",
    events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN: "unknown",
}


_RECEIPT_COLUMNS = {
    events.ReceiptStatus.RECEIPT_STATUS_DELIVERED: "delivered",
    events.ReceiptStatus.RECEIPT_STATUS_UNDELIVERED: "undelivered",
    events.ReceiptStatus.RECEIPT_STATUS_FAILED: "receipt_failed",
}


_POPUP_COLUMNS = {
    events.WebInteractionKind.WEB_INTERACTION_KIND_VIEWED: "viewed",
    events.WebInteractionKind.WEB_INTERACTION_KIND_CLICKED: "clicked",
    events.WebInteractionKind.WEB_INTERACTION_KIND_CLOSED: "closed",
    events.WebInteractionKind.WEB_INTERACTION_KIND_EXPIRED: "expired",
}


# Reasons kept per campaign, and users kept as examples of each.
MAX_REASON_LENGTH = 300


MAX_EXAMPLES = 5


async def _not_counted_before(session: AsyncSession, received: Iterable[_ResultEvent[Any]]) -> set[str]:
    """The ids of the events not counted before, now marked counted."""
    return set(
        await session.scalars(
            insert(outcome_events)
            .on_conflict_do_nothing(index_elements=[outcome_events.c.event_id])
            .returning(outcome_events.c.event_id),
            [
                {
                    "event_id": e.event_id,
                    "campaign_id": campaign_id_of(e.campaign),
                    "account_id": account_id_of(e.account),
                }
                for e in received
            ],
        )
    )


# The stats columns each kind of result event counts.
_OUTCOME_COUNTS = ("sent", "failed", "skipped", "unknown", "resent")


def _outcome_counts(result: events.DeliveryResult) -> tuple[list[str], str | None]:
    """The stats columns a delivery result adds one to, and its reason when it was not sent."""
    columns = [_STATUS_COLUMNS.get(result.status, "failed")] + ["resent"] * int(result.resent)
    if result.status == events.DeliveryStatus.DELIVERY_STATUS_SENT:
        return columns, None
    return columns, result.reason[:MAX_REASON_LENGTH] or "no reason given"


def _popup_counts(result: events.WebInteraction) -> tuple[list[str], str | None]:
    column = _POPUP_COLUMNS.get(result.kind)
    return ([column] if column else []), None


def _receipt_counts(result: events.ReceiptResult) -> tuple[list[str], str | None]:
    """The stats column a receipt adds one to (none for a status not counted), and its reason
    when the message was not delivered."""
    column = _RECEIPT_COLUMNS.get(result.status)
    if column is None:
        return [], None
    if result.status == events.ReceiptStatus.RECEIPT_STATUS_DELIVERED:
        return [column], None
    word = "undelivered" if column == "undelivered" else "failed after sending"
    reason = f"{word} ({result.error_code})" if result.error_code else word
    return [column], reason[:MAX_REASON_LENGTH]


_Result = TypeVar("_Result", covariant=True)


class _ResultEvent(Protocol[_Result]):
    """An event of delivery results (DeliveryOutcomes, DeliveryReceipts, WebInteractions) for one
    campaign."""

    @property
    def event_id(self) -> str: ...
    @property
    def campaign(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def results(self) -> Sequence[_Result]: ...


_R = TypeVar("_R", events.DeliveryResult, events.ReceiptResult, events.WebInteraction)


async def _count_results(
    session: AsyncSession,
    received: Sequence[_ResultEvent[_R]],
    columns: Sequence[str],
    counts_of: Callable[[_R], tuple[list[str], str | None]],
) -> set[str]:
    """Adds the results of the events not counted before to their campaigns' stats and failure
    reasons; returns those events' ids."""
    by_event = {e.event_id: e for e in received}
    new = await _not_counted_before(session, by_event.values())
    counts: dict[uuid.UUID, Counter[str]] = {}
    reasons: dict[tuple[uuid.UUID, str], list[str]] = {}
    owners: dict[uuid.UUID, uuid.UUID | None] = {}
    for event in (by_event[e] for e in sorted(new)):
        campaign_id = campaign_id_of(event.campaign)
        owners[campaign_id] = account_id_of(event.account)
        tally = counts.setdefault(campaign_id, Counter())
        for result in event.results:
            added, reason = counts_of(result)
            tally.update(added)
            if reason is not None:
                reasons.setdefault((campaign_id, reason), []).append(result.user_id)
    for campaign_id, tally in sorted(counts.items()):
        await session.execute(
            sa.update(stats)
            .where(stats.c.campaign_id == campaign_id)
            .values({c: stats.c[c] + tally[c] for c in columns})
        )
    await _count_reasons(session, reasons, owners)
    return new


async def _count_reasons(
    session: AsyncSession,
    reasons: dict[tuple[uuid.UUID, str], list[str]],
    owners: Mapping[uuid.UUID, uuid.UUID | None],
) -> None:
    if not reasons:
        return
    statement = insert(failure_reasons)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[failure_reasons.c.campaign_id, failure_reasons.c.reason],
            set_={
                "count": failure_reasons.c.count + statement.excluded.count,
                "example_user_ids": sa.literal_column(
                    f"(failure_reasons.example_user_ids || excluded.example_user_ids)[1:{MAX_EXAMPLES}]"
                ),
            },
        ),
        [
            {
                "campaign_id": campaign_id,
                "account_id": owners[campaign_id],
                "reason": reason,
                "count": len(users),
                "example_user_ids": users[:MAX_EXAMPLES],
            }
            for (campaign_id, reason), users in sorted(reasons.items())
        ],
    )


class Results:
    def __init__(self, database: Database, subjects: Subjects, notify: Callable[[], None]) -> None:
        self.database = database
        self.subjects = subjects
        self._notify = notify

    async def stats(self, name: str) -> pb.CampaignStats:
        if not name.endswith("/stats"):
            raise invalid("name", "must look like campaigns/<id>/stats")
        campaign_name = name.removesuffix("/stats")
        campaign_id = api.parse_uuid_name(campaign_name, "campaigns")
        async with self.database.transaction() as session:
            spec = await session.scalar(sa.select(campaigns.c.spec).where(owned(campaign_id)))
            if spec is None:
                raise NotFound(campaign_name)
            counts = (
                await session.execute(sa.select(stats).where(stats.c.campaign_id == campaign_id))
            ).first()
            targeted = await session.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(runs.c.targeted), 0)).where(
                    runs.c.campaign_id == campaign_id
                )
            )
            reasons = (
                await session.execute(
                    sa.select(failure_reasons)
                    .where(failure_reasons.c.campaign_id == campaign_id)
                    .order_by(failure_reasons.c.count.desc(), failure_reasons.c.reason)
                    .limit(50)
                )
            ).all()
        if counts is None:
            raise NotFound(campaign_name)
        return pb.CampaignStats(
            name=name,
            targeted=int(targeted or 0),
            sent=counts.sent,
            failed=counts.failed,
            skipped=counts.skipped,
            unknown=counts.unknown,
            resent=counts.resent,
            waiting_reason=counts.waiting_reason,
            receipts=pb.ReceiptCounts(
                delivered=counts.delivered, undelivered=counts.undelivered, failed=counts.receipt_failed
            ),
            popups=pb.PopupCounts(
                viewed=counts.viewed, clicked=counts.clicked, closed=counts.closed, expired=counts.expired
            ),
            goal=goal_results(counts) if pb.Campaign.FromString(spec).HasField("goal") else None,
            failure_reasons=[
                pb.FailureReason(
                    reason=r.reason, count=r._mapping["count"], example_user_ids=r.example_user_ids
                )
                for r in reasons
            ],
        )

    async def watch(
        self, name: str, poll_seconds: float = WATCH_POLL_SECONDS
    ) -> AsyncIterator[pb.CampaignStats]:
        """The stats now, then each time they change, until the campaign has ended and its goal's
        conversion window has passed since (no count can change after that)."""
        last = None
        while True:
            current = await self.stats(name)
            if current != last:
                last = current
                yield current
            if await self._settled(campaign_id_of(name.removesuffix("/stats"))):
                return
            await asyncio.sleep(poll_seconds)

    async def _settled(self, campaign_id: uuid.UUID) -> bool:
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(campaigns.c.state, campaigns.c.updated_at, campaigns.c.spec).where(
                        campaigns.c.id == campaign_id
                    )
                )
            ).one()
        if row.state not in _CAMPAIGN_ENDED:
            return False
        goal = pb.Campaign.FromString(row.spec).goal
        return bool(row.updated_at + goal.conversion_window.ToTimedelta() <= api.utcnow())

    async def foreign_reports(self, claims: Sequence[tuple[str, str]]) -> dict[int, str]:
        """Which (campaign, account) claims of a batch of reports name an account that does not own
        the campaign, with why: those reports are set aside, never counted."""
        ids = {campaign_id_of(campaign) for campaign, _ in claims}
        async with self.database.transaction() as session:
            found = await session.execute(
                sa.select(campaigns.c.id, campaigns.c.account_id).where(campaigns.c.id.in_(ids))
            )
            owners = {row.id: row.account_id for row in found}
        foreign = {}
        for i, (campaign, account) in enumerate(claims):
            owner = owners.get(campaign_id_of(campaign))
            if owner is not None and owner != account_id_of(account):
                foreign[i] = f"{account or 'no account'} does not own {campaign}"
        return foreign

    async def record_runs(self, changes: Sequence[events.RunChanged]) -> None:
        """Stores run reports, newest version wins; moves the campaigns they belong to forward."""
        touched: set[uuid.UUID] = set()
        async with self.database.transaction() as session:
            for change in sorted(changes, key=lambda c: (c.run.name, c.version)):
                run = change.run
                campaign_id = uuid.UUID(run.campaign.removeprefix("campaigns/"))
                statement = insert(runs).values(
                    run=run.name,
                    account_id=account_id_of(change.account),
                    campaign_id=campaign_id,
                    state=scheduler_pb.RunState.Name(run.state),
                    targeted=run.targeted,
                    final=run.final,
                    error=run.error,
                    scheduled_at=api.from_timestamp(run.scheduled_time)
                    if run.HasField("scheduled_time")
                    else None,
                    version=change.version,
                )
                await session.execute(
                    statement.on_conflict_do_update(
                        index_elements=[runs.c.run],
                        set_={
                            "state": statement.excluded.state,
                            "targeted": statement.excluded.targeted,
                            "final": statement.excluded.final,
                            "error": statement.excluded.error,
                            "scheduled_at": statement.excluded.scheduled_at,
                            "version": statement.excluded.version,
                        },
                        where=runs.c.version < statement.excluded.version,
                    )
                )
                touched.add(campaign_id)
            await self._advance(session, touched)
        self._notify()

    async def record_outcomes(self, received: Sequence[events.DeliveryOutcomes]) -> None:
        """Counts each DeliveryOutcomes event once; completes campaigns whose deliveries all have one."""
        if not received:
            return
        async with self.database.transaction() as session:
            counted = await _count_results(session, received, _OUTCOME_COUNTS, _outcome_counts)
            new = list({e.event_id: e for e in received if e.event_id in counted}.values())
            await record_exposures(session, new)
            await self._advance(session, {campaign_id_of(e.campaign) for e in new})
        self._notify()

    async def record_receipts(self, received: Sequence[events.DeliveryReceipts]) -> None:
        """Counts each DeliveryReceipts event once (each delivery is in one such event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, tuple(_RECEIPT_COLUMNS.values()), _receipt_counts)

    async def record_popup_interactions(self, received: Sequence[events.WebInteractions]) -> None:
        """Counts what visitors did with web pop-ups (each event once; each (delivery, kind) is in
        one event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, tuple(_POPUP_COLUMNS.values()), _popup_counts)

    async def record_waiting(self, received: Sequence[events.DestinationWaiting]) -> None:
        """Shows on each campaign whether a destination holds its deliveries back; newest report wins."""
        async with self.database.transaction() as session:
            for event in sorted(received, key=lambda e: e.occur_time.ToNanoseconds()):
                when = api.from_timestamp(event.occur_time)
                await session.execute(
                    sa.update(stats)
                    .where(
                        stats.c.campaign_id == campaign_id_of(event.campaign),
                        sa.or_(stats.c.waiting_changed_at.is_(None), stats.c.waiting_changed_at < when),
                    )
                    .values(
                        waiting_reason=f"{event.destination}: {event.reason}"[:MAX_REASON_LENGTH]
                        if event.reason
                        else "",
                        waiting_changed_at=when,
                    )
                )

    async def _advance(self, session: AsyncSession, campaign_ids: set[uuid.UUID]) -> None:
        """Moves campaigns forward: SCHEDULED → RUNNING when a run starts; → COMPLETED when every run
        ended and every delivery has an outcome; → FAILED when a run could not finish."""
        for campaign_id in sorted(campaign_ids):
            row = (
                await session.execute(
                    sa.select(campaigns).where(campaigns.c.id == campaign_id).with_for_update()
                )
            ).first()
            if row is None or row.state not in (
                state_name(State.STATE_SCHEDULED),
                state_name(State.STATE_RUNNING),
            ):
                continue
            reported = (await session.execute(sa.select(runs).where(runs.c.campaign_id == campaign_id))).all()
            if not reported:
                continue
            failed = [r for r in reported if r.state == "RUN_STATE_FAILED"]
            if failed:
                await set_state(
                    session, self.subjects, campaign_id, State.STATE_FAILED, failure_reason=failed[0].error
                )
                continue
            ended = [r for r in reported if r.state in _RUN_ENDED]
            final_done = any(r.final for r in ended) and len(ended) == len(reported)
            counts = (await session.execute(sa.select(stats).where(stats.c.campaign_id == campaign_id))).one()
            outcomes = counts.sent + counts.failed + counts.skipped + counts.unknown
            if final_done and outcomes >= sum(r.targeted for r in ended):
                await set_state(session, self.subjects, campaign_id, State.STATE_COMPLETED)
            elif row.state == state_name(State.STATE_SCHEDULED):
                await set_state(session, self.subjects, campaign_id, State.STATE_RUNNING)
