"""Live campaigns: users qualify as they act, or as a wait runs out, and each qualification
becomes one delivery, planned like a run's.

Segmentation matches arriving events against the live triggers (LiveMatches). Here:
- an action trigger's match qualifies the user at the event's time;
- an inaction trigger's starting event becomes a timer (a row in `live_timers`), which its awaited
  event deletes; an awaited event is also kept for the lateness allowance, so a starting event
  that arrives after it, though it happened before, starts no wait;
- a date-property trigger's event becomes a timer at the moment the date asks for.
Timers are rows fired by whichever replica locks them when due (SKIP LOCKED): millions can wait,
a restart loses none, and two replicas never fire one twice.

A qualification is recorded once per (campaign, trigger occurrence) in `live_fires`, with what
became of it, in the transaction that plans its delivery: a replayed event or a re-fired timer
finds its row and does nothing. Decisions for one campaign take turns across replicas (an
advisory lock per campaign), so its frequency and limits hold exactly. A delivery's id follows
from (run, user, occurrence) and it waits in `pending_deliveries`, where the releaser applies
the throttle and the account's frequency caps as for any run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
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
from herald_common import api, channels
from herald_common.auth import account_id_of, act_as, current_account_id, service_caller
from herald_common.bus import Subjects
from herald_common.db import Database, text_in
from herald_common.errors import NotFound, Validator
from herald_common.faults import NotReady
from herald_common.live import ALREADY_ONCE, NOT_IN_AUDIENCE, as_action, too_recent
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.metrics import Metrics
from herald_common.outbox import enqueue
from herald_common.schedules import DeliveryRules, account_zone, parse_time_of_day
from herald_common.skips import SkipReason
from herald_common.timing import in_control_group, local_instant, parse_datetime, zone_named
from herald_scheduler.due import RunTiming
from herald_scheduler.executor import Held, hold, recipient_of
from herald_scheduler.handover import delivery_batches
from herald_scheduler.limits import RunLimits
from herald_scheduler.planning import accounts_settings, drop_waits
from herald_scheduler.release import released_at_once
from herald_scheduler.runs import RunEvents
from herald_scheduler.storage import (
    campaigns,
    live_awaited,
    live_fires,
    live_timers,
    live_users,
    outbox,
    runs,
)

log = get_logger(__name__)
RunState = pb.RunState
LIVE = RunState.Name(RunState.RUN_STATE_LIVE)
# How long an awaited event is kept: segmentation drops events later than this (its lateness
# allowance), so a starting event older than a kept awaited one cannot still arrive.
AWAITED_KEPT = timedelta(minutes=10)
TIMERS_PER_ROUND = 500
# The timer loop sleeps until the next timer fires (or a live run ends), and looks by itself this
# often too, for timers another replica started.
TIMER_POLL_SECONDS = 2.0
# The next moment a timer fires or a live run ends, after :now.
_NEXT_DUE = sa.text(
    """
    SELECT least(
        (SELECT min(fire_at) FROM scheduler.live_timers WHERE fire_at > :now),
        (SELECT min(ends_at) FROM scheduler.runs WHERE state = :live AND ends_at > :now)
    )
    """
)
MATCH_USERS_BATCH = 1000
MATCH_USERS_CONCURRENCY = 4
_ACTIVE = {
    campaign_pb.State.Name(campaign_pb.STATE_SCHEDULED),
    campaign_pb.State.Name(campaign_pb.STATE_RUNNING),
}
_RELEASING = RunState.Name(RunState.RUN_STATE_RELEASING)
_DISPATCHED = RunState.Name(RunState.RUN_STATE_DISPATCHED)
_UNITS = {
    campaign_pb.OFFSET_UNIT_MINUTES: timedelta(minutes=1),
    campaign_pb.OFFSET_UNIT_HOURS: timedelta(hours=1),
}


@dataclass(frozen=True)
class Fire:
    """A user qualifying for a live campaign once."""

    campaign: str
    occurrence: str  # the client id of the event behind it
    user_id: str
    event_name: str
    event_time: datetime
    at: datetime  # when they qualified: the event's time, or the moment a wait ran out
    via: str  # 'event' or 'timer'
    skip: SkipReason | None = None  # recorded as skipped without further checks


@dataclass(frozen=True)
class _Live:
    """A live campaign that is on, with its run."""

    campaign: campaign_pb.Campaign
    version: int
    account_id: uuid.UUID
    run_id: uuid.UUID
    settings: accounts_pb.AccountSettings

    @cached_property  # read for every match: a page trigger is converted once
    def trigger(self) -> campaign_pb.LiveTrigger:
        return as_action(self.campaign.schedule.live.trigger)


def delivery_id(run_id: uuid.UUID, user_id: str, occurrence: str) -> str:
    return api.stable_id(run_id, f"{user_id}\n{occurrence}")


def date_moment(trigger: campaign_pb.DatePropertyTrigger, value: Any, zone: Any) -> datetime | None:
    """When a date-property trigger qualifies the user for the date `value` (None: not a date).
    With days, the date is the one written in the value (in its own offset), and the moment is
    `time_of_day` on the day `offset` days from it, in the user's zone."""
    parsed = parse_datetime(value) if isinstance(value, str) else None
    if parsed is None:
        return None
    if trigger.unit == campaign_pb.OFFSET_UNIT_DAYS:
        at = parse_time_of_day(trigger.time_of_day)
        assert at is not None  # checked when the campaign was saved
        return local_instant(parsed.date() + timedelta(days=trigger.offset), at, zone)
    return parsed + trigger.offset * _UNITS[trigger.unit]


