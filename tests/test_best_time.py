"""Best Time delivery on the manual clock: each user gets the message at the hour of the day their
own sessions, opens and clicks say, in their zone; users without history at the fallback time."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
)

# The campaign's day: Tuesday 24 November 2026 (winter: Berlin UTC+1, New York UTC-5).
DAY = datetime(2026, 11, 24, tzinfo=UTC)


def _activity(user_id: str, name: str, hours_utc: list[int]) -> list[pb.Event]:
    """Events of the user's, a week before the campaign, at these UTC hours."""
    made = []
    for n, hour in enumerate(hours_utc):
        event = pb.Event(user_id=user_id, name=name, client_event_id=uuid.uuid4().hex)
        event.time.FromDatetime(DAY - timedelta(days=7 - n % 5) + timedelta(hours=hour, minutes=n % 50))
        made.append(event)
    return made


@dataclass
class Audience:
    """An account of its own with a segment of the users the test adds, and a Segment source."""

    clients: Clients
    tag: str
    segment: str
    destination: str
    clock: clock.ManualClock

    async def add(self, zones: dict[str, str], history: Sequence[tuple[str, str, list[int]]] = ()) -> None:
        """Users (name: zone), and (user, event, UTC hours) of their past activity."""
        cohort = Struct()
        cohort.update({"cohort": self.tag})
        users = [pb.User(user_id=self.user(n), timezone=zone, properties=cohort) for n, zone in zones.items()]
        await self.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
        events = [e for name, event, hours in history for e in _activity(self.user(name), event, hours)]
        if events:
            await self.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=events))

    def user(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def campaign(self, best_time: campaign_pb.BestTime, **fields: Any) -> campaign_pb.Campaign:
        """A Segment export on DAY, with Best Time."""
        send_time = Timestamp()
        send_time.FromDatetime(DAY)
        delivery = fields.pop("delivery", campaign_pb.DeliveryPreferences())
        delivery.best_time.CopyFrom(best_time)
        return segment_export_campaign(
            self.segment,
            self.destination,
            schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=send_time)),
            delivery=delivery,
            **fields,
        )

    async def publish(self, best_time: campaign_pb.BestTime, **fields: Any) -> str:
        created = await self.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=self.campaign(best_time, **fields))
        )
        await self.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        return created.name

    async def until(self, campaign: str, sent: int, skipped: int = 0, *reasons: str) -> None:
        """Waits until the campaign's stats show these counts (and skip reasons)."""

        async def reached() -> bool:
            stats = await self.clients.campaigns.GetCampaignStats(
                campaign_pb.GetCampaignStatsRequest(name=f"{campaign}/stats")
            )
            found = [r.reason for r in stats.failure_reasons]
            return (stats.sent, stats.skipped) == (sent, skipped) and (not reasons or found == list(reasons))

        await eventually(reached, within=20)

    async def explained(self, campaign: str, name: str) -> str:
        """ExplainDelivery's Best Time answer for a user."""
        found = await self.clients.campaigns.ExplainDelivery(
            campaign_pb.ExplainDeliveryRequest(campaign=campaign, user_id=self.user(name))
        )
        return found.best_time

    def move_to(self, moment: datetime) -> None:
        self.clock.advance(moment - self.clock.now())


