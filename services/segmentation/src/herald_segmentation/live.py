"""Live triggers: which arriving events the live campaigns watch for.

Segmentation keeps each live campaign's trigger (from CampaignChanged) and, in the transaction
that records a call's events, matches them: the event's name, its time (inside the campaign's
start and end, and not older than the lateness allowance) and its `where` tests, evaluated by
PostgreSQL exactly as a segment's event condition is. The matches go out as LiveMatches through
the same outbox as the events; the scheduler owns what follows (timers, limits, delivery).
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2
from herald_common import api
from herald_common.auth import account_id_of, account_name
from herald_common.bus import Subjects
from herald_common.db import Built, Database, Statement, Target
from herald_common.live import as_action
from herald_common.logging import get_logger
from herald_common.outbox import OutboxEvent, enqueue
from herald_segmentation.filters import EVENT_PROPERTIES, Context, event_where, reads_now
from herald_segmentation.properties import event_subject, known_types
from herald_segmentation.storage import SCHEMA, event_bodies, events, goals, live_triggers, outbox

log = get_logger(__name__)
# An event that arrives later than this after it happened is recorded but triggers nothing.
LATENESS_ALLOWANCE = timedelta(minutes=10)
_ACTIVE = {campaign_pb.STATE_SCHEDULED, campaign_pb.STATE_RUNNING}
TRIGGER, AWAITED = events_pb2.LIVE_ROLE_TRIGGER, events_pb2.LIVE_ROLE_AWAITED
GOAL = -1  # a campaign goal's event: a GoalEvent, not a LiveMatch
_ENDED = {campaign_pb.STATE_COMPLETED, campaign_pb.STATE_STOPPED, campaign_pb.STATE_FAILED}
# Events a new trigger or goal catches up on are read this many at a time.
CATCH_UP_PAGE = 1000

# Recording an account's events and keeping a new trigger or goal of it take turns: a call that
# read the account's triggers before the new one was kept has committed before the catch-up reads
# the events, and a call after it sees the new one. Calls share the turn among themselves.
_TURN = "1279874629, hashtext(CAST(CAST(:account_id AS uuid) AS text))"
LIVE_TURN_SHARED = f"pg_advisory_xact_lock_shared({_TURN})"
_LIVE_TURN = sa.text(f"SELECT pg_advisory_xact_lock({_TURN})")


class Received(Protocol):
    """An event of the call being recorded, as events.py parsed it."""

    @property
    def client_id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def when(self) -> float: ...
    @property
    def values(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class _Recorded:
    """An event read back from the events table."""

    client_id: str
    user_id: str
    name: str
    when: float
    values: dict[str, Any]


@dataclass(frozen=True)
class _Watch:
    """One event a campaign's trigger watches for."""

    campaign: str
    version: int
    role: int
    event: campaign_pb.LiveEvent
    start: datetime
    end: datetime | None
    match_property: str
    date_property: str
    # An action trigger that needs an earlier event with the same value of a property.
    earlier: campaign_pb.ActionTrigger | None = None
    # A goal's: the property whose value is the conversion's revenue.
    revenue_property: str = ""

    # Read for every event a call records: worked out once.
    @functools.cached_property
    def starts(self) -> float:
        return self.start.timestamp()

    @functools.cached_property
    def ends(self) -> float:
        return self.end.timestamp() if self.end is not None else math.inf

    @property
    def key(self) -> tuple[str, int, int]:
        """Which watch this is: a campaign's version fixes its trigger and goal."""
        return self.campaign, self.version, self.role


_Kept = TypeVar("_Kept")