# Awaited events end the waits they fall in (of their match value, where the trigger has one).
_END_WAITS = sa.text(
    """
    DELETE FROM scheduler.live_timers t
    USING unnest(CAST(:campaigns AS text[]), CAST(:users AS text[]), CAST(:times AS timestamptz[]),
                 CAST(:values AS text[]), CAST(:matched AS boolean[]))
         AS b(campaign, user_id, at, value, matched)
    WHERE t.campaign = b.campaign AND t.user_id = b.user_id AND t.event_time <= b.at AND t.fire_at >= b.at
      AND (NOT b.matched OR t.match_value = b.value)
    """
)
_KEEP_AWAITED = sa.text(
    """
    INSERT INTO scheduler.live_awaited
        (campaign, user_id, occurrence, account_id, match_value, event_time, expires_at)
    SELECT * FROM unnest(CAST(:campaigns AS text[]), CAST(:users AS text[]), CAST(:occurrences AS text[]),
                         CAST(:accounts AS uuid[]), CAST(:values AS text[]), CAST(:times AS timestamptz[]),
                         CAST(:expires AS timestamptz[]))
    ON CONFLICT DO NOTHING
    """
)
# Waits start unless (for an inaction) an awaited event of theirs already came inside the window.
_START_WAITS = sa.text(
    """
    INSERT INTO scheduler.live_timers
        (campaign, occurrence, account_id, run_id, user_id, fire_at, event_name, event_time, match_value)
    SELECT s.campaign, s.occurrence, s.account_id, s.run_id, s.user_id, s.fire_at, s.event_name, s.event_time,
           s.match_value
    FROM unnest(CAST(:campaigns AS text[]), CAST(:occurrences AS text[]), CAST(:accounts AS uuid[]),
                CAST(:runs AS uuid[]), CAST(:users AS text[]), CAST(:fire AS timestamptz[]),
                CAST(:names AS text[]), CAST(:times AS timestamptz[]), CAST(:values AS text[]),
                CAST(:awaits AS boolean[]), CAST(:matched AS boolean[]))
         AS s(campaign, occurrence, account_id, run_id, user_id, fire_at, event_name, event_time, match_value,
              awaits, matched)
    WHERE NOT (s.awaits AND EXISTS (
        SELECT 1 FROM scheduler.live_awaited a
        WHERE a.campaign = s.campaign AND a.user_id = s.user_id
          AND a.event_time >= s.event_time AND a.event_time <= s.fire_at
          AND (NOT s.matched OR a.match_value = s.match_value)))
    ON CONFLICT DO NOTHING
    """
)


