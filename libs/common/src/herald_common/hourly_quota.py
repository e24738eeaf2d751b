"""Costly calls counted per hour in PostgreSQL, so every replica of a service shares the count
(audience reads per account, test messages per key). Each service keeps its counts in its own
schema's `hourly_use` table."""

from __future__ import annotations

import math
from datetime import timedelta

import sqlalchemy as sa

from herald_common import api
from herald_common.db import Database
from herald_common.errors import ResourceExhausted

# Takes `count` of this hour's `limit` for `subject`, or nothing when that would exceed it; counts
# of past days go at the same time.
_TAKE = """
    WITH forgotten AS (
        DELETE FROM {schema}.hourly_use WHERE hour < CAST(:hour AS timestamptz) - interval '1 day'
    )
    INSERT INTO {schema}.hourly_use AS u (subject, hour, used)
    SELECT CAST(:subject AS text), CAST(:hour AS timestamptz), CAST(:count AS int)
    WHERE CAST(:count AS int) <= CAST(:limit AS int)
    ON CONFLICT (subject, hour) DO UPDATE SET used = u.used + excluded.used
        WHERE u.used + excluded.used <= CAST(:limit AS int)
    RETURNING used
"""


class HourlyQuota:
    def __init__(self, database: Database, schema: str) -> None:
        self.database = database
        self._take = sa.text(_TAKE.format(schema=schema))

    async def take(self, subject: str, count: int, limit: int, what: str) -> None:
        """Counts `count` uses by `subject` this hour; ResourceExhausted (with the wait until the
        next hour) when that would make more than `limit`, and then nothing is counted."""
        now = api.utcnow()
        hour = now.replace(minute=0, second=0, microsecond=0)
        async with self.database.transaction() as session:
            taken = await session.scalar(
                self._take, {"subject": subject, "hour": hour, "count": count, "limit": limit}
            )
        if taken is None:
            wait = (hour + timedelta(hours=1) - now).total_seconds()
            raise ResourceExhausted(
                subject,
                f"at most {limit:,} {what} an hour; retry in {math.ceil(wait / 60)} min",
                retry_after=wait,
            )
