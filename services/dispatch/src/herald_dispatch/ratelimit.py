"""A per-destination request rate shared by every dispatch replica, counted in PostgreSQL.

Windows are seconds of the database's clock, so replicas whose clocks disagree still share them.
A replica takes permits in blocks (a twentieth of the rate) and spends them within the same
second, so the database sees a few takes a second, not one per request.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import sqlalchemy as sa

from herald_common.db import Database

_TAKE = sa.text(
    """
    INSERT INTO dispatch.rate_windows AS w (destination, account_id, second, used, granted)
    VALUES (:destination, :account_id, floor(extract(epoch FROM clock_timestamp()))::bigint,
            LEAST(CAST(:block AS int), CAST(:limit AS int)), LEAST(CAST(:block AS int), CAST(:limit AS int)))
    ON CONFLICT (destination, second) DO UPDATE
        SET used = w.used + LEAST(CAST(:block AS int), CAST(:limit AS int) - w.used),
            granted = LEAST(CAST(:block AS int), CAST(:limit AS int) - w.used)
        WHERE w.used < CAST(:limit AS int)
    RETURNING granted, 1 - (extract(epoch FROM clock_timestamp()) - second) AS seconds_left
    """
)
_FORGET = sa.text(
    """
    DELETE FROM dispatch.rate_windows
    WHERE second < floor(extract(epoch FROM clock_timestamp()))::bigint - 60
    """
)
BLOCKS_PER_SECOND = 20


class SharedRateLimiter:
    """At most `limit` requests per second to one destination, across replicas."""

    def __init__(self, database: Database) -> None:
        self.database = database
        # Permits this replica holds per destination, and when their second ends (monotonic).
        self._held: dict[str, tuple[int, float]] = {}
        # One request at a time asks the database for more permits of a destination; the others
        # queue here instead of all polling it.
        self._refilling: dict[str, asyncio.Lock] = {}

    def _take_held(self, destination: str) -> bool:
        permits, until = self._held.get(destination, (0, 0.0))
        if permits > 0 and time.monotonic() < until:
            self._held[destination] = (permits - 1, until)
            return True
        return False

    async def acquire(self, account_id: uuid.UUID, destination: str, limit: int) -> None:
        if self._take_held(destination):
            return
        async with self._refilling.setdefault(destination, asyncio.Lock()):
            await self._refill(account_id, destination, limit)

    async def _refill(self, account_id: uuid.UUID, destination: str, limit: int) -> None:
        while True:
            if self._take_held(destination):
                return
            block = max(1, limit // BLOCKS_PER_SECOND)
            async with self.database.transaction() as session:
                row = (
                    await session.execute(
                        _TAKE,
                        {
                            "destination": destination,
                            "account_id": account_id,
                            "limit": limit,
                            "block": block,
                        },
                    )
                ).first()
                if random.random() < 0.01:  # old windows are of no use; clear them now and then
                    await session.execute(_FORGET)
            if row is not None and row.granted > 0:
                self._held[destination] = (row.granted - 1, time.monotonic() + float(row.seconds_left))
                return
            await asyncio.sleep(random.uniform(0.05, 0.2))