# The occurrences not acted on before, recorded as acted on (what became of each follows).
_FIRED_BEFORE = sa.text(
    """
    SELECT occurrence FROM scheduler.live_fires
    WHERE campaign = :campaign AND occurrence = ANY(CAST(:occurrences AS text[]))
    """
)
# Written once the decisions are made, under the campaign's lock (so no other replica wrote
# these occurrences since _FIRED_BEFORE read them).
_FIRED = sa.text(
    """
    INSERT INTO scheduler.live_fires
        (campaign, occurrence, account_id, run_id, user_id, fired_at, event_name, event_time, via,
         delivery_id, outcome)
    SELECT :campaign, o, :account_id, :run_id, u, :now, n, t, v, d, r
    FROM unnest(CAST(:occurrences AS text[]), CAST(:users AS text[]), CAST(:names AS text[]),
                CAST(:times AS timestamptz[]), CAST(:via AS text[]), CAST(:deliveries AS text[]),
                CAST(:reasons AS text[])) AS f(o, u, n, t, v, d, r)
    ON CONFLICT DO NOTHING
    """
)
_SENT_TO = sa.text(
    """
    INSERT INTO scheduler.live_users AS u (campaign, user_id, account_id, last_at)
    SELECT :campaign, s.user_id, :account_id, s.at
    FROM unnest(CAST(:users AS text[]), CAST(:times AS timestamptz[])) AS s(user_id, at)
    ON CONFLICT (campaign, user_id) DO UPDATE SET last_at = excluded.last_at
    """
)


@dataclass
class _Plan:
    """What a batch of matches asks for, gathered to be written set by set."""

    now: datetime
    fires: list[Fire] = field(default_factory=list)
    awaited: list[tuple[_Live, events.LiveMatch, datetime]] = field(default_factory=list)
    waits: list[tuple[_Live, events.LiveMatch, datetime, datetime, bool]] = field(default_factory=list)

    def add(self, on: _Live, match: events.LiveMatch, zones: dict[tuple[uuid.UUID, str], str]) -> None:
        event_time = api.from_timestamp(match.event_time)
        trigger = on.trigger
        kind = trigger.WhichOneof("kind")
        if match.role == events.LIVE_ROLE_AWAITED:
            self.awaited.append((on, match, event_time))
            return
        fire = Fire(
            on.campaign.name,
            match.client_event_id,
            match.user_id,
            match.event_name,
            event_time,
            event_time,
            "event",
        )
        if kind == "action":
            self.fires.append(fire)
        elif kind == "inaction":
            self.waits.append(
                (on, match, event_time, event_time + trigger.inaction.within.ToTimedelta(), True)
            )
        elif kind == "date_property":
            value = json.loads(match.date_value) if match.date_value else None
            zone = zone_named(zones.get((on.account_id, match.user_id), "")) or account_zone(on.settings)
            moment = date_moment(trigger.date_property, value, zone)
            if moment is None:
                self.fires.append(dataclasses.replace(fire, skip=SkipReason.MALFORMED_DATE))
            elif moment <= self.now:
                self.fires.append(dataclasses.replace(fire, at=moment, skip=SkipReason.DATE_PASSED))
            else:
                self.waits.append((on, match, event_time, moment, False))

    async def write(self, session: AsyncSession) -> None:
        if self.awaited:
            rows = self.awaited
            common = {
                "campaigns": [on.campaign.name for on, _, _ in rows],
                "users": [m.user_id for _, m, _ in rows],
                "times": [at for _, _, at in rows],
                "values": [m.match_value for _, m, _ in rows],
            }
            matched = [bool(on.trigger.inaction.match_property) for on, _, _ in rows]
            await session.execute(_END_WAITS, {**common, "matched": matched})
            await session.execute(
                _KEEP_AWAITED,
                {
                    **common,
                    "occurrences": [m.client_event_id for _, m, _ in rows],
                    "accounts": [on.account_id for on, _, _ in rows],
                    "expires": [max(self.now, at) + AWAITED_KEPT for _, _, at in rows],
                },
            )
        if self.waits:
            rows_ = self.waits
            await session.execute(
                _START_WAITS,
                {
                    "campaigns": [on.campaign.name for on, *_ in rows_],
                    "occurrences": [m.client_event_id for _, m, *_ in rows_],
                    "accounts": [on.account_id for on, *_ in rows_],
                    "runs": [on.run_id for on, *_ in rows_],
                    "users": [m.user_id for _, m, *_ in rows_],
                    "fire": [fire_at for *_, fire_at, _ in rows_],
                    "names": [m.event_name for _, m, *_ in rows_],
                    "times": [at for _, _, at, _, _ in rows_],
                    "values": [m.match_value for _, m, *_ in rows_],
                    "awaits": [awaits for *_, awaits in rows_],
                    "matched": [bool(on.trigger.inaction.match_property) for on, *_ in rows_],
                },
            )


