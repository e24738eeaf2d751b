"""A per-destination request rate shared by every dispatch replica, scheduled in PostgreSQL.

Each request to a destination of `limit` requests a second gets its own time slot from one
schedule row the replicas share (the database's clock, so replicas whose clocks disagree still
share it). A replica reserves slots in blocks (a twentieth of a second's worth), so the database
sees a few reservations a second, not one per request, and sends each request at its slot's time.
A slot its sender reaches more than JITTER_SECONDS late is dropped rather than sent close to the
next one (and an SMS request not written by then, its process paused or busy, takes a later
slot), and slots are spaced so that 1 + 2 * JITTER_SECONDS seconds hold fewer than `limit` of
them: so even with that much lateness here and on the way, no rolling second at the provider
holds more than `limit` requests, across replicas, and idle time is never saved up into a burst.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid

from herald_common.db import Database, Statement

# Reserves `count` slots `spacing` seconds apart, from now or from the schedule's end, whichever
# is later; answers when the first is, as seconds from the database's now.
_RESERVE = Statement(
    """
    WITH now AS (SELECT clock_timestamp() AS at,
                        CAST(:count AS int) * CAST(:spacing AS float8) AS span)
    INSERT INTO dispatch.rate_schedules AS r (destination, account_id, next_slot)
    SELECT :destination, :account_id, at + make_interval(secs => span) FROM now
    ON CONFLICT (destination) DO UPDATE
        SET next_slot = GREATEST(r.next_slot, (SELECT at FROM now))
                        + make_interval(secs => (SELECT span FROM now))
    RETURNING extract(epoch FROM next_slot) - (SELECT span FROM now) AS first_slot,
              extract(epoch FROM (SELECT at FROM now)) AS database_now
    """
)
_DATABASE_NOW = "SELECT extract(epoch FROM clock_timestamp())"
CALIBRATION_ROUND_TRIPS = 3
BLOCKS_PER_SECOND = 20
JITTER_SECONDS = 0.05
MIN_SLEEP_SECONDS = 0.002


class _Block:
    """Slots reserved at once: `count` of them `spacing` seconds apart from `start` (monotonic),
    of which those before `taken` are gone. Kept as arithmetic, not as a time per slot: a high
    limit reserves thousands a block, and most of them pass unused when requests come slower."""

    __slots__ = ("count", "spacing", "start", "taken")

    def __init__(self, start: float, spacing: float, count: int) -> None:
        self.start, self.spacing, self.count, self.taken = start, spacing, count, 0

    def take(self, earliest: float) -> float | None:
        """The first slot not taken and not before `earliest`; None when the block has none."""
        first = max(self.taken, math.ceil((earliest - self.start) / self.spacing))
        if first >= self.count:
            return None
        self.taken = first + 1
        return self.start + first * self.spacing


class SharedRateLimiter:
    """At most `limit` requests per rolling second to one destination, across replicas."""

    def __init__(self, database: Database) -> None:
        self.database = database
        # Slots this replica reserved per destination, earliest block first.
        self._slots: dict[str, collections.deque[_Block]] = {}
        # One request at a time reserves more slots of a destination; the others queue here.
        self._reserving: dict[str, asyncio.Lock] = {}
        # The database's clock minus this process's monotonic one, from the quickest round trip.
        self._clock_offset = 0.0
        self._best_round_trip = math.inf

    def _next_slot(self, destination: str) -> float | None:
        blocks = self._slots.get(destination)
        earliest = time.monotonic() - JITTER_SECONDS  # not yet, or only just past
        while blocks:
            slot = blocks[0].take(earliest)
            if slot is not None:
                return slot
            blocks.popleft()
        return None

    async def acquire(self, account_id: uuid.UUID, destination: str, limit: int) -> float:
        """Waits for the destination's next slot; answers the latest (monotonic) time the request
        may go out in it: one that does something else first (asks the database) and is later than
        that must take another slot."""
        # Any window of 1 + 2 * JITTER_SECONDS seconds holds at most `limit` slots.
        spacing = (1.0 + 2 * JITTER_SECONDS) / max(limit - 1, 0.5)
        while True:
            slot = self._next_slot(destination)
            while slot is None:
                async with self._reserving.setdefault(destination, asyncio.Lock()):
                    slot = self._next_slot(destination)
                    if slot is None:
                        await self._reserve(account_id, destination, limit, spacing)
                        slot = self._next_slot(destination)
            delay = slot - time.monotonic()
            if delay > MIN_SLEEP_SECONDS:  # a slot due within a hair goes now, without a timer
                await asyncio.sleep(delay)
            # Woken too late (the process was paused, or the loop busy): that slot has passed.
            if time.monotonic() <= slot + JITTER_SECONDS:
                return slot + JITTER_SECONDS

    async def _reserve(self, account_id: uuid.UUID, destination: str, limit: int, spacing: float) -> None:
        count = max(1, limit // BLOCKS_PER_SECOND)
        async with self.database.direct_transaction() as connection:
            # Timed on a connection already held (opening one, or checking it, is no part of the
            # round trip); a replica that has not measured the clock yet first asks it a few times.
            for _ in range(CALIBRATION_ROUND_TRIPS if math.isinf(self._best_round_trip) else 0):
                asked = time.monotonic()
                database_now = await connection.fetchval(_DATABASE_NOW)
                self._measured(asked, float(database_now), time.monotonic())
            asked = time.monotonic()
            row = await _RESERVE.fetch_row(
                connection, destination=destination, account_id=account_id, count=count, spacing=spacing
            )
            assert row is not None
            self._measured(asked, float(row.database_now), time.monotonic())
        start = float(row.first_slot) - self._clock_offset
        self._slots.setdefault(destination, collections.deque()).append(_Block(start, spacing, count))

    def _measured(self, asked: float, database_now: float, heard: float) -> None:
        """The database's clock against this process's: its now lies between asking and hearing
        back, so the quickest round trip seen tells the offset best (a slow one would shift this
        replica's slots onto another's). Older measurements weigh a little less each time."""
        self._best_round_trip *= 1.02
        if heard - asked <= self._best_round_trip:
            self._best_round_trip = heard - asked
            self._clock_offset = database_now - (asked + heard) / 2
