"""The heavy methods' turns: requests are worked on together up to a number of bytes, small ones
many at a time, and a large one waiting is not passed by small ones that came after it."""

from __future__ import annotations

import asyncio

from herald_common.grpc_server import ByteTurns


async def _hold(turns: ByteTurns, size: int, started: list[int], release: asyncio.Event) -> None:
    async with turns.turn(size):
        started.append(size)
        await release.wait()


async def test_small_requests_share_the_budget_and_a_large_one_is_not_passed() -> None:
    turns = ByteTurns(10)
    started: list[int] = []
    first = asyncio.Event()
    small = [asyncio.create_task(_hold(turns, 2, started, first)) for _ in range(4)]
    await asyncio.sleep(0)
    assert started == [2, 2, 2, 2]  # 8 of 10 bytes at once

    later = asyncio.Event()
    large = asyncio.create_task(_hold(turns, 6, started, later))
    behind = asyncio.create_task(_hold(turns, 1, started, later))
    await asyncio.sleep(0)
    assert started == [2, 2, 2, 2]  # the 1-byte request would fit, but waits behind the large one

    first.set()
    await asyncio.gather(*small)
    await asyncio.sleep(0)
    assert started == [2, 2, 2, 2, 6, 1]
    later.set()
    await asyncio.gather(large, behind)
    assert turns.free == 10


async def test_a_request_larger_than_the_budget_runs_alone_and_a_cancelled_wait_gives_way() -> None:
    turns = ByteTurns(10)
    started: list[int] = []
    release = asyncio.Event()
    huge = asyncio.create_task(_hold(turns, 50, started, release))
    await asyncio.sleep(0)
    assert started == [50] and turns.free == 0

    gone = asyncio.create_task(_hold(turns, 8, started, release))
    after = asyncio.create_task(_hold(turns, 3, started, release))
    await asyncio.sleep(0)
    gone.cancel()  # its caller went away while it waited
    await asyncio.sleep(0)
    assert started == [50]
    release.set()
    await asyncio.gather(huge, after)
    assert started == [50, 3] and gone.cancelled()
    assert turns.free == 10
