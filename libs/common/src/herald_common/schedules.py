"""A campaign's schedule: its shape checked, and the times it asks for runs. The campaign service
checks schedules; the scheduler plans runs from them; both read them here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as pb
from herald_common import api, clock
from herald_common.errors import Validator
from herald_common.timing import (
    Frequency,
    QuietHours,
    Recurrence,
    next_occurrence,
    run_last_due,
    run_start,
    zone_named,
)

MAX_SEND_TIMES = 50
MAX_BEST_TIME_DAYS = 7
# When Best Time reaches users without history, unless the campaign or the account says.
DEFAULT_BEST_TIME_FALLBACK = time(12, 0)
MAX_OCCURRENCES = 10_000
MAX_LIVE_DELAY = timedelta(days=30)
# How far ahead a schedule may reach: a date past it is refused (a start in year 9999 would sit
# SCHEDULED forever, and date arithmetic near the calendar's end overflows).
HORIZON_YEARS = 10
_TOO_FAR = f"at most {HORIZON_YEARS} years ahead"
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):[0-5]\d\Z")
UTC_ZONE = ZoneInfo("UTC")
# How long before its planned instant a run in users' zones may start (UTC+14 versus UTC-12),
# with an hour to spare for DST.
RUN_LEAD = timedelta(hours=27)
_HH_MM = "HH:MM, 00:00 to 23:59"


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
        when is not None, path, "required: send_now, send_later, send_multiple, recurring or live"
    ):
        return
    horizon = clock.now() + timedelta(days=366 * HORIZON_YEARS)
    if when == "send_later":
        if check.require(
            schedule.send_later.HasField("send_time"), f"{path}.send_later.send_time", "required"
        ):
            at = api.from_timestamp(schedule.send_later.send_time)
            check.require(at <= horizon, f"{path}.send_later.send_time", _TOO_FAR)
    elif when == "send_multiple":
        times = [t.ToNanoseconds() for t in schedule.send_multiple.send_times]
        check.require(
            0 < len(times) <= MAX_SEND_TIMES,
            f"{path}.send_multiple.send_times",
            f"between 1 and {MAX_SEND_TIMES} times",
        )
        for i, t in enumerate(times):
            check.require(t not in times[:i], f"{path}.send_multiple.send_times[{i}]", "appears twice")
        for i, send_time in enumerate(schedule.send_multiple.send_times):
            check.require(
                api.from_timestamp(send_time) <= horizon, f"{path}.send_multiple.send_times[{i}]", _TOO_FAR
            )
    elif when == "recurring":
        _check_recurring(schedule.recurring, f"{path}.recurring", check)
        for name in ("start_date", "end_date"):
            day = _day(getattr(schedule.recurring, name))
            if day is not None:
                check.require(day <= horizon.date(), f"{path}.recurring.{name}", _TOO_FAR)
    elif when == "live":
        live = schedule.live
        for name, present in (
            ("start_time", live.HasField("start_time")),
            ("end_time", live.HasField("end_time")),
        ):
            if present:
                at = api.from_timestamp(getattr(live, name))
                check.require(at <= horizon, f"{path}.live.{name}", _TOO_FAR)
        if live.HasField("start_time") and live.HasField("end_time"):
            check.require(
                live.end_time.ToNanoseconds() > live.start_time.ToNanoseconds(),
                f"{path}.live.end_time",
                "must be after start_time",
            )
        delay = live.delay.ToTimedelta()
        check.require(timedelta(0) <= delay <= MAX_LIVE_DELAY, f"{path}.live.delay", "0 to 30 days")


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
    check.require(bool(_TIME_OF_DAY.match(rule.time_of_day)), f"{path}.time_of_day", _HH_MM)
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


def parse_time_of_day(text: str) -> time | None:
    """`HH:MM` as a time; None when it is not one."""
    if not _TIME_OF_DAY.match(text):
        return None
    hours, minutes = (int(part) for part in text.split(":"))
    return time(hours, minutes)


def check_delivery(campaign: pb.Campaign, path: str, check: Validator) -> None:
    """The shape of a campaign's delivery preferences."""
    delivery = campaign.delivery
    if delivery.HasField("best_time"):
        best = delivery.best_time
        check.require(
            campaign.schedule.WhichOneof("when") == "send_later",
            f"{path}.best_time",
            "Best Time delivers on the day of a send_later schedule (each user at their own hour), "
            "not with send now, several times, recurring or live",
        )
        check.require(0 <= best.days <= MAX_BEST_TIME_DAYS, f"{path}.best_time.days", "1 to 7 days (0 is 1)")
        if best.fallback_time:
            check.require(
                parse_time_of_day(best.fallback_time) is not None, f"{path}.best_time.fallback_time", _HH_MM
            )
    if delivery.user_timezone:
        check.require(
            campaign.schedule.WhichOneof("when") not in ("send_now", "live"),
            f"{path}.user_timezone",
            "needs a schedule with a time: send later, several times or recurring",
        )
    if delivery.cutoff_time:
        check.require(parse_time_of_day(delivery.cutoff_time) is not None, f"{path}.cutoff_time", _HH_MM)
        check.require(
            campaign.schedule.WhichOneof("when") != "live",
            f"{path}.cutoff_time",
            "a live campaign's messages go as users qualify: set its end_time instead",
        )
    if delivery.HasField("quiet_hours"):
        quiet = delivery.quiet_hours
        start, end = parse_time_of_day(quiet.start), parse_time_of_day(quiet.end)
        check.require(start is not None, f"{path}.quiet_hours.start", _HH_MM)
        check.require(end is not None, f"{path}.quiet_hours.end", _HH_MM)
        if start is not None and end is not None:
            check.require(start != end, f"{path}.quiet_hours.end", "must differ from start (zero length)")
        check.require(
            quiet.action != pb.QUIET_HOURS_ACTION_UNSPECIFIED,
            f"{path}.quiet_hours.action",
            "required: QUIET_HOURS_ACTION_DISCARD or QUIET_HOURS_ACTION_DELAY",
        )