class _Recent(Generic[_Kept]):
    """The values made for the most recently used keys: what every call would otherwise rebuild
    from the same campaigns."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: OrderedDict[Hashable, _Kept] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], _Kept]) -> _Kept:
        if key in self.values:
            self.values.move_to_end(key)
            return self.values[key]
        value = self.values[key] = make()
        if len(self.values) > self.size:
            self.values.popitem(last=False)
        return value


# Parsed watches, by the spec row they come from.
_WATCHES: _Recent[list[_Watch]] = _Recent(1024)
# `where` statements, by the watches they test and the property types they were built for.
_WHERE_STATEMENTS: _Recent[Built] = _Recent(256)
# The candidates of a call as rows: one JSON document, one parameter, where arrays cost a check
# per item.
_CANDIDATES = (
    sa.func.jsonb_to_recordset(sa.cast(sa.bindparam("candidates", type_=sa.Text), JSONB))
    .table_valued(sa.column("k", sa.Integer), sa.column("properties", JSONB), sa.column("watch", sa.Integer))
    .render_derived(name="t", with_types=True)
)


def watches(
    campaign: str, version: int, trigger: campaign_pb.LiveTrigger, start: datetime, end: datetime | None
) -> list[_Watch]:
    trigger = as_action(trigger)
    kind = trigger.WhichOneof("kind")
    if kind == "action":
        earlier = trigger.action if trigger.action.HasField("earlier_event") else None
        return [_Watch(campaign, version, TRIGGER, trigger.action.event, start, end, "", "", earlier)]
    if kind == "inaction":
        inaction = trigger.inaction
        match = inaction.match_property
        return [
            _Watch(campaign, version, TRIGGER, inaction.event, start, end, match, ""),
            _Watch(campaign, version, AWAITED, inaction.awaited_event, start, end, match, ""),
        ]
    if kind == "date_property":
        dated = trigger.date_property
        return [_Watch(campaign, version, TRIGGER, dated.event, start, end, "", dated.date_property)]
    return []


def _seconds_and_nanos(seconds: float) -> tuple[int, int]:
    """A time as a Timestamp's fields."""
    return divmod(round(seconds * 1e9), 1_000_000_000)


