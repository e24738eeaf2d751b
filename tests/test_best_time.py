"""Best Time delivery on the manual clock: each user gets the message at the hour of the day their
own sessions, opens and clicks say, in their zone; users without history at the fallback time."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from tests.conftest import Platform, eventually
from tests.fakes.segment_api import SegmentApi
from tests.harness import Clients, create_account
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination,
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


async def test_each_user_gets_the_message_at_their_best_hour_in_their_zone(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"bt {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    berlin, new_york, kolkata = f"{tag}-berlin", f"{tag}-ny", f"{tag}-kolkata"
    await clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(
            users=[
                pb.User(user_id=berlin, timezone="Europe/Berlin", properties=_cohort(tag)),
                pb.User(user_id=new_york, timezone="America/New_York", properties=_cohort(tag)),
                pb.User(user_id=kolkata, timezone="Asia/Kolkata", properties=_cohort(tag)),
            ]
        )
    )
    # Berlin opens the app mostly at 18:xx UTC (19:xx at home); New York browses at 14:xx UTC
    # (09:xx at home); Kolkata has no history. Other events say nothing about when they are there.
    history = (
        _activity(berlin, "App Opened", [18, 18, 18, 7, 21])
        + _activity(berlin, "Notification Clicked", [18])
        + _activity(new_york, "Page Viewed", [14, 14, 20])
        + _activity(kolkata, "Charged", [3, 3, 3])
    )
    await clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=history))
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination(
        clients, segment_api.url, next(iter(segment_api.write_keys))
    )
    send_time = Timestamp()
    send_time.FromDatetime(DAY)
    campaign = segment_export_campaign(
        segment.name,
        destination.name,
        schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=send_time)),
        delivery=campaign_pb.DeliveryPreferences(
            best_time=campaign_pb.BestTime(days=1, fallback_time="10:30")
        ),
    )
    created = await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    async def sent_by(moment: datetime, expected: int) -> None:
        manual_clock.advance(moment - manual_clock.now())

        async def reached() -> bool:
            stats = await clients.campaigns.GetCampaignStats(
                campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
            )
            return stats.sent == expected

        await eventually(reached, within=20)

    # Kolkata's fallback 10:30 is 05:00 UTC; New York's 09:00 is 14:00 UTC; Berlin's 19:00 is 18:00 UTC.
    await sent_by(DAY + timedelta(hours=4, minutes=59), 0)
    await sent_by(DAY + timedelta(hours=5, minutes=1), 1)
    await sent_by(DAY + timedelta(hours=13, minutes=59), 1)
    await sent_by(DAY + timedelta(hours=14, minutes=1), 2)
    await sent_by(DAY + timedelta(hours=17, minutes=59), 2)
    await sent_by(DAY + timedelta(hours=18, minutes=1), 3)

    async def explained(user_id: str) -> str:
        found = await clients.campaigns.ExplainDelivery(
            campaign_pb.ExplainDeliveryRequest(campaign=created.name, user_id=user_id)
        )
        return found.best_time

    assert (await explained(berlin)).startswith(
        "19:00 on 2026-11-24 in Europe/Berlin: their best hour, with 4 "
    )
    assert (await explained(new_york)).startswith("09:00 on 2026-11-24 in America/New_York: their best hour")
    assert (await explained(kolkata)).startswith("10:30 on 2026-11-24 in Asia/Kolkata: the fallback time")
    await clients.close()


def _cohort(tag: str) -> Struct:
    made = Struct()
    made.update({"cohort": tag})
    return made


async def test_best_time_needs_a_day(platform: Platform, segment_api: SegmentApi) -> None:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"bt {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination(
        clients, segment_api.url, next(iter(segment_api.write_keys))
    )
    cases = {
        "campaign.delivery.best_time": campaign_pb.BestTime(),
        "campaign.delivery.best_time.days": campaign_pb.BestTime(days=8),
        "campaign.delivery.best_time.fallback_time": campaign_pb.BestTime(fallback_time="25:00"),
    }
    for field, best in cases.items():
        campaign = segment_export_campaign(  # send now
            segment.name, destination.name, delivery=campaign_pb.DeliveryPreferences(best_time=best)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(refused.value), field_violations(refused.value)
    await clients.close()


async def test_the_per_day_limit_passes_users_to_the_next_day_of_the_window(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"bt {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    await clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(
            users=[pb.User(user_id=f"{tag}-{n}", timezone="UTC", properties=_cohort(tag)) for n in range(3)]
        )
    )
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination(
        clients, segment_api.url, next(iter(segment_api.write_keys))
    )
    send_time = Timestamp()
    send_time.FromDatetime(DAY)

    async def published(days: int) -> str:
        campaign = segment_export_campaign(
            segment.name,
            destination.name,
            schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=send_time)),
            delivery=campaign_pb.DeliveryPreferences(
                best_time=campaign_pb.BestTime(days=days, fallback_time="10:00")
            ),
            targeting=campaign_pb.Targeting(daily_limit=2),
        )
        created = await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
        await clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        return created.name

    two_days, one_day = await published(2), await published(1)

    async def stats_are(name: str, sent: int, skipped: int) -> None:
        async def reached() -> bool:
            stats = await clients.campaigns.GetCampaignStats(
                campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
            )
            return (stats.sent, stats.skipped) == (sent, skipped)

        await eventually(reached, within=20)

    manual_clock.advance(DAY + timedelta(hours=10, minutes=1) - manual_clock.now())
    await stats_are(two_days, 2, 0)
    await stats_are(one_day, 2, 1)  # a one-day window has no next day: the third is left out
    manual_clock.advance(timedelta(days=1))
    await stats_are(two_days, 3, 0)
    reasons = await clients.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{one_day}/stats")
    )
    assert [(r.reason, r.count) for r in reasons.failure_reasons] == [
        ("every day of the Best Time window had reached the campaign's daily limit", 1)
    ]
    await clients.close()


async def test_do_not_disturb_hours_apply_to_the_best_hour(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"bt {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    evening, morning = f"{tag}-evening", f"{tag}-morning"
    await clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(
            users=[
                pb.User(user_id=evening, timezone="Europe/Berlin", properties=_cohort(tag)),
                pb.User(user_id=morning, timezone="Europe/Berlin", properties=_cohort(tag)),
            ]
        )
    )
    history = _activity(evening, "App Opened", [20, 20]) + _activity(morning, "App Opened", [8, 8])
    await clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=history))
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination(
        clients, segment_api.url, next(iter(segment_api.write_keys))
    )
    send_time = Timestamp()
    send_time.FromDatetime(DAY)
    # The evening user's best hour is 21:00 in Berlin, inside the do-not-disturb hours.
    quiet = campaign_pb.QuietHours(start="21:00", end="08:00", action=campaign_pb.QUIET_HOURS_ACTION_DISCARD)
    campaign = segment_export_campaign(
        segment.name,
        destination.name,
        schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=send_time)),
        delivery=campaign_pb.DeliveryPreferences(best_time=campaign_pb.BestTime(), quiet_hours=quiet),
    )
    created = await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    manual_clock.advance(DAY + timedelta(hours=9, minutes=1) - manual_clock.now())  # 10:01 in Berlin

    async def decided() -> bool:
        stats = await clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
        )
        return (stats.sent, stats.skipped) == (1, 1) and [r.reason for r in stats.failure_reasons] == [
            "due in do-not-disturb hours (discarded)"
        ]

    await eventually(decided, within=20)
    await clients.close()
