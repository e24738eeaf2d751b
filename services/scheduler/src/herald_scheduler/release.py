"""Releases pending deliveries as they fall due, in due order, from any replica.

A run plans each user's delivery into `pending_deliveries` with its due time (their local time,
the end of do-not-disturb hours); this loop takes the rows that are due, oldest first, in short
transactions that lock them (SKIP LOCKED: replicas share the work), applies the rules that hold at
hand-over time (cut-off, the campaign's throttle, the account's frequency caps) and queues the
DeliveryBatch events in the same transaction that deletes the rows. Nothing waits in memory: a
restart loses nothing and a million users cost a million rows, not a million timers.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald_common import api, channels, tracing
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target
from herald_common.faults import is_transient
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.metrics import Metrics
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.schedules import DeliveryRules
from herald_common.skips import SkipReason
from herald_common.timing import THROTTLE_WINDOW_SECONDS, throttle_window
from herald_scheduler import frequency
from herald_scheduler.handover import delivery_batches
from herald_scheduler.planning import accounts_settings
from herald_scheduler.runs import RunEvents
from herald_scheduler.storage import outbox, pending_deliveries

log = get_logger(__name__)
# A round hands over whole groups, about this many deliveries in all, from at most this many groups.
RELEASE_DELIVERIES = 5000
RELEASE_GROUPS = 200
# Rounds in flight at once in a replica: while one waits on PostgreSQL another decides, so a
# zone's deliveries that all fall due at once go out within about a second.
CONCURRENT_ROUNDS = 3
# The first round sleeps until the next group comes due or it is told of new ones; it looks by
# itself this often too, for groups another replica made that its own rounds did not take.
POLL_SECONDS = 2.0
# The rounds other than the first also look now and then by themselves (a missed wake-up).
HELPER_POLLS_RARER = 10
_ACTIVE = {
    campaign_pb.State.Name(campaign_pb.STATE_SCHEDULED),
    campaign_pb.State.Name(campaign_pb.STATE_RUNNING),
}
_RELEASING = pb.RunState.Name(pb.RUN_STATE_RELEASING)
# Runs planning, releasing or live.
_IN_PROGRESS = [
    pb.RunState.Name(s) for s in (pb.RUN_STATE_RUNNING, pb.RUN_STATE_RELEASING, pb.RUN_STATE_LIVE)
]
_DISPATCHED = pb.RunState.Name(pb.RUN_STATE_DISPATCHED)

_DUE = Statement(
    """
    SELECT run_id, group_id, account_id, campaign, due_at, cutoff_at, zone, throttled, size, recipients
    FROM scheduler.pending_deliveries
    WHERE due_at <= :now AND problem IS NULL
    ORDER BY due_at, seq
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
# When the next waiting group comes due (those due already are being released).
_NEXT_DUE = Statement(
    "SELECT min(due_at) FROM scheduler.pending_deliveries WHERE due_at > :now AND problem IS NULL"
)
_FORGET = Statement(
    """
    DELETE FROM scheduler.pending_deliveries p
    USING unnest(CAST(:runs AS uuid[]), CAST(:groups AS text[])) AS t(r, g)
    WHERE p.run_id = t.r AND p.group_id = t.g
    """
)
_DEFER = Statement(
    """
    UPDATE scheduler.pending_deliveries
    SET due_at = :until, throttled = true, size = :size, recipients = :recipients
    WHERE run_id = :run_id AND group_id = :group_id
    """
)
_THROTTLE_TAKE = Statement(
    """
    INSERT INTO scheduler.throttle_windows AS w (account_id, campaign, window_start, used)
    VALUES (:account_id, :campaign, :window, 0)
    ON CONFLICT (campaign, window_start) DO UPDATE SET used = w.used
    RETURNING used
    """
)
_THROTTLE_USE = Statement(
    "UPDATE scheduler.throttle_windows SET used = used + :n"
    " WHERE campaign = :campaign AND window_start = :window"
)
_COUNT = Statement(
    """
    UPDATE scheduler.runs r SET
        waiting = r.waiting - t.n,
        released = r.released + t.n,
        first_release_at = coalesce(r.first_release_at, :now),
        last_release_at = :now,
        max_lateness_seconds = greatest(r.max_lateness_seconds, t.late),
        state = CASE WHEN r.state = :releasing AND r.waiting = t.n THEN :dispatched ELSE r.state END,
        ended_at = CASE WHEN r.state = :releasing AND r.waiting = t.n THEN :now ELSE r.ended_at END,
        version = r.version + 1
    FROM unnest(CAST(:runs AS uuid[]), CAST(:counts AS bigint[]), CAST(:late AS float8[])) AS t(id, n, late)
    WHERE r.id = t.id
    RETURNING r.*
    """
)

