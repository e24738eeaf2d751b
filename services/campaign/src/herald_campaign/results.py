"""What became of a campaign's deliveries: the counts the scheduler and dispatch report,
GetCampaignStats, and the campaign's state as they settle."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald_campaign.counts import add_campaign_counts, add_reasons, add_run_counts, tally
from herald_campaign.goals import goal_results, record_exposures, take_goal_turns
from herald_campaign.records import State, campaign_id_of, owned, set_state, state_name
from herald_campaign.references import References
from herald_campaign.storage import (
    SCHEMA,
    campaigns,
    conversions,
    failure_reasons,
    run_failure_reasons,
    run_stats,
    runs,
    stats,
)
from herald_common import api
from herald_common.auth import account_id_of
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target, text_in
from herald_common.errors import NotFound, invalid
from herald_common.skips import SkipReason

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


# Every counter of campaign_stats (a run has those of run_stats; the others are 0).
_COUNTED = [c.name for c in stats.c if isinstance(c.type, sa.BigInteger | sa.Float)]
# The longest reason kept.
MAX_REASON_LENGTH = 300


_MARK_COUNTED = Statement(
    f"""
    INSERT INTO {SCHEMA}.outcome_events (event_id, campaign_id, account_id)
    SELECT * FROM unnest(CAST(:events AS text[]), CAST(:campaigns AS uuid[]), CAST(:accounts AS uuid[]))
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
    """
)


async def _not_counted_before(target: Target, received: Sequence[_ResultEvent[Any]]) -> set[str]:
    """The ids of the events not counted before, now marked counted."""
    rows = await _MARK_COUNTED.fetch(
        target,
        events=[e.event_id for e in received],
        campaigns=[campaign_id_of(e.campaign) for e in received],
        accounts=[account_id_of(e.account) for e in received],
    )
    return {row[0] for row in rows}


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
    target: Target,
    received: Sequence[_ResultEvent[_R]],
    counts_of: Callable[[_R], tuple[list[str], str | None]],
    run_of: Callable[[Any, Any], str] | None = None,
) -> set[str]:
    """Adds the results of the events not counted before to their campaigns' stats and failure
    reasons (and, with `run_of`, to their runs'); returns those events' ids."""
    by_event = {e.event_id: e for e in received}
    new = await _not_counted_before(target, list(by_event.values()))
    by_campaign: dict[uuid.UUID, defaultdict[str, float]] = defaultdict(tally)
    by_run: dict[tuple[str, uuid.UUID, uuid.UUID], defaultdict[str, float]] = defaultdict(tally)
    reasons: dict[tuple[uuid.UUID, str], list[str]] = defaultdict(list)
    run_reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    owners: dict[uuid.UUID, uuid.UUID | None] = {}
    run_owners: dict[str, uuid.UUID | None] = {}
    for event in (by_event[e] for e in sorted(new)):
        campaign_id = campaign_id_of(event.campaign)
        owner = owners[campaign_id] = account_id_of(event.account)
        for result in event.results:
            run = run_of(event, result) if run_of is not None and owner is not None else ""
            if run:
                run_owners[run] = owner
            added, reason = counts_of(result)
            for column in added:
                by_campaign[campaign_id][column] += 1
                if run and owner is not None:
                    by_run[(run, campaign_id, owner)][column] += 1
            if reason is not None:
                reasons[(campaign_id, reason)].append(result.user_id)
                if run:
                    run_reasons[(run, reason)].append(result.user_id)
    await add_campaign_counts(target, by_campaign)
    await add_run_counts(target, by_run)
    await add_reasons(target, reasons, owners, run_reasons, run_owners)
    return new


_LOCK_CAMPAIGN = Statement(f"SELECT * FROM {SCHEMA}.campaigns WHERE id = :id FOR UPDATE")
_RUNS_OF = Statement(f"SELECT * FROM {SCHEMA}.runs WHERE campaign_id = :campaign_id")
_STATS_OF = Statement(f"SELECT * FROM {SCHEMA}.campaign_stats WHERE campaign_id = :campaign_id")
_OWNERS = Statement(f"SELECT id, account_id FROM {SCHEMA}.campaigns WHERE id = ANY(CAST(:ids AS uuid[]))")


def _stats_of(name: str) -> tuple[uuid.UUID, str | None]:
    """(campaign id, run name or None) of `campaigns/{campaign}/stats` or
    `campaigns/{campaign}/runs/{run}/stats`."""
    if not name.endswith("/stats"):
        raise invalid("name", "must look like campaigns/<id>/stats or campaigns/<id>/runs/<run>/stats")
    owner = name.removesuffix("/stats")
    if "/runs/" in owner:
        return api.parse_run_name(owner)[0], owner
    return api.parse_uuid_name(owner, "campaigns"), None


class Results:
    def __init__(
        self, database: Database, subjects: Subjects, references: References, notify: Callable[[], None]
    ) -> None:
        self.references = references
        self.database = database
        self.subjects = subjects
        self._notify = notify

    async def stats(self, name: str) -> pb.CampaignStats:
        """A campaign's stats (`campaigns/{campaign}/stats`), or one run's
        (`campaigns/{campaign}/runs/{run}/stats`)."""
        campaign_id, run = _stats_of(name)
        campaign_name = f"campaigns/{campaign_id}"
        async with self.database.transaction() as session:
            spec = await session.scalar(sa.select(campaigns.c.spec).where(owned(campaign_id)))
            if spec is None:
                raise NotFound(campaign_name)
            if run is None:
                counts = (
                    await session.execute(sa.select(stats).where(stats.c.campaign_id == campaign_id))
                ).first()
                targeted = await session.scalar(
                    sa.select(sa.func.coalesce(sa.func.sum(runs.c.targeted), 0)).where(
                        runs.c.campaign_id == campaign_id
                    )
                )
                reasons_of, owned_by = failure_reasons, failure_reasons.c.campaign_id == campaign_id
            else:
                targeted = await session.scalar(
                    sa.select(runs.c.targeted).where(runs.c.run == run, runs.c.campaign_id == campaign_id)
                )
                if targeted is None:
                    raise NotFound(run)
                counts = (await session.execute(sa.select(run_stats).where(run_stats.c.run == run))).first()
                reasons_of, owned_by = run_failure_reasons, run_failure_reasons.c.run == run
            reasons = (
                await session.execute(
                    sa.select(reasons_of)
                    .where(owned_by)
                    .order_by(reasons_of.c.count.desc(), reasons_of.c.reason)
                    .limit(50)
                )
            ).all()
        if counts is None and run is None:
            raise NotFound(campaign_name)
        count: dict[str, Any] = dict(counts._mapping) if counts is not None else {}
        for column in _COUNTED:
            count.setdefault(column, 0)
        return pb.CampaignStats(
            name=name,
            targeted=int(targeted or 0),
            sent=count["sent"],
            failed=count["failed"],
            skipped=count["skipped"],
            unknown=count["unknown"],
            resent=count["resent"],
            waiting_reason=count.get("waiting_reason", ""),
            receipts=pb.ReceiptCounts(
                delivered=count["delivered"], undelivered=count["undelivered"], failed=count["receipt_failed"]
            ),
            popups=pb.PopupCounts(
                viewed=count["viewed"],
                clicked=count["clicked"],
                closed=count["closed"],
                expired=count["expired"],
            ),
            goal=goal_results(count) if pb.Campaign.FromString(spec).HasField("goal") else None,
            failure_reasons=[
                pb.FailureReason(
                    reason=r.reason, count=r._mapping["count"], example_user_ids=r.example_user_ids
                )
                for r in reasons
            ],
        )

    async def export(self, run: str) -> AsyncIterator[pb.RunResult]:
        """Every recipient's result in the run: dispatch's delivery results, a page at a time,
        with the conversions recorded against the goal."""
        campaign_id, _ = api.parse_run_name(run, "run")
        campaign_name = f"campaigns/{campaign_id}"
        async with self.database.transaction() as session:
            known = await session.scalar(
                sa.select(runs.c.run)
                .join(campaigns, campaigns.c.id == runs.c.campaign_id)
                .where(runs.c.run == run, owned(campaign_id))
            )
        if known is None:
            raise NotFound(run)
        async for page in self.references.run_deliveries(campaign_name, run):
            async with self.database.transaction() as session:
                converted = {
                    row.delivery_id: row
                    for row in await session.execute(
                        sa.select(
                            conversions.c.delivery_id, conversions.c.converted_at, conversions.c.revenue
                        ).where(
                            text_in(conversions.c.delivery_id, [d.delivery_id for d in page]),
                            conversions.c.campaign_id == campaign_id,
                        )
                    )
                }
            for delivery in page:
                result = pb.RunResult(
                    user_id=delivery.user_id,
                    delivery_id=delivery.delivery_id,
                    group=pb.RESULT_GROUP_CONTROL
                    if delivery.status == "skipped" and delivery.reason == SkipReason.CONTROL_GROUP
                    else pb.RESULT_GROUP_TARGET,
                    status=delivery.status,
                    reason=delivery.reason,
                    result_time=delivery.complete_time,
                )
                conversion = converted.get(delivery.delivery_id)
                if conversion is not None:
                    result.convert_time.CopyFrom(api.timestamp(conversion.converted_at))
                    result.revenue = conversion.revenue
                yield result

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
            if await self._settled(_stats_of(name)[0]):
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
        ids = sorted({campaign_id_of(campaign) for campaign, _ in claims})
        async with self.database.connection() as connection:  # every batch of reports: no session
            found = await _OWNERS.fetch(connection, ids=ids)
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
        # On a direct connection: every batch of outcomes comes here, and a session would cost more
        # than its statements.
        async with self.database.direct_transaction() as connection:
            await take_goal_turns(connection, {account_id_of(e.account) for e in received})  # exposures
            counted = await _count_results(connection, received, _outcome_counts, run_of=lambda e, _: e.run)
            new = list({e.event_id: e for e in received if e.event_id in counted}.values())
            await record_exposures(connection, new)
            await self._advance(connection, {campaign_id_of(e.campaign) for e in new})
        self._notify()

    async def record_receipts(self, received: Sequence[events.DeliveryReceipts]) -> None:
        """Counts each DeliveryReceipts event once (each delivery is in one such event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, _receipt_counts, run_of=lambda _, r: r.run)

    async def record_popup_interactions(self, received: Sequence[events.WebInteractions]) -> None:
        """Counts what visitors did with web pop-ups (each event once; each (delivery, kind) is in
        one event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, _popup_counts, run_of=lambda _, r: r.run)

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

    async def _advance(self, target: Target, campaign_ids: set[uuid.UUID]) -> None:
        """Moves campaigns forward: SCHEDULED → RUNNING when a run starts; → COMPLETED when every run
        ended and every delivery has an outcome; → FAILED when a run could not finish."""
        for campaign_id in sorted(campaign_ids):
            row = await _LOCK_CAMPAIGN.fetch_row(target, id=campaign_id)
            if row is None or row.state not in (
                state_name(State.STATE_SCHEDULED),
                state_name(State.STATE_RUNNING),
            ):
                continue
            reported = await _RUNS_OF.fetch(target, campaign_id=campaign_id)
            if not reported:
                continue
            failed = [r for r in reported if r.state == "RUN_STATE_FAILED"]
            if failed:
                await set_state(
                    target, self.subjects, campaign_id, State.STATE_FAILED, failure_reason=failed[0].error
                )
                continue
            ended = [r for r in reported if r.state in _RUN_ENDED]
            final_done = any(r.final for r in ended) and len(ended) == len(reported)
            counts = await _STATS_OF.fetch_row(target, campaign_id=campaign_id)
            outcomes = counts.sent + counts.failed + counts.skipped + counts.unknown
            if final_done and outcomes >= sum(r.targeted for r in ended):
                await set_state(target, self.subjects, campaign_id, State.STATE_COMPLETED)
            elif row.state == state_name(State.STATE_SCHEDULED):
                await set_state(target, self.subjects, campaign_id, State.STATE_RUNNING)
