"""gRPC face of the dispatch service."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as pb_grpc
from herald_common import api
from herald_common.auth import Permission, current_account_id, method_permissions
from herald_common.logging import get_logger
from herald_dispatch.deliveries import DeliveryQueries
from herald_dispatch.destinations import Destinations
from herald_dispatch.gate import SendGate
from herald_dispatch.test_messages import TestMessages

Context = grpc.aio.ServicerContext[Any, Any]
log = get_logger(__name__)
# A halt waits this long at most for a campaign's admitted requests to be made.
HALT_WAIT_SECONDS = 20.0


PERMISSIONS = method_permissions(
    "herald.dispatch.v1.DispatchService",
    {
        "CreateDestination": Permission.WRITE,
        "GetDestination": Permission.READ,
        "UpdateDestination": Permission.WRITE,
        "ListDestinations": Permission.READ,
        "DeleteDestination": Permission.WRITE,
        "ListDeliveries": Permission.READ,
        "TestDestination": Permission.READ,
        "SendTestMessages": Permission.WRITE,
        "HaltCampaignDeliveries": Permission.INTERNAL,
    },
)


class DispatchServicer(pb_grpc.DispatchServiceServicer):
    def __init__(
        self, destinations: Destinations, deliveries: DeliveryQueries, tests: TestMessages, gate: SendGate
    ) -> None:
        self.destinations = destinations
        self.deliveries = deliveries
        self.tests = tests
        self.gate = gate

    async def HaltCampaignDeliveries(
        self, request: pb.HaltCampaignDeliveriesRequest, context: Context
    ) -> empty_pb2.Empty:
        api.parse_uuid_name(request.campaign, "campaigns", "campaign")
        within = min(context.time_remaining() or HALT_WAIT_SECONDS, HALT_WAIT_SECONDS) - 0.5
        if not await self.gate.halt(current_account_id(), request.campaign, within):
            log.warning("halt_left_requests_under_way", campaign=request.campaign)
        return empty_pb2.Empty()

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: Context
    ) -> pb.ListDeliveriesResponse:
        if request.run and not request.user_id:
            page, token = await self.deliveries.of_run(
                request.campaign, request.run, request.page_size, request.page_token
            )
            return pb.ListDeliveriesResponse(deliveries=page, next_page_token=token)
        found = await self.deliveries.of_user(request.campaign, request.user_id)
        return pb.ListDeliveriesResponse(deliveries=found)

    async def CreateDestination(
        self, request: pb.CreateDestinationRequest, context: Context
    ) -> pb.Destination:
        return await self.destinations.create(request.destination, request.request_id)

    async def UpdateDestination(
        self, request: pb.UpdateDestinationRequest, context: Context
    ) -> pb.Destination:
        return await self.destinations.update(request.destination, request.update_mask)

    async def GetDestination(self, request: pb.GetDestinationRequest, context: Context) -> pb.Destination:
        return await self.destinations.get(request.name)

    async def ListDestinations(
        self, request: pb.ListDestinationsRequest, context: Context
    ) -> pb.ListDestinationsResponse:
        found, token = await self.destinations.list(request.page_size, request.page_token)
        return pb.ListDestinationsResponse(destinations=found, next_page_token=token)

    async def DeleteDestination(
        self, request: pb.DeleteDestinationRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.destinations.delete(request.name)
        return empty_pb2.Empty()

    async def TestDestination(
        self, request: pb.TestDestinationRequest, context: Context
    ) -> pb.TestDestinationResponse:
        ok, detail = await self.destinations.test(request.name)
        return pb.TestDestinationResponse(ok=ok, detail=detail)

    async def SendTestMessages(
        self, request: pb.SendTestMessagesRequest, context: Context
    ) -> pb.SendTestMessagesResponse:
        return pb.SendTestMessagesResponse(answers=await self.tests.send(request))
