"""Checks that what a campaign points at exists, by asking the services that own it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import deadlines
from herald_common.errors import FieldViolation, InvalidArgument, NotFound, Unavailable, invalid
from herald_common.grpc_errors import error_details
from herald_common.live import RECORDED_SYSTEM_EVENTS, named_events

LOOKUP_TIMEOUT_SECONDS = 5.0
# A halt returns once the campaign's requests already under way have been made.
HALT_TIMEOUT_SECONDS = 25.0
# Test messages wait for the provider's answers (a throttled provider may take a while).
SEND_TIMEOUT_SECONDS = 60.0


def _translate(error: grpc.aio.AioRpcError, name: str, field: str, owner: str) -> Exception:
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(name, field)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid(field, error.details() or "rejected")
    return Unavailable(f"{owner} service: {error.code().name} {error.details()}")


def _under(field: str, path: str) -> str:
    """Segmentation's `audience.x` as the campaign's `campaign.audience.x`."""
    return path + field.removeprefix("audience") if field.startswith("audience") else path


class References:
    def __init__(
        self, segmentation: grpc.aio.Channel, dispatch: grpc.aio.Channel, scheduler: grpc.aio.Channel
    ) -> None:
        self.segments = segmentation_grpc.SegmentationServiceStub(segmentation)
        self.destinations = dispatch_grpc.DispatchServiceStub(dispatch)
        self.runs = scheduler_grpc.SchedulerServiceStub(scheduler)

    async def qualifications(self, campaign: str, user_id: str) -> scheduler_pb.ListQualificationsResponse:
        """The times the user qualified for a live campaign, and their waits, from the scheduler."""
        try:
            return await self.runs.ListQualifications(
                scheduler_pb.ListQualificationsRequest(campaign=campaign, user_id=user_id),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, campaign, "user_id", "scheduler") from None

    async def live_trigger(self, trigger: campaign_pb.LiveTrigger, path: str) -> list[str]:
        """Each event the trigger names: its `where` tests fit the properties' types, and a date
        property is a date where the account has sent it. Answers warnings: events never sent."""
        warnings: list[str] = []
        violations: list[FieldViolation] = []
        for event, field in named_events(trigger, path):
            if event.event_name:  # else any event
                await self._described(event, field, violations, warnings)
        if trigger.WhichOneof("kind") == "date_property":
            dated = trigger.date_property
            field = f"{path}.date_property.date_property"
            described = await self.segments.DescribeEvent(
                segmentation_pb.DescribeEventRequest(event_name=dated.event.event_name),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
            kind = described.property_types.get(
                dated.date_property, segmentation_pb.PROPERTY_TYPE_UNSPECIFIED
            )
            if kind not in (
                segmentation_pb.PROPERTY_TYPE_UNSPECIFIED,
                segmentation_pb.PROPERTY_TYPE_DATETIME,
            ):
                violations.append(
                    FieldViolation(
                        field,
                        f"{dated.event.event_name!r} events carry {dated.date_property!r} as a "
                        f"{segmentation_pb.PropertyType.Name(kind).removeprefix('PROPERTY_TYPE_').lower()}, "
                        "not an RFC 3339 date-time",
                    )
                )
            elif described.seen and kind == segmentation_pb.PROPERTY_TYPE_UNSPECIFIED:
                warnings.append(f"{field}: no {dated.event.event_name!r} event has carried it yet")
        if violations:
            raise InvalidArgument(violations)
        return warnings

    async def _described(
        self, event: campaign_pb.LiveEvent, field: str, violations: list[FieldViolation], warnings: list[str]
    ) -> segmentation_pb.EventDescription | None:
        """The event as segmentation has seen it, its `where` tests checked against the types of
        its properties (a misfit is added to `violations`, an event never sent to `warnings`)."""
        request = segmentation_pb.DescribeEventRequest(event_name=event.event_name, where=event.where)
        try:
            described = await self.segments.DescribeEvent(
                request, timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS)
            )
        except grpc.aio.AioRpcError as error:
            found, _ = error_details(error)
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and found:
                violations += [FieldViolation(f"{field}.{v.field}", v.description) for v in found]
                return None
            raise _translate(error, "", field, "segmentation") from None
        if not described.seen and event.event_name not in RECORDED_SYSTEM_EVENTS:
            warnings.append(f"{field}.event_name: no {event.event_name!r} event has been ingested yet")
        return described

    async def goal(self, goal: campaign_pb.Goal, path: str) -> list[str]:
        """The goal's `where` tests fit its event's property types, and its revenue property is a
        number where the event has carried it. Answers warnings: an event or property never sent."""
        warnings: list[str] = []
        violations: list[FieldViolation] = []
        described = await self._described(goal.event, f"{path}.event", violations, warnings)
        if described is not None and goal.revenue_property:
            field = f"{path}.revenue_property"
            kind = described.property_types.get(
                goal.revenue_property, segmentation_pb.PROPERTY_TYPE_UNSPECIFIED
            )
            if kind == segmentation_pb.PROPERTY_TYPE_UNSPECIFIED:
                if described.seen:
                    warnings.append(f"{field}: no {goal.event.event_name!r} event has carried it yet")
            elif kind != segmentation_pb.PROPERTY_TYPE_NUMBER:
                type_name = segmentation_pb.PropertyType.Name(kind).removeprefix("PROPERTY_TYPE_").lower()
                violations.append(
                    FieldViolation(
                        field,
                        f"{goal.event.event_name!r} events carry {goal.revenue_property!r} as a {type_name}, "
                        "not a number",
                    )
                )
        if violations:
            raise InvalidArgument(violations)
        return warnings

    async def destination(self, name: str, field: str) -> dispatch_pb.Destination:
        try:
            return await self.destinations.GetDestination(
                dispatch_pb.GetDestinationRequest(name=name),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, name, field, "dispatch") from None

    async def user(self, user_id: str, field: str) -> segmentation_pb.User:
        try:
            return await self.segments.GetUser(
                segmentation_pb.GetUserRequest(name=f"users/{user_id}"),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, f"users/{user_id}", field, "segmentation") from None

    async def best_hour(self, user_id: str) -> segmentation_pb.AudienceMember | None:
        """The user's zone and best hour (None for a user segmentation does not know)."""
        try:
            found = await self.segments.MatchUsers(
                segmentation_pb.MatchUsersRequest(user_ids=[user_id], with_best_hour=True),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, f"users/{user_id}", "user_id", "segmentation") from None
        return found.members[0] if found.members else None

    async def send_test_messages(
        self, destination: str, messages: list[tuple[str, str]], dlt_template_id: str
    ) -> list[dispatch_pb.TestMessageAnswer]:
        """Sends (phone, text) pairs through the destination now; the provider's answer to each."""
        request = dispatch_pb.SendTestMessagesRequest(
            destination=destination,
            messages=[dispatch_pb.TestMessage(phone=phone, text=text) for phone, text in messages],
            dlt_template_id=dlt_template_id,
        )
        try:
            sent = await self.destinations.SendTestMessages(
                request, timeout=deadlines.timeout(SEND_TIMEOUT_SECONDS)
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, destination, "campaign.destination", "dispatch") from None
        return list(sent.answers)

    async def halt_deliveries(self, campaign: str) -> None:
        """Tells dispatch to stop the campaign's deliveries on every replica, now."""
        try:
            await self.destinations.HaltCampaignDeliveries(
                dispatch_pb.HaltCampaignDeliveriesRequest(campaign=campaign),
                timeout=deadlines.timeout(HALT_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"dispatch service: {error.code().name} {error.details()}") from None

    async def deliveries(self, campaign: str, user_id: str) -> list[dispatch_pb.Delivery]:
        """A user's final delivery results for a campaign, from dispatch."""
        try:
            found = await self.destinations.ListDeliveries(
                dispatch_pb.ListDeliveriesRequest(campaign=campaign, user_id=user_id),
                timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, campaign, "user_id", "dispatch") from None
        return list(found.deliveries)

    async def run_deliveries(self, campaign: str, run: str) -> AsyncIterator[list[dispatch_pb.Delivery]]:
        """A run's final delivery results from dispatch, a page at a time."""
        token = ""
        while True:
            try:
                page = await self.destinations.ListDeliveries(
                    dispatch_pb.ListDeliveriesRequest(campaign=campaign, run=run, page_token=token),
                    timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS),
                )
            except grpc.aio.AioRpcError as error:
                raise _translate(error, run, "run", "dispatch") from None
            yield list(page.deliveries)
            token = page.next_page_token
            if not token:
                return

    async def reaches_india(self, audience: campaign_pb.Audience) -> bool:
        """Whether anyone the audience reaches by SMS has a +91 phone number."""
        source = audience.WhichOneof("source")
        if source == "segment":
            within = segmentation_pb.Condition(in_segment=audience.segment)
        elif source == "list":
            within = segmentation_pb.Condition(in_list=audience.list)
        else:
            within = segmentation_pb.Condition(
                group=segmentation_pb.SegmentFilter.FromString(audience.filter.SerializeToString())
            )
        indian = segmentation_pb.Condition(
            profile=segmentation_pb.ProfileCondition(
                field=segmentation_pb.PROFILE_FIELD_PHONE, operator=segmentation_pb.OPERATOR_STARTS_WITH
            )
        )
        indian.profile.value.string_value = "+91"
        request = segmentation_pb.EstimateReachRequest(
            audience=segmentation_pb.Audience(filter=segmentation_pb.SegmentFilter(all_of=[within, indian])),
            channel=segmentation_pb.CHANNEL_SMS,
        )
        try:
            reach = await self.segments.EstimateReach(
                request, timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS)
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, "", "campaign.audience", "segmentation") from None
        return reach.reachable_count > 0

    async def audience(self, audience: campaign_pb.Audience, field: str) -> None:
        """The audience is valid and everything it names is the caller's: segmentation checks it
        by estimating its reach; its answers are reported at the campaign's own field paths."""
        request = segmentation_pb.EstimateReachRequest(
            audience=segmentation_pb.Audience.FromString(audience.SerializeToString())
        )
        try:
            await self.segments.EstimateReach(request, timeout=deadlines.timeout(LOOKUP_TIMEOUT_SECONDS))
        except grpc.aio.AioRpcError as error:
            violations, missing = error_details(error)
            if error.code() == grpc.StatusCode.NOT_FOUND and violations:
                raise NotFound(missing, _under(violations[0].field, field)) from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and violations:
                raise InvalidArgument(
                    [FieldViolation(_under(v.field, field), v.description) for v in violations]
                ) from None
            raise _translate(error, "", field, "segmentation") from None
