"""Goals: which messages converted, and how a campaign did against its control group.

A delivery of a campaign with a goal is an exposure when it is sent, or held back from a control
user (then at the moment it would have been sent). Segmentation matches recorded events against
published goals (GoalEvents); each such event converts the user's most recent exposure of the
campaign before it, if that is within the conversion window and has not converted yet. So there
is one conversion per delivery: per user per run, or per trigger occurrence of a live campaign.

Exposures and goal events may arrive in either order (an outcome is recorded shortly after the
send, and the user may act first): an event without an exposure waits, and a new exposure takes
the waiting events of its user. An event is counted once, whichever copy of it arrives: a
conversion is recorded once per event of a campaign and once per exposure (`conversions`).

The counts in `campaign_stats` and `run_stats` change in the transactions that record the facts
they count, so they always equal what `exposures` and `conversions` hold.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_campaign.counts import add_campaign_counts, add_run_counts, tally
from herald_campaign.records import campaign_id_of
from herald_campaign.storage import SCHEMA, waiting_goal_events
from herald_common import api
from herald_common.auth import account_id_of
from herald_common.db import Database, Statement, Target
from herald_common.logging import get_logger
from herald_common.skips import SkipReason

log = get_logger(__name__)
# How long a goal event waits for the exposure it may follow: outcomes are recorded within
# seconds of the send, or, when dispatch is backed up, within this.
WAITING_FOR_EXPOSURE = timedelta(hours=1)
# Two-sided 95%.
Z_95 = 1.959963984540054


class _GoalEvent(NamedTuple):  # a tuple: made for every goal event, several times cheaper
    campaign_id: uuid.UUID
    account_id: uuid.UUID
    user_id: str
    client_id: str
    at: float  # seconds since the epoch, to the microsecond
    revenue: float


def _waiting_event(row: Any) -> _GoalEvent:
    """A goal event as it waits in waiting_goal_events."""
    return _GoalEvent(
        row.campaign_id,
        row.account_id,
        row.user_id,
        row.client_event_id,
        row.event_time.timestamp(),
        row.revenue,
    )


_SPECS = Statement(
    f"SELECT id, account_id, spec FROM {SCHEMA}.campaigns WHERE id = ANY(CAST(:ids AS uuid[]))"
)
_EXPOSE = Statement(
    f"""
    INSERT INTO {SCHEMA}.exposures (delivery_id, account_id, campaign_id, run, user_id, control, exposed_at)
    SELECT * FROM jsonb_to_recordset(CAST(:exposures AS jsonb))
        AS e(d text, a uuid, c uuid, r text, u text, x bool, t timestamptz)
    ON CONFLICT DO NOTHING
    RETURNING *
    """
)


async def _goals(target: Target, campaign_ids: set[uuid.UUID]) -> dict[uuid.UUID, tuple[uuid.UUID, pb.Goal]]:
    """The owner and goal of each of the campaigns that has a goal."""
    if not campaign_ids:
        return {}
    rows = await _SPECS.fetch(target, ids=sorted(campaign_ids))
    found = {}
    for row in rows:
        spec = pb.Campaign.FromString(row.spec)
        if spec.HasField("goal"):
            found[row.id] = (row.account_id, spec.goal)
    return found


async def record_exposures(target: Target, outcomes: Sequence[events.DeliveryOutcomes]) -> None:
    """The sent and control deliveries of campaigns with a goal (outcome events seen for the first
    time), and the waiting goal events they take."""
    goals = await _goals(target, {campaign_id_of(o.campaign) for o in outcomes})
    rows = []
    for outcome in outcomes:
        campaign_id = campaign_id_of(outcome.campaign)
        if campaign_id not in goals:
            continue
        at = api.from_timestamp(outcome.occur_time)
        for result in outcome.results:
            control = (
                result.status == events.DELIVERY_STATUS_SKIPPED and result.reason == SkipReason.CONTROL_GROUP
            )
            if result.status == events.DELIVERY_STATUS_SENT or control:
                rows.append(
                    {
                        "d": result.delivery_id,
                        "a": goals[campaign_id][0],
                        "c": campaign_id,
                        "r": outcome.run,
                        "u": result.user_id,
                        "x": control,
                        "t": at,
                    }
                )
    if not rows:
        return
    # default: asyncpg's own UUIDs, from the campaigns' rows
    added = await _EXPOSE.fetch(target, exposures=orjson.dumps(rows, default=str).decode())
    await _count(target, [(row, "goal_control" if row.control else "goal_sent", 1.0) for row in added])
    users = sorted({(row.campaign_id, row.user_id) for row in added})
    if users:
        campaign_ids, user_ids = [c for c, _ in users], [u for _, u in users]
        waiting = await _WAITING_OF.fetch(target, campaigns=campaign_ids, users=user_ids)
        found = [_waiting_event(w) for w in waiting]
        if found:
            await _attribute(target, goals, found, waiting=True)


async def _by_key_lookups(session: AsyncSession) -> None:
    """Goal events find their exposures one key at a time: the planner, estimating a batch's
    arrays small or exposures few, would otherwise hash the whole table for each batch."""
    await session.execute(
        sa.text(
            "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
        )
    )


# Goal events and exposures of an account, and the moves of its merged visitors, take turns: a
# merge waits for the goal events and exposures being recorded, and those that come after it wait
# for it, so each side sees what the other committed (a goal event that found no exposure of the
# user is then seen waiting by the merge, or finds the exposure the merge moved).
# Taken first in each transaction, before any row lock, and in account order.
_ACCOUNTS = "FROM unnest(CAST(:accounts AS uuid[])) AS a ORDER BY a"
_TURN = "1279874631, hashtext(CAST(a AS text))"
_SHARED_TURNS = Statement(f"SELECT pg_advisory_xact_lock_shared({_TURN}) {_ACCOUNTS}")
_TURNS = Statement(f"SELECT pg_advisory_xact_lock({_TURN}) {_ACCOUNTS}")


async def take_goal_turns(target: Target, accounts: set[uuid.UUID | None], *, alone: bool = False) -> None:
    """Takes the accounts' turns (see _TURN): shared with other recorders of goal events and
    exposures, or `alone` (a merge)."""
    turns = _TURNS if alone else _SHARED_TURNS
    await turns.execute(target, accounts=sorted(a for a in accounts if a is not None))


class Conversions:
    """Consumes GoalEvents."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def record(self, received: Sequence[events.GoalEvents]) -> None:
        now = api.utcnow()
        campaign_ids = functools.cache(campaign_id_of)  # a batch's campaigns, each parsed once
        async with self.database.transaction() as session:
            await _by_key_lookups(session)
            await take_goal_turns(session, {account_id_of(published.account) for published in received})
            await session.execute(
                sa.delete(waiting_goal_events).where(waiting_goal_events.c.expires_at < now)
            )
            found = [
                _GoalEvent(
                    campaign_ids(e.campaign),
                    account_id,
                    e.user_id,
                    e.client_event_id,
                    (at := e.event_time).seconds + at.nanos // 1000 / 1e6,
                    e.revenue,
                )
                for published in received
                if (account_id := account_id_of(published.account)) is not None
                for e in published.events
            ]
            goals = await _goals(session, {e.campaign_id for e in found})
            owned = [e for e in found if e.campaign_id in goals and goals[e.campaign_id][0] == e.account_id]
            if len(owned) < len(found):
                log.warning("goal_events_set_aside", count=len(found) - len(owned), reason="no such goal")
            if owned:
                await _attribute(session, goals, owned, waiting=False)

    async def visitors_merged(self, merges: Sequence[events.VisitorMerged]) -> None:
        """Anonymous visitors who signed in: what they were sent converts on the user's events,
        those to come and those already waiting (the user may act before the merge is heard of)."""
        async with self.database.transaction() as session:
            await take_goal_turns(session, {account_id_of(merge.account) for merge in merges}, alone=True)
            users = []
            for merge in merges:
                account_id = account_id_of(merge.account)
                if account_id is None:
                    continue
                for statement in _MOVE_TO_USER:
                    await session.execute(
                        statement,
                        {"account_id": account_id, "anonymous": merge.anonymous_id, "user": merge.user_id},
                    )
                users.append((account_id, merge.user_id))
            if not users:
                return
            w = waiting_goal_events
            waiting = [
                _waiting_event(row)
                for row in await session.execute(
                    sa.select(w).where(sa.tuple_(w.c.account_id, w.c.user_id).in_(users))
                )
            ]
            goals = await _goals(session, {e.campaign_id for e in waiting})
            owned = [e for e in waiting if e.campaign_id in goals]
            if owned:
                await _attribute(session, goals, owned, waiting=True)


