"""When each user gets a campaign, end to end through the public API with a clock the test moves:
delivery in users' own time zones, do-not-disturb hours (delay and discard), cut-off times,
throttles and frequency caps across campaigns and scheduler replicas.

Each test works in an account of its own, since account settings (throttle, caps) apply to every
campaign of an account.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
import pytest

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api, clock
from herald_common.skips import SkipReason
from herald_sandbox.segment_api import SegmentApi
from herald_scheduler import main as scheduler_main
from tests.conftest import CLOCK_START, Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
)

UTC_ZONE = "Etc/UTC"


@dataclass
class Account:
    """A fresh account with users in given zones, a segment of them and a Segment destination."""

    clients: Clients
    segment: str
    destination: str
    tag: str

    async def settings(self, settings: accounts_pb.AccountSettings) -> None:
        await self.clients.accounts.UpdateAccountSettings(
            accounts_pb.UpdateAccountSettingsRequest(settings=settings)
        )

    async def campaign(self, schedule: campaign_pb.Schedule, **fields: object) -> str:
        campaign = segment_export_campaign(self.segment, self.destination, schedule=schedule, **fields)
        created = await self.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        await self.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        return created.name

    async def runs(self, campaign: str) -> list[scheduler_pb.Run]:
        listed = await self.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=campaign))
        return list(listed.runs)

    async def stats(self, campaign: str) -> campaign_pb.CampaignStats:
        return await self.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{campaign}/stats")
        )

    async def settled(self, campaign: str, outcomes: int) -> campaign_pb.CampaignStats:
        """The stats once `outcomes` deliveries have their result."""

        async def counted() -> campaign_pb.CampaignStats | None:
            stats = await self.stats(campaign)
            return stats if stats.sent + stats.skipped + stats.failed >= outcomes else None

        await eventually(counted)
        stats = await counted()
        assert stats is not None
        return stats

    async def sent(self, campaign: str, count: int) -> None:
        async def reached() -> bool:
            return (await self.stats(campaign)).sent >= count

        await eventually(reached)

    async def explain(self, campaign: str, user_id: str) -> list[tuple[int, int]]:
        request = campaign_pb.ExplainDeliveryRequest(campaign=campaign, user_id=user_id)
        found = await self.clients.campaigns.ExplainDelivery(request)
        return [(d.decision, d.rule) for d in found.decisions]


@contextlib.asynccontextmanager
async def _account(
    platform: Platform, segment_api: SegmentApi, zones: dict[str, int]
) -> AsyncIterator[Account]:
    """An account whose users live in `zones` (zone name: how many users), with ids
    `{tag}-{zone, ':' for '/'}-{n}`."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token)
    clients = Clients.open(platform.addresses, key)
    tag = uuid.uuid4().hex[:8]
    try:
        users = [
            pb.User(user_id=f"{tag}-{zone.replace('/', ':')}-{i:04d}", timezone=_profile_zone(zone))
            for zone, count in zones.items()
            for i in range(count)
        ]
        for user in users:
            user.properties.update({"cohort": tag})
        for start in range(0, len(users), 1000):
            await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users[start : start + 1000]))
        segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
        destination = await create_segment_destination_for(clients, segment_api)
        yield Account(clients, segment.name, destination.name, tag)
    finally:
        await clients.close()


def _profile_zone(zone: str) -> str:
    """What a user's profile says: nothing for UTC users (the account's default zone)."""
    return "" if zone == UTC_ZONE else zone


def _later(at: datetime) -> campaign_pb.Schedule:
    return campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=api.timestamp(at)))


def _received(segment_api: SegmentApi, tag: str) -> dict[str, str]:
    """user id → timestamp of the export they received, for one account's users."""
    return {e["userId"]: e["timestamp"] for e in segment_api.events.values() if e["userId"].startswith(tag)}


def _exports(segment_api: SegmentApi, tag: str) -> list[tuple[str, str]]:
    """(user id, timestamp) of every export one account's users received."""
    return [(e["userId"], e["timestamp"]) for e in segment_api.events.values() if e["userId"].startswith(tag)]


def _zone_of(user_id: str) -> str:
    return user_id.split("-", 1)[1].rsplit("-", 1)[0].replace(":", "/")


