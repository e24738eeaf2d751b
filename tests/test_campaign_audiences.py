"""A campaign's audience can be a saved segment, an ad-hoc segment defined with it (past
behaviour included) or a custom list; each delivers to exactly its users."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import create_segment_destination_for, field_violations, segment_export_campaign, user


async def _run(platform: Platform, segment_api: SegmentApi, audience: campaign_pb.Audience) -> list[str]:
    """Publishes an export to the audience and returns who received it."""
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign("", destination.name)
    campaign.audience.CopyFrom(audience)
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    async def completed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(completed, within=60)
    return sorted(e["userId"] for e in segment_api.events.values())


@pytest.fixture
async def shoppers(platform: Platform) -> AsyncIterator[str]:
    """Three users: one added to cart and bought, one added to cart only, one did nothing."""
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(users=[user(f"{tag}-{n}", first_name=n) for n in ("buyer", "browser", "idle")])
    )
    events = [
        pb.Event(user_id=f"{tag}-buyer", name=f"Cart {tag}", client_event_id=f"{tag}-1"),
        pb.Event(user_id=f"{tag}-buyer", name=f"Order {tag}", client_event_id=f"{tag}-2"),
        pb.Event(user_id=f"{tag}-browser", name=f"Cart {tag}", client_event_id=f"{tag}-3"),
    ]
    await platform.segmentation.IngestEvents(pb.IngestEventsRequest(events=events))
    yield tag


def _carted_not_ordered(tag: str, count: int = 1) -> pb.SegmentFilter:
    carted = pb.EventCondition(event_name=f"Cart {tag}")
    carted.window.last_days = 7
    carted.count.CopyFrom(pb.CountCondition(operator=pb.OPERATOR_GREATER_THAN_OR_EQUAL, value=count))
    ordered = pb.EventCondition(event_name=f"Order {tag}", did_not=True)
    ordered.window.last_days = 7
    return pb.SegmentFilter(all_of=[pb.Condition(event=carted), pb.Condition(event=ordered)])


async def test_an_ad_hoc_past_behaviour_audience(
    platform: Platform, segment_api: SegmentApi, shoppers: str
) -> None:
    audience = campaign_pb.Audience(filter=_carted_not_ordered(shoppers))
    assert await _run(platform, segment_api, audience) == [f"{shoppers}-browser"]


async def test_a_custom_list_audience_that_cannot_be_deleted_while_in_use(
    platform: Platform, segment_api: SegmentApi, shoppers: str
) -> None:
    async def rows() -> AsyncIterator[pb.UploadListRequest]:
        yield pb.UploadListRequest(
            list=pb.CustomList(display_name="winners", identity_kind=pb.IDENTITY_KIND_USER_ID),
            rows=[f"{shoppers}-idle", f"{shoppers}-buyer", "someone-else"],
        )

    winners = await platform.segmentation.UploadList(rows())
    assert (winners.matched_count, winners.unmatched_count) == (2, 1)
    assert await _run(platform, segment_api, campaign_pb.Audience(list=winners.name)) == [
        f"{shoppers}-buyer",
        f"{shoppers}-idle",
    ]
    # Scheduled for tomorrow, the list is in use.
    later = segment_export_campaign(
        "",
        (await platform.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest()))
        .destinations[0]
        .name,
    )
    later.audience.list = winners.name
    later.schedule.send_later.send_time.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=later))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await platform.segmentation.DeleteList(pb.DeleteListRequest(name=winners.name))
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert created.name in (in_use.value.details() or "")


async def test_a_bad_ad_hoc_audience_is_reported_at_the_campaigns_own_path(
    platform: Platform, shoppers: str
) -> None:
    destination = "destinations/" + str(uuid.uuid4())
    campaign = segment_export_campaign("", destination)
    campaign.audience.filter.CopyFrom(_carted_not_ordered(shoppers, count=-1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.audience.filter.all_of[0].event.count.value" in field_violations(raised.value)
    campaign.audience.Clear()
    campaign.audience.list = f"lists/{uuid.uuid4()}"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "campaign.audience.list" in field_violations(missing.value)