# An anonymous visitor who signed in: what they were sent, and their goal events waiting for it,
# are the user's (the LIKE lets the planner use the visitors' partial index).
_MOVE_TO_USER = [
    sa.text(
        f"""
        UPDATE campaign.{table} SET user_id = :user
        WHERE account_id = :account_id AND user_id = :anonymous AND user_id LIKE 'anon:%'
        """
    )
    for table in ("exposures", "waiting_goal_events")
]


# The goal events waiting for one of (campaign, user) pairs: two array parameters however many.
_WAITING_OF = Statement(
    """
    SELECT w.* FROM campaign.waiting_goal_events w
    JOIN unnest(CAST(:campaigns AS uuid[]), CAST(:users AS text[])) AS p(campaign_id, user_id)
      ON w.campaign_id = p.campaign_id AND w.user_id = p.user_id
    """
)
# Gives a batch of goal events (a JSON array, oldest first) to the exposures they follow, in one
# statement: each event's most recent exposure of its campaign before it, inside the window, if it
# has not converted, unless the event converted one before (a copy); each exposure to the first
# such event. The conversions are added to the campaign's and the run's counts, and the events
# are settled (`settled`, below).
_ATTRIBUTE = """
    WITH e AS (
        SELECT * FROM jsonb_to_recordset(CAST(:events AS jsonb))
            AS e(k int, c uuid, a uuid, u text, i text, t float8, r float8, w float8)
    ), placed AS (
        SELECT e.k, e.c, e.a, e.u, e.i, to_timestamp(e.t) AS at, e.r, x.delivery_id, x.run, x.control,
               EXISTS (
                   SELECT 1 FROM campaign.conversions v WHERE v.campaign_id = e.c AND v.client_event_id = e.i
               ) AS counted
        FROM e LEFT JOIN LATERAL (
            SELECT delivery_id, run, control FROM campaign.exposures x
            WHERE x.campaign_id = e.c AND x.user_id = e.u AND x.exposed_at <= to_timestamp(e.t)
              AND x.exposed_at >= to_timestamp(e.t) - make_interval(secs => e.w)
            ORDER BY x.exposed_at DESC LIMIT 1
        ) x ON true
    ), chosen AS (
        -- An exposure that converted before is looked up, not left to ON CONFLICT: a lookup costs
        -- less than a speculative insert, and most users do the goal event more than once.
        SELECT DISTINCT ON (delivery_id) * FROM placed
        WHERE delivery_id IS NOT NULL AND NOT counted
          AND NOT EXISTS (SELECT 1 FROM campaign.conversions d WHERE d.delivery_id = placed.delivery_id)
        ORDER BY delivery_id, k
    ), converted AS (
        -- An exposure that converted meanwhile takes no other event (its delivery id is unique).
        INSERT INTO campaign.conversions AS v
            (campaign_id, client_event_id, delivery_id, account_id, run, control, converted_at, revenue)
        SELECT c, i, delivery_id, a, run, control, at, r FROM chosen
        ON CONFLICT DO NOTHING
        RETURNING v.campaign_id, v.run, v.account_id, v.control, v.revenue
    ), by_run AS (
        SELECT run, campaign_id, account_id,
               count(*) FILTER (WHERE NOT control) AS converted,
               count(*) FILTER (WHERE control) AS control_converted,
               coalesce(sum(revenue) FILTER (WHERE NOT control), 0) AS revenue,
               coalesce(sum(revenue) FILTER (WHERE control), 0) AS control_revenue
        FROM converted GROUP BY run, campaign_id, account_id
    ), campaign_counted AS (
        UPDATE campaign.campaign_stats s
        SET goal_converted = s.goal_converted + r.converted,
            goal_control_converted = s.goal_control_converted + r.control_converted,
            goal_revenue = s.goal_revenue + r.revenue,
            goal_control_revenue = s.goal_control_revenue + r.control_revenue
        FROM (
            SELECT campaign_id, sum(converted) AS converted, sum(control_converted) AS control_converted,
                   sum(revenue) AS revenue, sum(control_revenue) AS control_revenue
            FROM by_run GROUP BY campaign_id
        ) r
        WHERE s.campaign_id = r.campaign_id
    ), run_counted AS (
        INSERT INTO campaign.run_stats AS s
            (run, campaign_id, account_id, goal_converted, goal_control_converted, goal_revenue,
             goal_control_revenue)
        SELECT run, campaign_id, account_id, converted, control_converted, revenue, control_revenue
        FROM by_run
        ON CONFLICT (run) DO UPDATE SET
            goal_converted = s.goal_converted + excluded.goal_converted,
            goal_control_converted = s.goal_control_converted + excluded.goal_control_converted,
            goal_revenue = s.goal_revenue + excluded.goal_revenue,
            goal_control_revenue = s.goal_control_revenue + excluded.goal_control_revenue
    ), settled AS (
        {settled}
    )
    SELECT count(*) FROM converted
"""
# Fresh events: those with no exposure yet wait for it.
_ATTRIBUTE_ARRIVED = Statement(
    _ATTRIBUTE.format(
        settled="""
        INSERT INTO campaign.waiting_goal_events
            (campaign_id, client_event_id, account_id, user_id, event_time, revenue, expires_at)
        SELECT c, i, a, u, at, r, :expires FROM placed WHERE delivery_id IS NULL AND NOT counted
        ON CONFLICT DO NOTHING""",
    )
)
# Waiting events: those settled (given to an exposure, or found no longer to count) stop waiting.
_ATTRIBUTE_WAITING = Statement(
    _ATTRIBUTE.format(
        settled="""
        DELETE FROM campaign.waiting_goal_events w USING placed p
        WHERE (p.delivery_id IS NOT NULL OR p.counted) AND w.campaign_id = p.c AND w.client_event_id = p.i""",
    )
)