async def _move_to(manual_clock: clock.ManualClock, at: datetime) -> None:
    manual_clock.advance(at - manual_clock.now())


async def test_a_weekly_campaign_reaches_each_user_at_their_own_local_time(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    zones = {"America/New_York": 20, "Asia/Kolkata": 20}
    async with _account(platform, segment_api, zones) as account:
        weekly = campaign_pb.Recurring(
            weekly=campaign_pb.Weekly(weekdays=[campaign_pb.WEEKDAY_TUESDAY]),
            time_of_day="09:00",
            start_date="2026-11-24",
            occurrences=2,
        )
        name = await account.campaign(
            campaign_pb.Schedule(recurring=weekly),
            delivery=campaign_pb.DeliveryPreferences(user_timezone=True),
        )

        async def planned() -> list[scheduler_pb.Run]:
            return await account.runs(name)

        await eventually(planned)
        [first] = await account.runs(name)
        # The run starts as UTC+14 reaches Tuesday 09:00: Monday 19:00 UTC.
        assert api.from_timestamp(first.scheduled_time) == datetime.fromisoformat("2026-11-23T19:00:00+00:00")
        assert api.from_timestamp(first.planned_time) == datetime.fromisoformat("2026-11-24T09:00:00+00:00")

        for week in (0, 1):
            start = datetime.fromisoformat("2026-11-23T19:00:01+00:00") + timedelta(weeks=week)
            await _move_to(manual_clock, start)

            async def releasing(n: int = week) -> bool:
                runs = await account.runs(name)
                return len(runs) > n and runs[n].state == scheduler_pb.RUN_STATE_RELEASING

            await eventually(releasing)
            run = (await account.runs(name))[week]
            assert (run.targeted, run.waiting, run.released) == (40, 40, 0)
            # Tuesday 09:00 in Kolkata is 03:30 UTC; in New York, 14:00 UTC.
            kolkata = datetime.fromisoformat("2026-11-24T03:30:00+00:00") + timedelta(weeks=week)
            new_york = datetime.fromisoformat("2026-11-24T14:00:00+00:00") + timedelta(weeks=week)
            await _move_to(manual_clock, kolkata - timedelta(seconds=1))
            await asyncio.sleep(1)  # time for the releaser to (wrongly) release anything early
            assert (await account.runs(name))[week].waiting == 40
            assert len(_exports(segment_api, account.tag)) == 40 * week
            await _move_to(manual_clock, kolkata + timedelta(seconds=1))
            await account.settled(name, 40 * week + 20)
            await _move_to(manual_clock, new_york + timedelta(seconds=1))
            await account.settled(name, 40 * week + 40)

        hours = Counter((_zone_of(user), at[:16]) for user, at in _exports(segment_api, account.tag))
        assert hours == {
            ("Asia/Kolkata", "2026-11-24T03:30"): 20,
            ("America/New_York", "2026-11-24T14:00"): 20,
            ("Asia/Kolkata", "2026-12-01T03:30"): 20,
            ("America/New_York", "2026-12-01T14:00"): 20,
        }
        runs = await account.runs(name)
        assert [r.state for r in runs] == [scheduler_pb.RUN_STATE_DISPATCHED] * 2
        assert api.from_timestamp(runs[0].first_release_time).hour == 3
        assert api.from_timestamp(runs[0].last_release_time).hour == 14


NEW_YORK_AND_TOKYO = {"America/New_York": 10, "Asia/Tokyo": 10}


async def _at_ten_pm(
    account: Account, action: campaign_pb.QuietHoursAction.ValueType, cutoff_time: str = ""
) -> str:
    """A campaign at 22:00 UTC with do-not-disturb hours from 23:00 to 08:00: 17:00 in New York,
    outside them; 07:00 the next day in Tokyo, inside them (they end at 23:00 UTC)."""
    quiet = campaign_pb.QuietHours(start="23:00", end="08:00", action=action)
    delivery = campaign_pb.DeliveryPreferences(quiet_hours=quiet, cutoff_time=cutoff_time)
    return await account.campaign(_later(CLOCK_START.replace(hour=22)), delivery=delivery)


async def test_do_not_disturb_hours_delay_deliveries_to_their_end(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        name = await _at_ten_pm(account, campaign_pb.QUIET_HOURS_ACTION_DELAY)
        await _move_to(manual_clock, CLOCK_START.replace(hour=22, second=1))
        await account.settled(name, 10)
        received = _received(segment_api, account.tag)
        assert {_zone_of(u) for u in received} == {"America/New_York"}
        # 08:00 in Tokyo is 23:00 UTC.
        await _move_to(manual_clock, CLOCK_START.replace(hour=23, second=1))
        stats = await account.settled(name, 20)
        assert (stats.sent, stats.skipped) == (20, 0)
        tokyo = {at[:16] for u, at in _received(segment_api, account.tag).items() if "Tokyo" in u}
        assert tokyo == {"2026-11-23T23:00"}


async def test_stopping_a_campaign_skips_what_still_waits(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        name = await _at_ten_pm(account, campaign_pb.QUIET_HOURS_ACTION_DELAY)
        await _move_to(manual_clock, CLOCK_START.replace(hour=22, second=1))
        await account.sent(name, 10)  # New York's; Tokyo's wait for 23:00 UTC
        await account.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name))
        stats = await account.settled(name, 20)
        assert (stats.sent, stats.skipped) == (10, 10)
        assert {r.reason: r.count for r in stats.failure_reasons} == {"campaign stopped": 10}
        [run] = await account.runs(name)
        assert (run.state, run.waiting) == (scheduler_pb.RUN_STATE_CANCELLED, 0)
        await _move_to(manual_clock, CLOCK_START.replace(hour=23, second=1))
        await asyncio.sleep(0.5)
        assert {_zone_of(u) for u in _received(segment_api, account.tag)} == {"America/New_York"}


async def test_do_not_disturb_hours_discard_what_falls_inside(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        name = await _at_ten_pm(account, campaign_pb.QUIET_HOURS_ACTION_DISCARD)
        await _move_to(manual_clock, CLOCK_START.replace(hour=22, second=1))
        stats = await account.settled(name, 20)
        assert (stats.sent, stats.skipped) == (10, 10)
        assert {r.reason: r.count for r in stats.failure_reasons} == {
            "due in do-not-disturb hours (discarded)": 10
        }
        assert {_zone_of(u) for u in _received(segment_api, account.tag)} == {"America/New_York"}
        tokyo_user = f"{account.tag}-Asia:Tokyo-0000"
        assert await account.explain(name, tokyo_user) == [
            (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_QUIET_HOURS)
        ]


async def test_a_cut_off_skips_users_who_would_be_late(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    # Tokyo's deliveries wait for the end of do-not-disturb hours (23:00 UTC), past the 22:30
    # cut-off: skipped. New York's go at 22:00, before it.
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        name = await _at_ten_pm(account, campaign_pb.QUIET_HOURS_ACTION_DELAY, cutoff_time="22:30")
        await _move_to(manual_clock, CLOCK_START.replace(hour=22, second=1))
        stats = await account.settled(name, 20)
        assert (stats.sent, stats.skipped) == (10, 10)
        assert {r.reason: r.count for r in stats.failure_reasons} == {"cut-off time passed": 10}
        assert {_zone_of(u) for u in _received(segment_api, account.tag)} == {"America/New_York"}
        tokyo_user = f"{account.tag}-Asia:Tokyo-0003"
        assert await account.explain(name, tokyo_user) == [
            (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_CUTOFF)
        ]

        # A run that reaches its users only after the cut-off (the platform was down, say) sends
        # nothing late either.
        late = await account.campaign(
            _later(CLOCK_START.replace(day=24, hour=10)),
            delivery=campaign_pb.DeliveryPreferences(cutoff_time="10:30"),
        )
        await eventually(lambda: account.runs(late))
        await _move_to(manual_clock, CLOCK_START.replace(day=24, hour=10, minute=45))
        stats = await account.settled(late, 20)
        assert (stats.sent, stats.skipped) == (0, 20)
        assert {r.reason for r in stats.failure_reasons} == {"cut-off time passed"}


async def test_a_throttle_spreads_deliveries_over_five_minute_windows_in_order_across_a_restart(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 1000}) as account:
        await account.settings(accounts_pb.AccountSettings(throttle_per_five_minutes=100))
        # Nine windows fit before the cut-off; the tenth hundred is throttled past it.
        delivery = campaign_pb.DeliveryPreferences(throttle=True, cutoff_time="13:45")
        name = await account.campaign(_later(CLOCK_START.replace(hour=13)), delivery=delivery)
        await eventually(lambda: account.runs(name))
        window = CLOCK_START.replace(hour=13)
        for n in range(1, 10):
            await _move_to(manual_clock, window + timedelta(seconds=1))
            await account.sent(name, 100 * n)
            received = _received(segment_api, account.tag)
            assert len(received) == 100 * n
            # The window's hundred are the next hundred in planning (user id) order.
            assert sorted(received)[-100:] == [
                f"{account.tag}-Etc:UTC-{i:04d}" for i in range(100 * (n - 1), 100 * n)
            ]
            assert Counter(at[:16] for at in received.values())[window.isoformat()[:16]] == 100
            window += timedelta(minutes=5)
            if n == 4:  # what waits is in PostgreSQL: a restart loses nothing
                await platform.restart_scheduler()
        # 13:45: the last hundred were held by the throttle until the cut-off passed.
        await _move_to(manual_clock, window + timedelta(seconds=1))
        stats = await account.settled(name, 1000)
        assert (stats.sent, stats.skipped) == (900, 100)
        assert {r.reason: r.count for r in stats.failure_reasons} == {
            "throttled until the cut-off time passed": 100
        }
        last_user = f"{account.tag}-Etc:UTC-0999"
        assert await account.explain(name, last_user) == [
            (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_THROTTLE)
        ]


@pytest.fixture
async def second_scheduler(platform: Platform) -> AsyncIterator[None]:
    """Another scheduler replica, sharing the work (and the frequency caps) with the first."""
    host = await scheduler_main.start(platform.settings, port=0)
    yield
    await host.stop()


async def test_frequency_caps_hold_across_campaigns_and_replicas(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock, second_scheduler: None
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 30, "Pacific/Kiritimati": 30}) as account:
        caps = [accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SEGMENT, per_day=1, per_week=2)]
        await account.settings(accounts_pb.AccountSettings(frequency_caps=caps))
        daily = campaign_pb.Recurring(
            daily=campaign_pb.EveryNDays(every=1), time_of_day="13:00", start_date="2026-11-23", occurrences=3
        )
        # Monday 13:00 UTC: the daily campaign reaches everyone, then the same day's second
        # campaign reaches nobody (one a day); a campaign that opts out reaches everyone.
        recurring = await account.campaign(campaign_pb.Schedule(recurring=daily))
        second = await account.campaign(_later(CLOCK_START.replace(hour=13, minute=30)))
        exempt = await account.campaign(
            _later(CLOCK_START.replace(hour=13, minute=45)),
            delivery=campaign_pb.DeliveryPreferences(ignore_frequency_caps=True),
        )
        await eventually(lambda: account.runs(exempt))
        await _move_to(manual_clock, CLOCK_START.replace(hour=13, second=1))
        assert (await account.settled(recurring, 60)).sent == 60
        await _move_to(manual_clock, CLOCK_START.replace(hour=13, minute=30, second=1))
        second_stats = await account.settled(second, 60)
        assert (second_stats.sent, second_stats.skipped) == (0, 60)
        assert {r.reason for r in second_stats.failure_reasons} == {"frequency cap reached"}
        await _move_to(manual_clock, CLOCK_START.replace(hour=13, minute=45, second=1))
        assert (await account.settled(exempt, 60)).sent == 60
        user = f"{account.tag}-Etc:UTC-0000"
        assert await account.explain(second, user) == [
            (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_FREQUENCY_CAP)
        ]

        # Tuesday: a new local day, the second of the week. Wednesday: the week's two are spent.
        await _move_to(manual_clock, CLOCK_START.replace(day=24, hour=13, second=1))
        assert (await account.settled(recurring, 120)).sent == 120
        await _move_to(manual_clock, CLOCK_START.replace(day=25, hour=13, second=1))
        stats = await account.settled(recurring, 180)
        assert (stats.sent, stats.skipped) == (120, 60)
        assert {r.reason for r in stats.failure_reasons} == {"frequency cap reached"}