_CAMPAIGNS = Statement(
    "SELECT name, account_id, snapshot, version, state FROM scheduler.campaigns"
    " WHERE name = ANY(CAST(:names AS text[]))"
)
_TRACES = Statement("SELECT id, trace_context FROM scheduler.runs WHERE id = ANY(CAST(:ids AS uuid[]))")
_FORGET_THROTTLE_WINDOWS = Statement("DELETE FROM scheduler.throttle_windows WHERE window_start < :before")


@dataclass
class _Campaign:
    campaign: campaign_pb.Campaign
    account_id: uuid.UUID
    version: int
    active: bool
    rules: DeliveryRules
    kind: channels.ChannelKind


@dataclass(frozen=True)
class _Waiting:
    """One pending delivery, with the group it waits in."""

    group: Any
    recipient: events.Recipient


@dataclass
class _Round:
    """What one release round decided."""

    now: datetime
    # The round's campaigns, as read once for it.
    campaigns: dict[str, _Campaign]
    released: dict[uuid.UUID, list[events.Recipient]] = field(default_factory=lambda: defaultdict(list))
    # The earliest due time of each run's deliveries handed over on time (not throttled).
    earliest_due: dict[uuid.UUID, datetime] = field(default_factory=dict)
    # Deliveries that wait on, by group (run, group id), with the time they wait for.
    kept: dict[tuple[uuid.UUID, str], tuple[datetime, list[events.Recipient]]] = field(default_factory=dict)

    def release(self, waiting: _Waiting, skip: SkipReason | None = None) -> None:
        group = waiting.group
        if skip is not None:
            waiting.recipient.skip_reason = skip
        self.released[group.run_id].append(waiting.recipient)
        if not group.throttled:
            earliest = self.earliest_due.get(group.run_id)
            self.earliest_due[group.run_id] = (
                group.due_at if earliest is None else min(earliest, group.due_at)
            )

    def defer(self, waiting: _Waiting, until: datetime) -> None:
        key = (waiting.group.run_id, waiting.group.group_id)
        self.kept.setdefault(key, (until, []))[1].append(waiting.recipient)

    def lateness(self, run_id: uuid.UUID) -> float:
        """Seconds the longest-waiting delivery of a run is handed over after its due time, as of
        now (deliveries a throttle held back aside)."""
        due = self.earliest_due.get(run_id)
        return max((api.utcnow() - due).total_seconds(), 0.0) if due is not None else 0.0


def _expand(groups: list[Any]) -> list[_Waiting]:
    return [
        _Waiting(group, recipient)
        for group in groups
        for recipient in events.PendingRecipients.FromString(group.recipients).recipients
    ]


