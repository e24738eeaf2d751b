"""Whether a segment, a custom list or a destination is in use, asked of the campaign service, which owns
campaigns: a copy kept from CampaignChanged events would lag behind a campaign just published."""

from __future__ import annotations

import grpc

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald_common import deadlines
from herald_common.errors import FailedPrecondition, Unavailable

LOOKUP_TIMEOUT_SECONDS = 5.0
# Campaigns that will still read their segment and deliver to their destination.
LIVE_STATES = [campaign_pb.State.STATE_SCHEDULED, campaign_pb.State.STATE_RUNNING]


class CampaignUsage:
    def __init__(self, campaign_service: grpc.aio.Channel) -> None:
        self.campaigns = campaign_grpc.CampaignServiceStub(campaign_service)

    async def refuse_if_used(self, name: str) -> None:
        """FAILED_PRECONDITION naming them when scheduled or running campaigns use the segment,
        list or destination of this name: it may not be deleted from under them."""
        collection = name.partition("/")[0]
        field = {"segments": "segment", "lists": "list", "destinations": "destination"}[collection]
        request = campaign_pb.ListCampaignsRequest(states=LIVE_STATES, page_size=10, **{field: name})
        try:
            response = await self.campaigns.ListCampaigns(
                request, timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS)
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"cannot tell whether it is in use: campaign service {error.code().name}"
            ) from None
        users = sorted(c.name for c in response.campaigns)
        if users:
            raise FailedPrecondition(
                name, f"{name} is used by scheduled or running campaigns: {', '.join(users)}"
            )
