"""When each user of a run is due, and which timing rule (do-not-disturb hours, cut-off) skips
them. Every user of one zone shares the answer, so a run works it out once per zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald_common.schedules import (
    DeliveryRules,
    account_zone,
    best_time_days,
    best_time_fallback,
    schedule_zone,
    wall_clock,
)
from herald_common.skips import SkipReason
from herald_common.timing import best_local_time, cutoff_instant, local_instant, quiet_hours_delay, zone_named


@dataclass(frozen=True)
class Due:
    zone: str  # the IANA zone the user's local day is counted in
    at: datetime  # when the delivery may be handed over
    cutoff_at: datetime | None  # not handed over by then: skipped
    skip: SkipReason | None  # a timing rule skips it outright


class RunTiming:
    def __init__(
        self,
        campaign: campaign_pb.Campaign,
        planned: datetime,
        settings: accounts_pb.AccountSettings,
        started: datetime | None = None,
    ) -> None:
        self.rules = DeliveryRules.of(campaign)
        self.planned = planned
        # When the run started: in users' own zones, a user's time before it had passed when the
        # campaign was published (a run on time starts as the first zone reaches the time).
        self.started = started
        self.default_zone = account_zone(settings)
        self.schedule_zone = schedule_zone(campaign, self.default_zone)
        self.wall = wall_clock(campaign, planned, self.default_zone) if self.rules.user_timezone else None
        self.best_time = campaign.delivery.HasField("best_time")
        self.best_time_days = best_time_days(campaign)
        self.fallback = best_time_fallback(campaign, settings)
        self._by_zone: dict[tuple[str, int | None], list[Due]] = {}
        self._chosen: dict[tuple[str, int | None], Due] = {}

    def of(self, timezone: str, best_hour_utc: int | None = None) -> Due:
        """The answer for users whose profile names this zone (empty or unknown: the account's),
        and, for Best Time, whose best hour is this (None: no history): with Best Time, the first
        day of the window whose time was still ahead when the run started (else the last's)."""
        key = (timezone, best_hour_utc if self.best_time else None)
        chosen = self._chosen.get(key)
        if chosen is None:
            options = self.options(timezone, best_hour_utc)
            chosen = next((o for o in options if o.skip != SkipReason.SEND_TIME_PASSED), options[-1])
            self._chosen[key] = chosen
        return chosen

    def options(self, timezone: str, best_hour_utc: int | None = None) -> list[Due]:
        """The user's Due on each day they may get the message, first first: one day, or each
        day of a Best Time window (a day whose time had passed when the run started answers
        SEND_TIME_PASSED). Worked out once per zone (and best hour)."""
        key = (timezone, best_hour_utc if self.best_time else None)
        known = self._by_zone.get(key)
        if known is None:
            zone = (zone_named(timezone) if timezone else None) or self.default_zone
            known = self._by_zone[key] = self._work_out(zone, key[1])
        return known

    def _work_out(self, zone: ZoneInfo, best_hour_utc: int | None) -> list[Due]:
        if self.best_time:
            assert self.wall is not None
            days = [self.wall[0] + timedelta(days=offset) for offset in range(self.best_time_days)]
            return [
                self._rules_applied(
                    zone, local_instant(day, best_local_time(day, best_hour_utc, zone, self.fallback), zone)
                )
                for day in days
            ]
        due = self.planned if self.wall is None else local_instant(*self.wall, zone)
        return [self._rules_applied(zone, due)]

    def _rules_applied(self, zone: ZoneInfo, due: datetime) -> Due:
        """The delivery due at `due` in a user's zone, with do-not-disturb hours and the cut-off."""
        rules = self.rules
        cutoff_zone = zone if rules.user_timezone else self.schedule_zone
        cutoff_at = cutoff_instant(due, cutoff_zone, rules.cutoff) if rules.cutoff else None
        skip = None
        if self.wall is not None and self.started is not None and due < self.started:
            return Due(zone=zone.key, at=due, cutoff_at=cutoff_at, skip=SkipReason.SEND_TIME_PASSED)
        if rules.quiet_hours is not None:
            delayed = quiet_hours_delay(due, zone, rules.quiet_hours)
            if delayed is not None:
                if rules.discard_in_quiet_hours:
                    skip = SkipReason.QUIET_HOURS
                due = delayed
        if skip is None and cutoff_at is not None and due >= cutoff_at:
            skip = SkipReason.CUTOFF
        return Due(zone=zone.key, at=due, cutoff_at=cutoff_at, skip=skip)