async def _attribute(
    target: Target,
    goals: dict[uuid.UUID, tuple[uuid.UUID, pb.Goal]],
    found: list[_GoalEvent],
    *,
    waiting: bool,
) -> None:
    """Gives each event, oldest first, to the most recent exposure before it. Events with no
    exposure yet wait (or, already waiting, wait on); the others are settled."""
    window = {c: goal.conversion_window.ToTimedelta().total_seconds() for c, (_, goal) in goals.items()}
    events = orjson.dumps(
        [
            {
                "k": k,
                "c": e.campaign_id,
                "a": e.account_id,
                "u": e.user_id,
                "i": e.client_id,
                "t": e.at,
                "r": e.revenue,
                "w": window[e.campaign_id],
            }
            for k, e in enumerate(sorted(found, key=lambda e: e.at))
        ],
        default=str,  # asyncpg's own UUIDs, from waiting events' rows
    ).decode()
    if waiting:
        await _ATTRIBUTE_WAITING.execute(target, events=events)
    else:
        expires = api.utcnow() + WAITING_FOR_EXPOSURE
        await _ATTRIBUTE_ARRIVED.execute(target, events=events, expires=expires)


async def _count(target: Target, added: Sequence[tuple[Any, str, float]]) -> None:
    """Adds (exposure row, column, amount) to its campaign's and its run's counts."""
    by_campaign: dict[uuid.UUID, defaultdict[str, float]] = defaultdict(tally)
    by_run: dict[tuple[str, uuid.UUID, uuid.UUID], defaultdict[str, float]] = defaultdict(tally)
    for row, column, amount in added:
        by_campaign[row.campaign_id][column] += amount
        by_run[(row.run, row.campaign_id, row.account_id)][column] += amount
    await add_campaign_counts(target, by_campaign)
    await add_run_counts(target, by_run)


