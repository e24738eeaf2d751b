"""Checks that what a campaign points at exists, by asking the services that own it."""

from __future__ import annotations

import grpc

from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import deadlines
from herald_common.errors import NotFound, Unavailable, invalid

LOOKUP_TIMEOUT_SECONDS = 5.0


def _translate(error: grpc.aio.AioRpcError, name: str, field: str, owner: str) -> Exception:
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(name, field)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid(field, error.details() or "rejected")
    return Unavailable(f"{owner} service: {error.code().name} {error.details()}")


class References:
    def __init__(self, segmentation: grpc.aio.Channel, dispatch: grpc.aio.Channel) -> None:
        self.segments = segmentation_grpc.SegmentationServiceStub(segmentation)
        self.destinations = dispatch_grpc.DispatchServiceStub(dispatch)

    async def segment(self, name: str, field: str) -> segmentation_pb.Segment:
        try:
            return await self.segments.GetSegment(
                segmentation_pb.GetSegmentRequest(name=name),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, name, field, "segmentation") from None

    async def destination(self, name: str, field: str) -> dispatch_pb.Destination:
        try:
            return await self.destinations.GetDestination(
                dispatch_pb.GetDestinationRequest(name=name),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, name, field, "dispatch") from None
