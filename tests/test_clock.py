"""Services read the time of schedules through one injectable clock: a send-later campaign three
days ahead runs when the clock says so, not before, in a test that takes seconds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, timedelta

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)


async def test_a_send_later_campaign_runs_when_the_clock_reaches_it(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[user(f"{tag}-1", cohort=tag)]))
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign(segment.name, destination.name)
    send_time = manual_clock.now() + timedelta(days=3)
    campaign.schedule.Clear()
    campaign.schedule.send_later.send_time.FromDatetime(send_time)
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    async def runs() -> list[scheduler_pb.Run]:
        return list(
            (await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))).runs
        )

    await eventually(runs)
    await asyncio.sleep(1.5)  # the scheduler polls twice a second: it had its chances
    [pending] = await runs()
    assert pending.state == scheduler_pb.RunState.RUN_STATE_PENDING
    assert segment_api.events == {}

    manual_clock.advance(timedelta(days=3, seconds=1))

    async def completed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(completed)
    [run] = await runs()
    assert run.start_time.ToDatetime(tzinfo=UTC) >= send_time  # by the clock, three days on
    assert [e["userId"] for e in segment_api.events.values()] == [f"{tag}-1"]
