"""Campaigns on several dates and on a recurring calendar, run through the public API by a clock
the test moves: a week and a half of schedules in seconds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import CLOCK_START, Platform, eventually
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
    user,
)

BERLIN = ZoneInfo("Europe/Berlin")


async def _campaign(
    platform: Platform, segment_api: SegmentApi, schedule: campaign_pb.Schedule
) -> tuple[str, str]:
    """(campaign name, its one member's user id), with the campaign not yet published."""
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(f"{tag}-1", cohort=tag)]))
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign(segment.name, destination.name, schedule=schedule)
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    return created.name, f"{tag}-1"


async def _runs(platform: Platform, name: str) -> list[scheduler_pb.Run]:
    return list((await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs)


async def _state(platform: Platform, name: str) -> campaign_pb.State.ValueType:
    return (await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))).state


async def test_a_weekly_campaign_runs_on_each_chosen_day_in_its_zone(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    weekly = campaign_pb.Recurring(
        weekly=campaign_pb.Weekly(weekdays=[campaign_pb.WEEKDAY_MONDAY, campaign_pb.WEEKDAY_THURSDAY]),
        time_of_day="09:00",
        start_date="2026-11-24",
        occurrences=3,
        timezone="Europe/Berlin",
    )
    name, member = await _campaign(platform, segment_api, campaign_pb.Schedule(recurring=weekly))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))
    # Thursday 26, Monday 30 November and Thursday 3 December, 09:00 in Berlin (CET, UTC+1).
    expected = [datetime(2026, 11, 26, 8, tzinfo=UTC), datetime(2026, 11, 30, 8, tzinfo=UTC)]
    expected.append(datetime(2026, 12, 3, 8, tzinfo=UTC))
    for n, due in enumerate(expected, start=1):

        async def planned(n: int = n, due: datetime = due) -> bool:
            runs = await _runs(platform, name)
            return len(runs) >= n and runs[n - 1].scheduled_time.ToDatetime(tzinfo=UTC) == due

        await eventually(planned)
        assert [r.state for r in await _runs(platform, name)][
            n - 1
        ] == scheduler_pb.RunState.RUN_STATE_PENDING
        manual_clock.advance(due - manual_clock.now() + timedelta(seconds=1))

        async def delivered(n: int = n) -> bool:
            return sum(1 for e in segment_api.events.values() if e["userId"] == member) == n

        await eventually(delivered)
    await eventually(lambda: _completed(platform, name))
    runs = await _runs(platform, name)
    assert [r.scheduled_time.ToDatetime(tzinfo=UTC) for r in runs] == expected
    assert [r.final for r in runs] == [False, False, True]
    assert all(r.state == scheduler_pb.RunState.RUN_STATE_DISPATCHED for r in runs)
    assert all(r.scheduled_time.ToDatetime(tzinfo=UTC).astimezone(BERLIN).hour == 9 for r in runs)


async def _completed(platform: Platform, name: str) -> bool:
    return await _state(platform, name) == campaign_pb.State.STATE_COMPLETED


async def test_a_campaign_on_several_dates_runs_once_at_each(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    times = [CLOCK_START + timedelta(days=2), CLOCK_START + timedelta(hours=5)]
    schedule = campaign_pb.Schedule(send_multiple=campaign_pb.SendMultiple())
    for when in times:
        schedule.send_multiple.send_times.add().FromDatetime(when)
    name, member = await _campaign(platform, segment_api, schedule)
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))
    await eventually(lambda: _has_runs(platform, name, 2))
    manual_clock.advance(timedelta(hours=5, seconds=1))
    await eventually(lambda: _received(segment_api, member, 1))
    assert await _state(platform, name) != campaign_pb.State.STATE_COMPLETED  # one date to go
    manual_clock.advance(timedelta(days=2))
    await eventually(lambda: _completed(platform, name))
    assert await _received(segment_api, member, 2)


async def _has_runs(platform: Platform, name: str, n: int) -> bool:
    return len(await _runs(platform, name)) == n


async def _received(segment_api: SegmentApi, member: str, n: int) -> bool:
    return sum(1 for e in segment_api.events.values() if e["userId"] == member) == n


