"""When users are active: the hours of the day (UTC) of their sessions, opens and clicks, counted
as the events are recorded, so a Best Time campaign reads each user's best hour without
scanning their history."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import distinct_on

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common.db import Built, Statement, Target, text_in
from herald_segmentation.storage import activity_hours

# The events that say a user is there: a session or page, an app opened, a notification seen,
# opened or clicked.
ACTIVITY_EVENTS = frozenset(
    {
        "Page Viewed",
        "App Opened",
        "Session Started",
        "Notification Viewed",
        "Notification Opened",
        "Notification Clicked",
    }
)
_COUNT = Statement(
    """
    INSERT INTO segmentation.activity_hours AS a (account_id, user_id, hour, count)
    SELECT :account_id, u, h, c
    FROM unnest(CAST(:users AS text[]), CAST(:hours AS smallint[]), CAST(:counts AS bigint[])) AS t(u, h, c)
    ON CONFLICT (account_id, user_id, hour) DO UPDATE SET count = a.count + excluded.count
    """
)


async def count_activity(target: Target, account_id: uuid.UUID, recorded: Sequence[Any]) -> None:
    """Adds the recorded activity events to their users' hours (one statement for the call)."""
    counted = Counter((r.user_id, int(r.when // 3600 % 24)) for r in recorded if r.name in ACTIVITY_EVENTS)
    if counted:
        keys = sorted(counted)
        await _COUNT.execute(
            target,
            account_id=account_id,
            users=[u for u, _ in keys],
            hours=[h for _, h in keys],
            counts=[counted[k] for k in keys],
        )


async def add_best_hours(target: Target, account_id: uuid.UUID, members: Sequence[pb.AudienceMember]) -> None:
    """Sets each member's best hour (the most active; the earliest on a tie) and its count."""
    if not members:
        return
    a = activity_hours.c
    rows = await Built(
        sa.select(a.user_id, a.hour, a.count.label("times"))
        .ext(distinct_on(a.user_id))
        .where(a.account_id == account_id, text_in(a.user_id, [m.user_id for m in members]))
        .order_by(a.user_id, a.count.desc(), a.hour)
    ).fetch(target)
    best = {row.user_id: (row.hour, row.times) for row in rows}
    for member in members:
        if member.user_id in best:
            member.best_hour_utc, member.best_hour_count = best[member.user_id]
