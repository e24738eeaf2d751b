"""Malformed names, tokens and sizes are INVALID_ARGUMENT naming the field, never INTERNAL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from tests.conftest import Platform
from tests.helpers import field_violations

Call = Callable[[Platform], Awaitable[Any]]

CASES: list[tuple[str, Call, str]] = [
    ("empty campaign name", lambda p: p.campaigns.GetCampaign(campaign_pb.GetCampaignRequest()), "name"),
    (
        "campaign name of another collection",
        lambda p: p.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name="segments/1")),
        "name",
    ),
    (
        "campaign id not a uuid",
        lambda p: p.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name="campaigns/x")),
        "name",
    ),
    (
        "stats name without /stats",
        lambda p: p.campaigns.GetCampaignStats(campaign_pb.GetCampaignStatsRequest(name="campaigns/x")),
        "name",
    ),
    (
        "garbage page token",
        lambda p: p.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(page_token="%%%")),
        "page_token",
    ),
    (
        "well-formed token with bad keys",
        lambda p: p.segmentation.ListSegments(
            segmentation_pb.ListSegmentsRequest(page_token="WyJub3QtYS1kYXRlIiwgIngiXQ==")
        ),
        "page_token",
    ),
    (
        "negative page size",
        lambda p: p.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest(page_size=-1)),
        "page_size",
    ),
    ("bad run name", lambda p: p.scheduler.GetRun(scheduler_pb.GetRunRequest(name="campaigns/a/b")), "name"),
    (
        "bad runs parent",
        lambda p: p.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent="destinations/x")),
        "parent",
    ),
    (
        "reach of a malformed segment",
        lambda p: p.segmentation.EstimateReach(segmentation_pb.EstimateReachRequest(segment="segments/?")),
        "segment",
    ),
    ("no users", lambda p: p.segmentation.UpsertUsers(segmentation_pb.UpsertUsersRequest()), "users"),
    (
        "bad user name",
        lambda p: p.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/has space")),
        "name",
    ),
]


@pytest.mark.parametrize(("case", "call", "field"), CASES, ids=[c[0] for c in CASES])
async def test_malformed_request(platform: Platform, case: str, call: Call, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(platform)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert field in field_violations(raised.value)


async def test_malformed_audience_stream_is_invalid(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in platform.segmentation.StreamAudience(
            segmentation_pb.StreamAudienceRequest(segment="segments/nope")
        ):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment" in field_violations(raised.value)
