"""The one clock every service reads the time of day from.

Schedules, event times, evaluation times and "in the future" checks all read it, so a test can
replace it with a ManualClock and run a week of schedules in seconds. Leases, timeouts and rate
windows keep to real time: they are about processes, not about the calendar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def seconds_until(self, moment: datetime) -> float:
        """Real seconds until the clock shows `moment` (0 once it has)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def seconds_until(self, moment: datetime) -> float:
        return max(0.0, (moment - self.now()).total_seconds())


class ManualClock:
    """A clock that moves only when told to: from `start`, by `advance`."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def seconds_until(self, moment: datetime) -> float:
        return 0.0 if moment <= self._now else math.inf  # only `advance` brings it nearer

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        _jumped()
        return self._now


class ScaledClock:
    """A clock that runs `speed` times faster than real time from `start`: simulations and
    benchmarks live through a day's schedules in minutes."""

    def __init__(self, start: datetime, speed: float) -> None:
        self.start = start
        self.speed = speed
        self._origin = time.monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(time.monotonic() - self._origin) * self.speed)

    def seconds_until(self, moment: datetime) -> float:
        return max(0.0, (moment - self.now()).total_seconds() / self.speed)


_clock: Clock = SystemClock()
# Told when the clock jumps (is moved by hand, or replaced): what waits for a moment looks again.
_jump_listeners: set[Callable[[], None]] = set()


def now() -> datetime:
    return _clock.now()


def seconds_until(moment: datetime) -> float:
    """Real seconds until the clock shows `moment`: how long to sleep for it (inf when only a
    hand moving the clock can bring it)."""
    return _clock.seconds_until(moment)


def use(clock: Clock) -> Clock:
    """Makes `clock` the one every service reads; returns the one it replaces."""
    global _clock
    previous, _clock = _clock, clock
    _jumped()
    return previous


def on_jump(listener: Callable[[], None]) -> Callable[[], None]:
    """Calls `listener` whenever the clock jumps; returns what stops that."""
    _jump_listeners.add(listener)
    return lambda: _jump_listeners.discard(listener)


def _jumped() -> None:
    for listener in list(_jump_listeners):
        listener()
