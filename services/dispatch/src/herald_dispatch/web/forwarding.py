"""The web SDK's events and identifications, passed on to segmentation as the account's browser.

The events of concurrent SDK requests of one account go in one IngestEvents call (a group
commit: each request waits for the call that carries its events, so an answered request's events
are recorded). When segmentation refuses such a call, each request's events are sent alone, so
one visitor's bad event is refused to that visitor only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from herald_common.auth import PUBLISHABLE_ROLE, Caller, account_name, act_as
from herald_common.batching import GroupCall
from herald_common.errors import DomainError
from herald_common.grpc_errors import error_details
from herald_common.logging import get_logger

log = get_logger(__name__)
# SDK requests whose events share a call: each carries at most MAX_EVENTS_PER_REQUEST events.
REQUESTS_PER_CALL = 20
CALL_TIMEOUT_SECONDS = 10.0


class Refused(DomainError):
    """Segmentation refused a request's events or identification: the reason, for the visitor."""


def _refusal(error: grpc.aio.AioRpcError) -> str:
    """The field-by-field reasons of a refusal, in one line."""
    violations, _ = error_details(error)
    return "; ".join(f"{v.field}: {v.description}" for v in violations) or error.details() or "refused"


class Forwarder:
    def __init__(self, segmentation: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.SegmentationServiceStub(segmentation)
        self._groups: dict[uuid.UUID, GroupCall[list[pb.Event], str]] = {}

    def _browser(self, account_id: uuid.UUID) -> None:
        act_as(Caller(account_name(account_id), PUBLISHABLE_ROLE))

    async def events(self, account_id: uuid.UUID, events: list[pb.Event]) -> None:
        """Records a request's events; Refused with segmentation's reasons."""
        group = self._groups.get(account_id)
        if group is None:

            async def call(requests: Sequence[list[pb.Event]]) -> list[str]:
                return await self._ingest(account_id, requests)

            group = self._groups[account_id] = GroupCall(call, max_items=REQUESTS_PER_CALL)
        problem = await group(events)
        if problem:
            raise Refused(problem)

    async def _ingest(self, account_id: uuid.UUID, requests: Sequence[list[pb.Event]]) -> list[str]:
        """('' or why it was refused) for each request's events."""
        self._browser(account_id)
        merged = [event for events in requests for event in events]
        try:
            await self.stub.IngestEvents(pb.IngestEventsRequest(events=merged), timeout=CALL_TIMEOUT_SECONDS)
            return ["" for _ in requests]
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            if len(requests) == 1:
                return [_refusal(error)]
        return [(await self._ingest(account_id, [events]))[0] for events in requests]

    async def identify(
        self, account_id: uuid.UUID, request: pb.MergeVisitorRequest
    ) -> pb.MergeVisitorResponse:
        """Merges an anonymous visitor into the user they signed in as; Refused with the reason."""
        self._browser(account_id)
        try:
            return await self.stub.MergeVisitor(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
                raise Refused(_refusal(error)) from None
            raise
