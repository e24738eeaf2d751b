"""A campaign's schedule: its shape checked, and the times it asks for runs. The campaign service
checks schedules; the scheduler plans runs from them; both read them here."""

from __future__ import annotations

import re
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald_common import api
from herald_common.errors import Validator
from herald_common.timing import Frequency, Recurrence, next_occurrence, zone_named

MAX_SEND_TIMES = 50
MAX_OCCURRENCES = 10_000
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
UTC_ZONE = ZoneInfo("UTC")


def _zone(name: str) -> ZoneInfo | None:
    return zone_named(name) if name else UTC_ZONE


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None


def check_schedule(schedule: pb.Schedule, path: str, check: Validator) -> None:
    """The schedule's shape; whether its times are still ahead is checked at publish."""
    when = schedule.WhichOneof("when")
    if not check.require(
        when is not None, path, "required: send_now, send_later, send_multiple or recurring"
    ):
        return
    if when == "send_later":
        check.require(schedule.send_later.HasField("send_time"), f"{path}.send_later.send_time", "required")
    elif when == "send_multiple":
        times = [t.ToNanoseconds() for t in schedule.send_multiple.send_times]
        check.require(
            0 < len(times) <= MAX_SEND_TIMES,
            f"{path}.send_multiple.send_times",
            f"between 1 and {MAX_SEND_TIMES} times",
        )
        for i, t in enumerate(times):
            check.require(t not in times[:i], f"{path}.send_multiple.send_times[{i}]", "appears twice")
    elif when == "recurring":
        _check_recurring(schedule.recurring, f"{path}.recurring", check)


def _check_recurring(rule: pb.Recurring, path: str, check: Validator) -> None:
    frequency = rule.WhichOneof("frequency")
    if frequency is None:
        check.add(path, "one of daily, weekly or monthly is required")
    elif frequency == "daily":
        check.require(1 <= rule.daily.every <= 365, f"{path}.daily.every", "1 to 365 days")
    elif frequency == "weekly":
        days = list(rule.weekly.weekdays)
        check.require(bool(days), f"{path}.weekly.weekdays", "at least one weekday")
        check.require(pb.WEEKDAY_UNSPECIFIED not in days, f"{path}.weekly.weekdays", "a weekday is not set")
        check.require(0 <= rule.weekly.every <= 52, f"{path}.weekly.every", "0 (every week) to 52")
    else:
        check.require(1 <= rule.monthly.day_of_month <= 31, f"{path}.monthly.day_of_month", "1 to 31")
        check.require(0 <= rule.monthly.every <= 12, f"{path}.monthly.every", "0 (every month) to 12")
    check.require(bool(_TIME_OF_DAY.match(rule.time_of_day)), f"{path}.time_of_day", "HH:MM, 00:00 to 23:59")
    start = _day(rule.start_date)
    check.require(start is not None, f"{path}.start_date", "a date as YYYY-MM-DD")
    if rule.end_date:
        end = _day(rule.end_date)
        if check.require(end is not None, f"{path}.end_date", "a date as YYYY-MM-DD") and start is not None:
            check.require(
                end is not None and end >= start, f"{path}.end_date", "must not be before start_date"
            )
    check.require(
        0 <= rule.occurrences <= MAX_OCCURRENCES, f"{path}.occurrences", f"0 (no limit) to {MAX_OCCURRENCES}"
    )
    check.require(
        _zone(rule.timezone) is not None, f"{path}.timezone", f"unknown IANA time zone {rule.timezone!r}"
    )


def recurrence(rule: pb.Recurring) -> tuple[Recurrence, ZoneInfo]:
    """A checked Recurring as the arithmetic's rule, and its zone."""
    frequency = rule.WhichOneof("frequency")
    hours, minutes = (int(part) for part in rule.time_of_day.split(":"))
    start = date.fromisoformat(rule.start_date)
    common = {
        "at": time(hours, minutes),
        "start": start,
        "end": date.fromisoformat(rule.end_date) if rule.end_date else None,
        "count": rule.occurrences or None,
    }
    if frequency == "daily":
        parsed = Recurrence(Frequency.DAILY, every=rule.daily.every, **common)  # type: ignore[arg-type]
    elif frequency == "weekly":
        weekdays = frozenset(d - 1 for d in rule.weekly.weekdays)  # WEEKDAY_MONDAY is 1, date.weekday() 0
        parsed = Recurrence(Frequency.WEEKLY, every=rule.weekly.every or 1, weekdays=weekdays, **common)  # type: ignore[arg-type]
    else:
        parsed = Recurrence(
            Frequency.MONTHLY,
            every=rule.monthly.every or 1,
            day_of_month=rule.monthly.day_of_month,
            **common,  # type: ignore[arg-type]
        )
    zone = _zone(rule.timezone)
    assert zone is not None  # checked
    return parsed, zone


def times_after(campaign: pb.Campaign, after: datetime, limit: int) -> list[datetime]:
    """Up to `limit` times the schedule asks for a run, strictly after an instant, in order.
    Send-now asks for its publish time whatever `after` is."""
    schedule = campaign.schedule
    when = schedule.WhichOneof("when")
    if when == "send_now":
        return [api.from_timestamp(campaign.publish_time)][:limit]
    if when == "send_later":
        return [t for t in [api.from_timestamp(schedule.send_later.send_time)] if t > after][:limit]
    if when == "send_multiple":
        return sorted(t for t in map(api.from_timestamp, schedule.send_multiple.send_times) if t > after)[
            :limit
        ]
    if when == "recurring":
        rule, zone = recurrence(schedule.recurring)
        found: list[datetime] = []
        while len(found) < limit:
            following = next_occurrence(rule, zone, found[-1] if found else after)
            if following is None:
                break
            found.append(following)
        return found
    return []
