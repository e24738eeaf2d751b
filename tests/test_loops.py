"""The background loop's wake-ups: work announced while a step runs is not left for the next poll."""

from __future__ import annotations

import asyncio
import contextlib
import time

from herald_common.loops import WakeableLoop


async def test_work_announced_during_a_step_is_taken_at_once_not_at_the_next_poll() -> None:
    steps: list[float] = []
    second_step = asyncio.Event()
    loop: WakeableLoop

    async def step() -> bool:
        steps.append(time.monotonic())
        if len(steps) == 1:
            # New work arrives while this step is busy (after it looked): its writer notifies.
            await asyncio.sleep(0.05)
            loop.notify()
        else:
            second_step.set()
        return False

    loop = WakeableLoop("test-loop", step, poll_seconds=30.0)
    loop.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(second_step.wait(), 5)
    finally:
        await loop.stop()
    assert len(steps) >= 2, "the loop slept through the notify, until its next poll"
    assert steps[1] - steps[0] < 1.0


async def test_an_idle_loop_waits_for_its_poll() -> None:
    steps: list[float] = []

    async def step() -> bool:
        steps.append(time.monotonic())
        return False

    loop = WakeableLoop("test-loop", step, poll_seconds=0.3)
    loop.start()
    await asyncio.sleep(1.0)
    await loop.stop()
    # About one step per poll (the first at once): not a busy loop, not asleep.
    assert 2 <= len(steps) <= 6
