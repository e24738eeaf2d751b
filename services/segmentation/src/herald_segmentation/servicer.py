"""gRPC face of the segmentation service: converts requests, calls the domain, returns messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from herald_common.auth import Permission, method_permissions
from herald_segmentation.domain import Segmentation

Context = grpc.aio.ServicerContext[Any, Any]


PERMISSIONS = method_permissions(
    "herald.segmentation.v1.SegmentationService",
    {
        "UpsertUsers": Permission.INGEST,
        "GetUser": Permission.READ,
        "CreateSegment": Permission.WRITE,
        "GetSegment": Permission.READ,
        "ListSegments": Permission.READ,
        "DeleteSegment": Permission.WRITE,
        "EstimateReach": Permission.READ,
        "StreamAudience": Permission.READ,
    },
)


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, domain: Segmentation) -> None:
        self.domain = domain

    async def UpsertUsers(self, request: pb.UpsertUsersRequest, context: Context) -> pb.UpsertUsersResponse:
        return pb.UpsertUsersResponse(upserted_count=await self.domain.upsert_users(request.users))

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.User:
        return await self.domain.get_user(request.name)

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Context) -> pb.Segment:
        return await self.domain.create_segment(request.segment, request.request_id)

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Context) -> pb.Segment:
        return await self.domain.get_segment(request.name)

    async def ListSegments(
        self, request: pb.ListSegmentsRequest, context: Context
    ) -> pb.ListSegmentsResponse:
        found, token = await self.domain.list_segments(request.page_size, request.page_token)
        return pb.ListSegmentsResponse(segments=found, next_page_token=token)

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Context) -> empty_pb2.Empty:
        await self.domain.delete_segment(request.name)
        return empty_pb2.Empty()

    async def EstimateReach(
        self, request: pb.EstimateReachRequest, context: Context
    ) -> pb.EstimateReachResponse:
        return pb.EstimateReachResponse(user_count=await self.domain.estimate_reach(request.segment))

    async def StreamAudience(
        self, request: pb.StreamAudienceRequest, context: Context
    ) -> AsyncIterator[pb.StreamAudienceResponse]:
        pages = self.domain.stream_audience(request)
        async for members in pages:
            yield pb.StreamAudienceResponse(members=members)
