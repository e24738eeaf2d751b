"""The one clock every service reads the time of day from.

Schedules, event times, evaluation times and "in the future" checks all read it, so a test can
replace it with a ManualClock and run a week of schedules in seconds. Leases, timeouts and rate
windows keep to real time: they are about processes, not about the calendar.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to: from `start`, by `advance`."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
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


_clock: Clock = SystemClock()


def now() -> datetime:
    return _clock.now()


def use(clock: Clock) -> Clock:
    """Makes `clock` the one every service reads; returns the one it replaces."""
    global _clock
    previous, _clock = _clock, clock
    return previous
