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
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald_common import api, channels
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.schedules import DeliveryRules
from herald_common.skips import SkipReason
from herald_common.timing import THROTTLE_WINDOW_SECONDS, throttle_window
from herald_scheduler import frequency
from herald_scheduler.handover import delivery_batches
from herald_scheduler.runs import RunEvents
from herald_scheduler.storage import accounts, campaigns, outbox

log = get_logger(__name__)
RELEASE_ROWS = 5000
_ACTIVE = {
    campaign_pb.State.Name(campaign_pb.STATE_SCHEDULED),
    campaign_pb.State.Name(campaign_pb.STATE_RUNNING),
}
_RELEASING = pb.RunState.Name(pb.RUN_STATE_RELEASING)
_DISPATCHED = pb.RunState.Name(pb.RUN_STATE_DISPATCHED)

_DUE = sa.text(
    """
    SELECT run_id, delivery_id, account_id, campaign, user_id, due_at, cutoff_at, zone, throttled, recipient
    FROM scheduler.pending_deliveries
    WHERE due_at <= :now
    ORDER BY due_at, seq
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
_FORGET = sa.text(
    """
    DELETE FROM scheduler.pending_deliveries p
    USING unnest(CAST(:runs AS uuid[]), CAST(:ids AS text[])) AS t(r, d)
    WHERE p.run_id = t.r AND p.delivery_id = t.d
    """
)
_DEFER = sa.text(
    """
    UPDATE scheduler.pending_deliveries p SET due_at = :until, throttled = true
    FROM unnest(CAST(:runs AS uuid[]), CAST(:ids AS text[])) AS t(r, d)
    WHERE p.run_id = t.r AND p.delivery_id = t.d
    """
)
_THROTTLE_TAKE = sa.text(
    """
    INSERT INTO scheduler.throttle_windows AS w (account_id, campaign, window_start, used)
    VALUES (:account_id, :campaign, :window, 0)
    ON CONFLICT (campaign, window_start) DO UPDATE SET used = w.used
    RETURNING used
    """
)
_THROTTLE_USE = sa.text(
    "UPDATE scheduler.throttle_windows SET used = used + :n"
    " WHERE campaign = :campaign AND window_start = :window"
)
_COUNT = sa.text(
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


@dataclass
class _Campaign:
    campaign: campaign_pb.Campaign
    version: int
    active: bool
    rules: DeliveryRules
    kind: channels.ChannelKind


@dataclass
class _Round:
    """What one release round decided."""

    now: datetime
    released: dict[uuid.UUID, list[events.Recipient]] = field(default_factory=lambda: defaultdict(list))
    forget: list[Any] = field(default_factory=list)
    deferred: dict[datetime, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def lateness(self, run_id: uuid.UUID) -> float:
        """Seconds the longest-waiting delivery of a run is handed over after its due time, as of
        now (deliveries a throttle held back aside)."""
        due = [r.due_at for r in self.forget if r.run_id == run_id and not r.throttled]
        return max((api.utcnow() - min(due)).total_seconds(), 0.0) if due else 0.0

    def release(self, row: Any, skip: SkipReason | None = None) -> None:
        recipient = events.Recipient.FromString(row.recipient)
        if skip is not None:
            recipient.skip_reason = skip
        self.released[row.run_id].append(recipient)
        self.forget.append(row)


class Releaser:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        run_events: RunEvents,
        notify_outbox: Callable[[], None],
        poll_seconds: float = 0.2,
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.run_events = run_events
        self.notify_outbox = notify_outbox
        self._swept: date | None = None
        self._loop = WakeableLoop("releaser", self.release_due, poll_seconds)

    def notify(self) -> None:
        self._loop.notify()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def release_due(self) -> bool:
        """Releases up to RELEASE_ROWS due deliveries; True when more may be due already."""
        now = api.utcnow()
        async with self.database.transaction() as session:
            rows = list((await session.execute(_DUE, {"now": now, "limit": RELEASE_ROWS})).all())
            if not rows:
                await self._sweep(session, now)
                return False
            decided = await self._decide(session, rows, now)
            await self._hand_over(session, decided)
        self.notify_outbox()
        return len(rows) == RELEASE_ROWS

    async def _decide(self, session: AsyncSession, rows: list[Any], now: datetime) -> _Round:
        decided = _Round(now)
        known = await self._campaigns(session, {r.campaign for r in rows})
        settings = await self._settings(session, {r.account_id for r in rows})
        by_campaign: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_campaign[row.campaign].append(row)
        capped: list[tuple[Any, frequency.Send]] = []
        for name, group in by_campaign.items():
            campaign = known.get(name)
            if campaign is None:
                log.warning("pending_deliveries_of_unknown_campaign", campaign=name, count=len(group))
                continue
            if not campaign.active:  # dispatch records each as skipped with the campaign's state
                for row in group:
                    decided.release(row)
                continue
            account = settings.get(group[0].account_id, accounts_pb.AccountSettings())
            for row in await self._throttle(session, campaign, account, group, decided):
                cap = _cap(campaign, account)
                if cap is None:
                    decided.release(row)
                else:
                    send = frequency.Send(
                        row.account_id, campaign.kind.destination_type, row.user_id, row.zone, cap
                    )
                    capped.append((row, send))
        fits = await frequency.admit(session, [send for _, send in capped], now)
        for (row, _), ok in zip(capped, fits, strict=True):
            decided.release(row, None if ok else SkipReason.FREQUENCY_CAP)
        return decided

    async def _throttle(
        self,
        session: AsyncSession,
        campaign: _Campaign,
        account: accounts_pb.AccountSettings,
        group: list[Any],
        decided: _Round,
    ) -> list[Any]:
        """The rows of one campaign that may go now: past their cut-off ones are skipped, and
        under a throttle those beyond the window's budget wait for the next window."""
        now = decided.now
        limit = account.throttle_per_five_minutes if campaign.rules.throttle else 0
        window = throttle_window(now)
        following = window + timedelta(seconds=THROTTLE_WINDOW_SECONDS)
        budget = len(group)
        if limit > 0:
            used = await session.scalar(
                _THROTTLE_TAKE,
                {"account_id": group[0].account_id, "campaign": campaign.campaign.name, "window": window},
            )
            budget = max(limit - int(used or 0), 0)
        going: list[Any] = []
        for row in group:
            if row.cutoff_at is not None and now >= row.cutoff_at:
                decided.release(row, SkipReason.THROTTLED_CUTOFF if row.throttled else SkipReason.CUTOFF)
            elif len(going) < budget:
                going.append(row)
            elif row.cutoff_at is not None and following >= row.cutoff_at:
                decided.release(row, SkipReason.THROTTLED_CUTOFF)
            else:
                decided.deferred[following].append(row)
        if limit > 0 and going:
            await session.execute(
                _THROTTLE_USE, {"n": len(going), "campaign": campaign.campaign.name, "window": window}
            )
        return going

    async def _hand_over(self, session: AsyncSession, decided: _Round) -> None:
        for until, rows in decided.deferred.items():
            await session.execute(
                _DEFER,
                {"until": until, "runs": [r.run_id for r in rows], "ids": [r.delivery_id for r in rows]},
            )
        if not decided.forget:
            return
        await session.execute(
            _FORGET,
            {"runs": [r.run_id for r in decided.forget], "ids": [r.delivery_id for r in decided.forget]},
        )
        first = {r.run_id: r for r in decided.forget}
        known = await self._campaigns(session, {r.campaign for r in first.values()})
        queued: list[OutboxEvent] = []
        for run_id, recipients in decided.released.items():
            row = first[run_id]
            campaign = known[row.campaign]
            queued += delivery_batches(
                self.subjects,
                campaign.campaign,
                campaign.version,
                run_id,
                row.account_id,
                recipients,
                decided.now,
            )
        await enqueue(session, outbox, queued)
        counted = (
            await session.execute(
                _COUNT,
                {
                    "now": decided.now,
                    "releasing": _RELEASING,
                    "dispatched": _DISPATCHED,
                    "runs": list(decided.released),
                    "counts": [len(r) for r in decided.released.values()],
                    "late": [decided.lateness(run_id) for run_id in decided.released],
                },
            )
        ).all()
        await self.run_events.changed(session, counted)

    async def _campaigns(self, session: AsyncSession, names: set[str]) -> dict[str, _Campaign]:
        rows = await session.execute(
            sa.select(campaigns.c.name, campaigns.c.snapshot, campaigns.c.version, campaigns.c.state).where(
                campaigns.c.name.in_(names)
            )
        )
        found = {}
        for row in rows:
            campaign = campaign_pb.Campaign.FromString(row.snapshot)
            found[row.name] = _Campaign(
                campaign=campaign,
                version=row.version,
                active=row.state in _ACTIVE,
                rules=DeliveryRules.of(campaign),
                kind=channels.of_campaign(campaign),
            )
        return found

    async def _settings(
        self, session: AsyncSession, account_ids: set[uuid.UUID]
    ) -> dict[uuid.UUID, accounts_pb.AccountSettings]:
        rows = await session.execute(
            sa.select(accounts.c.account_id, accounts.c.settings).where(
                accounts.c.account_id.in_(account_ids)
            )
        )
        return {r.account_id: accounts_pb.AccountSettings.FromString(r.settings) for r in rows}

    async def _sweep(self, session: AsyncSession, now: datetime) -> None:
        """Once a day, drops frequency counts and throttle windows that no longer matter."""
        if self._swept == now.date():
            return
        self._swept = now.date()
        await frequency.forget_expired(session, now.date())
        await session.execute(
            sa.text("DELETE FROM scheduler.throttle_windows WHERE window_start < :before"),
            {"before": now - timedelta(days=1)},
        )


def _cap(campaign: _Campaign, account: accounts_pb.AccountSettings) -> frequency.Cap | None:
    """The account's cap on the campaign's channel, unless the campaign opts out."""
    if not campaign.rules.frequency_caps:
        return None
    for cap in account.frequency_caps:
        if cap.channel == campaign.kind.cap_channel:
            return frequency.Cap(per_day=cap.per_day, per_week=cap.per_week)
    return None
