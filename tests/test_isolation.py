"""No account sees another's data: its resources answer NOT_FOUND, as if they did not exist."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from tests.conftest import Platform, eventually
from tests.fakes.segment_api import SegmentApi
from tests.harness import Clients, create_account
from tests.helpers import condition, create_segment, create_segment_destination, segment_export_campaign


@pytest.fixture
async def other(platform: Platform) -> AsyncIterator[Clients]:
    """Clients of a second account, with its admin key."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "other")
    clients = Clients.open(platform.addresses, key)
    yield clients
    await clients.close()


async def _not_found(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()


async def test_another_accounts_campaigns_do_not_exist_for_it(
    platform: Platform, other: Clients, segment_api: SegmentApi
) -> None:
    segment = await create_segment(platform, condition("cohort", "EQUALS", uuid.uuid4().hex))
    destination = await create_segment_destination(
        platform, segment_api.url, next(iter(segment_api.write_keys))
    )
    request_id = f"shared-{uuid.uuid4().hex}"
    mine = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(segment.name, destination.name), request_id=request_id
        )
    )
    name = mine.name

    await _not_found(other.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name)))
    await _not_found(
        other.campaigns.GetCampaignStats(campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats"))
    )
    changed = campaign_pb.Campaign(name=name, display_name="taken over")
    await _not_found(
        other.campaigns.UpdateCampaign(
            campaign_pb.UpdateCampaignRequest(
                campaign=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            )
        )
    )
    await _not_found(other.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name)))
    await _not_found(other.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name)))
    await _not_found(other.campaigns.DeleteCampaign(campaign_pb.DeleteCampaignRequest(name=name)))
    listed = await other.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(page_size=1000))
    assert name not in [c.name for c in listed.campaigns]
    by_segment = await other.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(segment=segment.name))
    assert list(by_segment.campaigns) == []

    # Its runs are hidden too.
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=name))

    async def has_run() -> bool:
        return bool((await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs)

    await eventually(has_run)
    [run] = (await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs
    assert list((await other.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs) == []
    await _not_found(other.scheduler.GetRun(scheduler_pb.GetRunRequest(name=run.name)))

    # The owner still has it, untouched by the other account.
    got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
    assert got.display_name == mine.display_name
    # A request_id is the account's own: the same id elsewhere is another request.
    assert (
        await platform.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(
                campaign=segment_export_campaign(segment.name, destination.name), request_id=request_id
            )
        )
    ).name == name
