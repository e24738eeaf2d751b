"""Rolling restarts and replicas: still every member exactly once."""

from __future__ import annotations

import uuid

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.runtime import ServiceHost
from herald_common.settings import Settings
from herald_dispatch import main as dispatch_main
from herald_sandbox.segment_api import SegmentApi
from herald_scheduler import main as scheduler_main
from tests.conftest import eventually
from tests.harness import fresh_settings, running_platform
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)

USERS = 2400


async def test_dispatch_restart_and_scheduler_replicas_lose_and_double_nothing(
    servers: tuple[str, str], segment_api: SegmentApi
) -> None:
    # Slow Segment down so the restart lands mid-campaign.
    segment_api.max_requests_per_second = 1
    async with fresh_settings(*servers) as settings, running_platform(settings) as platform:
        second_scheduler = await scheduler_main.start(platform.settings, port=0)
        try:
            tag = uuid.uuid4().hex[:8]
            for offset in range(0, USERS, 1000):
                await platform.segmentation.UpsertUsers(
                    segmentation_pb.UpsertUsersRequest(
                        users=[
                            user(f"{tag}-{i:05d}", cohort=tag)
                            for i in range(offset, min(offset + 1000, USERS))
                        ]
                    )
                )
            segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
            destination = await create_segment_destination_for(platform, segment_api)
            created = await platform.campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(
                    campaign=segment_export_campaign(segment.name, destination.name)
                )
            )
            await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

            async def some_delivered() -> bool:
                return len(segment_api.events) > 0

            await eventually(some_delivered)
            await _restart_dispatch(platform.hosts, platform.settings)
            assert len(segment_api.events) < USERS, "the restart should land mid-campaign"

            async def completed() -> bool:
                got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
                return got.state == campaign_pb.State.STATE_COMPLETED

            await eventually(completed, within=90)
        finally:
            await second_scheduler.stop()

        stats = await platform.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
        )
        assert (stats.targeted, stats.sent, stats.failed) == (USERS, USERS, 0)
        runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
        assert len(runs.runs) == 1 and runs.runs[0].targeted == USERS
        received = sorted(e["userId"] for e in segment_api.events.values())
        assert received == sorted(f"{tag}-{i:05d}" for i in range(USERS))
        message_ids_per_user: dict[str, set[str]] = {}
        for request in segment_api.requests:
            for event in (request.body or {}).get("batch", []):
                message_ids_per_user.setdefault(event["userId"], set()).add(event["messageId"])
        # Each retry reuses the one messageId, the UUIDv5 of the run and the user: the same in
        # every release, so a batch resent across an upgrade is still de-duplicated.
        run_id = uuid.UUID(runs.runs[0].name.rsplit("/", 1)[1])
        assert all(
            ids == {str(uuid.uuid5(run_id, user_id))} for user_id, ids in message_ids_per_user.items()
        ), "a retry must reuse the messageId"


async def _restart_dispatch(hosts: dict[str, ServiceHost], settings: Settings) -> None:
    await hosts["dispatch"].stop()
    hosts["dispatch"] = await dispatch_main.start(settings, port=0)
