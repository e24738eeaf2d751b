"""Schedule and time arithmetic, by table: DST edges in several zones, quiet hours across midnight,
leap days, short months, end dates and occurrence counts. Expected values are worked out by hand
from each zone's rules, not by the code under test."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from herald_common.timing import (
    Frequency,
    QuietHours,
    Recurrence,
    cutoff_instant,
    in_control_group,
    local_day,
    local_instant,
    local_week,
    next_occurrence,
    occurrence_days,
    quiet_hours_delay,
    run_start,
    throttle_window,
)

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
SYDNEY = ZoneInfo("Australia/Sydney")
KOLKATA = ZoneInfo("Asia/Kolkata")
KIRITIMATI = ZoneInfo("Pacific/Kiritimati")
PAGO_PAGO = ZoneInfo("Pacific/Pago_Pago")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("day", "at", "zone", "expected"),
    [
        # New York: EST -5, EDT -4; 2026 spring forward Mar 8 02:00 -> 03:00, fall back Nov 1 02:00 -> 01:00.
        (date(2026, 1, 15), time(9), NY, utc(2026, 1, 15, 14)),
        (date(2026, 7, 1), time(9), NY, utc(2026, 7, 1, 13)),
        (date(2026, 3, 8), time(2, 30), NY, utc(2026, 3, 8, 7, 30)),  # does not exist: 03:30 EDT
        (date(2026, 3, 8), time(3, 0), NY, utc(2026, 3, 8, 7, 0)),
        (date(2026, 3, 8), time(1, 59), NY, utc(2026, 3, 8, 6, 59)),
        (date(2026, 11, 1), time(1, 30), NY, utc(2026, 11, 1, 5, 30)),  # twice: the first, EDT
        (date(2026, 11, 1), time(2, 30), NY, utc(2026, 11, 1, 7, 30)),
        # Berlin: CET +1, CEST +2; 2026 spring forward Mar 29 02:00 -> 03:00, fall back Oct 25 03:00 -> 02:00.
        (date(2026, 3, 29), time(2, 30), BERLIN, utc(2026, 3, 29, 1, 30)),  # 03:30 CEST
        (date(2026, 10, 25), time(2, 30), BERLIN, utc(2026, 10, 25, 0, 30)),  # first: CEST
        (date(2026, 10, 25), time(3, 30), BERLIN, utc(2026, 10, 25, 2, 30)),
        (date(2026, 12, 24), time(18), BERLIN, utc(2026, 12, 24, 17)),
        # Sydney: AEST +10, AEDT +11; DST ends Apr 5 2026 03:00 -> 02:00, starts Oct 4 2026 02:00 -> 03:00.
        (date(2026, 4, 5), time(2, 30), SYDNEY, utc(2026, 4, 4, 15, 30)),  # first: AEDT
        (date(2026, 10, 4), time(2, 30), SYDNEY, utc(2026, 10, 3, 16, 30)),  # 03:30 AEDT
        (date(2026, 7, 1), time(9), SYDNEY, utc(2026, 6, 30, 23)),
        # Kolkata +05:30, no DST.
        (date(2026, 3, 8), time(9), KOLKATA, utc(2026, 3, 8, 3, 30)),
        (date(2026, 11, 1), time(0), KOLKATA, utc(2026, 10, 31, 18, 30)),
        # The first and the last zones of the day.
        (date(2026, 1, 1), time(0), KIRITIMATI, utc(2025, 12, 31, 10)),
        (date(2026, 1, 1), time(0), PAGO_PAGO, utc(2026, 1, 1, 11)),
        # Leap day.
        (date(2028, 2, 29), time(12), NY, utc(2028, 2, 29, 17)),
    ],
)
def test_local_instant(day: date, at: time, zone: ZoneInfo, expected: datetime) -> None:
    assert local_instant(day, at, zone) == expected


def weekly(start: date, *weekdays: int, **kwargs: object) -> Recurrence:
    return Recurrence(Frequency.WEEKLY, time(9), start, weekdays=frozenset(weekdays), **kwargs)  # type: ignore[arg-type]


def daily(start: date, **kwargs: object) -> Recurrence:
    return Recurrence(Frequency.DAILY, time(9), start, **kwargs)  # type: ignore[arg-type]


def monthly(start: date, day: int, **kwargs: object) -> Recurrence:
    return Recurrence(Frequency.MONTHLY, time(9), start, day_of_month=day, **kwargs)  # type: ignore[arg-type]


MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (daily(date(2026, 1, 30), count=3), [date(2026, 1, 30), date(2026, 1, 31), date(2026, 2, 1)]),
        (
            daily(date(2026, 2, 27), every=3, end=date(2026, 3, 8)),
            [date(2026, 2, 27), date(2026, 3, 2), date(2026, 3, 5), date(2026, 3, 8)],
        ),
        (daily(date(2028, 2, 28), count=3), [date(2028, 2, 28), date(2028, 2, 29), date(2028, 3, 1)]),
        (daily(date(2026, 5, 1), end=date(2026, 4, 30)), []),
        (daily(date(2026, 5, 1), count=0), []),
        (daily(date(2026, 12, 30), every=2, count=2), [date(2026, 12, 30), date(2027, 1, 1)]),
        # Weekly: the first occurrence is the first chosen weekday on or after the start (Wed Nov 25, 2026).
        (
            weekly(date(2026, 11, 25), MON, THU, count=4),
            [date(2026, 11, 26), date(2026, 11, 30), date(2026, 12, 3), date(2026, 12, 7)],
        ),
        (weekly(date(2026, 11, 23), MON, count=1), [date(2026, 11, 23)]),  # the start day itself
        (weekly(date(2026, 11, 23), SUN, count=2), [date(2026, 11, 29), date(2026, 12, 6)]),
        (
            weekly(date(2026, 11, 25), TUE, every=2, count=3),
            [date(2026, 12, 1), date(2026, 12, 15), date(2026, 12, 29)],
        ),
        (
            weekly(date(2026, 11, 25), MON, FRI, every=2, count=4),
            [date(2026, 11, 27), date(2026, 12, 7), date(2026, 12, 11), date(2026, 12, 21)],
        ),
        (
            weekly(date(2026, 11, 25), WED, end=date(2026, 12, 9)),
            [date(2026, 11, 25), date(2026, 12, 2), date(2026, 12, 9)],
        ),
        (weekly(date(2026, 12, 28), THU, count=2), [date(2026, 12, 31), date(2027, 1, 7)]),
        # Monthly: a day a month lacks falls on its last day.
        (
            monthly(date(2026, 1, 15), 31, count=4),
            [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30)],
        ),
        (
            monthly(date(2028, 1, 1), 29, count=3),
            [date(2028, 1, 29), date(2028, 2, 29), date(2028, 3, 29)],
        ),
        (monthly(date(2026, 11, 20), 15, count=1), [date(2026, 12, 15)]),  # Nov 15 is before the start
        (
            monthly(date(2026, 11, 1), 1, every=3, count=3),
            [date(2026, 11, 1), date(2027, 2, 1), date(2027, 5, 1)],
        ),
        (monthly(date(2026, 1, 1), 10, end=date(2026, 3, 9)), [date(2026, 1, 10), date(2026, 2, 10)]),
        (monthly(date(2026, 2, 28), 30, count=2), [date(2026, 2, 28), date(2026, 3, 30)]),
        (
            monthly(date(2026, 12, 31), 31, count=3),
            [date(2026, 12, 31), date(2027, 1, 31), date(2027, 2, 28)],
        ),
    ],
)
def test_occurrence_days(rule: Recurrence, expected: list[date]) -> None:
    assert list(occurrence_days(rule))[: len(expected) + 1] == expected


@pytest.mark.parametrize(
    ("rule", "zone", "after", "expected"),
    [
        (weekly(date(2026, 11, 23), MON), NY, utc(2026, 11, 23, 15), utc(2026, 11, 30, 14)),
        (weekly(date(2026, 11, 23), MON), NY, utc(2026, 11, 23, 13), utc(2026, 11, 23, 14)),
        (weekly(date(2026, 11, 23), MON), KOLKATA, utc(2026, 11, 23, 3, 30), utc(2026, 11, 30, 3, 30)),
        (weekly(date(2026, 3, 2), SUN), NY, utc(2026, 3, 2), utc(2026, 3, 8, 13)),  # first EDT Sunday
        (daily(date(2026, 1, 1), count=2), NY, utc(2026, 1, 3), None),
    ],
)
def test_next_occurrence(
    rule: Recurrence, zone: ZoneInfo, after: datetime, expected: datetime | None
) -> None:
    assert next_occurrence(rule, zone, after) == expected


def test_a_run_in_users_zones_starts_when_the_first_zone_gets_there() -> None:
    start = run_start(date(2026, 11, 24), time(9))
    assert start == utc(2026, 11, 23, 19)  # 09:00 at UTC+14
    assert start <= local_instant(date(2026, 11, 24), time(9), KIRITIMATI)
    assert local_instant(date(2026, 11, 24), time(9), PAGO_PAGO) - start == timedelta(hours=25)


NIGHT = QuietHours(time(21), time(9))
LUNCH = QuietHours(time(13), time(14))


@pytest.mark.parametrize(
    ("quiet", "moment", "inside"),
    [
        (NIGHT, time(23), True),
        (NIGHT, time(0), True),
        (NIGHT, time(8, 59), True),
        (NIGHT, time(9), False),
        (NIGHT, time(20, 59), False),
        (NIGHT, time(21), True),
        (LUNCH, time(13, 30), True),
        (LUNCH, time(14), False),
        (LUNCH, time(12, 59), False),
    ],
)
def test_quiet_hours(quiet: QuietHours, moment: time, inside: bool) -> None:
    assert quiet.contains(moment) is inside


@pytest.mark.parametrize(
    ("due", "zone", "quiet", "expected"),
    [
        (utc(2026, 11, 24, 4, 30), NY, NIGHT, utc(2026, 11, 24, 14)),  # 23:30 -> 09:00 next day
        (utc(2026, 11, 24, 7), NY, NIGHT, utc(2026, 11, 24, 14)),  # 02:00 -> 09:00 same day
        (utc(2026, 11, 24, 15), NY, NIGHT, None),  # 10:00: outside
        (utc(2026, 11, 24, 18, 30), NY, LUNCH, utc(2026, 11, 24, 19)),
        (utc(2026, 11, 24, 16), KOLKATA, NIGHT, utc(2026, 11, 25, 3, 30)),  # 21:30 IST
        # The night the clocks spring forward in Berlin: an end at 02:30 does not exist; the
        # hours are over the moment the clocks jump from 02:00 to 03:00 CEST (01:00 UTC).
        (utc(2026, 3, 28, 22), BERLIN, QuietHours(time(22), time(2, 30)), utc(2026, 3, 29, 1)),
        # Sydney's fall back night: 02:30 happens twice (15:30 and 16:30 UTC); the hours end at
        # the second, so nothing goes out in the repeated hour that is still inside them.
        (utc(2026, 4, 4, 12), SYDNEY, QuietHours(time(22), time(2, 30)), utc(2026, 4, 4, 16, 30)),
        # Due at the second 02:10 (16:10 UTC): inside them, until the second 02:30.
        (utc(2026, 4, 4, 16, 10), SYDNEY, QuietHours(time(22), time(2, 30)), utc(2026, 4, 4, 16, 30)),
        # An end at 02:15 in New York's gap (02:00 -> 03:00 EDT): at the jump, 07:00 UTC.
        (utc(2026, 3, 8, 6, 30), NY, QuietHours(time(1), time(2, 15)), utc(2026, 3, 8, 7)),
    ],
)
def test_quiet_hours_delay(
    due: datetime, zone: ZoneInfo, quiet: QuietHours, expected: datetime | None
) -> None:
    assert quiet_hours_delay(due, zone, quiet) == expected


def test_quiet_hours_of_zero_length_are_refused() -> None:
    with pytest.raises(ValueError, match="zero length"):
        QuietHours(time(9), time(9))


@pytest.mark.parametrize(
    ("due", "zone", "cutoff", "expected"),
    [
        (utc(2026, 11, 23, 14), NY, time(12), utc(2026, 11, 23, 17)),
        (utc(2026, 11, 23, 14), NY, time(8), utc(2026, 11, 24, 13)),  # before the due time: next day
        (utc(2026, 11, 23, 14), NY, time(9), utc(2026, 11, 23, 14)),
        (utc(2026, 11, 23, 3, 30), KOLKATA, time(23, 59), utc(2026, 11, 23, 18, 29)),
        (utc(2026, 3, 7, 14), NY, time(2, 30), utc(2026, 3, 8, 7, 30)),  # lands in the gap: 03:30 EDT
        (utc(2026, 11, 23, 20), PAGO_PAGO, time(18), utc(2026, 11, 24, 5)),
    ],
)
def test_cutoff_instant(due: datetime, zone: ZoneInfo, cutoff: time, expected: datetime) -> None:
    assert cutoff_instant(due, zone, cutoff) == expected


@pytest.mark.parametrize(
    ("instant", "zone", "day"),
    [
        (utc(2026, 11, 24, 3), NY, date(2026, 11, 23)),
        (utc(2026, 11, 24, 3), KOLKATA, date(2026, 11, 24)),
        (utc(2026, 11, 24, 11), KIRITIMATI, date(2026, 11, 25)),
        (utc(2026, 11, 24, 10), PAGO_PAGO, date(2026, 11, 23)),
        (utc(2026, 11, 1, 4, 30), NY, date(2026, 11, 1)),
    ],
)
def test_local_day(instant: datetime, zone: ZoneInfo, day: date) -> None:
    assert local_day(instant, zone) == day


def test_local_week_follows_the_users_zone() -> None:
    monday_utc = utc(2026, 11, 30, 3)
    assert local_week(monday_utc, ZoneInfo("UTC")) == (2026, 49)
    assert local_week(monday_utc, NY) == (2026, 48)  # still Sunday evening in New York


@pytest.mark.parametrize(
    ("instant", "window"),
    [
        (utc(2026, 11, 23, 12, 3, 59), utc(2026, 11, 23, 12, 0)),
        (utc(2026, 11, 23, 12, 5), utc(2026, 11, 23, 12, 5)),
        (utc(2026, 11, 23, 23, 59, 59), utc(2026, 11, 23, 23, 55)),
    ],
)
def test_throttle_window(instant: datetime, window: datetime) -> None:
    assert throttle_window(instant) == window


@pytest.mark.parametrize("percent", [0.0, 10.0, 50.0, 90.0])
def test_control_groups_are_stable_and_sized(percent: float) -> None:
    users = [f"user-{i}" for i in range(20_000)]
    held = [u for u in users if in_control_group("campaigns/c1", u, percent)]
    assert abs(len(held) / len(users) * 100 - percent) < 1.0
    assert held == [u for u in users if in_control_group("campaigns/c1", u, percent)]  # every run alike
    if 0 < percent < 100:
        other = [u for u in users if in_control_group("campaigns/c2", u, percent)]
        assert other != held  # another campaign holds back other users
