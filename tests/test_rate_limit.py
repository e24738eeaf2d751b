"""The per-destination request rate is shared by every dispatch replica, in every rolling second."""

from __future__ import annotations

import asyncio
import time
import uuid

from herald_common.db import Database, make_engine
from herald_dispatch.ratelimit import SharedRateLimiter
from tests.conftest import Platform
from tests.helpers import busiest_second


async def test_two_replicas_together_stay_within_the_destination_rate(platform: Platform) -> None:
    databases = [Database(make_engine(platform.settings.database_url, pool_size=2)) for _ in range(2)]
    replicas = [SharedRateLimiter(database) for database in databases]
    destination = f"destinations/{uuid.uuid4()}"
    account_id = uuid.uuid4()
    limit, seconds = 40, 3.0
    granted: list[float] = []

    async def send_as_fast_as_allowed(limiter: SharedRateLimiter) -> None:
        deadline = time.monotonic() + seconds
        while True:
            await limiter.acquire(account_id, destination, limit)
            if time.monotonic() >= deadline:
                return
            granted.append(time.monotonic())

    try:
        await asyncio.gather(*(send_as_fast_as_allowed(r) for r in replicas for _ in range(3)))
    finally:
        for database in databases:
            await database.dispose()
    # The destination's limit holds in every rolling second, and is nearly used.
    assert busiest_second(granted) <= limit
    assert len(granted) >= limit * (seconds - 1)
