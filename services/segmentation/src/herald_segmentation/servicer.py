"""gRPC face of the segmentation service: converts requests, calls the domain, returns messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from herald_common.auth import Permission, method_permissions
from herald_segmentation.domain import Segmentation
from herald_segmentation.events import Events
from herald_segmentation.lists import Lists
from herald_segmentation.profiles import Profiles
from herald_segmentation.visitors import Visitors

Context = grpc.aio.ServicerContext[Any, Any]


PERMISSIONS = method_permissions(
    "herald.segmentation.v1.SegmentationService",
    {
        "UpsertUsers": Permission.INGEST,
        "GetUser": Permission.READ,
        "IngestEvents": Permission.EVENTS,
        "UploadList": Permission.WRITE,
        "GetList": Permission.READ,
        "ListLists": Permission.READ,
        "DeleteList": Permission.WRITE,
        "CreateSegment": Permission.WRITE,
        "GetSegment": Permission.READ,
        "ListSegments": Permission.READ,
        "DeleteSegment": Permission.WRITE,
        "EstimateReach": Permission.READ,
        "StreamAudience": Permission.READ,
        "MatchUsers": Permission.READ,
        "DescribeEvent": Permission.READ,
        "MergeVisitor": Permission.EVENTS,
    },
)


@dataclass
class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    profiles: Profiles
    events: Events
    lists: Lists
    segments: Segmentation
    visitors: Visitors

    async def UpsertUsers(self, request: pb.UpsertUsersRequest, context: Context) -> pb.UpsertUsersResponse:
        return pb.UpsertUsersResponse(upserted_count=await self.profiles.upsert(request.users))

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.User:
        return await self.profiles.get(request.name)

    async def IngestEvents(
        self, request: pb.IngestEventsRequest, context: Context
    ) -> pb.IngestEventsResponse:
        accepted, duplicates = await self.events.ingest(request.events)
        return pb.IngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    async def UploadList(
        self, request_iterator: AsyncIterator[pb.UploadListRequest], context: Context
    ) -> pb.CustomList:
        return await self.lists.upload(request_iterator)

    async def GetList(self, request: pb.GetListRequest, context: Context) -> pb.CustomList:
        return await self.lists.get(request.name)

    async def ListLists(self, request: pb.ListListsRequest, context: Context) -> pb.ListListsResponse:
        found, token = await self.lists.list(request.page_size, request.page_token)
        return pb.ListListsResponse(lists=found, next_page_token=token)

    async def DeleteList(self, request: pb.DeleteListRequest, context: Context) -> empty_pb2.Empty:
        await self.lists.delete(request.name)
        return empty_pb2.Empty()

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Context) -> pb.Segment:
        return await self.segments.create_segment(request.segment, request.request_id)

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Context) -> pb.Segment:
        return await self.segments.get_segment(request.name)

    async def ListSegments(
        self, request: pb.ListSegmentsRequest, context: Context
    ) -> pb.ListSegmentsResponse:
        found, token = await self.segments.list_segments(request.page_size, request.page_token)
        return pb.ListSegmentsResponse(segments=found, next_page_token=token)

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Context) -> empty_pb2.Empty:
        await self.segments.delete_segment(request.name)
        return empty_pb2.Empty()

    async def EstimateReach(
        self, request: pb.EstimateReachRequest, context: Context
    ) -> pb.EstimateReachResponse:
        qualified, reachable = await self.segments.estimate_reach(request)
        return pb.EstimateReachResponse(user_count=qualified, reachable_count=reachable)

    async def StreamAudience(
        self, request: pb.StreamAudienceRequest, context: Context
    ) -> AsyncIterator[pb.StreamAudienceResponse]:
        async for page in self.segments.stream_audience(request):
            yield page

    async def MergeVisitor(
        self, request: pb.MergeVisitorRequest, context: Context
    ) -> pb.MergeVisitorResponse:
        return await self.visitors.merge(request)

    async def MatchUsers(self, request: pb.MatchUsersRequest, context: Context) -> pb.MatchUsersResponse:
        return pb.MatchUsersResponse(members=await self.segments.match_users(request))

    async def DescribeEvent(self, request: pb.DescribeEventRequest, context: Context) -> pb.EventDescription:
        return await self.segments.describe_event(request)