@dataclass(frozen=True)
class DeliveryRules:
    """A campaign's delivery preferences, parsed for the scheduler."""

    user_timezone: bool
    cutoff: time | None
    quiet_hours: QuietHours | None
    discard_in_quiet_hours: bool
    throttle: bool
    frequency_caps: bool

    @classmethod
    def of(cls, campaign: pb.Campaign) -> DeliveryRules:
        delivery = campaign.delivery
        quiet = None
        if delivery.HasField("quiet_hours"):
            start = parse_time_of_day(delivery.quiet_hours.start)
            end = parse_time_of_day(delivery.quiet_hours.end)
            assert start is not None and end is not None  # checked
            quiet = QuietHours(start, end)
        return cls(
            user_timezone=in_users_zones(campaign),
            cutoff=parse_time_of_day(delivery.cutoff_time) if delivery.cutoff_time else None,
            quiet_hours=quiet,
            discard_in_quiet_hours=delivery.quiet_hours.action == pb.QUIET_HOURS_ACTION_DISCARD,
            throttle=delivery.throttle,
            frequency_caps=not delivery.ignore_frequency_caps,
        )


@dataclass(frozen=True)
class Occurrence:
    """One run a schedule asks for."""

    planned: datetime  # the schedule's own instant
    start: datetime  # when the run starts: `planned`, or as UTC+14 reaches its wall-clock time


def account_zone(settings: accounts_pb.AccountSettings) -> ZoneInfo:
    """The account's default time zone (UTC when it sets none)."""
    return zone_named(settings.default_timezone) or UTC_ZONE


def schedule_zone(campaign: pb.Campaign, default_zone: ZoneInfo) -> ZoneInfo:
    """The zone whose wall clock a schedule's times are read in: a recurring schedule's own, else
    the account's default."""
    if campaign.schedule.WhichOneof("when") == "recurring":
        return _zone(campaign.schedule.recurring.timezone) or UTC_ZONE
    return default_zone


def in_users_zones(campaign: pb.Campaign) -> bool:
    """Whether the campaign delivers at wall-clock times in each user's own zone."""
    return campaign.delivery.user_timezone or campaign.delivery.HasField("best_time")


def best_time_days(campaign: pb.Campaign) -> int:
    return campaign.delivery.best_time.days or 1


def best_time_fallback(campaign: pb.Campaign, settings: accounts_pb.AccountSettings) -> time:
    """The time Best Time gives users without history: the campaign's, the account's, or noon."""
    for text in (campaign.delivery.best_time.fallback_time, settings.best_time_fallback):
        parsed = parse_time_of_day(text) if text else None
        if parsed is not None:
            return parsed
    return DEFAULT_BEST_TIME_FALLBACK


def wall_clock(campaign: pb.Campaign, planned: datetime, default_zone: ZoneInfo) -> tuple[date, time]:
    """The calendar day and time of day an occurrence names, for delivery in users' zones (Best
    Time: from the start of the day, each user's hour following)."""
    local = planned.astimezone(schedule_zone(campaign, default_zone))
    if campaign.delivery.HasField("best_time"):
        return local.date(), time(0, 0)
    if campaign.schedule.WhichOneof("when") == "recurring":
        # The rule's own time, even where a DST gap moved this day's instant forward.
        return local.date(), recurrence(campaign.schedule.recurring)[0].at
    return local.date(), local.time().replace(tzinfo=None)


def _start_of(campaign: pb.Campaign, planned: datetime, default_zone: ZoneInfo) -> datetime:
    if not in_users_zones(campaign):
        return planned
    return run_start(*wall_clock(campaign, planned, default_zone))


def _last_due(campaign: pb.Campaign, planned: datetime, default_zone: ZoneInfo) -> datetime:
    """When the last zone on Earth reaches the occurrence's time (Best Time: the window's end)."""
    day, at = wall_clock(campaign, planned, default_zone)
    if campaign.delivery.HasField("best_time"):
        return run_last_due(day + timedelta(days=best_time_days(campaign) - 1), time(23, 59))
    return run_last_due(day, at)


def occurrences_after(
    campaign: pb.Campaign,
    default_zone: ZoneInfo,
    after: datetime,
    limit: int,
    *,
    under_way: bool = False,
) -> list[Occurrence]:
    """Up to `limit` runs the schedule asks for that start strictly after an instant, in order.
    With delivery in users' zones a run starts up to 26 hours before its planned instant; with
    `under_way` (publishing) a run the earliest zones have already reached but the last has not
    counts too, starting at `after`: its users whose time has passed are skipped."""
    if not in_users_zones(campaign):
        return [Occurrence(t, t) for t in times_after(campaign, after, limit)]
    found: list[Occurrence] = []
    cursor = after - RUN_LEAD
    while len(found) < limit:
        following = times_after(campaign, cursor, 1)
        if not following or following[0] <= cursor:
            break
        cursor = following[0]
        start = _start_of(campaign, cursor, default_zone)
        if start > after:
            found.append(Occurrence(cursor, start))
        elif under_way and _last_due(campaign, cursor, default_zone) > after:
            found.append(Occurrence(cursor, after))
    return found
