"""Executes due runs: reads the audience page by page and hands deliveries to dispatch in batches.

A page's DeliveryBatch events commit together with the run's cursor (the last user planned), so a
run resumed after a crash, by this replica or another, plans nobody twice and `targeted` counts
every delivery exactly once. Delivery ids are derived from (run, user): stable on every retry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import api, channels, tracing
from herald_common.auth import account_name, act_as, service_caller
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop, cancel_and_wait
from herald_common.metrics import Metrics
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.schedules import account_zone
from herald_common.skips import SkipReason
from herald_common.timing import in_control_group
from herald_scheduler.due import Due, RunTiming
from herald_scheduler.handover import delivery_batches
from herald_scheduler.limits import RunLimits
from herald_scheduler.planning import account_settings, plan_following
from herald_scheduler.runs import RunEvents, run_name
from herald_scheduler.storage import campaigns, outbox, runs

log = get_logger(__name__)

RunState = pb.RunState
AUDIENCE_PAGE_SIZE = 2000
# Profile attributes larger than this are not carried; dispatch fails that delivery with the size.
MAX_RECIPIENT_ATTRIBUTE_BYTES = 64 * 1024
# Transient failures are retried with doubling delays up to this cap, for this many attempts
# (about an hour and a half in all), before the run fails.
MAX_ATTEMPTS = 24
MAX_RETRY_DELAY_SECONDS = 300.0
AUDIENCE_DEADLINE_SECONDS = 900.0
# The executor sleeps until the next pending run's time or until told of a new run; it looks by
# itself this often too, for runs another replica made and leases a crashed replica left.
CLAIM_POLL_SECONDS = 2.0
_PENDING = RunState.Name(RunState.RUN_STATE_PENDING)
_RUNNING = RunState.Name(RunState.RUN_STATE_RUNNING)
_STOPPED = campaign_pb.State.Name(campaign_pb.State.STATE_STOPPED)
# Answers from segmentation that retrying cannot change.
_PERMANENT_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


def delivery_id(run_id: uuid.UUID, user_id: str) -> str:
    return api.stable_id(run_id, user_id)


@dataclass(frozen=True)
class Snapshot:
    """The campaign as the run executes it, and its CampaignChanged version."""

    campaign: campaign_pb.Campaign
    version: int
    account: accounts_pb.AccountSettings


class RunStopped(Exception):
    """The run was cancelled, or another replica took it over after this one's lease ran out."""


class RunDefinitionError(Exception):
    """The campaign itself cannot be executed: retrying cannot help."""


class SafetyLimitExceeded(RunDefinitionError):
    """More users qualify than the campaign's safety limit allows: the run does not start."""


def _retry_delay(attempts: int) -> float:
    return min(2.0 ** min(attempts, 16), MAX_RETRY_DELAY_SECONDS)


