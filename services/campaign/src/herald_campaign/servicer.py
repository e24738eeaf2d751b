"""gRPC face of the campaign service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.campaign.v1 import campaign_service_pb2_grpc as pb_grpc
from herald_campaign.explanation import Explanations
from herald_campaign.lifecycle import Lifecycle
from herald_campaign.previews import Previews
from herald_campaign.results import Results
from herald_common.auth import Permission, method_permissions

Context = grpc.aio.ServicerContext[Any, Any]


PERMISSIONS = method_permissions(
    "herald.campaign.v1.CampaignService",
    {
        "CreateCampaign": Permission.WRITE,
        "GetCampaign": Permission.READ,
        "ListCampaigns": Permission.READ,
        "UpdateCampaign": Permission.WRITE,
        "DeleteCampaign": Permission.WRITE,
        "PublishCampaign": Permission.WRITE,
        "StopCampaign": Permission.WRITE,
        "GetCampaignStats": Permission.READ,
        "WatchCampaignStats": Permission.READ,
        "ExportRunResults": Permission.READ,
        "ExplainDelivery": Permission.READ,
        "PreviewMessage": Permission.READ,
        "SendTestMessage": Permission.WRITE,
    },
)


class CampaignServicer(pb_grpc.CampaignServiceServicer):
    def __init__(
        self,
        lifecycle: Lifecycle,
        explanations: Explanations,
        previews: Previews,
        results: Results,
    ) -> None:
        self.lifecycle = lifecycle
        self.explanations = explanations
        self.previews = previews
        self.results = results

    async def CreateCampaign(self, request: pb.CreateCampaignRequest, context: Context) -> pb.Campaign:
        return await self.lifecycle.create(request.campaign, request.request_id)

    async def GetCampaign(self, request: pb.GetCampaignRequest, context: Context) -> pb.Campaign:
        return await self.lifecycle.get(request.name)

    async def ListCampaigns(
        self, request: pb.ListCampaignsRequest, context: Context
    ) -> pb.ListCampaignsResponse:
        found, token = await self.lifecycle.list(request)
        return pb.ListCampaignsResponse(campaigns=found, next_page_token=token)

    async def UpdateCampaign(self, request: pb.UpdateCampaignRequest, context: Context) -> pb.Campaign:
        return await self.lifecycle.update(request.campaign, request.update_mask)

    async def DeleteCampaign(self, request: pb.DeleteCampaignRequest, context: Context) -> empty_pb2.Empty:
        await self.lifecycle.delete(request.name)
        return empty_pb2.Empty()

    async def PublishCampaign(self, request: pb.PublishCampaignRequest, context: Context) -> pb.Campaign:
        return await self.lifecycle.publish(request.name)

    async def StopCampaign(self, request: pb.StopCampaignRequest, context: Context) -> pb.Campaign:
        return await self.lifecycle.stop(request.name)

    async def ExplainDelivery(
        self, request: pb.ExplainDeliveryRequest, context: Context
    ) -> pb.DeliveryExplanation:
        return await self.explanations.explain(request.campaign, request.user_id)

    async def GetCampaignStats(
        self, request: pb.GetCampaignStatsRequest, context: Context
    ) -> pb.CampaignStats:
        return await self.results.stats(request.name)

    async def WatchCampaignStats(
        self, request: pb.WatchCampaignStatsRequest, context: Context
    ) -> AsyncIterator[pb.CampaignStats]:
        async for stats in self.results.watch(request.name):
            yield stats

    async def ExportRunResults(
        self, request: pb.ExportRunResultsRequest, context: Context
    ) -> AsyncIterator[pb.RunResult]:
        async for result in self.results.export(request.run):
            yield result

    async def PreviewMessage(self, request: pb.PreviewMessageRequest, context: Context) -> pb.MessagePreview:
        if request.HasField("web_popup"):
            return await self.previews.preview_popup(request.web_popup, request.user_id)
        return await self.previews.preview(request.body, request.user_id)

    async def SendTestMessage(
        self, request: pb.SendTestMessageRequest, context: Context
    ) -> pb.SendTestMessageResponse:
        return await self.previews.send_test(request)