class LiveEngine:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        run_events: RunEvents,
        segmentation: grpc.aio.Channel,
        notify_outbox: Callable[[], None],
        notify_releaser: Callable[[], None],
        poll_seconds: float = TIMER_POLL_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.database = database
        self.subjects = subjects
        self.run_events = run_events
        self.audiences = segmentation_grpc.SegmentationServiceStub(segmentation)
        self.notify_outbox = notify_outbox
        self.notify_releaser = notify_releaser
        self.loop = WakeableLoop("live-timers", self.fire_due, poll_seconds)

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    # --- events --------------------------------------------------------------------------------

    async def apply_matches(self, published: Sequence[events.LiveMatches]) -> None:
        """Acts on matched events: ends the waits awaited events fall in, starts waits (unless an
        awaited event already came in the window) and qualifies users, each kind as one statement
        for the whole batch, so the order the events arrived in inside it does not matter."""
        matches = [(account_id_of(p.account), m) for p in published for m in p.matches]
        now = api.utcnow()
        async with self.database.transaction() as session:
            live = await self._live(session, {m.campaign for _, m in matches})
            await _versions_applied(session, [m for _, m in matches], live)
            # Not live (ended, stopped) or not the account's: nothing to do.
            mine = [
                m
                for account_id, m in matches
                if m.campaign in live and live[m.campaign].account_id == account_id
            ]
            zones = await self._zones(mine, live)
            plan = _Plan(now)
            for match in mine:
                plan.add(live[match.campaign], match, zones)
            await plan.write(session)
            await self._fire(session, live, plan.fires)
        self.notify_outbox()
        self.notify_releaser()
        if plan.waits:  # timers started: the timer loop wakes for the first of them
            self.loop.due_at(min(until for _, _, _, until, _ in plan.waits))

    async def _zones(
        self, matches: list[events.LiveMatch], live: dict[str, _Live]
    ) -> dict[tuple[uuid.UUID, str], str]:
        """The time zones of the users whose date triggers count in days."""
        wanted: dict[uuid.UUID, set[str]] = defaultdict(set)
        for match in matches:
            on = live[match.campaign]
            dated = on.trigger.date_property
            if (
                on.trigger.WhichOneof("kind") == "date_property"
                and dated.unit == campaign_pb.OFFSET_UNIT_DAYS
            ):
                wanted[on.account_id].add(match.user_id)
        zones = {}
        for account_id, users in wanted.items():
            for member in await self._match_users(account_id, sorted(users), None, None, []):
                zones[(account_id, member.user_id)] = member.timezone
        return zones

    # --- timers --------------------------------------------------------------------------------

    async def fire_due(self) -> bool:
        """Fires the timers that are due, oldest first; True when more may be due already."""
        now = api.utcnow()
        async with self.database.transaction() as session:
            due = (
                await session.execute(
                    sa.select(live_timers)
                    .where(live_timers.c.fire_at <= now)
                    .order_by(live_timers.c.fire_at)
                    .limit(TIMERS_PER_ROUND)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not due:
                await self._end_runs(session, now)
                await session.execute(sa.delete(live_awaited).where(live_awaited.c.expires_at < now))
                next_due = await session.scalar(_NEXT_DUE, {"now": now, "live": LIVE})
                if next_due is not None:
                    self.loop.due_at(next_due)
                return False
            live = await self._live(session, {row.campaign for row in due})
            fires = [
                Fire(
                    row.campaign,
                    row.occurrence,
                    row.user_id,
                    row.event_name,
                    row.event_time,
                    row.fire_at,
                    "timer",
                )
                for row in due
                if row.campaign in live
            ]
            await self._fire(session, live, fires)
            await session.execute(
                sa.delete(live_timers).where(
                    sa.tuple_(live_timers.c.campaign, live_timers.c.occurrence).in_(
                        [(row.campaign, row.occurrence) for row in due]
                    )
                )
            )
        if self.metrics is not None:
            for row in due:
                self.metrics.live_timer_lateness.observe(max(0.0, (now - row.fire_at).total_seconds()))
        self.notify_outbox()
        self.notify_releaser()
        return len(due) == TIMERS_PER_ROUND

    async def _end_runs(self, session: AsyncSession, now: datetime) -> None:
        """Ends the live runs whose campaign's end time has come; their waits are dropped."""
        ended = (
            await session.execute(
                _finish(runs.c.state == LIVE, runs.c.ends_at <= now, now=now).returning(*runs.c)
            )
        ).all()
        if ended:
            await drop_waits(session, [row.campaign for row in ended])
            await self.run_events.changed(session, ended)

    # --- qualifying --------------------------------------------------------------------------

    async def _live(self, session: AsyncSession, names: set[str]) -> dict[str, _Live]:
        if not names:
            return {}
        rows = (
            await session.execute(
                sa.select(
                    campaigns.c.name,
                    campaigns.c.account_id,
                    campaigns.c.snapshot,
                    campaigns.c.version,
                    runs.c.id.label("run_id"),
                )
                .join(runs, sa.and_(runs.c.campaign == campaigns.c.name, runs.c.state == LIVE))
                .where(campaigns.c.name.in_(names), campaigns.c.state.in_(_ACTIVE))
            )
        ).all()
        settings = await accounts_settings(session, {row.account_id for row in rows})
        return {
            row.name: _Live(
                campaign_pb.Campaign.FromString(row.snapshot),
                row.version,
                row.account_id,
                row.run_id,
                settings[row.account_id],
            )
            for row in rows
        }

    async def _fire(self, session: AsyncSession, live: dict[str, _Live], fires: list[Fire]) -> None:
        """Decides each qualification, campaign by campaign (in name order, as every replica
        takes their locks), and plans its delivery or records why there is none."""
        by_campaign: dict[str, list[Fire]] = defaultdict(list)
        for fire in fires:
            by_campaign[fire.campaign].append(fire)
        members = await self._members(live, by_campaign)
        for name in sorted(by_campaign):
            await session.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"live:{name}"}
            )
            fresh = await self._not_fired_before(session, live[name], by_campaign[name])
            if fresh:
                await _Decision(self, session, live[name], fresh, members[name]).make()

    async def _members(
        self, live: dict[str, _Live], by_campaign: dict[str, list[Fire]]
    ) -> dict[str, dict[str, segmentation_pb.AudienceMember]]:
        """Who of the qualifying users each campaign's audience selects, with what a delivery
        needs: one MatchUsers call per audience (campaigns that share one share the call)."""
        asked: dict[tuple[Any, ...], tuple[_Live, set[str]]] = {}
        key_of: dict[str, tuple[Any, ...]] = {}
        for name, fired in by_campaign.items():
            on = live[name]
            kind = channels.of_campaign(on.campaign)
            keys = tuple(sorted(kind.attribute_keys(on.campaign)))
            key_of[name] = (
                on.account_id,
                on.campaign.audience.SerializeToString(),
                kind.audience_channel,
                keys,
            )
            asked.setdefault(key_of[name], (on, set()))[1].update(f.user_id for f in fired if f.skip is None)
        found: dict[tuple[Any, ...], dict[str, segmentation_pb.AudienceMember]] = {}
        for key, (on, users) in asked.items():
            members = await self._match_users(on.account_id, sorted(users), on.campaign, key[2], list(key[3]))
            found[key] = {m.user_id: m for m in members}
        return {name: found[key] for name, key in key_of.items()}

    async def _not_fired_before(self, session: AsyncSession, on: _Live, fires: list[Fire]) -> list[Fire]:
        """The occurrences not acted on before (the first of duplicates in the list)."""
        unique = list({f.occurrence: f for f in reversed(fires)}.values())[::-1]
        seen = set(
            await session.scalars(
                _FIRED_BEFORE,
                {"campaign": on.campaign.name, "occurrences": [f.occurrence for f in unique]},
            )
        )
        return [f for f in unique if f.occurrence not in seen]

    async def _match_users(
        self,
        account_id: uuid.UUID,
        user_ids: list[str],
        campaign: campaign_pb.Campaign | None,
        channel: int | None,
        attribute_keys: list[str],
    ) -> list[segmentation_pb.AudienceMember]:
        """The users the campaign's audience selects now (every user without one), with what a
        delivery needs, a thousand per call."""
        act_as(service_caller(account_id))
        slots = asyncio.Semaphore(MATCH_USERS_CONCURRENCY)

        async def chunk(start: int) -> list[segmentation_pb.AudienceMember]:
            request = segmentation_pb.MatchUsersRequest(
                user_ids=user_ids[start : start + MATCH_USERS_BATCH],
                channel=channel or segmentation_pb.CHANNEL_UNSPECIFIED,  # type: ignore[arg-type]
                attribute_keys=attribute_keys,
            )
            if campaign is not None and campaign.HasField("audience"):
                request.audience.ParseFromString(campaign.audience.SerializeToString())
            async with slots:
                return list((await self.audiences.MatchUsers(request, timeout=30)).members)

        pages = await asyncio.gather(*(chunk(start) for start in range(0, len(user_ids), MATCH_USERS_BATCH)))
        return [member for page in pages for member in page]


