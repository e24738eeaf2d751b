"""Calls made while serving an RPC never outlive what its caller allowed."""

from __future__ import annotations

import asyncio

from herald_common import deadlines


async def test_outgoing_calls_get_at_most_the_time_the_caller_has_left() -> None:
    async def serving(caller_allows: float | None) -> float:
        deadlines.serving(caller_allows)
        await asyncio.sleep(0.05)
        return deadlines.timeout(5.0)

    # Each RPC runs in a task of its own: one caller's deadline does not leak into another's.
    short, none, long = await asyncio.gather(serving(0.5), serving(None), serving(60.0))
    assert 0.3 < short <= 0.45
    assert none == 5.0
    assert long == 5.0
    assert deadlines.timeout(5.0) == 5.0  # outside any RPC
    assert await serving(0.01) == 0.0  # already past: the call fails at once
