"""A background loop that works while there is work and otherwise sleeps until woken or polled."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

from herald_common import clock
from herald_common.logging import get_logger

log = get_logger(__name__)


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancels `task` and waits until it has ended. Cancels again while it runs: on Python 3.11,
    `asyncio.wait_for` (which libraries use inside loops) drops a cancellation that arrives as its
    inner wait completes, and a loop that only ends on cancellation would then run on forever."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
    if task is not None and not task.cancelled() and task.exception() is not None:
        log.warning("task_failed_before_stop", task=task.get_name(), error=repr(task.exception()))


# A loop whose step failed this many times in a row reports itself failing (its service's health
# says NOT_SERVING) until a step succeeds.
FAILING_AFTER = 3


class WakeableLoop:
    """Calls `step` repeatedly. `step` returns True when more work may be waiting right away;
    otherwise the loop sleeps until `notify()`, until the moment the step said its next work
    comes due (`due_at`), or until `poll_seconds` pass, whichever is first. The clock jumping (a
    test moving it) wakes it too. A step that raises is logged and tried again a second later;
    `failing` tells when it keeps raising."""

    def __init__(self, name: str, step: Callable[[], Awaitable[bool]], poll_seconds: float) -> None:
        self.name = name
        self.step = step
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._due_in = math.inf
        self._stepping = False
        self._wakes_at = math.inf  # monotonic time the loop's current wait ends
        self._stop_following_clock: Callable[[], None] | None = None
        self.failures = 0  # in a row
        self.failures_total = 0
        self.last_error = ""

    @property
    def failing(self) -> bool:
        return self.failures >= FAILING_AFTER

    def notify(self) -> None:
        self._wake.set()

    def due_at(self, moment: datetime) -> None:
        """Work comes due at `moment` (by the clock): the loop steps again by then."""
        self.due_in(clock.seconds_until(moment))

    def due_in(self, seconds: float) -> None:
        """Work comes due in `seconds` of real time: the loop steps again by then. A step says so
        of what it found waiting; others of work they made (woken only if it is due sooner than
        the loop would have looked anyway)."""
        if self._stepping:
            self._due_in = min(self._due_in, max(seconds, 0.0))
        elif time.monotonic() + seconds < self._wakes_at:
            self.notify()

    def start(self) -> None:
        self._stop_following_clock = clock.on_jump(self.notify)
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._stop_following_clock is not None:
            self._stop_following_clock()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping:
            # Cleared before the step: a notify() while it runs (work it may have missed) wakes
            # the loop again right after it.
            self._wake.clear()
            self._due_in = math.inf
            self._stepping = True
            try:
                more = await self.step()
                self.failures = 0
            except Exception as error:
                self.failures += 1
                self.failures_total += 1
                self.last_error = repr(error)[:500]
                log.exception("loop_step_failed", loop=self.name, failures=self.failures)
                more = False
                await asyncio.sleep(1)
            finally:
                self._stepping = False
            if not more:
                wait = min(self.poll_seconds, self._due_in)
                self._wakes_at = time.monotonic() + wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                self._wakes_at = math.inf