class _Decision:
    """What becomes of one campaign's new qualifications, decided in event order."""

    def __init__(
        self,
        engine: LiveEngine,
        session: AsyncSession,
        on: _Live,
        fires: list[Fire],
        members: dict[str, segmentation_pb.AudienceMember],
    ) -> None:
        self.engine, self.session, self.on, self.fires, self.members = engine, session, on, fires, members
        self.kind = channels.of_campaign(on.campaign)
        self.outcomes: dict[str, tuple[str | None, str]] = {}  # occurrence -> (delivery id, outcome)
        self.skipped: list[events.Recipient] = []
        self.held = Held()
        # Due already, with no rule left for hand-over time: straight to dispatch.
        self.going: list[events.Recipient] = []
        self.at_once = released_at_once(DeliveryRules.of(on.campaign), self.kind, on.settings)
        self.now = api.utcnow()

    async def make(self) -> None:
        on, fires = self.on, sorted(self.fires, key=lambda f: f.at)
        checked = [f for f in fires if f.skip is None]
        members = self.members
        last_sent = await self._last_sent({f.user_id for f in checked})
        limits = RunLimits(on.campaign.targeting, on.settings)
        await limits.load(self.session, on.run_id)
        sent_at: dict[str, datetime] = {}
        for fire in fires:
            if fire.skip is not None:
                self._skip(fire, fire.skip)
                continue
            member = members.get(fire.user_id)
            if member is None:
                self.outcomes[fire.occurrence] = (None, NOT_IN_AUDIENCE)
                continue
            repeat = self._too_soon(fire, last_sent.get(fire.user_id))
            if repeat:
                self.outcomes[fire.occurrence] = (None, repeat)
                continue
            if member.unreachable:
                self._skip(fire, SkipReason.NOT_REACHABLE, member)
                continue
            last_sent[fire.user_id] = sent_at[fire.user_id] = fire.at
            if in_control_group(on.campaign.name, fire.user_id, on.campaign.targeting.control_group_percent):
                self._skip(fire, SkipReason.CONTROL_GROUP, member)
            elif not limits.take(fire.at):
                self._skip(fire, SkipReason.LIVE_LIMIT, member)
            else:
                self._plan(fire, member)
        await self._record(sent_at, limits)

    def _too_soon(self, fire: Fire, last: datetime | None) -> str:
        """Why the campaign's frequency holds this qualification back ('' when it does not)."""
        frequency = self.on.campaign.schedule.live.frequency
        rule = frequency.WhichOneof("rule")
        if last is None or rule in (None, "every_time"):
            return ""
        if rule == "once":
            return ALREADY_ONCE
        every = frequency.at_most_every.ToTimedelta()
        return too_recent(every) if fire.at - last < every else ""

    def _recipient(self, fire: Fire, member: segmentation_pb.AudienceMember | None) -> events.Recipient:
        delivery = delivery_id(self.on.run_id, fire.user_id, fire.occurrence)
        if member is None:  # skipped before the audience was asked (a date that passed)
            return events.Recipient(delivery_id=delivery, user_id=fire.user_id)
        return recipient_of(delivery, member)

    def _skip(
        self, fire: Fire, reason: SkipReason, member: segmentation_pb.AudienceMember | None = None
    ) -> None:
        recipient = self._recipient(fire, member)
        recipient.skip_reason = reason
        self.skipped.append(recipient)
        self.outcomes[fire.occurrence] = (recipient.delivery_id, str(reason))

    def _plan(self, fire: Fire, member: segmentation_pb.AudienceMember) -> None:
        live = self.on.campaign.schedule.live
        planned = fire.at + live.delay.ToTimedelta()
        due = RunTiming(self.on.campaign, planned, self.on.settings).of(member.timezone)
        if due.skip is not None:
            self._skip(fire, due.skip, member)
            return
        delivery = delivery_id(self.on.run_id, fire.user_id, fire.occurrence)
        if self.at_once and due.at <= self.now:
            self.going.append(recipient_of(delivery, member))
        else:
            self.held.add(due, delivery, member)
        self.outcomes[fire.occurrence] = (delivery, "")

    async def _last_sent(self, users: set[str]) -> dict[str, datetime]:
        if not users or self.on.campaign.schedule.live.frequency.WhichOneof("rule") in (None, "every_time"):
            return {}
        rows = await self.session.execute(
            sa.select(live_users.c.user_id, live_users.c.last_at).where(
                live_users.c.campaign == self.on.campaign.name,
                text_in(live_users.c.user_id, sorted(users)),
            )
        )
        return {row.user_id: row.last_at for row in rows}

    async def _record(self, sent_at: dict[str, datetime], limits: RunLimits) -> None:
        session, on = self.session, self.on
        name = on.campaign.name
        if sent_at and on.campaign.schedule.live.frequency.WhichOneof("rule") not in (None, "every_time"):
            await session.execute(
                _SENT_TO,
                {
                    "campaign": name,
                    "account_id": on.account_id,
                    "users": list(sent_at),
                    "times": list(sent_at.values()),
                },
            )
        await limits.save(session, on.run_id, on.account_id)
        await session.execute(
            _FIRED,
            {
                "campaign": name,
                "account_id": on.account_id,
                "run_id": on.run_id,
                "now": self.now,
                "occurrences": [f.occurrence for f in self.fires],
                "users": [f.user_id for f in self.fires],
                "names": [f.event_name for f in self.fires],
                "times": [f.event_time for f in self.fires],
                "via": [f.via for f in self.fires],
                "deliveries": [self.outcomes[f.occurrence][0] for f in self.fires],
                "reasons": [self.outcomes[f.occurrence][1] for f in self.fires],
            },
        )
        handed = self.skipped + self.going
        targeted = len(handed) + len(self.held)
        if not targeted:
            return
        if self.held:
            await hold(session, on.run_id, on.account_id, name, self.held)
        if handed:
            await enqueue(
                session,
                outbox,
                delivery_batches(
                    self.engine.subjects, on.campaign, on.version, on.run_id, on.account_id, handed, self.now
                ),
            )
        counted = (
            await session.execute(
                sa.update(runs)
                .where(runs.c.id == on.run_id)
                .values(
                    targeted=runs.c.targeted + targeted,
                    audience_size=runs.c.audience_size + targeted,
                    waiting=runs.c.waiting + len(self.held),
                    released=runs.c.released + len(handed),
                    first_release_at=sa.func.coalesce(runs.c.first_release_at, self.now)
                    if handed
                    else runs.c.first_release_at,
                    last_release_at=self.now if handed else runs.c.last_release_at,
                    version=runs.c.version + 1,
                )
                .returning(*runs.c)
            )
        ).all()
        if limits.exhausted:
            counted = (
                await session.execute(
                    _finish(runs.c.id == on.run_id, runs.c.state == LIVE, now=api.utcnow()).returning(*runs.c)
                )
            ).all() or counted
            await drop_waits(session, [name])
        await self.engine.run_events.changed(session, counted)


