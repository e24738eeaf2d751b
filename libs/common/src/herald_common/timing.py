"""When deliveries happen: schedule and time arithmetic as pure functions.

Wall-clock times are applied in IANA time zones with one answer for each DST edge:
- a time that does not exist (the clocks jump over it) moves forward by the gap: 02:30 on a
  spring-forward night where 02:00 becomes 03:00 is delivered at 03:30;
- a time that exists twice (the clocks fall back over it) takes its first occurrence.
These are Python's `fold=0` semantics (PEP 495), so `local_instant` is all it takes.

The end of do-not-disturb hours is the one exception, since it is a limit, not an appointment:
deliveries go at the first instant the wall clock is no longer inside the hours. An end that
does not exist is the instant the clocks jump (03:00 above), and an end that exists twice is its
second occurrence, so nothing goes out in the repeated hour.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# The zone that reaches a wall-clock time first (UTC+14): a run in users' own zones starts when it
# does, up to 26 hours before the zone that reaches it last (UTC-12).
EARLIEST_ZONE = ZoneInfo("Etc/GMT-14")
LATEST_ZONE = ZoneInfo("Etc/GMT+12")
THROTTLE_WINDOW_SECONDS = 300
# The longest IANA zone name is 32 characters (America/Argentina/ComodRivadavia).
MAX_ZONE_NAME = 64


# Herald's date-time type: RFC 3339 with its offset, as properties and conditions carry it.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})\Z")


def parse_datetime(text: str) -> datetime | None:
    """An RFC 3339 date-time with its offset, or None."""
    # Most strings are not one: a look at the first dash turns them away before the pattern does.
    if len(text) < 17 or text[4] != "-" or not _RFC3339.match(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None


def zone_named(name: str) -> ZoneInfo | None:
    """The IANA time zone of that name; None when there is none."""
    if not name or len(name) > MAX_ZONE_NAME:  # ZoneInfo looks names up as files: bound them
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def local_instant(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of a wall-clock time on a day in a zone (see the module's DST rules)."""
    return datetime.combine(day, at.replace(tzinfo=None, fold=0), tzinfo=zone).astimezone(UTC)