def _failure(error: Exception) -> tuple[bool, str]:
    """(permanent?, reason) for an error that interrupted planning."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in _PERMANENT_CODES, f"audience: {error.code().name} {error.details()}"
    if isinstance(error, RunDefinitionError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}"[:500]


def recipient_of(
    delivery: str,
    member: segmentation_pb.AudienceMember,
    make: Callable[..., events.Recipient] = events.Recipient,
) -> events.Recipient:
    """A member as a delivery's recipient, made by `make` (in place in a message, say): attributes
    too large to carry are only measured."""
    attributes = member.attributes_json
    if len(attributes) > MAX_RECIPIENT_ATTRIBUTE_BYTES:
        return make(
            delivery_id=delivery,
            user_id=member.user_id,
            timezone=member.timezone,
            oversized_attributes_bytes=len(attributes),
        )
    return make(
        delivery_id=delivery, user_id=member.user_id, timezone=member.timezone, attributes_json=attributes
    )


class Held:
    """Deliveries that wait for their due time, grouped as they are stored (one pending row for
    the deliveries due together) and made in place in their group: none is made twice."""

    def __init__(self) -> None:
        self.groups: dict[Due, events.PendingRecipients] = {}

    def add(self, due: Due, delivery: str, member: segmentation_pb.AudienceMember) -> None:
        group = self.groups.get(due)
        if group is None:
            group = self.groups[due] = events.PendingRecipients()
        recipient_of(delivery, member, group.recipients.add)

    def __len__(self) -> int:
        return sum(len(group.recipients) for group in self.groups.values())


def _left_out(member: segmentation_pb.AudienceMember, campaign: campaign_pb.Campaign) -> SkipReason | None:
    """The targeting rule that leaves a qualified user out, if one does."""
    if member.unreachable:
        return SkipReason.NOT_REACHABLE
    if member.outside_sample:
        return SkipReason.TARGETING_CAP
    percent = campaign.targeting.control_group_percent
    if percent > 0 and in_control_group(campaign.name, member.user_id, percent):
        return SkipReason.CONTROL_GROUP
    return None


HOLD = Statement(
    """
    INSERT INTO scheduler.pending_deliveries
        (run_id, group_id, account_id, campaign, due_at, cutoff_at, zone, size, recipients)
    SELECT :run_id, g, :account_id, :campaign, a, c, z, n, r
    FROM unnest(CAST(:groups AS text[]), CAST(:due AS timestamptz[]), CAST(:cutoffs AS timestamptz[]),
                CAST(:zones AS text[]), CAST(:sizes AS int[]), CAST(:recipients AS bytea[]))
         AS t(g, a, c, z, n, r)
    ON CONFLICT DO NOTHING
    """
)


async def hold(target: Target, run_id: uuid.UUID, account_id: uuid.UUID, campaign: str, held: Held) -> None:
    """Puts deliveries in pending_deliveries, one row for each group due together."""
    groups = list(held.groups.items())
    await HOLD.execute(
        target,
        run_id=run_id,
        account_id=account_id,
        campaign=campaign,
        groups=[pending.recipients[0].delivery_id for _, pending in groups],
        due=[due.at for due, _ in groups],
        cutoffs=[due.cutoff_at for due, _ in groups],
        zones=[due.zone for due, _ in groups],
        sizes=[len(pending.recipients) for _, pending in groups],
        recipients=[pending.SerializeToString() for _, pending in groups],
    )


_STOPPED_NOW = Statement("SELECT state = :stopped FROM scheduler.campaigns WHERE name = :name")
# Moving the cursor only from where this replica left it also checks the run is still ours and
# still running (not cancelled, not taken over).
_ADVANCE = Statement(
    """
    UPDATE scheduler.runs SET
        cursor = :last,
        targeted = targeted + :members,
        audience_size = audience_size + :members,
        waiting = waiting + :held,
        released = released + :skipped,
        lease_until = now() + CAST(:lease AS interval),
        version = version + 1
    WHERE id = :run_id AND state = :running AND lease_owner = :owner AND cursor = :cursor
    RETURNING *
    """
)


def _finished_state(state: RunState.ValueType) -> Any:
    """A run that planned everyone is DISPATCHED, or RELEASING while deliveries still wait."""
    if state != RunState.RUN_STATE_DISPATCHED:
        return RunState.Name(state)
    return sa.case(
        (runs.c.waiting > 0, RunState.Name(RunState.RUN_STATE_RELEASING)), else_=RunState.Name(state)
    )


class RunExecutor:
    """Claims due runs and plans them, several at once; any replica may take over any run."""

    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        run_events: RunEvents,
        segmentation: grpc.aio.Channel,
        notify_outbox: Callable[[], None],
        notify_releaser: Callable[[], None],
        poll_seconds: float = CLAIM_POLL_SECONDS,
        max_concurrent_runs: int = 4,
        lease_seconds: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.database = database
        self.subjects = subjects
        self.run_events = run_events
        self.audiences = segmentation_grpc.SegmentationServiceStub(segmentation)
        self.notify_outbox = notify_outbox
        self.notify_releaser = notify_releaser
        self.max_concurrent_runs = max_concurrent_runs
        self.lease = timedelta(seconds=lease_seconds)
        self.owner = uuid.uuid4().hex
        self._active: set[asyncio.Task[None]] = set()
        self.loop = WakeableLoop("run-executor", self._claim_next, poll_seconds)

    def notify(self) -> None:
        self.loop.notify()

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()
        for task in self._active:
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)
        await self._hand_over_leases()

    async def _hand_over_leases(self) -> None:
        """Ends this replica's leases once its runs have stopped working, so another replica (or this
        one restarted, as in a redeploy) resumes them from their cursors at once rather than a lease
        later. Should the database be away, the leases run out as after a crash."""
        try:
            async with self.database.transaction() as session:
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.state == _RUNNING, runs.c.lease_owner == self.owner)
                    .values(lease_until=sa.func.now())
                )
        except Exception as error:
            log.warning("lease_hand_over_failed", error=repr(error))

    async def _claim_next(self) -> bool:
        if len(self._active) >= self.max_concurrent_runs:
            return False
        claimed = await self._claim()
        if claimed is None:
            return False
        task = asyncio.create_task(self._execute(*claimed), name=f"run:{claimed[0].id}")
        self._active.add(task)
        task.add_done_callback(self._run_done)
        return True

    def _run_done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self.loop.notify()

    async def _claim(self) -> tuple[Any, Snapshot | None] | None:
        """Takes one due run (or one abandoned by a crashed replica, or due for a retry) and leases it."""
        async with self.database.transaction() as session:
            due = (
                sa.select(runs.c.id)
                .where(
                    sa.or_(
                        # Due by the clock of schedules; leases keep to the database's real time.
                        sa.and_(runs.c.state == _PENDING, runs.c.scheduled_time <= api.utcnow()),
                        sa.and_(runs.c.state == _RUNNING, runs.c.lease_until < sa.func.now()),
                    )
                )
                .order_by(runs.c.scheduled_time)
                .limit(1)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            row = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == due)
                    .values(
                        state=_RUNNING,
                        lease_owner=self.owner,
                        lease_until=sa.func.now() + self.lease,
                        started_at=sa.func.coalesce(runs.c.started_at, api.utcnow()),
                        version=runs.c.version + 1,
                    )
                    .returning(*runs.c)
                )
            ).first()
            if row is None:
                next_due = await session.scalar(
                    sa.select(sa.func.min(runs.c.scheduled_time)).where(
                        runs.c.state == _PENDING, runs.c.scheduled_time > api.utcnow()
                    )
                )
                if next_due is not None:  # the loop wakes for the next pending run
                    self.loop.due_at(next_due)
                return None
            stored = (
                await session.execute(
                    sa.select(campaigns.c.snapshot, campaigns.c.version).where(
                        campaigns.c.name == row.campaign
                    )
                )
            ).first()
            snapshot = None
            if stored is not None:
                settings = await account_settings(session, row.account_id)
                snapshot = Snapshot(
                    campaign_pb.Campaign.FromString(stored.snapshot), stored.version, settings
                )
                await plan_following(session, row, snapshot.campaign, account_zone(settings))
            await self.run_events.changed(session, [row])
        self.notify_outbox()
        return row, snapshot

    async def _execute(self, row: Any, snapshot: Snapshot | None) -> None:
        # Planning continues the trace of the change that planned the run.
        with tracing.span("plan run", parent=row.trace_context, attributes={"herald.run": run_name(row)}):
            await self._execute_traced(row, snapshot)

    async def _execute_traced(self, row: Any, snapshot: Snapshot | None) -> None:
        log.info("run_started", run=run_name(row), cursor=row.cursor, attempts=row.attempts)
        try:
            if snapshot is None:
                raise RunDefinitionError("the campaign of this run is unknown")
            # The lease is renewed while the run works, not only as pages are planned: an audience
            # whose first page takes longer than a lease (a large sample, a slow segment) would
            # otherwise pass from replica to replica, each starting over.
            keeper = asyncio.create_task(self._keep_lease(row.id), name=f"lease:{row.id}")
            try:
                await self._plan(row, snapshot)
            finally:
                await cancel_and_wait(keeper)
        except RunStopped:
            log.info("run_stopped", run=run_name(row))
            return
        except SafetyLimitExceeded as exceeded:
            log.warning("run_refused", run=run_name(row), reason=str(exceeded))
            await self._end(row.id, RunState.RUN_STATE_FAILED, str(exceeded), alert=True)
            return
        except Exception as error:
            permanent, reason = _failure(error)
            log.warning("run_interrupted", run=run_name(row), reason=reason, permanent=permanent)
            await self._interrupted(row.id, permanent, reason)
            return
        await self._end(row.id, RunState.RUN_STATE_DISPATCHED, "")

    async def _keep_lease(self, run_id: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self.lease.total_seconds() / 3)
            try:
                async with self.database.transaction() as session:
                    await session.execute(
                        sa.update(runs)
                        .where(
                            runs.c.id == run_id, runs.c.state == _RUNNING, runs.c.lease_owner == self.owner
                        )
                        .values(lease_until=sa.func.now() + self.lease)
                    )
            except Exception as error:  # the database away: planning notices too, and retries
                log.warning("lease_renewal_failed", run=str(run_id), error=repr(error))

    async def _plan(self, row: Any, snapshot: Snapshot) -> None:
        # The audience is read as the campaign's account: only its own users, only its segments.
        act_as(service_caller(row.account_id))
        campaign = snapshot.campaign
        try:
            kind = channels.of_campaign(campaign)
        except KeyError:
            raise RunDefinitionError("the campaign has no content Herald can deliver") from None
        # The campaign's Audience has segmentation's shape, field for field.
        audience = segmentation_pb.Audience.FromString(campaign.audience.SerializeToString())
        targeting = campaign.targeting
        cap = targeting.WhichOneof("cap")
        if cap == "safety_limit" and not row.cursor:
            reach = await self.audiences.EstimateReach(
                segmentation_pb.EstimateReachRequest(audience=audience, channel=kind.audience_channel),
                timeout=AUDIENCE_DEADLINE_SECONDS,
            )
            if reach.reachable_count > targeting.safety_limit:
                raise SafetyLimitExceeded(
                    f"safety limit: {reach.reachable_count:,} users qualify and the limit is "
                    f"{targeting.safety_limit:,}; the run did not start"
                )
        sample: dict[str, Any] = {}
        if cap == "random_cap":
            sample = {"sample_size": targeting.random_cap, "sample_seed": str(row.id)}
            if not row.sample_seed:
                await self._record_seed(row.id, str(row.id))
        request = segmentation_pb.StreamAudienceRequest(
            audience=audience,
            channel=kind.audience_channel,
            **sample,
            attribute_keys=sorted(kind.attribute_keys(campaign)),
            page_size=AUDIENCE_PAGE_SIZE,
            start_after_user_id=row.cursor,
            attributes_as_json=True,
            include_left_out=True,
            with_best_hour=campaign.delivery.HasField("best_time"),
            # A resumed run selects as of the moment the run first started ("the last 7 days").
            evaluation_time=api.timestamp(row.started_at or api.utcnow()),
        )
        timing = RunTiming(
            campaign, row.planned_time or row.scheduled_time, snapshot.account, row.scheduled_time
        )
        cursor = row.cursor
        async for page in self.audiences.StreamAudience(request, timeout=AUDIENCE_DEADLINE_SECONDS):
            if not page.members:
                continue
            # On a direct connection: a page of a large audience comes every few milliseconds, and a
            # session would cost more than its statements.
            async with self.database.direct_transaction() as connection:
                cursor = await self._plan_page(connection, row.id, cursor, snapshot, timing, page.members)
            self.notify_outbox()
            self.notify_releaser()

    async def _plan_page(
        self,
        target: Target,
        run_id: uuid.UUID,
        cursor: str,
        snapshot: Snapshot,
        timing: RunTiming,
        members: Sequence[segmentation_pb.AudienceMember],
    ) -> str:
        """Decides each member's delivery: those a rule skips go to dispatch now (recorded with the
        reason), the others wait in pending_deliveries for their due time."""
        campaign = snapshot.campaign
        stopped = await _STOPPED_NOW.fetch_value(target, stopped=_STOPPED, name=campaign.name)
        skipped: list[events.Recipient] = []
        held = Held()
        # Best Time's per-day limit: a day that is full passes the user to the next of the window.
        per_day = timing.best_time and campaign.targeting.WhichOneof("cap") == "daily_limit"
        limits = RunLimits(campaign.targeting, snapshot.account) if per_day else None
        if limits is not None:
            await limits.load(target, run_id)
        for member in members:
            delivery = delivery_id(run_id, member.user_id)
            skip = SkipReason.CAMPAIGN_STOPPED if stopped else _left_out(member, campaign)
            hour = member.best_hour_utc if member.HasField("best_hour_utc") else None
            due = timing.of(member.timezone, hour)
            skip = skip or due.skip
            if skip is None and limits is not None:
                options = timing.options(member.timezone, hour)
                open_day = next((o for o in options if o.skip is None and limits.take(o.at)), None)
                if open_day is None:
                    skip = SkipReason.DAILY_LIMIT
                else:
                    due = open_day
            if skip is None:
                held.add(due, delivery, member)
            else:
                recipient = recipient_of(delivery, member)
                recipient.skip_reason = skip
                skipped.append(recipient)
        last = members[-1].user_id
        advanced = await _ADVANCE.fetch(
            target,
            last=last,
            members=len(members),
            held=len(held),
            skipped=len(skipped),
            lease=self.lease,
            run_id=run_id,
            running=_RUNNING,
            owner=self.owner,
            cursor=cursor,
        )
        if not advanced:
            raise RunStopped()
        account_id = advanced[0].account_id
        if limits is not None:
            await limits.save(target, run_id, account_id)
        if held:
            await hold(target, run_id, account_id, campaign.name, held)
        if skipped:
            batches = delivery_batches(
                self.subjects, campaign, snapshot.version, run_id, account_id, skipped, api.utcnow()
            )
            await enqueue(target, outbox, batches)
        await self.run_events.changed(target, advanced)
        if self.metrics is not None:
            self.metrics.run_recipients.labels("targeted").inc(len(members))
            self.metrics.run_recipients.labels("skipped").inc(len(skipped))
        return last

    async def _interrupted(self, run_id: uuid.UUID, permanent: bool, reason: str) -> None:
        """Schedules a retry from the cursor after a growing delay, or fails the run for good."""
        async with self.database.transaction() as session:
            attempts = await session.scalar(
                sa.select(runs.c.attempts).where(runs.c.id == run_id, runs.c.lease_owner == self.owner)
            )
            if attempts is None:
                return
            if permanent or attempts + 1 >= MAX_ATTEMPTS:
                if not permanent:
                    reason = f"gave up after {attempts + 1} attempts; last: {reason}"
            else:
                retried = (
                    await session.execute(
                        sa.update(runs)
                        .where(runs.c.id == run_id, runs.c.state == _RUNNING)
                        .values(
                            attempts=attempts + 1,
                            lease_owner=None,
                            lease_until=sa.func.now() + timedelta(seconds=_retry_delay(attempts + 1)),
                            error=reason,
                            version=runs.c.version + 1,
                        )
                        .returning(*runs.c)
                    )
                ).all()
                await self.run_events.changed(session, retried)
                self.notify_outbox()
                return
        await self._end(run_id, RunState.RUN_STATE_FAILED, reason)

    async def _alert(self, session: AsyncSession, row: Any, reason: str) -> None:
        alert = events.CampaignAlert(
            event_id=str(uuid.uuid4()),
            account=account_name(row.account_id),
            campaign=row.campaign,
            run=run_name(row),
            reason=reason,
            occur_time=api.timestamp(api.utcnow()),
        )
        subject = self.subjects.campaign_alert(alert.account)
        await enqueue(session, outbox, [OutboxEvent.of(subject, alert, alert.event_id)])

    async def _record_seed(self, run_id: uuid.UUID, seed: str) -> None:
        async with self.database.transaction() as session:
            updated = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == run_id, runs.c.lease_owner == self.owner)
                    .values(sample_seed=seed, version=runs.c.version + 1)
                    .returning(*runs.c)
                )
            ).all()
            await self.run_events.changed(session, updated)
        self.notify_outbox()

    async def _end(
        self, run_id: uuid.UUID, state: RunState.ValueType, error: str, *, alert: bool = False
    ) -> None:
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == run_id, runs.c.state == _RUNNING, runs.c.lease_owner == self.owner)
                    .values(
                        state=_finished_state(state),
                        ended_at=sa.case((runs.c.waiting > 0, None), else_=api.utcnow())
                        if state == RunState.RUN_STATE_DISPATCHED
                        else api.utcnow(),
                        lease_until=None,
                        lease_owner=None,
                        error=error,
                        version=runs.c.version + 1,
                    )
                    .returning(*runs.c)
                )
            ).first()
            if row is not None:
                await self.run_events.changed(session, [row])
                if alert:
                    await self._alert(session, row, error)
                log.info("run_finished", run=run_name(row), state=row.state, targeted=row.targeted)
        self.notify_outbox()
