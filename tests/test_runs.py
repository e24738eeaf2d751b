"""Runs that cannot resolve their audience fail with a reason instead of retrying forever."""

from __future__ import annotations

import uuid

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import condition, create_segment, create_segment_destination_for, segment_export_campaign


async def test_run_fails_when_its_segment_was_deleted(platform: Platform, segment_api: SegmentApi) -> None:
    segment = await create_segment(platform, condition("cohort", "EQUALS", uuid.uuid4().hex))
    destination = await create_segment_destination_for(platform, segment_api)
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    await platform.segmentation.DeleteSegment(segmentation_pb.DeleteSegmentRequest(name=segment.name))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    async def run_failed() -> bool:
        runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
        return [r.state for r in runs.runs] == [scheduler_pb.RunState.RUN_STATE_FAILED]

    await eventually(run_failed)
    runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
    assert "NOT_FOUND" in runs.runs[0].error
    fetched = await platform.scheduler.GetRun(scheduler_pb.GetRunRequest(name=runs.runs[0].name))
    assert fetched == runs.runs[0]
    assert segment_api.requests == []

    async def campaign_failed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return got.state == campaign_pb.State.STATE_FAILED

    # Never COMPLETED: the campaign shows it failed, and why.
    await eventually(campaign_failed)
    got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
    assert "NOT_FOUND" in got.failure_reason