def _text(value: Any) -> str:
    """A property value as PostgreSQL's `->>` gives it."""
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: Any) -> float:
    """A revenue value: a number, else 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


async def _keep_goal(
    session: AsyncSession, account_id: uuid.UUID, change: events_pb2.CampaignChanged
) -> list[_Watch]:
    """A published campaign's goal, matched from publishing until the conversion window after the
    campaign ended (its last message may convert until then). Answers its watch when the goal is
    new: the events recorded since publishing are still to be matched against it."""
    campaign = change.campaign
    ended = campaign.state in _ENDED
    end = (
        api.from_timestamp(change.occur_time) + campaign.goal.conversion_window.ToTimedelta()
        if ended
        else None
    )
    start = api.from_timestamp(campaign.publish_time)
    known = await _keep_newer(
        session,
        goals,
        campaign=campaign.name,
        account_id=account_id,
        version=change.version,
        goal=campaign.goal.SerializeToString(),
        start_at=start,
        end_at=end,
    )
    if known is not None:
        return []
    return [_goal_watch(campaign.name, change.version, campaign.goal, start, end)]


async def _keep_newer(session: AsyncSession, table: sa.Table, **row: Any) -> Any:
    """Writes a campaign's row unless the one kept is of the same or a newer version. Answers the
    row kept before (None when there was none), read under a lock so the answer stays true."""
    known = (
        await session.execute(sa.select(table).where(table.c.campaign == row["campaign"]).with_for_update())
    ).first()
    statement = insert(table).values(**row)
    kept = set(row) - {"campaign", "account_id"}
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.campaign],
            set_={c: statement.excluded[c] for c in kept},
            where=table.c.version < statement.excluded.version,
        )
    )
    return known


def _goal_watch(
    campaign: str, version: int, goal: campaign_pb.Goal, start: datetime, end: datetime | None
) -> _Watch:
    return _Watch(
        campaign,
        version,
        GOAL,
        goal.event,
        start,
        end,
        match_property="",
        date_property="",
        revenue_property=goal.revenue_property,
    )


async def _keep_trigger(
    session: AsyncSession, account_id: uuid.UUID, change: events_pb2.CampaignChanged
) -> list[_Watch]:
    """Keeps a live campaign's trigger. Answers its watches when it starts watching with this
    change (it was not kept, or not active): the events recorded since are still to be matched."""
    campaign = change.campaign
    live = campaign.schedule.live
    start = api.from_timestamp(live.start_time if live.HasField("start_time") else campaign.publish_time)
    end = api.from_timestamp(live.end_time) if live.HasField("end_time") else None
    active = campaign.state in _ACTIVE
    known = await _keep_newer(
        session,
        live_triggers,
        campaign=campaign.name,
        account_id=account_id,
        version=change.version,
        active=active,
        trigger=live.trigger.SerializeToString(),
        start_at=start,
        end_at=end,
    )
    if not active or (known is not None and (known.active or known.version >= change.version)):
        return []
    return watches(campaign.name, change.version, live.trigger, start, end)


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _watches_of(row: Any) -> list[_Watch]:
    """The watches of a row of _TRIGGERS_AND_GOALS."""
    if row.goal:
        goal = campaign_pb.Goal.FromString(row.spec)
        return [_goal_watch(row.campaign, row.version, goal, row.start_at, row.end_at)]
    trigger = campaign_pb.LiveTrigger.FromString(row.spec)
    return watches(row.campaign, row.version, trigger, row.start_at, row.end_at)


# The account's active triggers and goals, in one round trip: this runs for every call.
_TRIGGERS_AND_GOALS = Statement(
    f"""
    SELECT false AS goal, campaign, version, trigger AS spec, start_at, end_at
    FROM {SCHEMA}.live_triggers WHERE account_id = :account_id AND active
    UNION ALL
    SELECT true AS goal, campaign, version, goal AS spec, start_at, end_at
    FROM {SCHEMA}.goals
    WHERE account_id = :account_id AND (end_at IS NULL OR end_at > CAST(:since AS timestamptz))
    """
)


class LiveTriggers:
    def __init__(self, database: Database, subjects: Subjects, notify_outbox: Callable[[], None]) -> None:
        self.database = database
        self.subjects = subjects
        self.notify_outbox = notify_outbox

    async def apply_campaigns(self, changes: Sequence[events_pb2.CampaignChanged]) -> None:
        """Keeps each live campaign's trigger while it is published, and each published
        campaign's goal; newest version wins. A trigger that starts watching, and a new goal,
        first catch up on the events recorded since the change that started it: this change may
        arrive after them."""
        found: list[OutboxEvent] = []
        async with self.database.transaction() as session:
            for change in sorted(changes, key=lambda c: (c.campaign.name, c.version)):
                campaign = change.campaign
                account_id = account_id_of(change.account)
                if account_id is None:
                    continue
                if campaign.HasField("goal") and campaign.state != campaign_pb.STATE_DRAFT:
                    for goal in await _keep_goal(session, account_id, change):
                        found += await self._catch_up(session, account_id, [goal], goal.start)
                if campaign.schedule.WhichOneof("when") != "live":
                    continue
                started = await _keep_trigger(session, account_id, change)
                if started:
                    since = api.from_timestamp(change.occur_time)
                    found += await self._catch_up(session, account_id, started, since)
            await enqueue(session, outbox, found)
        if found:
            self.notify_outbox()

    async def _catch_up(
        self, session: AsyncSession, account_id: uuid.UUID, watching: list[_Watch], since: datetime
    ) -> list[OutboxEvent]:
        """The matches, against watches just kept, of the account's events recorded since `since`:
        the calls that recorded them could not match them yet. Read a page at a time; each event
        counts only if it was timely when it arrived, as in `match`."""
        await session.execute(_LIVE_TURN, {"account_id": account_id})
        names = {w.event.event_name for w in watching}
        statement = (
            sa.select(
                events.c.client_event_id,
                events.c.user_id,
                events.c.name,
                events.c.occurred_at,
                sa.func.coalesce(event_bodies.c.properties, events.c.properties).label("values"),
            )
            .outerjoin(
                event_bodies,
                sa.and_(
                    event_bodies.c.account_id == events.c.account_id,
                    event_bodies.c.client_event_id == events.c.client_event_id,
                ),
            )
            .where(
                events.c.account_id == account_id,
                events.c.received_at >= since,
                events.c.occurred_at >= min(w.start for w in watching),
                events.c.occurred_at >= events.c.received_at - LATENESS_ALLOWANCE,
                events.c.client_event_id.is_not(None),
                *([] if "" in names else [events.c.name.in_(names)]),
            )
            .order_by(events.c.occurred_at, events.c.client_event_id)
            .limit(CATCH_UP_PAGE)
        )
        found: list[OutboxEvent] = []
        page = statement
        while True:
            rows = (await session.execute(page)).all()
            recorded = [
                _Recorded(r.client_event_id, r.user_id, r.name, r.occurred_at.timestamp(), r.values)
                for r in rows
            ]
            found += await self._matched(session, account_id, recorded, watching, api.utcnow())
            if len(rows) < CATCH_UP_PAGE:
                return found
            last = rows[-1]
            key = sa.tuple_(events.c.occurred_at, events.c.client_event_id)
            page = statement.where(key > (last.occurred_at, last.client_event_id))

    async def match(
        self, target: Target, account_id: uuid.UUID, recorded: Sequence[Received], received: datetime
    ) -> list[OutboxEvent]:
        """The LiveMatches and GoalEvents of events just recorded (none when no live campaign
        watches them and no goal names them), in the recording transaction."""
        rows = await _TRIGGERS_AND_GOALS.fetch(
            target, account_id=account_id, since=received - LATENESS_ALLOWANCE
        )
        if not rows:
            return []
        watching = [w for row in rows for w in _WATCHES.get(tuple(row), functools.partial(_watches_of, row))]
        earliest = (received - LATENESS_ALLOWANCE).timestamp()
        timely = [e for e in recorded if e.when >= earliest]
        return await self._matched(target, account_id, timely, watching, received)

    async def _matched(
        self,
        target: Target,
        account_id: uuid.UUID,
        timely: Sequence[Received],
        watching: list[_Watch],
        received: datetime,
    ) -> list[OutboxEvent]:
        """The LiveMatches and GoalEvents of timely events against these watches."""
        by_name: dict[str, list[_Watch]] = defaultdict(list)
        for w in watching:
            by_name[w.event.event_name].append(w)  # "" watches any event
        any_event = by_name.get("", [])
        candidates = [
            (i, w)
            for i, e in enumerate(timely)
            for w in (by_name.get(e.name, []) + any_event if any_event else by_name.get(e.name, ()))
            if w.starts <= e.when < w.ends
        ]
        # In the order the events happened: the matches and goal events are published in it.
        candidates.sort(key=lambda c: timely[c[0]].when)
        if not candidates:
            return []
        passed = await self._where_holds(target, account_id, timely, candidates)
        needing = [k for k, ok in enumerate(passed) if ok and candidates[k][1].earlier is not None]
        if needing:
            held = await self._earlier_done(target, account_id, timely, candidates, needing)
            passed = [ok and (k in held or k not in needing) for k, ok in enumerate(passed)]
        # Built in place: a message made apart and then added would be copied.
        published = events_pb2.LiveMatches(
            event_id=str(uuid.uuid4()), account=account_name(account_id), receive_time=api.timestamp(received)
        )
        goal_events = events_pb2.GoalEvents(event_id=str(uuid.uuid4()), account=published.account)
        add_goal_event = goal_events.events.add
        for (i, w), ok in zip(candidates, passed, strict=True):
            if not ok:
                continue
            event = timely[i]
            seconds, nanos = _seconds_and_nanos(event.when)
            if w.role == GOAL:
                converting = add_goal_event(
                    campaign=w.campaign,
                    user_id=event.user_id,
                    client_event_id=event.client_id,
                    revenue=_number(event.values.get(w.revenue_property)) if w.revenue_property else 0.0,
                )
                at = converting.event_time  # each read of a sub-message makes a new wrapper
                at.seconds, at.nanos = seconds, nanos
                continue
            match = published.matches.add(
                campaign=w.campaign,
                campaign_version=w.version,
                user_id=event.user_id,
                client_event_id=event.client_id,
                event_name=event.name,
                role=w.role,
                match_value=_json(event.values.get(w.match_property)) if w.match_property else "",
                date_value=_json(event.values.get(w.date_property)) if w.date_property else "",
            )
            match.event_time.seconds, match.event_time.nanos = seconds, nanos
        found = []
        if published.matches:
            found.append(OutboxEvent.of(self.subjects.live_matches, published, published.event_id))
        if goal_events.events:
            found.append(OutboxEvent.of(self.subjects.goal_events, goal_events, goal_events.event_id))
        return found

    async def _earlier_done(
        self,
        target: Target,
        account_id: uuid.UUID,
        timely: Sequence[Received],
        candidates: list[tuple[int, _Watch]],
        needing: list[int],
    ) -> set[int]:
        """Which candidates' users did the trigger's earlier event, inside its window, with the
        same value of the constant property: an index lookup per user, one query per trigger."""
        held: set[int] = set()
        by_watch: dict[int, list[int]] = defaultdict(list)
        for k in needing:
            by_watch[id(candidates[k][1])].append(k)
        for ks in by_watch.values():
            action = candidates[ks[0]][1].earlier
            assert action is not None
            prop, earlier = action.constant_property, action.earlier_event
            ks = [k for k in ks if timely[candidates[k][0]].values.get(prop) is not None]
            if not ks:
                continue
            keys = {(event_subject(earlier.event_name), c.property) for c in earlier.where}
            ctx = Context(
                account_id=account_id, now=api.utcnow(), types=await known_types(target, account_id, keys)
            )
            rows = (
                sa.func.unnest(
                    sa.cast(sa.bindparam("ks"), ARRAY(sa.Integer)),
                    sa.cast(sa.bindparam("users"), ARRAY(sa.Text)),
                    sa.cast(sa.bindparam("times"), ARRAY(sa.Float)),
                    sa.cast(sa.bindparam("values"), ARRAY(sa.Text)),
                )
                .table_valued(
                    sa.column("k", sa.Integer),
                    sa.column("user_id", sa.Text),
                    sa.column("at", sa.Float),
                    sa.column("value", sa.Text),
                )
                .render_derived(name="c")
            )
            window = action.within.ToTimedelta().total_seconds()
            done = sa.exists(
                sa.select(1).where(
                    events.c.account_id == account_id,
                    events.c.user_id == rows.c.user_id,
                    events.c.name == earlier.event_name,
                    events.c.occurred_at >= sa.func.to_timestamp(rows.c.at - window),
                    events.c.occurred_at <= sa.func.to_timestamp(rows.c.at),
                    EVENT_PROPERTIES[prop].astext == rows.c.value,
                    event_where(earlier.where, EVENT_PROPERTIES, earlier.event_name, ctx),
                )
            )
            found = await Built(sa.select(rows.c.k).where(done)).fetch(
                target,
                ks=ks,
                users=[timely[candidates[k][0]].user_id for k in ks],
                times=[timely[candidates[k][0]].when for k in ks],
                values=[_text(timely[candidates[k][0]].values[prop]) for k in ks],
            )
            held |= {row[0] for row in found}
        return held

    async def _where_holds(
        self,
        target: Target,
        account_id: uuid.UUID,
        timely: Sequence[Received],
        candidates: list[tuple[int, _Watch]],
    ) -> list[bool]:
        """Whether each candidate's event passes its watch's `where` tests: one query for the call,
        one row per candidate, each tested by its own watch's conditions."""
        tested = [k for k, (_, w) in enumerate(candidates) if w.event.where]
        if not tested:
            return [True] * len(candidates)
        distinct = list({id(candidates[k][1]): candidates[k][1] for k in tested}.values())
        number = {id(w): n for n, w in enumerate(distinct)}
        keys = {(event_subject(w.event.event_name), c.property) for w in distinct for c in w.event.where}
        ctx = Context(
            account_id=account_id, now=api.utcnow(), types=await known_types(target, account_id, keys)
        )
        relative = any(reads_now(w.event.where) for w in distinct)
        types = tuple(sorted(ctx.types.items()))
        key = (tuple(w.key for w in distinct), types, ctx.now if relative else None)
        statement = _WHERE_STATEMENTS.get(key, functools.partial(_where_statement, distinct, ctx))
        found = await statement.fetch(
            target,
            candidates=orjson.dumps(
                [
                    {
                        "k": k,
                        "properties": timely[candidates[k][0]].values,
                        "watch": number[id(candidates[k][1])],
                    }
                    for k in tested
                ]
            ).decode(),
        )
        passed = {row[0] for row in found}
        needs = set(tested)
        return [k in passed or k not in needs for k in range(len(candidates))]


def _where_statement(distinct: list[_Watch], ctx: Context) -> Built:
    """The candidates (of _CANDIDATES) that pass their watch's `where` tests; watch n is the nth."""
    rows = _CANDIDATES
    holds = sa.case(
        *[
            (rows.c.watch == n, event_where(w.event.where, rows.c.properties, w.event.event_name, ctx))
            for n, w in enumerate(distinct)
        ],
        else_=sa.false(),
    )
    return Built(sa.select(rows.c.k).where(holds))
