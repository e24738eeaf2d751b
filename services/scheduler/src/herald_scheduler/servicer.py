"""gRPC face of the scheduler service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from herald_common.auth import Permission, method_permissions
from herald_common.db import Database
from herald_scheduler.live import qualifications
from herald_scheduler.runs import RunQueries

Context = grpc.aio.ServicerContext[Any, Any]


PERMISSIONS = method_permissions(
    "herald.scheduler.v1.SchedulerService",
    {
        "GetRun": Permission.READ,
        "ListRuns": Permission.READ,
        "WatchRun": Permission.READ,
        "ListQualifications": Permission.READ,
    },
)


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    def __init__(self, queries: RunQueries, database: Database) -> None:
        self.queries = queries
        self.database = database

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.Run:
        return await self.queries.get(request.name)

    async def WatchRun(self, request: pb.WatchRunRequest, context: Context) -> AsyncIterator[pb.Run]:
        async for run in self.queries.watch(request.name):
            yield run

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        found, token = await self.queries.list(request.parent, request.page_size, request.page_token)
        return pb.ListRunsResponse(runs=found, next_page_token=token)

    async def ListQualifications(
        self, request: pb.ListQualificationsRequest, context: Context
    ) -> pb.ListQualificationsResponse:
        found, waits = await qualifications(
            self.database, request.campaign, request.user_id, request.page_size
        )
        return pb.ListQualificationsResponse(qualifications=found, waits=waits)