def _wilson(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    p = successes / n
    z2 = Z_95 * Z_95
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return center - half, center + half


def uplift_interval(converted: int, sent: int, control_converted: int, control: int) -> tuple[float, float]:
    """The 95% confidence interval of (converted / sent) - (control_converted / control), by
    Newcombe's hybrid score method (his method 10): each rate's Wilson interval, combined."""
    p1, p2 = converted / sent, control_converted / control
    l1, u1 = _wilson(converted, sent)
    l2, u2 = _wilson(control_converted, control)
    difference = p1 - p2
    return (
        difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def goal_results(counts: Mapping[str, Any]) -> pb.GoalResults:
    """GoalResults from a campaign's (or a run's) counters."""
    sent, converted = counts["goal_sent"], counts["goal_converted"]
    control, control_converted = counts["goal_control"], counts["goal_control_converted"]
    rate = converted / sent if sent else 0.0
    control_rate = control_converted / control if control else 0.0
    results = pb.GoalResults(
        sent=sent,
        converted=converted,
        control=control,
        control_converted=control_converted,
        conversion_rate=rate,
        control_conversion_rate=control_rate,
        uplift=rate - control_rate if sent and control else 0.0,
        revenue=counts["goal_revenue"],
        revenue_per_user=counts["goal_revenue"] / sent if sent else 0.0,
        control_revenue=counts["goal_control_revenue"],
        control_revenue_per_user=counts["goal_control_revenue"] / control if control else 0.0,
    )
    if sent and control:
        results.uplift_low, results.uplift_high = uplift_interval(converted, sent, control_converted, control)
    return results