def first_instant_not_before(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The first UTC instant from which the wall clock in `zone` shows `at` on `day` or later,
    never to go back before it: the jump itself when `at` falls in a spring-forward gap, the
    second occurrence when it falls in a repeated fall-back hour."""
    wall = datetime.combine(day, at.replace(tzinfo=None))
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if second.astimezone(zone).replace(tzinfo=None) == wall:
        return second  # exists (once, or twice: then this is the second)
    # In a gap: as UTC moves on, the wall clock first shows `wall` or later at the jump, which
    # lies between the two readings of `wall` (clocks change on whole seconds).
    low, high = int(second.timestamp()), int(local_instant(day, at, zone).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def local_day(instant: datetime, zone: ZoneInfo) -> date:
    """The user's calendar day at an instant: frequency caps count in it."""
    return instant.astimezone(zone).date()


def local_week(instant: datetime, zone: ZoneInfo) -> tuple[int, int]:
    """The user's ISO (year, week) at an instant: Monday to Sunday, in their zone."""
    year, week, _ = instant.astimezone(zone).isocalendar()
    return year, week


class Frequency(enum.Enum):
    DAILY = "daily"  # every N days
    WEEKLY = "weekly"  # on chosen weekdays, every N weeks
    MONTHLY = "monthly"  # on a day of the month, every N months


@dataclass(frozen=True)
class Recurrence:
    frequency: Frequency
    at: time
    start: date
    every: int = 1
    weekdays: frozenset[int] = frozenset()  # 0 is Monday, as date.weekday()
    day_of_month: int = 1
    end: date | None = None  # the last day an occurrence may fall on
    count: int | None = None  # at most this many occurrences


def _month_day(year: int, month: int, day: int) -> date:
    """The day in that month, or the month's last day when it is shorter (31st in April: 30th)."""
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def _candidate_days(rule: Recurrence) -> Iterator[date]:
    """Matching days from the start date on, in order, without end or count."""
    if rule.frequency is Frequency.DAILY:
        day = rule.start
        while True:
            yield day
            day += timedelta(days=rule.every)
    elif rule.frequency is Frequency.WEEKLY:
        # The first matching day on or after the start, never before it; every N weeks counts
        # from that day's week.
        first = next(
            rule.start + timedelta(days=n)
            for n in range(7)
            if (rule.start.weekday() + n) % 7 in rule.weekdays
        )
        week_start = first - timedelta(days=first.weekday())
        while True:
            for weekday in sorted(rule.weekdays):
                day = week_start + timedelta(days=weekday)
                if day >= first:
                    yield day
            week_start += timedelta(weeks=rule.every)
    else:
        year, month = rule.start.year, rule.start.month
        while True:
            day = _month_day(year, month, rule.day_of_month)
            if day >= rule.start:
                yield day
            month += rule.every
            year, month = year + (month - 1) // 12, (month - 1) % 12 + 1


def occurrence_days(rule: Recurrence) -> Iterator[date]:
    """The days a recurring schedule delivers on: the first matching day on or after the start
    date, then each following one, up to the end date and the occurrence count."""
    for n, day in enumerate(_candidate_days(rule)):
        if (rule.end is not None and day > rule.end) or (rule.count is not None and n >= rule.count):
            return
        yield day


def next_occurrence(rule: Recurrence, zone: ZoneInfo, after: datetime) -> datetime | None:
    """The first occurrence strictly after an instant, as a UTC instant in `zone`; None when the
    schedule has no more."""
    for day in occurrence_days(rule):
        instant = local_instant(day, rule.at, zone)
        if instant > after:
            return instant
    return None


def best_local_time(day: date, best_hour_utc: int | None, zone: ZoneInfo, fallback: time) -> time:
    """The wall-clock time in `zone` on `day` of a user's best hour (counted in UTC), or the
    fallback for a user without history."""
    if best_hour_utc is None:
        return fallback
    return datetime.combine(day, time(best_hour_utc), tzinfo=UTC).astimezone(zone).time().replace(tzinfo=None)


def run_start(day: date, at: time) -> datetime:
    """When a run delivering at a wall-clock time in each user's own zone starts: as the earliest
    zone on Earth reaches it."""
    return local_instant(day, at, EARLIEST_ZONE)


def run_last_due(day: date, at: time) -> datetime:
    """When the last zone on Earth (UTC-12) reaches a wall-clock time: until then, a run in users'
    own zones still has users to deliver to."""
    return local_instant(day, at, LATEST_ZONE)


@dataclass(frozen=True)
class QuietHours:
    """Do-not-disturb hours in the user's local time; `start` after `end` crosses midnight."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("quiet hours of zero length")

    def contains(self, moment: time) -> bool:
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def end_after(self, instant: datetime, zone: ZoneInfo) -> datetime:
        """The first end of the quiet hours after an instant inside them, as a UTC instant (see
        the module's rule for ends at DST edges)."""
        local = instant.astimezone(zone)
        day = local.date()
        if local.time().replace(tzinfo=None) >= self.end:  # inside a window crossing midnight
            day += timedelta(days=1)
        end = first_instant_not_before(day, self.end, zone)
        return end if end > instant else first_instant_not_before(day + timedelta(days=1), self.end, zone)


def quiet_hours_delay(instant: datetime, zone: ZoneInfo, quiet: QuietHours) -> datetime | None:
    """When a delivery due at an instant may go, if that falls in quiet hours (the end of them);
    None when it is outside them and may go as planned."""
    if not quiet.contains(instant.astimezone(zone).time().replace(tzinfo=None)):
        return None
    return quiet.end_after(instant, zone)


def cutoff_instant(due: datetime, zone: ZoneInfo, cutoff: time) -> datetime:
    """The first moment the cut-off wall-clock time is reached at or after a delivery's due time,
    in its zone: deliveries not handed over by then are skipped."""
    local = due.astimezone(zone)
    day = local.date()
    candidate = local_instant(day, cutoff, zone)
    if candidate < due:
        candidate = local_instant(day + timedelta(days=1), cutoff, zone)
    return candidate


def throttle_window(instant: datetime) -> datetime:
    """The start of the 5-minute throttle window an instant falls in."""
    seconds = int(instant.timestamp())
    return datetime.fromtimestamp(seconds - seconds % THROTTLE_WINDOW_SECONDS, UTC)


def _unit_hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def in_control_group(campaign: str, user_id: str, percent: float) -> bool:
    """Whether a user is held back: decided by the campaign and the user alone, so the user stays
    in the same group across every run of a recurring campaign."""
    return _unit_hash("control", campaign, user_id) % 10_000 < round(percent * 100)
