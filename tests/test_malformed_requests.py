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
from tests.helpers import audience, condition, field_violations, matching, user

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
        lambda p: p.segmentation.EstimateReach(
            segmentation_pb.EstimateReachRequest(audience=audience("segments/?"))
        ),
        "audience.segment",
    ),
    ("no users", lambda p: p.segmentation.UpsertUsers(segmentation_pb.UpsertUsersRequest()), "users"),
    (
        "bad user name",
        lambda p: p.segmentation.GetUser(segmentation_pb.GetUserRequest(name="users/has space")),
        "name",
    ),
    (
        "NaN in a user property",
        lambda p: p.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(users=[user("nan-user", score=float("nan"))])
        ),
        "users[0].properties.fields['score'].number_value",
    ),
    (
        "NUL in a user property",
        lambda p: p.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(users=[user("nul-user", name="a\x00b")])
        ),
        "users[0].properties.fields['name'].string_value",
    ),
    (
        "profile over 256 KB",
        lambda p: p.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(users=[user("big-user", bio="x" * 300_000)])
        ),
        "users[0].properties",
    ),
    (
        "NUL in a segment name",
        lambda p: p.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="a\x00b",
                    filter=matching(condition("plan", "EXISTS")),
                )
            )
        ),
        "segment.display_name",
    ),
    (
        "Infinity in a filter value",
        lambda p: p.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="inf",
                    filter=matching(condition("score", "GREATER_THAN", float("inf"))),
                )
            )
        ),
        "segment.filter.all_of[0].property.value.number_value",
    ),
    (
        "unknown profile field",
        lambda p: p.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="m",
                    filter=segmentation_pb.SegmentFilter(
                        all_of=[
                            segmentation_pb.Condition(
                                profile=segmentation_pb.ProfileCondition(field=77, operator=8)  # type: ignore[arg-type]
                            )
                        ]
                    ),
                )
            )
        ),
        "segment.filter.all_of[0].profile.field",
    ),
    (
        "unknown operator",
        lambda p: p.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="o",
                    filter=matching(segmentation_pb.PropertyCondition(property="plan", operator=99)),  # type: ignore[arg-type]
                )
            )
        ),
        "segment.filter.all_of[0].property.operator",
    ),
    (
        "EXISTS with a value",
        lambda p: p.segmentation.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="e",
                    filter=matching(condition("plan", "EXISTS", "gold")),
                )
            )
        ),
        "segment.filter.all_of[0].property.value",
    ),
    (
        "link-local destination",
        lambda p: _destination(p, "http://169.254.169.254"),
        "destination.segment.endpoint_url",
    ),
    (
        "private destination",
        lambda p: _destination(p, "https://10.1.2.3"),
        "destination.segment.endpoint_url",
    ),
    (
        "plain http destination",
        lambda p: _destination(p, "http://93.184.216.34"),
        "destination.segment.endpoint_url",
    ),
    (
        "NUL in a destination",
        lambda p: _destination(p, "https://api.segment.io", write_key="k\x00ey"),
        "destination.segment.write_key",
    ),
]


def _destination(p: Platform, url: str, write_key: str = "wk_1234") -> Any:
    return p.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="d", segment=dispatch_pb.SegmentConfig(write_key=write_key, endpoint_url=url)
            )
        )
    )


@pytest.mark.parametrize(("case", "call", "field"), CASES, ids=[c[0] for c in CASES])
async def test_malformed_request(platform: Platform, case: str, call: Call, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(platform)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    violations = field_violations(raised.value)
    assert field in violations, violations


async def test_malformed_audience_stream_is_invalid(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in platform.segmentation.StreamAudience(
            segmentation_pb.StreamAudienceRequest(audience=audience("segments/nope"))
        ):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audience.segment" in field_violations(raised.value)