def _recurring(**fields: object) -> campaign_pb.Schedule:
    rule = campaign_pb.Recurring(
        daily=campaign_pb.EveryNDays(every=1),
        time_of_day="09:00",
        start_date="2026-11-24",
        timezone="Asia/Kolkata",
    )
    for key, value in fields.items():
        setattr(rule, key, value)
    return campaign_pb.Schedule(recurring=rule)


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        (_recurring(end_date="2026-11-20"), "campaign.schedule.recurring.end_date"),
        (_recurring(timezone="Mars/Olympus"), "campaign.schedule.recurring.timezone"),
        (_recurring(time_of_day="24:00"), "campaign.schedule.recurring.time_of_day"),
        (_recurring(start_date="2026-02-30"), "campaign.schedule.recurring.start_date"),
        (_recurring(occurrences=-1), "campaign.schedule.recurring.occurrences"),
        (
            campaign_pb.Schedule(
                recurring=campaign_pb.Recurring(time_of_day="09:00", start_date="2026-11-24")
            ),
            "campaign.schedule.recurring",
        ),
        (
            campaign_pb.Schedule(
                recurring=campaign_pb.Recurring(
                    weekly=campaign_pb.Weekly(), time_of_day="09:00", start_date="2026-11-24"
                )
            ),
            "campaign.schedule.recurring.weekly.weekdays",
        ),
        (
            campaign_pb.Schedule(
                recurring=campaign_pb.Recurring(
                    monthly=campaign_pb.Monthly(day_of_month=32), time_of_day="09:00", start_date="2026-11-24"
                )
            ),
            "campaign.schedule.recurring.monthly.day_of_month",
        ),
        (
            campaign_pb.Schedule(send_multiple=campaign_pb.SendMultiple()),
            "campaign.schedule.send_multiple.send_times",
        ),
        (
            campaign_pb.Schedule(
                live=campaign_pb.Live(
                    start_time=Timestamp(seconds=1_800_000_000), end_time=Timestamp(seconds=1_700_000_000)
                )
            ),
            "campaign.schedule.live.end_time",
        ),
        (
            campaign_pb.Schedule(live=campaign_pb.Live(delay=Duration(seconds=31 * 86400))),
            "campaign.schedule.live.delay",
        ),
    ],
)
async def test_bad_schedules_name_the_field(
    platform: Platform, segment_api: SegmentApi, schedule: campaign_pb.Schedule, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _campaign(platform, segment_api, schedule)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)


async def test_duplicate_or_past_dates_and_spent_calendars_are_refused(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    twice = campaign_pb.Schedule(send_multiple=campaign_pb.SendMultiple())
    for _ in range(2):
        twice.send_multiple.send_times.add().FromDatetime(CLOCK_START + timedelta(days=1))
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await _campaign(platform, segment_api, twice)
    assert "campaign.schedule.send_multiple.send_times[1]" in field_violations(duplicate.value)

    # Times all past are refused; one past among others is dropped (see test_delivery_rules).
    past = campaign_pb.Schedule(send_multiple=campaign_pb.SendMultiple())
    past.send_multiple.send_times.add().FromDatetime(CLOCK_START - timedelta(hours=2))
    past.send_multiple.send_times.add().FromDatetime(CLOCK_START - timedelta(hours=1))
    name, _ = await _campaign(platform, segment_api, past)
    with pytest.raises(grpc.aio.AioRpcError) as in_the_past:
        await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))
    assert in_the_past.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(in_the_past.value)
    assert {
        "campaign.schedule.send_multiple.send_times[0]",
        "campaign.schedule.send_multiple.send_times[1]",
    } <= set(violations)

    spent = _recurring(start_date="2026-11-01", end_date="2026-11-20")
    name, _ = await _campaign(platform, segment_api, spent)
    with pytest.raises(grpc.aio.AioRpcError) as no_future:
        await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))
    assert no_future.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await _state(platform, name) == campaign_pb.State.STATE_DRAFT  # nothing changed


async def test_watching_a_run_streams_its_progress_until_it_ends(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    later = campaign_pb.Schedule(send_later=campaign_pb.SendLater())
    later.send_later.send_time.FromDatetime(CLOCK_START + timedelta(hours=1))
    name, _ = await _campaign(platform, segment_api, later)
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))
    await eventually(lambda: _has_runs(platform, name, 1))
    [run] = await _runs(platform, name)
    stream = platform.scheduler.WatchRun(scheduler_pb.WatchRunRequest(name=run.name))
    first = await stream.read()
    assert isinstance(first, scheduler_pb.Run) and first.state == scheduler_pb.RUN_STATE_PENDING
    manual_clock.advance(timedelta(hours=1, seconds=1))
    rest = [r async for r in stream]
    states = [first.state] + [r.state for r in rest]
    assert states[-1] == scheduler_pb.RUN_STATE_DISPATCHED  # and the stream ended with it
    assert states == sorted(
        states,
        key=[
            scheduler_pb.RUN_STATE_PENDING,
            scheduler_pb.RUN_STATE_RUNNING,
            scheduler_pb.RUN_STATE_RELEASING,  # while planned deliveries wait to be handed over
            scheduler_pb.RUN_STATE_DISPATCHED,
        ].index,
    )