def _quiet(
    start: str = "21:00",
    end: str = "09:00",
    action: campaign_pb.QuietHoursAction.ValueType = campaign_pb.QUIET_HOURS_ACTION_DELAY,
) -> campaign_pb.DeliveryPreferences:
    return campaign_pb.DeliveryPreferences(
        quiet_hours=campaign_pb.QuietHours(start=start, end=end, action=action)
    )


@pytest.mark.parametrize(
    ("delivery", "schedule", "field"),
    [
        (_quiet(end="21:00"), None, "campaign.delivery.quiet_hours.end"),
        (_quiet(start="25:00"), None, "campaign.delivery.quiet_hours.start"),
        (
            _quiet(action=campaign_pb.QUIET_HOURS_ACTION_UNSPECIFIED),
            None,
            "campaign.delivery.quiet_hours.action",
        ),
        (campaign_pb.DeliveryPreferences(cutoff_time="9am"), None, "campaign.delivery.cutoff_time"),
        (
            campaign_pb.DeliveryPreferences(user_timezone=True),
            campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
            "campaign.delivery.user_timezone",
        ),
    ],
)
async def test_bad_delivery_preferences_name_the_field_and_write_nothing(
    platform: Platform,
    segment_api: SegmentApi,
    delivery: campaign_pb.DeliveryPreferences,
    schedule: campaign_pb.Schedule | None,
    field: str,
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 1}) as account:
        campaign = segment_export_campaign(
            account.segment,
            account.destination,
            schedule=schedule or _later(CLOCK_START + timedelta(days=1)),
            delivery=delivery,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(campaign=campaign)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(raised.value)
        listed = await account.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
        assert not listed.campaigns


async def test_publishing_needs_what_the_delivery_rules_rely_on(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 1}) as account:
        # A throttle needs the account's limit.
        throttled = segment_export_campaign(
            account.segment,
            account.destination,
            schedule=_later(CLOCK_START + timedelta(hours=1)),
            delivery=campaign_pb.DeliveryPreferences(throttle=True),
        )
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=throttled)
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.campaigns.PublishCampaign(
                campaign_pb.PublishCampaignRequest(name=created.name)
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "throttle_per_five_minutes" in (raised.value.details() or "")
        # Delivery in users' zones needs the time ahead in some zone: Sunday 20:00 has passed in
        # every one by Monday 12:00 UTC (the last, UTC-12, reached it at 08:00 UTC).
        local = segment_export_campaign(
            account.segment,
            account.destination,
            schedule=_later(CLOCK_START.replace(day=22, hour=20)),
            delivery=campaign_pb.DeliveryPreferences(user_timezone=True),
        )
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=local)
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.campaigns.PublishCampaign(
                campaign_pb.PublishCampaignRequest(name=created.name)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "campaign.schedule.send_later.send_time" in field_violations(raised.value)
        got = await account.clients.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        assert got.state == campaign_pb.State.STATE_DRAFT


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (accounts_pb.AccountSettings(default_timezone="Mars/Olympus"), "settings.default_timezone"),
        (accounts_pb.AccountSettings(throttle_per_five_minutes=-1), "settings.throttle_per_five_minutes"),
        (
            accounts_pb.AccountSettings(frequency_caps=[accounts_pb.FrequencyCap(per_day=1)]),
            "settings.frequency_caps[0].channel",
        ),
        (
            accounts_pb.AccountSettings(
                frequency_caps=[accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SMS)]
            ),
            "settings.frequency_caps[0]",
        ),
        (
            accounts_pb.AccountSettings(
                frequency_caps=[
                    accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SMS, per_day=1),
                    accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SMS, per_week=3),
                ]
            ),
            "settings.frequency_caps[1].channel",
        ),
        (accounts_pb.AccountSettings(alert_webhook_url="ftp://example.com"), "settings.alert_webhook_url"),
        (
            accounts_pb.AccountSettings(
                frequency_caps=[accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SMS, per_day=1)]
                * 5000
            ),
            "settings.frequency_caps",
        ),
    ],
)
async def test_bad_account_settings_name_the_field_and_change_nothing(
    platform: Platform, segment_api: SegmentApi, bad: accounts_pb.AccountSettings, field: str
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 1}) as account:
        good = accounts_pb.AccountSettings(default_timezone="Europe/Berlin")
        await account.settings(good)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.settings(bad)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(raised.value)
        assert (await account.clients.accounts.GetAccount(accounts_pb.GetAccountRequest())).settings == good


