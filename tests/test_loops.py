"""The background loop's wake-ups: at once for work announced while a step runs, when known work
comes due, and when a test moves the clock; otherwise at its poll."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from herald_common import clock
from herald_common.loops import WakeableLoop
from tests.conftest import CLOCK_START


async def _steps_until_the_second(first: Callable[[WakeableLoop], Awaitable[None]]) -> list[float]:
    """Runs a loop that looks by itself only every 30 s, with `first` in its first step; the times
    of its steps until the second (or 5 s)."""
    steps: list[float] = []
    second_step = asyncio.Event()

    async def step() -> bool:
        steps.append(time.monotonic())
        if len(steps) == 1:
            await first(loop)
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
    return steps


async def test_work_announced_during_a_step_is_taken_at_once_not_at_the_next_poll() -> None:
    async def notified_meanwhile(loop: WakeableLoop) -> None:
        # New work arrives while this step is busy (after it looked): its writer notifies.
        await asyncio.sleep(0.05)
        loop.notify()

    steps = await _steps_until_the_second(notified_meanwhile)
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


async def test_a_loop_sleeps_until_the_work_its_step_found_comes_due() -> None:
    async def found_due_soon(loop: WakeableLoop) -> None:
        loop.due_at(clock.now() + timedelta(seconds=0.3))

    steps = await _steps_until_the_second(found_due_soon)
    assert len(steps) >= 2
    assert 0.25 <= steps[1] - steps[0] < 2.0  # when it came due: not at once, not at the poll


async def test_work_made_elsewhere_wakes_the_loop_only_when_due_sooner() -> None:
    steps: list[float] = []
    second_step = asyncio.Event()

    async def step() -> bool:
        steps.append(time.monotonic())
        if len(steps) == 2:
            second_step.set()
        return False

    loop = WakeableLoop("test-loop", step, poll_seconds=30.0)
    loop.start()
    try:
        await asyncio.sleep(0.1)
        loop.due_at(clock.now() + timedelta(minutes=5))  # after the loop's own next look: no wake
        await asyncio.sleep(0.2)
        assert len(steps) == 1
        loop.due_at(clock.now() + timedelta(seconds=0.1))  # sooner: the loop looks again by then
        await asyncio.wait_for(second_step.wait(), 5)
    finally:
        await loop.stop()
    assert len(steps) == 2


async def test_a_hand_moved_clock_wakes_a_loop_waiting_for_a_moment(
    manual_clock: clock.ManualClock,
) -> None:
    steps: list[datetime] = []
    woke = asyncio.Event()

    async def step() -> bool:
        steps.append(clock.now())
        if len(steps) == 2:
            woke.set()
        loop.due_at(CLOCK_START + timedelta(days=1))  # due tomorrow by the test's clock
        return False

    loop = WakeableLoop("test-loop", step, poll_seconds=30.0)
    loop.start()
    try:
        await asyncio.sleep(0.1)
        manual_clock.advance(timedelta(days=1))
        await asyncio.wait_for(woke.wait(), 5)
    finally:
        await loop.stop()
    assert steps == [CLOCK_START, CLOCK_START + timedelta(days=1)]
