"""Every RPC, probed with input a caller cannot store or that is not a request at all: a NUL in
each string field it takes (at the top level, in its messages, in the first item of its lists),
and bytes that do not decode. Each answer is a clear refusal, never INTERNAL or UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from herald.accounts.v1 import account_service_pb2
from herald.campaign.v1 import campaign_service_pb2
from herald.dispatch.v1 import dispatch_service_pb2
from herald.scheduler.v1 import scheduler_service_pb2
from herald.segmentation.v1 import segmentation_service_pb2
from tests.conftest import Platform
from tests.harness import create_account, keyed_channel
from tests.helpers import condition, field_violations, matching, segment_export_campaign, user

# Which service's port serves each gRPC service.
SERVED_BY = {
    "herald.accounts.v1.AccountService": "campaign",
    "herald.campaign.v1.CampaignService": "campaign",
    "herald.dispatch.v1.DispatchService": "dispatch",
    "herald.scheduler.v1.SchedulerService": "scheduler",
    "herald.segmentation.v1.SegmentationService": "segmentation",
}
MODULES: list[ModuleType] = [
    account_service_pb2,
    campaign_service_pb2,
    dispatch_service_pb2,
    scheduler_service_pb2,
    segmentation_service_pb2,
]
NUL = "a\x00b"
NOT_A_REQUEST = b"\xff\xff\xff\xff\x0f"
# The services are up throughout: UNAVAILABLE would be a bad request taken for an outage.
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


def _methods() -> Iterator[MethodDescriptor]:
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def _string_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Paths to the string fields a request can carry, three messages deep."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield (field,)
        elif field.message_type is not None and depth < 3:
            nested = field.message_type
            if nested.GetOptions().map_entry or nested.full_name.startswith("google."):
                continue
            for rest in _string_paths(nested, depth + 1):
                yield (field, *rest)


def _with_nul(request_type: type[Message], path: tuple[FieldDescriptor, ...]) -> Message:
    request = request_type()
    target: Any = request
    for field in path[:-1]:
        target = target.__getattribute__(field.name)
        if field.is_repeated:
            target = target.add()
    last = path[-1]
    if last.is_repeated:
        target.__getattribute__(last.name).append(NUL)
    else:
        setattr(target, last.name, NUL)
    return request


def _cases() -> Iterator[Any]:
    for method in _methods():
        if method.client_streaming:
            continue
        request_type = GetMessageClass(method.input_type)
        for path in _string_paths(method.input_type):
            dotted = ".".join(f.name for f in path)
            yield pytest.param(method, _with_nul(request_type, path), id=f"{method.name}.{dotted}")


@pytest.fixture(scope="module")
async def channels(platform: Platform) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "hostile")
    opened = {name: keyed_channel(platform.address(name), key) for name in set(SERVED_BY.values())}
    yield opened
    for channel in opened.values():
        await channel.close()


async def _answer(channel: grpc.aio.Channel, method: MethodDescriptor, request: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call: Any = channel.unary_stream(path)(request)  # type: ignore[arg-type]
            async for _ in call:
                pass
        else:
            await channel.unary_unary(path)(request)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("method", "request_with_nul"), list(_cases()))
async def test_a_nul_in_any_string_field_is_refused_clearly(
    channels: dict[str, grpc.aio.Channel], method: MethodDescriptor, request_with_nul: Message
) -> None:
    channel = channels[SERVED_BY[method.containing_service.full_name]]
    code = await _answer(channel, method, request_with_nul.SerializeToString())
    assert code not in BROKEN


@pytest.mark.parametrize("method", [m for m in _methods() if not m.client_streaming], ids=lambda m: m.name)
async def test_bytes_that_are_not_a_request_are_invalid_argument(
    channels: dict[str, grpc.aio.Channel], method: MethodDescriptor
) -> None:
    channel = channels[SERVED_BY[method.containing_service.full_name]]
    # A method this key may not call says so first, whatever the request.
    empty_request = await _answer(channel, method, b"")
    expected = (
        empty_request
        if empty_request == grpc.StatusCode.PERMISSION_DENIED
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert await _answer(channel, method, NOT_A_REQUEST) == expected


def _valid_requests() -> Iterator[Any]:
    """Requests that would succeed but for one NUL, and the field that must be named."""
    event = segmentation_service_pb2.Event(user_id="nul-user", name="Opened", client_event_id=NUL)
    yield pytest.param(
        "segmentation",
        "IngestEvents",
        segmentation_service_pb2.IngestEventsRequest(events=[event]),
        "events[0].client_event_id",
        id="client_event_id",
    )
    # IngestEvents checks its events' text itself (limits.CHECKS_OWN_TEXT): each field is named.
    for field in ("name", "user_signature"):
        signed = segmentation_service_pb2.Event(user_id="nul-user", name="Opened", client_event_id="ok")
        setattr(signed, field, NUL)
        yield pytest.param(
            "segmentation",
            "IngestEvents",
            segmentation_service_pb2.IngestEventsRequest(events=[signed]),
            f"events[0].{field}",
            id=f"event_{field}",
        )
    keyed = segmentation_service_pb2.Event(user_id="nul-user", name="Opened", client_event_id="ok")
    keyed.properties.update({NUL: 1})
    yield pytest.param(
        "segmentation",
        "IngestEvents",
        segmentation_service_pb2.IngestEventsRequest(events=[keyed]),
        "events[0].properties.a\\0b",
        id="event_property_key",
    )
    segment = segmentation_service_pb2.Segment(
        display_name="nul",
        filter=matching(condition("plan", "EQUALS", "pro")),
    )
    yield pytest.param(
        "segmentation",
        "CreateSegment",
        segmentation_service_pb2.CreateSegmentRequest(segment=segment, request_id=NUL),
        "request_id",
        id="request_id",
    )
    named = segmentation_service_pb2.Segment(
        display_name="nul", filter=matching(condition(NUL, "EQUALS", "pro"))
    )
    yield pytest.param(
        "segmentation",
        "CreateSegment",
        segmentation_service_pb2.CreateSegmentRequest(segment=named),
        "segment.filter.all_of[0].property.property",
        id="filter_property_name",
    )
    yield pytest.param(
        "segmentation",
        "UpsertUsers",
        segmentation_service_pb2.UpsertUsersRequest(users=[user(NUL)]),
        "users[0].user_id",
        id="user_id",
    )


@pytest.mark.parametrize(("service", "method", "request_with_nul", "field"), list(_valid_requests()))
async def test_a_nul_in_an_otherwise_valid_request_is_invalid_argument_naming_the_field(
    channels: dict[str, grpc.aio.Channel], service: str, method: str, request_with_nul: Message, field: str
) -> None:
    descriptor = segmentation_service_pb2.DESCRIPTOR.services_by_name["SegmentationService"]
    path = f"/{descriptor.full_name}/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channels[service].unary_unary(path)(request_with_nul.SerializeToString())  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field in named for named in field_violations(refused.value)), field_violations(refused.value)


async def test_a_phone_with_a_trailing_newline_is_not_e164(platform: Platform) -> None:
    member = user("newline-phone")
    member.phone = "+14155550100\n"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.segmentation.UpsertUsers(segmentation_service_pb2.UpsertUsersRequest(users=[member]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "users[0].phone" in field_violations(refused.value)


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        (
            campaign_service_pb2.Schedule(
                recurring=campaign_service_pb2.Recurring(
                    daily=campaign_service_pb2.EveryNDays(every=1),
                    time_of_day="09:00",
                    start_date="9999-01-01",
                    timezone="Europe/Paris",
                )
            ),
            "campaign.schedule.recurring.start_date",
        ),
        (
            campaign_service_pb2.Schedule(
                send_later=campaign_service_pb2.SendLater(send_time=Timestamp(seconds=253_000_000_000))
            ),
            "campaign.schedule.send_later.send_time",
        ),
    ],
)
async def test_a_schedule_beyond_ten_years_is_refused(
    platform: Platform, schedule: campaign_service_pb2.Schedule, field: str
) -> None:
    campaign = segment_export_campaign("segments/none", "destinations/none", schedule=schedule)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.campaigns.CreateCampaign(campaign_service_pb2.CreateCampaignRequest(campaign=campaign))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value)[field] == "at most 10 years ahead"


async def test_a_bad_request_lists_twenty_problems_and_counts_the_rest(platform: Platform) -> None:
    members = []
    for i in range(1000):
        member = user(f"bad-phone-{i}")
        member.phone = "not a phone"
        members.append(member)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.segmentation.UpsertUsers(segmentation_service_pb2.UpsertUsersRequest(users=members))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(refused.value)
    assert len(violations) == 21
    assert violations["request"] == "and 980 more problems not listed"
    assert len(refused.value.details() or "") <= 2000


@pytest.mark.parametrize(
    ("method", "limit"),
    [("IngestEvents", 1 << 20), ("UpsertUsers", 4 << 20), ("CreateSegment", 256 * 1024)],
)
async def test_a_request_over_its_size_limit_is_refused_before_it_is_read(
    channels: dict[str, grpc.aio.Channel], method: str, limit: int
) -> None:
    # Bytes that would not even decode: the size alone is refused, so no decoding was attempted.
    oversized = b"\xff" * (limit + 1)
    path = f"/herald.segmentation.v1.SegmentationService/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channels["segmentation"].unary_unary(path)(oversized)  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        field_violations(refused.value)["request"]
        == f"{limit + 1:,} bytes; this call takes at most {limit:,}"
    )


async def test_an_overlong_time_zone_name_is_an_unknown_zone(platform: Platform) -> None:
    # Zone names are looked up as files: one past the file system's name limit must not be taken
    # for an outage (UNAVAILABLE) or a bug.
    member = user("long-zone")
    member.timezone = "Z" * 300
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.segmentation.UpsertUsers(segmentation_service_pb2.UpsertUsersRequest(users=[member]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "users[0].timezone" in field_violations(refused.value)