def _finish(*where: Any, now: datetime) -> Any:
    """Ends runs: RELEASING while deliveries still wait, else DISPATCHED."""
    return (
        sa.update(runs)
        .where(*where)
        .values(
            state=sa.case((runs.c.waiting > 0, _RELEASING), else_=_DISPATCHED),
            ended_at=sa.case((runs.c.waiting > 0, None), else_=now),
            version=runs.c.version + 1,
        )
    )


async def _versions_applied(
    session: AsyncSession, matches: list[events.LiveMatch], live: dict[str, _Live]
) -> None:
    """Raises NotReady (the matches come again shortly) while a match is of a campaign version
    this scheduler has not applied yet: segmentation follows CampaignChanged on its own and may be
    ahead, and a match dropped as "not live" then would be a message lost."""
    wanted: dict[str, int] = {}
    for match in matches:
        on = live.get(match.campaign)
        if on is None or on.version < match.campaign_version:
            wanted[match.campaign] = max(wanted.get(match.campaign, 0), match.campaign_version)
    if not wanted:
        return
    applied = await session.execute(
        sa.select(campaigns.c.name, campaigns.c.version).where(campaigns.c.name.in_(wanted))
    )
    held = {name: version for name, version in applied.all()}
    behind = sorted(name for name, version in wanted.items() if held.get(name, 0) < version)
    if behind:
        raise NotReady(f"changes of {', '.join(behind[:3])} not applied yet")


