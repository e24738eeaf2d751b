"""Costly calls counted per hour in PostgreSQL, so every replica of a service shares the count
(audience reads per account, test messages per key). Each service keeps its counts in an
`hourly_use` table of its own schema, of the shape below."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common import api
from herald_common.db import Database
from herald_common.errors import ResourceExhausted


def _hourly_use_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("used", sa.Integer, nullable=False),
    ]


def hourly_use_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("hourly_use", metadata, *_hourly_use_columns())


def create_hourly_use_table(schema: str) -> None:
    """For a service's migration."""
    from alembic import op

    op.create_table("hourly_use", *_hourly_use_columns(), schema=schema)


# Takes `count` of this hour's `limit` for `subject`, or nothing when that would exceed it; counts
# of past days go at the same time.
_TAKE = """
    WITH forgotten AS (
        DELETE FROM {table} WHERE hour < CAST(:hour AS timestamptz) - interval '1 day'
    )
    INSERT INTO {table} AS u (subject, hour, account_id, used)
    SELECT CAST(:subject AS text), CAST(:hour AS timestamptz), CAST(:account_id AS uuid), CAST(:count AS int)
    WHERE CAST(:count AS int) <= CAST(:limit AS int)
    ON CONFLICT (subject, hour) DO UPDATE SET used = u.used + excluded.used
        WHERE u.used + excluded.used <= CAST(:limit AS int)
    RETURNING used
"""


class HourlyQuota:
    def __init__(self, database: Database, table: sa.Table) -> None:
        self.database = database
        self._take = sa.text(_TAKE.format(table=table.fullname))

    async def take(self, account_id: uuid.UUID, subject: str, count: int, limit: int, what: str) -> None:
        """Counts `count` uses by `subject` (of `account_id`) this hour; ResourceExhausted, with the
        wait until the next hour, when that would make more than `limit`: then nothing is counted."""
        now = api.utcnow()
        hour = now.replace(minute=0, second=0, microsecond=0)
        values = {"subject": subject, "hour": hour, "account_id": account_id, "count": count, "limit": limit}
        async with self.database.transaction() as session:
            taken = await session.scalar(self._take, values)
        if taken is None:
            wait = (hour + timedelta(hours=1) - now).total_seconds()
            raise ResourceExhausted(
                subject,
                f"at most {limit:,} {what} an hour; retry in {math.ceil(wait / 60)} min",
                retry_after=wait,
            )