async def test_published_after_the_first_zones_passed_the_time_the_rest_still_get_it(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    """Monday 09:00 in users' zones, published at 12:00 UTC: past in Tokyo, ahead in New York."""
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        name = await account.campaign(
            _later(CLOCK_START.replace(hour=9)), delivery=campaign_pb.DeliveryPreferences(user_timezone=True)
        )
        await _move_to(manual_clock, CLOCK_START.replace(hour=14, second=1))  # 09:00 in New York
        stats = await account.settled(name, 20)
        assert (stats.sent, stats.skipped) == (10, 10)
        assert {r.reason: r.count for r in stats.failure_reasons} == {SkipReason.SEND_TIME_PASSED.value: 10}
        assert {_zone_of(u) for u in _received(segment_api, account.tag)} == {"America/New_York"}
        assert {at[:16] for at in _received(segment_api, account.tag).values()} == {"2026-11-23T14:00"}
        tokyo_user = f"{account.tag}-Asia:Tokyo-0000"
        assert await account.explain(name, tokyo_user) == [
            (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_SCHEDULE)
        ]


async def test_a_recurring_campaign_published_late_keeps_its_first_day_where_it_is_ahead(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, NEW_YORK_AND_TOKYO) as account:
        daily = campaign_pb.Recurring(
            daily=campaign_pb.EveryNDays(every=1), time_of_day="09:00", start_date="2026-11-23", occurrences=2
        )
        name = await account.campaign(
            campaign_pb.Schedule(recurring=daily),
            delivery=campaign_pb.DeliveryPreferences(user_timezone=True),
        )
        await _move_to(manual_clock, CLOCK_START.replace(hour=14, second=1))
        await account.settled(name, 20)  # Monday: New York sent, Tokyo past
        await _move_to(manual_clock, CLOCK_START.replace(day=24, hour=14, second=1))  # Tuesday, both
        stats = await account.settled(name, 40)
        assert (stats.sent, stats.skipped) == (30, 10)
        days = Counter((_zone_of(u), at[:10]) for u, at in _exports(segment_api, account.tag))
        assert days == {
            ("America/New_York", "2026-11-23"): 10,
            ("Asia/Tokyo", "2026-11-24"): 10,
            ("America/New_York", "2026-11-24"): 10,
        }


async def test_several_send_times_with_one_past_keep_the_others_and_say_so(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 5}) as account:
        times = [CLOCK_START.replace(hour=11), CLOCK_START.replace(hour=13)]  # 11:00 is past
        campaign = segment_export_campaign(
            account.segment,
            account.destination,
            schedule=campaign_pb.Schedule(
                send_multiple=campaign_pb.SendMultiple(send_times=[api.timestamp(t) for t in times])
            ),
        )
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        published = await account.clients.campaigns.PublishCampaign(
            campaign_pb.PublishCampaignRequest(name=created.name)
        )
        assert published.state == campaign_pb.State.STATE_SCHEDULED
        [note] = published.publish_notes
        assert "send_times[0]" in note and "dropped" in note
        await _move_to(manual_clock, CLOCK_START.replace(hour=13, second=1))
        stats = await account.settled(created.name, 5)
        assert stats.sent == 5
        assert len(await account.runs(created.name)) == 1


async def test_a_cut_off_at_the_send_time_itself_is_refused(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    async with _account(platform, segment_api, {UTC_ZONE: 1}) as account:
        campaign = segment_export_campaign(
            account.segment,
            account.destination,
            schedule=_later(CLOCK_START.replace(hour=13)),
            delivery=campaign_pb.DeliveryPreferences(cutoff_time="13:00"),
        )
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.campaigns.PublishCampaign(
                campaign_pb.PublishCampaignRequest(name=created.name)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "campaign.delivery.cutoff_time" in field_violations(raised.value)
        got = await account.clients.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        assert got.state == campaign_pb.State.STATE_DRAFT
