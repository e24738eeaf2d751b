"""A per-destination request rate shared by every dispatch replica, counted in PostgreSQL.

Windows are seconds of the database's clock, so replicas whose clocks disagree still share them.
"""

from __future__ import annotations

import asyncio
import random

import sqlalchemy as sa

from herald_common.db import Database

_TAKE = sa.text(
    """
    INSERT INTO dispatch.rate_windows AS w (destination, second, used)
    VALUES (:destination, floor(extract(epoch FROM clock_timestamp()))::bigint, 1)
    ON CONFLICT (destination, second) DO UPDATE SET used = w.used + 1 WHERE w.used < :limit
    RETURNING used
    """
)
_FORGET = sa.text(
    """
    DELETE FROM dispatch.rate_windows
    WHERE second < floor(extract(epoch FROM clock_timestamp()))::bigint - 60
    """
)


class SharedRateLimiter:
    """At most `limit` requests per second to one destination, across replicas."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def acquire(self, destination: str, limit: int) -> None:
        while True:
            async with self.database.transaction() as session:
                used = await session.scalar(_TAKE, {"destination": destination, "limit": limit})
                if random.random() < 0.01:  # old windows are of no use; clear them now and then
                    await session.execute(_FORGET)
            if used is not None:
                return
            await asyncio.sleep(random.uniform(0.05, 0.2))