async def qualifications(
    database: Database, campaign: str, user_id: str, page_size: int
) -> tuple[list[pb.Qualification], list[pb.LiveWait]]:
    """The caller's user's qualifications for a live campaign, newest first, and their waits."""
    api.parse_uuid_name(campaign, "campaigns", "campaign")
    check = Validator()
    check.require(api.is_valid_id(user_id), "user_id", "required: 1-200 letters, digits or ._:@+-")
    check.require(0 <= page_size <= 1000, "page_size", "0 (50) to 1,000")
    check.raise_if_any()
    account_id = current_account_id()
    async with database.transaction() as session:
        owned = await session.scalar(
            sa.select(campaigns.c.name).where(
                campaigns.c.name == campaign, campaigns.c.account_id == account_id
            )
        )
        if owned is None:
            raise NotFound(campaign, "campaign")
        fired = (
            await session.execute(
                sa.select(live_fires)
                .where(
                    live_fires.c.campaign == campaign,
                    live_fires.c.user_id == user_id,
                    live_fires.c.account_id == account_id,
                )
                .order_by(live_fires.c.fired_at.desc(), live_fires.c.event_time.desc())
                .limit(page_size or 50)
            )
        ).all()
        waiting = (
            await session.execute(
                sa.select(live_timers)
                .where(
                    live_timers.c.campaign == campaign,
                    live_timers.c.user_id == user_id,
                    live_timers.c.account_id == account_id,
                )
                .order_by(live_timers.c.fire_at)
                .limit(1000)
            )
        ).all()
    return (
        [
            pb.Qualification(
                event_name=row.event_name,
                client_event_id=row.occurrence,
                event_time=api.timestamp(row.event_time),
                via=row.via,
                qualify_time=api.timestamp(row.fired_at),
                delivery_id=row.delivery_id or "",
                outcome=row.outcome,
            )
            for row in fired
        ],
        [
            pb.LiveWait(
                event_name=row.event_name,
                client_event_id=row.occurrence,
                event_time=api.timestamp(row.event_time),
                fire_time=api.timestamp(row.fire_at),
            )
            for row in waiting
        ],
    )