@pytest.fixture
async def audience(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> AsyncIterator[Audience]:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"bt {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(clients, segment_api)
    yield Audience(clients, tag, segment.name, destination.name, manual_clock)
    await clients.close()


async def test_each_user_gets_the_message_at_their_best_hour_in_their_zone(audience: Audience) -> None:
    # Berlin opens the app mostly at 18:xx UTC (19:xx at home); New York browses at 14:xx UTC
    # (09:xx at home); Kolkata has no history. Other events say nothing about when they are there.
    await audience.add(
        {"berlin": "Europe/Berlin", "ny": "America/New_York", "kolkata": "Asia/Kolkata"},
        [
            ("berlin", "App Opened", [18, 18, 18, 7, 21]),
            ("berlin", "Notification Clicked", [18]),
            ("ny", "Page Viewed", [14, 14, 20]),
            ("kolkata", "Charged", [3, 3, 3]),
        ],
    )
    name = await audience.publish(campaign_pb.BestTime(days=1, fallback_time="10:30"))
    # Kolkata's fallback 10:30 is 05:00 UTC; New York's 09:00 is 14:00 UTC; Berlin's 19:00 is 18:00 UTC.
    for hours, minutes, sent in ((4, 59, 0), (5, 1, 1), (13, 59, 1), (14, 1, 2), (17, 59, 2), (18, 1, 3)):
        audience.move_to(DAY + timedelta(hours=hours, minutes=minutes))
        await audience.until(name, sent)

    async def explained(user: str) -> str:
        return await audience.explained(name, user)

    assert (await explained("berlin")).startswith(
        "19:00 on 2026-11-24 in Europe/Berlin: their best hour, with 4 "
    )
    assert (await explained("ny")).startswith("09:00 on 2026-11-24 in America/New_York: their best hour")
    assert (await explained("kolkata")).startswith("10:30 on 2026-11-24 in Asia/Kolkata: the fallback time")


async def test_best_time_needs_a_day(audience: Audience) -> None:
    cases = {
        "campaign.delivery.best_time": campaign_pb.BestTime(),
        "campaign.delivery.best_time.days": campaign_pb.BestTime(days=8),
        "campaign.delivery.best_time.fallback_time": campaign_pb.BestTime(fallback_time="25:00"),
    }
    for field, best in cases.items():
        campaign = audience.campaign(best)
        campaign.schedule.CopyFrom(campaign_pb.Schedule(send_now=campaign_pb.SendNow()))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audience.clients.campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(campaign=campaign)
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(refused.value), field_violations(refused.value)


async def test_the_per_day_limit_passes_users_to_the_next_day_of_the_window(audience: Audience) -> None:
    await audience.add({str(n): "UTC" for n in range(3)})
    limit = campaign_pb.Targeting(daily_limit=2)
    two_days = await audience.publish(campaign_pb.BestTime(days=2, fallback_time="10:00"), targeting=limit)
    one_day = await audience.publish(campaign_pb.BestTime(days=1, fallback_time="10:00"), targeting=limit)
    audience.move_to(DAY + timedelta(hours=10, minutes=1))
    await audience.until(two_days, 2)
    # A one-day window has no next day: the third is left out, with the reason.
    await audience.until(
        one_day, 2, 1, "every day of the Best Time window had reached the campaign's daily limit"
    )
    audience.move_to(DAY + timedelta(days=1, hours=10, minutes=1))
    await audience.until(two_days, 3)
    explained = sorted([await audience.explained(two_days, str(n)) for n in range(3)])
    # Two got it on the first day; the third, held back by the limit, on the second.
    assert [e.split(" (")[0].split(": ")[0] for e in explained] == [
        "10:00 on 2026-11-24 in UTC",
        "10:00 on 2026-11-24 in UTC",
        "10:00 on 2026-11-25 in UTC",
    ]
    assert explained[2].startswith("10:00 on 2026-11-25 in UTC (day 2 of the window): the fallback time")


async def test_a_best_hour_already_passed_at_publishing_falls_on_the_next_day(audience: Audience) -> None:
    await audience.add({"late": "UTC"})
    audience.move_to(DAY + timedelta(hours=12))
    name = await audience.publish(campaign_pb.BestTime(days=2, fallback_time="10:00"))
    assert (await audience.explained(name, "late")).startswith(
        "10:00 on 2026-11-25 in UTC (day 2 of the window): the fallback time"
    )
    audience.move_to(DAY + timedelta(days=1, hours=9, minutes=59))
    await audience.until(name, 0)
    audience.move_to(DAY + timedelta(days=1, hours=10, minutes=1))
    await audience.until(name, 1)


async def test_do_not_disturb_hours_apply_to_the_best_hour(audience: Audience) -> None:
    await audience.add(
        {"evening": "Europe/Berlin", "morning": "Europe/Berlin"},
        [("evening", "App Opened", [20, 20]), ("morning", "App Opened", [8, 8])],
    )
    # The evening user's best hour is 21:00 in Berlin, inside the do-not-disturb hours.
    quiet = campaign_pb.QuietHours(start="21:00", end="08:00", action=campaign_pb.QUIET_HOURS_ACTION_DISCARD)
    name = await audience.publish(
        campaign_pb.BestTime(), delivery=campaign_pb.DeliveryPreferences(quiet_hours=quiet)
    )
    audience.move_to(DAY + timedelta(hours=9, minutes=1))  # 10:01 in Berlin
    await audience.until(name, 1, 1, "due in do-not-disturb hours (discarded)")