class Releaser:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        run_events: RunEvents,
        notify_outbox: Callable[[], None],
        poll_seconds: float = POLL_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.database = database
        self.subjects = subjects
        self.run_events = run_events
        self.notify_outbox = notify_outbox
        self._swept: date | None = None
        # One round polls; the others join in when it finds more due than one round takes, so an
        # idle replica asks PostgreSQL once a poll, not once per round.
        self.loops = [WakeableLoop("releaser-0", self._lead_round, poll_seconds)] + [
            WakeableLoop(f"releaser-{n}", self.release_due, poll_seconds * HELPER_POLLS_RARER)
            for n in range(1, CONCURRENT_ROUNDS)
        ]

    def notify(self) -> None:
        for loop in self.loops:
            loop.notify()

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    async def stop(self) -> None:
        for loop in self.loops:
            await loop.stop()

    async def _lead_round(self) -> bool:
        more = await self.release_due()
        if more:
            for loop in self.loops[1:]:
                loop.notify()
        return more

    async def release_due(self) -> bool:
        """Releases the groups of deliveries that are due, oldest first, up to about
        RELEASE_DELIVERIES; True when more may be due already. A round that fails for a reason that
        will not pass by itself is taken again group by group, and the groups that fail alone are
        quarantined with the reason, so one bad row holds no other back."""
        try:
            return await self._release_round()
        except Exception as error:
            if is_transient(error):
                raise
            log.error("release_round_failed", error=repr(error))
            await self._quarantine_poison()
            return True

    async def _quarantine_poison(self) -> None:
        now = api.utcnow()
        async with self.database.transaction() as session:
            for group in await _DUE.fetch(session, now=now, limit=RELEASE_GROUPS):
                try:
                    async with session.begin_nested():
                        decided = await self._decide(session, [group], now)
                        await self._hand_over(session, [group], decided)
                except Exception as error:
                    if is_transient(error):
                        raise
                    problem = f"cannot be released: {error!r}"[:1000]
                    await session.execute(
                        sa.update(pending_deliveries)
                        .where(
                            pending_deliveries.c.run_id == group.run_id,
                            pending_deliveries.c.group_id == group.group_id,
                        )
                        .values(problem=problem)
                    )
                    log.error(
                        "pending_deliveries_quarantined",
                        run=str(group.run_id),
                        group=group.group_id,
                        campaign=group.campaign,
                        problem=problem,
                    )
        self.notify_outbox()

    async def _release_round(self) -> bool:
        now = api.utcnow()
        # On a direct connection: rounds follow each other all the time deliveries are due, and a
        # session would cost more than their statements.
        async with self.database.direct_transaction() as connection:
            locked = await _DUE.fetch(connection, now=now, limit=RELEASE_GROUPS)
            if not locked:
                await self._sweep(connection, now)
                await self._expect_next(connection, now)
                return False
            groups: list[Any] = []
            size = 0
            for group in locked:  # the rest stay as they are, for the next round
                if groups and size + group.size > RELEASE_DELIVERIES:
                    break
                groups.append(group)
                size += group.size
            decided = await self._decide(connection, groups, now)
            batches = await self._hand_over(connection, groups, decided)
            more = len(groups) < len(locked) or len(locked) == RELEASE_GROUPS
            if not more:  # what this round put off (a throttle's next window, say) comes due later
                await self._expect_next(connection, now)
        if self.metrics is not None:
            self.metrics.released_batches.inc(batches)
            for run_id in decided.released:
                self.metrics.release_lateness.observe(decided.lateness(run_id))
        self.notify_outbox()
        return more

    async def _expect_next(self, target: Target, now: datetime) -> None:
        """Has the leading round wake when the next waiting group comes due."""
        next_due = await _NEXT_DUE.fetch_value(target, now=now)
        if next_due is not None:
            self.loops[0].due_at(next_due)

    async def _decide(self, target: Target, groups: list[Any], now: datetime) -> _Round:
        known = await self._campaigns(target, {g.campaign for g in groups})
        decided = _Round(now, known)
        settings = await accounts_settings(target, {g.account_id for g in groups})
        by_campaign: dict[str, list[Any]] = defaultdict(list)
        for group in groups:
            by_campaign[group.campaign].append(group)
        capped: list[tuple[_Waiting, frequency.Send]] = []
        # Campaigns in name order: concurrent rounds take throttle windows' locks in one order.
        for name, of_campaign in sorted(by_campaign.items()):
            campaign = known.get(name)
            if campaign is None:  # quarantined with this reason
                raise LookupError(f"the scheduler does not know {name}")
            waiting = _expand(of_campaign)
            if not campaign.active:  # dispatch records each as skipped with the campaign's state
                for each in waiting:
                    decided.release(each)
                continue
            account = settings[of_campaign[0].account_id]
            cap = _cap(campaign, account)
            for each in await self._throttle(target, campaign, account, waiting, decided):
                if cap is None:
                    decided.release(each)
                else:
                    group = each.group
                    channel = campaign.kind.destination_type
                    send = frequency.Send(group.account_id, channel, each.recipient.user_id, group.zone, cap)
                    capped.append((each, send))
        fits = await frequency.admit(target, [send for _, send in capped], now)
        for (each, _), ok in zip(capped, fits, strict=True):
            decided.release(each, None if ok else SkipReason.FREQUENCY_CAP)
        return decided

    async def _throttle(
        self,
        target: Target,
        campaign: _Campaign,
        account: accounts_pb.AccountSettings,
        waiting: list[_Waiting],
        decided: _Round,
    ) -> list[_Waiting]:
        """The deliveries of one campaign that may go now: those past their cut-off are skipped,
        and under a throttle those beyond the window's budget wait for the next window."""
        now = decided.now
        limit = account.throttle_per_five_minutes if campaign.rules.throttle else 0
        window = throttle_window(now)
        following = window + timedelta(seconds=THROTTLE_WINDOW_SECONDS)
        budget = len(waiting)
        if limit > 0:
            used = await _THROTTLE_TAKE.fetch_value(
                target, account_id=campaign.account_id, campaign=campaign.campaign.name, window=window
            )
            budget = max(limit - int(used or 0), 0)
        going: list[_Waiting] = []
        for each in waiting:
            cutoff_at = each.group.cutoff_at
            if cutoff_at is not None and now >= cutoff_at:
                decided.release(
                    each, SkipReason.THROTTLED_CUTOFF if each.group.throttled else SkipReason.CUTOFF
                )
            elif len(going) < budget:
                going.append(each)
            elif cutoff_at is not None and following >= cutoff_at:
                decided.release(each, SkipReason.THROTTLED_CUTOFF)
            else:
                decided.defer(each, following)
        if limit > 0 and going:
            await _THROTTLE_USE.execute(target, n=len(going), campaign=campaign.campaign.name, window=window)
        return going

    async def _hand_over(self, target: Target, groups: list[Any], decided: _Round) -> int:
        """Rewrites the groups that wait on, deletes the others and queues what was released;
        returns how many delivery batches it queued."""
        for (run_id, group_id), (until, kept) in decided.kept.items():
            recipients = events.PendingRecipients(recipients=kept).SerializeToString()
            await _DEFER.execute(
                target, until=until, size=len(kept), recipients=recipients, run_id=run_id, group_id=group_id
            )
        done = [g for g in groups if (g.run_id, g.group_id) not in decided.kept]
        if done:
            await _FORGET.execute(target, runs=[g.run_id for g in done], groups=[g.group_id for g in done])
        if not decided.released:
            return 0
        first = {g.run_id: g for g in groups}
        traces = await _traces(target, list(decided.released)) if tracing.enabled() else {}
        queued: list[OutboxEvent] = []
        for run_id, released in decided.released.items():
            group = first[run_id]
            campaign = decided.campaigns[group.campaign]
            batches = delivery_batches(
                self.subjects,
                campaign.campaign,
                campaign.version,
                run_id,
                group.account_id,
                released,
                decided.now,
            )
            # Delivering continues the trace of the change that planned the run.
            queued += [replace(b, trace_context=traces.get(run_id)) for b in batches]
        await enqueue(target, outbox, queued)
        counted = await _COUNT.fetch(
            target,
            now=decided.now,
            releasing=_RELEASING,
            dispatched=_DISPATCHED,
            runs=list(decided.released),
            counts=[len(r) for r in decided.released.values()],
            late=[decided.lateness(run_id) for run_id in decided.released],
        )
        await self.run_events.changed(target, counted)
        return len(queued)

    async def _campaigns(self, target: Target, names: set[str]) -> dict[str, _Campaign]:
        rows = await _CAMPAIGNS.fetch(target, names=sorted(names))
        found = {}
        for row in rows:
            campaign = campaign_pb.Campaign.FromString(row.snapshot)
            found[row.name] = _Campaign(
                campaign=campaign,
                account_id=row.account_id,
                version=row.version,
                active=row.state in _ACTIVE,
                rules=DeliveryRules.of(campaign),
                kind=channels.of_campaign(campaign),
            )
        return found

    async def _sweep(self, target: Target, now: datetime) -> None:
        """Once a day, drops frequency counts and throttle windows that no longer matter."""
        if self._swept == now.date():
            return
        self._swept = now.date()
        await frequency.forget_expired(target, now.date())
        await _FORGET_THROTTLE_WINDOWS.execute(target, before=now - timedelta(days=1))


