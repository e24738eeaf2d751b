"""A Segment-export campaign carried end to end through all four services."""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination,
    segment_export_campaign,
    user,
)


async def test_send_now_segment_export_reaches_every_member_exactly_once(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag = uuid.uuid4().hex[:8]
    members = [
        user(f"{tag}-vip-{i}", tier=f"vip-{tag}", first_name=f"Ada{i}", plan="gold", code=f"C{i}", email="@")
        for i in range(40)
    ]
    others = [user(f"{tag}-basic-{i}", tier=f"basic-{tag}", first_name=f"Bob{i}") for i in range(15)]
    upserted = await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=members + others)
    )
    assert upserted.upserted_count == 55

    segment = await create_segment(platform, condition("tier", "EQUALS", f"vip-{tag}"))
    write_key = next(iter(segment_api.write_keys))
    destination = await create_segment_destination(platform, segment_api.url, write_key)
    assert destination.segment.write_key.endswith(write_key[-4:])
    assert write_key not in destination.segment.write_key, "credentials must not be returned"

    # Segment rate-limits the first request: the batch must be retried after Retry-After.
    segment_api.fail_next(1, status=429, retry_after=1)
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    assert created.state == campaign_pb.State.STATE_DRAFT
    published = await platform.campaigns.PublishCampaign(
        campaign_pb.PublishCampaignRequest(name=created.name)
    )
    assert published.state == campaign_pb.State.STATE_SCHEDULED

    async def completed() -> bool:
        campaign = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return campaign.state == campaign_pb.State.STATE_COMPLETED

    await eventually(completed, within=60)

    stats = await platform.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
    )
    assert (stats.targeted, stats.sent, stats.failed) == (40, 40, 0)

    runs = await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
    assert len(runs.runs) == 1
    run = runs.runs[0]
    assert run.state == scheduler_pb.RunState.RUN_STATE_DISPATCHED
    assert (run.audience_size, run.targeted, run.final) == (40, 40, True)

    # Every member exactly once, nobody else.
    received = [e for e in segment_api.events.values() if e["userId"].startswith(tag)]
    assert sorted(e["userId"] for e in received) == sorted(m.user_id for m in members)
    assert segment_api.duplicates == 0
    assert segment_api.dropped == []

    # The 429'd request and its retry carried the same messageIds, one second or more apart.
    batches = [r for r in segment_api.requests if r.path == "/v1/batch"]
    assert [r.status for r in batches][:2] == [429, 200]
    first_ids = [e["messageId"] for e in batches[0].body["batch"]]
    retry_ids = [e["messageId"] for e in batches[1].body["batch"]]
    assert first_ids == retry_ids
    assert batches[1].at - batches[0].at >= 1.0
    assert batches[1].headers.get("X-Retry-Count") is None  # a Retry-After wait is not a retry

    # Payload shape as Segment documents it.
    event = next(e for e in received if e["userId"] == f"{tag}-vip-3")
    assert event["type"] == "track"
    assert event["event"] == "Herald VIP Export"
    # Custom key-value pairs are personalized per user; traits are only the selected attributes.
    assert event["properties"] == {"coupon": "VIP20", "greeting": "Hi Ada3, your code is C3"}
    assert event["context"]["traits"] == {"first_name": "Ada3", "plan": "gold"}
    assert event["writeKey"] == write_key
    assert len(event["messageId"]) < 100
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
    datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    body = batches[1].body
    assert body["writeKey"] == write_key
    assert batches[1].headers["Content-Type"] == "application/json"
    assert "sentAt" in body