def _cap(campaign: _Campaign, account: accounts_pb.AccountSettings) -> frequency.Cap | None:
    return account_cap(campaign.rules, campaign.kind, account)


def account_cap(
    rules: DeliveryRules, kind: channels.ChannelKind, account: accounts_pb.AccountSettings
) -> frequency.Cap | None:
    """The account's cap on the campaign's channel, unless the campaign opts out."""
    if not rules.frequency_caps:
        return None
    for cap in account.frequency_caps:
        if cap.channel == kind.cap_channel:
            return frequency.Cap(per_day=cap.per_day, per_week=cap.per_week)
    return None


def released_at_once(
    rules: DeliveryRules, kind: channels.ChannelKind, account: accounts_pb.AccountSettings
) -> bool:
    """Whether a delivery already due needs none of the rules applied at hand-over time (the
    throttle, the account's frequency caps): it can go to dispatch without waiting its turn."""
    throttled = rules.throttle and account.throttle_per_five_minutes > 0
    return not throttled and rules.cutoff is None and account_cap(rules, kind, account) is None


async def _traces(target: Target, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, str | None]:
    return {row.id: row.trace_context for row in await _TRACES.fetch(target, ids=run_ids)}


_PROGRESS = sa.text(
    """
    SELECT (SELECT count(*) FROM scheduler.pending_deliveries WHERE problem IS NULL) AS pending,
           (SELECT count(*) FROM scheduler.runs WHERE state = ANY(CAST(:active AS text[]))) AS active
    """
)


async def sample_progress(database: Database, metrics: Metrics) -> None:
    """Runs under way and delivery batches waiting for their time, for the metrics."""
    async with database.transaction() as session:
        found = (await session.execute(_PROGRESS, {"active": _IN_PROGRESS})).one()
    metrics.pending_releases.set(found.pending)
    metrics.runs_in_progress.set(found.active)
